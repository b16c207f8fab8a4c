"""The synthetic generator: determinism, layout, and the scene structure the papers rely on."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from segrepro.core.errors import SegreproError
from segrepro.data import synthetic
from segrepro.data.synthetic import (
    BOAT,
    BUOY,
    CAR,
    CLASS_NAMES,
    IGNORE_INDEX,
    ROAD,
    STUFF_CLASSES,
    WATER,
    generate_dataset,
    render_scene,
)

W, H = 80, 60


def tree_hashes(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen") / "synthetic"
    return generate_dataset(root, "synthetic-test", seed=0, width=W, height=H, train=12, val=4)


@pytest.fixture(scope="module")
def scenes():
    """A moderately sized set of scenes, rendered in memory."""
    return [render_scene(0, "train", i, W, H) for i in range(80)]


def test_layout_and_card(small_set):
    root = small_set
    card = yaml.safe_load((root / "dataset.yaml").read_text())
    assert card["name"] == "synthetic-test"
    assert card["num_classes"] == len(CLASS_NAMES) == 13
    assert card["class_names"] == list(CLASS_NAMES)
    assert card["ignore_index"] == 255
    assert card["image_suffix"] == ".png" and card["label_suffix"] == ".png"
    assert card["splits"] == {"train": 12, "val": 4}
    assert "seed 0" in card["source"]
    assert card["generator"]["seed"] == 0
    assert (card["generator"]["width"], card["generator"]["height"]) == (W, H)
    for split, count in (("train", 12), ("val", 4)):
        ids = (root / "splits" / f"{split}.txt").read_text().split()
        assert len(ids) == count == len(set(ids))
        for image_id in ids:
            with Image.open(root / "images" / f"{image_id}.png") as im:
                assert (im.mode, im.size) == ("RGB", (W, H))
            with Image.open(root / "labels" / f"{image_id}.png") as im:
                assert (im.mode, im.size) == ("L", (W, H))
    # Nothing left beside the root (no temp or old folders).
    assert [p.name for p in root.parent.iterdir()] == [root.name]


def test_generation_is_deterministic(tmp_path, small_set):
    again = generate_dataset(tmp_path / "again", "synthetic-test", seed=0, width=W, height=H,
                             train=12, val=4)
    first, second = tree_hashes(small_set), tree_hashes(again)
    card_a, card_b = first.pop("dataset.yaml"), second.pop("dataset.yaml")
    assert first == second and len(first) == 2 * 16 + 2
    assert card_a == card_b

    other = generate_dataset(tmp_path / "other", "synthetic-test", seed=1, width=W, height=H,
                             train=12, val=4)
    third = tree_hashes(other)
    for name in first:
        if name.startswith("images/"):
            assert third[name] != first[name]


def test_train_and_val_differ():
    a, _ = render_scene(0, "train", 0, W, H)
    b, _ = render_scene(0, "val", 0, W, H)
    assert not np.array_equal(a, b)


def test_existing_root_is_replaced(tmp_path):
    root = tmp_path / "ds"
    generate_dataset(root, "a", seed=0, width=W, height=H, train=3, val=1)
    generate_dataset(root, "b", seed=2, width=W, height=H, train=2, val=1)
    card = yaml.safe_load((root / "dataset.yaml").read_text())
    assert card["name"] == "b" and card["generator"]["seed"] == 2
    assert len(list((root / "images").iterdir())) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_interrupted_run_keeps_old_root_and_leaves_nothing(tmp_path, monkeypatch):
    root = tmp_path / "ds"
    generate_dataset(root, "old", seed=0, width=W, height=H, train=2, val=1)
    before = tree_hashes(root)
    calls = []

    def failing(*args):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return render_scene(*args)

    monkeypatch.setattr(synthetic, "render_scene", failing)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(root, "new", seed=1, width=W, height=H, train=5, val=1)
    assert tree_hashes(root) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]

    with pytest.raises(KeyboardInterrupt):
        calls.clear()
        generate_dataset(tmp_path / "fresh", "new", seed=1, width=W, height=H, train=5, val=1)
    assert not (tmp_path / "fresh").exists()


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(SegreproError, match="mine"):
        generate_dataset(root, "x", seed=0, width=W, height=H, train=1, val=1)
    assert (root / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("field, value", [("seed", -1), ("width", 8), ("height", 10),
                                          ("train", 0), ("val", 0), ("width", 64.0)])
def test_bad_arguments(tmp_path, field, value):
    args = dict(seed=0, width=W, height=H, train=1, val=1)
    args[field] = value
    with pytest.raises(SegreproError, match=field):
        generate_dataset(tmp_path / "ds", "x", **args)


def test_labels_in_range_with_some_ignore(scenes):
    ignore = 0
    for image, label in scenes:
        assert image.dtype == np.uint8 and image.shape == (H, W, 3)
        assert label.dtype == np.uint8 and label.shape == (H, W)
        values = np.unique(label)
        assert np.all((values < len(CLASS_NAMES)) | (values == IGNORE_INDEX))
        ignore += int((label == IGNORE_INDEX).sum())
    total = len(scenes) * H * W
    assert 0 < ignore < 0.02 * total


def test_every_class_appears(scenes):
    seen = set()
    for _, label in scenes:
        seen.update(int(v) for v in np.unique(label))
    assert set(range(len(CLASS_NAMES))) <= seen


def _below_stuff(label, cls):
    """Stuff classes found directly below pixels of `cls` (things and ignore are skipped)."""
    upper, lower = label[:-1], label[1:]
    under = lower[(upper == cls) & np.isin(lower, STUFF_CLASSES)]
    return set(int(v) for v in np.unique(under))


def _touches(label, a, b):
    """Whether a pixel of class a is 4-adjacent to a pixel of class b."""
    pairs = [(label[:-1], label[1:]), (label[:, :-1], label[:, 1:])]
    return any(((p == a) & (q == b)).any() or ((p == b) & (q == a)).any() for p, q in pairs)


def test_context_decides_car_boat_sign_buoy(scenes):
    counts = {CAR: 0, BOAT: 0, BUOY: 0}
    for _, label in scenes:
        assert _below_stuff(label, CAR) <= {ROAD}
        assert _below_stuff(label, BOAT) <= {WATER}
        assert _below_stuff(label, BUOY) <= {WATER}
        assert not _touches(label, CAR, WATER)
        assert not _touches(label, BOAT, ROAD)
        for cls in counts:
            counts[cls] += len(_below_stuff(label, cls))
    assert all(n > 5 for n in counts.values())


def _mean_colour(scenes, cls):
    pixels = np.concatenate([img[lab == cls] for img, lab in scenes]).astype(np.float64)
    return pixels.mean(axis=0)


def test_confusable_pairs_share_colour(scenes):
    """Colour alone must not separate car/boat or road/water: their means are close."""
    for a, b in ((CAR, BOAT), (ROAD, WATER)):
        assert np.abs(_mean_colour(scenes, a) - _mean_colour(scenes, b)).max() < 25
