"""PSPNet's typed arguments (Zhao et al., CVPR 2017); `segrepro.models.factory` builds them from
`model.backbone`, `model.head` and `model.aux`. Defaults are the paper's (and, where it is
silent, the reference code's, hszhao/semseg model/pspnet.py). Torch-free."""

from __future__ import annotations

from dataclasses import dataclass

from segrepro.models.common.config import BackboneConfig


@dataclass(frozen=True)
class PSPNetBackboneConfig(BackboneConfig):
    """The dilated ResNet of Sec. 3.2 ("dilated network strategy", output stride 8)."""

    output_stride: int = 8
    # true: every block of a dilated stage at that stage's dilation (reference code: layer3 all 2,
    # layer4 all 4); false: timm's layout, the first block at the previous stage's dilation.
    dilate_first_block: bool = False


@dataclass(frozen=True)
class PyramidHeadConfig:
    """The head of Fig. 3(c)-(d), or the FCN baseline's (Table 1 "ResNet50-Baseline")."""

    type: str = "ppm"  # ppm: pyramid pooling module (Sec. 3.2); fcn: no context, the baseline
    bins: tuple[int, ...] = (1, 2, 3, 6)  # Sec. 3.2: pooled grids 1x1, 2x2, 3x3, 6x6
    pool: str = "avg"  # avg | max, Table 1 "AVE" / "MAX"
    reduction: bool = True  # Table 1 "DR": 1x1 conv to C/N channels per level (N = len(bins))
    channels: int = 512  # the 3x3 conv before the classifier (reference code)
    dropout: float = 0.1  # Dropout2d before the classifier (reference code)


@dataclass(frozen=True)
class AuxiliaryLossConfig:
    """Sec. 3.3, Fig. 4: the deeply supervised branch on layer3 (res4b22 in the paper)."""

    weight: float = 0.4  # alpha of L = L_main + alpha L_aux (Sec. 3.3, Table 2); 0 drops the branch
    channels: int = 256  # its 3x3 conv width (reference code)

