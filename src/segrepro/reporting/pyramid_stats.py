"""The ground-truth pyramid statistics table (results/tables/pyramid_stats.md): per level the share of
unity / mix / ignore cells, per class the share of its pixels first covered by a unity cell at each
level (SaF Sec. 1 and 5.5: most pixels are settled at coarse levels, stuff coarser than things),
from the counts segrepro.engine.pyramid_store.pyramid_stats makes of the stored pyramids. Torch-free.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from segrepro.reporting.markdown import MISSING, fmt, write_files

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


def _median_stride(counts: np.ndarray, strides) -> str:
    """The stride at which half of the pixels (counted coarse -> fine) are settled."""
    total = counts.sum()
    if total == 0:
        return MISSING
    level = int(np.searchsorted(np.cumsum(counts), total / 2.0))
    return str(strides[level]) if level < len(strides) else "never"


def _pct(part, whole) -> float:
    return 100.0 * part / whole if whole else float("nan")


def write_pyramid_stats(stats: dict, out_md) -> None:
    """Write the pyramid statistics (Sec. 1's observation, cf. Sec. 5.5) as Markdown + CSV.

    (a) per level, the share of unity / mix / ignore cells; (b) per class, the share of its
    pixels first covered by a ground-truth unity cell at each level, sorted so the classes
    settled coarsest come first, with stuff/thing marked where the dataset card tells. `stats`:
    the counts of segrepro.engine.pyramid_store.pyramid_stats.
    """
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
        level_md.append(f"| {r['level']} | {r['stride']} | {r['count']} | {fmt(r['unity_pct'], 1)}"
                        f" | {fmt(r['mix_pct'], 1)} | {fmt(r['ignore_pct'], 1)} |")

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
                str(r["count"]), *(fmt(r[f"{c}_pct"], 1) for c in level_cols), r["median_stride"]]
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
    write_files(Path(out_md), "\n".join(text), frame)
