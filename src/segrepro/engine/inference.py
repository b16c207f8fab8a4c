"""Test-time protocols: sliding-window, multi-scale and flip inference, and dataset evaluation.

Everything takes a `forward` callable, x (N,3,h,w) -> logits (N,K,h,w) at the input
resolution. An eval-mode `nn.Module` is such a callable; a model that returns a dict, or
needs extra inputs, is plugged in by wrapping it in a small function.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from segrepro.core.errors import SegreproError
from segrepro.engine.metrics import ConfusionMatrix

Forward = Callable[[torch.Tensor], torch.Tensor]

# How an image smaller than the test window is fed (predict_probs).
PADS = ("none", "each_scale", "before_scaling")


def _pair(value: int | Sequence[int], what: str) -> tuple[int, int]:
    """Accept a square size (int) or an explicit (h, w)."""
    if isinstance(value, int):
        h = w = value
    else:
        h, w = (int(v) for v in value)
    if h < 1 or w < 1:
        raise ValueError(f"{what} must be positive, got {value}")
    return h, w


def round_half_up(x: float) -> int:
    """Round .5 up, like mmcv/OpenCV resizing code; Python's round() rounds half to even."""
    return int(math.floor(x + 0.5))


def tile_starts(size: int, crop: int, stride: int) -> list[int]:
    """Offsets of crops of length `crop` covering [0, size) with step `stride`.

    The last crop is moved back to end exactly at the border, so every pixel is covered
    and no crop reaches outside the (padded) image. Requires size >= crop.
    """
    if size < crop:
        raise ValueError(f"size {size} is smaller than crop {crop}; pad first")
    n = math.ceil((size - crop) / stride) + 1
    starts = []
    for i in range(n):
        s = min(i * stride, size - crop)
        if not starts or s != starts[-1]:
            starts.append(s)
    return starts


def _run(forward: Forward, x: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Call the model and check it kept the contract (K channels at input resolution)."""
    out = forward(x)
    expected = (x.shape[0], num_classes, x.shape[2], x.shape[3])
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"forward must return logits of shape {expected}, got {got}")
    return out


def sliding_window_logits(
    forward: Forward,
    image: torch.Tensor,
    num_classes: int,
    crop_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    pad_to_crop: bool = False,
) -> torch.Tensor:
    """Logits (1,K,H,W) for one image (1,3,H,W), computed crop by crop as in the PSPNet protocol.

    An image that fits in the crop is run whole, unless `pad_to_crop`. Otherwise it is
    zero-padded (0 is the mean after normalisation) centrally up to at least the crop size,
    tiled with `stride` (default ceil(2/3 crop), the PSPNet reference value), the logits of
    overlapping tiles are averaged, and the padding is cut off again. Output is float32.
    With `pad_to_crop` (semseg tool/test.py scale_process) the model always sees the crop size,
    so its pooling sees the padded extent, as in training.
    """
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"expected one image of shape (1,C,H,W), got {tuple(image.shape)}")
    H, W = image.shape[-2:]
    ch, cw = _pair(crop_size, "crop_size")
    if H <= ch and W <= cw and not pad_to_crop:
        return _run(forward, image, num_classes).float()
    if stride is None:
        sh, sw = math.ceil(2 * ch / 3), math.ceil(2 * cw / 3)
    else:
        sh, sw = _pair(stride, "stride")

    # Central padding, as in the PSPNet reference code, only along the too-small sides.
    pad_h, pad_w = max(ch - H, 0), max(cw - W, 0)
    top, left = pad_h // 2, pad_w // 2
    padded = F.pad(image, (left, pad_w - left, top, pad_h - top), value=0.0)
    Hp, Wp = padded.shape[-2:]

    logits = torch.zeros((1, num_classes, Hp, Wp), dtype=torch.float32, device=image.device)
    count = torch.zeros((1, 1, Hp, Wp), dtype=torch.float32, device=image.device)
    for y in tile_starts(Hp, ch, sh):
        for x in tile_starts(Wp, cw, sw):
            tile = padded[:, :, y : y + ch, x : x + cw]
            logits[:, :, y : y + ch, x : x + cw] += _run(forward, tile, num_classes).float()
            count[:, :, y : y + ch, x : x + cw] += 1
    logits /= count
    return logits[:, :, top : top + H, left : left + W]


def scaled_size(height: int, width: int, scale: float, base_size: int | None = None) -> tuple[int, int]:
    """Size of the image at one test scale.

    Without `base_size` the image itself is scaled by `scale`. With it, the long side is first
    set to `base_size` (keeping the aspect ratio) and then scaled, as the PSPNet and mmseg
    protocols do.
    """
    factor = scale if base_size is None else scale * base_size / max(height, width)
    return max(1, round_half_up(height * factor)), max(1, round_half_up(width * factor))


def odd_keeping_size(height: int, width: int, factor: float) -> tuple[int, int]:
    """Each side times `factor`, rounded down, plus one where that made an odd side even (iSeg
    utils/common.py get_scaled_size, pad_mode 1, which HFGD's test scales use: 513 -> 257 at 0.5)."""
    def side(n: int) -> int:
        m = max(1, int(factor * n))
        return m + 1 if m % 2 == 0 and n % 2 == 1 else m
    return side(height), side(width)


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def pass_probs(
    forward: Forward,
    image: torch.Tensor,
    num_classes: int,
    crop_size: int | Sequence[int],
    size: tuple[int, int],
    flipped: bool = False,
    pad: str = "none",
) -> torch.Tensor:
    """Probabilities (1,K,H,W) of one test pass: resize to `size`, optionally mirror, predict.

    The mirrored pass flips the input and flips the prediction back, so both passes are
    aligned with the original image before they are averaged. `pad` as in predict_probs: with
    "each_scale" a resized image smaller than the crop is padded up to it; with
    "before_scaling" (the image given is already padded) the windows are at most the resized
    image's size, so nothing is padded again (iSeg core_model.py inference_with_scale).
    """
    H, W = image.shape[-2:]
    x = _resize(image, size)
    if flipped:
        x = x.flip(-1)
    if pad == "before_scaling":
        crop_h, crop_w = _pair(crop_size, "crop_size")
        crop_size = (min(crop_h, size[0]), min(crop_w, size[1]))
    logits = sliding_window_logits(forward, x, num_classes, crop_size, pad_to_crop=pad == "each_scale")
    if flipped:
        logits = logits.flip(-1)
    probs = torch.softmax(logits.float(), dim=1)
    return _resize(probs, (H, W))


def predict_probs(
    forward: Forward,
    image: torch.Tensor,
    num_classes: int,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    crop_size: int | Sequence[int] = 512,
    base_size: int | None = None,
    pad: str = "none",
) -> torch.Tensor:
    """Class probabilities (K,H,W) of one image (1,3,H,W), averaged over scales and flips.

    Each pass: bilinear resize (align_corners=False), sliding-window logits, softmax, resize
    back to H x W. All passes get equal weight. `pad` says how an image smaller than the crop
    is fed (params.schema.yaml, $defs.pad): "none" at its own size; "each_scale" (PSPNet,
    semseg tool/test.py) every resized image padded centrally up to the crop; "before_scaling"
    (HFGD, iSeg data_process/pipeline.py PadAugment before core_model.py's test scales) the
    image padded at its bottom and right up to the crop once, then resized per scale with
    iSeg's sizes (odd_keeping_size) and the prediction cut back to H x W. Padding is 0: the
    mean colour once normalised.
    """
    if not scales:
        raise ValueError("scales must not be empty")
    if pad not in PADS:
        raise ValueError(f"pad must be one of {', '.join(PADS)}, got {pad!r}")
    H, W = image.shape[-2:]
    if pad == "before_scaling":
        crop_h, crop_w = _pair(crop_size, "crop_size")
        image = F.pad(image, (0, max(crop_w - W, 0), 0, max(crop_h - H, 0)), value=0.0)
    padded_h, padded_w = image.shape[-2:]
    total = torch.zeros((num_classes, padded_h, padded_w), dtype=torch.float32, device=image.device)
    passes = 0
    for s in scales:
        if pad == "before_scaling":
            factor = float(s) * (1.0 if base_size is None else base_size / max(H, W))
            size = odd_keeping_size(padded_h, padded_w, factor)
        else:
            size = scaled_size(H, W, float(s), base_size)
        for flipped in (False, True) if flip else (False,):
            total += pass_probs(forward, image, num_classes, crop_size, size, flipped, pad)[0]
            passes += 1
    return total[:, :H, :W] / passes


def _iterate(dataset) -> Iterable:
    """Index map-style datasets explicitly; plain iterables are iterated."""
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        return (dataset[i] for i in range(len(dataset)))
    return iter(dataset)


def evaluate(
    forward: Forward,
    dataset,
    protocol: dict,
    device: str | torch.device,
    num_classes: int,
    ignore_index: int = 255,
    crop_size: int | Sequence[int] = 512,
    base_size: int | None = None,
    progress: bool = True,
    per_image: bool = False,
) -> ConfusionMatrix:
    """Run a test protocol over a dataset of (image (3,H,W), label (H,W), id) and count pixels.

    `protocol` = {"scales": [...], "flip": bool, "pad": str (default "none")}; other keys (a
    name, a description) are ignored. Images are processed one at a time because
    their sizes may differ. On CUDA the forward passes run under bf16 autocast; the
    accumulation of logits and probabilities stays float32. The model must already be on
    `device`; an `nn.Module` is switched to eval mode here. With `per_image` the matrix also
    records each image's counts (ConfusionMatrix.per_image_counts), in the dataset's order.
    """
    if "scales" not in protocol:
        raise SegreproError(f"test protocol {protocol!r} has no 'scales'")
    scales = [float(s) for s in protocol["scales"]]
    flip = bool(protocol.get("flip", False))
    pad = protocol.get("pad", "none")
    if not scales:
        raise SegreproError("test protocol has an empty 'scales' list")
    if pad not in PADS:
        raise SegreproError(f"test protocol {protocol!r}: pad must be one of {', '.join(PADS)}")

    device = torch.device(device)
    if isinstance(forward, torch.nn.Module):
        # BatchNorm/Dropout in train mode would silently change the numbers.
        forward.eval()
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )
    cm = ConfusionMatrix(num_classes, ignore_index, per_image=per_image)
    total = len(dataset) if hasattr(dataset, "__len__") else None
    with torch.inference_mode(), amp:
        for image, label, _ in tqdm(
            _iterate(dataset), total=total, desc="eval", file=sys.stderr, disable=not progress
        ):
            image = torch.as_tensor(image).to(device, torch.float32).unsqueeze(0)
            label = torch.as_tensor(label).to(device)
            probs = predict_probs(forward, image, num_classes, scales, flip, crop_size, base_size, pad)
            cm.update(probs.argmax(0), label)
    return cm
