"""SaF App. D's ResNet + lightweight decoder: a standard, non-dilated timm ResNet whose four stages
(strides 4..32) are reduced to [48, 96, 192, 384] channels by Conv3x3, fused by the last stage of
HRNet, then upsampled and concatenated like HRNet's features (D = 720 at stride 4).
"""

from __future__ import annotations

from collections.abc import Sequence

import timm
import torch
from timm.models.hrnet import BasicBlock, HighResolutionModule
from torch import nn

from segrepro.core.errors import SegreproError
from segrepro.models.common.hrnet import (
    BRANCH_STRIDES,
    check_input,
    check_strides,
    create_features,
    output_info,
    timm_family,
    upsample_concat,
)


class ResNetDecoder(nn.Module):
    """App. D: standard ResNet (output stride 32) + lightweight decoder. The four stages (strides
    4..32) are reduced by Conv3x3 to `channels`, fused by the last stage of HRNet (`modules`
    multi-resolution modules with `blocks` BasicBlocks per branch and the multi-scale fusion), then
    upsampled and concatenated like `HRNetFeatures`: sum(channels) channels at stride 4."""

    def __init__(self, name: str, pretrained: bool | str = False, kwargs: dict | None = None,
                 channels: Sequence[int] = (48, 96, 192, 384), modules: int = 3, blocks: int = 4,
                 align_corners: bool = True):
        super().__init__()
        if not timm.is_model(name) or timm_family(name) != "resnet":
            raise SegreproError(f"'{name}' is not a timm ResNet (expected e.g. resnet101, resnet50, resnet18)")
        channels = [int(c) for c in channels]
        if len(channels) != len(BRANCH_STRIDES) or min(channels) < 1:
            raise SegreproError(f"decoder channels {channels}: need 4 positive widths, strides 4 to 32")
        if int(modules) < 1 or int(blocks) < 1:
            raise SegreproError(f"decoder modules={modules}, blocks={blocks}: both must be at least 1")
        # App. D: "standard ResNet", i.e. not dilated: output_stride 32 (timm's default).
        self.body = create_features(name, pretrained, kwargs)
        check_strides(name, self.body)

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
        self.feature_info = output_info(self.out_channels)

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
        check_input(images)
        branches = [lateral(f) for lateral, f in zip(self.lateral, self.body(images))]
        for module in self.stage:
            branches = module(branches)
        return upsample_concat(branches, self.align_corners)
