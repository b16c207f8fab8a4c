"""Specialize and Fuse: "Pyramidal Output Representation for Semantic Segmentation" (Hsiao et al.,
ICCV 2021).

A stride-4 feature extractor (HRNet, or the ResNet-decoder of App. D; segrepro.models.common.hrnet)
feeds two heads: the unity head (Sec. 4.1) predicts the unity pyramid, the semantic head (Sec. 4.2)
the semantic pyramid, optionally refined by the coarse-to-fine contextual module (Eq. 4-11) or,
for the ablations, by ANL's APNB block. Training relabels "done by coarser" cells on the fly
(Sec. 3.2, segrepro.models.saf.pyramid); inference fuses both pyramids (Eq. 2).

One class serves every ablation of App. C; `head.output` and `head.context` pick the variant:

  output: single     one finest-level prediction, per-pixel CE (A, B, C)
          aux        single output; the coarser levels are auxiliary losses, dropped at test (J)
          pyramidal  semantic + unity pyramids, relabelled Eq. 1 loss, Eq. 2 fuse (D-I, K)
  context: none (A, D, E, F) | anl: APNB on X^(L) (B, G) | anl_multi: APNB per level (H)
           | ours: the coarse-to-fine contextual module (C, I, J, K)

Levels are ordered coarse -> fine (index 0 = level 1, the coarsest), as in the paper.
Where the paper is silent the defaults of the project's implementation notes are taken and
marked "paper silent" below; docs/notes/defaults-saf.md lists every default with its source.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from segrepro.config.families import MODULE_NAMES
from segrepro.core.errors import SegreproError
from segrepro.models.common.losses import masked_cross_entropy
from segrepro.models.saf.config import SafFeaturesConfig, SafHeadConfig
from segrepro.models.saf.features import build_feature_extractor
from segrepro.models.saf.pyramid import (
    Pyramid,
    fuse,
    nearest_divisible_size,
    pyramid_loss,
    pyramid_targets,
    relabel,
    upsample_nearest,
)


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """Conv1x1 -> BN -> ReLU, the unit of Eq. 9 and Eq. 11 ("Conv1x1, BN, ReLU")."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def token_conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """The same unit applied to a token sequence (B, C, N) such as the pooled context θ."""
    return nn.Sequential(
        nn.Conv1d(in_channels, out_channels, 1, bias=False),
        nn.BatchNorm1d(out_channels),
        nn.ReLU(inplace=True),
    )


def final_projection(channels: int, num_classes: int) -> nn.Sequential:
    """App. C "final projection layer" = ConvBlock of Eq. 7: Conv1x1 -> BN -> ReLU -> Conv1x1."""
    return nn.Sequential(conv_bn_relu(channels, channels), nn.Conv2d(channels, num_classes, 1))


def pyramid_pool(x: torch.Tensor, bins: tuple[int, ...]) -> torch.Tensor:
    """Eq. 6 PyramidPool: average-pool (B, C, H, W) to each bins x bins grid, flatten and
    concatenate into tokens (B, C, sum(bins^2)): 110 tokens for bins (1, 3, 6, 8)."""
    return torch.cat([F.adaptive_avg_pool2d(x, b).flatten(2) for b in bins], dim=2)


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention [Vaswani et al.] of every position of a feature map over a
    few context tokens. query (B, d, H, W), key (B, d, N), value (B, e, N) -> (B, e, H, W)."""
    b, d, h, w = query.shape
    weights = torch.softmax(torch.einsum("bdq,bdn->bqn", query.flatten(2), key) / math.sqrt(d), dim=-1)
    return torch.einsum("bqn,ben->beq", weights, value).reshape(b, -1, h, w)


class UnityHead(nn.Module):
    """Sec. 4.1, Fig. 2b: is every pixel of a cell close to the cell's centroid embedding?

    X_u = Conv1x1(X) (D -> D_u); per level, centroids = shared Conv1x1(AvgPool(X_u)); the
    difference Conv1x1(X_u) - NearestUp(centroid) goes through a shared Conv1x1 + sigmoid, and
    min-pooling over each cell gives Û^(ℓ). Returns logits: sigmoid is monotone, so
    min-pooling the logits equals min-pooling the probabilities and the loss can use
    BCE-with-logits.

    `variant` "paper" is Sec. 4.1 as written: plain 1x1 convolutions, the per-pixel logit linear
    in the difference. It can express "unity": when the centroid and pixel convolutions agree,
    the differences along the final projection w sum to zero over a cell, so the cell's minimum
    logit is at most the bias, with equality exactly where the cell is constant along w; the
    min-pooling is the nonlinearity. "abs" (paper silent, a switch: `head.unity_head`) adds
    BN+ReLU to the reduction and |.| to the difference.
    """

    VARIANTS = ("paper", "abs")

    def __init__(self, in_channels: int, channels: int, variant: str = "paper"):
        super().__init__()
        if variant not in self.VARIANTS:
            raise SegreproError(
                f"model.head.unity_head: unknown variant {variant!r} (known: {', '.join(self.VARIANTS)})")
        self.variant = variant
        self.reduce = nn.Conv2d(in_channels, channels, 1) if variant == "paper" else conv_bn_relu(in_channels, channels)
        self.centroid = nn.Conv2d(channels, channels, 1)
        self.pixel = nn.Conv2d(channels, channels, 1)
        self.classify = nn.Conv2d(channels, 1, 1)

    def forward(self, x: torch.Tensor, factors: list[int]) -> list[torch.Tensor]:
        """Unity logits (B, H/f, W/f) for each pooling factor f = s_ℓ / s_L of the levels ℓ < L."""
        embedding = self.reduce(x)
        pixels = self.pixel(embedding)
        logits = []
        for factor in factors:
            centroid = self.centroid(F.avg_pool2d(embedding, factor))
            difference = pixels - upsample_nearest(centroid, factor)
            if self.variant == "abs":
                difference = difference.abs()
            per_pixel = self.classify(difference)
            logits.append(-F.max_pool2d(-per_pixel, factor).squeeze(1))  # min-pooling
        return logits


class ContextAggregation(nn.Module):
    """CA, Eq. 8-9 (Fig. 2d): X'^(ℓ) = Conv1x1_agg(concat(Attention(X^(ℓ), θ^(ℓ-1)), X^(ℓ)))."""

    def __init__(self, channels: int, key_channels: int):
        super().__init__()
        # paper silent on the widths; default: q/k/v Conv1x1+BN+ReLU to d_k, output projection
        # back to D_s so that the concatenation has the paper's 2 D_s channels.
        self.query = conv_bn_relu(channels, key_channels)
        self.key = token_conv_bn_relu(channels, key_channels)
        self.value = token_conv_bn_relu(channels, key_channels)
        self.out = conv_bn_relu(key_channels, channels)
        self.aggregate = conv_bn_relu(2 * channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        attended = self.out(attend(self.query(x), self.key(context), self.value(context)))
        return self.aggregate(torch.cat([attended, x], dim=1))


class ContextUpdate(nn.Module):
    """CU, Eq. 10-11 (Fig. 2e): θ^(ℓ) = Conv1x1_upd(concat(PyramidPool(X'^(ℓ)), θ^(ℓ-1)));
    θ keeps its 110 tokens, so the module stays cheap at every level."""

    def __init__(self, channels: int, bins: tuple[int, ...]):
        super().__init__()
        self.bins = bins
        self.update = token_conv_bn_relu(2 * channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.update(torch.cat([pyramid_pool(x, self.bins), context], dim=1))


class APNB(nn.Module):
    """ANL's asymmetric pyramid non-local block (Zhu et al., ICCV 2019), for ablations B, G, H.

    Query and key share one Conv1x1+BN+ReLU; key and value are sampled by pyramid pooling
    (bins 1, 3, 6, 8); the attended value goes through a zero-initialised Conv1x1 (W), is
    concatenated with the input and fused by Conv1x1+BN+ReLU+Dropout2d.
    """

    def __init__(self, channels: int, key_channels: int, bins: tuple[int, ...], dropout: float):
        super().__init__()
        self.bins = bins
        self.key = conv_bn_relu(channels, key_channels)
        self.value = nn.Conv2d(channels, key_channels, 1)
        self.out = nn.Conv2d(key_channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.fuse = nn.Sequential(conv_bn_relu(2 * channels, channels), nn.Dropout2d(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keys = self.key(x)
        context = attend(keys, pyramid_pool(keys, self.bins), pyramid_pool(self.value(x), self.bins))
        return self.fuse(torch.cat([self.out(context), x], dim=1))


class SemanticHead(nn.Module):
    """Sec. 4.2, Fig. 2c: X^(L) = Conv1x1(X); X^(ℓ) = AvgPool(X^(L), s_ℓ / s_L) (Eq. 3);
    optional context; Ŷ^(ℓ) = ConvBlock^(ℓ)(X'^(ℓ)) (Eq. 7) for the levels that are predicted."""

    def __init__(self, in_channels: int, num_classes: int, head: SafHeadConfig, factors: list[int]):
        super().__init__()
        channels, key_channels, bins = head.semantic_channels, head.key_channels, head.pool_bins
        self.context = head.context
        self.factors = factors
        # Single-output models without our context never look at the coarser levels (A, B).
        self.levels = len(factors) if head.output != "single" or self.context in ("ours", "anl_multi") else 1
        self.predicted = len(factors) if head.output != "single" else 1  # the finest last ones
        # paper silent on BN/ReLU after the D -> D_s projection; default: BN+ReLU.
        self.project = conv_bn_relu(in_channels, channels)
        self.anl = APNB(channels, key_channels, bins, head.dropout) if self.context == "anl" else None
        if self.context == "anl_multi":
            self.anl_levels = nn.ModuleList(
                APNB(channels, key_channels, bins, head.dropout) for _ in range(self.levels)
            )
        if self.context == "ours":
            self.bins = bins
            self.aggregate = nn.ModuleList(ContextAggregation(channels, key_channels) for _ in range(self.levels))
            self.update = nn.ModuleList(ContextUpdate(channels, bins) for _ in range(self.levels - 1))
        self.classify = nn.ModuleList(final_projection(channels, num_classes) for _ in range(self.predicted))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        finest = self.project(x)
        if self.anl is not None:
            # "appending a single ANL to the backbone" (Table 6): refine X^(L) before Eq. 3.
            finest = self.anl(finest)
        levels = [F.avg_pool2d(finest, f) if f > 1 else finest for f in self.factors[-self.levels:]]
        if self.context == "anl_multi":
            levels = [block(level) for block, level in zip(self.anl_levels, levels)]
        elif self.context == "ours":
            context = pyramid_pool(finest, self.bins)  # θ^(0), Eq. 6
            refined = []
            for i, level in enumerate(levels):
                level = self.aggregate[i](level, context)  # Eq. 4
                if i < len(self.update):
                    context = self.update[i](level, context)  # Eq. 5
                refined.append(level)
            levels = refined
        return [classify(level) for classify, level in zip(self.classify, levels[-self.predicted:])]


class SpecializeFuse(nn.Module):
    """The full model of Fig. 2a; `forward` returns {"semantic": logits per predicted level,
    coarse -> fine, and for pyramidal output "unity": logits per level ℓ < L}."""

    module_names = MODULE_NAMES["saf"]  # what train.lr_mult may name

    def __init__(self, num_classes: int, features: SafFeaturesConfig, head: SafHeadConfig = SafHeadConfig(),
                 ignore_index: int = 255):
        super().__init__()
        self.ignore_index = ignore_index
        self.output = head.output
        self.is_pyramidal = self.output == "pyramidal"
        self.tau = float(head.tau)
        self.train_tau = float(head.train_tau)
        self.relabel_policy = head.relabel
        self.finest_target = head.finest_target
        self.aux_weight = float(head.aux_weight)
        self.strides = tuple(sorted(head.strides, reverse=True))
        self.features = build_feature_extractor(features)
        finest = self.strides[-1]
        if finest != self.features.reduction:
            raise SegreproError(
                f"model.head.strides: the finest stride must be the backbone's output stride "
                f"{self.features.reduction}, got {finest}"
            )
        if any(s % finest for s in self.strides):
            raise SegreproError(
                f"model.head.strides: every stride must be a multiple of {finest}: {list(self.strides)}")
        factors = [s // finest for s in self.strides]
        self.semantic = SemanticHead(self.features.out_channels, num_classes, head, factors)
        self.unity = (UnityHead(self.features.out_channels, head.unity_channels, head.unity_head)
                      if self.is_pyramidal else None)
        self.unity_factors = factors[:-1]

    def forward(self, images: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        features = self.features(images)
        outputs = {"semantic": self.semantic(features)}
        if self.unity is not None:
            outputs["unity"] = self.unity(features, self.unity_factors)
        return outputs

    def pyramid(self, images: torch.Tensor) -> Pyramid:
        """Both raw pyramids (unity as probabilities) of images whose sides divide by max(strides)."""
        if not self.is_pyramidal:
            raise SegreproError(f"a model with '{self.output}' output has no pyramid to analyse")
        outputs = self(images)
        return Pyramid([y.float() for y in outputs["semantic"]],
                       [torch.sigmoid(u.float()) for u in outputs["unity"]], self.strides)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Logits at the input resolution: the fused output (Eq. 2) for pyramidal models, the
        finest level otherwise (J drops its auxiliary levels, Sec. 5.4). Sec. 3.1: sides that do
        not divide by the coarsest stride are resized (bilinear) to the nearest divisible size;
        the logits are then resized back to the full input size."""
        height, width = images.shape[-2:]
        size = nearest_divisible_size(height, width, self.strides[0])
        if size != (height, width):
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        outputs = self(images)
        if self.is_pyramidal:
            logits, _ = fuse(outputs["semantic"], [torch.sigmoid(u) for u in outputs["unity"]], self.tau)
        else:
            logits = outputs["semantic"][-1]
        return self._upsample(logits, (height, width))

    def loss(self, outputs: dict, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        semantic = outputs["semantic"]
        if self.output == "single":
            # A, B, C: the standard per-pixel CE on the upsampled finest prediction.
            main = self._pixel_loss(semantic[-1], labels)
            return main, {"main": main}
        targets, unity_targets = pyramid_targets(labels, self.strides, self.ignore_index)
        if self.output == "aux":
            # J (App. C): the finest level is the output, each coarser level's raw pyramidal
            # target an auxiliary loss of weight 0.4 (App. C; HRNet-OCR's auxiliary weight,
            # experiments/ade20k/*.yaml LOSS.BALANCE_WEIGHTS [0.4, 1], summed by
            # lib/core/criterion.py CrossEntropy.forward).
            main = self._pixel_loss(semantic[-1], labels)
            aux = torch.stack([masked_cross_entropy(y, t, self.ignore_index)
                               for y, t in zip(semantic[:-1], targets[:-1])]).sum()
            return main + self.aux_weight * aux, {"main": main, "aux": aux}
        probs = [torch.sigmoid(u.detach().float()) for u in outputs["unity"]]
        finest_cells = targets[-1]
        targets, unity_targets = relabel(targets, unity_targets, probs, self.relabel_policy,
                                         self.train_tau, self.ignore_index)
        if self.finest_target == "pixels":
            # Sec. 3.2: "all cells in the finest level L are assumed to be unity-cells", so the
            # finest level is trained per pixel on its bilinearly upsampled logits, as HRNet-OCR
            # trains (lib/core/criterion.py CrossEntropy._forward); pixels of mix cells at the
            # finest stride keep their labels, only those of "done by coarser" cells are ignored.
            # `cells` (a switch) applies the cell rule of Sec. 3.1 at the finest level too.
            done = (targets[-1] == self.ignore_index) & (finest_cells != self.ignore_index)
            done = upsample_nearest(done, self.strides[-1])
            targets[-1] = labels.masked_fill(done, self.ignore_index)
            semantic = [*semantic[:-1], self._upsample(semantic[-1], labels.shape[-2:])]
        total, parts = pyramid_loss(semantic, outputs["unity"], targets, unity_targets, self.ignore_index)
        return total, parts

    @staticmethod
    def _upsample(logits: torch.Tensor, size) -> torch.Tensor:
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def _pixel_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return masked_cross_entropy(self._upsample(logits, labels.shape[-2:]), labels, self.ignore_index)
