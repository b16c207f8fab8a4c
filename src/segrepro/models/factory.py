"""The one place that reads a model configuration: `build_model` maps the resolved `model:`
section (params/papers/*.yaml, `segrepro config --paper P --experiment E --scale S`) onto the
typed arguments of the family's constructor (the frozen dataclasses of
`segrepro.models.<family>.config`), checking every key's name and type on the way. A family's
module is imported only when it is built."""

from __future__ import annotations

import dataclasses
import types
import typing

from segrepro.core.errors import SegreproError

FAMILY_KEYS = {
    "pspnet": ("family", "backbone", "align_corners", "head", "aux"),
    "saf": ("family", "backbone", "head"),
    "hfgd": ("family", "backbone", "channels", "encoder", "upsampler", "hfgm", "loss"),
}

_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", dict: "a mapping",
               type(None): "null"}


def _type_name(hint) -> str:
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    if typing.get_origin(hint) is tuple:
        return f"a list of {_type_name(typing.get_args(hint)[0]).split(' ', 1)[1]}s"
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(hint))
    return _TYPE_NAMES[hint]


def _coerce(value, hint, where: str):
    """`value` as the annotation `hint` wants it (a YAML list becomes a tuple, an integer a float
    where a number is wanted), or a SegreproError naming `where`."""
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, where)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _coerce(value, option, where)
            except SegreproError:
                continue
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            item = typing.get_args(hint)[0]
            return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is dict:
        if value is None:  # `kwargs: null` drops inherited ones
            return {}
        if isinstance(value, dict):
            return dict(value)
    elif hint is type(None):
        if value is None:
            return None
    elif isinstance(value, hint):
        return value
    raise SegreproError(f"{where}: expected {_type_name(hint)}, got {value!r}")


def from_mapping(cls, mapping: dict | None, where: str):
    """The frozen dataclass `cls` from a configuration mapping: unknown keys, missing required
    keys and mistyped values each fail with a one-line error naming `where`.key."""
    mapping = {} if mapping is None else mapping
    if not isinstance(mapping, dict):
        raise SegreproError(f"{where}: expected a mapping, got {mapping!r}")
    fields = {field.name: field for field in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        raise SegreproError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(fields)})")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, field in fields.items():
        if name in mapping:
            values[name] = _coerce(mapping[name], hints[name], f"{where}.{name}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise SegreproError(f"{where}: missing key '{name}'")
    return cls(**values)


def _check_top_level(model_config: dict, family: str) -> None:
    unknown = sorted(set(model_config) - set(FAMILY_KEYS[family]))
    if unknown:
        raise SegreproError(f"model: unknown key(s) {', '.join(unknown)} for family '{family}' "
                            f"(known: {', '.join(FAMILY_KEYS[family])})")


def saf_features_config(backbone: dict | None, where: str = "model.backbone"):
    """SaF's feature extractor arguments from `model.backbone`; `decoder` is App. D's only."""
    from segrepro.models.saf.config import SafFeaturesConfig

    features = from_mapping(SafFeaturesConfig, backbone, where)
    if features.kind != "resnet_decoder" and "decoder" in (backbone or {}):
        raise SegreproError(f"{where}.decoder: only a resnet_decoder has a decoder, not a {features.kind}")
    return features


def model_arguments(model_config: dict) -> tuple[str, dict]:
    """The family and the keyword arguments of its constructor (all but num_classes and
    ignore_index), from the resolved `model:` section."""
    if not isinstance(model_config, dict):
        raise SegreproError(f"model: expected a mapping, got {model_config!r}")
    family = model_config.get("family")
    if family not in FAMILY_KEYS:
        raise SegreproError(f"unknown model family '{family}' (known: {', '.join(FAMILY_KEYS)})")
    _check_top_level(model_config, family)
    if family == "pspnet":
        from segrepro.models.pspnet.config import AuxiliaryLossConfig, PSPNetBackboneConfig, PyramidHeadConfig

        return family, {
            "backbone": from_mapping(PSPNetBackboneConfig, model_config.get("backbone"), "model.backbone"),
            "head": from_mapping(PyramidHeadConfig, model_config.get("head"), "model.head"),
            "aux": from_mapping(AuxiliaryLossConfig, model_config.get("aux"), "model.aux"),
            "align_corners": _coerce(model_config.get("align_corners", False), bool, "model.align_corners"),
        }
    if family == "saf":
        from segrepro.models.saf.config import SafHeadConfig

        return family, {
            "features": saf_features_config(model_config.get("backbone")),
            "head": from_mapping(SafHeadConfig, model_config.get("head"), "model.head"),
        }
    from segrepro.models.hfgd.config import (
        EncoderConfig,
        HfgdBackboneConfig,
        HfgdLossConfig,
        HfgmConfig,
        UpsamplerConfig,
    )

    return family, {
        "backbone": from_mapping(HfgdBackboneConfig, model_config.get("backbone"), "model.backbone"),
        "channels": _coerce(model_config.get("channels", 256), int, "model.channels"),
        "encoder": from_mapping(EncoderConfig, model_config.get("encoder"), "model.encoder"),
        "upsampler": from_mapping(UpsamplerConfig, model_config.get("upsampler"), "model.upsampler"),
        "hfgm": from_mapping(HfgmConfig, model_config.get("hfgm"), "model.hfgm"),
        "loss": from_mapping(HfgdLossConfig, model_config.get("loss"), "model.loss"),
    }


def build_model(model_config: dict, num_classes: int, ignore_index: int = 255):
    """The model the resolved `model:` section describes."""
    family, arguments = model_arguments(model_config)
    if family == "pspnet":
        from segrepro.models.pspnet.pspnet import PSPNet

        return PSPNet(num_classes, **arguments, ignore_index=ignore_index)
    if family == "saf":
        from segrepro.models.saf.specialize_fuse import SpecializeFuse

        return SpecializeFuse(num_classes, **arguments, ignore_index=ignore_index)
    from segrepro.models.hfgd.hfgd import HFGD

    return HFGD(num_classes, **arguments, ignore_index=ignore_index)


def without_pretrained(model_config: dict) -> dict:
    """The model configuration with its backbone's initial weights off: for a model whose weights
    come from elsewhere (a trained model's file) or do not matter (timings), so nothing is
    downloaded."""
    return dict(model_config, backbone=dict(model_config["backbone"], pretrained=False))
