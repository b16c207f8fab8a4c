"""Our models against segmentation_models_pytorch's (smp) on the same backbone, input and step.

    python benchmarks/peers.py [--size 512 --batch 8 --repeats 5 --steps 10]   # GPU defaults
    python benchmarks/peers.py                    # CPU: 256x256, batch 2, 5 repeats of 1 step
    python benchmarks/peers.py --quick            # 64x64, tiny-scale backbone widths: checks it runs

Pairs (ours: built through the project exactly as the pipeline trains it, paper scale, backbone
not pretrained; peer: smp 0.6 on the same timm backbone, `tu-` + our backbone's name, no weights):

- PSPNet (pspnet/psp50: dilated ResNet-50, output stride 8, PPM 1/2/3/6 + 3x3 conv, auxiliary
  branch on layer3 with alpha 0.4) vs smp.PSPNet(encoder_depth=5, output_stride=8, upsampling=8).
  smp's default PSPNet is not the paper's: encoder_depth 3 cuts the ResNet after layer2 (stride
  8, no dilated layer3/4), then PPM and a 1x1 conv; the figures list it (FLOPs, parameters) but
  time the deeper configuration, which is the paper's network except for smp's 1x1 (not 3x3)
  conv after the PPM and its missing auxiliary branch.
- SemanticFPN (hfgd/sfpn_identity: ResNet-50 at stride 32, the identity encoding, 256-channel
  SemanticFPN, no HFGM) vs smp.FPN(decoder_segmentation_channels=256): smp's top-down uses
  nearest upsampling and GroupNorm in its segmentation blocks and has no extra encoding.
- DeepLabV3+ (hfgd/d8_deeplabv3p: dilated ResNet-50, OS 8, ASPP 12/24/36, 48-channel skip, two
  3x3 convs) vs smp.DeepLabV3Plus(encoder_output_stride=8, decoder_aspp_separable=False): smp
  adds a separable 3x3 after the ASPP and decodes with one separable 3x3 instead of two full ones.

Our backbone is timm's `resnet50s` (the papers' deep 3x3 stem); smp's usual "tu-resnet50" has the
7x7 stem, so the peer is built on "tu-resnet50s" to compare heads, not stems (--peer-encoder
overrides it). Each step is the trainer's `segrepro.engine.train.train_step` (forward, loss, backward,
SGD step): ours with its own loss (the main cross-entropy, plus PSPNet's auxiliary one, part of
the paper's model), the peer through a wrapper with the same masked cross-entropy on its output.
Inference: `predict` in eval mode under torch.inference_mode. (--quick gives both backbones the
tiny scale's widths; smp's decoders keep their own.)

Timing: after warm-up steps, `--repeats` rounds; in each round ours and the peer each run
`--steps` training steps, then each `--steps` inference passes, in alternating order; the
throughput ratio ours/peer of each round gives min/median/max. FLOPs: FlopCounterMode on the
meta device (forward + backward of one step, and one inference forward). Peak memory: see
benchmarks/common.py (CUDA allocator peak; CPU: peak RSS of a fresh forked child per model).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import segmentation_models_pytorch as smp
import torch
from common import (
    IGNORE_INDEX,
    MEMORY_METHOD,
    add_common_arguments,
    build_ours,
    isolated,
    markdown_table,
    memory_floor,
    our_model_config,
    parameter_count,
    random_batch,
    seconds_of,
    setup,
    spread,
    step_flops,
    write_results,
)

from segrepro.core.devices import device_name
from segrepro.engine.train import build_optimizer, train_step
from segrepro.models.common.losses import masked_cross_entropy

NUM_CLASSES = 150  # ADE20K's, for every model (the classifier is a small part of each)
LR = 0.01
OPTIMIZER = {"optimizer": "sgd", "lr": LR, "momentum": 0.9, "weight_decay": 1e-4}


class Peer(torch.nn.Module):
    """An smp model with the interface the trainer expects: outputs {"out": logits}, `.loss` the
    masked cross-entropy of the main output (what ours computes for its main output)."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.network(images)}

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)

    def loss(self, outputs: dict, labels: torch.Tensor):
        main = masked_cross_entropy(outputs["out"], labels, IGNORE_INDEX)
        return main, {"main": main}


@dataclass(frozen=True)
class Pair:
    name: str
    paper: str
    experiment: str
    peer: str      # smp class name
    peer_kwargs: tuple  # (key, value) pairs beyond encoder, weights and classes


PAIRS = (
    Pair("PSPNet", "pspnet", "psp50", "PSPNet", (("encoder_depth", 5), ("output_stride", 8), ("upsampling", 8))),
    Pair("SemanticFPN", "hfgd", "sfpn_identity", "FPN", (("decoder_segmentation_channels", 256),)),
    Pair("DeepLabV3+", "hfgd", "d8_deeplabv3p", "DeepLabV3Plus",
         (("encoder_output_stride", 8), ("decoder_atrous_rates", (12, 24, 36)), ("decoder_aspp_separable", False))),
)
# Listed for its FLOPs and parameters only: smp's PSPNet as it comes (encoder_depth 3, no dilation).
SMP_DEFAULT_PSPNET = Pair("PSPNet (smp default)", "pspnet", "psp50", "PSPNet", ())


def ours_config(pair: Pair, scale: str) -> dict:
    return our_model_config(pair.paper, pair.experiment, scale)


def build_peer(pair: Pair, encoder: str, backbone_kwargs: dict) -> Peer:
    """The smp model on `encoder` (tu-NAME), the backbone's width kwargs passed through to timm."""
    network = getattr(smp, pair.peer)(encoder, encoder_weights=None, classes=NUM_CLASSES,
                                      **dict(pair.peer_kwargs), **backbone_kwargs)
    return Peer(network)


def build(side: str, pair: Pair, config: dict, encoder: str) -> torch.nn.Module:
    """Our model from its resolved model section, or the peer on our backbone's widths."""
    if side == "ours":
        return build_ours(config, NUM_CLASSES)
    return build_peer(pair, encoder, dict(config["backbone"].get("kwargs") or {}))


def measure_memory(side: str, pair: Pair, config: dict, encoder: str, batch: int, size: int,
                   device_type: str, precision: str, steps: int) -> None:
    """Build one model and its optimizer and train `steps` steps (what the peak is measured over)."""
    device = torch.device(device_type)
    torch.manual_seed(0)
    model = build(side, pair, config, encoder).to(device).train()
    optimizer = build_optimizer(model, OPTIMIZER)
    images, labels = random_batch(batch, size, NUM_CLASSES, device)
    for _ in range(steps):
        train_step(model, optimizer, images, labels, LR, precision)


class Side:
    """One model of a pair on the device, with its optimizer and the batch both sides share."""

    def __init__(self, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, precision: str):
        self.model, self.images, self.labels, self.precision = model, images, labels, precision
        self.optimizer = build_optimizer(model, OPTIMIZER)

    def train_steps(self, steps: int) -> None:
        self.model.train()
        for _ in range(steps):
            train_step(self.model, self.optimizer, self.images, self.labels, LR, self.precision)

    def inference(self, steps: int) -> None:
        self.model.eval()
        autocast = torch.autocast(self.images.device.type, dtype=torch.bfloat16,
                                  enabled=self.images.device.type == "cuda" and self.precision == "bf16")
        with torch.inference_mode(), autocast:
            for _ in range(steps):
                self.model.predict(self.images)


def profile_step(side: Side, label: str, rows: int = 12) -> None:
    """Print the operators that take the most time in one training step (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if side.images.is_cuda else [])
    with profile(activities=activities) as prof:
        side.train_steps(1)
    key = "self_cuda_time_total" if side.images.is_cuda else "self_cpu_time_total"
    print(f"\nprofile of one training step: {label}")
    print(prof.key_averages().table(sort_by=key, row_limit=rows))


def compare(pair: Pair, args, device: torch.device) -> dict:
    config = ours_config(pair, args.scale)
    encoder = args.peer_encoder or f"tu-{config['backbone']['name']}"
    print(f"\n{pair.name}: ours {pair.paper}/{pair.experiment} vs smp.{pair.peer} on {encoder}", flush=True)
    record = {"ours": {"experiment": f"{pair.paper}/{pair.experiment}"},
              "peer": {"model": f"smp.{pair.peer}", "encoder": encoder,
                       "kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in pair.peer_kwargs}}}
    for side in ("ours", "peer"):
        make = lambda side=side: build(side, pair, config, encoder)  # noqa: E731
        record[side]["params_m"] = parameter_count(make()) / 1e6
        record[side].update(step_flops(make, args.batch, args.size))
        _, record[side]["peak_mib"] = isolated(device, measure_memory, side, pair, config, encoder,
                                               args.batch, args.size, device.type, args.precision, 2)

    images, labels = random_batch(args.batch, args.size, NUM_CLASSES, device)
    torch.manual_seed(0)
    sides = {side: Side(build(side, pair, config, encoder).to(device), images, labels, args.precision)
             for side in ("ours", "peer")}
    for side in sides.values():
        side.train_steps(args.warmup)
        side.inference(args.warmup)
    train_s = {"ours": [], "peer": []}
    infer_s = {"ours": [], "peer": []}
    for repeat in range(args.repeats):
        order = ("ours", "peer") if repeat % 2 == 0 else ("peer", "ours")
        for name in order:
            train_s[name].append(seconds_of(lambda name=name: sides[name].train_steps(args.steps), device) / args.steps)
        for name in order:
            infer_s[name].append(seconds_of(lambda name=name: sides[name].inference(args.steps), device) / args.steps)
    for name in ("ours", "peer"):
        step = spread(train_s[name])
        record[name]["train_step_s"] = step
        record[name]["train_images_per_s"] = args.batch / step["median"]
        record[name]["train_tflop_per_s"] = record[name]["train_step_gflop"] / step["median"] / 1e3
        record[name]["inference_s"] = spread(infer_s[name])
        record[name]["inference_images_per_s"] = args.batch / record[name]["inference_s"]["median"]
    record["train_ratio"] = spread([p / o for o, p in zip(train_s["ours"], train_s["peer"], strict=True)])
    record["inference_ratio"] = spread([p / o for o, p in zip(infer_s["ours"], infer_s["peer"], strict=True)])
    # Throughput per unit of work: how well each implementation uses the device, whatever it computes.
    record["train_work_rate_ratio"] = record["ours"]["train_tflop_per_s"] / record["peer"]["train_tflop_per_s"]
    print_pair(pair, record, args.batch)
    if args.profile:
        profile_step(sides["ours"], f"ours {pair.paper}/{pair.experiment}")
        profile_step(sides["peer"], f"smp.{pair.peer}")
    return record


def print_pair(pair: Pair, record: dict, batch: int) -> None:
    for name in ("ours", "peer"):
        r = record[name]
        print(f"  {name:4s}: {r['params_m']:6.1f} M params, {r['train_step_gflop']:8.1f} GFLOP/step "
              f"({r['inference_gflop']:.1f} inference), train {r['train_step_s']['median'] * 1e3:8.1f} ms/step "
              f"= {r['train_images_per_s']:7.2f} img/s ({r['train_tflop_per_s']:.3f} TFLOP/s), inference "
              f"{r['inference_images_per_s']:7.2f} img/s, peak {r['peak_mib']:,.0f} MiB")
    t, i = record["train_ratio"], record["inference_ratio"]
    print(f"  ours/peer throughput: train {t['median']:.2f}x (min {t['min']:.2f}, max {t['max']:.2f}), "
          f"inference {i['median']:.2f}x (min {i['min']:.2f}, max {i['max']:.2f}); "
          f"work rate (FLOP/s) {record['train_work_rate_ratio']:.2f}x", flush=True)


def markdown(record: dict) -> str:
    s = record["settings"]
    rows = []
    for name, pair in record["pairs"].items():
        o, p = pair["ours"], pair["peer"]
        rows.append([
            name, f"{o['params_m']:.1f} / {p['params_m']:.1f}",
            f"{o['train_step_gflop']:.0f} / {p['train_step_gflop']:.0f}",
            f"{o['train_images_per_s']:.2f} / {p['train_images_per_s']:.2f}",
            f"**{pair['train_ratio']['median']:.2f}** "
            f"({pair['train_ratio']['min']:.2f}–{pair['train_ratio']['max']:.2f})",
            f"{o['inference_images_per_s']:.2f} / {p['inference_images_per_s']:.2f}",
            f"{pair['inference_ratio']['median']:.2f} "
            f"({pair['inference_ratio']['min']:.2f}–{pair['inference_ratio']['max']:.2f})",
            f"{pair['train_work_rate_ratio']:.2f}",
            f"{o['peak_mib']:,.0f} / {p['peak_mib']:,.0f}",
        ])
    default = record["smp_default_pspnet"]
    return "\n".join([
        f"# Peers: ours vs segmentation_models_pytorch {record['smp_version']}",
        "",
        f"{record['device']}; {s['size']}x{s['size']}, batch {s['batch']}, {s['precision']}, "
        f"scale `{s['scale']}` widths, {s['repeats']} interleaved repeats of {s['steps']} step(s). "
        "Cells: ours / peer; ratios ours/peer, median (min–max). Peak memory: "
        f"{record['memory']}, {record['memory_floor_mib']:,.0f} MiB for the smallest possible training step.",
        "",
        markdown_table(["model", "params (M)", "GFLOP/step (fwd+bwd)", "train img/s", "train ratio",
                        "inference img/s", "inference ratio", "FLOP/s ratio", "peak MiB"], rows),
        "",
        f"smp's default PSPNet (encoder_depth 3: the ResNet cut after layer2) has {default['params_m']:.1f} M "
        f"parameters and {default['train_step_gflop']:.0f} GFLOP/step; the table times smp.PSPNet(encoder_depth=5, "
        "output_stride=8), the paper's network.",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--size", type=int, default=None, help="input side (GPU 512, CPU 256, quick 64)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (GPU 8, CPU 2)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 5; quick 2)")
    parser.add_argument("--steps", type=int, default=None, help="steps per round (GPU 10, CPU 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (GPU 5, CPU 1)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="CUDA autocast (CPU: fp32)")
    parser.add_argument("--scale", default=None, help="widths of our scale profile (default paper; quick: tiny)")
    parser.add_argument("--peer-encoder", default=None, help="smp encoder (default tu-<our backbone>)")
    parser.add_argument("--models", nargs="+", default=[p.name for p in PAIRS], choices=[p.name for p in PAIRS])
    parser.add_argument("--profile", action="store_true", help="print the top operators of one step of each")
    args = parser.parse_args()
    device = setup(args)
    gpu = device.type == "cuda"
    defaults = {"size": 64 if args.quick else 512 if gpu else 256, "batch": 8 if gpu else 2,
                "repeats": 2 if args.quick else 5, "steps": 10 if gpu else 1, "warmup": 5 if gpu else 1,
                "scale": "tiny" if args.quick else "paper"}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not gpu:
        args.precision = "fp32"  # the trainer autocasts on CUDA only
    print(f"{device_name(device)}: {args.size}x{args.size}, batch {args.batch}, {args.precision}, "
          f"{args.repeats} rounds of {args.steps} step(s), our widths: scale {args.scale}", flush=True)

    floor = memory_floor(device)
    print(f"peak memory of the smallest training step (included in every figure below): {floor:,.0f} MiB", flush=True)
    pairs = {pair.name: compare(pair, args, device) for pair in PAIRS if pair.name in args.models}
    default_config = ours_config(SMP_DEFAULT_PSPNET, args.scale)
    encoder = args.peer_encoder or f"tu-{default_config['backbone']['name']}"
    make_default = lambda: build_peer(SMP_DEFAULT_PSPNET, encoder, dict(default_config["backbone"].get("kwargs") or {}))  # noqa: E731
    record = {
        "benchmark": "peers",
        "device": device_name(device),
        "smp_version": smp.__version__,
        "torch_version": torch.__version__,
        "memory": MEMORY_METHOD[device.type],
        "memory_floor_mib": floor,
        "settings": {k: getattr(args, k)
                     for k in ("size", "batch", "repeats", "steps", "warmup", "precision", "scale")},
        "num_classes": NUM_CLASSES,
        "pairs": pairs,
        "smp_default_pspnet": {"params_m": parameter_count(make_default()) / 1e6,
                               **step_flops(make_default, args.batch, args.size)},
    }
    json_path, md_path = write_results(args.out, "peers", record, markdown(record))
    print(f"\nwrote {json_path} and {md_path}")
    slower = [name for name, pair in pairs.items() if pair["train_ratio"]["median"] < 1.0]
    if slower:
        print(f"ours trains slower than the peer for: {', '.join(slower)} (see FLOP/s ratio; --profile)",
              file=sys.stderr)


if __name__ == "__main__":
    main()
