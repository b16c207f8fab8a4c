"""`build_model` picks a model family's class by `model.family` in the resolved configuration; the
family's module is imported only when it is built."""

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
