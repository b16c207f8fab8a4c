"""The GPU fast path: training iterations/s and MFU of SaF-HRNet48 with each `train.fast` switch.

    python benchmarks/train_speed.py               # CUDA: I_hrnet48 (paper scale), 512x512, batch 16
    python benchmarks/train_speed.py --quick       # any device: the tiny-scale SaF, 64x64, batch 2

The model is experiment I_hrnet48 at the paper scale (HRNet-W48, D = 720, the full SaF head;
backbone not pretrained), stepped by the trainer's own `segrepro.engine.train.train_step` after
`segrepro.engine.train.fast_path(model, fast, device)`, on a fixed random batch on the device (the
loader and `pin_memory` are not part of it: benchmarks/pipeline.py measures loading). Variants:
fp32; bf16 autocast (the trainer's default); bf16 with channels_last, with cudnn_benchmark, with
torch.compile, one at a time; and all of them on. Global switches (cuDNN's autotuner, dynamo's
caches) are reset between variants.

MFU (model FLOPs utilisation) = FLOPs of one step (forward + backward, FlopCounterMode on the meta
device; benchmarks/common.py) x iterations/s / the device's dense bf16 peak, from the table
below; a device not in it gets no MFU (it says so). Every variant is divided by the bf16 peak,
fp32 included.

Target: 5x SaF's training speed on an RTX 2080 Ti (Table 5: 2.0 it/s for HRNet48 + ours at batch
4). This benchmark runs batch 16 (the paper's training batch, over 4 GPUs there), so it/s here are
4x the images of an it/s there; both ratios are printed. Without CUDA the real figures cannot be
measured: the run says so, prints the FLOPs the target needs, and runs the quick form.
"""

from __future__ import annotations

import argparse

import torch
from common import (
    add_common_arguments,
    build_ours,
    markdown_table,
    our_model_config,
    random_batch,
    seconds_of,
    setup,
    spread,
    step_flops,
    write_results,
)

from segrepro.core.devices import device_name
from segrepro.engine.train import build_optimizer, fast_path, train_step

NUM_CLASSES = 150  # ADE20K (SaF Table 5's setting)
# Dense bf16/fp16 tensor peak, FLOP/s, by a substring of torch.cuda.get_device_name.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "2080 Ti": 26.9e12}
PAPER_IT_PER_S, PAPER_BATCH, TARGET_FACTOR = 2.0, 4, 5.0  # SaF Table 5, RTX 2080 Ti
VARIANTS = {
    "fp32": {"precision": "fp32"},
    "bf16": {"precision": "bf16"},
    "bf16 + channels_last": {"precision": "bf16", "channels_last": True},
    "bf16 + cudnn_benchmark": {"precision": "bf16", "cudnn_benchmark": True},
    "bf16 + compile": {"precision": "bf16", "compile": True},
    "all on": {"precision": "bf16", "channels_last": True, "cudnn_benchmark": True, "compile": True},
}


def peak_flops(name: str) -> float | None:
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)


def why_skipped(fast: dict, device: torch.device) -> str | None:
    """Why a variant is not run here, or None. On the CPU every step is fp32 (the trainer
    autocasts on CUDA only), there is no cuDNN, and compiling would dominate a smoke run: only
    fp32 and channels_last are measured."""
    if device.type == "cuda":
        return None
    if fast.get("compile"):
        return "CPU smoke run: compiling would dominate it"
    if fast.get("cudnn_benchmark"):
        return "CPU: no cuDNN (same as bf16)"
    if not fast.get("channels_last") and fast["precision"] == "bf16":
        return "CPU: the trainer autocasts on CUDA only (same as fp32)"
    return None


def run_variant(config: dict, fast: dict, args, device: torch.device) -> dict:
    torch.backends.cudnn.benchmark = False  # fast_path sets it globally; each variant starts from off
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_ours(config, NUM_CLASSES).to(device).train()
    optimizer = build_optimizer(model, {"optimizer": "sgd", "lr": 0.02, "momentum": 0.9, "weight_decay": 1e-4})
    forward = fast_path(model, fast, device)
    images, labels = random_batch(args.batch, args.size, NUM_CLASSES, device)
    if fast.get("channels_last"):
        images = images.contiguous(memory_format=torch.channels_last)
    step = lambda: train_step(forward, optimizer, images, labels, 0.02, fast["precision"])  # noqa: E731
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warmup = args.warmup + (2 if fast.get("compile") else 0)  # the first compiled steps compile
    warmup_s = seconds_of(lambda: [step() for _ in range(warmup)], device)
    times = [seconds_of(lambda: [step() for _ in range(args.steps)], device) / args.steps
             for _ in range(args.repeats)]
    result = {"fast": fast, "step_s": spread(times), "it_per_s": 1 / spread(times)["median"],
              "warmup_s": warmup_s}
    if device.type == "cuda":
        result["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def markdown(record: dict) -> str:
    rows = []
    for name, v in record["variants"].items():
        if "skipped" in v:
            rows.append([name, "—", "—", "—", "—", v["skipped"]])
            continue
        mfu = f"{v['mfu']:.1%}" if v.get("mfu") is not None else "—"
        versus = "—" if record["quick"] else f"{v['it_per_s'] / PAPER_IT_PER_S:.2f}x"
        note = f"{v['peak_mib']:,.0f} MiB" if "peak_mib" in v else "fp32 on the CPU"
        rows.append([name, f"{v['it_per_s']:.2f}", f"{v['it_per_s'] * record['batch']:.1f}", mfu, versus, note])
    return "\n".join([
        f"# Training speed: {record['model']}", "",
        f"{record['device']}; {record['size']}x{record['size']}, batch {record['batch']}; "
        f"{record['train_step_gflop']:,.3g} GFLOP per step (forward + backward). {record['mfu_note']}", "",
        markdown_table(["variant", "it/s", "images/s", "MFU", f"vs paper's {PAPER_IT_PER_S} it/s (batch {PAPER_BATCH})",
                        "peak memory / note"], rows), "",
        record["target_note"],
        *(["", record["no_gpu_note"]] if record["no_gpu_note"] else []),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--size", type=int, default=None, help="input side (512; quick 64)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (16; quick 2)")
    parser.add_argument("--steps", type=int, default=None, help="steps per timed repeat (20; quick 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (3; quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (5; quick 1)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args()
    device = setup(args)
    paper_config = our_model_config("saf", "I_hrnet48", "paper")
    no_gpu_note = None
    if device.type != "cuda" and not args.quick:
        paper_flops = step_flops(lambda: build_ours(paper_config, NUM_CLASSES), 16, 512)["train_step_gflop"] * 1e9
        need = TARGET_FACTOR * PAPER_IT_PER_S * paper_flops
        no_gpu_note = (f"no GPU: the real figures (SaF-HRNet48, 512x512, batch 16) need CUDA. One step is "
                       f"{paper_flops / 1e12:.2f} TFLOP; the target, {TARGET_FACTOR * PAPER_IT_PER_S:.0f} it/s, needs "
                       f"{need / 1e12:.0f} TFLOP/s = {need / PEAK_FLOPS['H100']:.1%} MFU on an H100/H200.")
        print(no_gpu_note + " Running the quick form.", flush=True)
        args.quick = True
    quick = args.quick
    args.size = args.size or (64 if quick else 512)
    args.batch = args.batch or (2 if quick else 16)
    args.steps = args.steps or (1 if quick else 20)
    args.repeats = args.repeats or (2 if quick else 3)
    args.warmup = args.warmup or (1 if quick else 5)
    config = our_model_config("saf", "I", "tiny") if quick else paper_config
    model_name = "saf/I (tiny scale)" if quick else "saf/I_hrnet48 (paper scale, HRNet-W48)"
    name = device_name(device)
    flops = step_flops(lambda: build_ours(config, NUM_CLASSES), args.batch, args.size)["train_step_gflop"] * 1e9
    peak = peak_flops(name) if device.type == "cuda" else None
    mfu_note = (f"MFU against {peak / 1e12:.0f} TFLOP/s (dense bf16)." if peak
                else f"MFU not given: no peak FLOP/s known for {name}.")
    print(f"{name}: {model_name}, {args.size}x{args.size}, batch {args.batch}, "
          f"{flops / 1e9:,.3g} GFLOP/step. {mfu_note}", flush=True)

    variants = {}
    for variant in args.variants:
        fast = VARIANTS[variant]
        reason = why_skipped(fast, device)
        if reason:
            variants[variant] = {"fast": fast, "skipped": reason}
            print(f"  {variant:24s} skipped: {reason}", flush=True)
            continue
        result = run_variant(config, fast, args, device)
        result["mfu"] = flops * result["it_per_s"] / peak if peak else None
        variants[variant] = result
        mfu = f", MFU {result['mfu']:.1%}" if peak else ""
        memory = f", peak {result['peak_mib']:,.0f} MiB" if "peak_mib" in result else ""
        print(f"  {variant:24s} {result['it_per_s']:7.2f} it/s = {result['it_per_s'] * args.batch:8.1f} images/s"
              f"{mfu}{memory} (warm-up {result['warmup_s']:.1f} s)", flush=True)

    best = max((v["it_per_s"] for v in variants.values() if "it_per_s" in v), default=0.0)
    target_note = (
        f"Best {best:.2f} it/s at batch {args.batch} = {best / PAPER_IT_PER_S:.2f}x the paper's {PAPER_IT_PER_S} it/s "
        f"at batch {PAPER_BATCH} (target {TARGET_FACTOR:.0f}x), "
        f"{best * args.batch / (PAPER_IT_PER_S * PAPER_BATCH):.2f}x "
        "its images/s." if not quick else
        f"Quick form on {name}: these figures check the benchmark, not the target "
        f"({TARGET_FACTOR:.0f}x the paper's {PAPER_IT_PER_S} it/s needs CUDA and the paper model)."
    )
    print(target_note)
    record = {"benchmark": "train_speed", "device": name, "quick": quick, "model": model_name,
              "size": args.size, "batch": args.batch, "steps": args.steps, "repeats": args.repeats,
              "train_step_gflop": flops / 1e9, "peak_flops": peak, "mfu_note": mfu_note,
              "paper": {"it_per_s": PAPER_IT_PER_S, "batch": PAPER_BATCH, "device": "RTX 2080 Ti"},
              "target_note": target_note, "no_gpu_note": no_gpu_note, "variants": variants}
    json_path, md_path = write_results(args.out, "train_speed", record, markdown(record))
    print(f"\nwrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
