"""SaF's stride-4 feature extractors (Sec. 5.1.2, App. D), picked by `SafFeaturesConfig.kind`:
HRNet's features (segrepro.models.common.hrnet) or App. D's ResNet + decoder
(segrepro.models.saf.resnet_decoder). Both end in one D-channel map at output stride 4, the
finest pyramid level."""

from __future__ import annotations

from segrepro.core.errors import SegreproError
from segrepro.models.common.hrnet import HRNetFeatures
from segrepro.models.saf.config import SafFeaturesConfig
from segrepro.models.saf.resnet_decoder import ResNetDecoder

KINDS = ("hrnet", "resnet_decoder")


def build_feature_extractor(config: SafFeaturesConfig) -> HRNetFeatures | ResNetDecoder:
    """The stride-4 extractor `config` describes, e.g. SafFeaturesConfig("hrnet", "hrnet_w32") or
    SafFeaturesConfig("resnet_decoder", "resnet101", decoder=DecoderConfig((48, 96, 192, 384), 3, 4))."""
    if config.kind not in KINDS:
        raise SegreproError(f"unknown feature extractor kind '{config.kind}' (expected one of {list(KINDS)})")
    common = {"name": config.name, "pretrained": config.pretrained, "kwargs": dict(config.kwargs),
              "align_corners": config.align_corners}
    if config.kind == "hrnet":
        return HRNetFeatures(**common)
    decoder = config.decoder
    return ResNetDecoder(**common, channels=decoder.channels, modules=decoder.modules, blocks=decoder.blocks)
