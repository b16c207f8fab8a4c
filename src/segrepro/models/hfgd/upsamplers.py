"""Upsamplers of "High-Level Feature Guided Decoding for Semantic Segmentation" (HFGD; Huang et al.).

An upsampler turns the skip features of a backbone (stride -> feature map) and the encoder output
at the deepest stride (the "top") into one feature map at output stride 4 (or 2) that HFGM
classifies with the shared class tokens. The five types are the rows of Table 8 plus SemanticFPN:

  sfpn        iSeg's SemanticFPN (notes §3): 1x1 laterals, SemanticPyramidNetworkBlock_V2 head
  usfpn       Ultra SemanticFPN (Sec. 3.3, App. A): 3x3 laterals, optional OS 2 output
  fapn        FaPN as written in iSeg (notes §5): feature selection + DCNv2 feature alignment
  uper        UperNet's FPN part (notes §5); its PPM is an encoder (segrepro.models.hfgd.encoders)
  deeplabv3p  DeepLabV3+ decoder (notes §5); its ASPP is an encoder
  sfpn_mmseg  the standard SemanticFPN in mmsegmentation's layout (Table 9's count; not trained by the paper)

Sizes always come from the feature maps themselves (resize with `size=`), so odd image sizes work;
every feature resize is bilinear with align_corners=True, the authors' convention (notes §6).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import deform_conv2d

from segrepro.core.errors import SegreproError
from segrepro.models.common.layers import conv_bn_relu, resize
from segrepro.models.hfgd.config import UpsamplerConfig

UPSAMPLER_TYPES = ("sfpn", "usfpn", "fapn", "uper", "deeplabv3p", "sfpn_mmseg")


def pyramid_strides(skip_channels: dict[int, int]) -> list[int]:
    """The skip strides a pyramid upsampler uses: 4, 8, 16, ... without gaps. Strides below 4 are
    left out: no upsampler here uses stride-2 backbone features (Sec. 3.3, notes §3)."""
    strides = sorted(s for s in skip_channels if s >= 4)
    expected = [4 * 2**i for i in range(len(strides))]
    if not strides or strides != expected:
        raise SegreproError(
            f"upsampler needs skip features at strides 4, 8, 16, ... without gaps; got {sorted(skip_channels)}"
        )
    return strides


def top_projection(top_channels: int, channels: int) -> nn.Module:
    """The top (encoder output) enters the pyramid as is (notes §3); a 1x1 ConvBnReLU only when its
    width differs from the pyramid's."""
    return nn.Identity() if top_channels == channels else conv_bn_relu(top_channels, channels, 1)


def top_down(levels: list[torch.Tensor]) -> list[torch.Tensor]:
    """FPN top-down pathway (fine -> coarse list): each level adds the upsampled coarser one."""
    merged = list(levels)
    for i in range(len(merged) - 2, -1, -1):
        merged[i] = merged[i] + resize(merged[i + 1], merged[i].shape[-2:])
    return merged


class ScaleBranch(nn.Module):
    """One branch of iSeg's SemanticPyramidNetworkBlock_V2 (notes §3): for the level at stride
    4 * 2^i, max(1, i) 3x3 ConvBnReLU, each followed by a 2x bilinear upsampling when i > 0, so the
    branch ends at stride 4. `extra_blocks` more conv + upsample pairs continue to OS 2 (U-SFPN,
    Sec. 3.3: "one more conv-upsample block for every branch")."""

    def __init__(self, channels: int, level: int, extra_blocks: int = 0):
        super().__init__()
        self.level = level
        self.convs = nn.ModuleList(
            conv_bn_relu(channels, channels, 3) for _ in range(max(1, level) + extra_blocks)
        )

    def forward(self, x: torch.Tensor, targets: list) -> torch.Tensor:
        """targets[j]: the size to upsample to after conv j, or None (the stride-4 branch's first conv)."""
        for conv, size in zip(self.convs, targets, strict=True):
            x = conv(x)
            if size is not None:
                x = resize(x, size)
        return x


class SemanticFPN(nn.Module):
    """SFPN (notes §3, iSeg `layers/fpn.py`) and U-SFPN (Sec. 3.3, App. A, Fig. 5).

    Laterals (1x1 for SFPN, 3x3 for U-SFPN; ConvBnReLU, no bias) on the skips, the top as is,
    bilinear top-down + add, then the V2 block: per-level ScaleBranch, branches summed, 1x1
    ConvBnReLU. Output stride 2 (U-SFPN only) adds one conv-upsample block to every branch and
    uses no stride-2 backbone features.
    """

    def __init__(
        self,
        skip_channels: dict[int, int],
        top_channels: int,
        channels: int,
        lateral_kernel: int,
        output_stride: int = 4,
    ):
        super().__init__()
        self.strides = pyramid_strides(skip_channels)
        self.output_stride = output_stride
        self.laterals = nn.ModuleList(
            conv_bn_relu(skip_channels[s], channels, lateral_kernel) for s in self.strides
        )
        self.top = top_projection(top_channels, channels)
        extra_blocks = 1 if output_stride == 2 else 0
        # levels 0 .. n-1 are the skips, level n the top
        self.branches = nn.ModuleList(
            ScaleBranch(channels, level, extra_blocks) for level in range(len(self.strides) + 1)
        )
        self.fuse = conv_bn_relu(channels, channels, 1)

    def forward(self, skips: dict[int, torch.Tensor], top: torch.Tensor) -> torch.Tensor:
        levels = [lateral(skips[s]) for s, lateral in zip(self.strides, self.laterals)]
        levels = top_down(levels + [self.top(top)])
        sizes = [tuple(level.shape[-2:]) for level in levels]
        final = [] if self.output_stride == 4 else [(2 * sizes[0][0], 2 * sizes[0][1])]
        out = 0
        for level, (x, branch) in enumerate(zip(levels, self.branches)):
            # each 2x upsampling goes to the next finer level's actual size
            targets = [sizes[j] for j in range(level - 1, -1, -1)] if level > 0 else [None]
            out = out + branch(x, targets + final)
        return self.fuse(out)


class MMSegSemanticFPN(nn.Module):
    """A standard SemanticFPN as mmsegmentation lays it out (its FPN neck and FPNHead; Kirillov
    et al., "Panoptic Feature Pyramid Networks", Sec. 3): the model HFGD's Table 9 appears to
    count for "SemanticFPN" (its 45.65 GMACs), not the 256-wide iSeg-style SFPN its tables train.

    Neck: 1x1 lateral convs with bias and no norm/activation to `channels` (256), nearest
    top-down upsampling + add, a 3x3 output conv (bias, no norm) on every level. Head, `head_channels`
    (128) wide: per level at stride 4 * 2^i, max(1, i) 3x3 ConvBnReLU (the first from `channels`),
    each followed by a 2x bilinear upsampling (align_corners=False) when i > 0; the levels summed.
    The output is `head_channels` wide; mmseg's dropout of 0.1 before its classifier is left out.
    The top (the encoder output, `channels` wide with encoder 'none', which is mmseg's top 1x1
    lateral plus BN + ReLU) takes no further lateral."""

    def __init__(self, skip_channels: dict[int, int], top_channels: int, channels: int, head_channels: int):
        super().__init__()
        self.strides = pyramid_strides(skip_channels)
        self.output_stride = 4
        self.out_channels = head_channels
        self.laterals = nn.ModuleList(nn.Conv2d(skip_channels[s], channels, 1) for s in self.strides)
        self.top = nn.Identity() if top_channels == channels else nn.Conv2d(top_channels, channels, 1)
        self.outputs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(len(self.strides) + 1))
        self.branches = nn.ModuleList(
            nn.ModuleList(
                conv_bn_relu(channels if k == 0 else head_channels, head_channels, 3) for k in range(max(1, level))
            )
            for level in range(len(self.strides) + 1)
        )

    def forward(self, skips: dict[int, torch.Tensor], top: torch.Tensor) -> torch.Tensor:
        levels = [lateral(skips[s]) for s, lateral in zip(self.strides, self.laterals)] + [self.top(top)]
        for i in range(len(levels) - 2, -1, -1):
            levels[i] = levels[i] + F.interpolate(levels[i + 1], size=levels[i].shape[-2:], mode="nearest")
        out = None
        for level, (x, convs) in enumerate(zip(levels, self.branches)):
            x = self.outputs[level](x)
            for conv in convs:
                x = conv(x)
                if level > 0:
                    x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            # mmseg's FPNHead resizes each coarser result to the stride-4 level's size, then sums
            out = x if out is None else out + F.interpolate(x, size=out.shape[-2:], mode="bilinear",
                                                            align_corners=False)
        return out


class FeatureSelection(nn.Module):
    """FaPN's FSM as in iSeg (notes §5): an SE gate with ratio 1 (GAP, 1x1, ReLU, 1x1, sigmoid; no
    biases), x * g + x, then a 1x1 conv to the pyramid width without BN."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.squeeze = nn.Conv2d(in_channels, in_channels, 1, bias=False)
        self.excite = nn.Conv2d(in_channels, in_channels, 1, bias=False)
        # notes silent on this conv's bias; no norm follows it, so it keeps one (Keras default).
        self.project = nn.Conv2d(in_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.excite(F.relu(self.squeeze(F.adaptive_avg_pool2d(x, 1)))))
        return self.project(x * gate + x)


class ModulatedDeformConv(nn.Module):
    """DCNv2, 3x3, one deformable group (notes §5, iSeg `layers/dcn_v2.py`): a zero-initialised 3x3
    conv on the guide predicts 18 offsets + 9 mask logits (sigmoid). At initialisation offsets are
    0 and masks 0.5, i.e. the block is half a plain 3x3 conv (plus bias)."""

    def __init__(self, in_channels: int, out_channels: int, guide_channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        nn.init.kaiming_uniform_(self.weight, a=1)
        self.offset_mask = nn.Conv2d(guide_channels, 3 * 9, 3, padding=1)
        nn.init.zeros_(self.offset_mask.weight)
        nn.init.zeros_(self.offset_mask.bias)

    def forward(self, x: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        offset, mask_logits = self.offset_mask(guide).split([18, 9], dim=1)
        return deform_conv2d(
            x, offset, self.weight, self.bias, padding=(1, 1), mask=torch.sigmoid(mask_logits)
        )


class FeatureAlignment(nn.Module):
    """FaPN's FAM as in iSeg (notes §5): offset features = 1x1 conv (no bias) of
    concat[FSM(C_l), 2 * up(P)]; DCNv2 on up(P) guided by them, ReLU, + FSM(C_l)."""

    def __init__(self, channels: int):
        super().__init__()
        self.offset = nn.Conv2d(2 * channels, channels, 1, bias=False)
        self.align = ModulatedDeformConv(channels, channels, channels)

    def forward(self, lateral: torch.Tensor, coarser: torch.Tensor) -> torch.Tensor:
        upsampled = resize(coarser, lateral.shape[-2:])
        guide = self.offset(torch.cat([lateral, 2 * upsampled], dim=1))
        return F.relu(self.align(upsampled, guide)) + lateral


class FaPN(nn.Module):
    """FaPN (Table 8, Sec. 5.5; iSeg style, notes §5): top-down from the top over strides 16, 8, 4,
    each level = FAM(FSM(skip), coarser level); the stride-4 level through a 3x3 ConvBnReLU."""

    def __init__(self, skip_channels: dict[int, int], top_channels: int, channels: int):
        super().__init__()
        self.strides = pyramid_strides(skip_channels)
        self.output_stride = 4
        self.select = nn.ModuleList(FeatureSelection(skip_channels[s], channels) for s in self.strides)
        self.align = nn.ModuleList(FeatureAlignment(channels) for _ in self.strides)
        self.top = top_projection(top_channels, channels)
        self.out = conv_bn_relu(channels, channels, 3)

    def forward(self, skips: dict[int, torch.Tensor], top: torch.Tensor) -> torch.Tensor:
        x = self.top(top)
        for i in range(len(self.strides) - 1, -1, -1):
            x = self.align[i](self.select[i](skips[self.strides[i]]), x)
        return self.out(x)


class UperFPN(nn.Module):
    """UperNet's FPN part (notes §5, CAR `heads/uper.py`): 1x1 ConvBnReLU laterals, top-down add,
    a 3x3 ConvBnReLU per skip level (the top, the PPM output, enters as is, as in UperNet), every
    level resized to stride 4, concatenated, 3x3 ConvBnReLU."""

    def __init__(self, skip_channels: dict[int, int], top_channels: int, channels: int):
        super().__init__()
        self.strides = pyramid_strides(skip_channels)
        self.output_stride = 4
        self.laterals = nn.ModuleList(conv_bn_relu(skip_channels[s], channels, 1) for s in self.strides)
        self.top = top_projection(top_channels, channels)
        self.level_convs = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in self.strides)
        self.fuse = conv_bn_relu((len(self.strides) + 1) * channels, channels, 3)

    def forward(self, skips: dict[int, torch.Tensor], top: torch.Tensor) -> torch.Tensor:
        levels = [lateral(skips[s]) for s, lateral in zip(self.strides, self.laterals)]
        levels = top_down(levels + [self.top(top)])
        outputs = [conv(x) for conv, x in zip(self.level_convs, levels[:-1])] + [levels[-1]]
        size = outputs[0].shape[-2:]
        return self.fuse(torch.cat([resize(x, size) for x in outputs], dim=1))


class DeepLabV3PlusDecoder(nn.Module):
    """DeepLabV3+ decoder (notes §5, iSeg `layers/simpledecoder.py`): the stride-4 skip through a
    1x1 ConvBnReLU to `low_level_channels` (48), concatenated with the top upsampled to stride 4,
    then two 3x3 ConvBnReLU to the output width."""

    def __init__(self, skip_channels: dict[int, int], top_channels: int, channels: int, low_level_channels: int):
        super().__init__()
        if 4 not in skip_channels:
            raise SegreproError(f"deeplabv3p needs the stride-4 skip feature; got strides {sorted(skip_channels)}")
        self.output_stride = 4
        self.low_level = conv_bn_relu(skip_channels[4], low_level_channels, 1)
        self.decode = nn.Sequential(
            conv_bn_relu(low_level_channels + top_channels, channels, 3),
            conv_bn_relu(channels, channels, 3),
        )

    def forward(self, skips: dict[int, torch.Tensor], top: torch.Tensor) -> torch.Tensor:
        low = self.low_level(skips[4])
        return self.decode(torch.cat([low, resize(top, low.shape[-2:])], dim=1))


def build_upsampler(config: UpsamplerConfig, skip_channels: dict[int, int], top_channels: int,
                    channels: int) -> nn.Module:
    """The upsampler `config.type` names (sfpn | usfpn | fapn | uper | deeplabv3p | sfpn_mmseg).

    UpsamplerConfig's fields: output_stride 4 (default) or 2 (usfpn only), low_level_channels
    (deeplabv3p), head_channels (sfpn_mmseg: its head's width, half of `channels` when None, as
    mmseg's 128 of 256; that upsampler's `out_channels`).
    The module's forward(skips, top) returns (N, channels, H4, W4), H4 x W4 the stride-4 skip's
    size, doubled at output stride 2; its attribute `output_stride` says which.
    """
    kind = config.type
    output_stride = int(config.output_stride)
    if kind not in UPSAMPLER_TYPES:
        raise SegreproError(f"unknown upsampler type {kind!r}; expected one of {', '.join(UPSAMPLER_TYPES)}")
    if output_stride not in (2, 4):
        raise SegreproError(f"upsampler output_stride must be 4 or 2, got {output_stride}")
    if output_stride == 2 and kind != "usfpn":
        raise SegreproError(f"output_stride 2 is only available for usfpn, not for upsampler {kind!r}")
    if kind in ("sfpn", "usfpn"):
        lateral_kernel = 1 if kind == "sfpn" else 3
        return SemanticFPN(skip_channels, top_channels, channels, lateral_kernel, output_stride)
    if kind == "sfpn_mmseg":
        head_channels = channels // 2 if config.head_channels is None else int(config.head_channels)
        return MMSegSemanticFPN(skip_channels, top_channels, channels, head_channels)
    if kind == "fapn":
        return FaPN(skip_channels, top_channels, channels)
    if kind == "uper":
        return UperFPN(skip_channels, top_channels, channels)
    return DeepLabV3PlusDecoder(skip_channels, top_channels, channels, int(config.low_level_channels))
