"""The Specialize-and-Fuse model: its blocks, and every ablation ID of App. C at the tiny scale."""

from pathlib import Path

import pytest
import torch

from segrepro import inference
from segrepro.config import load_params
from segrepro.models import build_model
from segrepro.models.specialize_fuse import APNB, attend, pyramid_pool
from segrepro.pyramid import fuse
from segrepro.train import train_step

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
        # A side that does not divide by 32 is padded and cut back.
        assert model.predict(torch.randn(1, 3, 50, 70)).shape == (1, NUM_CLASSES, 50, 70)


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
    from segrepro.errors import SegreproError

    model = tiny_model(params, "A")
    assert not model.is_pyramidal and model.unity is None
    with pytest.raises(SegreproError, match="no pyramid"):
        model.pyramid(torch.randn(1, 3, 64, 64))


def test_strides_must_end_at_the_backbone_stride(params):
    from segrepro.errors import SegreproError

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
