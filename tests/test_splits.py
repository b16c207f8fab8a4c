"""Any split can be evaluated: `segrepro evaluate --split test` writes PROTOCOL.test.json and logs
`test_`-prefixed MLflow metrics (a test number never reads as a val one); val keeps PROTOCOL.json.
A class with no ground-truth pixel in the evaluated split is named by the evaluator and marked in
the table."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from conftest import edit_yaml
from PIL import Image
from test_folder_dataset import MEMBRANE, grey_image, mask

from segrepro.core import paths
from segrepro.engine.evaluate import classes_without_pixels
from segrepro.reporting.tables import ABSENT_MARK, build_table

RUN = ("--paper", "pspnet", "--experiment", "fcn", "--scale", "tiny", "--dataset", "cells", "--seed", "0")


def test_metrics_path_names_the_split_unless_val():
    run = ("tiny", "cells", "pspnet", "fcn", 0, "ss")
    assert paths.metrics_path(*run) == paths.metrics_path(*run, "val")
    assert paths.metrics_path(*run).name == "ss.json"
    assert paths.metrics_path(*run, "test").name == "ss.test.json"
    assert paths.metrics_path(*run, "test").parent == paths.metrics_path(*run).parent


def test_classes_without_pixels_are_the_empty_ground_truth_rows():
    confusion = np.array([[5, 1, 0], [0, 0, 0], [0, 2, 0]])  # class b: predicted twice, never true
    assert classes_without_pixels(confusion, ["a", "b", "c"]) == ["b"]
    assert classes_without_pixels(np.eye(3, dtype=int), ["a", "b", "c"]) == []


def test_a_table_notes_rows_whose_split_lacks_a_class():
    spec = {"title": "T", "metrics": ["miou"], "rows": [
        {"label": "A", "experiment": "a", "protocol": "ss", "paper": {"miou": 50.0}},
        {"label": "B", "experiment": "b", "protocol": "ss", "paper": {"miou": 40.0}}]}
    header = {"dataset": "cells, split test", "scale": "tiny", "backbone": "r", "iterations": 6, "seeds": [0],
              "commits": ["abc"]}
    results = {"a@ss": [{"seed": 0, "miou": 100.0, "split": "test", "classes_without_pixels": ["cell"]}],
               "b@ss": [{"seed": 0, "miou": 60.0, "split": "test", "classes_without_pixels": []}]}
    text, _, _ = build_table("t", spec, results, header)
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| Method")]
    assert rows[0].startswith("| A |") and rows[1].startswith("| B |")  # labels stay as declared
    assert f"{ABSENT_MARK} The evaluated split (test; rows a@ss) has no ground-truth pixel of 'cell'" in text
    results["a@ss"][0]["classes_without_pixels"] = []
    assert ABSENT_MARK not in build_table("t", spec, results, header)[0]


def test_evaluate_a_test_split_end_to_end(project, segrepro, tmp_path):
    """Prepare a folder dataset with train/val/test lists, train the tiny fcn, score the test
    split; its test images hold no 'cell' pixel, which the evaluator says."""
    import mlflow

    from segrepro.data.dataset import load_card

    source = tmp_path / "cells"
    for sub in ("image", "label"):
        (source / sub).mkdir(parents=True)
    for i in range(12):
        Image.fromarray(grey_image(i), "L").save(source / "image" / f"{i}.png")
        Image.fromarray(mask(i) if i < 10 else np.zeros_like(mask(i)), "L").save(source / "label" / f"{i}.png")
    (source / "train.txt").write_text("".join(f"{i}\n" for i in range(8)))
    (source / "val.txt").write_text("8\n9\n")
    (source / "test.txt").write_text("10\n11\n")
    edit_yaml(project / "params/datasets.yaml", {"cells": {
        **MEMBRANE, "root": str(source), "images": {"dir": "image", "suffix": ".png"},
        "labels": {"dir": "label", "suffix": ".png"}, "splits": {"train": "train.txt", "val": "val.txt",
                                                                  "test": "test.txt"}}})
    assert segrepro("prepare", "cells").returncode == 0
    assert load_card(project / "data/cells")["splits"] == {"train": 8, "val": 2, "test": 2}
    trained = segrepro("train", *RUN, "--threads", "1", timeout=300)
    assert trained.returncode == 0, trained.stderr

    done = segrepro("evaluate", *RUN, "--split", "test", "--threads", "1")
    assert done.returncode == 0, done.stderr
    run_dir = project / "results/metrics/tiny/cells/pspnet/fcn/seed0"
    assert sorted(p.name for p in run_dir.glob("*.json")) == ["ss.test.json"]
    metrics = json.loads((run_dir / "ss.test.json").read_text())
    assert metrics["split"] == "test" and metrics["num_images"] == 2
    assert metrics["classes_without_pixels"] == ["cell"]
    assert "no ground-truth pixel of 'cell'" in done.stderr and "split test" in done.stdout
    assert (run_dir / "ss.test.per_class_iou.csv").is_file()

    run_id = (project / "results/runs/tiny/cells/pspnet/fcn/seed0/mlflow_run_id").read_text().strip()
    logged = mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"]).get_run(run_id).data.metrics
    assert "test_ss_miou" in logged and "ss_miou" not in logged

    missing = segrepro("evaluate", *RUN, "--split", "holdout")
    assert missing.returncode == 1
    assert "dataset 'cells' has no split 'holdout' (it has: train, val, test)" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("split, name", [(None, "ss.json"), ("test", "ss.test.json")])
def test_the_evaluate_rules_write_where_tables_read(project, split, name):
    """A table's split decides which rule makes its metrics: evaluate (val) or evaluate_split."""
    import subprocess
    import sys

    args = ["--config", "scale=tiny"] + ([f"split={split}"] if split else [])
    result = subprocess.run([sys.executable, "-m", "snakemake", "results/tables/pspnet_table2.md", "-n", "-p",
                             "--cores", "1", *args], cwd=project, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout + result.stderr
    rules = re.findall(r"^rule (evaluate\w*):$", out, re.MULTILINE)
    assert rules == ["evaluate_split" if split else "evaluate"] * 5, rules
    assert len(re.findall(rf"--split {split or 'val'} --threads 1 --out \S+/seed0/{re.escape(name)} ", out)) == 5
