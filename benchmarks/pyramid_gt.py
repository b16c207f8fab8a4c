"""Throughput of `segrepro.models.saf.pyramid.pyramid_targets` on the CPU against a memory-bandwidth bound.

    python benchmarks/pyramid_gt.py [--batch 16 --size 512 --repeats 50 --threads 1 --cold]
    python benchmarks/pyramid_gt.py --quick      # a 2x64x64 batch, 3 repeats: checks it runs

Builds a random (batch, size, size) label batch (150 classes, ~5 % ignore = 255) and, for uint8
and int64 copies of it, measures:

- `pyramid_targets`: best and median time of one call for strides 32,16,8,4 (all four levels,
  int64 outputs), as label maps per second and as effective GB/s (input bytes / time);
- `5-D view`: the same pyramid computed the textbook way (int64 keys, every level straight from
  the pixels by amin/amax over dims (2, 4) of the view (B, H/s, s, W/s, s), torch.where for the
  cases), checked equal to pyramid_targets, for comparison;
- `bound`: the best time of one plain full read of the same tensor (`labels.max()`), as label
  maps per second and GB/s; no implementation that reads its input can beat it;
- `ratio`: pyramid_targets time / bound time (1.0 would be a single read of the input).

With --cold each timed call is preceded by writing a 64 MiB buffer, which evicts the input from
the CPU caches (the batch is only 4 MiB as uint8, so the default "hot" numbers are cache
bandwidth, a stricter bound). Timings are of the calling thread(s) only; --threads sets
torch.set_num_threads. Writes results/benchmarks/pyramid_gt.{json,md} (--out DIR elsewhere).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import add_common_arguments, markdown_table, write_results

from segrepro.core.devices import device_name
from segrepro.core.errors import SegreproError
from segrepro.models.saf.pyramid import pyramid_targets

STRIDES = (32, 16, 8, 4)


def five_d_pyramid(labels: torch.Tensor, strides=STRIDES, ignore_index: int = 255):
    """Reference formulation: per-level statistics by amin/amax over the 5-D view of the pixels."""
    lab = labels.long()
    valid = lab != ignore_index
    big = 1 << 62
    keys_min = torch.where(valid, lab, big)
    keys_max = torch.where(valid, lab, -1)
    b, h, w = lab.shape
    semantic, unity = [], []
    for s in strides:
        view = (b, h // s, s, w // s, s)
        mn = keys_min.view(view).amin(dim=(2, 4))
        mx = keys_max.view(view).amax(dim=(2, 4))
        any_ignore = (~valid).view(view).any(dim=4).any(dim=2)
        is_unity = (mn == mx) & ~any_ignore
        is_mix = (mx >= 0) & (mn < mx)
        semantic.append(torch.where(is_unity, mn, ignore_index))
        unity.append(torch.where(is_unity, 1, torch.where(is_mix, 0, ignore_index)))
    return semantic, unity


def evict_caches(buffer: torch.Tensor) -> None:
    buffer.add_(1)


def timed(fn, repeats: int, cold_buffer: torch.Tensor | None) -> list[float]:
    fn()  # warm-up: allocator, first-touch of pages
    times = []
    for _ in range(repeats):
        if cold_buffer is not None:
            evict_caches(cold_buffer)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def measure_dtype(base: torch.Tensor, dtype: torch.dtype, args, cold: torch.Tensor | None) -> dict:
    """The figures of one input dtype (see the module's docstring)."""
    labels = base.to(dtype)
    nbytes = labels.numel() * labels.element_size()
    ours = timed(lambda: pyramid_targets(labels, STRIDES), args.repeats, cold)
    bound = timed(lambda: labels.max(), args.repeats, cold)
    best, best_bound = min(ours), min(bound)
    figures = {
        "input_mib": nbytes / 2**20,
        "pyramid_targets_s": {"min": best, "median": statistics.median(ours)},
        "label_maps_per_s": args.batch / best,
        "effective_gb_per_s": nbytes / best / 1e9,
        "bound_s": best_bound,
        "bound_label_maps_per_s": args.batch / best_bound,
        "bound_gb_per_s": nbytes / best_bound / 1e9,
        "ratio_to_bound": best / best_bound,
        "five_d_s": None,
    }
    if not args.skip_5d:
        ref = five_d_pyramid(labels)
        got = pyramid_targets(labels, STRIDES)
        if not all(torch.equal(a, b) for a, b in zip(ref[0] + ref[1], got[0] + got[1], strict=True)):
            raise SegreproError(f"pyramid_targets differs from the 5-D view formulation on {dtype} input")
        five_d = timed(lambda: five_d_pyramid(labels), max(3, args.repeats // 10), cold)
        figures["five_d_s"] = min(five_d)
        figures["five_d_label_maps_per_s"] = args.batch / min(five_d)
    return figures


def markdown(record: dict) -> str:
    s = record["settings"]
    header = ["input", "MiB", "pyramid_targets ms (median)", "label maps/s", "GB/s", "5-D view ms",
              "bound ms", "ratio to bound"]
    rows = [[dtype, f"{f['input_mib']:.2f}",
             f"{f['pyramid_targets_s']['min'] * 1e3:.2f} ({f['pyramid_targets_s']['median'] * 1e3:.2f})",
             f"{f['label_maps_per_s']:,.0f}", f"{f['effective_gb_per_s']:.1f}",
             "–" if f["five_d_s"] is None else f"{f['five_d_s'] * 1e3:.2f}",
             f"{f['bound_s'] * 1e3:.3f}", f"{f['ratio_to_bound']:.1f}"]
            for dtype, f in record["inputs"].items()]
    return "\n".join([
        "# SaF pyramidal ground truth: throughput against one read of the input", "",
        f"{record['device']}; labels {s['batch']}x{s['size']}x{s['size']}, {s['ignore_share']:.1%} ignore, "
        f"strides {','.join(map(str, s['strides']))}, best of {s['repeats']} "
        f"({'cold' if s['cold'] else 'hot'} caches).", "",
        markdown_table(header, rows),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--batch", type=int, default=None, help="label maps per batch (16; quick 2)")
    parser.add_argument("--size", type=int, default=None, help="side of a label map (512; quick 64)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (50; quick 3)")
    parser.add_argument("--cold", action="store_true", help="evict the CPU caches before each timed call")
    parser.add_argument("--skip-5d", action="store_true", help="skip the slow 5-D view comparison")
    args = parser.parse_args()
    if args.device not in (None, "cpu"):
        raise SystemExit(f"--device {args.device}: this benchmark measures the CPU only")
    args.batch = args.batch or (2 if args.quick else 16)
    args.size = args.size or (64 if args.quick else 512)
    args.repeats = args.repeats or (3 if args.quick else 50)
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, args.size, args.size)
    base = torch.randint(0, 150, shape, generator=gen, dtype=torch.uint8)
    base[torch.rand(shape, generator=gen) < 0.05] = 255
    cold = torch.zeros(64 << 20, dtype=torch.uint8) if args.cold else None
    record = {
        "benchmark": "pyramid_gt", "device": device_name(torch.device("cpu")),
        "settings": {"batch": args.batch, "size": args.size, "repeats": args.repeats, "strides": list(STRIDES),
                     "threads": torch.get_num_threads(), "cold": args.cold,
                     "ignore_share": float((base == 255).float().mean())},
        "inputs": {str(dtype).removeprefix("torch."): measure_dtype(base, dtype, args, cold)
                   for dtype in (torch.uint8, torch.int64)},
    }
    text = markdown(record)
    print(text)
    json_path, md_path = write_results(args.out, "pyramid_gt", record, text)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
