"""`build_model` picks a model family's class by `model.family` in the resolved configuration; the
family's module is imported only when it is built (this module itself loads no torch)."""

from segrepro.core.errors import SegreproError


def build_model(model_config: dict, num_classes: int, ignore_index: int = 255):
    family = model_config["family"]
    if family == "pspnet":
        from segrepro.models.pspnet.pspnet import PSPNet

        return PSPNet(model_config, num_classes, ignore_index)
    if family == "saf":
        from segrepro.models.saf.specialize_fuse import SpecializeFuse

        return SpecializeFuse(model_config, num_classes, ignore_index)
    if family == "hfgd":
        from segrepro.models.hfgd.hfgd import HFGD

        return HFGD(model_config, num_classes, ignore_index)
    raise SegreproError(f"unknown model family '{family}'")


def without_pretrained(model_config: dict) -> dict:
    """The model configuration with its backbone's initial weights off: for a model whose weights
    come from elsewhere (a trained model's file) or do not matter (timings), so nothing is
    downloaded."""
    return dict(model_config, backbone=dict(model_config["backbone"], pretrained=False))
