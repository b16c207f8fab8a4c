"""Model families, one file each, named after the paper's module. `build_model` picks by
`model.family` in the resolved configuration."""

from segrepro.errors import SegreproError


def build_model(model_config: dict, num_classes: int, ignore_index: int = 255):
    family = model_config["family"]
    if family == "pspnet":
        from segrepro.models.pspnet import PSPNet

        return PSPNet(model_config, num_classes, ignore_index)
    if family == "saf":
        from segrepro.models.specialize_fuse import SpecializeFuse

        return SpecializeFuse(model_config, num_classes, ignore_index)
    if family == "hfgd":
        from segrepro.models.hfgd import HFGD

        return HFGD(model_config, num_classes, ignore_index)
    raise SegreproError(f"unknown model family '{family}'")
