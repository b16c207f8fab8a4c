"""The dataset reader, its input checks, the training augmentation and the resumable sampler."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from segrepro.config.params import load_params
from segrepro.core.errors import SegreproError
from segrepro.data.dataset import (
    BLUR_KERNEL,
    IMAGENET_MEAN,
    IMAGENET_STD,
    IterationBatchSampler,
    SegmentationDataset,
    TrainAugment,
    blur_window,
    load_card,
    make_train_loader,
)
from segrepro.data.synthetic import generate_dataset


def write_dataset(root: Path, pairs: dict, num_classes: int = 12, split: str = "train") -> Path:
    """A hand-made dataset: pairs maps id -> (image uint8 HxWx3, label uint8 HxW)."""
    for sub in ("images", "labels", "splits"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for image_id, (image, label) in pairs.items():
        Image.fromarray(image).save(root / "images" / f"{image_id}.png")
        Image.fromarray(label).save(root / "labels" / f"{image_id}.png")
    (root / "splits" / f"{split}.txt").write_text("".join(f"{i}\n" for i in pairs))
    card = {"name": "hand", "num_classes": num_classes, "ignore_index": 255,
            "class_names": [f"c{i}" for i in range(num_classes)], "image_suffix": ".png",
            "label_suffix": ".png", "splits": {split: len(pairs)}, "source": "test"}
    (root / "dataset.yaml").write_text(yaml.safe_dump(card))
    return root


def ramp_pair(h=4, w=6):
    image = np.arange(h * w * 3, dtype=np.uint8).reshape(h, w, 3)
    label = (np.arange(h * w, dtype=np.uint8) % 12).reshape(h, w)
    label[0, 0] = 255
    return image, label


# ----------------------------------------------------------------------------- reading

def test_exact_tensors(tmp_path):
    image, label = ramp_pair()
    root = write_dataset(tmp_path / "ds", {"a": (image, label)})
    ds = SegmentationDataset(root, "train")
    assert len(ds) == 1 and ds.ids == ["a"]
    assert ds.num_classes == 12 and ds.ignore_index == 255 and ds.class_names[3] == "c3"
    assert ds.card["name"] == "hand"
    x, y, image_id = ds[0]
    expected = (image.astype(np.float32) - IMAGENET_MEAN) / IMAGENET_STD
    assert x.dtype == torch.float32 and x.shape == (3, 4, 6)
    assert torch.equal(x, torch.from_numpy(expected.transpose(2, 0, 1).copy()))
    assert y.dtype == torch.int64 and torch.equal(y, torch.from_numpy(label.astype(np.int64)))
    assert image_id == "a"


def test_load_card_errors(tmp_path):
    with pytest.raises(SegreproError, match="dataset.yaml"):
        load_card(tmp_path)
    (tmp_path / "dataset.yaml").write_text("name: [unclosed\n")
    with pytest.raises(SegreproError, match="dataset.yaml") as err:
        load_card(tmp_path)
    assert "\n" not in str(err.value)
    (tmp_path / "dataset.yaml").write_text("name: x\nnum_classes: 3\n")
    with pytest.raises(SegreproError, match="dataset.yaml.*ignore_index"):
        load_card(tmp_path)


def test_missing_split_file_and_empty_split(tmp_path):
    root = write_dataset(tmp_path / "ds", {"a": ramp_pair()})
    with pytest.raises(SegreproError, match=r"splits/val\.txt"):
        SegmentationDataset(root, "val")
    (root / "splits" / "train.txt").write_text("\n  \n")
    with pytest.raises(SegreproError, match=r"splits/train\.txt"):
        SegmentationDataset(root, "train")


@pytest.mark.parametrize("folder", ["images", "labels"])
def test_missing_listed_file(tmp_path, folder):
    root = write_dataset(tmp_path / "ds", {"a": ramp_pair(), "b": ramp_pair()})
    (root / folder / "b.png").unlink()
    with pytest.raises(SegreproError, match=rf"{folder}/b\.png"):
        SegmentationDataset(root, "train")


@pytest.mark.parametrize("folder", ["images", "labels"])
def test_corrupt_png(tmp_path, folder):
    root = write_dataset(tmp_path / "ds", {"a": ramp_pair()})
    path = root / folder / "a.png"
    path.write_bytes(path.read_bytes()[:40] + b"garbage" * 5)
    ds = SegmentationDataset(root, "train")  # existence is all the constructor checks
    with pytest.raises(SegreproError, match=rf"{folder}/a\.png") as err:
        ds[0]
    assert "\n" not in str(err.value)


def test_label_value_out_of_range(tmp_path):
    image, label = ramp_pair()
    label[2, 3] = 20
    root = write_dataset(tmp_path / "ds", {"a": (image, label)}, num_classes=12)
    with pytest.raises(SegreproError, match=r"labels/a\.png.*\b20\b"):
        SegmentationDataset(root, "train")[0]


def test_label_must_be_single_channel(tmp_path):
    root = write_dataset(tmp_path / "ds", {"a": ramp_pair()})
    Image.fromarray(ramp_pair()[0]).save(root / "labels" / "a.png")
    with pytest.raises(SegreproError, match=r"labels/a\.png.*mode"):
        SegmentationDataset(root, "train")[0]


def test_size_mismatch_names_both(tmp_path):
    image, _ = ramp_pair(4, 6)
    _, label = ramp_pair(5, 6)
    root = write_dataset(tmp_path / "ds", {"a": (image, label)})
    with pytest.raises(SegreproError, match=r"images/a\.png.*labels/a\.png"):
        SegmentationDataset(root, "train")[0]


# ----------------------------------------------------------------------------- augmentation

def test_augment_shapes_and_determinism():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    label = rng.integers(0, 12, (30, 40), dtype=np.uint8)
    aug = TrainAugment(crop_size=(24, 20), scale_range=(0.5, 2.0), flip=True, brightness=0.2)
    outputs = []
    for seed in (1, 1, 2):
        x, y = aug(image, label, np.random.default_rng(seed))
        assert x.shape == (24, 20, 3) and x.dtype == np.float32
        assert y.shape == (24, 20) and y.dtype == np.uint8
        assert x.min() >= 0 and x.max() <= 255
        outputs.append((x, y))
    assert np.array_equal(outputs[0][0], outputs[1][0]) and np.array_equal(outputs[0][1], outputs[1][1])
    assert not np.array_equal(outputs[0][0], outputs[2][0])
    x, y = TrainAugment(16)(Image.fromarray(image), label, np.random.default_rng(3))  # PIL input
    assert x.shape == (16, 16, 3) and y.shape == (16, 16)


def test_padding_is_mean_colour_and_ignore(tmp_path):
    image = np.full((8, 8, 3), 200, np.uint8)
    label = np.full((8, 8), 3, np.uint8)
    root = write_dataset(tmp_path / "ds", {"a": (image, label)})
    ds = SegmentationDataset(root, "train", TrainAugment(16, scale_range=(0.5, 0.5), flip=False))
    x, y, _ = ds[(0, 7)]
    assert x.shape == (3, 16, 16) and y.shape == (16, 16)
    inside = y == 3
    assert int(inside.sum()) == 16  # the 4x4 scaled image
    assert torch.all(x[:, ~inside] == 0.0)
    assert torch.all(y[~inside] == 255)
    assert torch.all(x[:, inside] > 1.0)


def test_flip_keeps_image_and_label_aligned():
    label = np.tile(np.arange(10, dtype=np.uint8), (6, 1))
    label[:, 7:] = 255
    image = np.repeat(label[..., None], 3, axis=2) // 2  # colour encodes the label
    aug = TrainAugment((6, 10), scale_range=(1.0, 1.0), flip=True, brightness=0.0)
    flipped = 0
    for seed in range(12):
        x, y = aug(image, label, np.random.default_rng(seed))
        assert np.array_equal(x[..., 0], (y // 2).astype(np.float32))
        flipped += int(np.array_equal(y, label[:, ::-1]))
        assert np.array_equal(y, label) or np.array_equal(y, label[:, ::-1])
    assert 0 < flipped < 12


def test_brightness_range_and_clip():
    aug = TrainAugment(4, scale_range=(1.0, 1.0), flip=False, brightness=0.2)
    label = np.zeros((4, 4), np.uint8)
    factors = set()
    for seed in range(20):
        x, _ = aug(np.full((4, 4, 3), 100, np.uint8), label, np.random.default_rng(seed))
        assert np.all(x == x[0, 0, 0]) and 80 <= x[0, 0, 0] <= 120
        factors.add(float(x[0, 0, 0]))
        bright, _ = aug(np.full((4, 4, 3), 250, np.uint8), label, np.random.default_rng(seed))
        assert bright.max() <= 255
    assert len(factors) > 10


def test_training_dataset_needs_a_seed(tmp_path):
    root = write_dataset(tmp_path / "ds", {"a": ramp_pair()})
    with pytest.raises(TypeError):
        SegmentationDataset(root, "train", TrainAugment(4))[0]


# ----------------------------------------------------------------------------- sampling

def test_sampler_epochs_and_resume():
    full = list(IterationBatchSampler(10, 3, seed=5, iterations=12))
    assert len(full) == 12
    assert all(len(batch) == 3 for batch in full)
    for epoch in range(4):  # floor(10 / 3) = 3 batches per epoch, no repeats inside one
        indices = [i for batch in full[3 * epoch:3 * epoch + 3] for i, _ in batch]
        assert len(set(indices)) == 9
    assert [i for i, _ in full[0]] != [i for i, _ in full[3]] or full[1] != full[4]
    seeds = [s for batch in full for _, s in batch]
    assert len(set(seeds)) == len(seeds)
    for k in (0, 1, 3, 7, 11, 12):
        resumed = IterationBatchSampler(10, 3, seed=5, start_iteration=k, iterations=12)
        assert len(resumed) == 12 - k
        assert list(resumed) == full[k:]
    assert list(IterationBatchSampler(10, 3, seed=6, iterations=12)) != full


def test_loader_resume_matches_full_run(tmp_path):
    root = generate_dataset(tmp_path / "syn", "syn", seed=0, width=48, height=36, train=7, val=1)
    args = dict(root=root, split="train", batch_size=2, crop_size=32, scale_range=(0.5, 2.0),
                flip=True, brightness=0.2, seed=3, iterations=6)
    full = list(make_train_loader(start_iteration=0, num_workers=0, **args))
    assert len(full) == 6
    x, y, ids = full[0]
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (2, 32, 32) and y.dtype == torch.int64 and len(ids) == 2
    resumed = list(make_train_loader(start_iteration=4, num_workers=2, **args))
    assert len(resumed) == 2
    for (xa, ya, ia), (xb, yb, ib) in zip(full[4:], resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and ia == ib


def test_loader_batch_larger_than_split(tmp_path):
    root = write_dataset(tmp_path / "ds", {"a": ramp_pair()})
    with pytest.raises(SegreproError, match=r"splits/train\.txt"):
        make_train_loader(root, "train", 2, 4, (1.0, 1.0), False, 0.0, 0, 0, 1, 0)


# ----------------------------------------------------------------------------- photometric distortion

class ScriptedRng:
    """Stands in for the augment's np.random.Generator: answers its draws from a script of
    (method, value) in order and records the arguments of each call."""

    def __init__(self, script):
        self.script = list(script)
        self.calls = []

    def _next(self, method, *args):
        expected, value = self.script.pop(0)
        assert method == expected, f"drew {method}{args}, the script says {expected}"
        self.calls.append((method, args))
        return value

    def uniform(self, low, high):
        return self._next("uniform", low, high)

    def random(self):
        return self._next("random")

    def integers(self, low, high):
        return self._next("integers", low, high)


# Two coloured pixels, black and a bluish one; grey levels (0.299 R + 0.587 G + 0.114 B)
# 59.25, 124.2, 0, 72.6; mean grey 64.0125.
PHOTO_IMAGE = np.array([[[100, 50, 0], [200, 100, 50]],
                 [[0, 0, 0], [40, 80, 120]]], np.uint8)
PHOTO_LABEL = np.array([[1, 2], [255, 3]], np.uint8)


def photometric(contrast=None, saturation=None, brightness=0.0):
    """Run the photometric augment on PHOTO_IMAGE (no scale, flip, crop) with contrast / saturation
    factors (None: not applied); returns (image, label, the rng's calls)."""
    rng = ScriptedRng([
        ("uniform", 1.0), ("random", 0.9), ("uniform", 1.0),  # scale, flip (no), brightness gain
        ("integers", 0), ("integers", 0),  # crop offsets
        ("random", 0.2 if contrast else 0.7), ("uniform", contrast or 1.3),
        ("random", 0.2 if saturation else 0.7), ("uniform", saturation or 0.6),
        ("random", 0.2), ("uniform", 0.5), ("random", 0.2),  # rotation and blur (both off here)
    ])
    aug = TrainAugment(2, scale_range=(1.0, 1.0), flip=True, brightness=brightness, photometric=True)
    x, y = aug(PHOTO_IMAGE, PHOTO_LABEL, rng)
    assert not rng.script
    return x, y, rng.calls


def test_photometric_draws_from_the_rng_in_order():
    _, _, calls = photometric(contrast=1.5, saturation=0.5)
    assert calls == [("uniform", (1.0, 1.0)), ("random", ()), ("uniform", (1.0, 1.0)),
                     ("integers", (0, 1)), ("integers", (0, 1)),
                     ("random", ()), ("uniform", (0.5, 1.5)), ("random", ()), ("uniform", (0.5, 1.5)),
                     ("random", ()), ("uniform", (-1.0, 1.0)), ("random", ())]


def test_contrast_by_hand():
    x, y, _ = photometric(contrast=1.5)  # 64.0125 + 1.5 (v - 64.0125) = 1.5 v - 32.00625, clipped
    expected = [[[117.99375, 42.99375, 0.0], [255.0, 117.99375, 42.99375]],
                [[0.0, 0.0, 0.0], [27.99375, 87.99375, 147.99375]]]
    assert x.dtype == np.float32 and np.allclose(x, expected, rtol=0, atol=1e-4)
    assert np.array_equal(y, PHOTO_LABEL)
    x, _, _ = photometric(contrast=0.5)  # 0.5 v + 32.00625
    expected = [[[82.00625, 57.00625, 32.00625], [132.00625, 82.00625, 57.00625]],
                [[32.00625, 32.00625, 32.00625], [52.00625, 72.00625, 92.00625]]]
    assert np.allclose(x, expected, rtol=0, atol=1e-4)


def test_saturation_by_hand():
    x, y, _ = photometric(saturation=0.5)  # (v + grey) / 2
    expected = [[[79.625, 54.625, 29.625], [162.1, 112.1, 87.1]],
                [[0.0, 0.0, 0.0], [56.3, 76.3, 96.3]]]
    assert np.allclose(x, expected, rtol=0, atol=1e-4)
    assert np.array_equal(y, PHOTO_LABEL)
    x, _, _ = photometric(saturation=1.5)  # 1.5 v - 0.5 grey, clipped
    expected = [[[120.375, 45.375, 0.0], [237.9, 87.9, 12.9]],
                [[0.0, 0.0, 0.0], [23.7, 83.7, 143.7]]]
    assert np.allclose(x, expected, rtol=0, atol=1e-4)


def test_contrast_then_saturation_then_brightness():
    # Contrast 0.5 first: pixel (100, 50, 0) -> (82.00625, 57.00625, 32.00625), grey
    # 0.299*82.00625 + 0.587*57.00625 + 0.114*32.00625 = 61.63125; saturation 1.5 then gives
    # 1.5 v - 0.5 * 61.63125; the brightness gain 1.0 changes nothing.
    x, _, _ = photometric(contrast=0.5, saturation=1.5, brightness=0.2)
    assert np.allclose(x[0, 0], [92.19375, 54.69375, 17.19375], rtol=0, atol=1e-4)
    # Black became grey 32.00625 (R = G = B): saturation keeps a grey pixel grey.
    assert np.allclose(x[1, 0], 32.00625 * (1.5 - 0.5 * (0.299 + 0.587 + 0.114)), rtol=0, atol=1e-4)


def test_no_draw_below_one_half_means_no_change():
    x, y, _ = photometric()
    assert np.array_equal(x, PHOTO_IMAGE.astype(np.float32)) and np.array_equal(y, PHOTO_LABEL)


def test_photometric_is_deterministic_and_leaves_labels_and_geometry():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    label = rng.integers(0, 12, (30, 40), dtype=np.uint8)
    kwargs = dict(crop_size=(24, 20), scale_range=(0.5, 2.0), flip=True, brightness=0.2)
    on, off = TrainAugment(**kwargs, photometric=True), TrainAugment(**kwargs)
    changed = 0
    for seed in range(10):
        x, y = on(image, label, np.random.default_rng(seed))
        x2, y2 = on(image, label, np.random.default_rng(seed))
        assert np.array_equal(x, x2) and np.array_equal(y, y2)
        plain, plain_label = off(image, label, np.random.default_rng(seed))
        assert np.array_equal(y, plain_label)  # same scale, flip and crop
        assert x.min() >= 0 and x.max() <= 255
        changed += int(not np.array_equal(x, plain))
    assert 0 < changed < 10  # p(neither) = 1/4


def test_without_photometric_the_augment_is_unchanged():
    """The sha256 of the outputs the augment gave before photometric distortion existed."""
    src = np.random.default_rng(0)
    image = src.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    label = src.integers(0, 12, (30, 40), dtype=np.uint8)
    for aug in (TrainAugment(crop_size=(24, 20), scale_range=(0.5, 2.0), flip=True, brightness=0.2),
                TrainAugment(crop_size=(24, 20), scale_range=(0.5, 2.0), flip=True, brightness=0.2,
                             photometric=False)):
        digest = hashlib.sha256()
        for seed in range(8):
            x, y = aug(image, label, np.random.default_rng(seed))
            digest.update(x.tobytes())
            digest.update(y.tobytes())
        assert digest.hexdigest() == "36f3431be66fc9bcb041ec618f6c33609900133e1af924761e6feaa4a022ba46"


def test_loader_passes_photometric(tmp_path):
    root = generate_dataset(tmp_path / "syn", "syn", seed=0, width=48, height=36, train=7, val=1)
    args = dict(root=root, split="train", batch_size=2, crop_size=32, scale_range=(0.5, 2.0),
                flip=True, brightness=0.2, seed=3, iterations=4, start_iteration=0)
    plain = list(make_train_loader(**args))
    distorted = list(make_train_loader(**args, photometric=True))
    assert all(torch.equal(ya, yb) and ia == ib for (_, ya, ia), (_, yb, ib) in zip(plain, distorted))
    assert any(not torch.equal(xa, xb) for (xa, _, _), (xb, _, _) in zip(plain, distorted))
    resumed = list(make_train_loader(**dict(args, start_iteration=2), photometric=True, num_workers=2))
    for (xa, ya, _), (xb, yb, _) in zip(distorted[2:], resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("height, width", [(40, 80), (80, 160), (30, 20)])
def test_base_size_scale_sets_the_long_side(height, width):
    """HRNet-OCR's multi_scale_aug (SaF, Sec. 5.1.1): the drawn scale sets the long side to
    base_size x scale, whatever the image's own size; without a base size it scales the image."""
    label = np.full((height, width), 3, np.uint8)
    image = np.full((height, width, 3), 200, np.uint8)
    long_side = 32  # base 64 x scale 0.5
    aug = TrainAugment(64, scale_range=(0.5, 0.5), flip=False, base_size=64)
    _, y = aug(image, label, np.random.default_rng(0))
    rows, cols = np.nonzero(y == 3)
    size = (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1)
    short_side = round(min(height, width) * long_side / max(height, width))
    assert int((y == 3).sum()) == long_side * short_side  # the whole scaled image, the rest padding
    assert max(size) == long_side and min(size) == short_side

    _, y = TrainAugment(64, scale_range=(0.5, 0.5), flip=False)(image, label, np.random.default_rng(0))
    assert int((y == 3).sum()) == min(64, round(height / 2)) * min(64, round(width / 2))


def test_saf_declares_its_base_size_at_the_paper_scale():
    from segrepro.config.params import load_params

    params = load_params(Path(__file__).resolve().parents[1])
    assert params.resolve("saf", "I", "paper")["train"]["base_size"] == 512  # = the crop, as HRNet-OCR
    assert "base_size" not in params.resolve("saf", "I", "demo")["train"]  # one image size: the forms agree


# ----------------------------------------------------------------------------- rotation and blur (PSPNet)

def geometry_script(rotate=None, blur=False):
    """Draws for a 2x2-crop augment at scale 1, no flip, offsets 0, no photometric distortion;
    `rotate` an angle factor in [-1, 1] (None: no rotation), `blur` whether to blur."""
    return ScriptedRng([
        ("uniform", 1.0), ("random", 0.9), ("uniform", 1.0), ("integers", 0), ("integers", 0),
        ("random", 0.7), ("uniform", 1.0), ("random", 0.7), ("uniform", 1.0),
        ("random", 0.2 if rotate is not None else 0.7), ("uniform", rotate or 0.0),
        ("random", 0.3 if blur else 0.6),
    ])


def test_blur_kernel_by_hand():
    """OpenCV's GaussianBlur(5x5, sigma 0) is [1, 4, 6, 4, 1] / 16 per direction, with reflection
    that does not repeat the edge pixel (BORDER_REFLECT_101)."""
    assert BLUR_KERNEL.tolist() == [0.0625, 0.25, 0.375, 0.25, 0.0625]
    image = np.zeros((7, 7, 3), np.float32)
    image[3, 3] = 256.0
    out = blur_window(image, slice(0, 7), slice(0, 7))
    assert out[3, 3, 0] == 256 * 0.375 * 0.375  # 36
    assert out[1, 3, 0] == 256 * 0.0625 * 0.375 and out[0, 0, 0] == 0.0
    # An impulse one pixel from the border: the reflected copy lands on the other side of row 0,
    # so row 0 gets weight (1/4 + 1/4) per direction: 256 / 4 = 64 at the corner.
    edge = np.zeros((5, 5, 3), np.float32)
    edge[1, 1] = 256.0
    assert blur_window(edge, slice(0, 5), slice(0, 5))[0, 0, 0] == 64.0
    # Edge-repeating reflection (BORDER_REFLECT) would give (1/16 + 1/4)^2 * 256 = 25.


def test_blur_window_equals_the_whole_image_blurred():
    rng = np.random.default_rng(4)
    image = rng.uniform(0, 255, (13, 17, 3)).astype(np.float32)
    whole = blur_window(image, slice(0, 13), slice(0, 17))
    padded = np.pad(image.astype(np.float64), ((2, 2), (2, 2), (0, 0)), mode="reflect")
    kernel = np.outer(BLUR_KERNEL, BLUR_KERNEL)
    reference = np.zeros(image.shape)
    for r in range(13):
        for c in range(17):
            reference[r, c] = np.tensordot(kernel, padded[r:r + 5, c:c + 5], axes=([0, 1], [0, 1]))
    assert np.allclose(whole, reference, atol=1e-3)
    for rows, cols in [(slice(0, 4), slice(0, 5)), (slice(3, 11), slice(6, 17)), (slice(12, 13), slice(16, 17))]:
        assert np.allclose(blur_window(image, rows, cols), whole[rows, cols], atol=1e-4)


def test_blur_applied_to_the_crop_window():
    image = np.zeros((6, 6, 3), np.uint8)
    image[2, 2] = 160
    label = np.zeros((6, 6), np.uint8)
    aug = TrainAugment(2, scale_range=(1.0, 1.0), flip=True, blur=0.5)
    sharp, _ = aug(image, label, geometry_script(blur=False))
    blurred, _ = aug(image, label, geometry_script(blur=True))
    assert sharp[1, 1, 0] == 0.0 and sharp.max() == 0.0  # the crop is rows/cols 0-1
    # Pixel (1, 1) is one step from the impulse in each direction: 160 / 16 = 10. Pixel (0, 0) is
    # two steps from it and from its reflection across row / column 0: 160 (1/16 + 1/16)^2 = 2.5.
    assert blurred[1, 1, 0] == 160 * 0.25 * 0.25 and blurred[0, 0, 0] == 160 * 0.125 * 0.125


def test_rotation_fills_with_mean_and_ignore():
    image = np.full((21, 21, 3), 200, np.uint8)
    label = np.full((21, 21), 3, np.uint8)
    aug = TrainAugment(21, scale_range=(1.0, 1.0), flip=False, rotate=10)
    rng = geometry_script(rotate=1.0)
    rng.script[3:5] = [("integers", 0), ("integers", 0)]
    x, y = aug(image, label, rng)
    assert ("uniform", (-1.0, 1.0)) in rng.calls
    # 10 degrees about the centre: the corners come from outside the image.
    assert y[0, 0] == 255 and y[20, 20] == 255 and y[10, 10] == 3
    assert np.allclose(x[0, 0], IMAGENET_MEAN) and np.allclose(x[10, 10], 200.0)
    # The filled corners: every ignored label pixel is at least partly mean-coloured (bilinear edges).
    ignored = y == 255
    assert 4 <= ignored.sum() < 21 * 21 / 4 and np.all(x[ignored][:, 0] < 200.0)
    unrotated, same = aug(image, label, geometry_script(rotate=None))
    assert np.all(same == 3) and np.all(unrotated == 200.0)


def test_rotation_moves_image_and_label_together():
    label = np.zeros((31, 31), np.uint8)
    label[:, 20:] = 1
    image = np.repeat((label * 200)[..., None], 3, axis=2).astype(np.uint8)
    aug = TrainAugment(31, scale_range=(1.0, 1.0), flip=False, rotate=10)
    x, y = aug(image, label, geometry_script(rotate=1.0))
    inside = (y != 255)
    assert not np.array_equal(y[inside], label[inside])  # something moved
    # Away from the class border the rotated image's colour still encodes the rotated label.
    settled = inside & (np.abs(x[..., 0] - 100) > 60)
    assert np.array_equal(x[..., 0][settled] > 100, y[settled] == 1)


def pspnet_augment():
    """The TrainAugment PSPNet's resolved recipe builds (as segrepro.engine.train passes it)."""
    train = load_params(Path(__file__).resolve().parents[1]).resolve("pspnet", "psp50", "tiny")["train"]
    return train, TrainAugment(32, scale_range=(1.0, 1.0), flip=train["flip"], brightness=train["brightness"],
                               rotate=train.get("rotate", 0.0), blur=train.get("blur", 0.0))


def test_pspnet_recipe_rotates_and_blurs_and_keeps_brightness():
    """Under the PSPNet recipe about half the samples are rotated (ignored corners), about half
    blurred (a sharp 0/200 edge gets intermediate values), and a flat image keeps its value
    (no brightness gain)."""
    train, aug = pspnet_augment()
    assert (train["rotate"], train["blur"], train["brightness"]) == (10, 0.5, 0.0)
    edge = np.zeros((32, 32, 3), np.uint8)
    edge[:, 16:] = 200
    label = np.zeros((32, 32), np.uint8)
    rotated = blurred = 0
    for seed in range(40):
        x, y = aug(edge, label, np.random.default_rng(seed))
        rotated += int(y[0, 0] == 255)
        row = x[16, 10:22, 0]
        if not (y[0, 0] == 255):
            blurred += int(np.any((row > 1) & (row < 199)))
        flat, _ = aug(np.full((32, 32, 3), 90, np.uint8), label, np.random.default_rng(seed))
        assert np.allclose(flat[8:24, 8:24], 90.0, atol=1e-3)  # away from any filled corner
    assert 10 <= rotated <= 30 and 4 <= blurred <= rotated + 20 and blurred < 40 - rotated


def test_other_papers_keep_their_augmentation():
    params = load_params(Path(__file__).resolve().parents[1])
    for paper, experiment in (("saf", "A"), ("hfgd", "fcn_identity")):
        train = params.resolve(paper, experiment, "demo")["train"]
        assert train.get("rotate", 0) == 0 and train.get("blur", 0) == 0 and train["brightness"] == 0.2


def test_rotation_and_blur_resume_like_an_uninterrupted_run(tmp_path):
    root = generate_dataset(tmp_path / "syn", "syn", seed=0, width=48, height=36, train=7, val=1)
    args = dict(root=root, split="train", batch_size=2, crop_size=33, scale_range=(0.5, 2.0),
                flip=True, brightness=0.0, seed=3, iterations=4, start_iteration=0, rotate=10, blur=0.5)
    full = list(make_train_loader(**args))
    plain = list(make_train_loader(**dict(args, rotate=0, blur=0.0)))
    assert any(not torch.equal(ya, yb) for (_, ya, _), (_, yb, _) in zip(full, plain))
    resumed = list(make_train_loader(**dict(args, start_iteration=2), num_workers=2))
    for (xa, ya, _), (xb, yb, _) in zip(full[2:], resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)

