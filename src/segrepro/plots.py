"""Plots for where a person would rather look than read: a run's training curve and a table's
paper-vs-ours bars. Both go into the report and into MLflow as artifacts.

matplotlib is imported inside the functions (a bare Figure, no pyplot): the workflow imports the table code
while it builds its DAG and must not pay for it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from segrepro import atomic
from segrepro.errors import SegreproError


def _figure(**kwargs):
    """A bare matplotlib Figure: pyplot's backends and global state are not needed to draw into a
    file (and no figure is left open in a long-lived process)."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _save(fig, out: Path) -> None:
    atomic.write_with(Path(out), lambda tmp: fig.savefig(tmp, format="png", dpi=90))


def read_log(path: Path) -> list[dict]:
    """The records of a run's train_log.jsonl: loss and lr every log_every iterations, and
    val_miou every val_every ones (separate records)."""
    if not Path(path).exists():
        return []
    text = Path(path).read_text()
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        # A torn last line (killed or out of disk mid-write): dropped; a resumed run writes it again.
        lines.pop()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if number < len(lines):
                raise SegreproError(f"{path}: line {number} is not JSON; delete the file (and the run's "
                                    "checkpoint) to train the run again") from None
            # The last line, cut short by a crash (a newline came from an earlier partial write).
    return records


def plot_training_curve(records: list[dict], out: Path, title: str, final_miou: dict[str, float] | None = None) -> None:
    """Loss and learning rate over iterations (train_log.jsonl records), with the validation mIoU
    of `train.val_every` and, if given, the final mIoU of each evaluated protocol at the last
    iteration."""
    steps = [r for r in records if "loss" in r]
    checks = [r for r in records if "val_miou" in r]
    fig = _figure(figsize=(10, 3.4), layout="constrained")
    loss_ax, miou_ax = fig.subplots(1, 2)
    if steps:
        loss_ax.plot([r["iteration"] for r in steps], [r["loss"] for r in steps], color="tab:blue", lw=1.2)
        lr_ax = loss_ax.twinx()
        lr_ax.plot([r["iteration"] for r in steps], [r["lr"] for r in steps], color="tab:gray", lw=1, ls="--")
        lr_ax.set_ylabel("learning rate (dashed)", color="tab:gray")
    loss_ax.set_xlabel("iteration")
    loss_ax.set_ylabel("training loss", color="tab:blue")
    if checks:
        miou_ax.plot([r["iteration"] for r in checks], [r["val_miou"] for r in checks], "o-", color="tab:green",
                     lw=1.2, ms=3, label="val mIoU (first val images, whole)")
    last = max((r["iteration"] for r in records), default=0)
    for i, (protocol, value) in enumerate(sorted((final_miou or {}).items())):
        miou_ax.plot([last], [value], marker="*^sD"[i % 4], ms=9, ls="none", label=f"final mIoU, {protocol}")
    if checks or final_miou:
        miou_ax.legend(fontsize=7, loc="lower right")
    else:
        miou_ax.text(0.5, 0.5, "no validation during training\n(train.val_every: 0)", ha="center", va="center",
                     transform=miou_ax.transAxes, color="gray")
    miou_ax.margins(y=0.15)
    miou_ax.set_xlabel("iteration")
    miou_ax.set_ylabel("mIoU (%)")
    fig.suptitle(title, fontsize=10)
    _save(fig, out)


def plot_table_chart(title: str, labels: list[str], metrics: dict[str, dict[str, list]], out: Path) -> None:
    """Grouped bars, paper vs ours, one panel per metric. `metrics` maps a metric's display name
    to {"paper": [value or None per row], "ours": [mean or None], "std": [std or None]}; a
    missing value leaves its bar out, a std draws an error bar."""
    import numpy as np

    x = np.arange(len(labels))
    fig = _figure(figsize=(max(6.0, 0.8 * len(labels) + 2), 2.4 * len(metrics) + 1.2), layout="constrained")
    axes = fig.subplots(len(metrics), 1, squeeze=False, sharex=True)
    width = 0.38
    for ax, (name, series) in zip(axes[:, 0], metrics.items()):
        def bars(values, offset, **style):
            shown = [(i, v) for i, v in enumerate(values) if _number(v)]
            if shown:
                positions, heights = zip(*shown)
                ax.bar(np.asarray(positions) + offset, heights, width, **style)

        bars(series["paper"], -width / 2, color="#9ecae1", label="paper")
        ours = series["ours"]
        bars(ours, width / 2, color="#e6550d", label="reproduced")
        errors = [(i, m, s) for i, (m, s) in enumerate(zip(ours, series.get("std") or [None] * len(ours)))
                  if _number(m) and _number(s)]
        if errors:
            positions, means, stds = zip(*errors)
            ax.errorbar(np.asarray(positions) + width / 2, means, yerr=stds, fmt="none", ecolor="black", capsize=3)
        values = [v for v in [*series["paper"], *ours] if _number(v)]
        if values:
            low, high = min(values), max(values)
            pad = max(1.0, 0.15 * (high - low))
            ax.set_ylim(max(0.0, low - pad) if low >= 0 else low - pad, high + pad)
        ax.set_ylabel(name)
        ax.legend(fontsize=7)
    axes[-1, 0].set_xticks(x)  # shared by the panels: labelled once, under the last
    axes[-1, 0].set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    axes[0, 0].set_title(title, fontsize=10)
    _save(fig, out)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
