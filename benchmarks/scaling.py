"""SaF: how a training step's time and peak memory grow with the input size and the pyramid levels.

    python benchmarks/scaling.py                   # CPU: the demo-scale model (1/8-width ResNet-18 + App. D decoder)
    python benchmarks/scaling.py --model paper     # GPU: HRNet-W48 (experiment I_hrnet48 at the paper scale)
    python benchmarks/scaling.py --quick           # tiny-scale model, 64 and 96 px: checks it runs

Two sweeps of experiment I (pyramidal output, the contextual module), one training step
(`segrepro.engine.train.train_step`, the model's own loss with the pyramidal targets computed on the fly):

- input size 256, 384, 512, 768, 1024 (square, batch --batch) with the four levels (strides 32,
  16, 8, 4);
- the number of levels at --levels-size: 2 (strides 32, 4: experiment K), 3 (32, 8, 4), 4 (32,
  16, 8, 4).

Each point runs alone (benchmarks/common.py: on the CPU in a fresh forked child, so its peak
resident memory is its own; on CUDA the allocator's peak) and reports the median of --steps steps
after one warm-up step, with the step's FLOPs (forward + backward, FlopCounterMode on the meta
device) beside it. Writes results/benchmarks/scaling.{json,md,png}. On the CPU the paper model
(HRNet-W48 at 1024 px) takes minutes per step; the demo model's sizes all fit in a few GiB.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import (
    MEMORY_METHOD,
    add_common_arguments,
    build_ours,
    isolated,
    markdown_table,
    memory_floor,
    our_model_config,
    random_batch,
    seconds_of,
    setup,
    spread,
    step_flops,
    write_results,
)

from segrepro.core import atomic
from segrepro.core.devices import device_name
from segrepro.engine.train import build_optimizer, train_step

NUM_CLASSES = 150  # ADE20K's (SaF's ablation dataset)
LEVELS = {2: [32, 4], 3: [32, 8, 4], 4: [32, 16, 8, 4]}
MODELS = {"demo": ("I", "demo"), "paper": ("I_hrnet48", "paper"), "tiny": ("I", "tiny")}
OPTIMIZER = {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4}


def model_config(model: str, strides: list[int]) -> dict:
    experiment, scale = MODELS[model]
    return our_model_config("saf", experiment, scale, {"head": {"strides": strides}})


def measure_point(config: dict, size: int, batch: int, steps: int, device_type: str,
                  precision: str) -> list[float]:
    """Seconds of each timed training step (after one warm-up) of the model at this size."""
    device = torch.device(device_type)
    torch.manual_seed(0)
    network = build_ours(config, NUM_CLASSES).to(device).train()
    optimizer = build_optimizer(network, OPTIMIZER)
    images, labels = random_batch(batch, size, NUM_CLASSES, device)
    step = lambda: train_step(network, optimizer, images, labels, OPTIMIZER["lr"], precision)  # noqa: E731
    step()
    return [seconds_of(step, device) for _ in range(steps)]


def point(args, device: torch.device, strides: list[int], size: int) -> dict:
    config = model_config(args.model, strides)
    times, peak = isolated(device, measure_point, config, size, args.batch, args.steps, device.type, args.precision)
    flops = step_flops(lambda: build_ours(config, NUM_CLASSES), args.batch, size)
    result = {"size": size, "strides": strides, "levels": len(strides), "step_s": spread(times),
              "peak_mib": peak, "train_step_gflop": flops["train_step_gflop"]}
    print(f"  {size:5d} px, strides {','.join(map(str, strides)):10s}: "
          f"{result['step_s']['median'] * 1e3:9.1f} ms/step, "
          f"peak {peak:8,.0f} MiB, {flops['train_step_gflop']:8.1f} GFLOP/step", flush=True)
    return result


def plot(record: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes, levels = record["sizes"], record["levels"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, points, x_key, x_label in ((axes[0], sizes, "size", "input side (px)"),
                                      (axes[1], levels, "levels", "pyramid levels")):
        xs = [p[x_key] for p in points]
        ax.plot(xs, [p["step_s"]["median"] * 1e3 for p in points], "o-", color="tab:blue", label="step time")
        ax.set_xlabel(x_label)
        ax.set_ylabel("ms / training step", color="tab:blue")
        ax.set_xticks(xs)
        twin = ax.twinx()
        twin.plot(xs, [p["peak_mib"] for p in points], "s--", color="tab:red", label="peak memory")
        twin.set_ylabel("peak MiB", color="tab:red")
        ax.set_ylim(bottom=0)  # from zero: the growth reads as a ratio
        twin.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    s = record["settings"]
    axes[0].set_title(f"4 levels, batch {s['batch']}")
    axes[1].set_title(f"{s['levels_size']}x{s['levels_size']}, batch {s['batch']}")
    fig.suptitle(f"SaF {record['model']}: one training step on {record['device']}", fontsize=9)
    fig.tight_layout()
    atomic.write_with(out, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)


def markdown(record: dict) -> str:
    s = record["settings"]
    header = ["input", "levels (strides)", "ms/step (median)", "GFLOP/step", "peak MiB"]
    rows = [[f"{p['size']}²", f"{p['levels']} ({','.join(map(str, p['strides']))})",
             f"{p['step_s']['median'] * 1e3:.1f}", f"{p['train_step_gflop']:.1f}", f"{p['peak_mib']:,.0f}"]
            for p in record["sizes"] + record["levels"]]
    return "\n".join([
        f"# SaF scaling: {record['model']}", "",
        f"{record['device']}; batch {s['batch']}, {s['precision']}, median of {s['steps']} steps; "
        f"peak memory: {record['memory']} (the smallest training step's: {record['memory_floor_mib']:,.0f} MiB).", "",
        markdown_table(header, rows), "",
        "![step time and peak memory](scaling.png)",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--model", choices=("demo", "paper"), default=None,
                        help="demo: the demo-scale SaF (CPU default); paper: HRNet-W48 (GPU default)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="input sides (multiples of 32)")
    parser.add_argument("--levels-size", type=int, default=None, help="input side of the levels sweep (512)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (GPU 8, CPU 2, quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per point (GPU 10, CPU 3, quick 1)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="CUDA autocast (CPU: fp32)")
    args = parser.parse_args()
    device = setup(args)
    gpu = device.type == "cuda"
    if args.quick:
        args.model = "tiny"
    args.model = args.model or ("paper" if gpu else "demo")
    args.sizes = args.sizes or ([64, 96] if args.quick else [256, 384, 512, 768, 1024])
    args.levels_size = args.levels_size or (64 if args.quick else 512)
    args.batch = args.batch or (1 if args.quick else 8 if gpu else 2)
    args.steps = args.steps or (1 if args.quick else 10 if gpu else 3)
    if not gpu:
        args.precision = "fp32"  # the trainer autocasts on CUDA only
    experiment, scale = MODELS[args.model]
    print(f"{device_name(device)}: SaF saf/{experiment} at scale {scale}, batch {args.batch}, {args.precision}",
          flush=True)

    floor = memory_floor(device)
    print(f"peak memory of the smallest training step (included below): {floor:,.0f} MiB", flush=True)
    print("input size (4 levels):", flush=True)
    sizes = [point(args, device, LEVELS[4], size) for size in args.sizes]
    print(f"levels ({args.levels_size} px):", flush=True)
    levels = [point(args, device, LEVELS[count], args.levels_size) for count in sorted(LEVELS)]
    record = {
        "benchmark": "scaling",
        "device": device_name(device),
        "model": f"saf/{experiment} ({scale} scale)",
        "memory": MEMORY_METHOD[device.type],
        "memory_floor_mib": floor,
        "settings": {"batch": args.batch, "steps": args.steps, "precision": args.precision,
                     "levels_size": args.levels_size, "num_classes": NUM_CLASSES},
        "sizes": sizes,
        "levels": levels,
    }
    json_path, md_path = write_results(args.out, "scaling", record, markdown(record))
    plot(record, args.out / "scaling.png")
    print(f"\nwrote {json_path}, {md_path} and {args.out / 'scaling.png'}")


if __name__ == "__main__":
    main()
