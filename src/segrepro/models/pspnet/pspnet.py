"""PSPNet: "Pyramid Scene Parsing Network" (Zhao et al., CVPR 2017), and its dilated-FCN baseline.

Section numbers refer to the paper; where the paper and the public reference code differ (aux
branch on layer3, dilation 2 / 4 in layer3 / layer4, deep stem, 1/N reduction with N = number of
pyramid levels), the reference code is followed.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from segrepro.config.families import MODULE_NAMES
from segrepro.models.common.backbone import Backbone
from segrepro.models.common.layers import conv_bn_relu
from segrepro.models.common.losses import masked_cross_entropy
from segrepro.models.pspnet.config import AuxiliaryLossConfig, PSPNetBackboneConfig, PyramidHeadConfig


class PyramidPooling(nn.Module):
    """Sec. 3.2, Fig. 3(c): pool the feature map into bins x bins sub-regions for each level,
    optionally reduce each level to C/N channels by 1x1 conv ("DR", Table 1), upsample bilinearly
    and concatenate with the input."""

    def __init__(self, in_channels: int, bins: tuple[int, ...], pool: str, reduction: bool,
                 align_corners: bool = False):
        super().__init__()
        self.bins = list(bins)
        self.pool = pool
        self.align_corners = align_corners
        level_channels = in_channels // len(self.bins) if reduction else in_channels
        self.reduce = nn.ModuleList(
            conv_bn_relu(in_channels, level_channels, 1) if reduction else nn.Identity() for _ in self.bins
        )
        self.out_channels = in_channels + level_channels * len(self.bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pool = F.adaptive_avg_pool2d if self.pool == "avg" else F.adaptive_max_pool2d
        levels = [x]
        for bins, reduce in zip(self.bins, self.reduce):
            pooled = reduce(pool(x, bins))
            levels.append(F.interpolate(pooled, size=size, mode="bilinear", align_corners=self.align_corners))
        return torch.cat(levels, dim=1)


class SegmentationHead(nn.Module):
    """3x3 conv + BN + ReLU, dropout, 1x1 classifier: the final layers of Fig. 3(d), of the FCN
    baseline, and (with fewer channels) of the auxiliary branch (Sec. 3.3)."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float):
        super().__init__()
        self.block = conv_bn_relu(in_channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.block(x)))


class PSPNet(nn.Module):
    """Dilated ResNet (output stride 8) + pyramid pooling (head.type 'ppm') or nothing (head.type
    'fcn': the paper's "ResNet50-Baseline"), with the auxiliary loss on layer3 weighted by alpha.

    `align_corners`: bilinear upsampling in the PPM and of the logits (semseg model/pspnet.py uses
    true; with 8n+1 inputs, e.g. 473, the 1/8 feature grid then lands on input pixels exactly)."""

    module_names = MODULE_NAMES["pspnet"]  # what train.lr_mult may name

    def __init__(self, num_classes: int, backbone: PSPNetBackboneConfig,
                 head: PyramidHeadConfig = PyramidHeadConfig(), aux: AuxiliaryLossConfig = AuxiliaryLossConfig(),
                 align_corners: bool = False, ignore_index: int = 255):
        super().__init__()
        self.ignore_index = ignore_index
        self.aux_weight = float(aux.weight)
        self.align_corners = align_corners
        self.backbone = Backbone(
            backbone.name,
            out_indices=(3, 4),  # layer3 feeds the auxiliary branch, layer4 the head
            output_stride=backbone.output_stride,
            pretrained=backbone.pretrained,
            kwargs=backbone.kwargs,
            dilate_first_block=backbone.dilate_first_block,
        )
        layer3_channels, layer4_channels = self.backbone.channels
        if head.type == "ppm":
            self.context = PyramidPooling(layer4_channels, head.bins, head.pool, head.reduction, self.align_corners)
            head_in = self.context.out_channels
        else:
            self.context = nn.Identity()
            head_in = layer4_channels
        self.head = SegmentationHead(head_in, head.channels, num_classes, head.dropout)
        self.aux_head = (
            SegmentationHead(layer3_channels, aux.channels, num_classes, head.dropout)
            if self.aux_weight > 0
            else None
        )

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits at the input resolution: 'out', and in training 'aux' (the reference code
        upsamples x8 before the loss rather than downsampling the labels)."""
        size = images.shape[-2:]
        layer3, layer4 = self.backbone(images)
        outputs = {"out": self.head(self.context(layer4))}
        if self.training and self.aux_head is not None:
            outputs["aux"] = self.aux_head(layer3)
        return {k: F.interpolate(v, size=size, mode="bilinear", align_corners=self.align_corners)
                for k, v in outputs.items()}

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self(images)["out"]

    def loss(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Sec. 3.3: L = L_main + alpha * L_aux, each a cross-entropy averaged over valid pixels."""
        parts = {"main": masked_cross_entropy(outputs["out"], labels, self.ignore_index)}
        total = parts["main"]
        if "aux" in outputs:
            parts["aux"] = masked_cross_entropy(outputs["aux"], labels, self.ignore_index)
            total = total + self.aux_weight * parts["aux"]
        return total, parts
