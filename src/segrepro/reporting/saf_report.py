"""SaF reports drawn from `segrepro.engine.saf_analysis` results: Table 9 (`write_level_table`) and
Fig. 3 / Fig. C (`plot_levels_per_class`). Torch-free: Fig. A, which runs the model, is drawn by
segrepro.engine.figures.

Levels are ordered coarse -> fine in every list (index 0 = level 1 = coarsest); only the
rendered Table 9 runs fine -> coarse, as the paper prints it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from segrepro.config.table_specs import check_table_spec
from segrepro.core import atomic
from segrepro.core.errors import SegreproError
from segrepro.reporting.bootstrap import welch
from segrepro.reporting.markdown import (
    CONTRADICTED,
    MISSING,
    NOT_TOLD_APART,
    REPRODUCED,
    check_header,
    claim_line,
    claim_record,
    escape_cell,
    fmt,
    fmt_header_value,
    fmt_interval,
    header_claims_document,
    header_lines,
    pair_record,
    paper_note,
    verdict_of,
    write_files,
)

PAPER_STRIDES = (32, 16, 8, 4)  # Table 9 is for L = 4 levels of strides {32, 16, 8, 4} (Sec. 5.1.3)
DEFAULT_CLAIM = "For every assignment level ℓ, the semantic level ℓ' = ℓ has the highest mIoU"
LEVEL_CLAIMS_NOTE = (
    "Δ ± h: a column's diagonal cell minus another level's, with the 95 % interval from the seeds alone"
    " (Welch's t: these cells have no per-image form); a column is ✅ when its diagonal beats every other"
    " level beyond its interval, the caption's claim when every column is."
)
CLIP = (-15.0, 1.0)  # App. E clips the Fig. C heatmaps to [-15 %, 1 %]


# ----------------------------------------------------------------------------- Table 9

def _seed_cell(values) -> tuple[float, float, int] | None:
    """(mean, sample std, n) over the seeds where the value is defined; None if nowhere."""
    arr = np.asarray([float(v) for v in values if v is not None], dtype=float)
    if arr.size == 0:
        return None
    return float(arr.mean()), (float(arr.std(ddof=1)) if arr.size > 1 else float("nan")), int(arr.size)


def _fmt_seeds(cell) -> str:
    if cell is None:
        return MISSING
    mean, std, n = cell
    return fmt(mean) if n == 1 else f"{fmt(mean)} ± {fmt(std)}"


def _lvl(level: int, stride: int, prime: str = "") -> str:
    return f"ℓ{prime}={level} (s{stride})"


def _check_analyses(name: str, analyses: list[dict]) -> tuple[int, ...]:
    if not analyses:
        raise SegreproError(f"table {name!r}: no level analyses (one per seed) were given")
    strides = None
    for i, analysis in enumerate(analyses):
        for key in ("strides", "level_by_assignment_miou", "assignment_share", "unity"):
            if key not in analysis:
                raise SegreproError(f"table {name!r}: analysis {i + 1} has no {key!r}")
        these = tuple(int(s) for s in analysis["strides"])
        if strides is not None and these != strides:
            raise SegreproError(
                f"table {name!r}: analysis {i + 1} has strides {list(these)}, the first {list(strides)}")
        strides = these
        matrix = analysis["level_by_assignment_miou"]
        if len(matrix) != len(strides) or any(len(row) != len(strides) for row in matrix):
            raise SegreproError(f"table {name!r}: analysis {i + 1}: the level matrix is not"
                                f" {len(strides)}x{len(strides)}")
    return strides


def _column_claim(column: int, strides, ours, paper, missing_note: str) -> dict:
    """Does semantic level l' = l win column l (Table 9 caption)? A claim record
    (markdown.claim_record) with a pair per other level. The cells have no per-image form: the
    intervals come from the seeds alone (Welch's t)."""
    L = len(strides)
    head = f"{_lvl(column + 1, strides[column])}: ℓ'={column + 1} has the highest mIoU"
    diag = ours[column][column]
    others = [sem for sem in reversed(range(L)) if sem != column and ours[sem][column] is not None]
    pairs = []
    if diag is None:
        verdict, intervals = CONTRADICTED, []
        evidence = f"no labelled pixel was assigned to ℓ={column + 1}"
    elif not others:
        verdict, intervals = REPRODUCED, []
        evidence = f"ℓ'={column + 1} {fmt(diag[0])}, no other level defined"
    else:
        # Every other level must lose; shown: the strongest competitor (on a tie the finer row).
        intervals = [welch(ours[sem][column], diag) for sem in others]
        verdict = verdict_of(intervals)
        pairs = [pair_record(f"ℓ'={column + 1}", f"ℓ'={sem + 1}", "miou", diag[0], ours[sem][column][0], interval)
                 for sem, interval in zip(others, intervals)]
        rival = max(others, key=lambda sem: ours[sem][column][0])
        evidence = (f"ℓ'={column + 1} {fmt(diag[0])} vs ℓ'={rival + 1} {fmt(ours[rival][column][0])}: "
                    f"{fmt_interval(welch(ours[rival][column], diag))}")
        if any(iv.basis == "none" for iv in intervals):
            evidence += " [no interval: one seed, and these cells have no per-image form]"
    if paper is None:
        note = missing_note
    else:
        theirs = [paper[sem][column] for sem in range(L)]
        if any(v is None for v in theirs):
            note = paper_note(None)
        else:
            margins = [theirs[column] - theirs[sem] for sem in range(L) if sem != column]
            note = paper_note(all(m > 0 for m in margins), min(margins) if margins else None)
    return claim_record(head, verdict, evidence, note, pairs, basis=sorted({iv.basis for iv in intervals}))


def verdict_of_columns(verdicts: list[str]) -> str:
    """The caption's claim holds in every column: ✅ if each is, ❌ if one is contradicted."""
    if CONTRADICTED in verdicts:
        return CONTRADICTED
    return REPRODUCED if all(v == REPRODUCED for v in verdicts) else NOT_TOLD_APART


def _plot_matrices(ours, paper, strides, paper_strides, out_png: Path) -> None:
    """Heatmap of our matrix (left) and the paper's (right), both printed fine -> coarse."""
    from matplotlib.figure import Figure

    def grid(matrix):
        n = len(matrix)
        return np.array([[np.nan if matrix[r][c] is None else matrix[r][c] for c in reversed(range(n))]
                         for r in reversed(range(n))], dtype=float)

    panels = [("ours (mean over seeds)", grid(ours), strides)]
    if paper is not None:
        panels.append((f"paper (L={len(paper)})", grid(paper), paper_strides))
    values = np.concatenate([g.ravel() for _, g, _ in panels])
    finite = values[np.isfinite(values)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 100.0)
    if vmax <= vmin:
        vmin, vmax = vmin - 1.0, vmax + 1.0

    fig = Figure(figsize=(4.6 * len(panels) + 1.2, 4.6), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    image = None
    for ax, (title, g, panel_strides) in zip(axes, panels):
        n = len(g)
        image = ax.imshow(np.ma.masked_invalid(g), cmap="viridis", vmin=vmin, vmax=vmax)
        labels = [f"{n - i} (s{panel_strides[n - 1 - i]})" for i in range(n)]
        ax.set_xticks(range(n), labels, fontsize=8)
        ax.set_yticks(range(n), labels, fontsize=8)
        ax.set_xlabel("assignment level ℓ (unity pyramid)")
        ax.set_ylabel("semantic level ℓ'")
        ax.set_title(title)
        middle = (vmin + vmax) / 2
        for r in range(n):
            for c in range(n):
                v = g[r, c]
                text = MISSING if math.isnan(v) else f"{v:.1f}"
                colour = "black" if not math.isnan(v) and v > middle else "white"
                ax.text(c, r, text, ha="center", va="center", fontsize=9, color=colour,
                        fontweight="bold" if r == c else "normal")
    fig.colorbar(image, ax=list(axes), label="mIoU (%)")
    fig.suptitle("Table 9: mIoU of semantic level ℓ' on the pixels assigned to level ℓ")
    _save_figure(fig, out_png)


def write_level_table(name: str, spec: dict, analyses: list[dict], header: dict, out_md) -> None:
    """Write Table 9 (Sec. 5.5) as Markdown, a long-format CSV and a heatmap PNG beside it.

    `analyses` holds one `analyse_levels` result per seed; cells are means over the seeds.
    `spec` = {title, kind: level_matrix, metrics, rows: [one row], paper_matrix: [[...]]};
    the paper's matrix is printed with rows ℓ' and columns ℓ from fine (ℓ = 4) to coarse
    (ℓ = 1), and ours is rendered the same way. `header` has the keys of tables.build_table.
    The CSV and the PNG are written before the .md, so the .md implies both are complete.
    """
    check_table_spec(name, spec)
    check_header(name, header)
    paper_matrix = spec.get("paper_matrix")
    strides = _check_analyses(name, analyses)
    L = len(strides)
    paper_strides = PAPER_STRIDES
    # The paper prints [l'=4..1][l=4..1]; re-index it coarse -> fine like ours. Its cells sit beside
    # ours only when the run has the paper's levels.
    paper_cf = None
    if paper_matrix is not None:
        n = len(paper_matrix)
        paper_cf = [[paper_matrix[n - 1 - sem][n - 1 - level] for level in range(n)] for sem in range(n)]
    paper = paper_cf if paper_cf is not None and strides == paper_strides else None
    ours = [[_seed_cell(a["level_by_assignment_miou"][sem][level] for a in analyses) for level in range(L)]
            for sem in range(L)]

    # Matrix, fine -> coarse as in the paper; ours (paper) per cell, our column best in bold.
    order = list(reversed(range(L)))
    columns = ["ℓ' \\ ℓ"] + [_lvl(level + 1, strides[level]) for level in order]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(["---"] + [":---:"] * L) + "|"]
    best = []
    for level in range(L):
        defined = [sem for sem in order if ours[sem][level] is not None]
        best.append(max(defined, key=lambda sem: ours[sem][level][0]) if defined else None)
    records = []
    for sem in order:
        cells = [_lvl(sem + 1, strides[sem], "'")]
        for level in order:
            cell, ref = ours[sem][level], None if paper is None else paper[sem][level]
            text = _fmt_seeds(cell)
            if best[level] == sem:
                text = f"**{text}**"
            cells.append(text if paper is None else f"{text} ({fmt(ref)})")
            records.append({
                "semantic_level": sem + 1, "semantic_stride": strides[sem],
                "assignment_level": level + 1, "assignment_stride": strides[level],
                "ours_mean": float("nan") if cell is None else cell[0],
                "ours_std": float("nan") if cell is None else cell[1],
                "n_seeds": 0 if cell is None else cell[2],
                "paper": float("nan") if ref is None else ref,
            })
        lines.append("| " + " | ".join(escape_cell(c) for c in cells) + " |")

    n_seeds = len(analyses)
    if paper is not None:
        how = "the paper's value in parentheses"
    elif paper_matrix is not None:
        how = (f"the paper's matrix is for {len(paper_matrix)} levels (strides "
               f"{', '.join(str(s) for s in paper_strides)}), this run has {L} (strides "
               f"{', '.join(str(s) for s in strides)}): not shown per cell")
    else:
        how = "no paper values given"
    explain = (
        f"Cells: mIoU (%) of the semantic prediction of level ℓ' (rows) over the pixels that the predicted"
        f" unity pyramid assigns to level ℓ (columns, Eq. 2), mean"
        f"{' ± std' if n_seeds > 1 else ''} over {n_seeds} seed{'s' if n_seeds > 1 else ''}; {how}."
        f" Level 1 is the coarsest (stride {strides[0]}); rows and columns run fine → coarse as in the paper;"
        f" bold: our best row of each column."
    )

    # Claim of the Table 9 caption, judged column by column.
    claim = DEFAULT_CLAIM
    if paper_matrix is None:
        missing_note = "no paper values"
    else:
        missing_note = (f"paper's matrix is for {len(paper_matrix)} levels, strides"
                        f" {', '.join(str(s) for s in paper_strides)}: not comparable")
    columns = [_column_claim(level, strides, ours, paper, missing_note) for level in order]
    held = sum(column["verdict"] == REPRODUCED for column in columns)
    overall = verdict_of_columns([column["verdict"] for column in columns])
    if paper is None:
        paper_overall = missing_note
    elif all(v is not None for row in paper for v in row):
        agree = all(paper[c][c] > paper[s][c] for c in range(L) for s in range(L) if s != c)
        paper_overall = "paper's numbers agree" if agree else "paper's numbers disagree"
    else:
        paper_overall = "paper's numbers: incomplete"
    judged = [claim_record(claim, overall, f"{held} of {L} columns", paper_overall,
                           [pair for column in columns for pair in column["pairs"]],
                           basis=sorted({basis for column in columns for basis in column["basis"]})),
              *columns]
    claims = [claim_line(record) for record in judged]

    # Unity head and assignment shares, per level (same fine -> coarse order).
    tau = analyses[0].get("tau")
    unity_lines = [
        "| Level | Stride | Pixels assigned (%) | Unity precision (%) | Unity recall (%) |",
        "|---|:---:|:---:|:---:|:---:|",
    ]
    for level in order:
        share = _seed_cell(a["assignment_share"][level] for a in analyses)
        if level < L - 1:
            entries = [next(u for u in a["unity"] if int(u["stride"]) == strides[level]) for a in analyses]
            precision = _fmt_seeds(_seed_cell(u["precision"] for u in entries))
            recall = _fmt_seeds(_seed_cell(u["recall"] for u in entries))
        else:
            precision = recall = f"{MISSING} (no unity head: every cell is unity)"
        unity_lines.append(f"| {level + 1} | {strides[level]} | {_fmt_seeds(share)} | {precision} | {recall} |")

    text = header_lines(name, spec, header)
    text += ["", explain, "", *lines, "", "## Claims", "", LEVEL_CLAIMS_NOTE, "", *claims, "",
             f"## Unity head and assignment (τ = {fmt_header_value(tau)})", "",
             ("Predicted unity cell: probability ≥ τ; precision and recall against the ground-truth unity"
              " pyramid, don't-care cells excluded. Pixels assigned: share of labelled pixels fused from"
              " each level."), "", *unity_lines]
    out_md = Path(out_md)
    means = [[None if cell is None else cell[0] for cell in row] for row in ours]
    _plot_matrices(means, paper_cf, strides, paper_strides, out_md.with_suffix(".png"))
    write_files(out_md, "\n".join(text) + "\n", pd.DataFrame.from_records(records),
                header_claims_document(name, spec, header, judged, LEVEL_CLAIMS_NOTE))


# ----------------------------------------------------------------------------- figures

def _save_figure(fig, out_png) -> None:
    """Atomic PNG without a version stamp, so equal inputs give equal bytes."""
    atomic.write_with(Path(out_png), lambda tmp: fig.savefig(tmp, format="png", dpi=100,
                                                             metadata={"Software": None}))


def _by_stride(mapping: dict, stride: int):
    # JSON turns the int stride keys into strings; accept both.
    return mapping[str(stride)] if str(stride) in mapping else mapping[stride]


def levels_minus_fused(analyses: list[dict], class_names) -> tuple[list[int], np.ndarray]:
    """(strides, D) with D[l, c] = IoU(level l) − IoU(fused) of class c in points, the mean over
    the seeds where both are defined (NaN where none), unclipped; rows coarse -> fine (App. E).
    A class that neither the level nor the fused output ever gets right (both IoU 0) says nothing
    about specialisation and is left undefined too, rather than shown as "no loss"."""
    if not analyses:
        raise SegreproError("no level analyses were given")
    names = list(class_names)
    strides = [int(s) for s in analyses[0]["strides"]]
    diff = np.full((len(analyses), len(strides), len(names)), np.nan)
    for i, analysis in enumerate(analyses):
        if [int(s) for s in analysis["strides"]] != strides:
            raise SegreproError(f"level analysis {i + 1} has strides {analysis['strides']}, the first {strides}")
        fused = analysis["fused_class_iou"]
        for level, stride in enumerate(strides):
            per_level = _by_stride(analysis["level_class_iou"], stride)
            for c, name in enumerate(names):
                if name not in fused or name not in per_level:
                    raise SegreproError(f"class {name!r} is not in level analysis {i + 1}")
                values = (per_level[name], fused[name])
                if None not in values and values != (0.0, 0.0):
                    diff[i, level, c] = per_level[name] - fused[name]
    defined = np.isfinite(diff)
    counts = defined.sum(axis=0)
    total = np.where(defined, diff, 0.0).sum(axis=0)
    return strides, np.where(counts > 0, total / np.maximum(counts, 1), np.nan)


def plot_levels_per_class(analyses: list[dict], class_names, out_png) -> None:
    """Fig. 3 / Fig. C (App. E): per level and class, IoU(level) − IoU(fused) in points, mean over
    seeds, clipped to [−15, 1]; rows are levels 1..L (coarse -> fine). Undefined cells (and classes
    never recognised) are grey."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    names = list(class_names)
    strides, mean = levels_minus_fused(analyses, names)
    shown = np.clip(mean, *CLIP)  # NaN stays NaN

    fig = Figure(figsize=(max(7.0, 0.14 * len(names) + 2.5), 2.2 + 0.45 * len(strides)), layout="constrained")
    ax = fig.subplots()
    cmap = colormaps["viridis"].with_extremes(bad=(0.8, 0.8, 0.8))
    image = ax.imshow(np.ma.masked_invalid(shown), cmap=cmap, vmin=CLIP[0], vmax=CLIP[1], aspect="auto",
                      interpolation="nearest")
    ax.set_yticks(range(len(strides)), [f"ℓ={level + 1} (s{s})" for level, s in enumerate(strides)])
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6 if len(names) > 40 else 8)
    fig.colorbar(image, ax=ax, label="IoU(level) − IoU(fused) (points)", fraction=0.03, pad=0.01)
    ax.set_title(f"IoU(level) − IoU(fused) per class, clipped to [{CLIP[0]:g}, {CLIP[1]:g}]\n"
                 f"mean over {len(analyses)} seed{'s' if len(analyses) > 1 else ''}; brighter = more specialised;"
                 " grey = undefined or never recognised",
                 fontsize=10)
    _save_figure(fig, out_png)


