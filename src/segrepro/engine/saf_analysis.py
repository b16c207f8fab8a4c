"""SaF performance analysis (Sec. 5.5): what each level of a trained pyramidal model does.

`analyse_levels` runs the model once per evaluation image (single scale) and counts, at the
network-input resolution, how well each semantic level predicts the pixels the predicted unity
pyramid assigns to each level (Table 9), the per-class IoU of every level and of the fused output
(Fig. 3 and Fig. C), the share of pixels fused from each level, and the unity head's
precision/recall against the stored ground-truth pyramids (segrepro.engine.pyramid_store). The
evaluator stores the result in the metrics JSON; segrepro.reporting.saf_report turns it into Table 9 and
the figures.

Levels are ordered coarse -> fine in every list (index 0 = level 1 = coarsest).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from segrepro.core.errors import SegreproError
from segrepro.engine.metrics import ConfusionMatrix
from segrepro.engine.pyramid_store import (
    INDEX_NAME,
    STORED_IGNORE,
    evaluation_image,
    evaluation_label,
    read_index,
    read_pyramid,
)
from segrepro.models.saf.pyramid import Pyramid, fuse, upsample_nearest

# ----------------------------------------------------------------------------- one forward pass

class _Pass(NamedTuple):
    """One image through the model at the single-scale network size (Sec. 3.1: the evaluation
    size resized to the nearest size divisible by the coarsest stride)."""

    image: torch.Tensor  # (1,3,Hp,Wp) network input, normalised
    label: torch.Tensor  # (Hp,Wp) int64, the label resized (nearest) to the network size
    size: tuple[int, int]  # (Hp, Wp)
    pyramid: Pyramid  # float32 logits / probabilities, coarse -> fine
    fused: torch.Tensor  # (1,C,h_L,w_L) fused logits, Eq. 2
    assignment: torch.Tensor  # (1,h_L,w_L) level index each finest cell takes its label from


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def check_model(model) -> tuple[int, ...]:
    for attr in ("strides", "tau", "pyramid"):
        if not hasattr(model, attr):
            raise SegreproError(f"the model has no '{attr}': the level analysis needs a SaF pyramid model")
    if not getattr(model, "is_pyramidal", False):
        raise SegreproError("the level analysis needs a pyramidal-output model (is_pyramidal is False)")
    strides = tuple(int(s) for s in model.strides)
    if len(strides) < 2:
        raise SegreproError(f"the level analysis needs at least two pyramid levels, the model has {list(strides)}")
    return strides


def run_pyramid(model, image, label, device, base_size, num_classes: int, ignore_index: int) -> _Pass:
    """Network geometry of the ss protocol (pyramid_store), one whole-image `pyramid` pass, fuse."""
    strides = tuple(int(s) for s in model.strides)
    multiple = max(strides)  # Sec. 3.1: sides divisible by the coarsest cell
    image = torch.as_tensor(image).to(device, torch.float32)
    if image.dim() != 3:
        raise ValueError(f"expected an image of shape (3,H,W), got {tuple(image.shape)}")
    label = np.asarray(torch.as_tensor(label).cpu().numpy())
    x = evaluation_image(image.unsqueeze(0), base_size, multiple)
    y = torch.from_numpy(evaluation_label(label, base_size, multiple, ignore_index).astype(np.int64)).to(device)
    size = tuple(x.shape[-2:])

    # Like inference.evaluate: bf16 autocast on CUDA for the network; the analysis itself in fp32.
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    with torch.inference_mode():
        with amp:
            out = model.pyramid(x)
        semantic = [s.float() for s in out.semantic]
        unity = [u.float() for u in out.unity]
    if tuple(int(s) for s in out.strides) != strides:
        raise ValueError(f"model.pyramid returned strides {list(out.strides)}, model.strides is {list(strides)}")
    if len(semantic) != len(strides) or len(unity) != len(strides) - 1:
        raise ValueError(f"model.pyramid returned {len(semantic)} semantic and {len(unity)} unity levels"
                         f" for strides {list(strides)}")
    hp, wp = x.shape[-2:]
    for level, stride in enumerate(strides):
        expected = (1, num_classes, hp // stride, wp // stride)
        if semantic[level].shape[1] != num_classes:
            raise SegreproError(f"the model predicts {semantic[level].shape[1]} classes, the dataset has {num_classes}")
        if tuple(semantic[level].shape) != expected:
            raise ValueError(f"semantic level {level + 1}: shape {tuple(semantic[level].shape)}, expected {expected}")
        if level < len(unity) and tuple(unity[level].shape) != (1, *expected[2:]):
            raise ValueError(f"unity level {level + 1}: shape {tuple(unity[level].shape)},"
                             f" expected {(1, *expected[2:])}")
    with torch.inference_mode():
        fused, assignment = fuse(semantic, unity, float(model.tau))
    pyramid = Pyramid(semantic=semantic, unity=unity, strides=strides)
    return _Pass(x, y, size, pyramid, fused.float(), assignment)


def pixels_from_finest(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Finest-level logits -> pixels: bilinear, as the fused output goes to image size (Sec. 3.3;
    paper silent on the mode; default from notes-saf.md section 5: bilinear)."""
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def _level_pixel_logits(p: _Pass, level: int) -> torch.Tensor:
    """Level logits -> the finest grid with nearest Up() (Eq. 2; paper silent, default: nearest),
    then to pixels exactly as the fused output: the same path a fused cell of this level takes."""
    factor = p.pyramid.strides[level] // p.pyramid.strides[-1]
    return pixels_from_finest(upsample_nearest(p.pyramid.semantic[level], factor), tuple(p.label.shape))


def _pixel_assignment(p: _Pass) -> torch.Tensor:
    """(Hp,Wp) assignment level per pixel: nearest, i.e. each finest cell's level copied to its pixels."""
    return upsample_nearest(p.assignment[0], p.pyramid.strides[-1])


# ----------------------------------------------------------------------------- the analysis

def _check_pyramid_dir(pyramid_dir: Path, base_size) -> None:
    """A pyramid folder built for another evaluation size would compare cells of other images."""
    if not pyramid_dir.is_dir():
        raise SegreproError(f"{pyramid_dir}: ground-truth pyramid folder not found (run write_pyramids first)")
    if (pyramid_dir / INDEX_NAME).is_file():
        index = read_index(pyramid_dir)
        stored = index["base_size"]
        if (None if stored is None else int(stored)) != (None if base_size is None else int(base_size)):
            raise SegreproError(f"{pyramid_dir}: pyramids were written for base_size {stored},"
                                f" the analysis uses {base_size}")


def _unity_gt(pyramid_dir: Path, image_id: str, strides, shapes) -> list[np.ndarray]:
    """The stored ground-truth unity maps U^(l), l < L (App. B), checked against the predicted grids."""
    path = pyramid_dir / f"{image_id}.npz"
    stored = read_pyramid(path)
    maps = []
    for level, stride in enumerate(strides[:-1]):
        if stride not in stored:
            raise SegreproError(f"{path}: no stride-{stride} level (stored strides {sorted(stored, reverse=True)})")
        unity = stored[stride][1]
        if unity.shape != tuple(shapes[level]):
            raise SegreproError(f"{path}: unity_s{stride} is {unity.shape[1]}x{unity.shape[0]} cells, the model"
                                f" predicts {shapes[level][1]}x{shapes[level][0]} (other base_size or strides?)")
        maps.append(unity)
    return maps


class _LevelCounts:
    """Pixel and cell counts of the analysis, accumulated image by image."""

    def __init__(self, strides, num_classes: int, ignore: int, tau: float) -> None:
        L = len(strides)
        self.L, self.ignore, self.tau = L, ignore, tau
        self.pairs = [[ConfusionMatrix(num_classes, ignore) for _ in range(L)] for _ in range(L)]  # [l'][l]
        self.levels = [ConfusionMatrix(num_classes, ignore) for _ in range(L)]
        self.fused = ConfusionMatrix(num_classes, ignore)
        self.assigned = np.zeros(L, np.int64)  # labelled pixels fused from each level
        self.unity = np.zeros((L - 1, 3), np.int64)  # tp, fp, fn per level l < L
        self.images = 0

    def add(self, p: _Pass, unity_gt: list[np.ndarray]) -> None:
        L = self.L
        h, w = p.size  # the whole network-size grid
        target = p.label[:h, :w]
        assignment = _pixel_assignment(p)[:h, :w]
        self.assigned += torch.bincount(assignment[target != self.ignore], minlength=L).cpu().numpy()
        masks = [assignment == level for level in range(L)]

        # Table 9 and Fig. 3 / C: each semantic level as if it were the output.
        for sem in range(L):
            pred = _level_pixel_logits(p, sem)[0, :, :h, :w].argmax(0)
            self.levels[sem].update(pred, target)
            for level in range(L):
                self.pairs[sem][level].update(pred[masks[level]], target[masks[level]])
        fused = pixels_from_finest(p.fused, tuple(p.label.shape))[0, :, :h, :w].argmax(0)
        self.fused.update(fused, target)

        # Unity head: a predicted unity cell is probability >= tau (Sec. 3.3); GT don't-care excluded.
        for level, truth in enumerate(unity_gt):
            truth = torch.from_numpy(truth.astype(np.int64)).to(p.label.device)
            predicted = p.pyramid.unity[level][0] >= self.tau
            keep = truth != STORED_IGNORE
            positive = (truth == 1) & keep
            negative = (truth == 0) & keep
            self.unity[level] += [int((predicted & positive).sum()), int((predicted & negative).sum()),
                                  int((~predicted & positive).sum())]
        self.images += 1


def _percent(part: int, whole: int) -> float | None:
    return 100.0 * part / whole if whole else None


def analyse_levels(model, dataset, pyramid_dir, device, base_size=None, progress: bool = False) -> dict:
    """Table 9, Fig. 3 / C and unity precision/recall of one model on one evaluation split.

    `dataset` yields (image (3,H,W) normalised, label (H,W), image_id) and has `class_names`
    (and `ignore_index`, default 255); `pyramid_dir` holds `<image_id>.npz` ground-truth pyramids
    written by pyramid_store.write_pyramids with the same `base_size`. Counting is at the
    network-input size (Sec. 3.1's divisible size). Returns (numbers in percent):

    - strides, tau, class_names, num_images, base_size
    - assignment_pixels / assignment_share: labelled pixels fused from each level (Eq. 2)
    - level_by_assignment_miou: [l'][l], mIoU of argmax(level l') over the pixels assigned to l
      (rows semantic level, columns assignment level, both coarse -> fine; None if no pixels)
    - level_miou, level_class_iou {str(stride): {class: iou}}: each level alone, all pixels
    - fused_miou, fused_class_iou: the fused output of the same pass
    - unity: per level l < L, tp/fp/fn of "probability >= tau" against the stored U^(l),
      ground-truth don't-care cells excluded, with precision and recall (None when undefined)
    """
    strides = check_model(model)
    device = torch.device(device)
    pyramid_dir = Path(pyramid_dir)
    _check_pyramid_dir(pyramid_dir, base_size)
    names = list(dataset.class_names)
    num_classes = len(names)
    ignore = int(getattr(dataset, "ignore_index", 255))
    tau = float(model.tau)
    L = len(strides)
    if isinstance(model, torch.nn.Module):
        model.eval()  # BatchNorm/Dropout in train mode would change the numbers

    counts = _LevelCounts(strides, num_classes, ignore, tau)
    for index in tqdm(range(len(dataset)), desc="levels", file=sys.stderr, disable=not progress):
        image, label, image_id = dataset[index]
        with torch.inference_mode():
            p = run_pyramid(model, image, label, device, base_size, num_classes, ignore)
            gt = _unity_gt(pyramid_dir, str(image_id), strides, [u.shape[-2:] for u in p.pyramid.unity])
            counts.add(p, gt)
    if counts.images == 0:
        raise SegreproError("the evaluation dataset has no images")
    pairs, levels, fused_cm = counts.pairs, counts.levels, counts.fused
    assigned, unity_counts, count = counts.assigned, counts.unity, counts.images

    total = int(assigned.sum())
    level_summaries = [cm.summary(names) for cm in levels]
    fused_summary = fused_cm.summary(names)
    unity = []
    for level, (tp, fp, fn) in enumerate(unity_counts.tolist()):
        unity.append({
            "level": level + 1, "stride": strides[level], "tp": tp, "fp": fp, "fn": fn,
            "precision": _percent(tp, tp + fp), "recall": _percent(tp, tp + fn),
        })
    return {
        "strides": list(strides),
        "tau": tau,
        "base_size": base_size,
        "class_names": names,
        "num_images": count,
        "assignment_pixels": [int(n) for n in assigned],
        "assignment_share": [_percent(int(n), total) for n in assigned],
        "level_by_assignment_miou": [[pairs[sem][level].summary(names)["miou"] for level in range(L)]
                                     for sem in range(L)],
        "level_miou": [s["miou"] for s in level_summaries],
        "level_class_iou": {str(stride): s["per_class_iou"] for stride, s in zip(strides, level_summaries)},
        "fused_miou": fused_summary["miou"],
        "fused_class_iou": fused_summary["per_class_iou"],
        "unity": unity,
    }
