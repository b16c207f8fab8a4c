"""Building blocks shared by the model families (a family's own file must not be imported by
another family's: the workflow reruns a family's jobs only when its own code changes)."""

from __future__ import annotations

import torch.nn as nn


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1) -> nn.Sequential:
    """Conv (no bias: the BN's shift replaces it) + BN + ReLU, 'same' padding."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=dilation * (kernel_size // 2),
                  dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )
