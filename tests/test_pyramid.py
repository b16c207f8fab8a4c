"""Tests of segrepro.models.saf.pyramid: App. B ground truth, Sec. 3.2 relabelling, Eq. 1 loss, Eq. 2 fuse."""

import math

import numpy as np
import pytest
import torch

from segrepro.core.errors import SegreproError
from segrepro.models.saf.pyramid import (
    Pyramid,
    fuse,
    pyramid_loss,
    pyramid_targets,
    relabel,
    upsample_nearest,
)

X = 255  # ignore_index (the X in the label grids below)


def t(rows):
    """A (1, h, w) int64 tensor from nested lists."""
    return torch.tensor(rows, dtype=torch.long)[None]


def brute_force(labels: np.ndarray, stride: int, ignore: int = 255):
    """App. B, one cell at a time: the reference the vectorised code must match."""
    b, h, w = labels.shape
    sem = np.full((b, h // stride, w // stride), ignore, dtype=np.int64)
    uni = sem.copy()
    for n in range(b):
        for i in range(h // stride):
            for j in range(w // stride):
                cell = labels[n, i * stride : (i + 1) * stride, j * stride : (j + 1) * stride].ravel()
                valid = cell[cell != ignore]
                classes = np.unique(valid)
                if len(classes) >= 2:
                    uni[n, i, j] = 0
                elif len(classes) == 1 and len(valid) == len(cell):
                    uni[n, i, j] = 1
                    sem[n, i, j] = classes[0]
    return sem, uni


def structured_labels(rng, shape, block, num_classes=4, ignore=255):
    """Piecewise-constant labels (so that coarse unity cells exist) with noise, ignore and a padded border."""
    b, h, w = shape
    base = rng.integers(0, num_classes, (b, h // block, w // block))
    labels = np.repeat(np.repeat(base, block, axis=1), block, axis=2)
    # Noise only in some 8x8 tiles, so that other tiles stay clean at every level.
    tiles = rng.random((b, h // 8, w // 8)) < 0.3
    noisy = np.repeat(np.repeat(tiles, 8, axis=1), 8, axis=2)
    labels = np.where(noisy & (rng.random(shape) < 0.1), rng.integers(0, num_classes, shape), labels)
    labels = np.where(noisy & (rng.random(shape) < 0.1), ignore, labels)
    labels[:, :, w - 5 :] = ignore  # crop padding on the right, not aligned with any cell
    labels[0, : block // 2, : block // 2] = ignore  # a fully ignored patch
    return labels


# --------------------------------------------------------------------------------------------
# pyramid_targets
# --------------------------------------------------------------------------------------------


def test_the_app_b_cases_by_hand():
    # Five 4x4 cells side by side (stride 4).
    labels = torch.full((1, 4, 20), X, dtype=torch.long)
    labels[:, :, 0:4] = 3  # one class, all valid
    labels[:, :, 4:6] = 1  # two classes
    labels[:, :, 6:8] = 2
    labels[:, :, 8:12] = 5  # one class + one ignore pixel
    labels[0, 0, 8] = X
    # cols 12:16 stay all ignore
    labels[:, :, 16:18] = 1  # two classes + ignore
    labels[:, 1:, 18:20] = 2
    semantic, unity = pyramid_targets(labels, [4])
    assert torch.equal(semantic[0], t([[3, X, X, X, X]]))
    assert torch.equal(unity[0], t([[1, 0, X, X, 0]]))
    assert semantic[0].dtype == unity[0].dtype == torch.int64


def test_crop_border_padding_and_non_square_input():
    # 8x16 label, strides [8, 4, 2]: class 1 on cols 0-7 with one pixel of class 3 at (5, 1),
    # class 2 on cols 8-12, ignore padding on cols 13-15 (a crop border).
    labels = torch.ones((1, 8, 16), dtype=torch.uint8)
    labels[:, :, 8:13] = 2
    labels[:, :, 13:] = X
    labels[0, 5, 1] = 3
    semantic, unity = pyramid_targets(labels, [8, 4, 2])
    assert [tuple(y.shape) for y in semantic] == [(1, 1, 2), (1, 2, 4), (1, 4, 8)]
    assert torch.equal(semantic[0], t([[X, X]]))
    assert torch.equal(unity[0], t([[0, X]]))  # mix | class 2 + padding
    assert torch.equal(semantic[1], t([[1, 1, 2, X], [X, 1, 2, X]]))
    assert torch.equal(unity[1], t([[1, 1, 1, X], [0, 1, 1, X]]))
    assert torch.equal(
        semantic[2],
        t([[1, 1, 1, 1, 2, 2, X, X], [1, 1, 1, 1, 2, 2, X, X], [X, 1, 1, 1, 2, 2, X, X], [1, 1, 1, 1, 2, 2, X, X]]),
    )
    assert torch.equal(
        unity[2],
        t([[1, 1, 1, 1, 1, 1, X, X], [1, 1, 1, 1, 1, 1, X, X], [0, 1, 1, 1, 1, 1, X, X], [1, 1, 1, 1, 1, 1, X, X]]),
    )


@pytest.mark.parametrize("right_class, expected_unity", [(2, 0), (1, X)])
def test_coarse_cell_from_children_that_are_all_class_plus_ignore(right_class, expected_unity):
    # Both stride-4 children on top are "class + ignore" (U = ignore); the bottom ones all ignore.
    # The stride-8 parent is a mix if the two classes differ, else "class + ignore": this needs
    # the children's min/max, not their (U, Y).
    labels = torch.full((1, 8, 8), X, dtype=torch.long)
    labels[0, :4, :4] = 1
    labels[0, :4, 4:] = right_class
    labels[0, 0, 0] = labels[0, 0, 4] = X
    semantic, unity = pyramid_targets(labels, [8, 4])
    assert torch.equal(unity[1], t([[X, X], [X, X]]))
    assert torch.equal(unity[0], t([[expected_unity]]))
    assert torch.equal(semantic[0], t([[X]]))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
@pytest.mark.parametrize(
    "shape, strides, block",
    [
        ((2, 64, 96), [32, 16, 8, 4], 32),
        ((3, 96, 64), [32, 16, 8, 4], 16),
        ((2, 64, 128), [32, 4], 32),
        ((1, 32, 160), [32, 4], 8),
    ],
)
def test_matches_brute_force(dtype, shape, strides, block):
    rng = np.random.default_rng(sum(shape) + block)
    labels = structured_labels(rng, shape, block)
    semantic, unity = pyramid_targets(torch.tensor(labels, dtype=dtype), strides)
    seen = set()
    for stride, y, u in zip(strides, semantic, unity, strict=True):
        ref_y, ref_u = brute_force(labels, stride)
        np.testing.assert_array_equal(y.numpy(), ref_y, err_msg=f"Y at stride {stride}")
        np.testing.assert_array_equal(u.numpy(), ref_u, err_msg=f"U at stride {stride}")
        seen |= {"unity" if v == 1 else "mix" if v == 0 else "ignore" for v in np.unique(ref_u)}
    assert seen == {"unity", "mix", "ignore"}  # the data exercise every case


def test_general_path_other_ignore_index_and_large_class_ids():
    rng = np.random.default_rng(7)
    labels = structured_labels(rng, (2, 64, 64), 16)
    # ignore_index -1 (no uint8 shortcut) gives the same pyramid as 255
    moved = np.where(labels == 255, -1, labels)
    sem_ref, uni_ref = pyramid_targets(torch.tensor(labels), [32, 16, 8, 4])
    sem, uni = pyramid_targets(torch.tensor(moved), [32, 16, 8, 4], ignore_index=-1)
    for a, b, c, d in zip(sem, sem_ref, uni, uni_ref, strict=True):
        assert torch.equal(a, torch.where(b == 255, -1, b))
        assert torch.equal(c, torch.where(d == 255, -1, d))
    # class ids that do not fit in uint8
    big = np.where(labels == 255, 255, labels + 300)
    sem, uni = pyramid_targets(torch.tensor(big), [32, 16, 8, 4])
    for stride, y, u in zip([32, 16, 8, 4], sem, uni, strict=True):
        ref_y, ref_u = brute_force(big, stride)
        np.testing.assert_array_equal(y.numpy(), ref_y)
        np.testing.assert_array_equal(u.numpy(), ref_u)


def test_stride_one_and_input_untouched():
    labels = torch.tensor([[[0, 1], [X, 2]]], dtype=torch.uint8)
    before = labels.clone()
    semantic, unity = pyramid_targets(labels, [2, 1])
    assert torch.equal(semantic[1], t([[0, 1], [X, 2]]))
    assert torch.equal(unity[1], t([[1, 1], [X, 1]]))
    assert torch.equal(unity[0], t([[0]]))
    assert torch.equal(labels, before)


@pytest.mark.parametrize(
    "shape, strides, message",
    [
        ((1, 48, 64), [32, 16, 8, 4], "not divisible by the coarsest stride 32"),
        ((1, 64, 40), [32, 4], "not divisible by the coarsest stride 32"),
        ((1, 64, 64), [4, 8], "coarse -> fine"),
        ((1, 64, 64), [32, 12], "does not"),
        ((1, 64, 64), [], "non-empty"),
        ((64, 64), [32, 4], "(B, H, W)"),
    ],
)
def test_pyramid_targets_errors(shape, strides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        pyramid_targets(torch.zeros(shape, dtype=torch.long), strides)


def test_errors_are_segrepro_errors_too():
    with pytest.raises(SegreproError, match="integer"):
        pyramid_targets(torch.zeros((1, 8, 8)), [4])
    with pytest.raises(SegreproError, match="negative class ids"):
        pyramid_targets(torch.full((1, 4, 4), -3), [4], ignore_index=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    labels = torch.tensor(structured_labels(np.random.default_rng(3), (2, 64, 96), 16))
    cpu = pyramid_targets(labels, [32, 16, 8, 4])
    gpu = pyramid_targets(labels.cuda(), [32, 16, 8, 4])
    for a, b in zip(cpu[0] + cpu[1], gpu[0] + gpu[1], strict=True):
        assert b.is_cuda and torch.equal(a, b.cpu())


# --------------------------------------------------------------------------------------------
# relabel (Sec. 3.2, Table 7)
# --------------------------------------------------------------------------------------------
# Three levels (2x2, 4x4, 8x8), tau = 0.9. Level 1 (index 0):
#   (0,0) GT unity, p 0.95: true positive      (0,1) GT unity, p 0.5: false negative
#   (1,0) mix, p 0.99: never triggers          (1,1) class + ignore (U ignore), p 0.99: never triggers
# Level 2 (index 1) holds children consistent with that: top half unity (classes 3 | 4), bottom
# left under the mix cell, bottom right under the ignore cell; (2,2) has p == tau exactly.

U0 = [[1, 1], [0, X]]
Y0 = [[3, 4], [X, X]]
P0 = [[0.95, 0.5], [0.99, 0.99]]
U1 = [[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 1, X], [1, X, X, X]]
Y1 = [[3, 3, 4, 4], [3, 3, 4, 4], [5, X, 7, X], [6, X, X, X]]
P1 = [[0.1, 0.1, 0.95, 0.2], [0.1, 0.1, 0.95, 0.95], [0.95, 0.95, 0.9, 0.99], [0.3, 0.99, 0.99, 0.99]]


def relabel_case():
    semantic = [t(Y0), t(Y1), torch.full((1, 8, 8), 9)]
    unity = [t(U0), t(U1), torch.ones((1, 8, 8), dtype=torch.long)]
    probs = [torch.tensor([P0]), torch.tensor([P1])]
    return semantic, unity, probs


def finest_with_done(parents_done):
    """Level 3 of the case: 9 everywhere, ignore under the level-2 cells marked 1."""
    done = np.kron(np.array(parents_done), np.ones((2, 2), dtype=np.int64)).astype(bool)
    return t(np.where(done, X, 9).tolist())


def test_relabel_naive_changes_nothing():
    semantic, unity, probs = relabel_case()
    new_sem, new_uni = relabel(semantic, unity, probs, "naive")
    for a, b in zip(new_sem + new_uni, semantic + unity, strict=True):
        assert torch.equal(a, b) and a is not b


def test_relabel_simple_fix():
    semantic, unity, _ = relabel_case()
    new_sem, new_uni = relabel(semantic, unity, None, "simple_fix")  # probabilities not needed
    assert torch.equal(new_sem[0], t(Y0)) and torch.equal(new_uni[0], t(U0))  # triggers keep labels
    # Both GT unity cells of level 1 trigger, the false negative (0,1) included.
    assert torch.equal(new_sem[1], t([[X, X, X, X], [X, X, X, X], [5, X, 7, X], [6, X, X, X]]))
    assert torch.equal(new_uni[1], t([[X, X, X, X], [X, X, X, X], [1, 0, 1, X], [1, X, X, X]]))
    # Level 3: done under the done level-2 cells and under the GT unity ones (2,0), (2,2), (3,0).
    assert torch.equal(new_sem[2], finest_with_done([[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 1, 0], [1, 0, 0, 0]]))
    assert torch.equal(new_uni[2], unity[2])  # the finest unity map is never relabelled


def test_relabel_true_positive():
    semantic, unity, probs = relabel_case()
    probs = [p.requires_grad_() for p in probs]  # read detached
    new_sem, new_uni = relabel(semantic, unity, probs, "true_positive", tau=0.9)
    assert torch.equal(new_sem[0], t(Y0)) and torch.equal(new_uni[0], t(U0))
    # Only the true positive (0,0) relabels its children; the false negative (0,1) does not.
    assert torch.equal(new_sem[1], t([[X, X, 4, 4], [X, X, 4, 4], [5, X, 7, X], [6, X, X, X]]))
    assert torch.equal(new_uni[1], t([[X, X, 1, 1], [X, X, 1, 1], [1, 0, 1, X], [1, X, X, X]]))
    # Level 2 triggers: (0,2), (1,2), (1,3), (2,0) and (2,2) (p == tau); not (0,3) or (3,0)
    # (false negatives), (2,1) (mix) or the ignore cells, whatever their probability.
    assert torch.equal(new_sem[2], finest_with_done([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0]]))
    assert torch.equal(new_uni[2], unity[2])


def test_relabel_inputs_untouched_and_unity_of_length_l_minus_1():
    semantic, unity, probs = relabel_case()
    copies = [x.clone() for x in semantic + unity]
    new_sem, new_uni = relabel(semantic, unity[:2], probs, "true_positive")
    assert len(new_sem) == 3 and len(new_uni) == 2
    assert torch.equal(new_uni[1], t([[X, X, 1, 1], [X, X, 1, 1], [1, 0, 1, X], [1, X, X, X]]))
    for a, b in zip(semantic + unity, copies, strict=True):
        assert torch.equal(a, b)


def test_relabel_errors():
    semantic, unity, probs = relabel_case()
    with pytest.raises(ValueError, match="'oracle'"):
        relabel(semantic, unity, probs, "oracle")
    with pytest.raises(SegreproError, match="true_positive needs 2"):
        relabel(semantic, unity, None, "true_positive")


# --------------------------------------------------------------------------------------------
# pyramid_loss (Eq. 1)
# --------------------------------------------------------------------------------------------


def softplus(x):
    return math.log1p(math.exp(x))


def test_loss_by_hand():
    # Level 1: 3 cells, targets 0 | ignore | 1. Level 2: 3 cells, targets 1 | 0 | ignore.
    sem0 = torch.tensor([[[[2.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]]]])  # (1, C=2, 1, 3)
    sem1 = torch.tensor([[[[1.0, 0.0, 5.0]], [[1.0, 3.0, -5.0]]]])
    uni0 = torch.tensor([[[0.5, -1.0, 2.0]]])  # logits; targets 1 | ignore | 0
    sem_targets = [t([[0, X, 1]]), t([[1, 0, X]])]
    uni_targets = [t([[1, X, 0]])]
    ce0 = (softplus(-2.0) + math.log(2.0)) / 2  # CE([2,0], 0), CE([0,0], 1)
    ce1 = (math.log(2.0) + softplus(3.0)) / 2  # CE([1,1], 1), CE([0,3], 0)
    bce0 = (softplus(-0.5) + softplus(2.0)) / 2  # BCE(0.5, 1), BCE(2, 0)
    total, parts = pyramid_loss([sem0, sem1], [uni0], sem_targets, uni_targets)
    assert total.item() == pytest.approx((ce0 + ce1) / 2 + bce0, rel=1e-6)
    assert parts["semantic"].item() == pytest.approx((ce0 + ce1) / 2, rel=1e-6)
    assert parts["unity"].item() == pytest.approx(bce0, rel=1e-6)


def test_loss_level_without_valid_cells_is_zero_with_finite_gradients():
    torch.manual_seed(0)
    sem = [torch.randn(2, 3, h, h, requires_grad=True) for h in (1, 2, 4)]
    uni = [torch.randn(2, h, h, requires_grad=True) for h in (1, 2)]
    sem_targets = [torch.zeros(2, 1, 1, dtype=torch.long), torch.full((2, 2, 2), X),
                   torch.ones(2, 4, 4, dtype=torch.long)]
    # L unity targets: the finest is not used (it even has a wrong shape here).
    uni_targets = [torch.ones(2, 1, 1, dtype=torch.long), torch.full((2, 2, 2), X), torch.zeros(3, 3)]
    total, parts = pyramid_loss(sem, uni, sem_targets, uni_targets)
    ce0 = torch.nn.functional.cross_entropy(sem[0], sem_targets[0])
    ce2 = torch.nn.functional.cross_entropy(sem[2], sem_targets[2])
    bce0 = torch.nn.functional.binary_cross_entropy_with_logits(uni[0], torch.ones(2, 1, 1))
    assert parts["semantic"].item() == pytest.approx(((ce0 + ce2) / 3).item(), rel=1e-6)
    assert parts["unity"].item() == pytest.approx((bce0 / 2).item(), rel=1e-6)
    total.backward()
    for x in sem + uni:
        assert torch.isfinite(x.grad).all()
    assert torch.equal(sem[1].grad, torch.zeros_like(sem[1])) and torch.equal(uni[1].grad, torch.zeros_like(uni[1]))
    # Everything ignored: exactly zero, no NaN.
    total, _ = pyramid_loss(
        sem, uni, [torch.full_like(y, X) for y in sem_targets], [torch.full_like(u, X) for u in uni_targets[:2]]
    )
    assert total.item() == 0.0


def test_loss_is_float32_for_bf16_logits_and_single_level():
    torch.manual_seed(1)
    logits = torch.randn(1, 4, 2, 2).bfloat16()
    target = torch.tensor([[[0, 1], [X, 3]]])
    total, parts = pyramid_loss([logits], [], [target], [])
    assert total.dtype == torch.float32
    expected = torch.nn.functional.cross_entropy(logits.float(), target, ignore_index=X)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert parts["unity"].item() == 0.0


def test_loss_errors():
    with pytest.raises(SegreproError, match="unity logits"):
        pyramid_loss([torch.zeros(1, 2, 1, 1)] * 2, [], [t([[0]])] * 2, [])
    with pytest.raises(ValueError, match="do not match"):
        pyramid_loss([torch.zeros(1, 2, 1, 1)], [], [t([[0, 1]])], [])


# --------------------------------------------------------------------------------------------
# fuse (Eq. 2)
# --------------------------------------------------------------------------------------------


def eq2_literal(semantic, probs, tau):
    """Eq. 2 as written: sum over levels of mask * Up(Y) * prod of coarser (< tau) masks."""
    finest = semantic[-1].shape[-1]
    ups = [upsample_nearest(y, finest // y.shape[-1]) for y in semantic]
    masks = [upsample_nearest((p >= tau).float(), finest // p.shape[-1]) for p in probs]
    masks.append(torch.ones_like(masks[0]))  # U^(L) = 1
    out = torch.zeros_like(ups[-1])
    for level, up in enumerate(ups):
        weight = masks[level]
        for k in range(level):
            weight = weight * (1 - masks[k])
        out = out + weight[:, None] * up
    return out


def fuse_case():
    # Level l logits: channel 0 = 100 * (l + 1) + cell index, channel 1 its negative.
    semantic = []
    for level, h in enumerate((2, 4, 8)):
        ids = torch.arange(h * h, dtype=torch.float32).reshape(1, h, h) + 100 * (level + 1)
        semantic.append(torch.stack([ids, -ids], dim=1))
    p0 = torch.tensor([[[0.95, 0.5], [0.9, 0.1]]])
    p1 = torch.tensor([[[0.99, 0.99, 0.95, 0.1], [0.99, 0.99, 0.1, 0.1],
                        [0.1, 0.1, 0.2, 0.2], [0.1, 0.1, 0.2, 0.8999]]])
    return semantic, [p0, p1]


def test_fuse_assignment_and_logits():
    semantic, probs = fuse_case()
    fused, assignment = fuse(semantic, probs, tau=0.9)
    # Top-left: coarsest unity wins over level 2 (also >= tau). Bottom-left: p == tau counts.
    # Top-right: coarse mix, fine unity at (0,2) -> level 2; the rest falls back to the finest.
    # Bottom-right: mix everywhere (0.8999 < tau) -> finest.
    expected = t(
        [
            [0, 0, 0, 0, 1, 1, 2, 2],
            [0, 0, 0, 0, 1, 1, 2, 2],
            [0, 0, 0, 0, 2, 2, 2, 2],
            [0, 0, 0, 0, 2, 2, 2, 2],
            [0, 0, 0, 0, 2, 2, 2, 2],
            [0, 0, 0, 0, 2, 2, 2, 2],
            [0, 0, 0, 0, 2, 2, 2, 2],
            [0, 0, 0, 0, 2, 2, 2, 2],
        ]
    )
    assert torch.equal(assignment, expected)
    assert fused.shape == (1, 2, 8, 8)
    assert fused[0, :, 0, 0].tolist() == [100.0, -100.0]  # level-1 cell 0
    assert fused[0, 0, 7, 3].item() == 102.0  # level-1 cell 2 (bottom-left)
    assert fused[0, 0, 1, 5].item() == 202.0  # level-2 cell (0, 2)
    assert fused[0, 0, 2, 4].item() == 300.0 + 2 * 8 + 4  # finest cell (2, 4)
    assert torch.equal(fused, eq2_literal(semantic, probs, 0.9))


def test_fuse_batch_items_are_independent_and_single_level():
    semantic, probs = fuse_case()
    semantic = [torch.cat([y, y]) for y in semantic]
    probs = [torch.cat([p, torch.zeros_like(p)]) for p in probs]
    fused, assignment = fuse(semantic, probs, tau=0.9)
    assert torch.equal(fused[1], semantic[2][1]) and (assignment[1] == 2).all()
    assert torch.equal(fused[:1], fuse([y[:1] for y in semantic], [p[:1] for p in probs])[0])
    fused, assignment = fuse(semantic[-1:], [])
    assert torch.equal(fused, semantic[-1]) and torch.equal(assignment, torch.zeros(2, 8, 8, dtype=torch.long))


def test_fuse_errors():
    semantic, probs = fuse_case()
    with pytest.raises(ValueError, match="need 2 unity maps"):
        fuse(semantic, probs[:1])


def test_upsample_nearest_and_pyramid_tuple():
    x = torch.tensor([[[1, 2], [3, 4]]])
    up = upsample_nearest(x, 2)
    assert torch.equal(up, t([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]))
    assert torch.equal(upsample_nearest(x > 2, 3), x.repeat_interleave(3, 1).repeat_interleave(3, 2) > 2)
    pyr = Pyramid(semantic=[torch.zeros(1, 2, 1, 1)], unity=[], strides=(4,))
    assert pyr.strides == (4,) and pyr.unity == []
