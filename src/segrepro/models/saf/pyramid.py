"""The "Specialize and Fuse" pyramidal output representation (SaF, Hsiao et al., ICCV 2021).

Pure, vectorised torch functions; nothing here holds state or parameters:

- `pyramid_targets`: pyramidal ground truth Y^(l), U^(l) from a per-pixel labelling (Sec. 3.1, App. B).
- `relabel`: the on-the-fly "done by coarser" relabelling of Sec. 3.2 (policies of Table 7).
- `pyramid_loss`: the training loss of Eq. 1.
- `fuse`: the inference-time fusion of Eq. 2.
- `upsample_nearest`: the Up() used by `relabel` and `fuse`.
- `nearest_divisible_size`: the input size Sec. 3.1 resizes to.

Conventions (shared across segrepro): levels are ordered COARSE -> FINE everywhere, index 0 is
level 1 (the coarsest) and index L-1 is level L (the finest); strides are listed coarse -> fine,
e.g. (32, 16, 8, 4). Unity values are 1 = unity cell, 0 = mix cell, ignore_index = don't care.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from segrepro.core.errors import SegreproError

POLICIES = ("naive", "simple_fix", "true_positive")

# Sentinel for "no valid pixel" in the int64 statistics of the general path; valid class ids must
# be in [0, _BIG). Far from the int64 limit so that `_BIG + 1` cannot overflow.
_BIG = 1 << 62


class PyramidError(SegreproError, ValueError):
    """Bad pyramid input (shape, stride list, policy); a ValueError as well as a SegreproError."""


class Pyramid(NamedTuple):
    """Raw outputs of a pyramidal model (Sec. 3.1), all lists ordered coarse -> fine."""

    semantic: list[Tensor]  # L tensors of logits (B,C,H/s,W/s)
    unity: list[Tensor]  # L-1 tensors of probabilities in [0,1], (B,H/s,W/s)
    strides: tuple[int, ...]


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def upsample_nearest(x: Tensor, factor: int) -> Tensor:
    """Nearest-neighbour upsampling of the last two dims by an integer factor (any dtype, bool too).

    Exact for integer factors: every cell is copied into a factor x factor block.
    """
    if factor == 1:
        return x
    *lead, h, w = x.shape
    return x[..., :, None, :, None].expand(*lead, h, factor, w, factor).reshape(*lead, h * factor, w * factor)


def nearest_divisible(size: int, multiple: int) -> int:
    """The multiple of `multiple` nearest to `size` (halves round up; at least `multiple`)."""
    return max(multiple, (2 * int(size) + int(multiple)) // (2 * int(multiple)) * int(multiple))


def nearest_divisible_size(height: int, width: int, multiple: int) -> tuple[int, int]:
    """Sec. 3.1: "the width and height of an input image should be divisible by those of the
    coarsest level; otherwise, we resize the input RGB to the nearest divisible" -> (h, w)."""
    return nearest_divisible(height, multiple), nearest_divisible(width, multiple)


def _level_factor(coarse: Tensor, fine: Tensor, what: str) -> int:
    """Integer ratio between the spatial sizes (last two dims) of two adjacent levels."""
    (hc, wc), (hf, wf) = coarse.shape[-2:], fine.shape[-2:]
    if hc == 0 or wc == 0 or hf % hc or wf % wc or hf // hc != wf // wc or hf < hc:
        raise PyramidError(
            f"{what}: level sizes {hc}x{wc} -> {hf}x{wf} are not an integer upscaling coarse -> fine"
        )
    return hf // hc


def _check_strides(strides: Sequence[int]) -> tuple[int, ...]:
    strides = tuple(int(s) for s in strides)
    if not strides or any(s < 1 for s in strides):
        raise PyramidError(f"strides must be a non-empty list of positive ints, got {list(strides)}")
    for coarse, fine in itertools.pairwise(strides):
        if coarse <= fine or coarse % fine:
            raise PyramidError(
                f"strides {list(strides)} must go coarse -> fine with each stride dividing the previous "
                f"one ({coarse} -> {fine} does not)"
            )
    return strides


# --------------------------------------------------------------------------------------------
# Pyramidal ground truth (Sec. 3.1, App. B)
# --------------------------------------------------------------------------------------------
#
# Per cell we need three statistics of its pixels (App. B distinguishes exactly these cases):
#   mn  = min of the valid labels (HI when the cell has no valid pixel),
#   mxr = max of the labels with ignore counted as HI (so mxr == HI <=> the cell has an ignore pixel),
#   mxp = 1 + max of the valid labels (0 when the cell has no valid pixel).
# They merge exactly from four (or factor^2) children by min / max / max, which is how the
# coarser levels are built; carrying only (U, Y) would be wrong (a coarse cell whose children are
# all "class + ignore" can be a mix). Three are needed: a min or max picks one pixel, and telling
# "one class + ignore" from "two classes + ignore" needs min_valid, max_valid and any_ignore.
#
# Two encodings share all the code below:
#   fast path:  uint8 keys, HI = 255 = ignore_index; the raw labels give mn and mxr directly and
#               labels + 1 (uint8 wrap-around sends 255 to 0) gives mxp. No masking passes.
#   general:    int64 keys, HI = _BIG; used for other ignore indices or labels that do not fit uint8.


def _swar_ok(x: Tensor, factor: int) -> bool:
    return x.dtype == torch.uint8 and factor in (2, 4, 8) and sys.byteorder == "little"


def _reduce_last(x: Tensor, factor: int, op) -> Tensor:
    """Reduce groups of `factor` consecutive elements of the (contiguous) last dim with op."""
    *lead, w = x.shape
    if _swar_ok(x, factor):
        # The slow part is a reduction over a tiny contiguous group, which torch's amin(-1) does
        # one element at a time. Instead reinterpret each group of bytes as one int16/32/64 word;
        # shifting the word right by 8*k bytes and applying op bytewise (vectorised uint8
        # minimum/maximum) folds byte i+k into byte i, so log2(factor) steps leave the group's
        # result in byte 0 (little-endian). Bytes above the group edge may pick up sign-extension
        # garbage but never reach byte 0. benchmarks/pyramid_gt.py times the whole pyramid.
        word = {2: torch.int16, 4: torch.int32, 8: torch.int64}[factor]
        y = x.contiguous()
        shift = 8
        while shift < 8 * factor:
            y = op(y, (y.view(word) >> shift).view(torch.uint8))
            shift *= 2
        return y.view(*lead, w // factor, factor)[..., 0]
    # Other dtypes: elementwise op over strided slices (faster than amin(-1) over tiny groups).
    groups = x.view(*lead, w // factor, factor)
    out = op(groups[..., 0], groups[..., 1])
    for i in range(2, factor):
        op(out, groups[..., i], out=out)
    return out


def _block_reduce(x: Tensor, factor: int, op, key=None) -> Tensor:
    """Reduce (B, h, w) over factor x factor blocks of key(x) -> contiguous (B, h/f, w/f).

    Same result as op over dims (2, 4) of the view (B, h/f, f, w/f, f), but done as rows then
    columns. Rows: op over whole contiguous rows, elementwise and vectorised; a reduction over
    the small middle dim (amin(dim=2)) is as fast for f = 4 on uint8 but 20x slower for f = 2
    and 100x slower on int64. Reducing the 5-D view directly takes 8.7 ms for 16x512x512 uint8
    (1 thread) against 0.25 ms here. `key` (elementwise) is applied row by row, which avoids a
    full-resolution temporary (~10% faster for uint8; a 32 MB int64 one costs ~20 ms to allocate).
    """
    if factor == 1:
        return key(x) if key else x
    b, h, w = x.shape
    blocks = x.view(b, h // factor, factor, w)

    def row(i: int) -> Tensor:
        return key(blocks[:, :, i]) if key else blocks[:, :, i]

    rows = op(row(0), row(1))
    for i in range(2, factor):
        op(rows, row(i), out=rows)
    # Contiguous: later elementwise ops on a strided view run several times slower.
    return _reduce_last(rows, factor, op).contiguous()


def _finest_stats(labels: Tensor, stride: int, ignore_index: int) -> tuple[Tensor, Tensor, Tensor, int]:
    """(mn, mxr, mxp, HI) per finest-level cell, straight from the pixels."""
    keys = _fast_keys(labels, ignore_index)
    if keys is not None:
        # uint8 wrap-around in mxp: ignore (255) + 1 -> 0, class c -> c + 1.
        mn = _block_reduce(keys, stride, torch.minimum)
        mxr = _block_reduce(keys, stride, torch.maximum)
        mxp = _block_reduce(keys, stride, torch.maximum, key=lambda r: r + 1)
        return mn, mxr, mxp, 255
    if labels.numel() and int(labels.min()) < 0 and bool(((labels < 0) & (labels != ignore_index)).any()):
        raise PyramidError(f"labels contain negative class ids (ignore_index is {ignore_index})")

    def key_min(r: Tensor) -> Tensor:
        return torch.where(r != ignore_index, r.long(), _BIG)

    def key_plus(r: Tensor) -> Tensor:
        return torch.where(r != ignore_index, r.long() + 1, 0)

    mn = _block_reduce(labels, stride, torch.minimum, key=key_min)
    mxr = _block_reduce(labels, stride, torch.maximum, key=key_min)
    mxp = _block_reduce(labels, stride, torch.maximum, key=key_plus)
    return mn, mxr, mxp, _BIG


def _fast_keys(labels: Tensor, ignore_index: int) -> Tensor | None:
    """The labels as uint8 when ignore is 255 and every value fits in [0, 255], else None."""
    if ignore_index != 255:
        return None
    if labels.dtype == torch.uint8:
        return labels
    if labels.numel() == 0:
        return None
    lo, hi = torch.aminmax(labels)
    if int(lo) < 0 or int(hi) > 255:
        return None
    # Narrowing (one range check + one copy) costs far less than masked int64 keys at every level
    # (benchmarks/pyramid_gt.py times uint8 and int64 batches).
    return labels.to(torch.uint8)


def _cell_targets(mn: Tensor, mxr: Tensor, mxp: Tensor, hi: int, ignore_index: int) -> tuple[Tensor, Tensor]:
    """App. B cases from the statistics -> (Y, U) int64.

    unity: no ignore pixel and a single class      -> U = 1,      Y = the class
    mix:   at least two valid classes               -> U = 0,      Y = ignore
    else:  one class + ignore, or all ignore         -> U = ignore, Y = ignore
    (All-ignore cells: paper silent; default (notes-saf.md sec. 1): both ignore.)
    Arithmetic instead of torch.where: where is not vectorised for uint8 on the CPU (0.18 ms vs
    ~0.01 ms per op on 16x128x128).
    """
    unity = ((mn == mxr) & (mxr != hi)).to(mn.dtype)
    mix = (mxp > mn + 1).to(mn.dtype)  # max_valid > min_valid; uint8: all-ignore gives 0 > 0
    other = 1 - unity - mix  # the two are disjoint (unity has max_valid == min_valid)
    # uint8 path: ignore_index is 255, so these stay in range before widening.
    y = mn * unity + (1 - unity) * ignore_index
    u = unity + other * ignore_index
    return y.long(), u.long()


def pyramid_targets(
    labels: Tensor, strides: Sequence[int], ignore_index: int = 255
) -> tuple[list[Tensor], list[Tensor]]:
    """Pyramidal ground truth (Sec. 3.1, App. B) for every level, finest included.

    labels: (B, H, W) integer tensor (uint8 or int64, any device), ignore_index = don't care;
    H and W must be multiples of max(strides). strides: coarse -> fine, each dividing the previous.
    Returns (semantic, unity): two lists of L int64 tensors (B, H/s, W/s), coarse -> fine.
    The finest level's cells follow the same rule as the others; the SaF model trains that level
    per pixel by default instead (Sec. 3.2, `head.finest_target`), `cells` uses these targets.
    Built once from the pixels at the finest stride, then coarser levels by merging children.
    """
    strides = _check_strides(strides)
    if labels.dim() != 3:
        raise PyramidError(f"labels must be (B, H, W), got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise PyramidError(f"labels must be an integer tensor, got {labels.dtype}")
    _, height, width = labels.shape
    if height % strides[0] or width % strides[0]:
        raise PyramidError(
            f"label size {height}x{width} is not divisible by the coarsest stride {strides[0]}; "
            "pad or resize first (Sec. 3.1)"
        )
    labels = labels.contiguous()
    mn, mxr, mxp, hi = _finest_stats(labels, strides[-1], ignore_index)
    semantic, unity = [], []
    for level in range(len(strides) - 1, -1, -1):  # fine -> coarse, merging child statistics
        if level < len(strides) - 1:
            factor = strides[level] // strides[level + 1]
            mn = _block_reduce(mn, factor, torch.minimum)
            mxr = _block_reduce(mxr, factor, torch.maximum)
            mxp = _block_reduce(mxp, factor, torch.maximum)
        y, u = _cell_targets(mn, mxr, mxp, hi, ignore_index)
        semantic.append(y)
        unity.append(u)
    return semantic[::-1], unity[::-1]


# --------------------------------------------------------------------------------------------
# Relabelling "done by coarser" (Sec. 3.2, Table 7, App. B)
# --------------------------------------------------------------------------------------------


def relabel(
    semantic: Sequence[Tensor],
    unity: Sequence[Tensor],
    unity_probs: Sequence[Tensor] | None,
    policy: str,
    tau: float = 0.9,
    ignore_index: int = 255,
) -> tuple[list[Tensor], list[Tensor]]:
    """Relabel cells below a triggering coarser cell as "don't care" (Sec. 3.2).

    semantic: L target maps Y^(l); unity: L or L-1 target maps U^(l); unity_probs: L-1 predicted
    unity probabilities (only "true_positive" reads them, detached). Policies (Table 7):
      naive          nothing relabelled (ablation D);
      simple_fix     trigger^(k) = (U^(k) == 1): all descendants of GT unity cells (ablation E);
      true_positive  trigger^(k) = (U^(k) == 1) & (p^(k) >= tau): descendants of correctly
                     predicted unity cells only (ablation F, the paper's method).
    done^(l) = OR_{k<l} Up(trigger^(k)); done cells get Y = ignore and, for l < L, U = ignore.
    The triggering cell keeps its own labels; mix, ignore and false-negative cells never trigger
    (App. B). The finest unity map, if given, is returned unchanged: level L has no unity term.
    Training threshold: paper silent; default (notes-saf.md sec. 2): tau = 0.9, the inference value.
    Returns new lists (inputs untouched) with the same shapes.
    """
    if policy not in POLICIES:
        raise PyramidError(f"unknown relabel policy {policy!r} (known: {', '.join(POLICIES)})")
    levels = len(semantic)
    if levels < 1 or len(unity) not in (levels, levels - 1):
        raise PyramidError(
            f"relabel: {levels} semantic levels need {levels} or {levels - 1} unity maps, got {len(unity)}")
    new_sem = [y.clone() for y in semantic]
    new_uni = [u.clone() for u in unity]
    if policy == "naive":
        return new_sem, new_uni
    if policy == "true_positive" and (unity_probs is None or len(unity_probs) != levels - 1):
        got = None if unity_probs is None else len(unity_probs)
        raise PyramidError(f"relabel: true_positive needs {levels - 1} unity probability maps, got {got}")
    # Propagate level by level: done^(l+1) = Up(done^(l) | trigger^(l)).
    done = torch.zeros_like(semantic[0], dtype=torch.bool)
    for level in range(levels):
        if level > 0:
            # Done cells (written below for level >= 1) are exactly the relabelled ones.
            new_sem[level][done] = ignore_index
            if level < levels - 1:
                new_uni[level][done] = ignore_index
        if level == levels - 1:
            break
        # The trigger reads the ORIGINAL GT unity: a done cell's children are already done anyway.
        trigger = unity[level] == 1
        if policy == "true_positive":
            trigger = trigger & (unity_probs[level].detach() >= tau)
        factor = _level_factor(semantic[level], semantic[level + 1], "relabel")
        done = upsample_nearest(done | trigger, factor)
    return new_sem, new_uni


# --------------------------------------------------------------------------------------------
# Training loss (Eq. 1)
# --------------------------------------------------------------------------------------------


def _masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Mean of values over valid entries; exactly 0 (with zero, finite gradients) if there are none.

    paper silent on the normalisation; default (notes-saf.md sec. 2): mean over the level's valid cells.
    """
    total = torch.where(valid, values, torch.zeros_like(values)).sum()
    return total / valid.sum().clamp_min(1)


def pyramid_loss(
    semantic_logits: Sequence[Tensor],
    unity_logits: Sequence[Tensor],
    semantic_targets: Sequence[Tensor],
    unity_targets: Sequence[Tensor],
    ignore_index: int = 255,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Eq. 1: (1/L) sum_l CE(Y^(l)) + (1/(L-1)) sum_{l<L} BCE(U^(l)), in float32.

    semantic_logits: L tensors (B,C,h,w); unity_logits: L-1 LOGIT tensors (B,h,w) (BCE with
    logits, notes-saf.md sec. 2); targets as from `relabel` (unity_targets: L or L-1 maps, the
    first L-1 are used). Each term is the mean over the level's valid cells; a level with none
    contributes 0. Returns (total, {"semantic": ..., "unity": ...}) with detached parts.
    """
    levels = len(semantic_logits)
    if levels < 1 or len(semantic_targets) != levels:
        raise PyramidError(f"pyramid_loss: {levels} semantic levels but {len(semantic_targets)} targets")
    if len(unity_logits) != levels - 1 or len(unity_targets) < levels - 1:
        raise PyramidError(
            f"pyramid_loss: {levels} levels need {levels - 1} unity logits and targets, "
            f"got {len(unity_logits)} and {len(unity_targets)}"
        )
    semantic_terms = []
    for logits, target in zip(semantic_logits, semantic_targets):
        if logits.shape[:1] + logits.shape[2:] != target.shape:
            raise PyramidError(f"pyramid_loss: logits {tuple(logits.shape)} do not match targets {tuple(target.shape)}")
        target = target.long()
        # Summed CE over non-ignored cells / their count: 0 (not NaN) for a level with none.
        ce = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
        semantic_terms.append(ce / (target != ignore_index).sum().clamp_min(1))
    semantic = torch.stack(semantic_terms).mean()
    if levels == 1:
        unity = torch.zeros((), device=semantic.device)
    else:
        unity_terms = []
        for logits, target in zip(unity_logits, unity_targets[: levels - 1]):
            if logits.shape != target.shape:
                raise PyramidError(
                    f"pyramid_loss: unity logits {tuple(logits.shape)} do not match targets {tuple(target.shape)}"
                )
            valid = target != ignore_index
            bce = F.binary_cross_entropy_with_logits(
                logits.float(), (target == 1).float(), reduction="none"
            )
            unity_terms.append(_masked_mean(bce, valid))
        unity = torch.stack(unity_terms).mean()
    total = semantic + unity
    return total, {"semantic": semantic.detach(), "unity": unity.detach()}


# --------------------------------------------------------------------------------------------
# Fuse (Eq. 2)
# --------------------------------------------------------------------------------------------


def fuse(semantic_logits: Sequence[Tensor], unity_probs: Sequence[Tensor], tau: float = 0.9) -> tuple[Tensor, Tensor]:
    """Eq. 2: every finest cell takes the logits of its coarsest ancestor with unity prob >= tau.

    Up() is nearest upsampling to the finest level (paper silent for Y; default notes-saf.md
    sec. 5: nearest); U^(L) is taken as 1, so the finest level is the fallback. Returns
    (fused logits (B,C,h_L,w_L), assignment (B,h_L,w_L) int64 = level index 0..L-1 used).
    The masks of Eq. 2 partition the grid, so the sum of products is a selection; selecting with
    torch.where also keeps inf/NaN logits of unselected levels out of the result.
    """
    levels = len(semantic_logits)
    if levels < 1 or len(unity_probs) != levels - 1:
        raise PyramidError(
            f"fuse: {levels} semantic levels need {max(levels - 1, 0)} unity maps, got {len(unity_probs)}")
    finest = semantic_logits[-1]
    b, _, h, w = finest.shape
    assignment = torch.full((b, h, w), levels - 1, dtype=torch.long, device=finest.device)
    decided = torch.zeros((b, h, w), dtype=torch.bool, device=finest.device)
    fused = finest
    for level in range(levels - 1):
        factor = _level_factor(unity_probs[level], finest, "fuse")
        if _level_factor(semantic_logits[level], finest, "fuse") != factor:
            raise PyramidError(f"fuse: semantic and unity sizes differ at level index {level}")
        unity = upsample_nearest(unity_probs[level] >= tau, factor)
        take = unity & ~decided  # coarsest unity wins: all coarser levels were < tau here
        assignment = torch.where(take, level, assignment)
        decided = decided | unity
    for level in range(levels - 1):
        factor = h // semantic_logits[level].shape[-2]
        pick = (assignment == level).unsqueeze(1)
        fused = torch.where(pick, upsample_nearest(semantic_logits[level], factor), fused)
    return fused, assignment
