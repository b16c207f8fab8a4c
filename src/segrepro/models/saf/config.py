"""Specialize and Fuse's typed arguments (Hsiao et al., ICCV 2021); `segrepro.models.factory`
builds them from `model.backbone` and `model.head`. Where the paper is silent the default is
the one docs/notes/defaults-saf.md records ("paper silent"). Torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DecoderConfig:
    """App. D's lightweight decoder on a standard ResNet (HRNet's last stage)."""

    channels: tuple[int, ...] = (48, 96, 192, 384)  # per stage, strides 4, 8, 16, 32 (HRNet-W48 widths)
    modules: int = 3  # multi-resolution modules of HRNet's stage 4
    blocks: int = 4  # BasicBlocks per branch and module


@dataclass(frozen=True)
class SafFeaturesConfig:
    """The stride-4 feature extractor (Sec. 5.1.2, App. D): `model.backbone`."""

    kind: str  # hrnet: HRNet's own stride-4 representation; resnet_decoder: App. D
    name: str  # a timm model name (hrnet_w48, resnet101, ...)
    pretrained: bool | str = False  # true: timm's ImageNet weights; a string: a local weights file
    kwargs: dict = field(default_factory=dict)  # passed to timm.create_model
    align_corners: bool = True  # the final upsampling to stride 4 (HRNet-OCR's MODEL.ALIGN_CORNERS)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)  # resnet_decoder only


@dataclass(frozen=True)
class SafHeadConfig:
    """The unity and semantic heads (Sec. 4), the training targets (Sec. 3.2) and the fusion
    (Sec. 3.1, Eq. 2). `output` and `context` pick the ablation of App. C."""

    output: str = "pyramidal"  # single (A-C) | aux (J) | pyramidal (D-I, K): Table 6
    context: str = "ours"  # none | anl (APNB on X^(L)) | anl_multi (APNB per level) | ours (Eq. 4-11)
    strides: tuple[int, ...] = (32, 16, 8, 4)  # Sec. 5.1.2: the levels' strides s_1 > ... > s_L
    semantic_channels: int = 512  # D_s of Sec. 4.2 (paper silent; defaults-saf.md)
    key_channels: int = 256  # d_k of the attention, Eq. 8 (paper silent)
    pool_bins: tuple[int, ...] = (1, 3, 6, 8)  # Eq. 6 PyramidPool: 110 context tokens
    dropout: float = 0.05  # APNB's Dropout2d (ANL's)
    unity_channels: int = 64  # D_u of Sec. 4.1 (paper silent)
    unity_head: str = "paper"  # paper: Sec. 4.1 as written; abs: BN+ReLU and |difference|
    tau: float = 0.9  # Eq. 2: a cell is unity when its unity probability exceeds tau (Sec. 5.1.2)
    train_tau: float = 0.9  # Sec. 3.2: the threshold of the on-the-fly relabelling
    relabel: str = "true_positive"  # naive | simple_fix | true_positive, Sec. 3.2 / Table 7
    finest_target: str = "pixels"  # pixels: Sec. 3.2, the finest level per pixel; cells: the cell rule
    aux_weight: float = 0.4  # J (App. C): each coarser level's auxiliary loss weight (HRNet-OCR's 0.4)
