"""Typed model arguments shared by the families: the timm backbone every family names.

The dataclasses of `segrepro.models.<family>.config` are the models' constructor arguments;
`segrepro.models.factory` builds them from the resolved YAML (`model:` section). Torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field

# The authors' ResNet of HFGD (iSeg get_backbone): stage 4's rate factors, at every output stride.
ISEG_MULTI_GRID = (1, 2, 4)


@dataclass(frozen=True)
class BackboneConfig:
    """A timm backbone: `model.backbone` of PSPNet and HFGD."""

    name: str  # a timm model name, e.g. resnet50 (PSPNet Sec. 4.1), swin_base_patch4_window12_384 (HFGD)
    output_stride: int = 32  # 32 (timm's default), or 8 / 16 by dilating the last stages (PSPNet Sec. 3.2)
    pretrained: bool | str = False  # true: timm's ImageNet weights; a string: a local weights file
    kwargs: dict = field(default_factory=dict)  # passed to timm.create_model (tiny widths, stem type, ...)
