"""`kind: folder`: a folder of one's own images and label maps, declared in params/datasets.yaml,
prepared into the uniform layout (segrepro.data.folder) in the layouts a user brings: grey PNG
images with 0/255 masks, JPEG images with palette labels and list files, RGB-coded labels with a
folder per split, 16-bit labels; the refusals of labels that would lie; and, through Snakemake,
training, a test-split table and reruns of the prepare step that never lose the dataset."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import copy_project, edit_yaml
from PIL import Image

from segrepro.core.errors import SegreproError
from segrepro.data.dataset import SegmentationDataset, load_card, read_label
from segrepro.data.folder import fraction_split
from segrepro.data.prepare import prepare_dataset

W, H = 40, 32
# The issue's declaration, as a user writes it (root filled in by each test).
MEMBRANE = {
    "kind": "folder",
    "images": {"dir": "train/image", "suffix": ".png"},
    "labels": {"dir": "train/label", "suffix": ".png"},
    "classes": ["membrane", "cell"],
    "values": {0: 0, 255: 1},
    "splits": {"fractions": {"train": 0.8, "val": 0.2}, "seed": 0},
}


def mask(index: int, high: int = 255, low: int = 0) -> np.ndarray:
    """A mask with a vertical band of `high` (about a third of the width) on `low`, moving with index."""
    label = np.full((H, W), low, np.uint8 if high < 256 else np.uint16)
    start = (3 * index) % (W - 14)
    label[:, start:start + 14] = high
    return label


def grey_image(index: int) -> np.ndarray:
    return ((np.arange(H * W).reshape(H, W) * 7 + 31 * index) % 256).astype(np.uint8)


def membrane_folder(root: Path, count: int = 10) -> Path:
    """The issue's microscopy layout: train/image/N.png (grey), train/label/N.png (0/255)."""
    for sub in ("train/image", "train/label"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(grey_image(i), "L").save(root / "train/image" / f"{i}.png")
        Image.fromarray(mask(i), "L").save(root / "train/label" / f"{i}.png")
    return root


def prepare(tmp_path: Path, declaration: dict, name: str = "membrane") -> Path:
    return prepare_dataset(name, declaration, tmp_path / "data" / name)


# ----------------------------------------------------------------------------- layouts

def test_the_issues_declaration_prepares_grey_images_and_0_255_masks(tmp_path):
    source = membrane_folder(tmp_path / "membrane")
    root = prepare(tmp_path, {**MEMBRANE, "root": str(source)})

    card = load_card(root)
    assert card["class_names"] == ["membrane", "cell"] and card["num_classes"] == 2
    assert card["splits"] == {"train": 8, "val": 2} and card["image_suffix"] == ".png"
    assert card["source"]["kind"] == "folder" and card["content_sha256"]
    # Disjoint splits covering every stem; the draw is the documented one.
    train = (root / "splits/train.txt").read_text().split()
    val = (root / "splits/val.txt").read_text().split()
    assert sorted(train + val) == sorted(str(i) for i in range(10))
    assert {"train": train, "val": val} == fraction_split([str(i) for i in range(10)], {"train": 0.8, "val": 0.2}, 0)
    # 0 -> class 0, 255 -> class 1, pixel for pixel; the image's bytes are copied unchanged.
    for stem in ("0", "7"):
        label = read_label(root / "labels" / f"{stem}.png")
        assert np.array_equal(label, (mask(int(stem)) == 255).astype(np.uint8))
        assert (root / "images" / f"{stem}.png").read_bytes() == (source / "train/image" / f"{stem}.png").read_bytes()
    image, label = SegmentationDataset(root, "val").load_pair(0)
    assert image.shape == (H, W, 3) and set(np.unique(label)) == {0, 1}
    assert source.joinpath("train/label/0.png").is_file()  # the user's folder is only read


def test_fraction_split_sizes_are_the_largest_remainder_rounding():
    stems = [f"s{i:02d}" for i in range(10)]
    # 7.5 and 2.5 round down to 7 and 2; the one left goes to the first name in sorted order.
    drawn = fraction_split(stems, {"val": 0.25, "train": 0.75}, seed=3)
    assert (len(drawn["train"]), len(drawn["val"])) == (8, 2)
    assert sorted(drawn["train"] + drawn["val"]) == stems
    assert drawn == fraction_split(stems, {"train": 0.75, "val": 0.25}, seed=3)  # declaration order does not matter
    assert drawn != fraction_split(stems, {"train": 0.75, "val": 0.25}, seed=4)


def test_jpeg_images_palette_labels_and_list_files(tmp_path):
    source = tmp_path / "voc_like"
    (source / "JPEGImages").mkdir(parents=True)
    (source / "SegmentationClass").mkdir()
    palette = [0, 0, 0, 128, 0, 0, 0, 128, 0, 255, 255, 255] + [0] * (256 * 3 - 12)
    for i in range(9):
        rgb = np.stack([grey_image(i), grey_image(i + 1), grey_image(i + 2)], axis=-1)
        Image.fromarray(rgb, "RGB").save(source / "JPEGImages" / f"img_{i}.jpg", quality=90)
        indices = np.zeros((H, W), np.uint8)
        indices[:, :12] = 1
        indices[:, 12:24] = 2
        indices[0, :] = 3  # a "don't care" border row, as VOC draws it (here: index 3)
        label = Image.fromarray(indices, "P")
        label.putpalette(palette)
        label.save(source / "SegmentationClass" / f"img_{i}.png")
    (source / "train.txt").write_text("".join(f"img_{i}\n" for i in range(5)))
    (source / "val.txt").write_text("img_5\nimg_6\n")
    (source / "test.txt").write_text("img_7\n\nimg_8\n")
    declaration = {
        "kind": "folder", "root": str(source),
        "images": {"dir": "JPEGImages", "suffix": ".jpg"},
        "labels": {"dir": "SegmentationClass", "suffix": ".png"},
        "classes": ["background", "road", "tree"], "ignore": [3],
        "splits": {"train": "train.txt", "val": "val.txt", "test": "test.txt"},
    }
    root = prepare(tmp_path, declaration, "voc_like")
    card = load_card(root)
    assert card["splits"] == {"train": 5, "val": 2, "test": 2} and card["image_suffix"] == ".jpg"
    label = read_label(root / "labels" / "img_7.png")
    assert (label[0] == 255).all() and (label[1:, :12] == 1).all() and (label[1:, 12:24] == 2).all()
    assert (label[1:, 24:] == 0).all()
    assert (root / "images/img_0.jpg").read_bytes() == (source / "JPEGImages/img_0.jpg").read_bytes()
    assert SegmentationDataset(root, "test").load_pair(1)[0].shape == (H, W, 3)

    # The same palette labels read by their colours instead of their indices.
    by_color = {**declaration, "colors": {"0,0,0": 0, "128,0,0": "road", "#008000": 2}, "ignore": ["255,255,255"]}
    colored = prepare(tmp_path, by_color, "voc_colors")
    for stem in ("img_0", "img_8"):
        assert np.array_equal(read_label(colored / "labels" / f"{stem}.png"),
                              read_label(root / "labels" / f"{stem}.png"))


def test_rgb_coded_labels_and_a_folder_per_split(tmp_path):
    source = tmp_path / "streets"
    colors = {0: (128, 64, 128), 1: (70, 70, 70)}
    for split, count in (("training", 4), ("validation", 2)):
        (source / split / "rgb").mkdir(parents=True)
        (source / split / "gt").mkdir(parents=True)
        for i in range(count):  # the same stems in both folders
            Image.fromarray(np.stack([grey_image(i)] * 3, -1), "RGB").save(source / split / "rgb" / f"{i}.png")
            label = np.zeros((H, W, 3), np.uint8)
            label[:] = colors[0]
            label[H // 2:] = colors[1]
            label[:, :2] = 0  # black: unlabelled
            Image.fromarray(label, "RGB").save(source / split / "gt" / f"{i}_gt.png")
    declaration = {
        "kind": "folder", "root": str(source),
        "images": {"dir": "{split}/rgb", "suffix": ".png"},
        "labels": {"dir": "{split}/gt", "suffix": "_gt.png"},
        "classes": ["road", "building"],
        "colors": {"128,64,128": "road", "70 70 70": "building"}, "ignore": ["#000000"],
        "splits": {"folders": {"train": "training", "val": "validation"}},
    }
    root = prepare(tmp_path, declaration, "streets")
    assert load_card(root)["splits"] == {"train": 4, "val": 2}
    assert (root / "splits/val.txt").read_text().split() == ["val_0", "val_1"]  # equal stems kept apart
    label = read_label(root / "labels/train_3.png")
    assert (label[:, :2] == 255).all() and (label[: H // 2, 2:] == 0).all() and (label[H // 2:, 2:] == 1).all()


def test_sixteen_bit_labels_with_reduce_zero_label(tmp_path):
    source = tmp_path / "deep"
    for sub in ("img", "ann"):
        (source / sub).mkdir(parents=True)
    for i in range(5):
        Image.fromarray(grey_image(i), "L").save(source / "img" / f"{i}.png")
        label = mask(i, high=2, low=1).astype(np.uint16)
        label[0, :] = 0  # reduce_zero_label: 0 is "other" -> ignore
        Image.fromarray(label.astype(np.uint16)).save(source / "ann" / f"{i}.png")
    assert Image.open(source / "ann" / "0.png").mode.startswith("I")
    declaration = {
        "kind": "folder", "root": str(source),
        "images": {"dir": "img", "suffix": ".png"}, "labels": {"dir": "ann", "suffix": ".png"},
        "classes": ["a", "b"], "reduce_zero_label": True,
        "splits": {"fractions": {"train": 0.6, "val": 0.4}, "seed": 1},
    }
    root = prepare(tmp_path, declaration, "deep")
    stem = (root / "splits/train.txt").read_text().split()[0]
    expected = mask(int(stem), high=2, low=1).astype(np.int16) - 1
    expected[0, :] = 255
    assert np.array_equal(read_label(root / "labels" / f"{stem}.png"), expected.astype(np.uint8))

    # 16-bit stored values mapped by `values`, beyond 8 bits.
    Image.fromarray(mask(0, high=2, low=1).astype(np.uint16) * 1000).save(source / "ann" / "0.png")
    for i in range(1, 5):
        Image.fromarray(mask(i, high=2, low=1).astype(np.uint16) * 1000).save(source / "ann" / f"{i}.png")
    by_values = {**declaration, "reduce_zero_label": False, "values": {1000: "a", 2000: "b"}}
    root = prepare(tmp_path, by_values, "deep_values")
    assert np.array_equal(read_label(root / "labels/0.png"), (mask(0) == 255).astype(np.uint8))


# ----------------------------------------------------------------------------- refusals

def test_an_unmapped_stored_value_is_refused_naming_file_and_value(tmp_path):
    source = membrane_folder(tmp_path / "membrane")
    with pytest.raises(SegreproError, match=r"train/label/\d\.png: stored value 255 is not mapped"):
        prepare(tmp_path, {**MEMBRANE, "root": str(source), "values": {0: 0, 1: 1}})
    assert not (tmp_path / "data" / "membrane").exists()


def test_a_class_without_a_training_pixel_is_refused(tmp_path):
    """The issue's silent 100 %: 255 read as ignore, so class 'cell' never appears."""
    source = membrane_folder(tmp_path / "membrane")
    declaration = {**MEMBRANE, "root": str(source), "values": {0: 0}, "ignore": [255], "max_ignore_share": 1.0}
    with pytest.raises(SegreproError, match=r"class 'cell' \(1\) has no pixel in split 'train'"):
        prepare(tmp_path, declaration)
    three = {**MEMBRANE, "root": str(source), "classes": ["membrane", "cell", "nucleus"]}
    with pytest.raises(SegreproError, match=r"class 'nucleus' \(2\) has no pixel in split 'train'"):
        prepare(tmp_path, three)


def test_a_split_mostly_ignored_is_refused_unless_declared(tmp_path):
    source = membrane_folder(tmp_path / "membrane")
    for i in range(10):  # 0 covers 65 % of each mask: as ignore, more than half
        Image.fromarray(mask(i), "L").save(source / "train/label" / f"{i}.png")
    declaration = {**MEMBRANE, "root": str(source), "classes": ["cell"], "values": {255: 0}, "ignore": [0]}
    with pytest.raises(SegreproError, match=r"split '(train|val)': ignore covers 6\d\.\d % of the labelled pixels, "
                                            r"more than max_ignore_share 0\.5"):
        prepare(tmp_path, declaration)
    root = prepare(tmp_path, {**declaration, "max_ignore_share": 0.7})
    assert load_card(root)["splits"] == {"train": 8, "val": 2}


def test_a_refused_rerun_leaves_the_prepared_dataset_as_it_was(tmp_path):
    source = membrane_folder(tmp_path / "membrane")
    root = prepare(tmp_path, {**MEMBRANE, "root": str(source)})
    before = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    with pytest.raises(SegreproError, match="has no pixel"):
        prepare(tmp_path, {**MEMBRANE, "root": str(source), "classes": ["membrane", "cell", "nucleus"]})
    assert {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    assert [p.name for p in root.parent.iterdir()] == ["membrane"]  # no temporary folder left


@pytest.mark.parametrize("change, culprit", [
    ({"values": {0: 0, 255: 1}, "colors": {"0,0,0": 0}}, "values and colors are exclusive"),
    ({"values": {0: 0, 255: 2}}, r"values\[255\] must be a class index 0..1 or a class name"),
    ({"splits": {"fractions": {"train": 0.8, "test": 0.2}}}, "has no 'val' split"),
    ({"splits": {"fractions": {"train": 0.8, "val": 0.3}}}, "must sum to 1"),
    ({"images": {"dir": "train/images", "suffix": ".png"}}, r"train/images: folder not found"),
    ({"labels": {"dir": "train/label", "suffix": ".tif"}}, r"image without a label"),
    ({"ignore": [255]}, "lists 255, which is also mapped to class 1"),
])
def test_bad_declarations_fail_in_one_line(tmp_path, change, culprit):
    source = membrane_folder(tmp_path / "membrane", count=4)
    with pytest.raises(SegreproError, match=culprit) as error:
        prepare(tmp_path, {**MEMBRANE, "root": str(source), **change})
    assert "\n" not in str(error.value)


def test_the_root_may_not_lie_inside_the_dataset_folder(tmp_path):
    source = membrane_folder(tmp_path / "data" / "membrane" / "originals")
    with pytest.raises(SegreproError, match="lies inside the prepared dataset's folder"):
        prepare(tmp_path, {**MEMBRANE, "root": str(source)})
    assert source.joinpath("train/image/0.png").is_file()


# ----------------------------------------------------------------------------- configuration

def test_the_declaration_validates_and_sources_may_name_a_folder_dataset(project, tmp_path):
    from segrepro.config.params import load_params
    from segrepro.core.errors import SegreproError as Error

    edit_yaml(project / "params/datasets.yaml", {"membrane": {**MEMBRANE, "root": "elsewhere"}})
    params = load_params(project, workflow={"scale": "tiny", "seeds": [0], "sources": {"membrane": str(tmp_path)}})
    assert params.dataset("membrane")["values"] == {0: 0, 255: 1}
    assert params.eval_split("pspnet_table1", "membrane") == "val"
    assert params.eval_split("pspnet_table1", "camvid") == "test"  # CamVid's literature reports test
    assert params.eval_split("pspnet_table1", "camvid", "val") == "val"  # --config split=val
    edit_yaml(project / "params/datasets.yaml", {"membrane": {"labels": {"folder": "x"}}})
    with pytest.raises(Error, match="membrane: labels: Additional properties"):
        load_params(project)


def test_the_cli_prepares_from_a_source_folder(project, segrepro, tmp_path):
    source = membrane_folder(tmp_path / "membrane")
    edit_yaml(project / "params/datasets.yaml", {"membrane": MEMBRANE})
    done = segrepro("prepare", "membrane")
    assert done.returncode == 1 and "no folder to read: declare `root:`" in done.stderr
    done = segrepro("prepare", "membrane", "--source", source)
    assert done.returncode == 0, done.stderr
    assert load_card(project / "data/membrane")["splits"] == {"train": 8, "val": 2}


# ----------------------------------------------------------------------------- the workflow

@pytest.mark.slow
def test_a_folder_dataset_through_the_workflow_with_a_test_split_and_prepare_reruns(tmp_path, mlflow_store_template):
    """Prepared and trained through Snakemake at the tiny scale; a table on its test split; a rerun
    of the prepare step after a code change rebuilds it, and a failing one keeps it."""
    from test_workflow import project_env, snakemake

    source = tmp_path / "cells"
    for split, count in (("train", 8), ("val", 2), ("test", 2)):
        (source / split / "image").mkdir(parents=True)
        (source / split / "label").mkdir(parents=True)
        for i in range(count):  # grey JPEG images, 0/255 masks, a folder per split
            Image.fromarray(grey_image(i), "L").save(source / split / "image" / f"{i}.jpg", quality=95)
            Image.fromarray(mask(i), "L").save(source / split / "label" / f"{i}.png")
    root = tmp_path / "project"
    copy_project(root)
    shutil.copy2(mlflow_store_template, tmp_path / "mlflow.db")
    edit_yaml(root / "params/datasets.yaml", {"cells": {
        **MEMBRANE, "images": {"dir": "{split}/image", "suffix": ".jpg"},
        "labels": {"dir": "{split}/label", "suffix": ".png"},
        "splits": {"folders": ["train", "val", "test"]}, "eval_split": "test"}})
    env = project_env(tmp_path / "mlflow.db")
    config = ("--config", "scale=tiny", "dataset=cells", f"sources={{cells: {source}}}")
    table = "results/tables/hfgd_table10.md"
    built = snakemake(root, table, "--cores", "2", *config, env=env)
    assert built.returncode == 0, built.stdout[-5000:]

    card = root / "data/cells/dataset.yaml"
    assert load_card(card.parent)["splits"] == {"train": 8, "val": 2, "test": 2}
    metrics = sorted(p.name for p in (root / "results/metrics/tiny/cells/hfgd").rglob("*.json"))
    assert metrics == ["ms.test.json", "ss.test.json"]  # the test split, named as such; no val file
    text = (root / table).read_text()
    assert "- Dataset: cells, split test" in text.splitlines()
    scored = yaml.safe_load((next((root / "results/metrics").rglob("ss.test.json"))).read_text())
    assert scored["split"] == "test" and scored["num_images"] == 2 and scored["classes_without_pixels"] == []

    # A code change of the prepare step reruns it: the dataset is rebuilt, never lost.
    folder_code = root / "src/segrepro/data/folder.py"
    folder_code.write_text(folder_code.read_text() + "\n# a change\n")
    dry = snakemake(root, str(card.relative_to(root)), "-n", "--cores", "1", *config, env=env)
    assert "rule prepare_dataset:" in dry.stdout, dry.stdout[-3000:]
    rerun = snakemake(root, str(card.relative_to(root)), "--cores", "1", *config, env=env)
    assert rerun.returncode == 0, rerun.stdout[-5000:]
    assert load_card(card.parent)["splits"] == {"train": 8, "val": 2, "test": 2}

    # A rerun that fails (a declared class with no pixel) ends with the previous dataset in place.
    kept = card.read_bytes()
    edit_yaml(root / "params/datasets.yaml", {"cells": {"classes": ["membrane", "cell", "nucleus"]}})
    failed = snakemake(root, str(card.relative_to(root)), "--cores", "1", *config, env=env)
    assert failed.returncode != 0
    assert "class 'nucleus' (2) has no pixel in split 'train'" in (root / "logs/prepare/cells.log").read_text()
    assert card.read_bytes() == kept and load_card(card.parent)["num_classes"] == 2
