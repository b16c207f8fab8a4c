"""The `paper` scale: each table's dry run plans exactly the jobs the paper's protocol needs (its
dataset, one training per experiment, one evaluation per row), and runs resolve to the paper's
per-dataset protocol (SaF: lr and epochs of ADE20K, COCO-Stuff 10k, Pascal-Context; HFGD: ADE20K's
crop, Cityscapes' schedules). Dry runs only: nothing is trained.

One `snakemake -n` over every table at once gives the whole plan; each table's share of it is the
set of jobs its own output needs (followed back through the planned jobs' inputs and outputs), and
a dry run of one table alone is checked to plan that same set.
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter

import pytest
import yaml
from conftest import REPO, copy_project, segrepro_command
from test_workflow import job_stats, planned_jobs, project_env, snakemake

from segrepro.config.params import load_params

PAPER = ("--config", "scale=paper")
IO_LINE = re.compile(r"^\s+(input|output): (.*)$")

# The jobs of the papers' headline tables at the paper scale, downloads aside (those follow from
# params/archives.yaml and are checked for every table below).
HEADLINE = {
    "table1": ("ade20k", {"prepare_dataset": 1, "train": 2, "evaluate": 2, "table": 1}),
    "table3": ("cocostuff10k", {"prepare_dataset": 1, "train": 2, "evaluate": 2, "table": 1}),
    "table4": ("pascal_context", {"prepare_dataset": 1, "train": 2, "evaluate": 2, "table": 1}),
    "hfgd_table10": ("pascal_context", {"prepare_dataset": 1, "train": 1, "evaluate": 2, "table": 1}),
    "hfgd_table11": ("cocostuff164k", {"prepare_dataset": 1, "train": 1, "evaluate": 2, "table": 1}),
    "hfgd_table13": ("cityscapes", {"prepare_dataset": 1, "train": 2, "evaluate": 4, "table": 1}),
    "hfgd_table15": ("ade20k", {"prepare_dataset": 1, "train": 1, "evaluate": 2, "table": 1}),
    "hfgd_table16": ("cocostuff10k", {"prepare_dataset": 1, "train": 1, "evaluate": 2, "table": 1}),
}


@pytest.fixture(scope="module")
def params():
    return load_params(REPO)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A copy of the project (no data/, no results/) and the environment to dry-run it in."""
    base = tmp_path_factory.mktemp("paper-scale")
    copy_project(base / "project")
    return base / "project", project_env(base / "mlflow.db")


def dry_run(workdir, *args: str) -> str:
    root, env = workdir
    result = snakemake(root, "-n", "--cores", "2", *args, env=env, timeout=120)
    assert result.returncode == 0, result.stdout[-5000:]
    return result.stdout


def jobs_with_files(output: str) -> list[dict]:
    """Each planned job of a dry run: rule, wildcards, input and output paths."""
    jobs = [{"rule": rule, "wildcards": wildcards, "input": set(), "output": set()}
            for rule, wildcards in planned_jobs(output)]
    index = -1
    for line in output.splitlines():
        if re.match(r"^(?:local)?rule \w+:$", line):
            index += 1
        elif index >= 0 and (match := IO_LINE.match(line)):
            # A flagged path is listed with its flag: "data/x/dataset.yaml (update)".
            jobs[index][match.group(1)].update(re.sub(r" \(\w+\)$", "", path) for path in match.group(2).split(", "))
    assert index + 1 == len(jobs)
    return jobs


def needed_by(jobs: list[dict], target: str) -> list[dict]:
    """The jobs `target` needs: the one making it and, recursively, those making their inputs."""
    maker = {path: job for job in jobs for path in job["output"]}
    needed, todo = {}, [target]
    while todo:
        job = maker.get(todo.pop())
        if job is not None and id(job) not in needed:
            needed[id(job)] = job
            todo.extend(job["input"])
    return list(needed.values())


def expected_jobs(params, table: str) -> Counter:
    """What a table needs at the paper scale, from its spec alone: its dataset (and a subset's
    source) prepared from their archives, one training per experiment, one evaluation per row (a
    submission for a test-server row), the pyramids of the val split for a single-scale pyramidal SaF
    run, the counts of a flops table. An efficiency table (SaF Tables 5, B) needs only its timings."""
    paper, spec = params.table(table)
    if spec.get("kind") == "efficiency":
        return Counter({"efficiency": 1, "table": 1})
    dataset = params.table_dataset(table, "paper")
    declaration = params.dataset(dataset)
    datasets = [dataset] + ([declaration["source"]] if declaration["kind"] == "subset" else [])
    archives = {part["archive"] for name in datasets for part in params.dataset(name).get("parts", {}).values()}
    pyramidal = any(row["protocol"] == "ss" and params.resolve(paper, row["experiment"], "paper", dataset)
                    ["model"].get("head", {}).get("output") == "pyramidal" for row in spec["rows"])
    return +Counter({
        "download": len(archives), "prepare_dataset": len(datasets),
        "train": len({row["experiment"] for row in spec["rows"]}),
        "evaluate": sum("test_server" not in row for row in spec["rows"]),
        "submit": sum("test_server" in row for row in spec["rows"]),
        "pyramids": int(pyramidal), "flops": int("flops" in spec), "table": 1,
    })


@pytest.fixture(scope="module")
def whole_plan(workdir, params) -> list[dict]:
    targets = [f"results/tables/{name}.md" for name in params.table_names()]
    return jobs_with_files(dry_run(workdir, *targets, *PAPER))


# ----------------------------------------------------------------------------- dry runs

def test_every_table_plans_exactly_what_it_needs(params, whole_plan):
    assert set(HEADLINE) <= set(params.table_names())
    for table in params.table_names():
        jobs = needed_by(whole_plan, f"results/tables/{table}.md")
        assert Counter(job["rule"] for job in jobs) == expected_jobs(params, table), table
        # Every run of the table on the table's dataset, each row's experiment and protocol once.
        paper, spec = params.table(table)
        dataset = params.table_dataset(table, "paper")
        evaluations = sorted((w["paper"], w["experiment"], w["protocol"])
                             for job in jobs if job["rule"] == "evaluate" for w in [job["wildcards"]])
        runs = [job["wildcards"] for job in jobs if job["rule"] in ("train", "evaluate", "submit")]
        if spec.get("kind") == "efficiency":
            assert not runs, table  # timed, never trained
            continue
        assert evaluations == sorted((paper, row["experiment"], row["protocol"])
                                     for row in spec["rows"] if "test_server" not in row), table
        assert {w["dataset"] for w in runs} == {dataset} and {w["scale"] for w in runs} == {"paper"}, table


@pytest.mark.parametrize("table", sorted(HEADLINE))
def test_headline_tables_at_paper_scale(params, whole_plan, table):
    dataset, counts = HEADLINE[table]
    jobs = needed_by(whole_plan, f"results/tables/{table}.md")
    stats = Counter(job["rule"] for job in jobs)
    assert {rule: n for rule, n in stats.items() if rule != "download"} == counts
    assert [job["wildcards"]["dataset"] for job in jobs if job["rule"] == "prepare_dataset"] == [dataset]
    assert params.table_dataset(table, "paper") == dataset


def test_one_table_alone_plans_its_share_of_the_whole(workdir, whole_plan):
    """SaF Table 1 alone: ADE20K prepared (after its downloads), two trainings, two ms evaluations."""
    output = dry_run(workdir, "results/tables/table1.md", *PAPER)
    alone = Counter((rule, tuple(sorted(w.items()))) for rule, w in planned_jobs(output))
    share = Counter((job["rule"], tuple(sorted(job["wildcards"].items())))
                    for job in needed_by(whole_plan, "results/tables/table1.md"))
    assert alone == share
    stats = job_stats(output)
    assert (stats["prepare_dataset"], stats["train"], stats["evaluate"], stats["table"]) == (1, 2, 2, 1)
    assert {w["experiment"] for rule, w in planned_jobs(output) if rule == "train"} == {"I_hrnet48", "I_resnet101"}
    assert {w["protocol"] for rule, w in planned_jobs(output) if rule == "evaluate"} == {"ms"}


@pytest.mark.parametrize("scale, table", [("tiny", "pspnet_table1"), ("demo", "hfgd_table13"), ("paper", "table3")])
def test_the_command_line_dataset_wins_at_every_scale(workdir, scale, table):
    jobs = planned_jobs(dry_run(workdir, f"results/tables/{table}.md", "--config", f"scale={scale}", "dataset=camvid"))
    runs = [w for rule, w in jobs if rule in ("train", "evaluate")]
    assert runs and {w["dataset"] for w in runs} == {"camvid"} and {w["scale"] for w in runs} == {scale}
    assert [w["dataset"] for rule, w in jobs if rule == "prepare_dataset"] == ["camvid"]


# ----------------------------------------------------------------------------- resolved configs

def test_saf_sota_runs_take_their_datasets_protocol(params):
    for experiment in ("I_hrnet48", "I_resnet101"):
        for dataset, lr, iterations in (("ade20k", 0.02, 151560), ("cocostuff10k", 0.001, 61820),
                                        ("pascal_context", 0.001, 62400),
                                        ("ade20k-ablation", 0.02, 120000)):   # no layer: the ablation protocol
            config = params.resolve("saf", experiment, "paper", dataset)
            assert (config["train"]["lr"], config["train"]["iterations"]) == (lr, iterations), (experiment, dataset)
            assert (config["train"]["crop_size"], config["train"]["batch_size"]) == (512, 16)
            assert config["eval"]["protocols"]["ms"] == {"scales": [0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0], "flip": True}
            assert config["dataset"]["name"] == dataset
        # The experiment's own backbone stays whatever the dataset.
        assert params.resolve("saf", experiment, "paper", "cocostuff10k")["model"]["backbone"]["name"] == (
            "hrnet_w48" if experiment == "I_hrnet48" else "resnet101")
    # Another scale has no such layer: the demo schedule.
    assert params.resolve("saf", "I_hrnet48", "demo", "cocostuff10k")["train"]["iterations"] == 400


def test_segrepro_config_prints_the_datasets_protocol():
    result = subprocess.run(
        segrepro_command("config", "--paper", "saf", "--experiment", "I_hrnet48", "--scale", "paper",
                         "--dataset", "cocostuff10k"),
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert (config["train"]["lr"], config["train"]["iterations"]) == (0.001, 61820)
    assert config["dataset"]["name"] == "cocostuff10k"


def test_hfgd_sota_runs_take_their_datasets_protocol(params):
    def train(experiment, dataset):
        return params.resolve("hfgd", experiment, "paper", dataset)["train"]

    for dataset in ("pascal_context", "cocostuff164k", "cocostuff10k"):
        config = train("convnext_usfpn_cae_hfgm", dataset)
        assert (config["optimizer"], config["lr"], config["iterations"], config["crop_size"], config["batch_size"]) == (
            "adamw", 4e-5, 40000, 513, 16), dataset
    assert (train("convnext_usfpn_cae_hfgm", "ade20k")["crop_size"],
            train("convnext_usfpn_cae_hfgm", "ade20k")["iterations"]) == (641, 40000)
    assert params.resolve("hfgd", "convnext_usfpn_cae_hfgm", "paper", "ade20k")["eval"]["crop_size"] == 641
    # Cityscapes: 60K at OS 4, 80K at OS 2 (an experiment's own per-dataset layer comes last);
    # the ResNet-50 ablation there keeps the plain 30K.
    assert train("convnext_usfpn_cae_hfgm", "cityscapes")["iterations"] == 60000
    assert train("convnext_usfpn_cae_hfgm_os2", "cityscapes")["iterations"] == 80000
    assert train("convnext_usfpn_cae_hfgm_os2", "pascal_context")["iterations"] == 40000
    assert train("usfpn_cae_hfgm_os2", "cityscapes")["iterations"] == 30000
    os2 = params.resolve("hfgd", "convnext_usfpn_cae_hfgm_os2", "paper", "cityscapes")
    assert os2["model"]["upsampler"]["output_stride"] == 2
    assert os2["model"]["backbone"]["name"] == "convnext_large.fb_in22k_ft_in1k"
    assert os2["eval"]["crop_size"] == [513, 1025] and os2["eval"].get("base_size") is None   # null: the image's size
