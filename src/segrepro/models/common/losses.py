"""Losses shared by the model families."""

import torch
import torch.nn.functional as F

from segrepro.core.errors import SegreproError

# What the summed cross-entropy of a batch is divided by (`model.loss.ce_normalization`, HFGD).
CE_NORMALIZATIONS = ("valid_pixels", "all_pixels")


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                         normalization: str = "valid_pixels") -> torch.Tensor:
    """Cross-entropy summed over the non-ignored pixels, divided by

    valid_pixels: their number, torch's mean with ignore_index (semseg, HRNet-OCR); 0, not NaN,
      when a batch has none;
    all_pixels: every pixel of the batch, ignored ones included: Keras' SUM_OVER_BATCH_SIZE over
      the per-pixel losses the HFGD authors' iSeg returns, ignored pixels weighted 0
      (iSeg losses/catecrossentropy_ignore_label.py, reduction=False in utils/model_utils.py).
    """
    if normalization not in CE_NORMALIZATIONS:
        raise SegreproError(
            f"cross-entropy normalization {normalization!r} is not one of: {', '.join(CE_NORMALIZATIONS)}")
    total = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")
    if normalization == "all_pixels":
        return total / labels.numel()
    return total / (labels != ignore_index).sum().clamp(min=1)
