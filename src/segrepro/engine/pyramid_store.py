"""Ground-truth pyramids of a dataset split, stored on disk.

SaF (Sec. 3.1, App. B) derives from every per-pixel label a semantic pyramid Y^(l) and a unity
pyramid U^(l). The level analysis (Sec. 5.5, Table 9, Fig. 3) compares a trained model's
pyramid with these ground truths on evaluation images, so they are computed once per split
here, on the label at the size the single-scale protocol feeds the network: the evaluation size
resized to the nearest size divisible by the coarsest stride (Sec. 3.1).

Files: <out_dir>/<image_id>.npz holds uint8 arrays `semantic_s{stride}` and `unity_s{stride}`
for every stride, coarse -> fine (255 = ignore; unity 1 = unity cell, 0 = mix cell), and
<out_dir>/index.yaml records ids, sizes, strides, base_size and the dataset fingerprint.
The pyramid rule itself lives in segrepro.models.saf.pyramid.pyramid_targets; this module only feeds it.
"""

from __future__ import annotations

import itertools
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from segrepro.core import atomic
from segrepro.core.errors import SegreproError
from segrepro.data.dataset import SegmentationDataset
from segrepro.engine.inference import scaled_size
from segrepro.models.saf.pyramid import nearest_divisible_size, pyramid_targets

STORED_IGNORE = 255  # what the .npz files hold for "don't care", whatever the dataset's ignore_index
INDEX_NAME = "index.yaml"
INDEX_FORMAT = "segrepro ground-truth pyramids v2"  # v2: resized to a divisible size, not padded
BATCH = 16  # labels of one size sent to pyramid_targets together


# ----------------------------------------------------------------------------- evaluation geometry

def evaluation_size(height: int, width: int, base_size: int | None = None) -> tuple[int, int]:
    """(h, w) the single-scale protocol scales an image to: the image itself, or its long side
    set to `base_size` (segrepro.engine.inference.scaled_size at scale 1)."""
    return scaled_size(int(height), int(width), 1.0, base_size)


def network_size(height: int, width: int, base_size: int | None = None, multiple: int = 32) -> tuple[int, int]:
    """(h, w) the network sees: the evaluation size resized to the nearest size divisible by the
    coarsest stride (Sec. 3.1), as SpecializeFuse.predict does."""
    return nearest_divisible_size(*evaluation_size(height, width, base_size), multiple)


def evaluation_label(label: np.ndarray, base_size: int | None, multiple: int = 32,
                     ignore_index: int = 255) -> np.ndarray:
    """The label at network size (uint8, H', W' divisible by `multiple`), resized nearest from
    the original label. Sec. 3.1 resizes the input to the nearest divisible size (no padding),
    so the ground-truth pyramids are built on that grid. `ignore_index` is kept in the
    signature for callers; nothing is padded with it any more."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"expected a label of shape (H, W), got {label.shape}")
    if label.dtype != np.uint8:
        if label.size and (label.min() < 0 or label.max() > 255):
            raise ValueError("label values must fit in uint8 (0..255)")
        label = label.astype(np.uint8)
    h, w = network_size(*label.shape, base_size, multiple)
    if (h, w) != label.shape:
        # Nearest keeps labels labels; PIL's NEAREST, as the training augmentation uses.
        label = np.asarray(Image.fromarray(label).resize((w, h), Image.NEAREST))
    return np.ascontiguousarray(label)


def evaluation_image(image: torch.Tensor, base_size: int | None, multiple: int = 32) -> torch.Tensor:
    """A normalised image (1,3,H,W) at network size, the way the single-scale protocol gets
    there: bilinear (align_corners=False) to the evaluation size, then, as
    SpecializeFuse.predict, to the nearest size divisible by `multiple` (Sec. 3.1)."""
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"expected one image of shape (1,C,H,W), got {tuple(image.shape)}")
    h, w = evaluation_size(image.shape[-2], image.shape[-1], base_size)
    for size in ((h, w), nearest_divisible_size(h, w, multiple)):
        if size != tuple(image.shape[-2:]):
            image = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
    return image


# ----------------------------------------------------------------------------- writing

def check_strides(strides) -> tuple[int, ...]:
    try:
        strides = tuple(int(s) for s in strides)
    except (TypeError, ValueError):
        raise SegreproError(f"strides must be a list of integers, got {strides!r}") from None
    ok = bool(strides) and all(s >= 1 for s in strides) and all(
        coarse > fine and coarse % fine == 0 for coarse, fine in itertools.pairwise(strides))
    if not ok:
        raise SegreproError(
            f"strides {list(strides)} must be coarse -> fine, each dividing the next coarser one")
    return strides


def _stored(values: torch.Tensor, ignore_index: int) -> np.ndarray:
    """int64 pyramid map -> uint8 with 255 for ignore (class indices are < ignore_index <= 255)."""
    values = values.clone()
    values[values == ignore_index] = STORED_IGNORE
    return values.to(torch.uint8).numpy()


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    # Through a file handle: np.savez would append ".npz" to the atomic temp name.
    def writer(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)

    atomic.write_with(path, writer)


def _flush(batch: list[tuple[str, np.ndarray]], strides, ignore_index: int, folder: Path) -> None:
    """One pyramid_targets call for labels of one size (App. B), one .npz per image."""
    labels = torch.from_numpy(np.stack([label for _, label in batch]).astype(np.int64))
    semantic, unity = pyramid_targets(labels, list(strides), ignore_index)
    for i, (image_id, _) in enumerate(batch):
        arrays = {}
        for level, stride in enumerate(strides):
            arrays[f"semantic_s{stride}"] = _stored(semantic[level][i], ignore_index)
            arrays[f"unity_s{stride}"] = _stored(unity[level][i], ignore_index)
        _save_npz(folder / f"{image_id}.npz", arrays)


def write_pyramids(dataset_root, split: str, out_dir, base_size: int | None = None,
                   strides=(32, 16, 8, 4)) -> Path:
    """Write the ground-truth pyramids of every image of `split` to `out_dir` and return it.

    The folder is built as a hidden sibling and renamed into place at the end (it is a
    Snakemake directory() output), so a killed job never leaves a folder that looks complete.
    A corrupt or invalid label raises SegreproError naming its file.
    """
    strides = check_strides(strides)
    out_dir = Path(out_dir)
    dataset = SegmentationDataset(dataset_root, split)
    ignore_index = dataset.ignore_index
    multiple = strides[0]  # the coarsest cell must tile the label (Sec. 3.1)

    with atomic.build_directory(out_dir) as tmp:
        sizes: dict[str, list[int]] = {}
        pending: dict[tuple[int, int], list[tuple[str, np.ndarray]]] = {}
        for index, image_id in enumerate(dataset.ids):
            _, label = dataset.load_pair(index)  # checks readability, size and label values
            resized = evaluation_label(label, base_size, multiple, ignore_index)
            sizes[image_id] = list(resized.shape)
            batch = pending.setdefault(resized.shape, [])
            batch.append((image_id, resized))
            if len(batch) == BATCH:
                _flush(batch, strides, ignore_index, tmp)
                batch.clear()
        for batch in pending.values():
            if batch:
                _flush(batch, strides, ignore_index, tmp)

        card = dataset.card
        index = {
            "format": INDEX_FORMAT,
            "dataset": card["name"],
            "content_sha256": card.get("content_sha256"),
            "split": split,
            "base_size": None if base_size is None else int(base_size),
            "strides": list(strides),
            "size_multiple": multiple,
            "ignore": STORED_IGNORE,
            "unity_values": {"unity": 1, "mix": 0, "ignore": STORED_IGNORE},
            "count": len(dataset.ids),
            "ids": list(dataset.ids),
            "eval_sizes": sizes,  # (h, w) the network sees; the arrays cover exactly this size
        }
        # Written last: a folder with an index holds every image's file.
        atomic.write_text(tmp / INDEX_NAME, yaml.safe_dump(index, sort_keys=False,
                                                            default_flow_style=None))
    return out_dir


# ----------------------------------------------------------------------------- reading

def read_pyramid(path) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{stride: (semantic, unity)} of one stored image, coarse -> fine; uint8, 255 = ignore."""
    path = Path(path)
    if not path.is_file():
        raise SegreproError(f"{path}: pyramid file not found")
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):  # a bare .npy array
            raise SegreproError(f"{path}: not a pyramid .npz archive")
        with data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise SegreproError(f"{path}: cannot read pyramid: {' '.join(str(exc).split())}") from None

    strides = set()
    for key in arrays:
        kind, _, stride = key.rpartition("_s")
        if kind in ("semantic", "unity") and stride.isdigit():
            strides.add(int(stride))
    if not strides:
        raise SegreproError(f"{path}: no semantic_s*/unity_s* arrays")
    pyramid, extent = {}, None
    for stride in sorted(strides, reverse=True):
        pair = []
        for kind in ("semantic", "unity"):
            key = f"{kind}_s{stride}"
            if key not in arrays:
                raise SegreproError(f"{path}: array {key} is missing")
            if arrays[key].dtype != np.uint8 or arrays[key].ndim != 2:
                raise SegreproError(f"{path}: array {key} must be 2-D uint8, got {arrays[key].dtype}"
                                    f" {arrays[key].shape}")
            pair.append(arrays[key])
        semantic, unity = pair
        size = (semantic.shape[0] * stride, semantic.shape[1] * stride)
        if unity.shape != semantic.shape or (extent is not None and size != extent):
            raise SegreproError(f"{path}: arrays of stride {stride} do not cover the same image")
        extent = size
        if not np.isin(unity, (0, 1, STORED_IGNORE)).all():
            raise SegreproError(f"{path}: unity_s{stride} holds values other than 0, 1, 255")
        pyramid[stride] = (semantic, unity)
    return pyramid


def read_index(pyramid_dir) -> dict:
    """The index.yaml of a pyramid folder, checked; the error names the file."""
    path = Path(pyramid_dir) / INDEX_NAME
    if not path.is_file():
        raise SegreproError(f"{path}: pyramid index not found (run write_pyramids first)")
    try:
        index = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise SegreproError(f"{path}: cannot read pyramid index: {' '.join(str(exc).split())}") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise SegreproError(f"{path}: not a pyramid index ({INDEX_FORMAT})")
    for key in ("split", "base_size", "strides", "ids", "eval_sizes"):
        if key not in index:
            raise SegreproError(f"{path}: key '{key}' is missing")
    return index


# ----------------------------------------------------------------------------- statistics

def _first_unity_level(pyramid: dict, strides) -> np.ndarray:
    """Per finest cell, the index (0 = coarsest) of the coarsest level whose cell over it is a
    unity cell, or len(strides) ("never") if none is; this is the level Eq. 2 would fuse from
    with a perfect unity pyramid (Sec. 3.3)."""
    finest = strides[-1]
    shape = pyramid[finest][1].shape
    first = np.full(shape, len(strides), np.int64)
    # Fine to coarse, so the coarsest unity level is written last and wins.
    for level in range(len(strides) - 1, -1, -1):
        factor = strides[level] // finest
        unity = pyramid[strides[level]][1]
        up = np.repeat(np.repeat(unity, factor, axis=0), factor, axis=1)
        first[up == 1] = level
    return first


def pyramid_stats(pyramid_dir, dataset_root) -> dict:
    """Counts behind the pyramid-statistics table.

    Returns {"index", "card", "strides", "cells": (L, 3) int [unity, mix, ignore] per level,
    "pixels": (C, L + 1) int, per class the valid pixels whose coarsest unity cell is at each
    level (last column: never, not even at the finest)}. Pixels and cells are counted at the
    size the network sees (the evaluation size resized to a divisible one, Sec. 3.1).
    """
    pyramid_dir = Path(pyramid_dir)
    index = read_index(pyramid_dir)
    strides = check_strides(index["strides"])
    dataset = SegmentationDataset(dataset_root, index["split"])
    card = dataset.card
    theirs, ours = index.get("content_sha256"), card.get("content_sha256")
    if theirs and ours and theirs != ours:
        raise SegreproError(f"{pyramid_dir}: pyramids were built from other data than {dataset.root}"
                            f" (content_sha256 {theirs[:12]}… vs {ours[:12]}…)")
    position = {image_id: i for i, image_id in enumerate(dataset.ids)}
    num_classes, ignore = dataset.num_classes, dataset.ignore_index
    L = len(strides)
    cells = np.zeros((L, 3), np.int64)
    pixels = np.zeros((num_classes, L + 1), np.int64)
    for image_id in index["ids"]:
        if image_id not in position:
            raise SegreproError(f"{pyramid_dir}: image {image_id} is not in split"
                                f" '{index['split']}' of {dataset.root}")
        path = pyramid_dir / f"{image_id}.npz"
        pyramid = read_pyramid(path)
        if tuple(pyramid) != strides:
            raise SegreproError(f"{path}: strides {list(pyramid)} differ from the index's {list(strides)}")
        _, raw = dataset.load_pair(position[image_id])
        label = evaluation_label(raw, index["base_size"], strides[0], ignore)
        if pyramid[strides[0]][0].shape[0] * strides[0] != label.shape[0] or \
                pyramid[strides[0]][0].shape[1] * strides[0] != label.shape[1]:
            raise SegreproError(f"{path}: pyramid does not match the {label.shape[1]}x{label.shape[0]}"
                                f" evaluation label of {image_id}")

        # (a) cell kinds per level (the label is resized to a divisible size, Sec. 3.1: no padding).
        for level, stride in enumerate(strides):
            unity = pyramid[stride][1]
            cells[level] += [(unity == 1).sum(), (unity == 0).sum(), (unity == STORED_IGNORE).sum()]

        # (b) per class, where each valid pixel is settled.
        first = _first_unity_level(pyramid, strides)
        finest = strides[-1]
        first = np.repeat(np.repeat(first, finest, axis=0), finest, axis=1)
        valid = label != ignore
        codes = label[valid].astype(np.int64) * (L + 1) + first[valid]
        pixels += np.bincount(codes, minlength=num_classes * (L + 1)).reshape(num_classes, L + 1)
    return {"index": index, "card": card, "strides": strides, "cells": cells, "pixels": pixels}
