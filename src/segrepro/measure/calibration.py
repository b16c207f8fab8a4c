"""The calibration `segrepro plan` costs jobs with (`segrepro calibrate`): a few training steps
and inference windows of a run's model, built from its resolved configuration, on a synthetic
batch on the machine at hand, stored per device in results/calibration/<device>.json and reused by
every later plan.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import resource
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from datetime import date
from pathlib import Path

from segrepro.core import atomic, paths
from segrepro.core.devices import device_name
from segrepro.core.errors import SegreproError
from segrepro.core.provenance import config_hash
from segrepro.data.dataset import crop_pair
from segrepro.models.factory import build_model, without_pretrained

CALIBRATION_DIR = paths.RESULTS / "calibration"
WARMUP_STEPS = 2
# On a CPU a paper-scale batch (16 crops of 512x512) does not fit a small machine's memory: the
# calibration measures at most this many pixels per batch and scales the step time linearly.
CPU_BATCH_PIXELS = 2 * 512 * 512


def machine_load(threads: int) -> dict:
    """The machine's 1-minute load average and CPU count. `under_load`: more work wants to run
    than there are CPUs (this process's own threads included), so a calibration's steps share
    cores with other work and are timed too slow."""
    load = os.getloadavg()[0]
    cpus = os.cpu_count() or 1
    return {"load_1min": round(load, 2), "cpus": cpus, "threads": threads, "under_load": load > cpus}


def load_note(entry: dict) -> str | None:
    """Why a calibration entry may overestimate: measured under load (None if not, or unknown)."""
    load = entry.get("machine_load")
    if not load or not load.get("under_load"):
        return None
    return f"load {load['load_1min']} on {load['cpus']} CPUs"


def calibration_path(device: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    return CALIBRATION_DIR / f"{slug}.json"


def signature(config: dict, classes: int, device: str) -> str:
    """What a run's step and window times depend on: its model (pretrained or not), crop, batch,
    processes, optimizer, class count, fast path, evaluation crop, and the device."""
    settings = config["train"]
    return config_hash({
        # Calibration measures speed: the initial weights do not matter.
        "model": without_pretrained(config["model"]), "crop": settings["crop_size"],
        "batch": settings["batch_size"], "processes": settings.get("processes", 1),
        "optimizer": settings.get("optimizer", "sgd"), "num_classes": classes,
        "fast": settings.get("fast", {}), "eval_crop": config["eval"]["crop_size"], "device": device,
    })


def measured_batch(per_process: int, crop_size, device, requested: int | None) -> int:
    """The batch a calibration runs: `requested`, else a process's share of the run's batch,
    at most CPU_BATCH_PIXELS worth of crops on a CPU."""
    if requested:
        return min(requested, per_process)
    if device.type == "cuda":
        return per_process
    h, w = crop_pair(crop_size)
    return max(1, min(per_process, CPU_BATCH_PIXELS // (h * w)))


def calibrate_run(config: dict, classes: int, device, steps: int, batch: int | None = None) -> dict:
    """Time `steps` training steps (after WARMUP_STEPS) of the run's model with the trainer's own
    step function and optimizer on a synthetic batch, and `steps` inference windows at the
    evaluation crop (after one). Returns the calibration entry: median times, the step's for a
    process's full batch (scaled linearly when measured at a smaller one)."""
    import torch

    from segrepro.engine.train import build_optimizer, fast_path, train_step

    if steps < 1:
        raise SegreproError(f"--steps {steps}: at least one timed step is needed")
    settings = config["train"]
    processes = settings.get("processes", 1)
    per_process = max(1, settings["batch_size"] // processes)
    measured = measured_batch(per_process, settings["crop_size"], device, batch)
    fast = settings.get("fast", {})
    crop_h, crop_w = crop_pair(settings["crop_size"])
    name = f"{config['paper']}/{config['experiment']}"
    print(f"calibrating {name} ({config['model']['backbone']['name']}, batch {measured} of {per_process}, "
          f"{crop_h}x{crop_w}) on {device_name(device)}", file=sys.stderr)

    load = machine_load(torch.get_num_threads())
    torch.manual_seed(0)
    model = build_model(without_pretrained(config["model"]), classes).to(device)
    optimizer = build_optimizer(model, settings)
    forward = fast_path(model, fast, device)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(measured, 3, crop_h, crop_w, generator=generator).to(device)
    labels = torch.randint(0, classes, (measured, crop_h, crop_w), generator=generator).to(device)
    if fast.get("channels_last", False):
        images = images.contiguous(memory_format=torch.channels_last)
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)

    def timed(run) -> float:
        if on_cuda:
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        run()
        if on_cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - began

    model.train()
    try:
        step_times = [timed(lambda: train_step(forward, optimizer, images, labels, settings["lr"],
                                               fast.get("precision", "bf16")))
                      for _ in range(WARMUP_STEPS + steps)][WARMUP_STEPS:]
        eval_h, eval_w = crop_pair(config["eval"]["crop_size"])
        window = torch.randn(1, 3, eval_h, eval_w, generator=generator).to(device)
        model.eval()
        # As segrepro.engine.inference.evaluate runs the model: no autograd, bf16 autocast on CUDA.
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else nullcontext()
        with torch.inference_mode(), amp:
            window_times = [timed(lambda: model.predict(window)) for _ in range(1 + steps)][1:]
    except torch.cuda.OutOfMemoryError:
        raise SegreproError(f"{name}: batch {measured} does not fit on {device_name(device)}; "
                            "pass a smaller --batch") from None
    if on_cuda:
        memory = {"peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
                  "memory_note": "torch's peak allocation on the GPU"}
    else:
        memory = {"peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "memory_note": "peak resident memory of the calibrating process (every model it calibrated so far)"}
    # Medians: a step slowed by another process on a shared machine does not count.
    step_measured = statistics.median(step_times)
    return {
        "run": name, "backbone": config["model"]["backbone"]["name"], "device": device_name(device),
        "date": date.today().isoformat(), "torch": torch.__version__,
        "crop": [crop_h, crop_w], "eval_crop": [eval_h, eval_w],
        "batch": per_process, "batch_measured": measured, "steps": steps, "warmup_steps": WARMUP_STEPS,
        "step_seconds": step_measured * per_process / measured,
        "step_seconds_measured": step_times,
        "scaled": (None if measured == per_process else
                   f"measured at batch {measured}, scaled linearly to {per_process}"),
        "window_seconds": statistics.median(window_times),
        # As found when the calibration began (this process's earlier calibrations included).
        "machine_load": load,
        **memory,
    }


@contextmanager
def _locked(path: Path):
    """Hold an exclusive lock beside `path` while reading, merging and replacing it: two plans
    calibrating at the same time both keep their entries."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def read_calibrations(path: Path) -> dict:
    """The entries (signature -> entry) of a calibration file; none if there is no file."""
    if not path.exists():
        return {}
    try:
        record = json.loads(path.read_text())
        return dict(record["entries"])
    except (ValueError, KeyError, TypeError):
        raise SegreproError(f"{path}: not a calibration file; delete it to calibrate again") from None


def store_calibrations(path: Path, device: str, entries: dict) -> None:
    with _locked(path):
        merged = read_calibrations(path) | entries
        atomic.write_text(path, json.dumps({"device": device, "entries": merged}, indent=1) + "\n")
