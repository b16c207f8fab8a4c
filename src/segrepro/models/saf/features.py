"""SaF's stride-4 feature extractors (Sec. 5.1.2, App. D), picked from a config mapping
(`kind: hrnet | resnet_decoder`): HRNet's features (segrepro.models.common.hrnet) or App. D's
ResNet + decoder (segrepro.models.saf.resnet_decoder). Both end in one D-channel map at output
stride 4, the finest pyramid level."""

from __future__ import annotations

from segrepro.core.errors import SegreproError
from segrepro.models.common.hrnet import HRNetFeatures
from segrepro.models.saf.resnet_decoder import ResNetDecoder

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
