"""The Snakemake workflow end to end: a tiny table from nothing, no-op reruns, and reruns of exactly
the jobs a change of params or code affects; plus dry-runs over every target, --lint, several
seeds, and the errors for an unknown table or config key.

One tiny table is built once per module (`built`, about 16 jobs) and reused; the checks that
change files restore them (content and modification time) afterwards, and the checks that run
jobs work on a copy of it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import TINY, copy_project, edit_yaml

TABLE = "pspnet_table1"
TABLE_MD = Path("results/tables") / f"{TABLE}.md"
TABLE_CSV = TABLE_MD.with_suffix(".csv")
TINY_CONFIG = ("--config", "scale=tiny")
NUMBER = re.compile(r"^[+−-]?\d+\.\d{2}$")
JOB_HEADER = re.compile(r"^(?:local)?rule (\w+):$")


# ----------------------------------------------------------------------------- helpers

def snakemake(root: Path, *args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run snakemake in `root`; stdout and stderr together in `.stdout` (Snakemake logs to stderr)."""
    return subprocess.run(
        [sys.executable, "-m", "snakemake", *args], cwd=root, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=timeout, env=env, check=False,
    )


def planned_jobs(output: str) -> list[tuple[str, dict]]:
    """(rule, wildcards) of each job of a dry-run (`snakemake -n`), cross-checked with its job stats."""
    jobs: list[tuple[str, dict]] = []
    for line in output.splitlines():
        header = JOB_HEADER.match(line.strip())
        if header and not line.startswith(" "):
            jobs.append((header.group(1), {}))
        elif jobs and line.strip().startswith("wildcards:"):
            pairs = line.strip()[len("wildcards:"):].strip().split(", ")
            jobs[-1][1].update(pair.split("=", 1) for pair in pairs)
    stats = job_stats(output)
    if not jobs:
        assert "Nothing to be done" in output, output
    else:
        assert stats == Counter(rule for rule, _ in jobs), output
    return jobs


def job_stats(output: str) -> Counter:
    """The `Job stats:` table of a dry-run, as rule -> count (empty when nothing is planned)."""
    counts: Counter = Counter()
    lines = output.splitlines()
    if "Job stats:" not in lines:
        return counts
    for line in lines[lines.index("Job stats:") + 3:]:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    return counts


def summary(jobs: list[tuple[str, dict]]) -> Counter:
    """(rule, experiment) -> number of jobs; the table job has experiment None."""
    return Counter((rule, wildcards.get("experiment")) for rule, wildcards in jobs)


def table_experiments(root: Path, table: str = TABLE) -> list[str]:
    registry = yaml.safe_load((root / "params/papers/pspnet.yaml").read_text())
    return [row["experiment"] for row in registry["tables"][table]["rows"]]


@contextmanager
def edited(path: Path, change):
    """Apply `change` (a function of the text, or a mapping deep-merged into YAML) to a file;
    afterwards put back its content and its modification time, so that no rerun is left behind."""
    original, stat = path.read_bytes(), path.stat()
    try:
        if callable(change):
            text = change(original.decode())
            assert text != original.decode()
            path.write_text(text)
        else:
            before = yaml.safe_load(original)
            assert edit_yaml(path, change) != before, f"{change} changes nothing in {path}"
        yield path
    finally:
        path.write_bytes(original)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def parse_markdown_table(text: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the first Markdown table in `text`."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert len(lines) >= 2 and set(lines[1].replace("|", "").replace(":", "")) == {"-"}, text
    def cells(line: str) -> list[str]:
        return [cell.strip() for cell in line.strip().strip("|").split(" | ")]

    return cells(lines[0]), [cells(line) for line in lines[2:]]


VERDICT = re.compile(r"^- (✅ reproduced|❌ contradicted|➖ not told apart): ", re.M)


def judged_claims(text: str) -> list[str]:
    """The verdict of every claim line of a table's Markdown."""
    return VERDICT.findall(text)


def to_float(cell: str) -> float:
    return float(cell.replace("−", "-"))


@dataclass
class Built:
    root: Path
    env: dict
    result: subprocess.CompletedProcess
    seconds: float


def project_env(db: Path) -> dict:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    env.pop("SEGREPRO_MLFLOW", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def build_from_nothing(base: Path, mlflow_store_template: Path, targets: list[str]) -> Path:
    """A copy of the project (no data/, no results/) under base/project with `targets` built at
    the tiny scale; the end-to-end tests of each paper start from it."""
    root = base / "project"
    copy_project(root)
    shutil.copy2(mlflow_store_template, base / "mlflow.db")
    result = snakemake(root, *targets, "--cores", "2", *TINY_CONFIG, env=project_env(base / "mlflow.db"))
    assert result.returncode == 0, result.stdout[-5000:]
    return root


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def built(tmp_path_factory, mlflow_store_template) -> Built:
    """A copy of the project (no data/, no results/) in which the tiny table1 was built once."""
    base = tmp_path_factory.mktemp("workflow")
    root = base / "project"
    copy_project(root)
    shutil.copy2(mlflow_store_template, base / "mlflow.db")
    env = project_env(base / "mlflow.db")
    began = time.monotonic()
    result = snakemake(root, str(TABLE_MD), "--cores", "2", *TINY_CONFIG, env=env)
    seconds = time.monotonic() - began
    print(f"\ntiny {TABLE} built in {seconds:.1f} s")
    return Built(root, env, result, seconds)


@pytest.fixture
def built_copy(built, tmp_path) -> Built:
    """A copy of the built project (results, data, Snakemake metadata, mtimes kept) to run jobs in."""
    assert built.result.returncode == 0, built.result.stdout[-5000:]
    root = tmp_path / "project"
    shutil.copytree(built.root, root, symlinks=True)
    db = tmp_path / "mlflow.db"
    shutil.copy2(Path(built.env["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///")), db)
    return Built(root, project_env(db), built.result, 0.0)


def dry_run(built: Built, *args: str, target: str = str(TABLE_MD)) -> list[tuple[str, dict]]:
    result = snakemake(built.root, target, "-n", "--cores", "2", *TINY_CONFIG, *args, env=built.env)
    assert result.returncode == 0, result.stdout[-5000:]
    return planned_jobs(result.stdout)


# ----------------------------------------------------------------------------- the tiny build

@pytest.mark.slow
def test_tiny_table_builds_from_nothing(built):
    out = built.result.stdout
    assert built.result.returncode == 0, out[-5000:]
    # prepare + 7 train + 7 evaluate + table, all of them run.
    assert "16 of 16 steps (100%) done" in out, out[-3000:]
    root = built.root
    assert (root / TABLE_MD).is_file() and (root / TABLE_CSV).is_file()
    assert (root / "data" / TINY / "dataset.yaml").is_file()


@pytest.mark.slow
def test_tiny_table_markdown_has_every_number(built):
    assert built.result.returncode == 0, built.result.stdout[-5000:]
    root = built.root
    text = (root / TABLE_MD).read_text()
    registry = yaml.safe_load((root / "params/papers/pspnet.yaml").read_text())
    spec = registry["tables"][TABLE]

    assert text.startswith(f"# {TABLE}: {spec['title']}\n")
    for line in ("- Dataset: synthetic-tiny", "- Scale: tiny", "- Iterations: 6", "- Seeds: 0"):
        assert line in text.splitlines(), line

    header, rows = parse_markdown_table(text)
    assert header[0] == "Method"
    metric_columns = {name: i for i, name in enumerate(header)}
    assert len(rows) == 7
    assert [row[0] for row in rows] == [r["label"] for r in spec["rows"]]
    for row, declared in zip(rows, spec["rows"]):
        assert len(row) == len(header) == 7, row
        metrics = json.loads(
            (root / "results/metrics/tiny" / TINY / "pspnet" / declared["experiment"] / "seed0/ss.json").read_text())
        for metric, name in (("miou", "mIoU (%)"), ("pixel_acc", "Pixel Acc. (%)")):
            paper = row[metric_columns[f"{name} paper"]]
            ours = row[metric_columns[f"{name} reproduced"]]
            delta = row[metric_columns[f"{name} Δ"]]
            assert NUMBER.match(ours) and NUMBER.match(delta), row
            assert 0.0 <= to_float(ours) <= 100.0
            assert to_float(paper) == declared["paper"][metric]
            # The cell is the evaluated run's number, and Δ is ours minus the paper's.
            assert to_float(ours) == pytest.approx(metrics[metric], abs=0.005)
            assert to_float(delta) == pytest.approx(metrics[metric] - declared["paper"][metric], abs=0.006)

    claims = text.split("\n## Claims\n", 1)
    assert len(claims) == 2, text
    verdicts = [line for line in claims[1].splitlines() if line.startswith("- ")]
    assert len(verdicts) == len(spec["claims"]) == 5
    for line, claim in zip(verdicts, spec["claims"]):
        assert VERDICT.match(line) and line.split(": ", 1)[1].startswith(claim["claim"]), line
        # One seed with per-image counts: every difference has an interval over the test images.
        assert (re.search(r"Δ [+−]?\d+\.\d\d ± \d+\.\d\d", line)
                and "one seed: the intervals count the test images" in line)
    for declared in spec["rows"]:
        folder = root / "results/metrics/tiny" / TINY / "pspnet" / declared["experiment"] / "seed0"
        assert (folder / "ss.per_image.npz").is_file()


@pytest.mark.slow
def test_tiny_table_csv_is_complete(built):
    assert built.result.returncode == 0, built.result.stdout[-5000:]
    frame = pd.read_csv(built.root / TABLE_CSV)
    assert len(frame) == 7
    assert list(frame["experiment"]) == table_experiments(built.root)
    assert set(frame["protocol"]) == {"ss"}
    for metric in ("miou", "pixel_acc"):
        for column in ("paper", "ours_mean", "delta"):
            values = frame[f"{metric}_{column}"]
            assert all(math.isfinite(v) for v in values), (metric, column, list(values))
        assert (frame[f"{metric}_n_seeds"] == 1).all()
        assert frame[f"{metric}_ours_std"].isna().all()  # one seed: no spread
        assert frame[f"{metric}_delta"].tolist() == pytest.approx(
            (frame[f"{metric}_ours_mean"] - frame[f"{metric}_paper"]).tolist())


# ----------------------------------------------------------------------------- reruns

@pytest.mark.slow
def test_second_run_does_nothing(built, built_copy):
    assert dry_run(built) == []
    table_mtime = (built_copy.root / TABLE_MD).stat().st_mtime_ns
    models = sorted((built_copy.root / "results/runs").rglob("model.pt"))
    assert len(models) == 7
    model_mtimes = [m.stat().st_mtime_ns for m in models]

    rerun = snakemake(built_copy.root, str(TABLE_MD), "--cores", "2", *TINY_CONFIG, env=built_copy.env)
    assert rerun.returncode == 0, rerun.stdout[-5000:]
    assert "Nothing to be done" in rerun.stdout, rerun.stdout
    assert not re.search(r"^(local)?rule \w+:$", rerun.stdout, re.MULTILINE), rerun.stdout
    assert (built_copy.root / TABLE_MD).stat().st_mtime_ns == table_mtime
    assert [m.stat().st_mtime_ns for m in models] == model_mtimes


@pytest.mark.slow
@pytest.mark.parametrize("override", [
    {"model": {"head": {"dropout": 0.3}}},
    {"train": {"lr": 0.02}},
], ids=["head-dropout", "train-lr"])
def test_training_param_of_one_experiment_reruns_only_it(built, override):
    papers = built.root / "params/papers/pspnet.yaml"
    with edited(papers, {"experiments": {"b1_max": override}}):
        jobs = dry_run(built)
    assert summary(jobs) == Counter({("train", "b1_max"): 1, ("evaluate", "b1_max"): 1, ("table", None): 1})
    assert [w.get("protocol") for rule, w in jobs if rule == "evaluate"] == ["ss"]
    assert dry_run(built) == []  # restored


@pytest.mark.slow
def test_experiment_outside_the_table_changes_nothing(built):
    with edited(built.root / "params/papers/pspnet.yaml", {"experiments": {"psp101": {"train": {"lr": 0.5}}}}):
        assert dry_run(built) == []


@pytest.mark.slow
def test_eval_only_settings_never_retrain(built):
    scales = built.root / "params/scales.yaml"
    # `ms` is not a protocol of table1: nothing to redo.
    with edited(scales, {"tiny": {"eval": {"protocols": {"ms": {"scales": [0.5, 1.0, 1.5]}}}}}):
        assert dry_run(built) == []
    # `ss` is (PSPNet declares its own, with the mirrored pass): every evaluation and the table,
    # but no training.
    single_scale = {"eval": {"protocols": {"ss": {"scales": [1.0], "flip": False}}}}
    with edited(built.root / "params/papers/pspnet.yaml", single_scale):
        jobs = dry_run(built)
    expected = Counter({("evaluate", e): 1 for e in table_experiments(built.root)})
    expected[("table", None)] = 1
    assert summary(jobs) == expected


@pytest.mark.slow
@pytest.mark.parametrize("module, rules", [
    ("reporting/tables.py", {"table"}),
    ("engine/evaluate.py", {"evaluate", "table"}),
    ("models/pspnet/pspnet.py", {"train", "evaluate", "table"}),
    # Another family's model: nothing of PSPNet's table reruns.
    ("models/saf/specialize_fuse.py", set()),
])
def test_code_change_reruns_the_stages_that_import_it(built, module, rules):
    source = built.root / "src/segrepro" / module
    with edited(source, lambda text: text + "\n# a change that makes the file newer\n"):
        jobs = dry_run(built)
    expected = Counter()
    for rule in rules - {"table"}:
        expected.update({(rule, e): 1 for e in table_experiments(built.root)})
    if rules:
        expected[("table", None)] = 1
    assert summary(jobs) == expected
    assert dry_run(built) == []  # content and mtime restored


# ----------------------------------------------------------------------------- several seeds

SEEDS = ("seeds=[0,1]",)


@pytest.mark.slow
def test_two_seeds_plan_the_second_seed_and_pass_both_to_the_table(built):
    result = snakemake(built.root, str(TABLE_MD), "-n", "-p", "--cores", "2", *TINY_CONFIG, *SEEDS,
                       env=built.env)
    assert result.returncode == 0, result.stdout[-5000:]
    jobs = planned_jobs(result.stdout)
    experiments = table_experiments(built.root)
    # seed 0 exists: seed 1 of every row is trained and evaluated, then the table.
    assert summary(jobs) == Counter(
        {("train", e): 1 for e in experiments} | {("evaluate", e): 1 for e in experiments} | {("table", None): 1})
    assert {w["seed"] for rule, w in jobs if rule != "table"} == {"1"}
    assert re.search(rf"segrepro table {TABLE} --scale tiny\s+--seeds 0 1 ", result.stdout), result.stdout


def test_two_seeds_from_nothing_plan_fourteen_trainings(project):
    result = snakemake(project, str(TABLE_MD), "-n", "--cores", "2", *TINY_CONFIG, *SEEDS)
    assert result.returncode == 0, result.stdout[-5000:]
    stats = job_stats(result.stdout)
    assert (stats["train"], stats["evaluate"], stats["table"]) == (14, 14, 1)


@pytest.mark.slow
def test_two_seeds_make_mean_and_std_cells(built_copy):
    """The table job with two seeds' metrics: every `ours` cell is "mean ± std" (sample std).
    Seed 1's metrics are seed 0's shifted by a known amount, so only the table job runs."""
    root = built_copy.root
    shift = {"miou": 2.0, "pixel_acc": 4.0}
    for experiment in table_experiments(root):
        seed0 = root / "results/metrics/tiny" / TINY / "pspnet" / experiment / "seed0/ss.json"
        metrics = json.loads(seed0.read_text())
        metrics.update(seed=1, **{m: metrics[m] + d for m, d in shift.items()})
        seed1 = seed0.parent.parent / "seed1" / "ss.json"
        seed1.parent.mkdir()
        seed1.write_text(json.dumps(metrics))
    result = snakemake(root, str(TABLE_MD), "--cores", "1", *TINY_CONFIG, *SEEDS, "--allowed-rules", "table",
                       env=built_copy.env)
    assert result.returncode == 0, result.stdout[-5000:]
    assert "1 of 1 steps (100%) done" in result.stdout

    text = (root / TABLE_MD).read_text()
    assert "- Seeds: 0, 1" in text.splitlines()
    header, rows = parse_markdown_table(text)
    assert len(rows) == 7
    frame = pd.read_csv(root / TABLE_CSV)
    for row, (_, record) in zip(rows, frame.iterrows()):
        for metric, name in (("miou", "mIoU (%)"), ("pixel_acc", "Pixel Acc. (%)")):
            cell = row[header.index(f"{name} reproduced")]
            mean, sep, std = cell.partition(" ± ")
            assert sep and NUMBER.match(mean) and NUMBER.match(std), cell
            # Two values d apart: sample std d / sqrt(2).
            assert float(std) == pytest.approx(shift[metric] / math.sqrt(2), abs=0.005)
            assert float(mean) == pytest.approx(record[f"{metric}_ours_mean"], abs=0.005)
            assert record[f"{metric}_n_seeds"] == 2


# ----------------------------------------------------------------------------- every target

@pytest.mark.parametrize("scale", ["demo", "paper"])
def test_dry_run_of_every_target(project, scale):
    args = ["-n", "--cores", "2"] + (["--config", f"scale={scale}"] if scale != "demo" else [])
    began = time.monotonic()
    result = snakemake(project, *args)
    seconds = time.monotonic() - began
    print(f"\nsnakemake -n (all targets, scale {scale}): {seconds:.1f} s")
    assert result.returncode == 0, result.stdout[-5000:]
    stats = job_stats(result.stdout)
    # PSPNet: 17 experiments (14 and 3 of its open defaults), 23 (experiment, protocol) evaluations
    # (table3 also tests 4 runs with `ms`; the open defaults evaluate psp50 without flip and without
    # padding); SaF: A-K and 4 variants of its open defaults single-scale, the two SOTA runs
    # multi-scale (at paper scale on each dataset of Tables 1, 3 and 4: 2 x 3 runs); HFGD: the 49
    # ResNet/Swin experiments its ablation tables name (its open defaults and Table 9's counted
    # SemanticFPN included), single-scale (the full model also without test padding), the ConvNeXt
    # OS 4 and OS 2 runs single- and multi-scale (Tables 10-16), and at paper scale 3 more on
    # Cityscapes (Table 12), 4 on COCO-Stuff 10k (Table 17), the OS 4 run on each dataset of Tables
    # 10, 11, 13, 15, 16.
    paper = scale == "paper"
    saf = 15 + 2 * (3 if paper else 1)
    hfgd_train = 49 + 2 + (3 + 4 + 4 if paper else 0)
    hfgd_evaluate = 49 + 1 + 4 + (3 + 4 + 2 * 4 if paper else 0)
    # 23 ablation tables (with the three papers' open defaults), 7 SOTA ones (SaF 1, 3, 4; HFGD 10,
    # 11, 13, 15, 16), 2 test-server ones, 2 efficiency ones (SaF 5, B: timed, not trained).
    seeds = 1 if paper else 3  # the scale's default seeds (params/scales.yaml)
    assert (stats["train"], stats["evaluate"], stats["table"], stats["all"]) == (
        seeds * (17 + saf + hfgd_train), seeds * (23 + saf + hfgd_evaluate), 34, 1), stats
    assert (stats["figure"], stats["pyramids"], stats["pyramid_stats"], stats["flops"], stats["efficiency"]) == (
        2, 1, 1, 1, 2), stats
    # The scale's datasets are not in data/ yet; SaF's ablations use a fixed-seed subset of ADE20K.
    datasets = (["ade20k", "ade20k-ablation", "pascal_context", "cityscapes", "cocostuff10k", "cocostuff164k"]
                if paper else ["synthetic"])
    assert stats["prepare_dataset"] == len(datasets)
    assert all(f"dataset={dataset}," in result.stdout for dataset in datasets)


def test_lint(project):
    result = snakemake(project, "--lint")
    assert result.returncode == 0, f"snakemake --lint:\n{result.stdout}"


# ----------------------------------------------------------------------------- bad requests

def test_unknown_table_target_fails_naming_it(project):
    result = snakemake(project, "results/tables/nope.md", "-n", "--cores", "1", *TINY_CONFIG)
    assert result.returncode != 0
    assert "unknown table 'nope'" in result.stdout, result.stdout


@pytest.mark.parametrize("entry, culprit", [
    ("sclae=tiny", "'sclae'"),
    ("scale=huge", "unknown scale 'huge'"),
])
def test_bad_config_fails_naming_the_key(project, entry, culprit):
    result = snakemake(project, str(TABLE_MD), "-n", "--cores", "1", "--config", entry)
    assert result.returncode != 0
    assert culprit in result.stdout, result.stdout
