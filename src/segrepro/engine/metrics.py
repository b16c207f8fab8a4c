"""Confusion-matrix based segmentation metrics (mIoU, pixel accuracy, mean accuracy).

Everything is derived from one K x K matrix of pixel counts, so results from
several processes or shards can be merged exactly by adding the matrices.
Reported numbers are percentages, the unit the papers use in their tables.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class ConfusionMatrix:
    """Accumulates pixel counts; rows are ground-truth classes, columns predicted classes."""

    def __init__(self, num_classes: int, ignore_index: int = 255, per_image: bool = False) -> None:
        """With `per_image`, every update() also records that image's true positives, false
        positives and false negatives per class (rows of `per_image_counts()`): what any subset
        of the images needs to recompute the metrics (segrepro.reporting.bootstrap)."""
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        self.per_image = [] if per_image else None

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Count one prediction/label pair of any (equal) shape; `ignore_index` pixels are skipped."""
        pred = torch.as_tensor(pred)
        target = torch.as_tensor(target, device=pred.device)
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        pred = pred.reshape(-1).long()
        target = target.reshape(-1).long()
        keep = target != self.ignore_index
        pred = pred[keep]
        target = target[keep]
        k = self.num_classes
        # Out-of-range ids would silently land in a wrong cell of the flattened bincount.
        if target.numel() and (target.min() < 0 or target.max() >= k):
            raise ValueError(f"label values must be in [0, {k}) or {self.ignore_index}")
        if pred.numel() and (pred.min() < 0 or pred.max() >= k):
            raise ValueError(f"predicted class ids must be in [0, {k})")
        counts = torch.bincount(target * k + pred, minlength=k * k).reshape(k, k).cpu().numpy().astype(np.int64)
        self.matrix += counts
        if self.per_image is not None:
            tp = np.diag(counts)
            self.per_image.append(np.stack([tp, counts.sum(axis=0) - tp, counts.sum(axis=1) - tp]))

    def per_image_counts(self) -> dict[str, np.ndarray]:
        """{"tp", "fp", "fn"}: (images, classes) pixel counts, one row per update() in order."""
        if self.per_image is None:
            raise ValueError("this matrix was not asked to record per-image counts")
        rows = np.stack(self.per_image) if self.per_image else np.zeros((0, 3, self.num_classes), np.int64)
        return {"tp": rows[:, 0], "fp": rows[:, 1], "fn": rows[:, 2]}

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix's counts into this one (in place); returns self for chaining."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes} classes into {self.num_classes}")
        self.matrix += other.matrix
        return self

    def summary(self, class_names: Sequence[str] | None = None) -> dict:
        """Metrics in percent.

        A class with no ground-truth and no predicted pixels has an undefined IoU: it is
        reported as None and left out of `miou` (the usual convention, so that a split lacking
        a class is not penalised). Accuracy of a class is undefined without ground-truth
        pixels and is likewise None and left out of `mean_acc`.
        """
        k = self.num_classes
        names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
        if len(names) != k:
            raise ValueError(f"got {len(names)} class names for {k} classes")

        m = self.matrix.astype(np.float64)
        tp = np.diag(m)
        gt = m.sum(axis=1)
        pr = m.sum(axis=0)
        union = gt + pr - tp
        total = m.sum()

        iou = [100.0 * tp[i] / union[i] if union[i] > 0 else None for i in range(k)]
        acc = [100.0 * tp[i] / gt[i] if gt[i] > 0 else None for i in range(k)]
        valid_iou = [v for v in iou if v is not None]
        valid_acc = [v for v in acc if v is not None]

        return {
            "miou": float(np.mean(valid_iou)) if valid_iou else None,
            "pixel_acc": float(100.0 * tp.sum() / total) if total > 0 else None,
            "mean_acc": float(np.mean(valid_acc)) if valid_acc else None,
            "per_class_iou": {n: (None if v is None else float(v)) for n, v in zip(names, iou)},
            "per_class_acc": {n: (None if v is None else float(v)) for n, v in zip(names, acc)},
            "num_pixels": int(self.matrix.sum()),
        }

    def __repr__(self) -> str:
        return f"ConfusionMatrix(num_classes={self.num_classes}, num_pixels={int(self.matrix.sum())})"
