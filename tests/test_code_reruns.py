"""A code change reruns exactly the jobs whose code it is: editing one model family's file reruns
that family's trainings, evaluations, submissions, computation counts, tables and figures, and
nothing of the other families; a file several families import reruns each of them.

Every target of the workflow (tiny scale, all three papers) is marked built once with
`snakemake --touch` over placeholder outputs: no job runs, yet Snakemake's view (output times after
input times, the code files as inputs) is that of a finished build, so a dry-run after an edit plans
what a real build would rerun. tests/test_workflow.py checks the same on a really built table.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
from conftest import copy_project
from test_workflow import TINY_CONFIG, edited, planned_jobs, snakemake

from segrepro.config.params import load_params

FAMILIES = ("pspnet", "saf", "hfgd")


def job_paper(params, rule: str, wildcards: dict) -> str | None:
    """The paper a job belongs to (None: a job of no paper, such as a dataset or its pyramids)."""
    if "paper" in wildcards:
        return wildcards["paper"]
    if rule in ("table", "flops", "efficiency"):
        return params.table(wildcards["table"])[0]
    if rule == "figure":
        return params.figure(wildcards["figure"])[0]
    return None


def key(jobs: list[tuple[str, dict]]) -> set[tuple[str, tuple]]:
    return {(rule, tuple(sorted(wildcards.items()))) for rule, wildcards in jobs}


class Stub:
    def __init__(self, root: Path, env: dict, plan: list[tuple[str, dict]]):
        self.root, self.env, self.plan = root, env, plan
        self.params = load_params(root, workflow={"scale": "tiny", "seeds": [0]})

    def dry_run(self) -> list[tuple[str, dict]]:
        result = snakemake(self.root, "-n", "--cores", "1", *TINY_CONFIG, env=self.env, timeout=120)
        assert result.returncode == 0, result.stdout[-5000:]
        return planned_jobs(result.stdout)


def dry_run_outputs(output: str) -> list[Path]:
    # A flagged path is listed with its flag: "data/x/dataset.yaml (update)".
    return [Path(re.sub(r" \(\w+\)$", "", path)) for line in output.splitlines() if line.strip().startswith("output:")
            for path in line.strip()[len("output:"):].strip().split(", ")]


@pytest.fixture(scope="module")
def stub(tmp_path_factory) -> Stub:
    root = tmp_path_factory.mktemp("code-reruns") / "project"
    copy_project(root)
    env = {**os.environ, "SEGREPRO_MLFLOW": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = snakemake(root, "-n", "--cores", "1", *TINY_CONFIG, env=env, timeout=120)
    assert result.returncode == 0, result.stdout[-5000:]
    plan = planned_jobs(result.stdout)
    assert {job_paper(None, rule, w) for rule, w in plan if rule in ("train", "evaluate")} == set(FAMILIES)
    for path in dry_run_outputs(result.stdout):
        path = root / path
        if path.suffix:  # every output is a file with an extension, but the pyramids' directories
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        else:
            path.mkdir(parents=True, exist_ok=True)
    touched = snakemake(root, "--touch", "--cores", "1", *TINY_CONFIG, env=env, timeout=120)
    assert touched.returncode == 0, touched.stdout[-5000:]
    built = Stub(root, env, plan)
    assert built.dry_run() == [], "the touched build is not up to date"
    return built


# SaF's efficiency tables (Tables 5, B) time comparison heads built from the shared layers.
EFFICIENCY_TABLES = {"table5", "tableB"}


@pytest.mark.parametrize("module, families, tables", [
    ("models/hfgd/hfgd.py", {"hfgd"}, set()),
    ("models/pspnet/pspnet.py", {"pspnet"}, set()),
    ("models/saf/specialize_fuse.py", {"saf"}, set()),
    # Shared modules: layers.py is imported by PSPNet's and HFGD's models, not by SaF's HRNet (only
    # by the comparison heads SaF's efficiency tables time).
    ("models/common/layers.py", {"pspnet", "hfgd"}, EFFICIENCY_TABLES),
    ("models/common/losses.py", set(FAMILIES), set()),
    ("models/saf/context_heads.py", set(), EFFICIENCY_TABLES),
])
def test_model_code_change_reruns_its_families_only(stub, module, families, tables):
    with edited(stub.root / "src/segrepro" / module, lambda text: text + "\n# a change\n"):
        jobs = stub.dry_run()
    expected = [(rule, w) for rule, w in stub.plan
                if rule == "all" or job_paper(stub.params, rule, w) in families or w.get("table") in tables]
    assert key(jobs) == key(expected), sorted(key(jobs) ^ key(expected))
    rules = {rule for rule, _ in jobs}
    assert ({"train", "evaluate", "table"} if families else {"efficiency", "table"}) <= rules, rules


def rerun_by_rule(stub, module: str) -> tuple[list, list]:
    """The jobs a dry run plans after an edit of `module` (a path under src/segrepro)."""
    with edited(stub.root / "src/segrepro" / module, lambda text: text + "\n# a change\n"):
        return stub.dry_run()


@pytest.mark.parametrize("module, rules", [
    # Bookkeeping (MLflow, the training log and curve, the code inputs themselves) changes no
    # model, metrics or table: only the report shows it, which a tiny build does not make.
    ("pipeline/tracking.py", set()),
    ("pipeline/train_log.py", set()),
    ("pipeline/codedeps.py", set()),
    # Reporting: the tables (and what draws from them), never a training or an evaluation.
    ("reporting/saf_report.py", {"table", "figure"}),
    ("reporting/markdown.py", {"table", "figure", "pyramid_stats"}),
    ("reporting/bootstrap.py", {"table", "figure"}),
    ("config/table_specs.py", {"table", "figure", "pyramid_stats"}),
    # Data: the download and extraction of real archives make no synthetic dataset (the tiny
    # build's only kind). (data/convert.py also holds Cityscapes' label ids, which a submission
    # of any dataset maps back to: every submission depends on it.)
    ("data/download.py", set()),
    ("data/extract.py", set()),
])
def test_reporting_bookkeeping_and_real_data_code_rerun_no_training(stub, module, rules):
    jobs = rerun_by_rule(stub, module)
    expected = [(rule, w) for rule, w in stub.plan if rule in rules or (rule == "all" and rules)]
    assert key(jobs) == key(expected), sorted(key(jobs) ^ key(expected))
    assert not {"prepare_dataset", "pyramids", "train", "evaluate", "submit", "flops", "efficiency"} & {
        rule for rule, _ in jobs}


def test_the_synthetic_generator_reruns_the_synthetic_data_and_what_follows(stub):
    """The tiny build runs on synthetic data only: the generator makes all of it, so every job on
    data reruns; the computation counts and timings (random inputs) and the efficiency tables
    made of them alone do not. On a real dataset none would: tests/test_config.py checks the
    code inputs of its jobs."""
    jobs = rerun_by_rule(stub, "data/synthetic.py")
    expected = [(rule, w) for rule, w in stub.plan
                if rule not in ("flops", "efficiency") and w.get("table") not in EFFICIENCY_TABLES]
    assert key(jobs) == key(expected), sorted(key(jobs) ^ key(expected))
    assert ("prepare_dataset", (("dataset", "synthetic-tiny"),)) in key(jobs)
