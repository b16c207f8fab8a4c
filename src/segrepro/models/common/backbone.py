"""timm backbones as feature extractors.

A `Backbone` returns the feature maps of the chosen stages; its `feature_info` says, for each,
the channels and the reduction (stride) relative to the input, as timm's does.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch.nn as nn

from segrepro.core.errors import SegreproError
from segrepro.models.common.config import ISEG_MULTI_GRID


def create_timm_model(name: str, pretrained: bool | str, **kwargs) -> nn.Module:
    """A timm model with ImageNet weights (True), a local weights file (a path) or none (False);
    every way this can fail is a one-line SegreproError naming the backbone."""
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    if isinstance(pretrained, str):
        if not Path(pretrained).is_file():
            raise SegreproError(f"backbone weights file not found: {pretrained}")
        # timm loads a local file through its pretrained config, with the usual key remapping.
        kwargs = dict(kwargs, pretrained_cfg_overlay={"file": str(pretrained)})
    elif "layers" in kwargs or "channels" in kwargs:
        raise SegreproError(
            f"backbone '{name}' with custom layers/channels has no pretrained weights: "
            "set model.backbone.pretrained to false or to a weights file"
        )
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as err:
        if isinstance(err, RuntimeError) and "size mismatch" in str(err):
            # e.g. a custom stem_width: the model builds, the weights do not fit it.
            raise SegreproError(
                f"the weights of backbone '{name}' do not fit its shape (kwargs "
                f"{sorted(k for k in kwargs if k != 'pretrained_cfg_overlay')}): set "
                "model.backbone.pretrained to false or to a matching weights file"
            ) from None
        if isinstance(pretrained, str):
            raise SegreproError(
                f"backbone weights file {pretrained} could not be loaded ({type(err).__name__})") from None
        # Offline, hub unreachable, unknown tag: all end the same way for the user.
        raise SegreproError(
            f"pretrained weights for backbone '{name}' could not be loaded ({type(err).__name__}): "
            f"{weights_hint(name)}"
        ) from None


def weights_hint(name: str) -> str:
    """Which ImageNet weights timm wants for `name`, and the two places a user can put them."""
    from huggingface_hub.constants import HF_HUB_CACHE
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return f"timm has no pretrained weights for '{name}'; set model.backbone.pretrained to a weights file"
    wanted = f"'{cfg.hf_hub_id}' from the Hugging Face Hub" if cfg.hf_hub_id else f"{cfg.url}"
    return (f"it needs {wanted}; fetch it once online into the cache {HF_HUB_CACHE} (HF_HOME moves it), "
            "or download the file and set model.backbone.pretrained to its path")


def dilate_whole_stages(body: nn.Module, name: str, output_stride: int) -> None:
    """Run every block of a dilated ResNet stage at the stage's dilation, in place.

    timm's `output_stride` (like mmseg's `contract_dilation`) gives the first block of a dilated
    stage the previous stage's dilation: at output stride 8, layer3 [1, 2, 2, 2, 2, 2] and layer4
    [2, 4, 4]. The PSPNet reference code dilates every 3x3 convolution of layer3 by 2 and of layer4
    by 4, padding = dilation, stride 1 (hszhao/semseg model/pspnet.py; the Caffe models alike).
    Only the dilation and padding of 3x3 convolutions change: shapes and weights stay the same.
    """
    stages = {index: getattr(body, f"layer{index}", None) for index in (1, 2, 3, 4)}
    if all(stage is None for stage in stages.values()):
        raise SegreproError(f"backbone '{name}': dilate_first_block needs a ResNet (stages layer1..layer4)")
    # timm's rule (resnet.py make_blocks): past the output stride, a stage's stride becomes dilation.
    reduction, dilation = 4, 1  # after the stem
    for index, stage in stages.items():
        stride = 1 if index == 1 else 2
        if reduction >= output_stride:
            dilation *= stride
        else:
            reduction *= stride
        if stage is None or dilation == 1:
            continue
        for module in stage.modules():
            if isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3):
                module.dilation, module.padding = (dilation, dilation), (dilation, dilation)


class Backbone(nn.Module):
    """Always NCHW, whatever layout the timm model's stages produce (Swin's are NHWC)."""

    def __init__(self, name: str, out_indices: tuple[int, ...], output_stride: int = 32,
                 pretrained: bool | str = False, kwargs: dict | None = None, dilate_first_block: bool = False):
        super().__init__()
        if not timm.is_model(name):
            raise SegreproError(f"unknown timm backbone '{name}'")
        # Only dilatable models (ResNets, ConvNeXts) take an output stride; 32 is everyone's default.
        stride = {"output_stride": output_stride} if output_stride != 32 else {}
        self.body = create_timm_model(
            name, pretrained, features_only=True, out_indices=tuple(out_indices), **stride, **(kwargs or {}),
        )
        if dilate_first_block:
            dilate_whole_stages(self.body, name, output_stride)
        self.feature_info = self.body.feature_info
        self.channels_last = str(getattr(self.body, "output_fmt", "NCHW")).endswith("NHWC")

    @property
    def channels(self) -> list[int]:
        return self.feature_info.channels()

    @property
    def reductions(self) -> list[int]:
        return self.feature_info.reduction()

    def forward(self, x):
        features = self.body(x)
        if self.channels_last:
            features = [f.permute(0, 3, 1, 2) for f in features]
        return features


# --- The HFGD / CAR authors' ResNet (iSeg) ---------------------------------------------------------
# iSeg `backbones/resnet_common.py` (Stack2, build_stacks with slim_behaviour=True,
# build_atrous_resnet, apply_multi_grid) and `backbones/feature_extractor.py` (get_backbone: deep
# 3x3 stem, slim layout and multi-grid (1, 2, 4) for every ResNet, at any output stride), as
# CAR's and HFGD's models build it (iSeg `layers/core_model_ext.py`, SegManaged).


def iseg_block_layout(depths: list[int], output_stride: int, multi_grid=ISEG_MULTI_GRID) -> list[list[tuple[int, int]]]:
    """(stride, dilation) of the 3x3 convolution of every bottleneck, stage by stage, as iSeg lays
    out its ResNet:

    - the stride sits on the LAST block of stages 1-3 (TF-slim's resnet_v1), none in stage 4;
    - build_atrous_resnet walks the blocks from output stride 4: a strided block that would pass
      `output_stride` becomes stride 1 and doubles the rate first, so it already runs at the
      doubled rate; every later block takes the current rate;
    - apply_multi_grid multiplies stage 4's rates by `multi_grid`, whatever the output stride.

    OS 32: stages 1-3 end with stride 2, stage 4 at rates 1, 2, 4. OS 8: stage 2's last block at
    rate 2, stage 3 at 2 (its last block 4), stage 4 at 4, 8, 16.
    """
    if output_stride not in (8, 16, 32):
        raise SegreproError(f"the iSeg ResNet layout takes output stride 8, 16 or 32, got {output_stride}")
    if len(depths) != 4 or len(multi_grid) != depths[-1]:
        raise SegreproError(f"the iSeg ResNet layout needs 4 stages and one multi-grid factor per block "
                            f"of the last; got depths {depths}, multi_grid {list(multi_grid)}")
    layout, current_stride, rate = [], 4, 1
    for stage, depth in enumerate(depths):
        blocks = []
        for index in range(depth):
            stride = 2 if stage < 3 and index == depth - 1 else 1
            dilation = rate
            if stride == 2:
                if current_stride >= output_stride:
                    rate *= 2
                    stride, dilation = 1, rate
                else:
                    current_stride *= 2
                    dilation = 1
            blocks.append((stride, dilation))
        layout.append(blocks)
    layout[-1] = [(stride, dilation * grid) for (stride, dilation), grid in zip(layout[-1], multi_grid)]
    return layout


class ISegResNet(nn.Module):
    """A timm bottleneck ResNet (its weights and width options as usual) re-laid out as the
    authors' iSeg ResNet (`iseg_block_layout`): each stage's first block keeps its 1x1 projection
    shortcut at stride 1; the strided last block of stages 1-3 has an identity shortcut
    average-pooled 2x2 (iSeg BlockType2, downsample_method "avg", TF "SAME": a partial window at
    an odd border averages its valid pixels only).

    Endpoints as iSeg's ResNet returns them: index 0 the stem (output stride 2), 1-3 the feature
    just BEFORE the strided last block of stages 1-3 (output stride 4, 8, 16 at OS 32), 4 the
    last stage's output. The interface is `Backbone`'s: channels, reductions, forward -> list.
    At the 513 crop every convolution pads as TF's "SAME" does; at even sizes TF pads the
    strided 3x3 on the bottom/right only, here on both sides (a one-pixel shift)."""

    def __init__(self, name: str, out_indices: tuple[int, ...], output_stride: int = 32,
                 pretrained: bool | str = False, kwargs: dict | None = None,
                 multi_grid=ISEG_MULTI_GRID):
        super().__init__()
        from timm.models.resnet import Bottleneck, ResNet

        if not timm.is_model(name):
            raise SegreproError(f"unknown timm backbone '{name}'")
        model = create_timm_model(name, pretrained, **(kwargs or {}))
        stages = [model.layer1, model.layer2, model.layer3, model.layer4] if isinstance(model, ResNet) else []
        if not stages or not all(isinstance(block, Bottleneck) for stage in stages for block in stage):
            raise SegreproError(f"the iSeg ResNet layout needs a timm bottleneck ResNet, not '{name}'")
        if any(index not in range(5) for index in out_indices):
            raise SegreproError(f"iSeg ResNet endpoints are 0-4, got {list(out_indices)}")
        self.out_indices = tuple(out_indices)
        self.layout = iseg_block_layout([len(stage) for stage in stages], output_stride, multi_grid)
        for stage, plan in zip(stages, self.layout):
            for index, (block, (stride, dilation)) in enumerate(zip(stage, plan)):
                _relayout_block(block, stride, dilation, first=index == 0)
        self.stem = nn.Sequential(model.conv1, model.bn1, model.act1)
        self.maxpool = model.maxpool
        self.stages = nn.ModuleList(stages)
        stem_channels = stages[0][0].conv1.in_channels
        self._channels = [stem_channels] + [stage[-1].conv3.out_channels for stage in stages]
        self._reductions = [2] + self._endpoint_strides(output_stride)

    def _endpoint_strides(self, output_stride: int) -> list[int]:
        strides, current = [], 4
        for stage in self.layout[:3]:
            strides.append(current)  # before the last block, which may stride
            current *= stage[-1][0]
        return strides + [current]

    @property
    def channels(self) -> list[int]:
        return [self._channels[i] for i in self.out_indices]

    @property
    def reductions(self) -> list[int]:
        return [self._reductions[i] for i in self.out_indices]

    def forward(self, x):
        x = self.stem(x)
        endpoints = [x]
        x = self.maxpool(x)
        for index, stage in enumerate(self.stages):
            for block in stage[:-1]:
                x = block(x)
            if index < 3:
                endpoints.append(x)  # iSeg Stack2: "before_stride"
            x = stage[-1](x)
        endpoints.append(x)
        return [endpoints[i] for i in self.out_indices]


def _relayout_block(block: nn.Module, stride: int, dilation: int, first: bool) -> None:
    """Set a timm Bottleneck's 3x3 to (stride, dilation) and its shortcut to iSeg's: the first
    block's projection at stride 1, a strided block's identity average-pooled."""
    block.conv2.stride = (stride, stride)
    block.conv2.dilation = (dilation, dilation)
    block.conv2.padding = (dilation, dilation)
    if first:
        projection = block.downsample
        if not isinstance(projection, nn.Sequential) or not isinstance(projection[0], nn.Conv2d):
            raise SegreproError(
                "the iSeg ResNet layout needs a plain 1x1 projection shortcut in each stage's first block")
        projection[0].stride = (1, 1)
        if stride != 1:
            raise SegreproError("the iSeg ResNet layout never strides a stage's first block")
    elif stride != 1:
        block.downsample = nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)
