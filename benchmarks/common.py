"""What the benchmarks share: devices, timing, FLOP counts, peak memory and where figures go.

Every benchmark writes `<out>/<name>.json` (all figures) and `<out>/<name>.md` (a short table),
`<out>` being results/benchmarks/ unless --out says otherwise. Timings synchronise CUDA before
reading the clock. Peak memory is measured in isolation:

- CUDA: `torch.cuda.max_memory_allocated` above what was allocated before (the caching
  allocator's tensors, not what the driver reserved);
- CPU: the peak resident set (VmHWM of /proc/self/status) of a child forked from a fork server
  that only imported the modules, above the child's resident set at its start. A fresh child per
  measurement means no model measured earlier lends it freed memory; the fork server makes that
  child cost milliseconds instead of the seconds a fresh interpreter spends importing torch.
  (tracemalloc cannot see tensor memory: torch allocates outside Python's allocator.)
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from segrepro.config.params import deep_merge, load_params
from segrepro.core import atomic
from segrepro.core.devices import pick_device
from segrepro.core.errors import SegreproError
from segrepro.data.layout import IGNORE_INDEX
from segrepro.models.factory import build_model

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results" / "benchmarks"


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the JSON/Markdown figures")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU; default: torch's)")
    parser.add_argument("--quick", action="store_true", help="tiny models and sizes: checks the benchmark runs")


def setup(args: argparse.Namespace) -> torch.device:
    """The device to measure on; fixes the thread count and the seed."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = pick_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SegreproError("--device cuda: no CUDA device is available")
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_of(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call, the device's queued work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


@functools.cache
def params():
    """The project's validated params/ (read once)."""
    return load_params(REPO)


def our_model_config(paper: str, experiment: str, scale: str, override: dict | None = None) -> dict:
    """The model section the pipeline trains for (paper, experiment, scale), without ImageNet
    weights (random initialisation times the same), `override` deep-merged on top."""
    config = params().resolve(paper, experiment, scale)["model"]
    return deep_merge(config, deep_merge({"backbone": {"pretrained": False}}, override or {}))


def build_ours(model_config: dict, num_classes: int) -> torch.nn.Module:
    return build_model(model_config, num_classes, IGNORE_INDEX)


def random_batch(batch: int, size: int, num_classes: int, device: torch.device, seed: int = 0):
    """Normalised-looking images and labels with ~5 % ignore pixels (the losses' masking works)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=generator)
    labels = torch.randint(0, num_classes, (batch, size, size), generator=generator)
    labels[torch.rand(batch, size, size, generator=generator) < 0.05] = IGNORE_INDEX
    return images.to(device), labels.to(device)


def _tensors(outputs) -> list[torch.Tensor]:
    """Every tensor of a model's (nested dict / list) outputs."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    items = outputs.values() if isinstance(outputs, dict) else outputs
    return [tensor for item in items for tensor in _tensors(item)]


def step_flops(make_model: Callable[[], torch.nn.Module], batch: int, size: int) -> dict:
    """FLOPs (FlopCounterMode: a multiply-add is 2) of one training step's forward + backward and
    of one inference forward, counted on the meta device: no weights allocated, nothing computed.

    The backward starts from the sum of every training output, a stand-in for the model's loss
    (SaF's builds its targets from the label values, which the meta device does not have): each
    output the loss uses gets a gradient, so the same convolutions and matrix products run
    backward. Losses, normalisation, elementwise ops and the optimizer's update are not counted
    (FlopCounterMode counts matrix products and convolutions only)."""
    with torch.device("meta"):
        model = make_model().train()
        images = torch.empty(batch, 3, size, size)
        train = FlopCounterMode(display=False)
        with train:
            sum(t.float().sum() for t in _tensors(model(images))).backward()
        model.eval()
        inference = FlopCounterMode(display=False)
        with inference, torch.no_grad():
            model.predict(images)
    return {"train_step_gflop": train.get_total_flops() / 1e9, "inference_gflop": inference.get_total_flops() / 1e9}


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- peak memory

MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated above the allocation before the measurement",
    "cpu": "peak resident set (VmHWM) of a fresh forked child above its resident set at start",
}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise SegreproError(f"/proc/self/status has no {field}: peak memory needs Linux")


def _in_child(connection, fn: Callable, args: tuple) -> None:
    """Run in the forked child: reset the peak to the current resident set, run fn, send back
    (result, peak MiB) or the error."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # "5": reset VmHWM to VmRSS (Linux >= 4.0)
        start = _status_kib("VmRSS")
        result = fn(*args)
        connection.send((result, (_status_kib("VmHWM") - start) / 1024, None))
    except Exception as err:  # any failure goes back to the parent, as one line
        connection.send((None, None, f"{type(err).__name__}: {err}"))
    finally:
        connection.close()


_fork_server = None
PRELOAD = ("torch", "timm", "segmentation_models_pytorch", "segrepro.models", "segrepro.engine.train",
           "segrepro.config")


def _memory_context():
    """A fork server whose children start with the benchmark's modules already imported."""
    global _fork_server
    if _fork_server is None:
        _fork_server = multiprocessing.get_context("forkserver")
        # What takes seconds to import; a child then imports the benchmark script in milliseconds.
        # (A module that is not installed is skipped by the server.)
        _fork_server.set_forkserver_preload(list(PRELOAD))
    return _fork_server


def isolated(device: torch.device, fn: Callable, *args):
    """(fn(*args), peak MiB) with fn run where its peak memory can be read alone: in this process
    on CUDA, in a fresh forked child on the CPU (fn and its result must pickle: a module-level
    function and plain values)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn(*args)
        synchronize(device)
        return result, (torch.cuda.max_memory_allocated(device) - before) / 2**20
    context = _memory_context()
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_in_child, args=(sender, fn, args))
    child.start()
    sender.close()
    try:
        result, peak, error = receiver.recv()
    except EOFError:
        child.join()
        error = f"the measuring process died (exit code {child.exitcode})"
    child.join()
    if error:
        raise SegreproError(f"{getattr(fn, '__name__', fn)} in a child process: {error}")
    return result, peak


def _smallest_step(device_type: str) -> None:
    """One training step of a one-convolution model on an 8x8 image: what any step pays once."""
    device = torch.device(device_type)
    layer = torch.nn.Conv2d(3, 4, 3).to(device)
    layer(torch.randn(1, 3, 8, 8, device=device)).sum().backward()
    torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9).step()


def memory_floor(device: torch.device) -> float:
    """The peak (MiB) of the smallest training step: on the CPU the runtime's one-time set-up
    (kernel libraries, allocator arenas) that every isolated measurement includes."""
    return isolated(device, _smallest_step, device.type)[1]


# ----------------------------------------------------------------------------- output

def write_results(out: Path, name: str, record: dict, markdown: str) -> tuple[Path, Path]:
    """Write `<out>/<name>.json` and `<out>/<name>.md` atomically; return both paths."""
    out = Path(out)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    atomic.write_text(json_path, json.dumps(record, indent=2) + "\n")
    atomic.write_text(md_path, markdown.rstrip() + "\n")
    return json_path, md_path


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
