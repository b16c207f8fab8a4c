"""One reader for every dataset in the uniform layout, plus the papers' training augmentation.

Layout (see segrepro.data.synthetic): <root>/dataset.yaml, images/<id><image_suffix>,
labels/<id><label_suffix> (single-channel uint8, 255 = ignore), splits/<split>.txt.
A card may name another folder holding images/ and labels/ (`data_root`, a path relative to
<root>, e.g. `../ade20k` for a subset dataset that only has its own split lists); `image_root`
gives the folder every reader must open images and labels from.

Training randomness comes only from the sampler: the training dataset is indexed by
(index, sample_seed) pairs, so a run resumed at iteration k sees exactly the batches and
augmentations of an uninterrupted run, whatever the number of loader workers.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from segrepro.core import paths
from segrepro.core.errors import SegreproError, one_line

# ImageNet statistics on the 0-255 scale, as used by the papers' pretrained backbones.
IMAGENET_MEAN = np.array([123.675, 116.28, 103.53], np.float32)
IMAGENET_STD = np.array([58.395, 57.12, 57.375], np.float32)

CARD_NAME = paths.CARD


# ----------------------------------------------------------------------------- the card


def _yaml_problem(exc: Exception) -> str:
    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    if problem and mark is not None:
        return f"invalid YAML: {problem} (line {mark.line + 1})"
    return one_line(exc)


def load_card(root) -> dict:
    """Read and check <root>/dataset.yaml; any problem is a SegreproError naming the file."""
    path = Path(root) / CARD_NAME
    if not path.is_file():
        raise SegreproError(f"{path}: dataset card not found (is the dataset prepared?)")
    try:
        card = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise SegreproError(f"{path}: cannot read dataset card: {_yaml_problem(exc)}") from None
    if not isinstance(card, dict):
        raise SegreproError(f"{path}: dataset card must be a mapping")

    def bad(key, why):
        return SegreproError(f"{path}: key '{key}' {why}")

    for key in ("name", "num_classes", "ignore_index", "class_names", "image_suffix",
                "label_suffix", "splits"):
        if key not in card:
            raise bad(key, "is missing")
    num_classes = card["num_classes"]
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 1 <= num_classes <= 255:
        raise bad("num_classes", f"must be an integer in 1..255, got {num_classes!r}")
    ignore = card["ignore_index"]
    if isinstance(ignore, bool) or not isinstance(ignore, int) or not 0 <= ignore <= 255:
        raise bad("ignore_index", f"must be an integer in 0..255, got {ignore!r}")
    if ignore < num_classes:
        raise bad("ignore_index", f"({ignore}) collides with a class index (num_classes {num_classes})")
    names = card["class_names"]
    if not isinstance(names, list) or len(names) != num_classes:
        raise bad("class_names", f"must be a list of num_classes ({num_classes}) names")
    for key in ("image_suffix", "label_suffix"):
        if not isinstance(card[key], str) or not card[key].startswith("."):
            raise bad(key, f"must be a file suffix like '.png', got {card[key]!r}")
    if not isinstance(card["splits"], dict):
        raise bad("splits", "must be a mapping of split name to image count")
    if "unlabelled_splits" in card:
        # Test-server splits (ADE20K test, Cityscapes test): images only, for submissions.
        unlabelled = card["unlabelled_splits"]
        if (not isinstance(unlabelled, list) or len(set(map(str, unlabelled))) != len(unlabelled)
                or not all(isinstance(s, str) and s in card["splits"] for s in unlabelled)):
            raise bad("unlabelled_splits", f"must be a list of distinct split names of 'splits' "
                      f"({', '.join(map(str, card['splits']))}), got {unlabelled!r}")
    if "data_root" in card:
        data_root = card["data_root"]
        if not isinstance(data_root, str) or not data_root.strip() or Path(data_root).is_absolute():
            raise bad("data_root", f"must be a folder path relative to {path.parent}, got {data_root!r}")
    return card


def image_root(root, card: dict) -> Path:
    """The folder holding images/ and labels/ of the dataset at `root` with this card.

    `data_root` is resolved lexically against `root` (so `../ade20k` means the sibling folder
    data/ade20k, as `segrepro prepare` made it, even if `root` itself is a symlink).
    """
    root = Path(root)
    if "data_root" not in card:
        return root
    return Path(os.path.normpath(root / card["data_root"]))


# ----------------------------------------------------------------------------- reading files

def _read_image(path: Path) -> np.ndarray:
    """RGB uint8 HxWx3; a file PIL cannot decode is reported as corrupt."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as exc:  # PIL raises many types for broken files; all mean "corrupt"
        raise SegreproError(f"{path}: cannot read image: {one_line(exc)}") from None


def read_label(path: Path) -> np.ndarray:
    """Class indices as uint8 HxW from a mode "L" (or palette "P", indices) PNG."""
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            label = np.asarray(im) if mode in ("L", "P") else None
    except Exception as exc:
        raise SegreproError(f"{path}: cannot read label: {one_line(exc)}") from None
    if label is None:
        raise SegreproError(f"{path}: label must be a single-channel 8-bit PNG (mode L), got mode {mode}")
    return label


# ----------------------------------------------------------------------------- augmentation

def crop_pair(size) -> tuple[int, int]:
    """A square size (an int) or [h, w] as (h, w)."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


class TrainAugment:
    """Random scale, rotation, horizontal flip, Gaussian blur, photometric distortion, brightness
    and crop, as in the papers' training (each paper declares which, params/papers/*.yaml).

    Called with (image uint8 HxWx3 array or PIL image, label uint8 HxW, rng); returns
    (image float32 HxWx3 on the 0-255 scale, label uint8 HxW) of size `crop_size`.
    Where the scaled image is smaller than the crop, the image is padded with the ImageNet
    mean colour (0 once normalised) and the label with `ignore_index`.

    With `rotate` > 0 (PSPNet; semseg util/transform.py RandRotate, p 0.5): half of the images are
    rotated, after the scale, by an angle uniform in [-rotate, rotate] degrees about their centre,
    bilinearly (labels: nearest), keeping their size; uncovered corners get the mean colour and
    `ignore_index`. With `blur` > 0 (PSPNet; semseg RandomGaussianBlur): with probability `blur`
    the image is blurred by OpenCV's 5x5 Gaussian of sigma 0 (cv2.GaussianBlur(image, (5, 5), 0):
    the fixed binomial kernel [1, 4, 6, 4, 1] / 16 in each direction, borders reflected without
    repeating the edge pixel). semseg's order (tool/train.py): scale, rotate, blur, flip, crop; the
    blur commutes with the flip, so here it is applied to the crop window (with a 2-pixel margin
    of real neighbours: the same values as blurring the whole image first).

    With `photometric` (HFGD's advanced setting), after the scale and before the brightness:
    with probability 0.5 the contrast is scaled by a factor in [0.5, 1.5] (a blend with the
    image's mean grey level), then with probability 0.5 the saturation by a factor in
    [0.5, 1.5] (a blend with each pixel's grey level); each result is clipped to [0, 255].
    """

    def __init__(self, crop_size, scale_range=(0.5, 2.0), flip: bool = True,
                 brightness: float = 0.0, ignore_index: int = 255, photometric: bool = False,
                 base_size: int | None = None, rotate: float = 0.0,
                 blur: float = 0.0):
        self.crop_h, self.crop_w = crop_pair(crop_size)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        # With a base size the drawn scale sets the long side to base_size x scale (HRNet-OCR's
        # multi_scale_aug, lib/datasets/base_dataset.py, which SaF follows, Sec. 5.1.1); without
        # one it scales the image itself.
        self.base_size = None if base_size is None else int(base_size)
        self.flip = bool(flip)
        self.brightness = float(brightness)
        self.ignore_index = int(ignore_index)
        self.photometric = bool(photometric)
        self.rotate = float(rotate)
        self.blur = float(blur)

    def __call__(self, image, label, rng: np.random.Generator):
        image = np.asarray(image, dtype=np.uint8)
        label = np.asarray(label, dtype=np.uint8)
        h, w = label.shape
        # Draw every random number in a fixed order, whatever the options, so seeds mean the same
        # (the photometric, rotation and blur draws come last: turning them on changes no scale,
        # flip or crop offset).
        scale = rng.uniform(*self.scale_range)
        do_flip = rng.random() < 0.5
        gain = rng.uniform(1.0 - self.brightness, 1.0 + self.brightness)
        factor = scale if self.base_size is None else scale * self.base_size / max(h, w)
        new_w, new_h = max(1, round(w * factor)), max(1, round(h * factor))
        pad_h, pad_w = max(0, self.crop_h - new_h), max(0, self.crop_w - new_w)
        y0 = int(rng.integers(0, new_h + pad_h - self.crop_h + 1))
        x0 = int(rng.integers(0, new_w + pad_w - self.crop_w + 1))
        do_contrast = rng.random() < 0.5
        contrast = rng.uniform(0.5, 1.5)
        do_saturation = rng.random() < 0.5
        saturation = rng.uniform(0.5, 1.5)
        do_rotate = rng.random() < 0.5
        angle = rng.uniform(-1.0, 1.0) * self.rotate
        do_blur = rng.random() < self.blur

        if (new_w, new_h) != (w, h):
            image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
            label = np.asarray(Image.fromarray(label).resize((new_w, new_h), Image.NEAREST))
        if self.rotate > 0 and do_rotate:
            image, label = rotate_pair(image, label, angle, self.ignore_index)
        if self.flip and do_flip:
            image, label = image[:, ::-1], label[:, ::-1]

        # The crop, in the scaled image's coordinates: the image is padded evenly on both sides
        # to at least the crop size, and the crop taken at the drawn offset of the padded image.
        top, left = pad_h // 2, pad_w // 2
        rows = slice(max(0, y0 - top), min(new_h, y0 - top + self.crop_h))
        cols = slice(max(0, x0 - left), min(new_w, x0 - left + self.crop_w))
        cropped = False
        if self.blur > 0 and do_blur:
            # Blur the crop window only, unless the contrast needs the whole (blurred) image.
            whole = (slice(0, new_h), slice(0, new_w))
            image = blur_window(np.asarray(image, np.float32), *(whole if self.photometric else (rows, cols)))
            cropped = not self.photometric
        if not self.photometric and not cropped:
            # Brightness is per pixel: cropping first gives the same values for a fraction of the
            # work (the contrast needs the whole image's mean, so it crops after).
            image = image[rows, cols]
        image = image.astype(np.float32)
        if self.photometric:
            if do_contrast:
                image = adjust_contrast(image, contrast)
            if do_saturation:
                image = adjust_saturation(image, saturation)
            image = image[rows, cols]
        if self.brightness > 0:
            image = np.clip(image * gain, 0.0, 255.0)

        crop = np.empty((self.crop_h, self.crop_w, 3), np.float32)
        crop[:] = IMAGENET_MEAN
        crop_label = np.full((self.crop_h, self.crop_w), self.ignore_index, np.uint8)
        y, x = rows.start - (y0 - top), cols.start - (x0 - left)
        crop[y:y + image.shape[0], x:x + image.shape[1]] = image
        crop_label[y:y + image.shape[0], x:x + image.shape[1]] = label[rows, cols]
        image, label = crop, crop_label
        return np.ascontiguousarray(image), np.ascontiguousarray(label)


def rotate_pair(image: np.ndarray, label: np.ndarray, angle: float, ignore_index: int):
    """Rotate an HxWx3 image (bilinear, to float32) and its label (nearest) by `angle` degrees
    counter-clockwise about the image centre, keeping the size; what no source pixel covers gets
    the ImageNet mean colour and `ignore_index` (semseg util/transform.py RandRotate: cv2.warpAffine
    with the mean as border value, labels with the ignore label). The image is rotated in float,
    one channel at a time, so the fill is the exact mean."""
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c], dtype=np.float32)).rotate(
            angle, resample=Image.BILINEAR, fillcolor=float(IMAGENET_MEAN[c])))
        for c in range(3)
    ]
    label = np.asarray(Image.fromarray(np.ascontiguousarray(label)).rotate(
        angle, resample=Image.NEAREST, fillcolor=int(ignore_index)))
    return np.stack(channels, axis=-1), label


# OpenCV's 5-tap Gaussian for sigma <= 0 (cv2.getGaussianKernel's fixed table for sizes up to 7),
# what semseg's RandomGaussianBlur(radius=5) gets from cv2.GaussianBlur(image, (5, 5), 0).
BLUR_KERNEL = np.array([1, 4, 6, 4, 1], np.float32) / 16


def blur_window(image: np.ndarray, rows: slice, cols: slice) -> np.ndarray:
    """The window [rows, cols] of a float32 HxWx3 image blurred by BLUR_KERNEL in both directions,
    with OpenCV's default border (reflection without repeating the edge pixel, numpy's "reflect"):
    the same values as blurring the whole image and then cutting the window out."""
    h, w = image.shape[:2]
    r0, r1 = max(0, rows.start - 2), min(h, rows.stop + 2)
    c0, c1 = max(0, cols.start - 2), min(w, cols.stop + 2)
    # Real neighbours where the image has them; reflected ones only beyond its own border.
    margins = ((2 - (rows.start - r0), 2 - (r1 - rows.stop)), (2 - (cols.start - c0), 2 - (c1 - cols.stop)), (0, 0))
    region = np.pad(image[r0:r1, c0:c1], margins, mode="reflect")
    n_rows, n_cols = rows.stop - rows.start, cols.stop - cols.start
    vertical = sum(BLUR_KERNEL[i] * region[i:i + n_rows] for i in range(5))
    return sum(BLUR_KERNEL[i] * vertical[:, i:i + n_cols] for i in range(5)).astype(np.float32)


def grey(image: np.ndarray) -> np.ndarray:
    """Per-pixel grey level HxW of a float32 HxWx3 image (ITU-R BT.601 luma weights, as PIL's
    "L" conversion), in float32."""
    return (np.float32(0.299) * image[..., 0] + np.float32(0.587) * image[..., 1]
            + np.float32(0.114) * image[..., 2])


def adjust_contrast(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend a float32 HxWx3 image with its mean grey level: mean + factor * (image - mean)."""
    mean = np.float32(grey(image).mean())
    return np.clip(mean + np.float32(factor) * (image - mean), 0.0, 255.0)


def adjust_saturation(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend a float32 HxWx3 image with its grey image: grey + factor * (image - grey)."""
    g = grey(image)[..., None]
    return np.clip(g + np.float32(factor) * (image - g), 0.0, 255.0)


def normalize(image: np.ndarray) -> torch.Tensor:
    """HxWx3 on the 0-255 scale -> float32 tensor 3xHxW with ImageNet mean/std."""
    image = (np.asarray(image, np.float32) - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


# ----------------------------------------------------------------------------- the dataset

class SegmentationDataset(Dataset):
    """Image/label pairs of one split; items are (image 3xHxW float32, label HxW int64, id).

    Without a transform, index with a plain int. With one (training), index with
    (index, sample_seed): the transform's randomness comes from that seed alone.
    """

    def __init__(self, root, split: str, transform=None):
        self.root = Path(root)
        self.card = load_card(self.root)
        self.data_root = image_root(self.root, self.card)
        self.split = split
        self.transform = transform
        self.num_classes = int(self.card["num_classes"])
        self.ignore_index = int(self.card["ignore_index"])
        self.class_names = list(self.card["class_names"])
        self.split_file = self.root / "splits" / f"{split}.txt"
        if split in self.card.get("unlabelled_splits", []):
            raise SegreproError(
                f"{self.split_file}: split '{split}' has no labels (unlabelled_splits of {self.root / CARD_NAME});"
                " its images are for test-server submissions (segrepro submit)")
        self.ids = self._read_split(self.split_file)
        # Existence only (cheap); contents are checked when each pair is loaded.
        for image_id in self.ids:
            for path in (self.image_path(image_id), self.label_path(image_id)):
                if not path.is_file():
                    raise SegreproError(f"{path}: file listed in {self.split_file} is missing")

    @staticmethod
    def _read_split(path: Path) -> list[str]:
        if not path.is_file():
            raise SegreproError(f"{path}: split file not found")
        try:
            ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise SegreproError(f"{path}: cannot read split file: {one_line(exc)}") from None
        if not ids:
            raise SegreproError(f"{path}: split file lists no images")
        return ids

    def image_path(self, image_id: str) -> Path:
        return self.data_root / "images" / f"{image_id}{self.card['image_suffix']}"

    def label_path(self, image_id: str) -> Path:
        return self.data_root / "labels" / f"{image_id}{self.card['label_suffix']}"

    def __len__(self) -> int:
        return len(self.ids)

    def load_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The checked raw pair: image uint8 HxWx3, label uint8 HxW."""
        image_id = self.ids[index]
        image_path, label_path = self.image_path(image_id), self.label_path(image_id)
        image = _read_image(image_path)
        label = read_label(label_path)
        if image.shape[:2] != label.shape:
            raise SegreproError(
                f"{image_path} and {label_path}: size mismatch, image {image.shape[1]}x{image.shape[0]}"
                f" vs label {label.shape[1]}x{label.shape[0]}")
        if int(label.max()) >= self.num_classes:
            values = np.unique(label)
            bad = values[(values >= self.num_classes) & (values != self.ignore_index)]
            if bad.size:
                raise SegreproError(
                    f"{label_path}: label value {int(bad[0])} is not a class"
                    f" (num_classes {self.num_classes}, ignore_index {self.ignore_index})")
        return image, label

    def __getitem__(self, item):
        if isinstance(item, tuple):
            index, sample_seed = item
        else:
            index, sample_seed = item, None
        index = int(index)
        image, label = self.load_pair(index)
        if self.transform is not None:
            if sample_seed is None:
                raise TypeError("a dataset with a transform is indexed by (index, sample_seed)")
            image, label = self.transform(image, label, np.random.default_rng(sample_seed))
        return normalize(image), torch.from_numpy(label.astype(np.int64)), self.ids[index]


class SplitImages:
    """The images of one split without their labels (what a test-server submission predicts);
    items are (image 3xHxW float32, normalised, id). Works on labelled splits too: the synthetic
    datasets have no test split, so their val images stand in for one at the demo and tiny scales."""

    def __init__(self, root, split: str):
        self.root = Path(root)
        self.card = load_card(self.root)
        self.data_root = image_root(self.root, self.card)
        self.split = split
        self.labelled = split not in self.card.get("unlabelled_splits", [])
        self.split_file = self.root / "splits" / f"{split}.txt"
        self.ids = SegmentationDataset._read_split(self.split_file)
        for image_id in self.ids:
            if not self.image_path(image_id).is_file():
                raise SegreproError(f"{self.image_path(image_id)}: file listed in {self.split_file} is missing")

    def image_path(self, image_id: str) -> Path:
        return self.data_root / "images" / f"{image_id}{self.card['image_suffix']}"

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        image_id = self.ids[int(index)]
        return normalize(_read_image(self.image_path(image_id))), image_id


# ----------------------------------------------------------------------------- sampling

class IterationBatchSampler:
    """Batches of (index, sample_seed) for iterations start_iteration .. iterations - 1.

    Epoch e visits a permutation seeded by (seed, e) in floor(n / batch_size) full batches
    (drop_last); the sample seed of position j in iteration i is derived from (seed, i, j).
    So iteration i's batch depends on (seed, i) only and resuming at k repeats a full run's
    batches from k on.
    """

    def __init__(self, dataset_len: int, batch_size: int, seed: int, start_iteration: int = 0,
                 *, iterations: int):
        if batch_size < 1 or dataset_len < batch_size:
            raise ValueError(f"need 1 <= batch_size ({batch_size}) <= dataset size ({dataset_len})")
        if not 0 <= start_iteration <= iterations:
            raise ValueError(f"need 0 <= start_iteration ({start_iteration}) <= iterations ({iterations})")
        self.dataset_len = int(dataset_len)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.start_iteration = int(start_iteration)
        self.iterations = int(iterations)
        self.batches_per_epoch = self.dataset_len // self.batch_size

    def __len__(self) -> int:
        return self.iterations - self.start_iteration

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 0, epoch]).permutation(self.dataset_len)

    def _sample_seed(self, iteration: int, position: int) -> int:
        state = np.random.SeedSequence([self.seed, 1, iteration, position]).generate_state(1, np.uint64)
        return int(state[0])

    def __iter__(self):
        epoch, order = None, None
        for iteration in range(self.start_iteration, self.iterations):
            if iteration // self.batches_per_epoch != epoch:
                epoch = iteration // self.batches_per_epoch
                order = self._permutation(epoch)
            start = (iteration % self.batches_per_epoch) * self.batch_size
            indices = order[start:start + self.batch_size]
            yield [(int(index), self._sample_seed(iteration, position))
                   for position, index in enumerate(indices)]


def make_train_loader(root, split: str, batch_size: int, crop_size, scale_range, flip: bool,
                      brightness: float, seed: int, start_iteration: int, iterations: int,
                      num_workers: int = 0, photometric: bool = False, pin_memory: bool = False,
                      base_size: int | None = None, rotate: float = 0.0,
                      blur: float = 0.0) -> DataLoader:
    """DataLoader over augmented batches for iterations start_iteration .. iterations - 1."""
    dataset = SegmentationDataset(root, split)
    dataset.transform = TrainAugment(crop_size, scale_range, flip, brightness, dataset.ignore_index,
                                     photometric=photometric, base_size=base_size,
                                     rotate=rotate, blur=blur)
    if len(dataset) < batch_size:
        raise SegreproError(
            f"{dataset.split_file}: {len(dataset)} images, fewer than the batch size {batch_size}")
    sampler = IterationBatchSampler(len(dataset), batch_size, seed, start_iteration,
                                    iterations=iterations)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                      persistent_workers=num_workers > 0, pin_memory=pin_memory)
