"""Subset datasets: fixed-seed disjoint splits drawn from a prepared dataset's split, no image copies."""

from pathlib import Path

import pytest
import torch
import yaml

from segrepro.core.errors import SegreproError
from segrepro.data.dataset import SegmentationDataset, load_card
from segrepro.data.prepare import content_fingerprint, prepare_dataset
from segrepro.data.synthetic import generate_dataset

SOURCE = "src-ds"


def subset(**changes) -> dict:
    declaration = {"kind": "subset", "source": SOURCE, "from_split": "train",
                   "sizes": {"train": 12, "val": 4}, "seed": 0}
    return {**declaration, **changes}


def split_ids(root: Path, split: str) -> list[str]:
    return (root / "splits" / f"{split}.txt").read_text().split()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """data/ with a prepared synthetic source of 16 train and 3 val images. Read-only."""
    data = tmp_path_factory.mktemp("data")
    generate_dataset(data / SOURCE, SOURCE, seed=3, width=32, height=24, train=16, val=3)
    card = load_card(data / SOURCE)
    card["content_sha256"] = content_fingerprint(data / SOURCE)  # as `segrepro prepare` leaves it
    (data / SOURCE / "dataset.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    return data


def test_splits_disjoint_sized_and_from_the_source(data):
    root = prepare_dataset("sub", subset(), data / "sub")
    train, val = split_ids(root, "train"), split_ids(root, "val")
    assert len(train) == 12 and len(val) == 4
    assert not set(train) & set(val)
    assert set(train) | set(val) <= set(split_ids(data / SOURCE, "train"))
    assert train == sorted(train) and val == sorted(val)  # documented: each list written sorted
    assert sorted((root / "splits").iterdir()) == [root / "splits" / "train.txt", root / "splits" / "val.txt"]
    assert not (root / "images").exists() and not (root / "labels").exists()  # no copied bytes

    card = load_card(root)
    source_card = load_card(data / SOURCE)
    for key in ("num_classes", "ignore_index", "class_names", "image_suffix", "label_suffix"):
        assert card[key] == source_card[key]
    assert card["name"] == "sub" and card["splits"] == {"train": 12, "val": 4}
    assert card["data_root"] == f"../{SOURCE}"
    assert card["source"]["name"] == SOURCE and card["source"]["from_split"] == "train"
    assert card["source"]["seed"] == 0
    assert card["source"]["content_sha256"] == source_card["content_sha256"]
    assert len(card["content_sha256"]) == 64


def test_deterministic_by_seed(data):
    a = prepare_dataset("a", subset(), data / "a")
    b = prepare_dataset("b", subset(), data / "b")
    c = prepare_dataset("c", subset(seed=1), data / "c")
    for split in ("train", "val"):
        assert split_ids(a, split) == split_ids(b, split)
    assert split_ids(a, "val") != split_ids(c, "val")
    card_a, card_b, card_c = load_card(a), load_card(b), load_card(c)
    assert card_a["content_sha256"] == card_b["content_sha256"]  # the name is not content
    assert card_a["content_sha256"] != card_c["content_sha256"]
    # Re-preparing in place replaces the folder with identical content.
    prepare_dataset("a", subset(), a)
    assert load_card(a) == card_a


def test_size_order_does_not_matter(data):
    a = prepare_dataset("ord1", subset(sizes={"train": 12, "val": 4}), data / "ord1")
    b = prepare_dataset("ord2", subset(sizes={"val": 4, "train": 12}), data / "ord2")
    assert split_ids(a, "train") == split_ids(b, "train") and split_ids(a, "val") == split_ids(b, "val")


def test_fingerprint_follows_the_source(tmp_path, data):
    """Same lists, different source content (card fingerprint) -> different subset fingerprint."""
    other = tmp_path / SOURCE
    generate_dataset(other, SOURCE, seed=4, width=32, height=24, train=16, val=3)
    card = load_card(other)
    card["content_sha256"] = content_fingerprint(other)
    (other / "dataset.yaml").write_text(yaml.safe_dump(card))
    mine = prepare_dataset("sub", subset(), tmp_path / "sub")
    theirs = prepare_dataset("sub", subset(), data / "sub-fp")
    assert split_ids(mine, "train") == split_ids(theirs, "train")
    assert load_card(mine)["content_sha256"] != load_card(theirs)["content_sha256"]


def test_readable_through_the_reader(data):
    root = prepare_dataset("read", subset(), data / "read")
    full = SegmentationDataset(data / SOURCE, "train")
    for split, size in (("train", 12), ("val", 4)):
        ds = SegmentationDataset(root, split)
        assert len(ds) == size
        for index, image_id in enumerate(ds.ids):
            x, y, got_id = ds[index]
            fx, fy, _ = full[full.ids.index(image_id)]
            assert got_id == image_id and torch.equal(x, fx) and torch.equal(y, fy)
            assert ds.image_path(image_id) == data / SOURCE / "images" / f"{image_id}.png"


def test_subset_of_a_subset(data):
    """A chained subset points straight at the folder holding the images."""
    prepare_dataset("mid", subset(), data / "mid")
    root = prepare_dataset("leaf", subset(source="mid", sizes={"small": 5}, seed=2), data / "leaf")
    assert load_card(root)["data_root"] == f"../{SOURCE}"
    assert set(split_ids(root, "small")) <= set(split_ids(data / "mid", "train"))
    assert len(SegmentationDataset(root, "small")) == 5


def test_bad_data_root_in_card(data):
    root = prepare_dataset("dr", subset(), data / "dr")
    card = load_card(root)
    (root / "dataset.yaml").write_text(yaml.safe_dump({**card, "data_root": "/abs/path"}))
    with pytest.raises(SegreproError, match="data_root"):
        load_card(root)
    (root / "dataset.yaml").write_text(yaml.safe_dump({**card, "data_root": "../nowhere"}))
    with pytest.raises(SegreproError, match="nowhere.*missing"):
        SegmentationDataset(root, "train")


def one_line_error(data, declaration, pattern, name="sub-err"):
    with pytest.raises(SegreproError, match=pattern) as info:
        prepare_dataset(name, declaration, data / name)
    assert "\n" not in str(info.value)
    assert not (data / name).exists()
    return str(info.value)


def test_errors(data):
    message = one_line_error(data, subset(source="ade-missing"), "source dataset 'ade-missing' is not prepared")
    assert "sub-err" in message
    one_line_error(data, subset(from_split="test"), "has no split 'test'.*train, val")
    one_line_error(data, subset(sizes={"train": 13, "val": 4}), r"sizes sum to 17.*16 images.*'train'")
    one_line_error(data, subset(sizes={"train": 1, "val/x": 1}), "'val/x'.*simple identifier")
    one_line_error(data, subset(sizes={"train": 1, "../val": 1}), "simple identifier")
    one_line_error(data, subset(from_split="../train"), "from_split.*simple identifier")
    one_line_error(data, subset(sizes={"train": 0}), "sizes.train.*positive")
    one_line_error(data, subset(seed=-1), "seed")
    one_line_error(data, subset(source="../x"), "source")
    one_line_error(data, subset(source="sub-err"), "itself")
    decl = subset()
    del decl["sizes"]
    one_line_error(data, decl, "'sizes' is missing")


def test_source_without_fingerprint(tmp_path):
    generate_dataset(tmp_path / SOURCE, SOURCE, seed=3, width=32, height=24, train=4, val=1)
    with pytest.raises(SegreproError, match="content_sha256"):
        prepare_dataset("sub", subset(sizes={"train": 2}), tmp_path / "sub")


def test_duplicate_ids_in_source(tmp_path, data):
    import shutil

    shutil.copytree(data / SOURCE, tmp_path / SOURCE)
    path = tmp_path / SOURCE / "splits" / "train.txt"
    path.write_text(path.read_text() + "train_00000\n")
    with pytest.raises(SegreproError, match="train_00000.*more than once"):
        prepare_dataset("sub", subset(sizes={"train": 2}), tmp_path / "sub")
