"""Ground-truth pyramids of a dataset split, stored on disk, and their statistics.

SaF (Sec. 3.1, App. B) derives from every per-pixel label a semantic pyramid Y^(l) and a unity
pyramid U^(l). The level analysis (Sec. 5.5, Table 9, Fig. 3) compares a trained model's
pyramid with these ground truths on evaluation images, so they are computed once per split
here, on the label at the size the single-scale protocol feeds the network, with the sides
padded with ignore up to a multiple of the coarsest stride.

Files: <out_dir>/<image_id>.npz holds uint8 arrays `semantic_s{stride}` and `unity_s{stride}`
for every stride, coarse -> fine (255 = ignore; unity 1 = unity cell, 0 = mix cell), and
<out_dir>/index.yaml records ids, sizes, strides, base_size and the dataset fingerprint.
The pyramid rule itself lives in segrepro.pyramid.pyramid_targets; this module only feeds it.
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from segrepro import atomic
from segrepro.data.dataset import SegmentationDataset
from segrepro.errors import SegreproError
from segrepro.inference import scaled_size
from segrepro.pyramid import pyramid_targets
from segrepro.tables import MISSING, write_table

STORED_IGNORE = 255  # what the .npz files hold for "don't care", whatever the dataset's ignore_index
INDEX_NAME = "index.yaml"
INDEX_FORMAT = "segrepro ground-truth pyramids v1"
BATCH = 16  # labels of one size sent to pyramid_targets together


# ----------------------------------------------------------------------------- evaluation geometry

def evaluation_size(height: int, width: int, base_size: int | None = None) -> tuple[int, int]:
    """(h, w) the single-scale protocol feeds the network: the image itself, or its long side
    set to `base_size` (segrepro.inference.scaled_size at scale 1)."""
    return scaled_size(int(height), int(width), 1.0, base_size)


def _padded(size: int, multiple: int) -> int:
    return int(math.ceil(size / multiple) * multiple)


def evaluation_label(label: np.ndarray, base_size: int | None, multiple: int = 32,
                     ignore_index: int = 255) -> np.ndarray:
    """The label at evaluation size (nearest resize), padded bottom/right with `ignore_index`
    up to a multiple of `multiple` (uint8, H', W' divisible by `multiple`).

    Sec. 3.1 asks for sides divisible by the coarsest cell; the contract pads with ignore rather
    than resizing, so every valid pixel keeps its evaluation-size position (cells that touch the
    padding become "class + don't care" cells, App. B case 3).
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"expected a label of shape (H, W), got {label.shape}")
    if label.dtype != np.uint8:
        if label.size and (label.min() < 0 or label.max() > 255):
            raise ValueError("label values must fit in uint8 (0..255)")
        label = label.astype(np.uint8)
    h, w = evaluation_size(*label.shape, base_size)
    if (h, w) != label.shape:
        # Nearest keeps labels labels; PIL's NEAREST, as the training augmentation uses.
        label = np.asarray(Image.fromarray(label).resize((w, h), Image.NEAREST))
    out = np.full((_padded(h, multiple), _padded(w, multiple)), ignore_index, np.uint8)
    out[:h, :w] = label
    return out


def evaluation_image(image: torch.Tensor, base_size: int | None, multiple: int = 32) -> torch.Tensor:
    """A normalised image (1,3,H,W) at evaluation size (bilinear, align_corners=False, as the
    inference protocol resizes), padded bottom/right with 0 (the mean after normalisation) up to
    a multiple of `multiple`; the same geometry as `evaluation_label`."""
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"expected one image of shape (1,C,H,W), got {tuple(image.shape)}")
    h, w = evaluation_size(image.shape[-2], image.shape[-1], base_size)
    if (h, w) != tuple(image.shape[-2:]):
        image = F.interpolate(image, size=(h, w), mode="bilinear", align_corners=False)
    ph, pw = _padded(h, multiple) - h, _padded(w, multiple) - w
    if ph or pw:
        image = F.pad(image, (0, pw, 0, ph), value=0.0)
    return image


# ----------------------------------------------------------------------------- writing

def _check_strides(strides) -> tuple[int, ...]:
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


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out_dir)


def write_pyramids(dataset_root, split: str, out_dir, base_size: int | None = None,
                   strides=(32, 16, 8, 4)) -> Path:
    """Write the ground-truth pyramids of every image of `split` to `out_dir` and return it.

    The folder is built as a hidden sibling and renamed into place at the end (it is a
    Snakemake directory() output), so a killed job never leaves a folder that looks complete.
    A corrupt or invalid label raises SegreproError naming its file.
    """
    strides = _check_strides(strides)
    out_dir = Path(out_dir)
    dataset = SegmentationDataset(dataset_root, split)
    ignore_index = dataset.ignore_index
    multiple = strides[0]  # the coarsest cell must tile the padded label (Sec. 3.1)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        sizes: dict[str, list[int]] = {}
        pending: dict[tuple[int, int], list[tuple[str, np.ndarray]]] = {}
        for index, image_id in enumerate(dataset.ids):
            _, label = dataset.load_pair(index)  # checks readability, size and label values
            padded = evaluation_label(label, base_size, multiple, ignore_index)
            sizes[image_id] = list(evaluation_size(*label.shape, base_size))
            batch = pending.setdefault(padded.shape, [])
            batch.append((image_id, padded))
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
            "pad_multiple": multiple,
            "ignore": STORED_IGNORE,
            "unity_values": {"unity": 1, "mix": 0, "ignore": STORED_IGNORE},
            "count": len(dataset.ids),
            "ids": list(dataset.ids),
            "eval_sizes": sizes,  # (h, w) before padding; the arrays cover the padded size
        }
        # Written last: a folder with an index holds every image's file.
        atomic.write_text(tmp / INDEX_NAME, yaml.safe_dump(index, sort_keys=False,
                                                            default_flow_style=None))
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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

def _stuff_names(card: dict) -> set[str] | None:
    """Names of the stuff classes, when the card tells: a `stuff_classes` list, or the synthetic
    generator (whose module defines STUFF_CLASSES); None when unknown."""
    if isinstance(card.get("stuff_classes"), list):
        return {str(name) for name in card["stuff_classes"]}
    generator = card.get("generator")
    if isinstance(generator, dict) and generator.get("module") == "segrepro.data.synthetic":
        from segrepro.data import synthetic

        if list(card["class_names"]) == list(synthetic.CLASS_NAMES):
            return {synthetic.CLASS_NAMES[i] for i in synthetic.STUFF_CLASSES}
    return None


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


def _median_stride(counts: np.ndarray, strides) -> str:
    """The stride at which half of the pixels (counted coarse -> fine) are settled."""
    total = counts.sum()
    if total == 0:
        return MISSING
    level = int(np.searchsorted(np.cumsum(counts), total / 2.0))
    return str(strides[level]) if level < len(strides) else "never"


def _pct(part, whole) -> float:
    return 100.0 * part / whole if whole else float("nan")


def _f(value: float) -> str:
    return MISSING if value is None or math.isnan(value) else f"{value:.1f}"


def pyramid_stats(pyramid_dir, dataset_root) -> dict:
    """Counts behind the pyramid-statistics table.

    Returns {"index", "card", "strides", "cells": (L, 3) int [unity, mix, ignore] per level over
    cells that overlap the unpadded image, "pixels": (C, L + 1) int, per class the valid pixels
    whose coarsest unity cell is at each level (last column: never, not even at the finest)}.
    Pixels are counted at evaluation size.
    """
    pyramid_dir = Path(pyramid_dir)
    index = read_index(pyramid_dir)
    strides = _check_strides(index["strides"])
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
        h, w = evaluation_size(*raw.shape, index["base_size"])

        # (a) cell kinds, over cells that overlap the image (cells wholly in padding say nothing).
        for level, stride in enumerate(strides):
            unity = pyramid[stride][1][: math.ceil(h / stride), : math.ceil(w / stride)]
            cells[level] += [(unity == 1).sum(), (unity == 0).sum(), (unity == STORED_IGNORE).sum()]

        # (b) per class, where each valid pixel is settled; padding is ignore, so it drops out.
        first = _first_unity_level(pyramid, strides)
        finest = strides[-1]
        first = np.repeat(np.repeat(first, finest, axis=0), finest, axis=1)
        valid = label != ignore
        codes = label[valid].astype(np.int64) * (L + 1) + first[valid]
        pixels += np.bincount(codes, minlength=num_classes * (L + 1)).reshape(num_classes, L + 1)
    return {"index": index, "card": card, "strides": strides, "cells": cells, "pixels": pixels}


def write_pyramid_stats(pyramid_dir, dataset_root, out_md) -> None:
    """Write the pyramid statistics (Sec. 1's observation, cf. Sec. 5.5) as Markdown + CSV.

    (a) per level, the share of unity / mix / ignore cells; (b) per class, the share of its
    pixels first covered by a ground-truth unity cell at each level, sorted so the classes
    settled coarsest come first, with stuff/thing marked where the dataset card tells.
    """
    stats = pyramid_stats(pyramid_dir, dataset_root)
    index, card, strides = stats["index"], stats["card"], stats["strides"]
    cells, pixels = stats["cells"], stats["pixels"]
    names = list(card["class_names"])
    stuff = _stuff_names(card)
    L = len(strides)
    level_cols = [f"s{s}" for s in strides] + ["never"]

    records = []
    for level, stride in enumerate(strides):
        total = int(cells[level].sum())
        records.append({"table": "levels", "name": f"level {level + 1}", "level": level + 1,
                        "stride": stride, "kind": "", "count": total,
                        "unity_pct": _pct(cells[level][0], total),
                        "mix_pct": _pct(cells[level][1], total),
                        "ignore_pct": _pct(cells[level][2], total)})
    level_md = ["| Level | Stride | Cells | Unity (%) | Mix (%) | Ignore (%) |",
                "|---|:---:|:---:|:---:|:---:|:---:|"]
    for r in records:
        level_md.append(f"| {r['level']} | {r['stride']} | {r['count']} | {_f(r['unity_pct'])}"
                        f" | {_f(r['mix_pct'])} | {_f(r['ignore_pct'])} |")

    def kind_of(name: str) -> str:
        return "" if stuff is None else ("stuff" if name in stuff else "thing")

    def class_record(name: str, kind: str, counts: np.ndarray) -> dict:
        total = int(counts.sum())
        record = {"table": "classes", "name": name, "kind": kind, "count": total}
        for col, n in zip(level_cols, counts):
            record[f"{col}_pct"] = _pct(n, total)
        record["median_stride"] = _median_stride(counts, strides)
        return record

    rows = [class_record(name, kind_of(name), pixels[c]) for c, name in enumerate(names)]
    # Settled coarsest first (share at stride 32, then 16, ...); classes without pixels last.
    rows.sort(key=lambda r: (r["count"] == 0,
                             *(-(0.0 if r["count"] == 0 else r[f"{c}_pct"]) for c in level_cols[:L]),
                             r["name"]))
    summary = []
    if stuff is not None:
        for kind in ("stuff", "thing"):
            members = [c for c, name in enumerate(names) if kind_of(name) == kind]
            summary.append(class_record(f"all {kind}", kind, pixels[members].sum(axis=0)))
    summary.append(class_record("all classes", "", pixels.sum(axis=0)))

    with_kind = stuff is not None
    head = ["Class", *(["Kind"] if with_kind else []), "Pixels",
            *(f"{c} (%)" for c in level_cols), "Median stride"]
    align = ["---", *(["---"] if with_kind else []), *([":---:"] * (len(head) - 1 - with_kind))]
    class_md = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    for r, bold in [(r, False) for r in rows] + [(r, True) for r in summary]:
        line = [f"**{r['name']}**" if bold else r["name"], *([r["kind"]] if with_kind else []),
                str(r["count"]), *(_f(r[f"{c}_pct"]) for c in level_cols), r["median_stride"]]
        class_md.append("| " + " | ".join(line) + " |")

    size = "original size" if index["base_size"] is None else f"long side {index['base_size']}"
    stride_text = ", ".join(str(s) for s in strides)
    how_to_read = (
        f"How to read: (a) gives, per pyramid level, the share of cells that are unity (one class),"
        f" mix (two or more classes) or ignore (one class plus don't-care, App. B); (b) gives, per"
        f" class, the share of its valid pixels whose coarsest ground-truth unity cell has each"
        f" stride (\"never\": not even its stride-{strides[-1]} cell is unity), classes settled"
        f" coarsest first — for {card['name']}, split {index['split']}, {index['count']} images,"
        f" strides {stride_text}.")
    geometry = (f"- Evaluation size: {size}, padded with ignore to a multiple of {strides[0]};"
                " pixels are counted at this size, cells only where they overlap the unpadded image")
    text = [
        "# Ground-truth pyramid statistics",
        "",
        how_to_read,
        "",
        f"- Dataset: {card['name']} (content_sha256 {index.get('content_sha256') or MISSING})",
        f"- Split: {index['split']} ({index['count']} images)",
        f"- Strides: {stride_text} (level 1 = stride {strides[0]}, coarsest)",
        geometry,
        "",
        "## (a) Cells per level",
        "",
        *level_md,
        "",
        "## (b) Pixels per class, by the level of their coarsest unity cell",
        "",
        *class_md,
        "",
    ]
    frame = pd.DataFrame.from_records(records + rows + summary)
    for column in ("level", "stride"):  # integers, blank on class rows (not 1.0 / NaN)
        frame[column] = frame[column].astype("Int64")
    write_table(Path(out_md), "\n".join(text), frame)
