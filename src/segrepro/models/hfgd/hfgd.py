"""HFGD: "High-level Feature Guided Decoding for Semantic Segmentation" (Huang, Kang, Gao, Li, Duan).

One network covers every row of the paper's tables (Fig. 2):

    backbone (ResNet OS 32 or dilated OS 8 "D8" in the authors' iSeg layout, Swin, ConvNeXt; timm)
      -> extra encoding on the deepest feature (Table 1: identity, ASPP, OCR, SA, SA (CAR); Sec. 3.2: CAE)
      -> upsampler on the skip features (none = FCN; SFPN, U-SFPN, FaPN, UperNet, DeepLabV3+; Table 8)
      -> HFGM (Sec. 3.1): shared class tokens, stop-gradients, axial attention.

The authors' code is not public; where the paper is silent this follows the recommended defaults
of their TensorFlow libraries (params/papers/hfgd.yaml says which): the guiding branch classifies
the encoder output with 1x1 class tokens (kernel + bias); the guided upsampler classifies its own
feature with the same tokens, detached; every path from the backbone and the encoder into the
upsampler is detached, so the backbone learns only from the guiding branch (and CAR's losses).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from segrepro.config.families import MODULE_NAMES
from segrepro.core.errors import SegreproError
from segrepro.models.common.backbone import Backbone, ISegResNet
from segrepro.models.common.layers import resize
from segrepro.models.common.losses import masked_cross_entropy
from segrepro.models.hfgd.car import car_losses
from segrepro.models.hfgd.config import (
    EncoderConfig,
    HfgdBackboneConfig,
    HfgdLossConfig,
    HfgmConfig,
    UpsamplerConfig,
)
from segrepro.models.hfgd.encoders import AxialAttention, build_encoder
from segrepro.models.hfgd.upsamplers import build_upsampler

# timm's feature stages: a ResNet's stem output is index 0, Swin's and ConvNeXt's first stage is.
STAGE_INDICES = {"resnet": (1, 2, 3, 4), "swin": (0, 1, 2, 3), "convnext": (0, 1, 2, 3)}


class StageBackbone(nn.Module):
    """The four stages of a timm backbone, NCHW, with their strides: (4, 8, 16, 32), or
    (4, 8, 8, 8) for a dilated ResNet. A ResNet is laid out as the authors' (`layout: iseg`,
    segrepro.models.common.backbone.ISegResNet: strides on the last block of stages 1-3, stage-4
    multi-grid) or as timm's (`layout: timm`). Swin and ConvNeXt get their input padded to a
    multiple of 32 (their patch embedding and 2x2 downsampling need whole patches); the caller
    crops the prediction back."""

    def __init__(self, config: HfgdBackboneConfig):
        super().__init__()
        kind = config.kind
        if kind not in STAGE_INDICES:
            raise SegreproError(f"unknown HFGD backbone kind '{kind}' (known: {', '.join(STAGE_INDICES)})")
        output_stride = config.output_stride
        if kind != "resnet" and output_stride != 32:
            raise SegreproError(f"a {kind} backbone has output stride 32 only (got {output_stride})")
        kwargs = dict(config.kwargs)
        if kind == "swin":
            kwargs.setdefault("strict_img_size", False)  # any input size, not the pretraining one
        layout = config.layout or "timm"
        if layout not in ("timm", "iseg"):
            raise SegreproError(f"unknown HFGD backbone layout '{layout}' (known: timm, iseg)")
        if layout == "iseg" and kind != "resnet":
            raise SegreproError(f"the iseg layout is a ResNet's; set model.backbone.layout to null for {kind}")
        if layout == "iseg":
            # The authors' ResNet (iSeg): strides on the last block of stages 1-3, multi-grid on stage 4.
            self.body = ISegResNet(config.name, STAGE_INDICES[kind], output_stride, config.pretrained,
                                   kwargs, config.multi_grid)
        else:
            self.body = Backbone(config.name, STAGE_INDICES[kind], output_stride, config.pretrained, kwargs)
        self.pad_to = 1 if kind == "resnet" else 32  # patchify stems and 2x2 downsampling
        self.channels = self.body.channels
        self.strides = self.body.reductions

    def padded_size(self, size) -> tuple[int, int]:
        return tuple(side + (-side % self.pad_to) for side in size)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        height, width = self.padded_size(images.shape[-2:])
        if (height, width) != tuple(images.shape[-2:]):
            images = F.pad(images, (0, width - images.shape[-1], 0, height - images.shape[-2]))
        return self.body(images)


class HFGD(nn.Module):
    """Backbone + extra encoding + optional upsampler + HFGM switches (`model.hfgm`):
    guidance (shared, detached class tokens; Sec. 3.1 "Guiding the upsampler"), stop_gradient
    ("Protecting pre-trained backbone"), axial_attention (on the upsampler's output, before the
    classifier). With no upsampler the model is the encoder's FCN (Table 1 columns 1 and 2)."""

    module_names = MODULE_NAMES["hfgd"]  # what train.lr_mult may name

    def __init__(self, num_classes: int, backbone: HfgdBackboneConfig, channels: int = 256,
                 encoder: EncoderConfig = EncoderConfig(), upsampler: UpsamplerConfig = UpsamplerConfig(),
                 hfgm: HfgmConfig = HfgmConfig(), loss: HfgdLossConfig = HfgdLossConfig(), ignore_index: int = 255):
        super().__init__()
        self.ignore_index = ignore_index
        self.num_classes = num_classes
        self.guide_weight = float(loss.guide_weight)
        self.car_weight = float(loss.car_weight)
        self.ce_normalization = loss.ce_normalization

        self.backbone = StageBackbone(backbone)
        deepest_stride = self.backbone.strides[-1]
        self.encoder = build_encoder(encoder, self.backbone.channels[-1], channels, deepest_stride, num_classes)
        # The class tokens of Sec. 3.1: a 1x1 classifier's kernel [K, C] and bias [K].
        self.classifier = nn.Conv2d(channels, num_classes, 1)

        self.upsampler = None
        self.guidance = self.stop_gradient = False
        self.axial_attention = None
        if upsampler.type != "none":
            # Skips: the stages finer than the deepest one (a D8 backbone offers only stride 4).
            skips = {s: c for s, c in zip(self.backbone.strides[:-1], self.backbone.channels[:-1])
                     if s < deepest_stride}
            self.skip_strides = sorted(skips)
            self.upsampler = build_upsampler(upsampler, skips, channels, channels)
            width = getattr(self.upsampler, "out_channels", channels)  # sfpn_mmseg's head is narrower
            self.guidance = hfgm.guidance
            self.stop_gradient = self.guidance and hfgm.stop_gradient
            if hfgm.axial_attention:
                self.axial_attention = AxialAttention(width, heads=hfgm.heads)
            if self.guidance and width != channels:
                raise SegreproError(f"HFGM guidance needs the upsampler's output ({width})"
                                    f" as wide as the class tokens ({channels})")
            # Without guidance the upsampler has a classifier of its own (a plain SemanticFPN).
            self.upsampler_classifier = None if self.guidance else nn.Conv2d(width, num_classes, 1)
        elif hfgm.guidance or hfgm.axial_attention:
            raise SegreproError("HFGM needs an upsampler: set model.upsampler.type")

    @property
    def output_stride(self) -> int:
        return self.upsampler.output_stride if self.upsampler is not None else self.backbone.strides[-1]

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """'out': the prediction used at test time (the upsampler's when there is one), logits at the
        input size. In training also 'guide' (the high-level branch's logits, with guidance) and
        'car_features' (the CAR module's output, for its losses)."""
        size = images.shape[-2:]
        stages = self.backbone(images)
        top, extras = self.encoder(stages[-1])
        outputs = {}
        if self.upsampler is None:
            outputs["out"] = self.classifier(top)
        else:
            outputs["out"] = self._upsample_and_classify(stages, top)
            if self.guidance and self.training:
                outputs["guide"] = self.classifier(top)
        if self.training and "car_features" in extras:
            outputs["car_features"] = extras["car_features"]
        padded = self.backbone.padded_size(size)
        for key in ("out", "guide"):
            if key in outputs:
                outputs[key] = resize(outputs[key], padded)[..., : size[0], : size[1]]
        return outputs

    def _upsample_and_classify(self, stages: list[torch.Tensor], top: torch.Tensor) -> torch.Tensor:
        """Sec. 3.1: the guided branch. With stop_gradient its inputs are detached (the OS = n paths
        from the backbone, and the top from the encoder) and so are the class tokens it borrows."""
        cut = (lambda x: x.detach()) if self.stop_gradient else (lambda x: x)
        skips = {s: cut(f) for s, f in zip(self.backbone.strides, stages) if s in self.skip_strides}
        feature = self.upsampler(skips, cut(top))
        if self.axial_attention is not None:
            feature = self.axial_attention(feature)
        if not self.guidance:
            return self.upsampler_classifier(feature)
        return F.conv2d(feature, cut(self.classifier.weight), cut(self.classifier.bias))

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self(images)["out"]

    def loss(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Cross-entropy of the prediction, + guide_weight x that of the guiding branch (its only
        training signal, with CAR's), + car_weight x (intra + centre-to-centre + centre-to-pixel).
        Each cross-entropy is divided by the pixels `loss.ce_normalization` names (the authors':
        all of them, see masked_cross_entropy)."""
        parts = {"main": masked_cross_entropy(outputs["out"], labels, self.ignore_index, self.ce_normalization)}
        total = parts["main"]
        if "guide" in outputs:
            parts["guide"] = masked_cross_entropy(outputs["guide"], labels, self.ignore_index, self.ce_normalization)
            total = total + self.guide_weight * parts["guide"]
        if "car_features" in outputs:
            car = car_losses(outputs["car_features"], labels, self.num_classes, self.ignore_index)
            parts.update(car)
            total = total + self.car_weight * sum(car.values())
        return total, parts
