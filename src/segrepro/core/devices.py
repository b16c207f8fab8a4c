"""The device a job runs on, its name, and which GPU(s) a job may use when several jobs share one
machine.

`pick_device` is the one place a `--device` becomes a torch device, and `device_name` the one name
of a device that timings are filed under (calibrations, efficiency records, benchmark figures).

Snakemake's `--resources gpu=N` only counts GPU jobs; it never says which device a job gets
(it sets no CUDA_VISIBLE_DEVICES). So a CUDA run claims its device(s) itself before torch
initialises CUDA: one lock file per device index in a lock folder (default results/.gpu-locks,
or SEGREPRO_GPU_LOCKS), held with `fcntl.flock` for the life of the process. The kernel drops
the lock when the process ends, however it ends (SIGKILL included), so nothing goes stale.
The chosen devices are exported as CUDA_VISIBLE_DEVICES, so inside the process they are cuda:0...

Left alone (nothing claimed):
- a SLURM job (SLURM_JOB_ID, with CUDA_VISIBLE_DEVICES or SLURM_JOB_GPUS): SLURM assigned them;
- a torchrun worker (LOCAL_RANK set): its launcher owns the devices (claim for the launcher with
  `python -m segrepro.core.devices N -- torchrun ...`);
- a process whose devices an ancestor claimed (SEGREPRO_GPUS_CLAIMED equals CUDA_VISIBLE_DEVICES).
A CUDA_VISIBLE_DEVICES the user set is respected: it is the pool devices are claimed from.

SEGREPRO_FAKE_GPU_COUNT=N pretends N devices exist (tests). SEGREPRO_GPU_WAIT: seconds to wait
for a free device (default 600) before a one-line error.
"""

from __future__ import annotations

import fcntl
import os
import random
import sys
import time
from pathlib import Path

from segrepro.core.errors import SegreproError
from segrepro.core.provenance import cpu_model

LOCK_DIR = Path("results") / ".gpu-locks"
CLAIMED = "SEGREPRO_GPUS_CLAIMED"
DEFAULT_WAIT = 600.0

# The open lock files of this process: closing one would release its device.
_held: list = []


def pick_device(requested: str | None = None):
    """`--device` as a torch device: the one asked for, else cuda when one is there, else the CPU."""
    import torch

    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device, threads: bool = True) -> str:
    """The GPU's name, or the CPU's model and the torch threads a job of this process uses (what a
    CPU timing depends on). `threads=False`: the CPU's model alone (records that keep the thread
    count in a field of their own)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = cpu_model()
    if not threads:
        return model
    count = torch.get_num_threads()
    kind = "" if "cpu" in model.lower() else " CPU"
    return f"{model}{kind} ({count} thread{'s' * (count != 1)})"


def lock_dir() -> Path:
    return Path(os.environ.get("SEGREPRO_GPU_LOCKS") or LOCK_DIR)


def visible_devices() -> list[str]:
    """The device ids jobs may be given: the user's CUDA_VISIBLE_DEVICES if set, else 0..count-1."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip()]
    return [str(i) for i in range(device_count())]


def device_count() -> int:
    fake = os.environ.get("SEGREPRO_FAKE_GPU_COUNT")
    if fake is not None:
        return int(fake)
    import torch

    # NVML-based: it leaves CUDA uninitialised, so CUDA_VISIBLE_DEVICES set afterwards still counts.
    return torch.cuda.device_count()


def assigned_elsewhere() -> str | None:
    """Why this process must not claim devices itself, or None."""
    env = os.environ
    if env.get("SLURM_JOB_ID") and ("CUDA_VISIBLE_DEVICES" in env or "SLURM_JOB_GPUS" in env):
        return "SLURM"
    if "LOCAL_RANK" in env:
        return "torchrun"
    if env.get(CLAIMED) is not None and env.get(CLAIMED) == env.get("CUDA_VISIBLE_DEVICES"):
        return "parent"
    return None


def claim(n: int = 1, wanted: list[str] | None = None, wait: float | None = None) -> list[str]:
    """Lock `n` free devices (out of `wanted`, default all visible ones), export them as
    CUDA_VISIBLE_DEVICES and return their ids. Waits (up to `wait` seconds) while too few are free.
    Under SLURM, torchrun or a claiming parent: claims nothing and returns the visible devices."""
    if assigned_elsewhere():
        return visible_devices()
    pool = wanted if wanted is not None else visible_devices()
    folder = lock_dir()
    if n > len(pool):
        raise SegreproError(f"{n} GPU(s) wanted, {len(pool)} visible ({', '.join(pool) or 'none'})")
    wait = float(os.environ.get("SEGREPRO_GPU_WAIT", DEFAULT_WAIT)) if wait is None else wait
    folder.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait
    while True:
        got = _try_lock(folder, pool, n)
        if got is not None:
            break
        if time.monotonic() >= deadline:
            raise SegreproError(f"no {n} free GPU(s) among {', '.join(pool)} within {wait:.0f} s: "
                                f"held by pid(s) {_holders(folder, pool)} (locks in {folder})")
        # A random back-off, so jobs retrying together do not collide again in step.
        time.sleep(random.uniform(0.1, 0.5))
    ids = [device for device, _ in got]
    _held.extend(handle for _, handle in got)
    os.environ["CUDA_VISIBLE_DEVICES"] = os.environ[CLAIMED] = ",".join(ids)
    return ids


def _try_lock(folder: Path, pool: list[str], n: int):
    """[(device, open lock file)] for n devices, or None (then holding none of them: a job that
    kept some while waiting for more could deadlock with another doing the same)."""
    got = []
    for device in pool:
        handle = open(folder / f"gpu{_safe(device)}.lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        got.append((device, handle))
        if len(got) == n:
            return got
    for _, handle in got:
        handle.close()
    return None


def _safe(device: str) -> str:
    # An id may be a GPU UUID or MIG name; keep the file name plain.
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in device)


def _holders(folder: Path, pool: list[str]) -> str:
    pids = []
    for device in pool:
        try:
            pids.append((folder / f"gpu{_safe(device)}.lock").read_text().strip() or "?")
        except OSError:
            pids.append("?")
    return ", ".join(pids)


def claim_for_run(device: str | None, n: int = 1) -> str | None:
    """Claim the device(s) of a run given `--device` (None: cuda when one is there). Returns the
    device to pass on: a CPU run claims nothing; `cuda:K` claims the K-th visible device, which is
    then cuda:0 of this process."""
    if device is not None and not device.startswith("cuda"):
        return device
    if assigned_elsewhere():
        return device
    if device is None:
        if visible_devices():
            claim(n)
        return device  # without a GPU here the run goes to the CPU
    if device == "cuda":
        claim(n)
        return device
    try:
        index = int(device.partition(":")[2])
    except ValueError:
        raise SegreproError(f"--device {device}: not cpu, cuda or cuda:INDEX") from None
    pool = visible_devices()
    if index >= len(pool):
        raise SegreproError(f"--device {device}: only {len(pool)} GPU(s) visible")
    claim(1, wanted=[pool[index]])
    return "cuda:0"


def pass_on() -> None:
    """Let the held locks survive an exec: the program this process becomes keeps the devices."""
    for handle in _held:
        os.set_inheritable(handle.fileno(), True)


def main(argv: list[str] | None = None) -> int:
    """`python -m segrepro.core.devices N -- COMMAND...`: claim N devices, then run COMMAND (e.g.
    torchrun) with them; the locks pass on to it and last until it ends."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3 or argv[1] != "--" or not argv[0].isdigit():
        print("usage: python -m segrepro.core.devices N -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    try:
        claim(int(argv[0]))
    except SegreproError as err:
        print(f"segrepro: error: {err}", file=sys.stderr)
        return 1
    pass_on()
    os.execvp(argv[2], argv[2:])


if __name__ == "__main__":
    sys.exit(main())
