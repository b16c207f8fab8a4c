"""HRNet's stride-4 features (SaF Sec. 5.1.2): a timm HRNet whose four branch outputs (strides
4, 8, 16, 32) are upsampled to stride 4 and concatenated, as the HRNet segmentation model does
(D = 720 for W48, 480 for W32), and the helpers every stride-4 extractor shares (the upsample +
concat fusion, the checks of a timm body's strides and of the input size).

Takes images (B, 3, H, W) with H, W multiples of 32 and returns (B, out_channels, H/4, W/4).
Branch lists are in timm's order, finest first (stride 4, 8, 16, 32), which is also the order of
the channels in the concatenation (HRNet's layout).
"""

from __future__ import annotations

from collections.abc import Sequence

import timm
import torch
import torch.nn.functional as F
from timm.models import FeatureInfo
from torch import nn

from segrepro.core.errors import SegreproError
from segrepro.models.common.backbone import create_timm_model

# Strides of the four branches / stages used, finest first (timm feature order).
BRANCH_STRIDES = (4, 8, 16, 32)
# timm's stage indices for those strides, in both HRNet (features_only, feature_location='') and
# ResNet (index 0 is the stride-2 stem in both).
OUT_INDICES = (1, 2, 3, 4)
# These kwargs are fixed by the wrappers: letting a config change them would break the stride-4 /
# four-branch layout the fusion relies on.
_RESERVED_KWARGS = ("features_only", "out_indices", "feature_location", "output_stride")


def upsample_concat(features: Sequence[torch.Tensor], align_corners: bool = True) -> torch.Tensor:
    """Bilinearly upsample every map to the largest one's size and concatenate on channels, in the
    given order. This is the HRNet segmentation output fusion (notes-saf.md Sec. 7) shared by both
    extractors; maps already at that size are passed through untouched."""
    size = max((f.shape[-2:] for f in features), key=lambda s: s[0] * s[1])
    return torch.cat([
        f if f.shape[-2:] == size
        else F.interpolate(f, size=size, mode="bilinear", align_corners=align_corners)
        for f in features
    ], dim=1)


def timm_family(name: str) -> str:
    """The timm module ('hrnet', 'resnet', ...) that registers `name` (pretrained tag ignored)."""
    base = name.split(".")[0]
    for module in ("hrnet", "resnet"):
        if base in timm.list_models(module=module):
            return module
    return ""


def create_features(name: str, pretrained: bool | str, kwargs: dict | None, **fixed) -> nn.Module:
    """`backbone.create_timm_model` with the wrapper's fixed feature arguments; kwargs the wrapper owns or the
    timm model does not accept become one-line SegreproErrors instead of a TypeError traceback."""
    kwargs = dict(kwargs or {})
    reserved = sorted(set(kwargs) & set(_RESERVED_KWARGS))
    if reserved:
        raise SegreproError(f"backbone '{name}': kwargs {reserved} are fixed by the feature extractor")
    try:
        return create_timm_model(name, pretrained, features_only=True, out_indices=OUT_INDICES, **fixed, **kwargs)
    except TypeError as err:
        raise SegreproError(f"backbone '{name}' rejects kwargs {sorted(kwargs)}: {err}") from None


def check_strides(name: str, body: nn.Module) -> None:
    strides = tuple(body.feature_info.reduction())
    if strides != BRANCH_STRIDES:
        raise SegreproError(f"backbone '{name}' gives feature strides {list(strides)}, expected {list(BRANCH_STRIDES)}")


def check_input(images: torch.Tensor) -> None:
    # The HRNet fuse layers upsample by exact powers of two (nearest, scale_factor), so the stride-4
    # to stride-32 grids must halve exactly.
    height, width = images.shape[-2:]
    if height % 32 or width % 32:
        raise ValueError(f"input size {height}x{width} is not a multiple of 32")


def output_info(channels: int) -> FeatureInfo:
    # One output, described as timm describes a features_only model's outputs.
    return FeatureInfo([{"num_chs": channels, "reduction": 4, "module": "fuse"}], out_indices=(0,))


class HRNetFeatures(nn.Module):
    """Sec. 5.1.2 "HRNet48": the HRNet's own stride-4 representation, i.e. its four branch outputs
    upsampled to stride 4 and concatenated (HRNet segmentation model, notes-saf.md Sec. 7)."""

    def __init__(self, name: str, pretrained: bool | str = False, kwargs: dict | None = None,
                 align_corners: bool = True):
        super().__init__()
        if not timm.is_model(name) or timm_family(name) != "hrnet":
            raise SegreproError(f"'{name}' is not a timm HRNet (expected e.g. hrnet_w18_small, hrnet_w32, hrnet_w48)")
        # feature_location='' returns the plain branch outputs (timm's default 'incre' would apply
        # the classification head's channel-increasing blocks instead).
        self.body = create_features(name, pretrained, kwargs, feature_location="")
        check_strides(name, self.body)
        # Paper silent; default: align_corners=True, as the HRNet segmentation reference the paper
        # trains with (HRNet-OCR config MODEL.ALIGN_CORNERS = True, notes-saf.md Sec. 7). The fusion
        # has no weights, so the other choice is a free switch for geometric consistency with the
        # cell grids (align_corners=False), not a weight-compatibility question.
        self.align_corners = align_corners
        self.out_channels = sum(self.body.feature_info.channels())
        self.reduction = 4
        self.feature_info = output_info(self.out_channels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_input(images)
        return upsample_concat(self.body(images), self.align_corners)


