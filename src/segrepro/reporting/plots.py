"""Plots for where a person would rather look than read: a table's paper-vs-ours bars (a run's
training curve, drawn by the trainer too, is segrepro.pipeline.train_log's). Both go into the
report and into MLflow as artifacts.

matplotlib is imported inside the functions (a bare Figure, no pyplot): the workflow imports the table code
while it builds its DAG and must not pay for it.
"""

from __future__ import annotations

import math
from pathlib import Path

from segrepro.core import atomic


def new_figure(**kwargs):
    """A bare matplotlib Figure: pyplot's backends and global state are not needed to draw into a
    file (and no figure is left open in a long-lived process)."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def save_png(fig, out: Path) -> None:
    atomic.write_with(Path(out), lambda tmp: fig.savefig(tmp, format="png", dpi=90))


def plot_table_chart(title: str, labels: list[str], metrics: dict[str, dict[str, list]], out: Path) -> None:
    """Grouped bars, paper vs ours, one panel per metric. `metrics` maps a metric's display name
    to {"paper": [value or None per row], "ours": [mean or None], "std": [std or None]}; a
    missing value leaves its bar out, a std draws an error bar."""
    import numpy as np

    x = np.arange(len(labels))
    fig = new_figure(figsize=(max(6.0, 0.8 * len(labels) + 2), 2.4 * len(metrics) + 1.2), layout="constrained")
    axes = fig.subplots(len(metrics), 1, squeeze=False, sharex=True)
    width = 0.38
    for ax, (name, series) in zip(axes[:, 0], metrics.items()):
        def bars(ax, values, offset, **style):
            shown = [(i, v) for i, v in enumerate(values) if _number(v)]
            if shown:
                positions, heights = zip(*shown)
                ax.bar(np.asarray(positions) + offset, heights, width, **style)

        bars(ax, series["paper"], -width / 2, color="#9ecae1", label="paper")
        ours = series["ours"]
        bars(ax, ours, width / 2, color="#e6550d", label="reproduced")
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
    save_png(fig, out)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
