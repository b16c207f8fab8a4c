"""The Specialize-and-Fuse model: its blocks, and every ablation ID of App. C at the tiny scale."""

from pathlib import Path

import pytest
import torch

from segrepro.config.params import load_params
from segrepro.engine import inference
from segrepro.engine.train import train_step
from segrepro.models.factory import build_model
from segrepro.models.saf.pyramid import fuse
from segrepro.models.saf.specialize_fuse import APNB, attend, pyramid_pool

ROOT = Path(__file__).resolve().parents[1]
IDS = list("ABCDEFGHIJK")
NUM_CLASSES = 5


@pytest.fixture(scope="module")
def params():
    return load_params(ROOT)


def tiny_model(params, experiment: str, **head):
    config = params.resolve("saf", experiment, "tiny")
    config["model"]["head"].update(head)
    torch.manual_seed(0)
    return build_model(config["model"], NUM_CLASSES)


def labels_with_regions(batch: int, height: int, width: int) -> torch.Tensor:
    """Large flat regions (unity cells at every level) plus a noisy strip (mix cells) and ignore."""
    labels = torch.zeros(batch, height, width, dtype=torch.long)
    labels[:, :, width // 2:] = 1
    labels[:, height // 2:, :] = 2
    labels[:, :4, :] = torch.randint(0, NUM_CLASSES, (batch, 4, width))
    labels[:, -3:, :7] = 255
    return labels


def test_pyramid_pool_gives_the_110_tokens_of_eq6():
    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float).reshape(2, 3, 16, 16)
    tokens = pyramid_pool(x, [1, 3, 6, 8])
    assert tokens.shape == (2, 3, 110)
    assert torch.allclose(tokens[:, :, 0], x.mean(dim=(2, 3)))


def test_attend_matches_a_hand_computed_softmax():
    query = torch.tensor([1.0, 0.0]).reshape(1, 2, 1, 1)
    key = torch.tensor([[2.0, 0.0], [0.0, 0.0]])[None]  # token 0 = (2, 0), token 1 = (0, 0)
    value = torch.tensor([[10.0, 20.0]])[None]
    # scores = (2, 0) / sqrt(2); weights = softmax
    w0 = torch.softmax(torch.tensor([2.0, 0.0]) / 2**0.5, dim=0)
    expected = w0[0] * 10 + w0[1] * 20
    assert torch.allclose(attend(query, key, value).flatten(), expected.reshape(1))


def test_apnb_starts_from_the_plain_concatenation():
    # W is zero-initialised (ANL): at start the attended context adds nothing.
    block = APNB(8, 4, [1, 3], dropout=0.0).eval()
    x = torch.randn(2, 8, 12, 12)
    expected = block.fuse(torch.cat([torch.zeros_like(x), x], dim=1))
    assert torch.allclose(block(x), expected)


@pytest.mark.parametrize("experiment", IDS)
def test_every_ablation_trains_a_step_and_evaluates(params, experiment):
    model = tiny_model(params, experiment)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(2, 3, 64, 64)
    loss, parts = train_step(model.train(), optimizer, images, labels_with_regions(2, 64, 64), 0.01)
    assert torch.isfinite(torch.tensor(loss)) and loss > 0
    expected_parts = {"single": {"main"}, "aux": {"main", "aux"}, "pyramidal": {"semantic", "unity"}}
    assert set(parts) == expected_parts[model.output]

    dataset = [(torch.randn(3, 48, 64), torch.randint(0, NUM_CLASSES, (48, 64)), "a"),
               (torch.randn(3, 80, 72), torch.randint(0, NUM_CLASSES, (80, 72)), "b")]
    matrix = inference.evaluate(model.predict, dataset, {"scales": [1.0, 1.5], "flip": True}, "cpu",
                                NUM_CLASSES, crop_size=64, progress=False)
    assert matrix.matrix.sum() == 48 * 64 + 80 * 72


@pytest.mark.parametrize("experiment, levels", [("I", 4), ("K", 2), ("F", 4)])
def test_pyramidal_outputs_have_one_map_per_level(params, experiment, levels):
    model = tiny_model(params, experiment).eval()
    pyramid = model.pyramid(torch.randn(2, 3, 64, 96))
    assert [tuple(y.shape) for y in pyramid.semantic] == [(2, NUM_CLASSES, 64 // s, 96 // s) for s in model.strides]
    assert [tuple(u.shape) for u in pyramid.unity] == [(2, 64 // s, 96 // s) for s in model.strides[:-1]]
    assert len(pyramid.semantic) == levels
    assert all(((u >= 0) & (u <= 1)).all() for u in pyramid.unity)


def test_predict_is_the_fused_pyramid_upsampled(params):
    model = tiny_model(params, "I").eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        pyramid = model.pyramid(images)
        fused, _ = fuse(pyramid.semantic, pyramid.unity, model.tau)
        expected = torch.nn.functional.interpolate(fused, size=(64, 64), mode="bilinear", align_corners=False)
        assert torch.allclose(model.predict(images), expected, atol=1e-5)

def test_predict_resizes_to_the_nearest_divisible_size_and_back(params):
    """Sec. 3.1: a side that does not divide by the coarsest stride (32) is resized to the
    nearest divisible size (50 -> 64, 70 -> 64), not padded; the logits come back at full size."""
    model = tiny_model(params, "I").eval()
    seen = []
    model.features.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape[-2:])))
    images = torch.randn(1, 3, 50, 70)
    with torch.no_grad():
        logits = model.predict(images)
        resized = torch.nn.functional.interpolate(images, size=(64, 64), mode="bilinear", align_corners=False)
        pyramid = model.pyramid(resized)
        fused, _ = fuse(pyramid.semantic, pyramid.unity, model.tau)
        expected = torch.nn.functional.interpolate(fused, size=(50, 70), mode="bilinear", align_corners=False)
    assert seen[0] == (64, 64)
    assert logits.shape == (1, NUM_CLASSES, 50, 70)
    assert torch.allclose(logits, expected, atol=1e-5)
    # 80 x 100 -> 96 x 96: the nearest multiples, halves rounded up (80 = 2.5 x 32).
    with torch.no_grad():
        assert model.predict(torch.randn(1, 3, 80, 100)).shape == (1, NUM_CLASSES, 80, 100)
    assert seen[-1] == (96, 96)


def test_unity_is_the_minimum_over_the_cell(params):
    model = tiny_model(params, "I").eval()
    captured = {}
    model.unity.classify.register_forward_hook(lambda module, args, out: captured.setdefault("first", out))
    with torch.no_grad():
        pyramid = model.pyramid(torch.randn(1, 3, 64, 64))
    per_pixel = torch.sigmoid(captured["first"][0, 0])  # level 1 (stride 32 = 8 finest cells)
    cells = per_pixel.reshape(2, 8, 2, 8).amin(dim=(1, 3))
    assert torch.allclose(pyramid.unity[0][0], cells, atol=1e-6)


def test_the_full_model_learns_a_batch(params):
    model = tiny_model(params, "I").train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    images = torch.randn(2, 3, 64, 64)
    labels = labels_with_regions(2, 64, 64)
    images[:, 0] += labels.float()  # make the classes visible in the input
    losses = [train_step(model, optimizer, images, labels, 0.05)[0] for _ in range(25)]
    assert losses[-1] < 0.6 * losses[0]


def test_single_output_models_have_no_pyramid(params):
    from segrepro.core.errors import SegreproError

    model = tiny_model(params, "A")
    assert not model.is_pyramidal and model.unity is None
    with pytest.raises(SegreproError, match="no pyramid"):
        model.pyramid(torch.randn(1, 3, 64, 64))


def test_strides_must_end_at_the_backbone_stride(params):
    from segrepro.core.errors import SegreproError

    with pytest.raises(SegreproError, match="finest stride"):
        tiny_model(params, "I", strides=[32, 16, 8])


def test_finest_level_per_pixel_variant_supervises_mix_cells(params):
    """finest_target: pixels trains the finest level on every pixel outside done-by-coarser
    cells, so a batch made only of stride-4 mix cells still has a semantic loss there."""
    labels = torch.zeros(1, 64, 64, dtype=torch.long)
    labels[:, :, 1::2] = 1  # stripes: every cell at every stride is a mix cell
    images = torch.randn(1, 3, 64, 64)
    losses = {}
    for target in ("cells", "pixels"):
        model = tiny_model(params, "F", finest_target=target).train()
        _, parts = model.loss(model(images), labels)
        losses[target] = parts["semantic"].item()
    assert losses["cells"] == 0.0  # no valid cell at any level
    assert losses["pixels"] > 0.0


# ----------------------------------------------------------------------------- the finest level's target

def test_finest_level_is_supervised_per_pixel_by_default(params):
    """Sec. 3.2: the finest cells are unity cells, so by default the finest level is trained per
    pixel (HRNet-OCR's CE on upsampled logits), ignoring only done-by-coarser pixels.

    Left half: one class (unity at every level; with the unity head forced to p = 1 the stride-32
    cells are true positives, so everything below them is done by coarser). Right half: 1-pixel
    stripes, a mix cell at every level. The semantic term is then (1/4) x (level 1 on the two left
    cells + per-pixel CE of the finest logits on the right half); levels 2-3 have no valid cell."""
    model = tiny_model(params, "F").train()
    assert model.finest_target == "pixels"
    with torch.no_grad():
        model.unity.classify.weight.zero_()
        model.unity.classify.bias.fill_(100.0)  # every cell predicted unity: p = 1 >= train_tau
    labels = torch.zeros(1, 64, 64, dtype=torch.long)
    labels[:, :, 32:] = 1
    labels[:, :, 33::2] = 2
    outputs = model(torch.randn(1, 3, 64, 64))
    _, parts = model.loss(outputs, labels)

    semantic = outputs["semantic"]
    level1 = torch.nn.functional.cross_entropy(semantic[0][:, :, :, 0], torch.zeros(1, 2, dtype=torch.long))
    finest = torch.nn.functional.interpolate(semantic[-1], size=(64, 64), mode="bilinear", align_corners=False)
    right = torch.nn.functional.cross_entropy(finest[..., 32:], labels[..., 32:])
    assert torch.allclose(parts["semantic"], (level1 + right) / 4, atol=1e-5)

    # The `cells` switch applies the cell rule at the finest level too: the right half's mixed
    # stride-4 cells get no target at any level.
    model.finest_target = "cells"
    _, parts = model.loss(outputs, labels)
    assert torch.allclose(parts["semantic"], level1 / 4, atol=1e-5)


def test_saf_open_defaults_flip_one_default_each(params):
    """Every paper-silent default with a switch has its row, which changes that key alone."""
    head = params.resolve("saf", "I", "demo")["model"]["head"]
    assert (head["finest_target"], head["unity_head"]) == ("pixels", "paper")
    rows = params.paper("saf")["tables"]["saf_open_defaults"]["rows"]
    flipped = {}
    for row in rows:
        if row["experiment"] in ("F", "I"):
            continue
        base = "F" if row["experiment"].startswith("F_") else "I"
        mine = params.resolve("saf", row["experiment"], "demo")["model"]["head"]
        theirs = params.resolve("saf", base, "demo")["model"]["head"]
        changed = {key for key in mine if mine[key] != theirs[key]}
        assert len(changed) == 1, (row["experiment"], changed)
        flipped[changed.pop()] = mine
    assert {"train_tau", "finest_target", "unity_head"} <= set(flipped)
    assert flipped["finest_target"]["finest_target"] == "cells"
    assert flipped["unity_head"]["unity_head"] == "abs"


# ----------------------------------------------------------------------------- J's auxiliary weights

def test_j_weights_each_auxiliary_level_by_0_4(params):
    """App. C: J's coarser levels are auxiliary losses of weight 0.4, each (HRNet-OCR's
    BALANCE_WEIGHTS [0.4, 1]), not 0.4 x their mean. Quadrant labels make every cell a unity
    cell, so each level's target is the quadrant class at that level's resolution."""
    model = tiny_model(params, "J")
    assert model.output == "aux" and model.aux_weight == 0.4
    quadrants = torch.tensor([[0, 1], [2, 3]])
    labels = quadrants.repeat_interleave(32, 0).repeat_interleave(32, 1)[None]
    g = torch.Generator().manual_seed(0)
    semantic = [torch.randn(1, NUM_CLASSES, 64 // s, 64 // s, generator=g) for s in (32, 16, 8, 4)]
    total, parts = model.loss({"semantic": semantic}, labels)

    def level_ce(logits):
        cells = 64 // logits.shape[-1]
        target = quadrants.repeat_interleave(32 // cells, 0).repeat_interleave(32 // cells, 1)[None]
        return torch.nn.functional.cross_entropy(logits, target)

    main = torch.nn.functional.cross_entropy(
        torch.nn.functional.interpolate(semantic[-1], size=(64, 64), mode="bilinear", align_corners=False), labels)
    aux = sum(level_ce(y) for y in semantic[:-1])
    assert torch.allclose(parts["main"], main, atol=1e-5)
    assert torch.allclose(parts["aux"], aux, atol=1e-5)
    assert torch.allclose(total, main + 0.4 * aux, atol=1e-5)


# ----------------------------------------------------------------------------- the unity head

def test_unity_head_default_is_sec_4_1_as_written(params):
    """Plain 1x1 convolutions: X_u = Conv(X), centroid = shared Conv(AvgPool(X_u)), per-pixel
    logit = shared Conv(Conv(X_u) - NearestUp(centroid)), sigmoid, min-pooling per cell."""
    model = tiny_model(params, "I").eval()
    head = model.unity
    assert head.variant == "paper"
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.ReLU)) for m in head.modules())
    x = torch.randn(2, model.features.out_channels, 16, 24)
    factors = [8, 4, 2]
    with torch.no_grad():
        logits = head(x, factors)
        embedding = head.reduce(x)
        for factor, got in zip(factors, logits):
            centroid = head.centroid(torch.nn.functional.avg_pool2d(embedding, factor))
            centroid = centroid.repeat_interleave(factor, 2).repeat_interleave(factor, 3)
            per_pixel = head.classify(head.pixel(embedding) - centroid)[:, 0]
            cells = per_pixel.reshape(2, 16 // factor, factor, 24 // factor, factor).amin(dim=(2, 4))
            assert got.shape == (2, 16 // factor, 24 // factor)
            assert torch.allclose(got, cells, atol=1e-5)
            # Sigmoid and min-pooling commute: the unity probability is the cell's least probable pixel.
            probs = torch.sigmoid(per_pixel).reshape(2, 16 // factor, factor, 24 // factor, factor).amin(dim=(2, 4))
            assert torch.allclose(torch.sigmoid(got), probs, atol=1e-6)


def test_unity_head_as_written_can_express_unity():
    """With the centroid and pixel convolutions equal, a cell's differences along the final
    projection w sum to zero, so its min-pooled logit is at most the bias, with equality exactly
    where the cell is constant along w: the min-pooling is the nonlinearity the head needs."""
    from segrepro.models.saf.specialize_fuse import UnityHead

    torch.manual_seed(0)
    head = UnityHead(3, 4, "paper").eval()
    head.centroid.load_state_dict(head.pixel.state_dict())
    bias = float(head.classify.bias.detach())
    x = torch.randn(1, 3, 8, 12)  # 2 x 3 cells of 4 x 4
    x[..., :4, :4] = x[..., :1, :1].clone()  # cell (0, 0) constant
    with torch.no_grad():
        cells = head(x, [4])[0][0]
    assert cells[0, 0] == pytest.approx(bias, abs=1e-5)
    assert (cells.flatten()[1:] < bias - 1e-3).all()  # random cells vary along w

    # By hand: identity maps, w = (1, 0), b = 3. Constant cell: logit 3, p = 0.95 >= tau 0.9.
    # Values +-3 along w: min logit 3 - 3 = 0, p = 0.5. Variation orthogonal to w only: 3 again.
    head = UnityHead(2, 2, "paper").eval()
    with torch.no_grad():
        for conv in (head.reduce, head.pixel, head.centroid):
            conv.weight.copy_(torch.eye(2)[..., None, None])
            conv.bias.zero_()
        head.classify.weight.copy_(torch.tensor([1.0, 0.0])[None, :, None, None])
        head.classify.bias.fill_(3.0)
        x = torch.zeros(1, 2, 4, 12)
        x[0, :, :, :4] = torch.tensor([5.0, -2.0])[:, None, None]
        x[0, 0, :, 4:8] = torch.tensor([3.0, -3.0]).repeat(2)[None]  # columns alternate +3, -3
        x[0, 1, :, 8:] = torch.tensor([7.0, -7.0]).repeat(2)[None]
        probs = torch.sigmoid(head(x, [4])[0][0, 0])
    assert probs.tolist() == pytest.approx([torch.sigmoid(torch.tensor(3.0)).item(), 0.5,
                                            torch.sigmoid(torch.tensor(3.0)).item()], abs=1e-6)
    assert probs[0] >= 0.9 > probs[1]


def test_unity_head_abs_switch(params):
    model = tiny_model(params, "I", unity_head="abs").eval()
    head = model.unity
    assert head.variant == "abs" and isinstance(head.reduce[1], torch.nn.BatchNorm2d)
    x = torch.randn(1, model.features.out_channels, 8, 8)
    with torch.no_grad():
        embedding = head.reduce(x)
        centroid = head.centroid(torch.nn.functional.avg_pool2d(embedding, 4))
        centroid = centroid.repeat_interleave(4, 2).repeat_interleave(4, 3)
        per_pixel = head.classify((head.pixel(embedding) - centroid).abs())[:, 0]
        expected = per_pixel.reshape(1, 2, 4, 2, 4).amin(dim=(2, 4))
        assert torch.allclose(head(x, [4])[0], expected, atol=1e-5)
