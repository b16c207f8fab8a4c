"""timm backbones as feature extractors.

A `Backbone` returns the feature maps of the chosen stages; its `feature_info` says, for each,
the channels and the reduction (stride) relative to the input, as timm's does.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch.nn as nn

from segrepro.errors import SegreproError


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
            raise SegreproError(f"backbone weights file {pretrained} could not be loaded ({type(err).__name__})") from None
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


class Backbone(nn.Module):
    """Always NCHW, whatever layout the timm model's stages produce (Swin's are NHWC)."""

    def __init__(self, name: str, out_indices: tuple[int, ...], output_stride: int = 32,
                 pretrained: bool | str = False, kwargs: dict | None = None):
        super().__init__()
        if not timm.is_model(name):
            raise SegreproError(f"unknown timm backbone '{name}'")
        # Only dilatable models (ResNets, ConvNeXts) take an output stride; 32 is everyone's default.
        stride = {"output_stride": output_stride} if output_stride != 32 else {}
        self.body = create_timm_model(
            name, pretrained, features_only=True, out_indices=tuple(out_indices), **stride, **(kwargs or {}),
        )
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
