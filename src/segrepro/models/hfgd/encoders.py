"""Extra encodings on the backbone's deepest feature, and the attention layers of HFGD: "High-level
Feature Guided Decoding for Semantic Segmentation" (Huang, Kang, Gao, Li, Duan).

`build_encoder` gives the "Extra Encoding" column of Table 1 (Identity, ASPP, OCR, SA, SA (CAR)),
the paper's CAE (Sec. 3.2), a bare 1x1 projection (the "-" row of Table 8, FaPN's top) and
UperNet's PPM (Table 8). Each operates on F, the backbone's deepest feature at output stride
OS (32 for HFGD, 8 for the dilated rows of Table 1), keeps its spatial size and returns
(out, extras): `out` has the model's class-token width, `extras` holds "car_features" (the CAR
module's linear output, the input of segrepro.models.hfgd.car.car_losses) for the CAR-regularised
encoders, and is empty otherwise.

`AxialAttention` is HFGM's helper on the upsampler path (Sec. 3.1). Widths, orders and
initialisations follow the authors' TensorFlow code as the implementation notes
(notes-hfgd.md §1, §2, §5) record it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from segrepro.core.errors import SegreproError
from segrepro.models.common.layers import conv_bn_relu, resize
from segrepro.models.hfgd.car import CARModule
from segrepro.models.hfgd.config import EncoderConfig

ENCODER_TYPES = ("none", "identity", "aspp", "ocr", "sa", "sa_car", "cae", "ppm")


def _share_initial_values(source: nn.Conv2d, target: nn.Conv2d) -> None:
    """Query and key start from the same values but are trained separately (the authors'
    shared initialiser, notes §1 and §2)."""
    with torch.no_grad():
        target.weight.copy_(source.weight)
        target.bias.copy_(source.bias)


class SelfAttention(nn.Module):
    """Full self-attention of CAR's "SA" head (notes §2, iSeg SelfAttention): query and key are
    1x1 convs with bias to `key_channels` (64), the value a 1x1 conv keeping the width; the dot
    products are NOT scaled by 1/sqrt(d), the softmax runs over the keys (every position), and
    there is no output projection. Returns the attended value; the caller adds the residual."""

    def __init__(self, in_channels: int, key_channels: int = 64):
        super().__init__()
        self.query = nn.Conv2d(in_channels, key_channels, 1)
        self.key = nn.Conv2d(in_channels, key_channels, 1)
        self.value = nn.Conv2d(in_channels, in_channels, 1)
        _share_initial_values(self.query, self.key)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query = self.query(x).flatten(2)  # (N, d, HW)
        key = self.key(x).flatten(2)
        value = self.value(x).flatten(2)  # (N, C, HW)
        scores = torch.einsum("ndq,ndk->nqk", query, key)
        weights = torch.softmax(scores.float(), dim=-1).to(value.dtype)
        return torch.einsum("nqk,nck->ncq", weights, value).reshape(x.shape)


class AxialAttention(nn.Module):
    """Multi-head axial attention of HFGM (Sec. 3.1; notes §1, iSeg MultiHeadAxialAttentionLayer).

    q, k, v: 1x1 convs with bias, width = channels, split into `heads` heads (q and k start
    from the same values). From the same q/k, a height map (each column attends along H) and
    a width map (each row attends along W), both scaled by 1/sqrt(d_head) and soft-maxed in
    float32; the value goes through the height map, then through the width map, so one pass
    reaches every position. No positional encoding, no output projection, no norm.
    forward returns x + AA(x): the residual is the notes' default [D] (iSeg's layer has none;
    CAR's self-attention is residual).
    """

    def __init__(self, channels: int, heads: int = 4):
        super().__init__()
        if heads < 1 or channels % heads:
            raise SegreproError(f"AxialAttention: channels ({channels}) must divide by heads ({heads})")
        self.heads = heads
        self.query = nn.Conv2d(channels, channels, 1)
        self.key = nn.Conv2d(channels, channels, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        _share_initial_values(self.query, self.key)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return x.reshape(n, self.heads, c // self.heads, h, w)  # (N, heads, d, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query, key, value = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scale = 1 / math.sqrt(query.shape[2])
        # height map: per column w, position i attends to every j of that column
        height_map = torch.einsum("nadiw,nadjw->nawij", query, key) * scale
        # width map: per row i, position w attends to every u of that row
        width_map = torch.einsum("nadiw,nadiu->naiwu", query, key) * scale
        height_map = torch.softmax(height_map.float(), dim=-1).to(value.dtype)
        width_map = torch.softmax(width_map.float(), dim=-1).to(value.dtype)
        along_height = torch.einsum("nawij,nadjw->nadiw", height_map, value)
        attended = torch.einsum("naiwu,nadiu->nadiw", width_map, along_height)
        return x + attended.reshape(x.shape)


class Residual(nn.Module):
    """x + block(x): how CAR's and the CAE's self-attention is applied (notes §2)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class AtrousSpatialPyramidPooling(nn.Module):
    """ASPP as in CAR's DeepLabV3 head (notes §5): image-level branch (global average pool,
    1x1 ConvBnReLU, broadcast), a 1x1 branch and three 3x3 atrous branches, each `channels`
    wide, concatenated (5 x channels) and projected by a 1x1 ConvBnReLU to `channels`."""

    def __init__(self, in_channels: int, channels: int, rates: list[int]):
        super().__init__()
        self.image_level = conv_bn_relu(in_channels, channels, 1)
        self.pixel_level = conv_bn_relu(in_channels, channels, 1)
        self.atrous = nn.ModuleList(conv_bn_relu(in_channels, channels, 3, dilation=rate) for rate in rates)
        self.project = conv_bn_relu(channels * (2 + len(rates)), channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image = self.image_level(x.mean(dim=(2, 3), keepdim=True)).expand(-1, -1, *x.shape[-2:])
        branches = [image, self.pixel_level(x), *(conv(x) for conv in self.atrous)]
        return self.project(torch.cat(branches, dim=1))


class ObjectContextualRepresentations(nn.Module):
    """OCR as in CAR's OCR head (notes §5), without its supervised auxiliary loss:

    soft object regions = a 3x3 ConvBnReLU (keeping the input width, as CAR's dsn_conv) + 1x1
    class logits, soft-maxed over space; region representations = those weights applied to the
    pixel features (a 3x3 ConvBnReLU to `hidden`); object attention: pixel queries and region
    keys each through two 1x1 ConvBnReLU to `key_channels`, region values through one, scaled
    dot product soft-maxed over the regions, the result back to `hidden` by a 1x1 ConvBnReLU;
    concatenated with the pixel features and fused by a 1x1 ConvBnReLU to `hidden`.
    """

    def __init__(self, in_channels: int, hidden: int, key_channels: int, num_classes: int):
        super().__init__()
        self.region_features = conv_bn_relu(in_channels, in_channels, 3)
        self.region_logits = nn.Conv2d(in_channels, num_classes, 1)
        self.pixels = conv_bn_relu(in_channels, hidden, 3)
        self.query = nn.Sequential(conv_bn_relu(hidden, key_channels, 1), conv_bn_relu(key_channels, key_channels, 1))
        self.key = nn.Sequential(conv_bn_relu(hidden, key_channels, 1), conv_bn_relu(key_channels, key_channels, 1))
        self.value = conv_bn_relu(hidden, key_channels, 1)
        self.up = conv_bn_relu(key_channels, hidden, 1)
        self.fuse = conv_bn_relu(2 * hidden, hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.region_logits(self.region_features(x)).flatten(2)  # (N, K, HW)
        pixels = self.pixels(x)
        spatial_weights = torch.softmax(logits.float(), dim=-1).to(pixels.dtype)
        # regions as a (N, hidden, K, 1) map, so the 1x1 ConvBnReLUs apply to them unchanged
        regions = torch.einsum("nkp,ncp->nck", spatial_weights, pixels.flatten(2)).unsqueeze(-1)
        query = self.query(pixels).flatten(2)  # (N, d, HW)
        key = self.key(regions).flatten(2)  # (N, d, K)
        value = self.value(regions).flatten(2)
        scores = torch.einsum("ndp,ndk->npk", query, key) / math.sqrt(query.shape[1])
        weights = torch.softmax(scores.float(), dim=-1).to(value.dtype)
        context = torch.einsum("npk,ndk->ndp", weights, value).reshape(pixels.shape[0], -1, *pixels.shape[-2:])
        return self.fuse(torch.cat([self.up(context), pixels], dim=1))


class PyramidPoolingModule(nn.Module):
    """UperNet's PPM as in CAR's UperNet head (notes §5): adaptive average pooling to each
    bins x bins grid, a 3x3 ConvBnReLU to `hidden` per level (mmseg uses 1x1), bilinear
    upsampling, concatenation with F and a 3x3 ConvBnReLU to `channels`."""

    def __init__(self, in_channels: int, hidden: int, channels: int, bins: tuple[int, ...]):
        super().__init__()
        self.bins = list(bins)
        self.levels = nn.ModuleList(conv_bn_relu(in_channels, hidden, 3) for _ in self.bins)
        self.fuse = conv_bn_relu(in_channels + hidden * len(self.bins), channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        levels = [resize(conv(F.adaptive_avg_pool2d(x, bins)), size) for bins, conv in zip(self.bins, self.levels)]
        return self.fuse(torch.cat([x, *levels], dim=1))


class PlainEncoder(nn.Module):
    """An encoder without auxiliary outputs: its layers in order, extras = {}."""

    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return self.layers(x), {}


class CAREncoder(nn.Module):
    """stem -> x + SA(x) -> CAR module -> 1x1 ConvBnReLU to `channels`: CAR's "SA + CAR" head
    (stem = 3x3 ConvBnReLU) and the CAE of Sec. 3.2 (stem = wide linear 1x1, linear 1x1).
    extras["car_features"] is the CAR module's linear output (the CAR losses' input)."""

    def __init__(self, stem: nn.Module, hidden: int, key_channels: int, channels: int):
        super().__init__()
        self.stem = stem
        self.attention = Residual(SelfAttention(hidden, key_channels))
        self.car = CARModule(hidden)
        self.end = conv_bn_relu(self.car.channels, channels, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        x, car_features = self.car(self.attention(self.stem(x)))
        return self.end(x), {"car_features": car_features}


def cae_stem(in_channels: int, wide: int, hidden: int, wide_bn_relu: bool = False) -> nn.Sequential:
    """The CAE's first two layers (Sec. 3.2): "a wider linear layer (i.e. 1x1 conv with 2048
    channels)", then "a linear layer to reduce the features to 512-D"; it replaces CAR's 3x3
    ConvBnReLU. The HFGD code is not public; in the authors' CAR code a "linear" conv is one
    without norm and activation (CAR `car_core/car.py`, linear_conv: "w/o norm&activation ... can
    be merged to the next one"), so both are bare 1x1 convs with bias, and together they are one
    linear map of rank <= hidden. `wide_bn_relu` puts BN + ReLU after the wide layer (the wide
    conv then without bias), the reading in which its width adds capacity."""
    if wide_bn_relu:
        return nn.Sequential(conv_bn_relu(in_channels, wide, 1), nn.Conv2d(wide, hidden, 1))
    return nn.Sequential(nn.Conv2d(in_channels, wide, 1), nn.Conv2d(wide, hidden, 1))


def build_encoder(config: EncoderConfig, in_channels: int, channels: int, output_stride: int,
                  num_classes: int | None = None) -> nn.Module:
    """The extra encoding `config.type` on F (in_channels, at `output_stride`), producing
    `channels`; `num_classes` gives OCR's soft object regions (required for 'ocr'). The other
    knobs (hidden, key_channels, wide, wide_bn_relu, rates, bins) are EncoderConfig's fields."""
    kind = config.type
    hidden = int(config.hidden)
    key_channels = int(config.key_channels)
    if kind == "none":
        # no extra encoding: only the projection to the class-token width
        return PlainEncoder(conv_bn_relu(in_channels, channels, 1))
    if kind == "identity":
        # the basic FCN head of Table 1 (CAR heads/fcn.py)
        return PlainEncoder(conv_bn_relu(in_channels, hidden, 3), conv_bn_relu(hidden, channels, 1))
    if kind == "aspp":
        if output_stride <= 0 or 32 % output_stride:
            raise SegreproError(f"ASPP: the output stride must divide 32, got {output_stride}")
        rates = [int(rate) * (32 // output_stride) for rate in config.rates]
        return PlainEncoder(AtrousSpatialPyramidPooling(in_channels, channels, rates))
    if kind == "ocr":
        if num_classes is None:
            raise SegreproError("the 'ocr' encoder needs num_classes for its soft object regions")
        # CAR's object attention is 256 wide, as the class tokens: it scales with `channels`.
        return PlainEncoder(
            ObjectContextualRepresentations(in_channels, hidden, channels, int(num_classes)),
            conv_bn_relu(hidden, channels, 1),
        )
    if kind == "sa":
        # CAR's non-local head in baseline mode: 3x3, residual SA, 3x3 (notes §5)
        return PlainEncoder(
            conv_bn_relu(in_channels, hidden, 3),
            Residual(SelfAttention(hidden, key_channels)),
            conv_bn_relu(hidden, hidden, 3),
            conv_bn_relu(hidden, channels, 1),
        )
    if kind == "sa_car":
        return CAREncoder(conv_bn_relu(in_channels, hidden, 3), hidden, key_channels, channels)
    if kind == "cae":
        return CAREncoder(cae_stem(in_channels, int(config.wide), hidden, config.wide_bn_relu),
                          hidden, key_channels, channels)
    if kind == "ppm":
        return PlainEncoder(PyramidPoolingModule(in_channels, hidden, channels, config.bins))
    raise SegreproError(f"unknown encoder type '{kind}' (known: {', '.join(ENCODER_TYPES)})")
