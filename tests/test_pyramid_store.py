"""Stored ground-truth pyramids (SaF Sec. 3.1, App. B) and their statistics table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from segrepro.core.errors import SegreproError
from segrepro.data.synthetic import generate_dataset
from segrepro.engine import pyramid_store as store
from segrepro.models.saf.pyramid import pyramid_targets
from segrepro.reporting import pyramid_stats as statistics

STRIDES = (32, 16, 8, 4)
A, B, C, IGN = 0, 1, 2, 255


def make_dataset(root, labels: list[np.ndarray], extra_card: dict | None = None, split="val"):
    """A hand-made dataset in the uniform layout: classes a, b, c; one grey image per label."""
    for sub in ("images", "labels", "splits"):
        (root / sub).mkdir(parents=True)
    ids = []
    for i, label in enumerate(labels):
        image_id = f"{split}_{i:05d}"
        Image.fromarray(np.full((*label.shape, 3), 128, np.uint8)).save(root / "images" / f"{image_id}.png")
        Image.fromarray(label.astype(np.uint8)).save(root / "labels" / f"{image_id}.png")
        ids.append(image_id)
    (root / "splits" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    card = {"name": "hand", "num_classes": 3, "ignore_index": 255, "class_names": ["a", "b", "c"],
            "image_suffix": ".png", "label_suffix": ".png", "splits": {split: len(labels)},
            **(extra_card or {})}
    (root / "dataset.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    return root


def two_labels() -> list[np.ndarray]:
    """Label 1: all a. Label 2: left half b; right half c with one b pixel at (4, 20) and an
    ignore 2x2 block at rows/cols 28-29 (cells worked out by hand in test_stats_hand_computed)."""
    first = np.full((32, 32), A, np.uint8)
    second = np.full((32, 32), C, np.uint8)
    second[:, :16] = B
    second[4, 20] = B
    second[28:30, 28:30] = IGN
    return [first, second]


def siblings(path):
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}"))


# ----------------------------------------------------------------------------- geometry

def test_evaluation_size():
    assert store.evaluation_size(48, 64) == (48, 64)
    assert store.evaluation_size(48, 64, 128) == (96, 128)
    assert store.evaluation_size(100, 50, 64) == (64, 32)


def test_network_size_is_the_nearest_divisible_size():
    # Sec. 3.1: sides resized to the nearest multiple of the coarsest stride (halves round up).
    assert store.network_size(48, 64) == (64, 64)
    assert store.network_size(40, 50) == (32, 64)
    assert store.network_size(100, 50, 64, multiple=32) == (64, 32)
    assert store.network_size(341, 512, multiple=32) == (352, 512)


def test_evaluation_label_is_resized_nearest_to_the_divisible_size_not_padded():
    label = (np.arange(48 * 64, dtype=np.int64).reshape(48, 64) % 7).astype(np.uint8)  # 64 wide, 48 high
    out = store.evaluation_label(label, None)
    assert out.shape == (64, 64) and out.dtype == np.uint8
    assert np.array_equal(out, np.asarray(Image.fromarray(label).resize((64, 64), Image.NEAREST)))
    assert not (out == 255).any()  # no ignore padding

    out = store.evaluation_label(np.zeros((40, 50), np.uint8), None, multiple=32, ignore_index=200)
    assert out.shape == (32, 64) and (out == 0).all()

    exact = np.ones((32, 64), np.uint8)
    assert np.array_equal(store.evaluation_label(exact, None), exact)


def test_evaluation_label_resizes_nearest_to_base_size():
    label = np.array([[0, 1], [2, 3]], np.uint8)
    out = store.evaluation_label(label, base_size=4, multiple=8)  # 4 x 4, then 8 x 8 (Sec. 3.1)
    assert np.array_equal(out, np.repeat(np.repeat(label, 4, axis=0), 4, axis=1))

    # Downscaling by 2 keeps one of each pair of columns (PIL nearest samples pixel centres);
    # the 2 x 4 evaluation size becomes 4 x 4, so the rows are doubled.
    columns = np.tile(np.arange(8, dtype=np.uint8), (4, 1))
    out = store.evaluation_label(columns, base_size=4, multiple=4)
    assert out.shape == (4, 4)
    assert np.array_equal(out, [[1, 3, 5, 7]] * 4)


def test_evaluation_image_is_resized_bilinear_to_the_divisible_size():
    image = torch.rand(1, 3, 48, 64)
    out = store.evaluation_image(image, None)
    assert torch.equal(out, F.interpolate(image, size=(64, 64), mode="bilinear", align_corners=False))

    # The protocol's path: long side to base_size (24 x 32), then the nearest divisible (32 x 32).
    out = store.evaluation_image(image, base_size=32)
    resized = F.interpolate(image, size=(24, 32), mode="bilinear", align_corners=False)
    assert torch.equal(out, F.interpolate(resized, size=(32, 32), mode="bilinear", align_corners=False))


# ----------------------------------------------------------------------------- writing and reading

@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("synth") / "ds", "synth", seed=0, width=64,
                            height=48, train=1, val=3)


@pytest.mark.parametrize("base_size, size", [(None, (64, 64)), (32, (32, 32))])
def test_write_pyramids_matches_pyramid_targets(synthetic_root, tmp_path, base_size, size):
    out = tmp_path / "pyr" / "val"
    assert store.write_pyramids(synthetic_root, "val", out, base_size=base_size) == out
    ids = ["val_00000", "val_00001", "val_00002"]
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{i}.npz" for i in ids] + ["index.yaml"])
    assert siblings(out) == []  # no temporary folder left beside it

    index = store.read_index(out)
    assert index["ids"] == ids and index["strides"] == list(STRIDES)
    assert index["base_size"] == base_size and index["split"] == "val" and index["dataset"] == "synth"
    assert index["eval_sizes"]["val_00000"] == list(store.network_size(48, 64, base_size)) == list(size)

    for image_id in ids:
        raw = np.asarray(Image.open(synthetic_root / "labels" / f"{image_id}.png"))
        label = store.evaluation_label(raw, base_size)
        assert label.shape == size
        semantic, unity = pyramid_targets(torch.from_numpy(label.astype(np.int64))[None], list(STRIDES), 255)
        with np.load(out / f"{image_id}.npz") as data:
            assert sorted(data.files) == sorted([f"semantic_s{s}" for s in STRIDES] + [f"unity_s{s}" for s in STRIDES])
        pyramid = store.read_pyramid(out / f"{image_id}.npz")
        assert list(pyramid) == list(STRIDES)
        for level, stride in enumerate(STRIDES):
            sem, uni = pyramid[stride]
            assert sem.dtype == np.uint8 and uni.dtype == np.uint8
            assert sem.shape == uni.shape == (size[0] // stride, size[1] // stride)
            assert np.array_equal(sem, semantic[level][0].numpy())
            assert np.array_equal(uni, unity[level][0].numpy())


def test_write_pyramids_maps_other_ignore_index_to_255_and_replaces_old_output(tmp_path):
    label = np.full((32, 32), A, np.uint8)
    label[:16] = 7  # the dataset's ignore value
    root = make_dataset(tmp_path / "ds", [label], {"ignore_index": 7})
    out = tmp_path / "pyr"
    out.mkdir()
    (out / "stale.npz").write_bytes(b"old")
    store.write_pyramids(root, "val", out)
    assert not (out / "stale.npz").exists() and siblings(out) == []
    pyramid = store.read_pyramid(out / "val_00000.npz")
    sem16, uni16 = pyramid[16]
    assert np.array_equal(uni16, [[255, 255], [1, 1]]) and np.array_equal(sem16, [[255, 255], [0, 0]])
    assert pyramid[32][1][0, 0] == 255  # class + don't care (App. B case 3)


@pytest.mark.parametrize("damage", ["garbage", "bad_class"])
def test_corrupt_label_is_one_line_error_and_leaves_no_folder(tmp_path, damage):
    root = make_dataset(tmp_path / "ds", two_labels())
    bad = root / "labels" / "val_00001.png"
    if damage == "garbage":
        bad.write_bytes(b"\x89PNG\r\n not really")
    else:
        Image.fromarray(np.full((32, 32), 9, np.uint8)).save(bad)
    out = tmp_path / "pyr" / "val"
    with pytest.raises(SegreproError) as err:
        store.write_pyramids(root, "val", out)
    message = str(err.value)
    assert "val_00001" in message and "\n" not in message
    assert not out.exists() and siblings(out) == []


def test_bad_strides_are_refused(tmp_path):
    root = make_dataset(tmp_path / "ds", two_labels())
    for strides in ([], [16, 32], [32, 12]):
        with pytest.raises(SegreproError, match="strides"):
            store.write_pyramids(root, "val", tmp_path / "pyr", strides=strides)


def test_read_pyramid_errors_name_the_file(tmp_path):
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"not a zip")
    with pytest.raises(SegreproError, match="broken.npz"):
        store.read_pyramid(broken)
    with pytest.raises(SegreproError, match="absent.npz"):
        store.read_pyramid(tmp_path / "absent.npz")

    bare = tmp_path / "bare.npz"
    with open(bare, "wb") as handle:
        np.save(handle, np.zeros(3))
    with pytest.raises(SegreproError, match="bare.npz: not a pyramid .npz archive"):
        store.read_pyramid(bare)

    partial = tmp_path / "partial.npz"
    np.savez(partial, semantic_s8=np.zeros((4, 4), np.uint8), unity_s8=np.ones((4, 4), np.uint8),
             semantic_s4=np.zeros((8, 8), np.uint8))
    with pytest.raises(SegreproError, match=r"partial.npz: array unity_s4 is missing"):
        store.read_pyramid(partial)

    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, semantic_s4=np.zeros((8, 8), np.int64), unity_s4=np.ones((8, 8), np.uint8))
    with pytest.raises(SegreproError, match="wrong.npz: array semantic_s4 must be 2-D uint8"):
        store.read_pyramid(wrong)


# ----------------------------------------------------------------------------- statistics

def test_stats_hand_computed(tmp_path):
    root = make_dataset(tmp_path / "ds", two_labels(), {"stuff_classes": ["a", "b"], "content_sha256": "f" * 64})
    pyr = store.write_pyramids(root, "val", tmp_path / "pyr")
    out_md = tmp_path / "tables" / "pyramid_stats.md"
    statistics.write_pyramid_stats(store.pyramid_stats(pyr, root), out_md)

    stats = store.pyramid_stats(pyr, root)
    # Cells [unity, mix, ignore]: label 1 is one unity cell at every level; label 2 has a mix
    # s32 cell, s16 = {b, b, c+b pixel (mix), c+ignore}, and one mix + one ignore cell at s8, s4.
    assert stats["cells"].tolist() == [[1, 1, 0], [6, 1, 1], [30, 1, 1], [126, 1, 1]]
    # Pixels by coarsest unity level [s32, s16, s8, s4, never]:
    # a: all 1024 at s32; b: left half at s16, the lone b pixel sits in a mix s4 cell;
    # c: 6 unity s8 cells (384), 6 unity s4 cells (96), 15 + 12 pixels in the mix/ignore s4 cells.
    assert stats["pixels"].tolist() == [[1024, 0, 0, 0, 0], [0, 512, 0, 0, 1], [0, 0, 384, 96, 27]]

    text = out_md.read_text()
    assert text.startswith("# Ground-truth pyramid statistics\n\nHow to read:")
    assert "for hand, split val, 2 images, strides 32, 16, 8, 4." in text
    assert "| 1 | 32 | 2 | 50.0 | 50.0 | 0.0 |" in text
    assert "| 2 | 16 | 8 | 75.0 | 12.5 | 12.5 |" in text
    assert "| 4 | 4 | 128 | 98.4 | 0.8 | 0.8 |" in text
    assert "| Class | Kind | Pixels | s32 (%) | s16 (%) | s8 (%) | s4 (%) | never (%) | Median stride |" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and line.count("|") == 10]
    assert rows[1:] == [
        "| a | stuff | 1024 | 100.0 | 0.0 | 0.0 | 0.0 | 0.0 | 32 |",
        "| b | stuff | 513 | 0.0 | 99.8 | 0.0 | 0.0 | 0.2 | 16 |",
        "| c | thing | 507 | 0.0 | 0.0 | 75.7 | 18.9 | 5.3 | 8 |",
        "| **all stuff** | stuff | 1537 | 66.6 | 33.3 | 0.0 | 0.0 | 0.1 | 32 |",
        "| **all thing** | thing | 507 | 0.0 | 0.0 | 75.7 | 18.9 | 5.3 | 8 |",
        "| **all classes** |  | 2044 | 50.1 | 25.0 | 18.8 | 4.7 | 1.4 | 32 |",
    ]

    frame = pd.read_csv(out_md.with_suffix(".csv"), dtype={"median_stride": str})
    levels = frame[frame["table"] == "levels"]
    assert levels["stride"].tolist() == [32, 16, 8, 4]
    assert levels["unity_pct"].tolist() == pytest.approx([50.0, 75.0, 93.75, 98.4375])
    c = frame[frame["name"] == "c"].iloc[0]
    assert c["count"] == 507 and c["s8_pct"] == pytest.approx(100 * 384 / 507)
    assert c["never_pct"] == pytest.approx(100 * 27 / 507) and str(c["median_stride"]) == "8"


def test_stats_count_cells_of_the_resized_label_and_sort_without_kinds(tmp_path):
    # 24 x 32, all a: resized to 32 x 32 (Sec. 3.1), so every cell is a unity cell of a.
    # A second 32 x 32 label: all b except one c pixel.
    second = np.full((32, 32), B, np.uint8)
    second[0, 0] = C
    root = make_dataset(tmp_path / "ds", [np.full((24, 32), A, np.uint8), second])
    pyr = store.write_pyramids(root, "val", tmp_path / "pyr")
    stats = store.pyramid_stats(pyr, root)
    assert stats["cells"].tolist() == [[1, 1, 0], [7, 1, 0], [31, 1, 0], [127, 1, 0]]
    # a: all 1024 pixels at s32; b: s16 cells 3 x 256, s8 3 x 64, s4 3 x 16, 15 in the mixed
    # s4 cell; c: the one pixel, never.
    assert stats["pixels"].tolist() == [[1024, 0, 0, 0, 0], [0, 768, 192, 48, 15], [0, 0, 0, 0, 1]]

    out_md = tmp_path / "stats.md"
    statistics.write_pyramid_stats(store.pyramid_stats(pyr, root), out_md)
    text = out_md.read_text()
    assert "| Class | Pixels | s32 (%)" in text and "Kind" not in text
    names = [line.split(" | ")[0][2:] for line in text.split("## (b)")[1].splitlines()[4:]]
    assert names == ["a", "b", "c", "**all classes**"]
    assert "| c | 1 | 0.0 | 0.0 | 0.0 | 0.0 | 100.0 | never |" in text


def test_stats_refuse_pyramids_of_other_data(tmp_path):
    root = make_dataset(tmp_path / "ds", two_labels(), {"content_sha256": "a" * 64})
    pyr = store.write_pyramids(root, "val", tmp_path / "pyr")
    card = yaml.safe_load((root / "dataset.yaml").read_text())
    card["content_sha256"] = "b" * 64
    (root / "dataset.yaml").write_text(yaml.safe_dump(card))
    with pytest.raises(SegreproError, match="other data"):
        statistics.write_pyramid_stats(store.pyramid_stats(pyr, root), tmp_path / "stats.md")
    assert not (tmp_path / "stats.md").exists()


def test_stats_on_synthetic_mark_stuff_and_things(synthetic_root, tmp_path):
    pyr = store.write_pyramids(synthetic_root, "val", tmp_path / "pyr")
    out_md = tmp_path / "stats.md"
    statistics.write_pyramid_stats(store.pyramid_stats(pyr, synthetic_root), out_md)
    frame = pd.read_csv(out_md.with_suffix(".csv"))
    classes = frame[frame["table"] == "classes"]
    assert {"all stuff", "all thing", "all classes"} <= set(classes["name"])
    assert set(classes[classes["name"] == "sky"]["kind"]) == {"stuff"}
    assert set(classes[classes["name"] == "car"]["kind"]) == {"thing"}
    total = classes[classes["name"] == "all classes"].iloc[0]
    shares = [total[f"{c}_pct"] for c in ("s32", "s16", "s8", "s4", "never")]
    assert sum(shares) == pytest.approx(100.0)
    assert "| **all stuff** | stuff |" in out_md.read_text()
