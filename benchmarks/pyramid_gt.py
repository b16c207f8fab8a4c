"""Throughput of `segrepro.models.saf.pyramid.pyramid_targets` on the CPU against a memory-bandwidth bound.

    python benchmarks/pyramid_gt.py [--batch 16 --size 512 --repeats 50 --threads 1 --cold]

Builds a random (batch, size, size) label batch (150 classes, ~5 % ignore = 255) and, for uint8
and int64 copies of it, prints:

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
torch.set_num_threads.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--cold", action="store_true", help="evict the CPU caches before each timed call")
    parser.add_argument("--skip-5d", action="store_true", help="skip the slow 5-D view comparison")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, args.size, args.size)
    base = torch.randint(0, 150, shape, generator=gen, dtype=torch.uint8)
    base[torch.rand(shape, generator=gen) < 0.05] = 255
    cold = torch.zeros(64 << 20, dtype=torch.uint8) if args.cold else None
    print(
        f"labels {args.batch}x{args.size}x{args.size}, {float((base == 255).float().mean()):.1%} ignore, "
        f"strides {','.join(map(str, STRIDES))}, {args.threads} thread(s), best/median of {args.repeats}"
        f"{', cold caches' if args.cold else ', hot caches'}"
    )
    for dtype in (torch.uint8, torch.int64):
        labels = base.to(dtype)
        nbytes = labels.numel() * labels.element_size()
        ours = timed(lambda labels=labels: pyramid_targets(labels, STRIDES), args.repeats, cold)
        bound = timed(lambda labels=labels: labels.max(), args.repeats, cold)
        best, median, best_bound = min(ours), statistics.median(ours), min(bound)
        print(f"\n{str(dtype).removeprefix('torch.')} input ({nbytes / 2**20:.0f} MiB)")
        print(
            f"  pyramid_targets: {best * 1e3:.2f} ms (median {median * 1e3:.2f}) = "
            f"{args.batch / best:,.0f} label maps/s, effective {nbytes / best / 1e9:.1f} GB/s"
        )
        if not args.skip_5d:
            ref = five_d_pyramid(labels)
            got = pyramid_targets(labels, STRIDES)
            assert all(torch.equal(a, b) for a, b in zip(ref[0] + ref[1], got[0] + got[1], strict=True))
            five_d = timed(lambda labels=labels: five_d_pyramid(labels), max(3, args.repeats // 10), cold)
            print(
                f"  5-D view:        {min(five_d) * 1e3:.2f} ms = {args.batch / min(five_d):,.0f} label maps/s "
                "(textbook formulation, same result)"
            )
        print(
            f"  bound: {args.batch / best_bound:,.0f} label maps/s (one read of the input at "
            f"{nbytes / best_bound / 1e9:.1f} GB/s, {best_bound * 1e3:.3f} ms)"
        )
        print(f"  ratio: {best / best_bound:.1f}x the one-read time")


if __name__ == "__main__":
    main()
