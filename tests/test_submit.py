"""Test-server submissions (segrepro.engine.submit): the zip of each server format, its atomic write, the
unlabelled splits of a dataset card, the table rows that show a submission instead of a number, and
the new tables' dry-runs.

The format checks run a stub model whose prediction is known: class `BRIGHT` where the image is
bright, `DARK` elsewhere, so every PNG value can be checked by hand. One end-to-end check runs the
CLI on a real tiny SaF model (not trained: its numbers do not matter, its shapes do).
"""

from __future__ import annotations

import fnmatch
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY
from PIL import Image
from test_workflow import planned_jobs, snakemake

from segrepro.config.table_specs import check_table_spec
from segrepro.core import paths
from segrepro.core.errors import SegreproError
from segrepro.data import cityscapes
from segrepro.data.dataset import SegmentationDataset, SplitImages, load_card
from segrepro.engine import submit
from segrepro.reporting.tables import build_table, load_submission

BRIGHT, DARK = -1, 0  # class indices of the stub's two answers (-1: the last class)
MS = {"scales": [0.75, 1.0, 1.25], "flip": True}


# ----------------------------------------------------------------------------- helpers

class Stub(torch.nn.Module):
    """Logits with a wide margin: class BRIGHT where the first channel is above the mean, else DARK."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], self.num_classes, *x.shape[-2:])
        bright = (x[:, 0] > 0).float()
        logits[:, BRIGHT % self.num_classes] = 10 * bright
        logits[:, DARK] = 10 * (1 - bright)
        return logits


def make_dataset(root: Path, ids: dict[str, tuple[int, int]], num_classes: int, split: str = "test",
                 labelled: bool = False) -> Path:
    """A dataset in the uniform layout whose `split` holds `ids` (id -> (width, height)); each image
    is bright on its left half and dark on its right one."""
    (root / "images").mkdir(parents=True)
    (root / "splits").mkdir()
    for image_id, (w, h) in ids.items():
        image = np.zeros((h, w, 3), np.uint8)
        image[:, : w // 2] = 250
        Image.fromarray(image).save(root / "images" / f"{image_id}.png")
        if labelled:
            (root / "labels").mkdir(exist_ok=True)
            Image.fromarray(np.zeros((h, w), np.uint8)).save(root / "labels" / f"{image_id}.png")
    (root / "splits" / f"{split}.txt").write_text("".join(f"{i}\n" for i in sorted(ids)))
    card = {"name": root.name, "num_classes": num_classes, "ignore_index": 255,
            "class_names": [f"c{k}" for k in range(num_classes)], "image_suffix": ".png",
            "label_suffix": ".png", "splits": {split: len(ids)}}
    if not labelled:
        card["unlabelled_splits"] = [split]
    (root / "dataset.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    return root


def run_config(root: Path) -> dict:
    return {"paper": "p", "experiment": "e", "scale": "tiny", "seed": 0,
            "dataset": {"name": root.name, "root": str(root)},
            "eval": {"crop_size": 32, "base_size": None, "protocols": {"ms": MS}},
            "model": {"backbone": {"name": "stub"}}, "train": {"iterations": 1}}


@pytest.fixture
def stubbed(monkeypatch):
    """write_submission with the stub model of `num_classes` classes and MLflow off."""
    monkeypatch.setenv("SEGREPRO_MLFLOW", "0")

    def use(num_classes: int):
        record = {"num_classes": num_classes, "summary": {"iterations": 1, "git_commit": "abc"}}
        monkeypatch.setattr(submit, "load_model", lambda path, device=None: (Stub(num_classes), record))

    return use


def members(path: Path) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(path) as archive:
        out = {}
        for name in archive.namelist():
            with Image.open(io.BytesIO(archive.read(name))) as image:
                assert image.mode == "L" and image.format == "PNG", name
                out[name] = np.asarray(image)
        return out


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ----------------------------------------------------------------------------- the formats

ADE_IDS = {"ADE_test_00000001": (37, 23), "ADE_test_00000002": (50, 40), "ADE_test_00000003": (64, 48)}


def test_ade20k_zip_holds_class_plus_one_per_test_image(tmp_path, stubbed):
    stubbed(150)
    root = make_dataset(tmp_path / "ade", ADE_IDS, 150)
    out = tmp_path / "out" / "seed0_ms.zip"
    manifest = submit.write_submission(run_config(root), tmp_path / "model.pt", "test", out, "ade20k_sceneparsing",
                                       "ms")

    pngs = members(out)
    # One PNG per test image named after it (CSAILVision/sceneparsing: ADE_test_00000001.jpg ->
    # ADE_test_00000001.png), nothing else in the zip.
    assert sorted(pngs) == [f"{i}.png" for i in sorted(ADE_IDS)]
    for image_id, (w, h) in ADE_IDS.items():
        values = pngs[f"{image_id}.png"]
        assert values.shape == (h, w)  # the image's own size
        assert 1 <= values.min() and values.max() <= 150  # class + 1; 0 ("other") never written
        # By hand: the bright left edge is class 149 -> 150, the dark right edge class 0 -> 1.
        assert (values[:, 0] == 150).all() and (values[:, -1] == 1).all()
    assert manifest["stand_in"] is False and manifest["split"] == "test" and manifest["num_images"] == 3
    assert load_submission(out) == dict(manifest, submission=str(out))
    readme = paths.submission_readme_path(out).read_text()
    assert "http://sceneparsing.csail.mit.edu/" in readme and "NOT A SUBMISSION" not in readme
    assert leftovers(out.parent) == ["seed0_ms.README.txt", "seed0_ms.zip"]  # no temporary file


def test_cityscapes_label_ids_by_hand():
    # cityscapesScripts helpers/labels.py: road 7 -> train 0, sidewalk 8 -> 1, building 11 -> 2,
    # sky 23 -> 10, person 24 -> 11, bicycle 33 -> 18.
    table = cityscapes.train_to_label()
    assert table.shape == (19,)
    assert [int(table[t]) for t in (0, 1, 2, 10, 11, 18)] == [7, 8, 11, 23, 24, 33]


CITY_IDS = {"berlin_000000_000019": (48, 24), "bielefeld_000000_000321": (40, 20)}


def test_cityscapes_zip_holds_label_ids_under_the_frame_name(tmp_path, stubbed):
    stubbed(19)
    root = make_dataset(tmp_path / "cityscapes", CITY_IDS, 19)
    out = tmp_path / "seed0_ms.zip"
    submit.write_submission(run_config(root), tmp_path / "model.pt", "test", out, "cityscapes", "ms")

    pngs = members(out)
    assert sorted(pngs) == ["berlin_000000_000019.png", "bielefeld_000000_000321.png"]
    for image_id, (w, h) in CITY_IDS.items():
        # The evaluator's look-up: exactly one file matching "<city>_<seq>_<frame>*.png".
        assert len(fnmatch.filter(pngs, f"{image_id}*.png")) == 1
        values = pngs[f"{image_id}.png"]
        assert values.shape == (h, w)
        # trainId 18 (bicycle) -> labelId 33 on the bright half, trainId 0 (road) -> 7 on the dark one.
        assert set(np.unique(values)) <= {7, 33}
        assert (values[:, 0] == 33).all() and (values[:, -1] == 7).all()


def test_cityscapes_test_ids_must_name_a_frame(tmp_path, stubbed):
    stubbed(19)
    root = make_dataset(tmp_path / "cityscapes", {"berlin_000000_000019": (8, 8), "frame7": (8, 8)}, 19)
    out = tmp_path / "seed0_ms.zip"
    with pytest.raises(SegreproError, match=r"image id 'frame7' does not start with <city>_<seq>_<frame>"):
        submit.write_submission(run_config(root), tmp_path / "model.pt", "test", out, "cityscapes", "ms")
    assert leftovers(tmp_path) == ["cityscapes"]


def test_labelled_split_stands_in_and_says_so(tmp_path, stubbed):
    """The synthetic datasets have no test split: their val images stand in, in the format, and
    the README and the manifest say it is not a submission."""
    stubbed(13)
    root = make_dataset(tmp_path / "synthetic", {"val_00000": (16, 12), "val_00001": (16, 12)}, 13,
                        split="val", labelled=True)
    assert submit.default_split(load_card(root)) == "val"
    out = tmp_path / "seed0_ms.zip"
    manifest = submit.write_submission(run_config(root), tmp_path / "model.pt", "val", out, "cityscapes", "ms")
    assert manifest["stand_in"] is True
    assert sorted(members(out)) == ["val_00000.png", "val_00001.png"]  # no Cityscapes names to keep
    assert paths.submission_readme_path(out).read_text().startswith("NOT A SUBMISSION")


def test_a_failure_midway_leaves_no_zip(tmp_path, stubbed):
    stubbed(150)
    root = make_dataset(tmp_path / "ade", ADE_IDS, 150)
    culprit = root / "images" / "ADE_test_00000002.png"  # the second image: the first is already zipped
    culprit.write_bytes(b"not a png")
    out = tmp_path / "out" / "seed0_ms.zip"
    with pytest.raises(SegreproError, match=f"{culprit}: cannot read image"):
        submit.write_submission(run_config(root), tmp_path / "model.pt", "test", out, "ade20k_sceneparsing", "ms")
    assert leftovers(out.parent) == []  # neither the zip, nor its README, nor a temporary file


def test_unknown_format_and_protocol(tmp_path, stubbed):
    stubbed(150)
    root = make_dataset(tmp_path / "ade", ADE_IDS, 150)
    with pytest.raises(SegreproError, match="unknown test-server format 'kitti'"):
        submit.write_submission(run_config(root), tmp_path / "m.pt", "test", tmp_path / "s.zip", "kitti", "ms")
    with pytest.raises(SegreproError, match="unknown test protocol 'ss'"):
        submit.write_submission(run_config(root), tmp_path / "m.pt", "test", tmp_path / "s.zip", "cityscapes", "ss")


# ----------------------------------------------------------------------------- unlabelled splits

def test_unlabelled_split_has_images_but_no_dataset(tmp_path):
    root = make_dataset(tmp_path / "ade", ADE_IDS, 150)
    assert load_card(root)["unlabelled_splits"] == ["test"]
    with pytest.raises(SegreproError) as err:
        SegmentationDataset(root, "test")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{root / 'splits' / 'test.txt'}: split 'test' has no labels")
    assert "segrepro submit" in message
    images = SplitImages(root, "test")
    image, image_id = images[0]
    assert (len(images), image_id, tuple(image.shape)) == (3, "ADE_test_00000001", (3, 23, 37))
    assert images.labelled is False and submit.default_split(images.card) == "test"


@pytest.mark.parametrize("value", ["test", ["val"], ["test", "test"], [1]])
def test_card_checks_unlabelled_splits(tmp_path, value):
    root = make_dataset(tmp_path / "ade", ADE_IDS, 150)
    card = yaml.safe_load((root / "dataset.yaml").read_text())
    (root / "dataset.yaml").write_text(yaml.safe_dump(dict(card, unlabelled_splits=value)))
    with pytest.raises(SegreproError,
                       match=r"dataset.yaml: key 'unlabelled_splits' must be a list of distinct split names"):
        load_card(root)


# ----------------------------------------------------------------------------- tables

SERVER = {"name": "MIT Scene Parsing Benchmark", "url": "http://sceneparsing.csail.mit.edu/",
          "format": "ade20k_sceneparsing"}
SPEC = {"title": "Table 2. ADE20K test", "metrics": ["score"], "rows": [
    {"label": "ours, ResNet101", "experiment": "r101", "protocol": "ms", "paper": {"score": 56.67},
     "test_server": SERVER},
    {"label": "ours, HRNet48", "experiment": "hr48", "protocol": "ms", "paper": {"score": 58.04},
     "test_server": SERVER},
]}
HEADER = {"dataset": "ade20k", "scale": "paper", "backbone": ["resnet101", "hrnet_w48"], "iterations": [151560],
          "seeds": [0], "commits": ["abc1234"]}


def test_test_server_rows_render_the_file_to_upload():
    results = {"r101@ms": [{"submission": "results/r101.zip", "stand_in": False}],
               "hr48@ms": [{"submission": "a.zip", "stand_in": False}, {"submission": "b.zip", "stand_in": False}]}
    text, frame, _ = build_table("table2", SPEC, results, HEADER)
    assert text.split("\n\n", 2)[2] == (
        "| Method | Score (%) paper | Score (%) reproduced | Score (%) Δ |\n"
        "|---|:---:|:---:|:---:|\n"
        "| ours, ResNet101 | 56.67 | test-server score: submit `results/r101.zip` to"
        " [MIT Scene Parsing Benchmark](http://sceneparsing.csail.mit.edu/) | – |\n"
        "| ours, HRNet48 | 58.04 | test-server score: submit `a.zip`, `b.zip` (one per seed) to"
        " [MIT Scene Parsing Benchmark](http://sceneparsing.csail.mit.edu/) | – |\n"
        "\n"
        "Every row of this table is a test-server score: the benchmark's test labels are not public, so the"
        " pipeline writes the file to upload (named in the reproduced column) and the score exists only once the server"
        " has evaluated it; there is no Δ and no claim to check.\n"
    )
    assert frame["submission"].tolist() == ["results/r101.zip", "a.zip; b.zip"]
    assert frame["score_paper"].tolist() == [56.67, 58.04] and frame["score_ours_mean"].isna().all()


def test_a_mixed_table_keeps_its_measured_rows_and_notes_the_stand_in():
    spec = {"title": "T", "metrics": ["score"], "rows": [
        {"label": "val", "experiment": "r101", "protocol": "ss", "paper": {"score": 50.0}},
        {"label": "test", "experiment": "r101", "protocol": "ms", "paper": {"score": 56.67}, "test_server": SERVER}]}
    results = {"r101@ss": [{"miou": 40.0, "pixel_acc": 80.0}],  # score = (80 + 40) / 2
               "r101@ms": [{"submission": "s.zip", "stand_in": True, "dataset": "synthetic", "split": "val"}]}
    text, _, _ = build_table("t", spec, results, HEADER)
    lines = text.splitlines()
    assert "| val | 50.00 | 60.00 | +10.00 |" in lines
    assert any(line.startswith("| test | 56.67 | test-server score: submit `s.zip`") for line in lines)
    assert "Rows whose cell names a file are test-server scores" in text
    assert "dataset 'synthetic' has no unlabelled test split: the zips hold predictions on its 'val' images" in text


def test_spec_rejects_claims_on_test_server_rows_and_bad_servers():
    with pytest.raises(SegreproError, match="claim 'x' refers to 'r101@ms', a test-server row"):
        check_table_spec("t", dict(SPEC, claims=[{"claim": "x", "metric": "score", "better": ["r101@ms"],
                                                  "than": ["hr48@ms"]}]))
    bad = json.loads(json.dumps(SPEC))
    bad["rows"][0]["test_server"]["format"] = "kitti"
    with pytest.raises(SegreproError, match="rows.0.test_server.format: 'kitti' is not one of"):
        check_table_spec("t", bad)
    with pytest.raises(SegreproError, match="test-server rows only go in a plain table"):
        check_table_spec("t", dict(SPEC, grid={"rows": ["a"], "columns": ["b", "c"]},
                                   rows=[dict(SPEC["rows"][0], cell=["a", "b"]),
                                         dict(SPEC["rows"][1], cell=["a", "c"])]))


def test_a_metrics_file_cannot_stand_for_a_submission():
    with pytest.raises(SegreproError, match="is a test-server row: it needs submissions, not metrics"):
        build_table("t", SPEC, {"r101@ms": [{"score": 1.0}], "hr48@ms": [{"score": 1.0}]}, HEADER)


# ----------------------------------------------------------------------------- end to end

def tiny_model(project: Path, experiment: str) -> Path:
    """model.pt of a tiny SaF run, as the trainer saves it (random weights: only shapes matter)."""
    from segrepro.config.params import load_params
    from segrepro.models.factory import build_model

    config = load_params(project).resolve("saf", experiment, "tiny", TINY, 0)
    path = project / "results/runs/tiny" / TINY / "saf" / experiment / "seed0/model.pt"
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    model = build_model(config["model"], 13, 255)
    torch.save({"model": model.state_dict(), "config": config, "config_hash": "-", "num_classes": 13,
                "ignore_index": 255, "class_names": [], "summary": {"iterations": 6, "git_commit": "abc1234"}}, path)
    return path


def test_cli_submits_and_the_table_names_the_zips(project, capsys):
    """`segrepro submit` on the tiny scale (the val images stand in), its MLflow tag, then
    `segrepro table table2` from the two zips."""
    import mlflow

    from segrepro.cli import main

    for experiment in ("I_resnet101", "I_hrnet48"):
        tiny_model(project, experiment)
        argv = ["submit", "--paper", "saf", "--experiment", experiment, "--scale", "tiny", "--seed", "0",
                "--server", "ade20k_sceneparsing", "--threads", "1"]
        assert main(argv) == 0, capsys.readouterr().err
    zips = [Path(f"results/submissions/tiny/{TINY}/saf/{e}/seed0_ms.zip") for e in ("I_resnet101", "I_hrnet48")]
    out = capsys.readouterr().out
    assert f"4 predictions of {TINY}/val (a stand-in: not a test-server split) -> {zips[1]}" in out
    for path in zips:
        pngs = members(path)
        assert sorted(pngs) == [f"val_0000{i}.png" for i in range(4)]
        assert all(v.shape == (48, 64) and 1 <= v.min() and v.max() <= 13 for v in pngs.values())

    run_id = (project / f"results/runs/tiny/{TINY}/saf/I_hrnet48/seed0/mlflow_run_id").read_text().strip()
    assert mlflow.MlflowClient().get_run(run_id).data.tags["submission_ms"] == str(zips[1])

    assert main(["table", "table2", "--scale", "tiny", "--seeds", "0"]) == 0, capsys.readouterr().err
    text = (project / "results/tables/table2.md").read_text()
    assert f"| ours, HRNet48 | 58.04 | test-server score: submit `{zips[1]}` to [MIT Scene Parsing Benchmark]" in text
    assert "Every row of this table is a test-server score" in text
    assert f"dataset '{TINY}' has no unlabelled test split" in text
    assert "- Commit: abc1234" in text


@pytest.mark.parametrize("scale, datasets, seeds", [("demo", {"synthetic"}, 3), ("paper", {"ade20k", "cityscapes"}, 1)])
def test_dry_run_plans_submissions_not_evaluations(project, scale, datasets, seeds):
    targets = ["results/tables/table2.md", "results/tables/hfgd_table14.md"]
    result = snakemake(project, *targets, "-n", "--cores", "1", "--config", f"scale={scale}")
    assert result.returncode == 0, result.stdout[-3000:]
    jobs = planned_jobs(result.stdout)
    submits = sorted((w["paper"], w["experiment"], w["protocol"], w["dataset"]) for rule, w in jobs if rule == "submit")
    # One submission per seed: the scale's default seeds (params/scales.yaml).
    assert [s[:3] for s in submits[::seeds]] == [("hfgd", "convnext_usfpn_cae_hfgm_os2", "ms"),
                                                  ("saf", "I_hrnet48", "ms"), ("saf", "I_resnet101", "ms")]
    assert len(submits) == 3 * seeds
    assert {s[3] for s in submits} == datasets
    assert not [rule for rule, _ in jobs if rule == "evaluate"]
    assert sum(rule == "table" for rule, _ in jobs) == 2
