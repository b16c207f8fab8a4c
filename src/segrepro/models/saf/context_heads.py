"""The models SaF's efficiency tables compare with that its own model does not cover (Sec. 5.3,
Table 5; App. D, Table B).

SaF's model gives three rows of Table 5 itself: HRNet48 alone (ablation A's single-output head),
HRNet48 + ANL (ablation B: ANL's APNB) and HRNet48 + ours, and two of Table B (the ResNet-decoder
without and with our head). This file adds the others:

- `CrissCrossHead`: CCNet's recurrent criss-cross attention (Huang et al., ICCV 2019), R = 2;
- `ObjectContextHead`: OCR (Yuan et al., ECCV 2020), as HRNet-OCR puts it on the HRNet
  representation, with its auxiliary soft-object-region loss;
- `PlainHead`: ablation A's head (Conv1x1 projection to D_s, then Eq. 7's ConvBlock), for the
  plain ResNets of Table B;
- `ResNetFeatures`: a timm ResNet's last stage alone, at output stride 32 (Table B's "ResNet101")
  or dilated to output stride 8 ("ResNet101-dilated-os8").

`build_comparison_model` puts a head on a feature extractor. The result trains and predicts like
the project's models: forward(images) -> {"semantic": [logits], ...}, loss(outputs, labels),
predict(images) -> logits at the input size. The SaF paper names no widths for these heads
("in-house implementation"); each follows its own paper, with the experiment's D_s (512 at the
paper scale, CCNet's and OCR's own output width) and key width (256, OCR's).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from segrepro.config.efficiency_spec import COMPARISON_HEADS
from segrepro.core.errors import SegreproError
from segrepro.models.common.backbone import Backbone
from segrepro.models.common.layers import conv_bn_relu
from segrepro.models.common.losses import masked_cross_entropy
from segrepro.models.factory import model_arguments
from segrepro.models.saf.config import SafFeaturesConfig
from segrepro.models.saf.features import build_feature_extractor

HEADS = COMPARISON_HEADS  # named in the torch-free table specs
OCR_AUX_WEIGHT = 0.4  # OCR Sec. 3.4: the soft object regions' loss weight


class CrissCrossAttention(nn.Module):
    """CCNet Sec. 3.2: each position u attends to the H + W - 1 positions of its column and row
    (itself once). Affinity d_{i,u} = Q_u · K_i over that criss-cross set, softmax over it, and
    H'_u = Σ_i A_{i,u} V_i + H_u, with Q, K 1x1 convs to C/8 channels and V a 1x1 conv keeping C.
    The CCNet authors' release scales the aggregate by a learnable γ initialised at 0, so the block
    starts as the identity; so does this one."""

    def __init__(self, channels: int):
        super().__init__()
        reduced = max(channels // 8, 1)
        self.query = nn.Conv2d(channels, reduced, 1)
        self.key = nn.Conv2d(channels, reduced, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        query, key, value = self.query(x), self.key(x), self.value(x)
        # u = (i, w): column energies against (j, w), row energies against (i, v).
        column = torch.einsum("bdiw,bdjw->biwj", query, key)
        itself = torch.eye(height, dtype=torch.bool, device=x.device).view(height, 1, height)
        column = column.masked_fill(itself, float("-inf"))  # counted once, in the row
        row = torch.einsum("bdiw,bdiv->biwv", query, key)
        weights = torch.softmax(torch.cat([column, row], dim=-1).float(), dim=-1).to(value.dtype)
        along_column, along_row = weights.split([height, width], dim=-1)
        aggregate = (torch.einsum("biwj,bcjw->bciw", along_column, value)
                     + torch.einsum("biwv,bciv->bciw", along_row, value))
        return self.gamma * aggregate + x


class CrissCrossHead(nn.Module):
    """CCNet Sec. 3.1 and 3.3, the RCCA module as a segmentation head: a 3x3 ConvBNReLU reduces
    the input to C/4 channels (CCNet: 2048 -> 512), the criss-cross attention runs `recurrence`
    times with shared weights (R = 2: every position then reaches every other), a 3x3 ConvBNReLU
    follows; the result is concatenated with the input and fused by a 3x3 ConvBNReLU to
    `channels` with dropout 0.1 before the 1x1 classifier."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, recurrence: int = 2):
        super().__init__()
        reduced = max(in_channels // 4, 1)
        self.reduce = conv_bn_relu(in_channels, reduced, 3)
        self.attention = CrissCrossAttention(reduced)
        self.recurrence = recurrence
        self.after = conv_bn_relu(reduced, reduced, 3)
        self.bottleneck = nn.Sequential(conv_bn_relu(in_channels + reduced, channels, 3), nn.Dropout2d(0.1))
        self.classify = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        context = self.reduce(x)
        for _ in range(self.recurrence):
            context = self.attention(context)
        fused = self.bottleneck(torch.cat([x, self.after(context)], dim=1))
        return {"semantic": [self.classify(fused)]}


class ObjectContextHead(nn.Module):
    """OCR, Sec. 3.2-3.3 of its paper, laid out as HRNet-OCR on the HRNet representation:

    soft object regions M: an auxiliary 1x1 ConvBNReLU (keeping the width) and a 1x1 classifier
    on the input, trained against the ground truth (weight 0.4); pixel representations x_i: a 3x3
    ConvBNReLU to `channels`; object region representations f_k = Σ_i softmax_i(m_ki) x_i;
    pixel-region relation w_ik = softmax_k(φ(x_i)ᵀ ψ(f_k) / √d), φ and ψ two 1x1 ConvBNReLUs to
    d = `key_channels`; object contextual representation y_i = ρ(Σ_k w_ik δ(f_k)), δ and ρ one 1x1
    ConvBNReLU each; augmented representation z_i = g([x_i, y_i]), g a 1x1 ConvBNReLU to
    `channels` with dropout 0.05; then the 1x1 classifier.
    """

    def __init__(self, in_channels: int, channels: int, key_channels: int, num_classes: int):
        super().__init__()
        self.regions = nn.Sequential(conv_bn_relu(in_channels, in_channels, 1), nn.Conv2d(in_channels, num_classes, 1))
        self.pixels = conv_bn_relu(in_channels, channels, 3)
        self.phi = nn.Sequential(conv_bn_relu(channels, key_channels, 1), conv_bn_relu(key_channels, key_channels, 1))
        self.psi = nn.Sequential(conv_bn_relu(channels, key_channels, 1), conv_bn_relu(key_channels, key_channels, 1))
        self.delta = conv_bn_relu(channels, key_channels, 1)
        self.rho = conv_bn_relu(key_channels, channels, 1)
        self.g = nn.Sequential(conv_bn_relu(2 * channels, channels, 1), nn.Dropout2d(0.05))
        self.classify = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        region_logits = self.regions(x)
        pixels = self.pixels(x)
        spatial = torch.softmax(region_logits.flatten(2).float(), dim=-1).to(pixels.dtype)  # (B, K, HW)
        # f_k as a (B, C, K, 1) map, so that the 1x1 ConvBNReLUs apply to it unchanged
        objects = torch.einsum("bkp,bcp->bck", spatial, pixels.flatten(2)).unsqueeze(-1)
        query = self.phi(pixels).flatten(2)  # (B, d, HW)
        key, value = self.psi(objects).flatten(2), self.delta(objects).flatten(2)  # (B, d, K)
        relation = torch.einsum("bdp,bdk->bpk", query, key) / math.sqrt(query.shape[1])
        relation = torch.softmax(relation.float(), dim=-1).to(value.dtype)
        context = torch.einsum("bpk,bdk->bdp", relation, value).reshape(*value.shape[:2], *pixels.shape[-2:])
        augmented = self.g(torch.cat([pixels, self.rho(context)], dim=1))
        return {"semantic": [self.classify(augmented)], "regions": [region_logits]}


class PlainHead(nn.Module):
    """SaF's single-output head without context (ablation A): X^(L) = Conv1x1+BN+ReLU to D_s,
    then Eq. 7's ConvBlock (Conv1x1, BN, ReLU, Conv1x1)."""

    def __init__(self, in_channels: int, channels: int, num_classes: int):
        super().__init__()
        self.block = nn.Sequential(conv_bn_relu(in_channels, channels, 1), conv_bn_relu(channels, channels, 1),
                                   nn.Conv2d(channels, num_classes, 1))

    def forward(self, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        return {"semantic": [self.block(x)]}


class ResNetFeatures(nn.Module):
    """Table B's plain ResNets: the last stage of a timm ResNet (2048 channels for ResNet-101),
    not dilated (output stride 32) or dilated to output stride 8 (its last two stages at dilation
    2 and 4), the backbone of most dilated-FCN methods."""

    def __init__(self, name: str, kwargs: dict | None, output_stride: int):
        super().__init__()
        if output_stride not in (8, 32):
            raise SegreproError(f"ResNet features: output stride {output_stride} is not 8 or 32")
        self.body = Backbone(name, out_indices=(4,), output_stride=output_stride, kwargs=kwargs)
        self.out_channels = self.body.channels[-1]
        self.reduction = output_stride

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)[-1]


class ComparisonModel(nn.Module):
    """A feature extractor and one head, trained like the project's models: per-pixel CE on the
    upsampled logits, plus OCR's auxiliary loss on its soft object regions."""

    def __init__(self, features: nn.Module, head: nn.Module, ignore_index: int = 255):
        super().__init__()
        self.features = features
        self.head = head
        self.ignore_index = ignore_index

    def forward(self, images: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        return self.head(self.features(images))

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Logits at the input size (sides: multiples of 32, as the extractors need)."""
        return self._upsample(self(images)["semantic"][-1], images.shape[-2:])

    def loss(self, outputs: dict, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        main = masked_cross_entropy(self._upsample(outputs["semantic"][-1], labels.shape[-2:]), labels,
                                    self.ignore_index)
        if "regions" not in outputs:
            return main, {"main": main}
        aux = masked_cross_entropy(self._upsample(outputs["regions"][-1], labels.shape[-2:]), labels, self.ignore_index)
        return main + OCR_AUX_WEIGHT * aux, {"main": main, "aux": aux}

    @staticmethod
    def _upsample(logits: torch.Tensor, size) -> torch.Tensor:
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def comparison_model(features: SafFeaturesConfig, channels: int, key_channels: int, num_classes: int, head: str,
                     resnet_output_stride: int | None = None, ignore_index: int = 255) -> ComparisonModel:
    """`head` (one of HEADS) on SaF's feature extractor `features`, or on its backbone ResNet's last
    stage when `resnet_output_stride` is given; `channels` (D_s) and `key_channels` are the SaF
    head's widths (`build_comparison_model` reads them from a SaF configuration)."""
    if head not in HEADS:
        raise SegreproError(f"unknown comparison head '{head}' (known: {', '.join(HEADS)})")
    if resnet_output_stride is None:
        extractor = build_feature_extractor(features)
    else:
        extractor = ResNetFeatures(features.name, dict(features.kwargs), resnet_output_stride)
    if head == "ccnet":
        module = CrissCrossHead(extractor.out_channels, channels, num_classes)
    elif head == "ocr":
        module = ObjectContextHead(extractor.out_channels, channels, key_channels, num_classes)
    else:
        module = PlainHead(extractor.out_channels, channels, num_classes)
    return ComparisonModel(extractor, module, ignore_index)


def build_comparison_model(model_config: dict, num_classes: int, head: str, resnet_output_stride: int | None = None,
                           ignore_index: int = 255) -> ComparisonModel:
    """Table 5's comparison `head` on the feature extractor of a SaF `model:` section (read by the
    model factory), as wide as its semantic head. Kept out of the factory, so that SaF's own
    trainings do not depend on the comparison heads."""
    family, arguments = model_arguments(model_config)
    if family != "saf":
        raise SegreproError(f"comparison heads sit on a SaF model's features, not on a {family} model")
    saf_head = arguments["head"]
    return comparison_model(arguments["features"], saf_head.semantic_channels, saf_head.key_channels, num_classes,
                            head, resnet_output_stride, ignore_index)
