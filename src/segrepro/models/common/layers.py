"""Building blocks shared by the model families (a family's own file must not be imported by
another family's: the workflow reruns a family's jobs only when its own code changes)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1) -> nn.Sequential:
    """Conv (no bias: the BN's shift replaces it) + BN + ReLU, 'same' padding."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=dilation * (kernel_size // 2),
                  dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def resize(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize of a feature map with align_corners=True, the HFGD authors' convention for
    every resize (513 -> 257 -> 129 -> 65 -> 33 -> 17); a no-op when the size already matches."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)
