"""Where a result came from: the configuration it was made with and the git commit of the code."""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from functools import cache


@cache
def git_commit(root: str = ".") -> str:
    """Short commit hash, with '+dirty' when tracked files differ from it; 'unknown' outside git."""
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", root, *args], capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short=10", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "src", "params", "workflow")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


@cache
def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), what a CPU timing was measured on."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


# Keys of `train` that only watch a run (the training curve's validation): no rerun when they change.
MONITORING_KEYS = ("val_every", "val_images")


def training_config(config: dict) -> dict:
    """The part of a run's configuration the trained model depends on (not its test protocols,
    not what only monitors it)."""
    kept = {key: value for key, value in config.items() if key != "eval"}
    if "train" in kept:
        kept["train"] = {key: value for key, value in kept["train"].items() if key not in MONITORING_KEYS}
    return kept
