"""The model families' module names, known to the configuration without importing a model
(no torch): `train.lr_mult` is checked against them, and each model names its modules from them."""

# The top-level modules of each family's model: the names `train.lr_mult` may give a learning-rate
# multiplier. A model built with some options lacks some (PSPNet without the auxiliary loss has no
# aux_head, an FCN-style HFGD no upsampler), so the lists are the families' full sets.
MODULE_NAMES = {
    "pspnet": ("backbone", "context", "head", "aux_head"),   # context: the pyramid pooling module
    "saf": ("features", "semantic", "unity"),
    "hfgd": ("backbone", "encoder", "classifier", "upsampler", "axial_attention", "upsampler_classifier"),
}
