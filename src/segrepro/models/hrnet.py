"""Stride-4 feature extractors for the SaF heads (Sec. 5.1.2, App. D).

Both backbones of the paper end in one D-channel feature map at output stride 4, the finest
pyramid level (Sec. 5.1.2):

- `HRNetFeatures`: a timm HRNet; its four branch outputs (strides 4, 8, 16, 32) are upsampled to
  stride 4 and concatenated, as the HRNet segmentation model does (D = 720 for W48, 480 for W32).
- `ResNetDecoder` (App. D): a standard, non-dilated timm ResNet; its four stages (strides 4..32)
  are reduced to [48, 96, 192, 384] channels by Conv3x3, fused by the last stage of HRNet, then
  upsampled and concatenated the same way (D = 720).

`build_feature_extractor(config)` picks one from a config mapping (`kind: hrnet | resnet_decoder`).
Both take images (B, 3, H, W) with H, W multiples of 32 and return (B, out_channels, H/4, W/4).
Branch lists are in timm's order, finest first (stride 4, 8, 16, 32), which is also the order of
the channels in the concatenation (HRNet's layout).
"""

from __future__ import annotations

from collections.abc import Sequence

import timm
import torch
import torch.nn.functional as F
from timm.models import FeatureInfo
from timm.models.hrnet import BasicBlock, HighResolutionModule
from torch import nn

from segrepro.errors import SegreproError
from segrepro.models.backbone import create_timm_model

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


def _family(name: str) -> str:
    """The timm module ('hrnet', 'resnet', ...) that registers `name` (pretrained tag ignored)."""
    base = name.split(".")[0]
    for module in ("hrnet", "resnet"):
        if base in timm.list_models(module=module):
            return module
    return ""


def _create_features(name: str, pretrained: bool | str, kwargs: dict | None, **fixed) -> nn.Module:
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


def _check_strides(name: str, body: nn.Module) -> None:
    strides = tuple(body.feature_info.reduction())
    if strides != BRANCH_STRIDES:
        raise SegreproError(f"backbone '{name}' gives feature strides {list(strides)}, expected {list(BRANCH_STRIDES)}")


def _check_input(images: torch.Tensor) -> None:
    # The HRNet fuse layers upsample by exact powers of two (nearest, scale_factor), so the stride-4
    # to stride-32 grids must halve exactly.
    height, width = images.shape[-2:]
    if height % 32 or width % 32:
        raise ValueError(f"input size {height}x{width} is not a multiple of 32")


def _output_info(channels: int) -> FeatureInfo:
    # One output, described as timm describes a features_only model's outputs.
    return FeatureInfo([{"num_chs": channels, "reduction": 4, "module": "fuse"}], out_indices=(0,))


class HRNetFeatures(nn.Module):
    """Sec. 5.1.2 "HRNet48": the HRNet's own stride-4 representation, i.e. its four branch outputs
    upsampled to stride 4 and concatenated (HRNet segmentation model, notes-saf.md Sec. 7)."""

    def __init__(self, name: str, pretrained: bool | str = False, kwargs: dict | None = None,
                 align_corners: bool = True):
        super().__init__()
        if not timm.is_model(name) or _family(name) != "hrnet":
            raise SegreproError(f"'{name}' is not a timm HRNet (expected e.g. hrnet_w18_small, hrnet_w32, hrnet_w48)")
        # feature_location='' returns the plain branch outputs (timm's default 'incre' would apply
        # the classification head's channel-increasing blocks instead).
        self.body = _create_features(name, pretrained, kwargs, feature_location="")
        _check_strides(name, self.body)
        # Paper silent; default: align_corners=True, as the HRNet segmentation reference the paper
        # trains with (HRNet-OCR config MODEL.ALIGN_CORNERS = True, notes-saf.md Sec. 7). The fusion
        # has no weights, so the other choice is a free switch for geometric consistency with the
        # cell grids (align_corners=False), not a weight-compatibility question.
        self.align_corners = align_corners
        self.out_channels = sum(self.body.feature_info.channels())
        self.reduction = 4
        self.feature_info = _output_info(self.out_channels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check_input(images)
        return upsample_concat(self.body(images), self.align_corners)


class ResNetDecoder(nn.Module):
    """App. D: standard ResNet (output stride 32) + lightweight decoder. The four stages (strides
    4..32) are reduced by Conv3x3 to `channels`, fused by the last stage of HRNet (`modules`
    multi-resolution modules with `blocks` BasicBlocks per branch and the multi-scale fusion), then
    upsampled and concatenated like `HRNetFeatures`: sum(channels) channels at stride 4."""

    def __init__(self, name: str, pretrained: bool | str = False, kwargs: dict | None = None,
                 channels: Sequence[int] = (48, 96, 192, 384), modules: int = 3, blocks: int = 4,
                 align_corners: bool = True):
        super().__init__()
        if not timm.is_model(name) or _family(name) != "resnet":
            raise SegreproError(f"'{name}' is not a timm ResNet (expected e.g. resnet101, resnet50, resnet18)")
        channels = [int(c) for c in channels]
        if len(channels) != len(BRANCH_STRIDES) or min(channels) < 1:
            raise SegreproError(f"decoder channels {channels}: need 4 positive widths, strides 4 to 32")
        if int(modules) < 1 or int(blocks) < 1:
            raise SegreproError(f"decoder modules={modules}, blocks={blocks}: both must be at least 1")
        # App. D: "standard ResNet", i.e. not dilated: output_stride 32 (timm's default).
        self.body = _create_features(name, pretrained, kwargs)
        _check_strides(name, self.body)

        # App. D: Conv3x3 to [48, 96, 192, 384]; paper silent on BN/ReLU, default: + BN + ReLU
        # (notes-saf.md Sec. 7), as every HRNet conv is followed by BN.
        self.lateral = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            )
            for c_in, c_out in zip(self.body.feature_info.channels(), channels)
        )
        # App. D: "the last stage of HRNet" = HRNet's stage 4: four branches, BasicBlocks, SUM fusion
        # with multi-scale output kept in every module (the segmentation model needs all branches).
        # Paper silent on depth; default: 3 modules x 4 blocks, as HRNet-W48's stage 4 (notes Sec. 7).
        # Built from timm's HRNet module, whose inner fuse upsamples by nearest (the HRNet
        # segmentation code uses bilinear there); the weights are trained from scratch either way.
        self.stage = nn.ModuleList(
            HighResolutionModule(
                num_branches=len(channels),
                block_types=BasicBlock,
                num_blocks=(int(blocks),) * len(channels),
                num_in_chs=list(channels),  # copied: the module updates its list in place
                num_channels=tuple(channels),
                fuse_method="SUM",
                multi_scale_output=True,
            )
            for _ in range(int(modules))
        )
        self._init_decoder()
        self.align_corners = align_corners  # see HRNetFeatures
        self.out_channels = sum(channels)
        self.reduction = 4
        self.feature_info = _output_info(self.out_channels)

    def _init_decoder(self) -> None:
        # Paper silent; the decoder is new, so it is initialised as timm initialises HRNet (where
        # these modules come from): Kaiming-normal fan-out convs, BN weight 1, bias 0.
        for m in [*self.lateral.modules(), *self.stage.modules()]:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check_input(images)
        branches = [lateral(f) for lateral, f in zip(self.lateral, self.body(images))]
        for module in self.stage:
            branches = module(branches)
        return upsample_concat(branches, self.align_corners)


_KEYS = {
    "hrnet": {"kind", "name", "pretrained", "kwargs", "align_corners"},
    "resnet_decoder": {"kind", "name", "pretrained", "kwargs", "align_corners", "decoder"},
}
_DECODER_KEYS = {"channels", "modules", "blocks"}


def build_feature_extractor(config: dict) -> HRNetFeatures | ResNetDecoder:
    """The stride-4 extractor described by `config`, e.g.
    {kind: hrnet, name: hrnet_w32, pretrained: false, kwargs: {}} or
    {kind: resnet_decoder, name: resnet101, pretrained: false, kwargs: {},
     decoder: {channels: [48, 96, 192, 384], modules: 3, blocks: 4}}.
    Optional `align_corners` (default true) for the final upsampling."""
    kind = config.get("kind")
    if kind not in _KEYS:
        raise SegreproError(f"unknown feature extractor kind '{kind}' (expected one of {sorted(_KEYS)})")
    unknown = sorted(set(config) - _KEYS[kind])
    if unknown:
        raise SegreproError(f"feature extractor '{kind}': unknown keys {unknown}")
    if "name" not in config:
        raise SegreproError(f"feature extractor '{kind}': missing key 'name'")
    common = {
        "name": config["name"],
        "pretrained": config.get("pretrained", False),
        "kwargs": config.get("kwargs") or {},
        "align_corners": bool(config.get("align_corners", True)),
    }
    if kind == "hrnet":
        return HRNetFeatures(**common)
    decoder = dict(config.get("decoder") or {})
    unknown = sorted(set(decoder) - _DECODER_KEYS)
    if unknown:
        raise SegreproError(f"feature extractor 'resnet_decoder': unknown decoder keys {unknown}")
    return ResNetDecoder(**common, **decoder)
