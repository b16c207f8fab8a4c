"""Where every stage reads and writes, relative to the project root. One place, so the workflow,
the CLI and the table writer agree on file names."""

from pathlib import Path

DATA = Path("data")
RAW = DATA / "raw"  # downloaded archives, kept out of data.dvc (see .dvcignore)
ARCHIVE_LOCK = Path("params") / "archives.lock.yaml"
RESULTS = Path("results")
REPORT = RESULTS / "report.html"
TRAIN_LOG = "train_log.jsonl"  # in a run's folder: JSON lines of loss/lr and of the curve's val mIoU
# in a run's folder: its trainer's progress lines (segrepro.pipeline.controller prints them)
PROGRESS = "progress.jsonl"
MODEL = "model.pt"  # in a run's folder: the finished model, the train rule's output
CHECKPOINT = "checkpoint.pt"  # in a run's folder: the resumable state of an unfinished training
# In a run's folder: the finished model's second name (see segrepro.engine.checkpoint).
COMPLETE = "complete.pt"


CARD = "dataset.yaml"  # a prepared dataset's card, in its root (segrepro.data.dataset reads it)


def dataset_root(dataset: str) -> Path:
    return DATA / dataset


def card_path(dataset: str) -> Path:
    return dataset_root(dataset) / CARD


def run_dir(scale: str, dataset: str, paper: str, experiment: str, seed: int) -> Path:
    """A training run's folder: the final model, its resumable checkpoint, its log and MLflow run id."""
    return RESULTS / "runs" / scale / dataset / paper / experiment / f"seed{seed}"


def model_path(scale, dataset, paper, experiment, seed) -> Path:
    return run_dir(scale, dataset, paper, experiment, seed) / MODEL


def metrics_path(scale, dataset, paper, experiment, seed, protocol, split: str = "val") -> Path:
    """A run's scores with one test protocol on one split: PROTOCOL.json for the val split,
    PROTOCOL.SPLIT.json for any other (a test number never sits where a val number would)."""
    name = f"{protocol}.json" if split == "val" else f"{protocol}.{split}.json"
    return RESULTS / "metrics" / scale / dataset / paper / experiment / f"seed{seed}" / name


def submission_path(scale, dataset, paper, experiment, seed, protocol) -> Path:
    """A test-server submission: one PNG per test image, zipped (segrepro.engine.submit)."""
    return RESULTS / "submissions" / scale / dataset / paper / experiment / f"seed{seed}_{protocol}.zip"


# Marks segrepro.engine.submit's manifest in a submission zip's comment (the tables read it back).
SUBMISSION_KEY = "segrepro_submission"


def submission_readme_path(submission: Path) -> Path:
    """The README.txt beside a submission zip: what it is and where to upload it."""
    return Path(submission).with_suffix(".README.txt")


def table_path(table: str) -> Path:
    return RESULTS / "tables" / f"{table}.md"


def claims_path(table_md) -> Path:
    """The claims of a table as data, beside its Markdown: results/tables/NAME.claims.json."""
    table_md = Path(table_md)
    return table_md.with_name(f"{table_md.stem}.claims.json")


def pyramid_dir(dataset: str, split: str) -> Path:
    """The precomputed pyramidal ground truth of a split: one {image_id}.npz per image."""
    return RESULTS / "pyramids" / dataset / split


def pyramid_stats_path() -> Path:
    """The statistics of the ground-truth pyramids (`segrepro pyramid-stats`)."""
    return table_path("pyramid_stats")


def figure_path(figure: str) -> Path:
    return RESULTS / "figures" / f"{figure}.png"


def flops_path(table: str) -> Path:
    """The computation counts of a table's models (HFGD Table 9)."""
    return RESULTS / "flops" / f"{table}.json"


LOGS = Path("logs")  # the workflow jobs' logs: each job's stdout and stderr


def log_path(*parts: str) -> Path:
    """A workflow job's log: logs/PART/.../LAST.log (e.g. ("tables", "table8"): logs/tables/table8.log)."""
    *folders, name = parts
    return LOGS.joinpath(*folders) / f"{name}.log"


def run_log_path(stage: str, scale, dataset, paper, experiment, seed, job: str | None = None) -> Path:
    """The log of a STAGE job on one run: logs/STAGE/SCALE/DATASET/PAPER/EXPERIMENT/seedSEED.log, or
    .../seedSEED/JOB.log where a run has several jobs of the stage (one per protocol and split)."""
    run = (stage, scale, dataset, paper, experiment, f"seed{seed}")
    return log_path(*run, job) if job else log_path(*run)


def efficiency_path(table: str) -> Path:
    """The measurements of an efficiency table's rows (segrepro.measure.efficiency)."""
    return RESULTS / "efficiency" / f"{table}.json"
