"""The ground-truth pyramid statistics table (results/tables/pyramid_stats.md): per level the share of
unity / mix / ignore cells, per class the share of its pixels first covered by a unity cell at each
level (SaF Sec. 1 and 5.5: most pixels are settled at coarse levels, stuff coarser than things),
from the stored pyramids of segrepro.pyramid_store.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from segrepro.data.dataset import SegmentationDataset
from segrepro.errors import SegreproError
from segrepro.pyramid_store import (
    STORED_IGNORE,
    check_strides,
    evaluation_label,
    read_index,
    read_pyramid,
)
from segrepro.tables import MISSING, write_table

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
    geometry = (f"- Evaluation size: {size}, resized (nearest) to the nearest multiple of {strides[0]}"
                " (Sec. 3.1); pixels and cells are counted at that size")
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
