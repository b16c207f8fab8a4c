"""segrepro.data.convert on miniature copies of every real dataset's archives (tests/miniature.py):
the uniform layout it writes is read back by segrepro.data.dataset, the hand-computed labels
come out, and every problem with the source is one SegreproError line naming the file."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from miniature import blocks, build
from PIL import Image

from segrepro.core.errors import SegreproError
from segrepro.data.convert import convert
from segrepro.data.dataset import CARD_NAME, SegmentationDataset, load_card

CASES = {  # case -> (kind, build options, declaration options)
    "ade20k": ("ade20k", {}, {}),
    "ade20k-no-test": ("ade20k", {"with_test": False}, {}),
    "cocostuff164k": ("cocostuff164k", {}, {}),
    "cocostuff10k": ("cocostuff10k", {}, {}),
    "pascal_context59": ("pascal_context", {"classes": 59}, {"classes": 59}),
    "pascal_context60": ("pascal_context", {"classes": 60}, {"classes": 60}),
    "cityscapes": ("cityscapes", {}, {}),
    "camvid": ("camvid", {}, {}),
    "camvid-local": ("camvid", {"with_sha256sums": True}, {}),
}
UNLABELLED = {"ade20k": ["test"], "cityscapes": ["test"]}


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _convert(kind, parts, out, copy_images=False, **declaration):
    card = convert(kind, "mini", {"kind": kind, **declaration}, parts, out, copy_images=copy_images)
    (out / CARD_NAME).write_text(yaml.safe_dump(card, sort_keys=False))
    return card


def _fails(kind, parts, out, culprit, **declaration) -> str:
    with pytest.raises(SegreproError) as info:
        convert(kind, "mini", {"kind": kind, **declaration}, parts, out)
    message = str(info.value)
    assert "\n" not in message
    assert str(culprit) in message, message
    return message


@pytest.mark.parametrize("case", sorted(CASES))
def test_convert_reads_back(case, tmp_path):
    kind, build_options, declaration = CASES[case]
    parts, expected = build(kind, tmp_path / "src", **build_options)
    before = _snapshot(tmp_path / "src")
    out = tmp_path / "out"
    card = _convert(kind, parts, out, **declaration)

    card = load_card(out)
    assert card["num_classes"] == expected["num_classes"] == len(card["class_names"])
    assert card["ignore_index"] == 255 and card["label_suffix"] == ".png"
    assert card["splits"] == expected["splits"]
    assert card["source"]["kind"] == kind and card["source"]["conversion"]
    unlabelled = UNLABELLED.get(kind, []) if "test" in expected["splits"] else []
    assert card.get("unlabelled_splits", []) == unlabelled

    found = {}
    for split, count in expected["splits"].items():
        ids = (out / "splits" / f"{split}.txt").read_text().split()
        assert len(ids) == count and ids == sorted(ids)
        for image_id in ids:
            image = out / "images" / f"{image_id}{card['image_suffix']}"
            # moved byte for byte, never re-encoded
            assert hashlib.sha256(image.read_bytes()).hexdigest() in before.values()
        if split in unlabelled:
            assert not any((out / "labels" / f"{i}.png").exists() for i in ids)
            continue
        dataset = SegmentationDataset(out, split)
        assert dataset.num_classes == expected["num_classes"]
        for index in range(len(dataset)):
            _, label = dataset.load_pair(index)
            assert label.shape == (16, 20)
            with Image.open(dataset.label_path(dataset.ids[index])) as im:
                assert im.mode == "L"
            found[dataset.ids[index]] = label
    assert set(expected["labels"]) <= set(found)
    for image_id, label in expected["labels"].items():
        np.testing.assert_array_equal(found[image_id], label, err_msg=image_id)


def test_copy_images_leaves_the_source_untouched(tmp_path):
    parts, _ = build("camvid", tmp_path / "src")
    before = _snapshot(tmp_path / "src")
    card = _convert("camvid", parts, tmp_path / "out", copy_images=True)
    assert _snapshot(tmp_path / "src") == before
    assert card["splits"] == {"train": 3, "val": 1, "test": 1}


def test_class_names(tmp_path):
    names = {}
    for case in ("ade20k", "cocostuff164k", "pascal_context59", "pascal_context60", "cityscapes", "camvid"):
        kind, build_options, declaration = CASES[case]
        parts, _ = build(kind, tmp_path / case, **build_options)
        names[case] = convert(kind, case, {"kind": kind, **declaration}, parts, tmp_path / f"{case}-out")["class_names"]
    assert names["ade20k"][:3] == ["wall", "building", "sky"] and names["ade20k"][-1] == "flag"
    assert names["cocostuff164k"][0] == "person" and names["cocostuff164k"][-1] == "wood"
    assert names["pascal_context60"][:3] == ["background", "aeroplane", "bag"]
    assert names["pascal_context60"][37] == "person" and names["pascal_context60"][59] == "wood"
    assert names["pascal_context59"] == names["pascal_context60"][1:]
    assert names["cityscapes"][0] == "road" and names["cityscapes"][-1] == "bicycle"
    assert names["camvid"][0] == "Sky" and names["camvid"][-1] == "Bicyclist"


def test_cocostuff10k_records_its_val_split(tmp_path):
    parts, _ = build("cocostuff10k", tmp_path / "src")
    card = _convert("cocostuff10k", parts, tmp_path / "out")
    assert "imageLists/test.txt" in card["source"]["splits"]


# ----------------------------------------------------------------------------- errors

def test_unknown_kind_and_parts(tmp_path):
    with pytest.raises(SegreproError, match="known: ade20k, camvid, cityscapes") as info:
        convert("kitti", "mini", {}, {}, tmp_path / "out")
    assert "\n" not in str(info.value)
    parts, _ = build("cocostuff164k", tmp_path / "src")
    del parts["labels"]
    _fails("cocostuff164k", parts, tmp_path / "out", "part 'labels' is missing")
    parts, _ = build("pascal_context", tmp_path / "pc")
    _fails("pascal_context", parts, tmp_path / "out", "'classes' must be 59 or 60", classes=21)


@pytest.mark.parametrize("kind, label, values", [
    ("ade20k", "main/ADEChallengeData2016/annotations/training/ADE_train_00000002.png", [1, 151, 2, 3]),
    ("ade20k", "main/ADEChallengeData2016/annotations/validation/ADE_val_00000002.png", [1, 255, 2, 3]),
    ("cocostuff164k", "labels/val2017/000000000139.png", [0, 11, 255, 5]),      # unused id 11
    ("cocostuff164k", "labels/train2017/000000000030.png", [0, 182, 255, 5]),
    ("cityscapes", "gtfine/gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelIds.png", [7, 34, 8, 0]),
    ("camvid", "main/valannot/0016E5_07959.png", [0, 12, 11, 3]),
])
def test_label_value_outside_the_source_set(kind, label, values, tmp_path):
    parts, _ = build(kind, tmp_path / "src")
    path = tmp_path / "src" / label
    Image.fromarray(blocks(values)).save(path)
    message = _fails(kind, parts, tmp_path / "out", path)
    assert f"label value {values[1]}" in message


def test_cocostuff10k_unused_id(tmp_path):
    from scipy.io import savemat

    parts, _ = build("cocostuff10k", tmp_path / "src")
    path = parts["main"] / "annotations" / "COCO_train2014_000000000113.mat"
    savemat(str(path), {"S": blocks([0, 12, 1, 2]).astype(np.uint16)})  # 1-based 12 = street sign
    assert "label value 12" in _fails("cocostuff10k", parts, tmp_path / "out", path)


def test_pascal_context_category_outside_the_60_set(tmp_path):
    import json

    parts, _ = build("pascal_context", tmp_path / "src")
    path = parts["annotations"] / "trainval_merged.json"
    data = json.loads(path.read_text())
    data["annos_segmentation"][0]["category_id"] = 1  # accordion: a Detail category, not in the 60-set
    path.write_text(json.dumps(data))
    message = _fails("pascal_context", parts, tmp_path / "out", "2008_000002.jpg", classes=59)
    assert "label value 1 " in message


def test_pascal_context_rle_decoding():
    from miniature import rle_encode

    from segrepro.data.convert import rle_decode

    rng = np.random.default_rng(0)
    for shape in [(1, 1), (3, 7), (40, 33), (200, 300)]:
        for density in (0.0, 0.03, 0.5, 1.0):
            mask = rng.random(shape) < density
            np.testing.assert_array_equal(rle_decode(rle_encode(mask)), mask)
    mask = np.zeros((100, 120), bool)
    mask[5:90, 3:110] = True  # long runs: multi-group values and negative deltas
    np.testing.assert_array_equal(rle_decode(rle_encode(mask)), mask)
    # strings written by pycocotools 2.0.8 mask.encode (counts [0, 2, 1, 2, 7]: the delta coding
    # stores 2 - 2 = 0 and 7 - 1 = 6)
    np.testing.assert_array_equal(rle_decode({"size": [3, 4], "counts": "02106"}),
                                  np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]], bool))
    mask = np.zeros((30, 40), bool)
    mask[2:25, 3:35] = True
    mask[10, :] = False
    counts = ("l28166JJ66JJ66JJ66JJ66JJ66JJ66JJ66JJ66JJ66JJ66JJ66JJ66JJ66JJ66JJ66JJ66JJ66JJ66JJ66JJ66JJ66"
              "JJ66JJ66JJ66JJ66JJ66JJ66JJ66JJ66JJ66JJ6j4")
    np.testing.assert_array_equal(rle_decode({"size": [30, 40], "counts": counts}), mask)


def test_image_without_label(tmp_path):
    parts, _ = build("ade20k", tmp_path / "src")
    root = parts["main"] / "ADEChallengeData2016"
    (root / "annotations" / "training" / "ADE_train_00000003.png").unlink()
    _fails("ade20k", parts, tmp_path / "out", root / "images" / "training" / "ADE_train_00000003.jpg")


def test_label_without_image(tmp_path):
    parts, _ = build("cityscapes", tmp_path / "src")
    (parts["images"] / "leftImg8bit" / "train" / "aachen" / "aachen_000001_000019_leftImg8bit.png").unlink()
    label = parts["gtfine"] / "gtFine" / "train" / "aachen" / "aachen_000001_000019_gtFine_labelIds.png"
    _fails("cityscapes", parts, tmp_path / "out", label)


def test_size_mismatch(tmp_path):
    parts, _ = build("cocostuff164k", tmp_path / "src")
    label = parts["labels"] / "val2017" / "000000000139.png"
    Image.fromarray(np.zeros((16, 21), np.uint8)).save(label)
    message = _fails("cocostuff164k", parts, tmp_path / "out", label)
    assert "000000000139.jpg" in message and "size mismatch" in message


def test_unreadable_image(tmp_path):
    parts, _ = build("camvid", tmp_path / "src")
    image = parts["main"] / "train" / "0001TP_006720.png"
    image.write_bytes(b"not a png")
    _fails("camvid", parts, tmp_path / "out", image)


def _manifest_sha256(root: Path) -> str:
    """`find . -type f | LC_ALL=C sort | xargs sha256sum | sha256sum`, written out independently."""
    paths = sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.relative_to(root).as_posix().encode())
    text = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  ./{p.relative_to(root).as_posix()}\n" for p in paths)
    return hashlib.sha256(text.encode()).hexdigest()


def test_camvid_manifest(tmp_path):
    parts, _ = build("camvid", tmp_path / "src")
    good = _manifest_sha256(parts["main"])
    card = _convert("camvid", parts, tmp_path / "out", copy_images=True, manifest_sha256=good)
    assert good in card["source"]["integrity"]
    _fails("camvid", parts, tmp_path / "out2", parts["main"], manifest_sha256="0" * 64)
    (parts["main"] / "trainannot" / "0001TP_006720.png").write_bytes(b"changed")
    _fails("camvid", parts, tmp_path / "out3", parts["main"], manifest_sha256=good)


def test_camvid_sha256sums(tmp_path):
    parts, _ = build("camvid", tmp_path / "src", with_sha256sums=True)
    image = parts["main"] / "val" / "0016E5_07959.png"
    image.write_bytes(image.read_bytes() + b"\0")
    # SHA256SUMS is checked instead of the (non-matching) manifest value
    message = _fails("camvid", parts, tmp_path / "out", image, manifest_sha256="0" * 64)
    assert "SHA256SUMS" in message
