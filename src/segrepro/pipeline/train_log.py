"""A training run's log (train_log.jsonl: loss and lr, and the validation mIoU of the curve) read
back, and its training curve drawn. Bookkeeping: the trainer writes both beside the model, the
report shows them, neither changes a model (segrepro.pipeline.codedeps leaves this module out of
the training's code inputs)."""

from __future__ import annotations

import json
from pathlib import Path

from segrepro.core.errors import SegreproError
from segrepro.reporting.plots import new_figure, save_png


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
    fig = new_figure(figsize=(10, 3.4), layout="constrained")
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
    save_png(fig, out)
