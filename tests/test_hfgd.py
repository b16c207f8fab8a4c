"""The HFGD network: gradient isolation of HFGM (Sec. 3.1) proved with autograd, output strides,
and every experiment of the registry trained one step and evaluated at the tiny scale."""

from pathlib import Path

import pytest
import torch

from segrepro.config.params import deep_merge, load_params
from segrepro.core.errors import SegreproError
from segrepro.engine import inference
from segrepro.engine.train import build_optimizer, train_step
from segrepro.models.factory import build_model

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 5


@pytest.fixture(scope="module")
def params():
    return load_params(ROOT)


def tiny_model(params, experiment: str, **model):
    config = deep_merge(params.resolve("hfgd", experiment, "tiny")["model"], model)
    torch.manual_seed(0)
    return build_model(config, NUM_CLASSES)


def batch(size=(48, 64)):
    torch.manual_seed(1)
    labels = torch.randint(0, NUM_CLASSES, (2, *size))
    labels[:, :3] = 255
    return torch.randn(2, 3, *size), labels


def gradients_from(model, outputs, loss) -> dict[str, bool]:
    """Which parameter groups a loss reaches: {group: any parameter with a non-zero gradient}."""
    model.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    groups = {
        "backbone": model.backbone,
        "encoder": model.encoder,
        "tokens": model.classifier,
        "upsampler": model.upsampler,
        "axial_attention": model.axial_attention,
    }
    return {
        name: any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
        for name, module in groups.items()
        if module is not None
    }


def test_guidance_isolates_the_upsampler_from_backbone_and_tokens(params):
    model = tiny_model(params, "usfpn_cae_hfgm").train()
    images, labels = batch()
    outputs = model(images)
    _, parts = model.loss(outputs, labels)
    # Only the upsampler's loss: backbone, encoder and class tokens get nothing.
    assert gradients_from(model, outputs, parts["main"]) == {
        "backbone": False, "encoder": False, "tokens": False, "upsampler": True, "axial_attention": True,
    }
    # Only the guiding (OS-32) branch's loss: the upsampler gets nothing.
    assert gradients_from(model, outputs, parts["guide"]) == {
        "backbone": True, "encoder": True, "tokens": True, "upsampler": False, "axial_attention": False,
    }
    # CAR's losses train the encoder and the backbone, never the upsampler.
    car = gradients_from(model, outputs, parts["car_intra"] + parts["car_c2c"] + parts["car_c2p"])
    assert car["backbone"] and car["encoder"] and not car["upsampler"] and not car["tokens"]


def test_without_stop_gradients_the_upsampler_trains_everything(params):
    model = tiny_model(params, "sfpn_identity_hfgm_no_stop").train()
    images, labels = batch()
    outputs = model(images)
    reached = gradients_from(model, outputs, model.loss(outputs, labels)[1]["main"])
    assert all(reached.values()), reached


def test_without_guidance_the_upsampler_has_its_own_classifier(params):
    model = tiny_model(params, "sfpn_identity_aa").train()
    images, labels = batch()
    outputs = model(images)
    assert set(outputs) == {"out"}  # no guiding branch, no CAR
    reached = gradients_from(model, outputs, model.loss(outputs, labels)[0])
    assert reached["backbone"] and reached["upsampler"] and reached["axial_attention"]
    assert not reached["tokens"]  # the OS-32 tokens are unused: the upsampler's classifier decides


def test_guided_prediction_uses_the_tokens_of_the_guiding_branch(params):
    model = tiny_model(params, "sfpn_identity_guidance").eval()
    captured = {}
    model.upsampler.register_forward_hook(lambda module, args, out: captured.setdefault("feature", out))
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = model.predict(images)
        logits = model.classifier(captured["feature"])  # the same kernel and bias, by hand
        expected = torch.nn.functional.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=True)
    assert torch.allclose(out, expected, atol=1e-5)
    assert not hasattr(model, "upsampler_classifier") or model.upsampler_classifier is None


@pytest.mark.parametrize("experiment, stride, feature_stride", [
    ("fcn_identity", 32, 32),
    ("d8_identity", 8, 8),
    ("usfpn_cae_hfgm", 4, 4),
    ("usfpn_cae_hfgm_os2", 2, 2),
    ("d8_deeplabv3p_hfgm", 4, 4),
    ("swin_usfpn_cae_hfgm", 4, 4),
])
def test_output_strides(params, experiment, stride, feature_stride):
    model = tiny_model(params, experiment).eval()
    assert model.output_stride == stride
    captured = {}
    last = model.upsampler if model.upsampler is not None else model.encoder
    last.register_forward_hook(lambda module, args, out: captured.setdefault("feature", out))
    with torch.no_grad():
        out = model.predict(torch.randn(1, 3, 64, 96))
    feature = captured["feature"][0] if isinstance(captured["feature"], tuple) else captured["feature"]
    assert feature.shape[-2:] == (64 // feature_stride, 96 // feature_stride)
    assert out.shape == (1, NUM_CLASSES, 64, 96)


def test_sides_that_do_not_divide_by_32_are_predicted_whole(params):
    for experiment in ("usfpn_cae_hfgm", "swin_usfpn_cae_hfgm", "convnext_usfpn_cae_hfgm"):
        model = tiny_model(params, experiment).eval()
        with torch.no_grad():
            assert model.predict(torch.randn(1, 3, 50, 70)).shape == (1, NUM_CLASSES, 50, 70)


def test_hfgm_needs_an_upsampler(params):
    with pytest.raises(SegreproError, match="HFGM needs an upsampler"):
        tiny_model(params, "fcn_identity", hfgm={"guidance": True})


def test_the_full_model_learns_a_batch(params):
    model = tiny_model(params, "usfpn_cae_hfgm").train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    images, labels = batch((64, 64))
    labels[:, 3:] = (torch.arange(64) // 16 % NUM_CLASSES)[None, None, :].expand(2, 61, 64)
    images[:, 0] += labels.clamp(max=NUM_CLASSES).float()  # make the classes visible
    losses = [train_step(model, optimizer, images, labels, 0.05)[1]["main"] for _ in range(30)]
    assert losses[-1] < 0.6 * losses[0]


def test_every_experiment_trains_a_step_and_evaluates(params):
    """All of the registry: one optimizer step with its own setting's optimizer, then a
    multi-scale + flip evaluation of two odd-sized images."""
    dataset = [(torch.randn(3, 40, 56), torch.randint(0, NUM_CLASSES, (40, 56)), "a"),
               (torch.randn(3, 50, 38), torch.randint(0, NUM_CLASSES, (50, 38)), "b")]
    images, labels = batch()
    for experiment in params.paper("hfgd")["experiments"]:
        config = params.resolve("hfgd", experiment, "tiny")
        model = tiny_model(params, experiment).train()
        optimizer = build_optimizer(model, config["train"])
        loss, parts = train_step(model, optimizer, images, labels, config["train"]["lr"])
        assert torch.isfinite(torch.tensor(loss)) and loss > 0, experiment
        assert "main" in parts and ("guide" in parts) == model.guidance, experiment
        matrix = inference.evaluate(model.eval().predict, dataset, {"scales": [0.75, 1.25], "flip": True}, "cpu",
                                    NUM_CLASSES, crop_size=48, progress=False)
        assert matrix.matrix.sum() == 40 * 56 + 50 * 38, experiment


def table9_rows():
    paper, spec = load_params(ROOT).table("hfgd_table9")
    rows = [row for row in spec["rows"] if "gmacs" in row.get("paper", {})]
    # OS=2: no layout consistent with Sec. 3.3 reaches the paper's count (the row's flops_note;
    # docs/notes/defaults-hfgd.md counts every reading)
    return [pytest.param(row, marks=pytest.mark.xfail(strict=True, reason="OS=2 layout not resolved"))
            if row["experiment"] == "usfpn_cae_hfgm_os2" else row for row in rows]


@pytest.mark.parametrize("row", table9_rows(), ids=lambda row: row["experiment"])
def test_table9_counts_are_within_3_percent_of_the_papers(params, row):
    """Table 9 as the table counts it (paper-scale models on the meta device): 513x513, 59
    classes, unless the row says how the paper counted that model."""
    from segrepro.measure.flops import count_macs

    settings = dict(params.table("hfgd_table9")[1]["flops"], **row.get("flops", {}))
    model = params.resolve("hfgd", row["experiment"], "paper")["model"]
    ours = count_macs(model, settings["num_classes"], settings["input_size"])["gmacs"]
    assert ours == pytest.approx(row["paper"]["gmacs"], rel=0.03)


# ----------------------------------------------------------------------------- CE normalisation

def test_cross_entropy_normalisation_by_hand():
    """Two valid pixels (CE ln 2 and ln 4) and two ignored ones: the sum 3 ln 2 over the 2 valid
    pixels (torch's mean) or over all 4 (the HFGD authors' Keras mean)."""
    from math import log

    from segrepro.models.common.losses import masked_cross_entropy

    labels = torch.tensor([[[0, 1, 255, 255]]])
    logits = torch.tensor([[[[0.0, log(3.0), 5.0, -5.0]], [[0.0, 0.0, -5.0, 5.0]]]])  # (1, 2, 1, 4)
    valid = masked_cross_entropy(logits, labels, 255)
    assert valid.item() == pytest.approx(3 * log(2) / 2, rel=1e-6)
    assert masked_cross_entropy(logits, labels, 255, "valid_pixels").item() == valid.item()
    assert masked_cross_entropy(logits, labels, 255, "all_pixels").item() == pytest.approx(3 * log(2) / 4, rel=1e-6)
    # No valid pixel: 0 either way, not NaN.
    nothing = torch.full_like(labels, 255)
    assert masked_cross_entropy(logits, nothing, 255).item() == 0.0
    assert masked_cross_entropy(logits, nothing, 255, "all_pixels").item() == 0.0
    with pytest.raises(SegreproError, match="'batch'"):
        masked_cross_entropy(logits, labels, 255, "batch")


def test_hfgds_cross_entropies_are_divided_by_all_pixels(params):
    """The default (the authors' code) divides both cross-entropies, the prediction's and the guiding
    branch's, by every pixel; the open-defaults experiment by the valid ones; PSPNet keeps torch's mean.
    Uniform logits over 5 classes: each valid pixel costs ln 5; 3 of 8 pixels are valid."""
    from math import log

    labels = torch.full((2, 1, 4), 255)
    labels[0, 0, :3] = torch.tensor([0, 1, 4])
    outputs = {"out": torch.zeros(2, NUM_CLASSES, 1, 4), "guide": torch.zeros(2, NUM_CLASSES, 1, 4)}
    _, parts = tiny_model(params, "usfpn_cae_hfgm").loss(outputs, labels)
    assert parts["main"].item() == pytest.approx(3 * log(5) / 8, rel=1e-6)
    assert parts["guide"].item() == pytest.approx(3 * log(5) / 8, rel=1e-6)
    _, parts = tiny_model(params, "usfpn_cae_hfgm_ce_valid").loss(outputs, labels)
    assert parts["main"].item() == pytest.approx(log(5), rel=1e-6)
    pspnet = build_model(params.resolve("pspnet", "psp50", "tiny")["model"], NUM_CLASSES)
    _, parts = pspnet.loss({"out": outputs["out"]}, labels)
    assert parts["main"].item() == pytest.approx(log(5), rel=1e-6)
