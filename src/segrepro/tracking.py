"""MLflow logging: one experiment per paper, one MLflow run per training run (named after the
experiment ID), continued by a resumed job and by the evaluations of the same model.

The default store is a SQLite file under results/ (no server); set MLFLOW_TRACKING_URI to use a
server instead. SEGREPRO_MLFLOW=0 turns logging off.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

DEFAULT_DB = Path("results") / "mlflow.db"
ARTIFACTS = Path("results") / "mlflow-artifacts"
RUN_ID_FILE = "mlflow_run_id"


def enabled() -> bool:
    return os.environ.get("SEGREPRO_MLFLOW", "1") not in ("0", "false", "no")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DB.resolve()}"


def _mlflow():
    import mlflow

    # A store that does not exist yet is created (schema migrations) here, once per process.
    DEFAULT_DB.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


def experiment_id(mlflow, paper: str) -> str:
    """The paper's MLflow experiment, created on first use (tolerating a concurrent creator)."""
    found = mlflow.get_experiment_by_name(paper)
    if found is not None:
        return found.experiment_id
    try:
        location = (ARTIFACTS.resolve() / paper).as_uri()
        return mlflow.create_experiment(paper, artifact_location=location)
    except Exception:
        found = mlflow.get_experiment_by_name(paper)
        if found is None:
            raise
        return found.experiment_id


def init_store(papers: list[str]) -> None:
    """Create the store and every paper's experiment up front, so parallel jobs never race on it."""
    if enabled():
        mlflow = _mlflow()
        for paper in papers:
            experiment_id(mlflow, paper)


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return flat


class Run:
    """An MLflow run tied to a run folder: the run id is stored there, so a resumed training job
    and the later evaluations log into the same MLflow run. Without tracking, every call is a no-op."""

    def __init__(self, run_dir: Path, config: dict, tags: dict | None = None):
        self.run_dir = Path(run_dir)
        self.config = config
        self.tags = tags or {}
        self.mlflow = None

    def __enter__(self) -> "Run":
        if not enabled():
            return self
        mlflow = _mlflow()
        id_file = self.run_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else None
        if run_id is not None and _run_exists(mlflow, run_id):
            mlflow.start_run(run_id=run_id)
        else:
            mlflow.start_run(
                experiment_id=experiment_id(mlflow, self.config["paper"]),
                run_name=self.config["experiment"],
            )
            self.run_dir.mkdir(parents=True, exist_ok=True)
            id_file.write_text(mlflow.active_run().info.run_id + "\n")
        mlflow.log_params(flatten(self.config))
        if self.tags:
            mlflow.set_tags(self.tags)
        self.mlflow = mlflow
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.mlflow is None:
            return
        if exc_type is None:
            status = "FINISHED"
        elif issubclass(exc_type, KeyboardInterrupt):
            status = "KILLED"
        else:
            status = "FAILED"
        self.mlflow.end_run(status=status)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.mlflow is not None:
            self.mlflow.log_metrics(metrics, step=step)

    def log_artifact(self, path: Path) -> None:
        if self.mlflow is not None:
            self.mlflow.log_artifact(str(path))


def _run_exists(mlflow, run_id: str) -> bool:
    try:
        mlflow.get_run(run_id)
        return True
    except Exception:
        return False
