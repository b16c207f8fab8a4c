"""Model families, one file each, named after the paper's module. `build_model` picks by
`model.family` in the resolved configuration."""

from segrepro.errors import SegreproError

# The top-level modules of each family's model: the names `train.lr_mult` may give a learning-rate
# multiplier. A model built with some options lacks some (PSPNet without the auxiliary loss has no
# aux_head, an FCN-style HFGD no upsampler), so the lists are the families' full sets.
MODULE_NAMES = {
    "pspnet": ("backbone", "context", "head", "aux_head"),   # context: the pyramid pooling module
    "saf": ("features", "semantic", "unity"),
    "hfgd": ("backbone", "encoder", "classifier", "upsampler", "axial_attention", "upsampler_classifier"),
}


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
