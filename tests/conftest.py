"""Shared fixtures: a throw-away copy of the project, a generated dataset, an MLflow store.

Fixtures
  project          a tmp folder laid out like the repository (Snakefile, profiles/, workflow/, params/, src/),
                   with data/synthetic-tiny/ in place, as the current directory; MLflow logs into
                   an SQLite file of its own. Returns the folder (a Path).
  tiny_dataset     the `synthetic-tiny` dataset of params/datasets.yaml, generated once per session
                   (read-only: tests copy it, as `project` does, before changing anything).
  edit_params      edit_params("scales.yaml", {"tiny": {"train": {"iterations": 40}}}) deep-merges
                   an override into a YAML file under the project's params/.
  segrepro         segrepro("train", "--paper", "pspnet", ...) runs the CLI in a subprocess in the
                   current directory and returns the CompletedProcess (text stdout/stderr, returncode).

  mlflow_store_template  (session) an empty migrated MLflow SQLite store that `project` copies.

Module-level helpers (import with `from conftest import ...`): REPO, TINY (the dataset name),
edit_yaml, segrepro_command.

Every test runs with HF_HUB_OFFLINE=1 (set when this file is imported, before timm or
huggingface_hub read it): no test may download weights. OMP_NUM_THREADS/MKL_NUM_THREADS default
to 1 (inherited by subprocesses and workflow jobs): the tests' tensors are tiny, extra threads only
fight over the cores, and a fixed thread count keeps CPU results bit-identical between runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# Before anything imports huggingface_hub, which reads this once at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
# Before torch is imported, which sizes its thread pool from these.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
PROJECT_ENTRIES = ("Snakefile", "profiles", "workflow", "params", "src")
TINY = "synthetic-tiny"
_IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".snakemake")


def copy_project(root: Path) -> None:
    """Copy what the workflow needs (Snakefile, profiles/, workflow/, params/, src/) into a new folder."""
    root.mkdir(parents=True)
    for name in PROJECT_ENTRIES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=_IGNORED)
        else:
            shutil.copy2(source, root / name)


def edit_yaml(path: Path | str, override: dict) -> dict:
    """Deep-merge `override` into the YAML mapping at `path` (nested mappings merge, anything
    else replaces) and write it back. Returns the new content."""
    from segrepro.config.params import deep_merge

    path = Path(path)
    data = deep_merge(yaml.safe_load(path.read_text()) or {}, override)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return data


def segrepro_command(*args: str) -> list[str]:
    """The argv that runs the `segrepro` CLI with this interpreter (no PATH look-up needed)."""
    return [sys.executable, "-m", "segrepro.cli", *map(str, args)]


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """data/synthetic-tiny as `segrepro prepare synthetic-tiny` makes it, generated once per session
    from the repository's params/datasets.yaml. Treat it as read-only."""
    from segrepro.config.params import read_yaml
    from segrepro.data.prepare import prepare_dataset

    declaration = read_yaml(REPO / "params" / "datasets.yaml")[TINY]
    root = tmp_path_factory.mktemp("datasets") / TINY
    return prepare_dataset(TINY, declaration, root)


@pytest.fixture(scope="session")
def mlflow_store_template(tmp_path_factory) -> Path:
    """An empty, fully migrated MLflow SQLite store. Creating one costs seconds (schema
    migrations), copying it costs nothing, so every `project` starts from a copy."""
    import mlflow

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    previous, cwd = mlflow.get_tracking_uri(), os.getcwd()
    os.chdir(path.parent)  # whatever the store creates beside itself stays out of the repository
    try:
        mlflow.set_tracking_uri(f"sqlite:///{path}")
        mlflow.MlflowClient().search_experiments()
    finally:
        mlflow.set_tracking_uri(previous)
        os.chdir(cwd)
    return path


@pytest.fixture
def project(tmp_path, monkeypatch, tiny_dataset, mlflow_store_template) -> Path:
    """A fresh copy of the project in `tmp_path / "project"`, made the current directory.

    - Snakefile, profiles/, workflow/, params/ and src/ are copied from the repository (params unchanged:
      scale `demo` by default, so pass `--scale tiny` or `--config scale=tiny`).
    - data/synthetic-tiny/ holds a copy of the session's generated dataset (a prepared dataset:
      its card carries the content fingerprint). Other datasets are not there.
    - MLFLOW_TRACKING_URI points at `tmp_path / "mlflow.db"` (outside the project folder), a copy of
      a migrated empty store; SEGREPRO_MLFLOW is unset (tracking on).
    - The interpreter's bin folder leads PATH, so `segrepro` and `snakemake` resolve to this venv.

    The installed package is the repository's (editable install): the copied src/ is what the
    workflow hashes and declares as code inputs, not what subprocesses import.
    """
    root = tmp_path / "project"
    copy_project(root)
    shutil.copytree(tiny_dataset, root / "data" / TINY)

    db = tmp_path / "mlflow.db"
    shutil.copy2(mlflow_store_template, db)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.delenv("SEGREPRO_MLFLOW", raising=False)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.chdir(root)
    return root


@pytest.fixture
def edit_params(project):
    """A function (file name under params/, override mapping) -> new content; see `edit_yaml`."""
    def edit(name: str, override: dict) -> dict:
        return edit_yaml(project / "params" / name, override)

    return edit


@pytest.fixture
def segrepro():
    """A function running `segrepro ARGS...` in a subprocess in the current directory (use it with
    `project`). Keyword arguments: timeout (seconds, default 120), env (extra variables)."""
    def run(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            segrepro_command(*args), capture_output=True, text=True, timeout=timeout, check=False,
            env={**os.environ, **(env or {})},
        )

    return run
