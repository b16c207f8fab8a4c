"""Class-aware regularizations (CAR): "CAR: Class-aware Regularizations for Semantic Segmentation"
(Huang et al., ECCV 2022), as HFGD (Huang et al.) uses them inside its CAE and its "SA (CAR)"
encoder (HFGD Sec. 3.2, Table 1, Table 4).

The losses follow the authors' TensorFlow code as the implementation notes (notes-hfgd.md §2)
record it, not the cosine / L2 PyTorch ports: class centres over the whole batch, dot-product
relations scaled by 1/sqrt(C), hinge thresholds 0.5/(K-1) and 0.25/(K-1), clipping to
[1e-7, 1-1e-7], and the square of each mean. Training here is single-process, so the centres'
cross-GPU all-reduce of the original has nothing to reduce.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from segrepro.core.errors import SegreproError
from segrepro.models.common.layers import conv_bn_relu

EPSILON = 1e-7  # Keras' backend epsilon, the clip of the inter-class losses
INTRA_FLOOR = 1e-5  # the intra-class loss is clipped from below (notes §2)
C2C_THRESHOLD = 0.5  # divided by K - 1
C2P_THRESHOLD = 0.25  # divided by K - 1


def resize_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of (N, H, W) labels with align_corners=True, the authors'
    convention (notes §6): output index i samples round(i * (H - 1) / (h - 1)), so a 513 crop
    at stride 32 keeps every 32nd label, corners included."""
    height, width = labels.shape[-2:]
    if (height, width) == tuple(size):
        return labels

    def indices(source: int, target: int) -> torch.Tensor:
        if target == 1:
            return torch.zeros(1, dtype=torch.long, device=labels.device)
        scale = (source - 1) / (target - 1)
        # round half up (the positions are non-negative): TF's legacy nearest kernel rounds
        return torch.floor(torch.arange(target, dtype=torch.float64, device=labels.device) * scale + 0.5).long()

    return labels[..., indices(height, size[0])[:, None], indices(width, size[1])[None, :]]


def car_losses(features: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int) -> dict:
    """The three CAR losses of notes §2 on the CAR module's linear output.

    features (N, C, h, w), any dtype (computed in float32 with autocast off); labels (N, H, W)
    at image resolution, nearest-resized to (h, w). With f_i the feature of pixel i, y_i its
    one-hot label (a zero row if ignored), m_i = sum_k y_ik, sg = stop-gradient and K classes:

      mu_k     = sum_i y_ik f_i / sum_i y_ik over the whole batch (0 for an absent class)
      intra    = max((mean_{i,c} m_i |f_ic - sg(mu_{y_i})_c|)^2, 1e-5), the mean over all N*h*w*C
      c2c      = (mean_k clip(sum_{j!=k} max(R_kj - 0.5/(K-1), 0)))^2,
                 R = softmax_j(mu sg(mu)^T / sqrt(C)), absent classes included
      c2p      = (mean_i clip(sum_{k!=y_i} max(P_ik - 0.25/(K-1), 0)))^2,
                 P = softmax_k(E_ik / sqrt(C)), E_ik = f_i . sg(mu_k) for k != y_i and
                 ||sg(mu_{y_i})||^2 for k = y_i; ignored pixels included (every k counts as other)

    clip = clamp to [1e-7, 1 - 1e-7]. Returns {"car_intra", "car_c2c", "car_c2p"} (float32
    scalars); the total CAR loss is their sum (weights 1, notes §2), left to the caller.
    """
    if num_classes < 2:
        raise SegreproError(f"CAR losses need at least 2 classes, got num_classes={num_classes}")
    channels, height, width = features.shape[1:]
    with torch.autocast(features.device.type, enabled=False):
        pixels = features.float().permute(0, 2, 3, 1).reshape(-1, channels)  # (M, C)
        labels = resize_labels(labels, (height, width)).reshape(-1)
        valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
        one_hot = F.one_hot(torch.where(valid, labels, 0), num_classes).float() * valid[:, None].float()  # (M, K)
        scale = math.sqrt(channels)

        counts = one_hot.sum(dim=0)  # (K,)
        centres = one_hot.t() @ pixels / counts.clamp(min=1)[:, None]  # (K, C); absent classes stay 0
        fixed_centres = centres.detach()

        # Intra-class: every pixel towards its own (fixed) centre; ignored pixels add zeros to the mean.
        own_centre = one_hot @ fixed_centres  # (M, C)
        distance = (pixels - own_centre).abs() * valid[:, None].float()
        intra = (distance.mean() ** 2).clamp(min=INTRA_FLOOR)

        # Class-to-class: a centre's softmax relation to the other (fixed) centres, hinged.
        others = 1.0 - torch.eye(num_classes, device=pixels.device)
        relations = torch.softmax(centres @ fixed_centres.t() / scale, dim=1)  # (K, K)
        class_hinge = F.relu(relations * others - C2C_THRESHOLD / (num_classes - 1)).sum(dim=1)
        c2c = class_hinge.clamp(EPSILON, 1 - EPSILON).mean() ** 2

        # Class-to-pixel: a pixel's own-class energy is the centre's squared norm, not f_i . mu.
        not_own = 1.0 - one_hot
        self_energy = (fixed_centres**2).sum(dim=1)  # (K,)
        energy = pixels @ fixed_centres.t() * not_own + self_energy[None, :] * one_hot  # (M, K)
        probabilities = torch.softmax(energy / scale, dim=1)
        pixel_hinge = F.relu(probabilities * not_own - C2P_THRESHOLD / (num_classes - 1)).sum(dim=1)
        c2p = pixel_hinge.clamp(EPSILON, 1 - EPSILON).mean() ** 2
    return {"car_intra": intra, "car_c2c": c2c, "car_c2p": c2p}


class CARModule(nn.Module):
    """The CAR module (notes §2, CAR `car_core/car.py`): a linear 1x1 conv with bias and no
    BN/ReLU to min(in_channels, 512) channels, whose output the CAR losses regularise, followed
    by a 1x1 conv (no bias) + BN + ReLU. forward(x) -> (out, car_features)."""

    def __init__(self, in_channels: int, channels: int | None = None):
        super().__init__()
        self.channels = min(in_channels, 512) if channels is None else channels
        self.linear = nn.Conv2d(in_channels, self.channels, 1, bias=True)
        self.out = conv_bn_relu(self.channels, self.channels, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        car_features = self.linear(x)
        return self.out(car_features), car_features
