"""HFGD's typed arguments ("High-level Feature Guided Decoding for Semantic Segmentation");
`segrepro.models.factory` builds them from `model.backbone`, `.encoder`, `.upsampler`, `.hfgm`
and `.loss`. The authors' code is not public: where the paper is silent the default follows
their TensorFlow libraries (iSeg, CAR), as params/papers/hfgd.yaml says. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass

from segrepro.models.common.config import ISEG_MULTI_GRID, BackboneConfig


@dataclass(frozen=True)
class HfgdBackboneConfig(BackboneConfig):
    """Sec. 4: ResNet (OS 32, or dilated OS 8 "D8"), Swin or ConvNeXt (OS 32)."""

    kind: str = "resnet"  # resnet | swin | convnext: which timm stages are the four of Fig. 2
    # resnet only. iseg: the authors' ResNet (stride on the last block of stages 1-3, shortcuts
    # avg-pooled); timm (or None): stride on each stage's first block
    layout: str | None = "timm"
    multi_grid: tuple[int, ...] = ISEG_MULTI_GRID  # iseg layout: stage 4's rate factors, one per block


@dataclass(frozen=True)
class EncoderConfig:
    """The extra encoding on the deepest feature: Table 1's column (identity, ASPP, OCR, SA,
    SA (CAR)), Sec. 3.2's CAE, UperNet's PPM, or none (only a 1x1 projection)."""

    type: str = "identity"  # none | identity | aspp | ocr | sa | sa_car | cae | ppm
    hidden: int = 512  # the encoders' inner width (CAR's heads)
    key_channels: int = 64  # self-attention query/key width (CAR's)
    wide: int = 2048  # CAE's wide linear layer (Sec. 3.2)
    wide_bn_relu: bool = False  # CAE: BN+ReLU after the wide 1x1 (false: linear, Sec. 3.2 as written)
    rates: tuple[int, ...] = (3, 6, 9)  # ASPP's dilation rates at OS 32, scaled by 32 / output stride
    bins: tuple[int, ...] = (1, 2, 3, 6)  # PPM's pooled grids (UperNet's)


@dataclass(frozen=True)
class UpsamplerConfig:
    """The guided upsampler on the skip features (Table 8); none: the encoder's FCN (Table 1)."""

    type: str = "none"  # none | sfpn | usfpn | fapn | uper | deeplabv3p | sfpn_mmseg
    output_stride: int = 4  # 4, or 2 for usfpn (Table 12: an extra conv-upsample block per branch)
    low_level_channels: int = 48  # DeepLabV3+'s low-level projection
    head_channels: int | None = None  # sfpn_mmseg's head width (None: half the class-token width)


@dataclass(frozen=True)
class HfgmConfig:
    """Sec. 3.1, the high-level feature guided module: the switches of Tables 3 and 5."""

    guidance: bool = False  # the upsampler classifies with the guiding branch's class tokens
    stop_gradient: bool = True  # with guidance: the upsampler trains neither tokens nor backbone
    axial_attention: bool = False  # Table 3/5 "+ AA": axial attention before the classifier
    heads: int = 4  # the axial attention's heads


@dataclass(frozen=True)
class HfgdLossConfig:
    """The training loss: main CE + guide_weight x guiding CE + car_weight x CAR's losses."""

    guide_weight: float = 1.0  # paper silent: 1:1 (the guiding branch's CE trains the backbone)
    car_weight: float = 1.0  # CAR's own weights (intra + centre-to-centre + centre-to-pixel)
    ce_normalization: str = "valid_pixels"  # valid_pixels (torch's mean) | all_pixels (the authors' Keras)
