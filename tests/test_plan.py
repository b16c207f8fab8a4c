"""`segrepro plan` and `segrepro calibrate`: the jobs come from Snakemake's dry run, the costs
from a calibration file (hand-written here, so every hour is known exactly), and nothing is
trained."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from segrepro.config.params import load_params
from segrepro.core import devices, paths
from segrepro.core.errors import SegreproError
from segrepro.pipeline import plan

TABLE = "results/tables/pspnet_table2.md"
ITERATIONS = 6          # params/scales.yaml tiny.train.iterations
STEP_SECONDS = 0.5      # the hand-written calibration
WINDOW_SECONDS = 0.25
# A tiny image is 64x48 and PSPNet's eval crop 49: padded to 49 rows, two windows (columns 0 and
# 15) per image at ss, twice with PSPNet's flip.
EVAL_SECONDS = 4 * 2 * 2 * WINDOW_SECONDS
THREADS = str(torch.get_num_threads())  # the plan's subprocess must name the device as this one does


def write_calibration(rows: list[str]) -> Path:
    """A calibration file of this machine with STEP_SECONDS / WINDOW_SECONDS for the tiny
    pspnet runs of `rows` (experiment IDs)."""
    params = load_params()
    device = devices.device_name(torch.device("cpu"))
    entries = {}
    for experiment in rows:
        config = params.resolve("pspnet", experiment, "tiny", None, 0)
        entries[plan.signature(config, 13, device)] = {
            "run": f"pspnet/{experiment}", "backbone": "resnet50s", "device": device, "date": "2026-01-01",
            "torch": torch.__version__, "scaled": None, "step_seconds": STEP_SECONDS,
            "window_seconds": WINDOW_SECONDS, "eval_crop": [49, 49], "batch": 2}
    path = plan.calibration_path(device)
    plan.store_calibrations(path, device, entries)
    return path


def table_rows() -> list[str]:
    return [row["experiment"] for row in load_params().table("pspnet_table2")[1]["rows"]]


def dry_run_outputs(*targets: str) -> set[str]:
    """The train and evaluate outputs that `snakemake -n` lists, read from its `output:` lines."""
    listing = subprocess.run([sys.executable, "-m", "snakemake", *targets, "-n", "--config", "scale=tiny"],
                             capture_output=True, text=True, check=True).stdout
    outputs, rule = set(), None
    for line in listing.splitlines():
        header = re.match(r"^(?:local)?rule (\w+):$", line)
        if header:
            rule = header[1]
        elif rule in ("train", "evaluate") and line.strip().startswith("output: "):
            outputs.add(line.strip().removeprefix("output: "))
    return outputs


def planned_outputs(record: dict) -> set[str]:
    outputs = set()
    for job in record["job_list"]:
        w = job["wildcards"]
        if job["rule"] in ("train", "evaluate"):
            run = (w["scale"], w["dataset"], w["paper"], w["experiment"], int(w["seed"]))
            outputs.add(str(paths.model_path(*run) if job["rule"] == "train"
                            else paths.metrics_path(*run, w["protocol"])))
    return outputs


def run_plan(segrepro, *args: str) -> dict:
    result = segrepro("plan", *args, "--scale", "tiny", "--threads", THREADS, "--json", "plan.json")
    assert result.returncode == 0, result.stderr
    assert "calibrating" not in result.stderr  # every entry came from the file
    return json.loads(Path("plan.json").read_text()), result.stdout


def test_plan_lists_the_dry_runs_jobs_with_exact_hours(project, segrepro):
    rows = table_rows()
    write_calibration(rows)
    record, text = run_plan(segrepro, TABLE)

    assert planned_outputs(record) == dry_run_outputs(TABLE)
    to_run, up_to_date = record["jobs"]["to_run"], record["jobs"]["up_to_date"]
    assert (to_run["train"], to_run["evaluate"], to_run["table"]) == (5, 5, 1)
    assert up_to_date == {"prepare_dataset": 1}
    assert {cost["wildcards"]["experiment"] for cost in record["trainings"]} == set(rows)
    for cost in record["trainings"]:
        assert cost["iterations"] == ITERATIONS
        assert cost["hours"] == pytest.approx(ITERATIONS * STEP_SECONDS / 3600, rel=1e-12)
    assert record["train_hours"] == pytest.approx(ITERATIONS * STEP_SECONDS / 3600 * len(rows), rel=1e-12)
    assert [cost["seconds"] for cost in record["inferences"]] == pytest.approx([EVAL_SECONDS] * len(rows))
    # One job at a time: every training, then every evaluation.
    assert record["wall_seconds"] == pytest.approx(len(rows) * (ITERATIONS * STEP_SECONDS + EVAL_SECONDS))
    assert record["unit"] == "CPU-hours"
    assert f"jobs: {sum(to_run.values())} to run, 1 already up to date" in text
    assert "calibrated on " + record["device"] + ", 2026-01-01" in text
    assert not Path("results/runs").exists()


@pytest.mark.slow
def test_a_built_run_drops_out_of_the_plan(project, segrepro):
    write_calibration(table_rows())
    built = "results/metrics/tiny/synthetic-tiny/pspnet/fcn/seed0/ss.json"
    # MLflow off: the run's files are what the plan looks at, and logging would only cost time.
    subprocess.run([sys.executable, "-m", "snakemake", built, "--cores", "1", "--config", "scale=tiny"],
                   capture_output=True, text=True, check=True, env={**os.environ, "SEGREPRO_MLFLOW": "0"})

    record, _ = run_plan(segrepro, TABLE)
    to_run, up_to_date = record["jobs"]["to_run"], record["jobs"]["up_to_date"]
    assert (to_run["train"], to_run["evaluate"]) == (4, 4)
    assert (up_to_date["train"], up_to_date["evaluate"]) == (1, 1)
    assert "fcn" not in {job["wildcards"].get("experiment") for job in record["job_list"]}
    assert planned_outputs(record) == dry_run_outputs(TABLE)


def test_calibrate_writes_an_entry_and_trains_nothing(project, segrepro):
    result = segrepro("calibrate", "--paper", "pspnet", "--experiment", "fcn", "--scale", "tiny",
                      "--steps", "1", "--threads", THREADS)
    assert result.returncode == 0, result.stderr
    path = plan.calibration_path(devices.device_name(torch.device("cpu")))
    [entry] = json.loads(path.read_text())["entries"].values()
    assert entry["step_seconds"] > 0 and entry["window_seconds"] > 0
    assert (entry["batch"], entry["batch_measured"], entry["scaled"]) == (2, 2, None)
    assert str(path) in result.stdout
    assert not Path("results/runs").exists()


@pytest.mark.parametrize("args, culprit", [
    (("plan", "results/tables/nosuch.md"), "unknown table 'nosuch'"),
    (("plan", "results/nothing.txt"), "no rule makes target 'results/nothing.txt'"),
    (("calibrate", "--paper", "pspnet", "--experiment", "nosuch"), "unknown experiment ID 'nosuch'"),
])
def test_bad_input_is_one_line(project, segrepro, args, culprit):
    result = segrepro(*args, "--scale", "tiny")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("segrepro: error: ") and culprit in lines[0], result.stderr


# ----------------------------------------------------------------------------- in-process pieces

LISTING = """Job stats:
job         count
--------  -------
train           1
all             1
total           2

[Sat Nov 21 08:57:00 2026]
rule train:
    output: results/runs/tiny/d/p/e/seed0/model.pt
    wildcards: scale=tiny, dataset=d, paper=p, experiment=e, seed=0
    resources: tmpdir=/tmp
[Sat Nov 21 08:57:00 2026]
localrule all:
    input: results/runs/tiny/d/p/e/seed0/model.pt
Job stats:
job         count
--------  -------
train           1
all             1
total           2
"""


def test_parse_dry_run_reads_rules_and_wildcards():
    jobs = plan.parse_dry_run(LISTING)
    assert [(job.rule, job.values) for job in jobs] == [
        ("train", {"scale": "tiny", "dataset": "d", "paper": "p", "experiment": "e", "seed": "0"}), ("all", {})]
    assert plan.parse_dry_run("Nothing to be done (all requested files are present and up to date).") == []
    with pytest.raises(SegreproError, match="could not read Snakemake's dry run"):
        plan.parse_dry_run(LISTING.replace("train           1", "train           2"))


def test_stores_at_the_same_time_keep_every_entry(tmp_path):
    path = tmp_path / "calibration" / "device.json"

    def store(writer: int) -> None:
        for index in range(20):
            plan.store_calibrations(path, "device", {f"{writer}-{index}": {"step_seconds": 1.0}})

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(store, range(2)))
    assert len(plan.read_calibrations(path)) == 40
    path.write_text("{")
    with pytest.raises(SegreproError, match="not a calibration file"):
        plan.read_calibrations(path)


def test_the_report_plans_like_all():
    assert plan.snakemake_targets(["results/report.html"]) == ["all", "results/report.html"]
    assert plan.snakemake_targets(["all"]) == ["all"]
    assert plan.snakemake_targets([TABLE]) == [TABLE]


def test_windows_follow_the_sliding_window_and_the_protocol():
    # 160x120 at crop 96: tiles at rows 0, 24 and columns 0, 64.
    assert plan.windows_per_image((120, 160), {"scales": [1.0]}, 96, None) == 4
    # Half size fits the crop: its share of the crop's pixels, twice with flip.
    assert plan.windows_per_image((120, 160), {"scales": [0.5], "flip": True}, 96, None) == pytest.approx(
        2 * 60 * 80 / 96**2)
    # base_size sets the long side first: 2048x1024 -> 512x256 at scale 1, tiled by 473 (2 columns).
    assert plan.windows_per_image((1024, 2048), {"scales": [1.0]}, 473, 512) == 2
    # PSPNet pads every small scale up to the crop: a whole window each, twice with flip.
    assert plan.windows_per_image((120, 160), {"scales": [0.5], "flip": True, "pad": "each_scale"}, 96, None) == 2
    # HFGD pads once to the crop, then scales: 0.5 of the padded 96x160 is 48x80.
    assert plan.windows_per_image((60, 160), {"scales": [0.5], "pad": "before_scaling"}, 96, None) == pytest.approx(
        48 * 80 / 96**2)


def test_schedule_waits_for_each_runs_training():
    def cost(rule, seconds, run, devices=1):
        return plan.Cost(plan.Job(rule, ()), seconds, devices, run)

    trainings = [cost("train", 10, "a"), cost("train", 8, "b"), cost("train", 5, "c")]
    # Two slots: a 0-10, b 0-8, c 8-13; c's evaluation waits for c, a's for a.
    assert plan.wall_seconds(trainings, [cost("evaluate", 1, "c")], 2) == 14
    assert plan.wall_seconds(trainings, [cost("evaluate", 1, "a"), cost("evaluate", 1, "b")], 2) == 13
    assert plan.wall_seconds(trainings, [], 1) == 23
    with pytest.raises(SegreproError, match="--gpus 1: fewer than the 2"):
        plan.wall_seconds([cost("train", 1, ("s", "d", "p", "e", 0), devices=2)], [], 1)


def test_unprepared_datasets_use_their_declaration(project):
    params = load_params()
    assert plan.num_classes(params, "ade20k") == 150
    assert plan.num_classes(params, "ade20k-ablation") == 150
    sizes = plan.split_sizes(params, "ade20k-ablation", "val")
    assert len(sizes.sizes) == 4000 and "not prepared" in sizes.source
    assert plan.split_sizes(params, "cityscapes").split == "test"  # what a submission predicts
    assert len(plan.split_sizes(params, "synthetic-tiny", "val").sizes) == 4  # prepared: read
    with pytest.raises(SegreproError, match="no split 'test'"):
        plan.split_sizes(params, "pascal_context", "test")


def test_calibration_uses_the_jobs_threads():
    """plan and calibrate time the steps with the torch threads of the jobs they estimate."""
    for rule in ("train", "eval"):
        text = (Path(__file__).resolve().parents[1] / "workflow" / "rules" / f"{rule}.smk").read_text()
        assert re.findall(r"^\s+threads: (\d+)$", text, re.MULTILINE) == [str(plan.JOB_THREADS)], rule


def test_a_calibration_under_load_says_so_and_is_measured_again_when_quiet(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (13.6, 12.0, 9.0))
    busy = plan.machine_load(1)
    assert busy == {"load_1min": 13.6, "cpus": 2, "threads": 1, "under_load": True}
    entry = {"run": "pspnet/psp50", "step_seconds": 3.0, "machine_load": busy}
    assert plan.load_note(entry) == "load 13.6 on 2 CPUs"

    measured = []
    monkeypatch.setattr(plan, "calibrate_run", lambda *args: measured.append(args) or {
        "run": "pspnet/psp50", "step_seconds": 1.0, "machine_load": plan.machine_load(1)})
    monkeypatch.setattr(plan, "calibration_path", lambda device: tmp_path / "calibration.json")
    monkeypatch.setattr(plan, "signature", lambda *args: "key")
    # Still busy: the stored entry is used (the plan's assumptions list it as under load).
    assert plan._calibration_for({}, 3, "cpu", "cpu", {"key": entry}, {}, False, 1, None) is entry
    assert not measured
    # Quiet now: measured again.
    monkeypatch.setattr(os, "getloadavg", lambda: (0.3, 0.5, 0.6))
    again = plan._calibration_for({}, 3, "cpu", "cpu", {"key": entry}, {}, False, 1, None)
    assert len(measured) == 1 and again["step_seconds"] == 1.0 and plan.load_note(again) is None
