"""The files a training leaves in its run folder, written and read in one place.

- `checkpoint.pt` (paths.CHECKPOINT): the resumable state of an unfinished training: model and
  optimizer state, the iteration reached, the training configuration's hash and the losses since
  the last log line. A resume takes it only when the hash is this configuration's.
- `complete.pt` (paths.COMPLETE): the finished model's record: weights, configuration and its hash,
  the dataset card's class count, ignore index and class names, the training summary and the job
  key (configuration, data and code). Written before the model is published, so that a rerun of a
  job whose controller never saw it finish (Snakemake's --rerun-incomplete deletes model.pt)
  publishes it again in seconds instead of training again.
- `model.pt` (paths.MODEL): the same record under the train rule's output name, a hard link to
  complete.pt (no extra disk).

Every write is atomic (a temporary file renamed into place): a killed job leaves either the old file
or the new one, never a torn one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from segrepro.core import atomic
from segrepro.core.devices import pick_device
from segrepro.core.errors import SegreproError
from segrepro.core.paths import CHECKPOINT, COMPLETE
from segrepro.models.factory import build_model, without_pretrained

__all__ = ["CHECKPOINT", "COMPLETE", "finished_record", "load_checkpoint", "load_model", "publish",
           "resume_iteration", "save", "save_checkpoint", "save_finished"]


def save(obj, path: Path) -> None:
    """torch.save, atomically."""
    atomic.write_with(path, lambda tmp: torch.save(obj, tmp))


def save_checkpoint(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, iteration: int,
                    config_hash: str, window: list[float]) -> None:
    save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iteration": iteration,
          "config_hash": config_hash, "window": list(window)}, Path(run_dir) / CHECKPOINT)


def load_checkpoint(run_dir: Path, expected_hash: str) -> dict | None:
    """The checkpoint to resume from, or None (none there, unreadable, another configuration's:
    the training starts over, saying why)."""
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        print(f"checkpoint {path} is unreadable; starting from iteration 0", file=sys.stderr)
        return None
    if state.get("config_hash") != expected_hash:
        print(f"checkpoint {path} belongs to another configuration; starting from iteration 0",
              file=sys.stderr)
        return None
    return state


def resume_iteration(run_dir: Path, expected_hash: str) -> int:
    """The iteration a training in `run_dir` resumes from (0: none to resume), read without loading
    the weights into memory and without a word (for the plan)."""
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return 0
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return 0  # the trainer starts over from an unreadable one too
    return int(state["iteration"]) if state.get("config_hash") == expected_hash else 0


def save_finished(run_dir: Path, model: torch.nn.Module, config: dict, config_hash: str, card: dict,
                  summary: dict, job_key: str) -> None:
    """The finished model's record, under its second name (complete.pt)."""
    save({"model": model.state_dict(), "config": config, "config_hash": config_hash,
          "num_classes": card["num_classes"], "ignore_index": card["ignore_index"],
          "class_names": card["class_names"], "summary": summary, "job_key": job_key},
         Path(run_dir) / COMPLETE)


def finished_record(run_dir: Path, job_key: str) -> dict | None:
    """The finished model's record in `run_dir` if it is this job's (same key), else None."""
    path = Path(run_dir) / COMPLETE
    if not path.exists():
        return None
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None  # torn or foreign: trained again, and then replaced
    return record if record.get("job_key") == job_key else None


def publish(run_dir: Path, output: Path) -> None:
    """Give the finished model its output name; the checkpoint it supersedes goes (keeping both
    would double the disk use)."""
    atomic.link_or_copy(Path(run_dir) / COMPLETE, output)
    (Path(run_dir) / CHECKPOINT).unlink(missing_ok=True)


def load_model(path: Path, device: str | None = None):
    """The trained model in eval mode, and the record saved with it."""
    path = Path(path)
    if not path.exists():
        raise SegreproError(f"{path}: trained model not found")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise SegreproError(f"{path}: not a readable model file ({type(err).__name__})") from None
    # The trained weights replace the initial ones: no need to fetch ImageNet weights again.
    model = build_model(without_pretrained(record["config"]["model"]), record["num_classes"],
                        record["ignore_index"])
    model.load_state_dict(record["model"])
    return model.to(pick_device(device)).eval(), record
