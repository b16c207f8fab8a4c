"""PSPNet (segrepro.models.pspnet.pspnet): shapes, the pyramid pooling arithmetic, the auxiliary branch,
the loss, the dilated backbone and the backbone's weight loading errors."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO

from segrepro.config.params import deep_merge, load_params
from segrepro.core.errors import SegreproError
from segrepro.models.common.losses import masked_cross_entropy
from segrepro.models.factory import build_model, model_arguments
from segrepro.models.pspnet.pspnet import PSPNet, PyramidPooling

NUM_CLASSES = 5


@pytest.fixture(scope="module")
def params():
    return load_params(REPO)


def tiny_model_config(params, experiment="psp50", **override):
    """The model section of a tiny-scale run of `experiment`, with `override` deep-merged in."""
    return deep_merge(params.resolve("pspnet", experiment, "tiny")["model"], override)


def build(params, experiment="psp50", seed=0, **override):
    torch.manual_seed(seed)
    return build_model(tiny_model_config(params, experiment, **override), NUM_CLASSES)


# ----------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("experiment, bins, pool, reduction", [
    ("fcn", None, None, None),
    ("b1_max", [1], "max", False),
    ("b1_ave", [1], "avg", False),
    ("b1236_max", [1, 2, 3, 6], "max", False),
    ("b1236_ave", [1, 2, 3, 6], "avg", False),
    ("b1236_max_dr", [1, 2, 3, 6], "max", True),
    ("psp50", [1, 2, 3, 6], "avg", True),
])
def test_registry_experiments_build_the_right_head(params, experiment, bins, pool, reduction):
    model = build(params, experiment)
    c = model.backbone.channels[1]  # layer4 channels
    if bins is None:
        assert not isinstance(model.context, PyramidPooling)
        assert model.head.block[0].in_channels == c
    else:
        ppm = model.context
        assert isinstance(ppm, PyramidPooling)
        assert (ppm.bins, ppm.pool) == (bins, pool)
        n = len(bins)
        expected = c + n * (c // n) if reduction else c + n * c
        assert ppm.out_channels == expected
        assert model.head.block[0].in_channels == expected
        # The concatenation really has out_channels channels.
        features = torch.randn(2, c, 6, 6)
        assert ppm.eval()(features).shape == (2, expected, 6, 6)

    model.train()
    images = torch.randn(2, 3, 40, 56)
    outputs = model(images)
    assert set(outputs) == {"out", "aux"}
    for value in outputs.values():
        assert value.shape == (2, NUM_CLASSES, 40, 56)
    model.eval()
    with torch.no_grad():
        assert model.predict(images).shape == (2, NUM_CLASSES, 40, 56)


@pytest.mark.parametrize("bins", [[1], [1, 2, 3, 6]])
@pytest.mark.parametrize("pool", ["avg", "max"])
@pytest.mark.parametrize("reduction", [False, True])
def test_pyramid_pooling_channels(bins, pool, reduction):
    c, n = 8, len(bins)
    ppm = PyramidPooling(c, bins, pool, reduction).eval()
    expected = c + n * (c // n) if reduction else c + n * c
    assert ppm.out_channels == expected
    x = torch.randn(2, c, 12, 9)
    y = ppm(x)
    assert y.shape == (2, expected, 12, 9)
    assert torch.equal(y[:, :c], x)  # the input itself comes first, untouched


# ----------------------------------------------------------------------------- pooling by hand

GRID = torch.arange(36, dtype=torch.float32).reshape(1, 1, 6, 6)  # value = 6 * row + col


def values(level, *cells):
    """The values at (row, col) cells, to float precision (bilinear weights are rounded)."""
    return pytest.approx([level[r, c].item() for r, c in cells], abs=1e-5)


CENTRES = [(1, 1), (1, 4), (4, 1), (4, 4)]
CORNERS = [(0, 0), (0, 5), (5, 0), (5, 5)]


def pooled_levels(pool):
    """The four upsampled levels of the 1-channel 6x6 GRID, without reduction: [1, 4, 6, 6]."""
    ppm = PyramidPooling(1, [1, 2, 3, 6], pool, reduction=False).eval()
    out = ppm(GRID)
    assert out.shape == (1, 5, 6, 6)
    assert torch.equal(out[:, :1], GRID)
    return out[0, 1:]


def test_pyramid_pooling_average_by_hand():
    b1, b2, b3, b6 = pooled_levels("avg")
    # Bin 1: the global mean of 0..35, everywhere.
    assert torch.allclose(b1, torch.full((6, 6), 17.5))
    # Bin 2: 3x3 blocks with means 7, 10 / 25, 28. Bilinear upsampling x3 (align_corners=False)
    # samples source coordinate (i + 0.5) / 3 - 0.5, which is exactly 0 at i = 1 and 1 at i = 4.
    assert values(b2, *CENTRES) == [7, 10, 25, 28]
    # Bin 3: 2x2 blocks, mean 12 i + 2 j + 3.5; corners of the upsampled map are clamped to the
    # corner cells.
    assert values(b3, *CORNERS) == [3.5, 7.5, 27.5, 31.5]
    # Between two cell centres, the bilinear mix: row 2 samples source row 2.5 / 3 - 0.5 = 1/3.
    assert values(b2, (2, 1)) == [7 + (25 - 7) / 3]
    # Bin 6 on a 6x6 map: every cell is one pixel.
    assert torch.allclose(b6, GRID[0, 0])


def test_pyramid_pooling_max_by_hand():
    b1, b2, b3, b6 = pooled_levels("max")
    assert torch.allclose(b1, torch.full((6, 6), 35.0))
    assert values(b2, *CENTRES) == [14, 17, 32, 35]
    assert values(b3, *CORNERS) == [7, 11, 31, 35]
    assert torch.allclose(b6, GRID[0, 0])


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_pyramid_pooling_matches_numpy_block_reduction(pool):
    """A random 2-channel 12x12 map: every level is the numpy block reduction, upsampled."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1, 2, 12, 12)).astype(np.float32)
    reduce = np.mean if pool == "avg" else np.max
    ppm = PyramidPooling(2, [1, 2, 3, 6], pool, reduction=False).eval()
    out = ppm(torch.from_numpy(x))
    for level, bins in enumerate([1, 2, 3, 6]):
        k = 12 // bins
        blocks = reduce(x.reshape(1, 2, bins, k, bins, k), axis=(3, 5))
        expected = F.interpolate(torch.from_numpy(np.ascontiguousarray(blocks)), size=(12, 12),
                                 mode="bilinear", align_corners=False)
        got = out[:, 2 + 2 * level: 4 + 2 * level]
        assert torch.allclose(got, expected, atol=1e-6), f"bin {bins}"


def test_dimension_reduction_is_a_1x1_conv_per_level():
    ppm = PyramidPooling(8, [1, 2, 3, 6], "avg", reduction=True)
    for reduce in ppm.reduce:
        conv = reduce[0]
        assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (8, 2, (1, 1))


# ----------------------------------------------------------------------------- auxiliary branch

@pytest.mark.parametrize("weight", [0.0, 0.3, 0.4])
def test_aux_head_iff_weight_positive_and_only_in_training(params, weight):
    model = build(params, "fcn", aux={"weight": weight})
    images = torch.randn(2, 3, 32, 32)
    model.train()
    outputs = model(images)
    if weight > 0:
        assert model.aux_head is not None
        assert set(outputs) == {"out", "aux"}
        # The aux branch reads layer3.
        assert model.aux_head.block[0].in_channels == model.backbone.channels[0]
    else:
        assert model.aux_head is None
        assert not any("aux" in name for name, _ in model.named_parameters())
        assert set(outputs) == {"out"}
    model.eval()
    with torch.no_grad():
        assert set(model(images)) == {"out"}


def hand_cross_entropy(logits, labels, ignore_index=255):
    """Mean of -log softmax at the true class over the non-ignored pixels, written out."""
    log_probs = logits - logits.logsumexp(dim=1, keepdim=True)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    picked = log_probs.gather(1, safe.unsqueeze(1)).squeeze(1)
    return -(picked * valid).sum() / valid.sum()


def test_loss_is_main_plus_alpha_aux(params):
    model = build(params, "psp50", aux={"weight": 0.4})
    g = torch.Generator().manual_seed(0)
    out = torch.randn(2, NUM_CLASSES, 4, 5, generator=g)
    aux = torch.randn(2, NUM_CLASSES, 4, 5, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (2, 4, 5), generator=g)
    labels[0, 0, :3] = 255
    labels[1, 2, 2] = 255
    total, parts = model.loss({"out": out, "aux": aux}, labels)
    main, aux_loss = hand_cross_entropy(out, labels), hand_cross_entropy(aux, labels)
    assert torch.allclose(parts["main"], main, atol=1e-6)
    assert torch.allclose(parts["aux"], aux_loss, atol=1e-6)
    assert torch.allclose(total, main + 0.4 * aux_loss, atol=1e-6)

    # In eval mode (no 'aux' output) the loss is the main term alone.
    total, parts = model.loss({"out": out}, labels)
    assert set(parts) == {"main"} and torch.allclose(total, main, atol=1e-6)


def test_loss_of_a_real_forward_uses_the_aux_weight(params):
    model = build(params, "fcn", aux={"weight": 0.6}).train()
    images = torch.randn(2, 3, 32, 32)
    labels = torch.randint(0, NUM_CLASSES, (2, 32, 32))
    outputs = model(images)
    total, parts = model.loss(outputs, labels)
    assert torch.allclose(total, parts["main"] + 0.6 * parts["aux"])
    assert torch.allclose(parts["aux"], F.cross_entropy(outputs["aux"], labels))


def test_masked_cross_entropy_equals_cross_entropy_on_valid_pixels():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, 6, 7, generator=g)
    labels = torch.randint(0, 4, (3, 6, 7), generator=g)
    labels[:, :2] = 255
    got = masked_cross_entropy(logits, labels, 255)
    assert torch.allclose(got, F.cross_entropy(logits, labels, ignore_index=255), atol=1e-6)
    # The same as the plain loss over the valid pixels gathered into one list.
    flat_logits = logits.permute(0, 2, 3, 1).reshape(-1, 4)
    flat_labels = labels.reshape(-1)
    keep = flat_labels != 255
    assert torch.allclose(got, F.cross_entropy(flat_logits[keep], flat_labels[keep]), atol=1e-6)


def test_masked_cross_entropy_all_ignored_is_zero_not_nan():
    logits = torch.randn(2, 4, 3, 3, requires_grad=True)
    labels = torch.full((2, 3, 3), 255)
    loss = masked_cross_entropy(logits, labels, 255)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all() and not logits.grad.any()
    # (the plain mean is NaN there, which is what the mask avoids)
    assert torch.isnan(F.cross_entropy(logits, labels, ignore_index=255))


def test_masked_cross_entropy_other_ignore_index():
    logits = torch.randn(1, 3, 2, 2)
    labels = torch.tensor([[[0, 1], [2, 7]]])
    assert torch.allclose(masked_cross_entropy(logits, labels, 7),
                          F.cross_entropy(logits, labels, ignore_index=7))


# ----------------------------------------------------------------------------- backbone

def test_output_stride_8(params):
    model = build(params, "psp50").eval()
    assert model.backbone.feature_info.reduction() == [8, 8]
    with torch.no_grad():
        layer3, layer4 = model.backbone(torch.randn(1, 3, 64, 48))
    assert layer3.shape[-2:] == (8, 6) and layer4.shape[-2:] == (8, 6)
    assert (layer3.shape[1], layer4.shape[1]) == tuple(model.backbone.channels)
    # Dilated, not strided: layer4 of a plain ResNet would be at 1/32.
    body = model.backbone.body
    assert body.layer3[0].conv2.dilation == (2, 2) and body.layer3[1].conv2.dilation == (2, 2)
    assert body.layer4[0].conv2.dilation == (4, 4) and body.layer4[1].conv2.dilation == (4, 4)


def test_every_block_strides_and_dilates_as_semseg(params):
    """semseg model/pspnet.py on its deep-stem ResNet-50: the stem reduces by 4, layer2's first
    block strides by 2, every 3x3 conv of layer3 has dilation 2 (padding 2) and of layer4 dilation
    4 (padding 4), all at stride 1 with unstrided downsample shortcuts."""
    body = build(params, "psp50").backbone.body
    assert [conv.stride for conv in body.conv1 if isinstance(conv, torch.nn.Conv2d)] == [(2, 2), (1, 1), (1, 1)]
    assert body.maxpool.stride == 2
    for index, blocks, dilation in ((1, 3, 1), (2, 4, 1), (3, 6, 2), (4, 3, 4)):
        stage = getattr(body, f"layer{index}")
        assert len(stage) == blocks
        for number, block in enumerate(stage):
            stride = 2 if (index, number) == (2, 0) else 1
            where = f"layer{index}[{number}]"
            assert block.conv2.kernel_size == (3, 3), where
            assert block.conv2.stride == (stride, stride), where
            assert block.conv2.dilation == (dilation, dilation), where
            assert block.conv2.padding == (dilation, dilation), where
            assert block.conv1.stride == block.conv3.stride == (1, 1), where
            if block.downsample is not None:
                assert number == 0 and block.downsample[0].stride == (stride, stride), where
    # The switch of pspnet_open_defaults: timm's own layout, the first block one dilation behind.
    timm_body = build(params, "psp50_timm_dilation").backbone.body
    assert [block.conv2.dilation[0] for block in timm_body.layer3] == [1, 2, 2, 2, 2, 2]
    assert [block.conv2.dilation[0] for block in timm_body.layer4] == [2, 4, 4]


def test_whole_stage_dilation_changes_the_computation_not_the_weights(params):
    semseg, timm_layout = build(params, "psp50").eval(), build(params, "psp50_timm_dilation").eval()
    for module in semseg.modules():  # timm zero-initialises each block's last BN: wake the blocks up
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
    timm_layout.load_state_dict(semseg.state_dict())  # same parameters, same shapes
    x = torch.randn(1, 3, 49, 49)
    with torch.no_grad():
        a, b = semseg.backbone(x), timm_layout.backbone(x)
    assert [f.shape for f in a] == [f.shape for f in b] == [(1, 64, 7, 7), (1, 128, 7, 7)]
    assert not torch.allclose(a[0], b[0]) and not torch.allclose(a[1], b[1])


def test_dilate_first_block_needs_a_resnet():
    from segrepro.models.common.backbone import Backbone

    with pytest.raises(SegreproError, match="convnext_atto.*ResNet"):
        Backbone("convnext_atto", out_indices=(3,), output_stride=8, dilate_first_block=True)


def test_pyramid_pooling_align_corners_by_hand():
    """semseg's PPM upsamples with align_corners=True: the 2x2 level's cell values sit exactly on
    the corner pixels of the 6x6 map and row i samples source row i / 5."""
    ppm = PyramidPooling(1, [2], "avg", reduction=False, align_corners=True).eval()
    level = ppm(GRID)[0, 1]
    assert values(level, *CORNERS) == [7, 10, 25, 28]
    assert values(level, (1, 0), (0, 1)) == [7 + (25 - 7) / 5, 7 + (10 - 7) / 5]


def test_pspnet_upsamples_with_align_corners_as_semseg(params):
    model = build(params, "psp50").eval()
    assert model.align_corners and model.context.align_corners
    x = torch.randn(1, 3, 49, 49)  # 8n+1: the 7x7 logits' corners land on the image's corners
    with torch.no_grad():
        logits = model.head(model.context(model.backbone(x)[1]))
        out = model(x)["out"]
    assert logits.shape[-2:] == (7, 7)
    assert torch.allclose(out, F.interpolate(logits, size=(49, 49), mode="bilinear", align_corners=True), atol=1e-5)
    assert torch.allclose(out[..., ::8, ::8], logits, atol=1e-5)
    plain = build(params, "psp50_no_align_corners")
    assert not plain.align_corners and not plain.context.align_corners


def test_resnet269_layout_from_params(params):
    config = tiny_model_config(params, "psp269")
    assert config["backbone"]["kwargs"]["layers"] == [3, 30, 48, 8]
    model = build_model(config, NUM_CLASSES)
    body = model.backbone.body
    blocks = [len(getattr(body, f"layer{i}")) for i in range(1, 5)]
    assert blocks == [3, 30, 48, 8]
    assert sum(blocks) * 3 + 2 == 269  # 3 convs per bottleneck, plus stem and classifier
    assert type(body.layer2[0]).__name__ == "Bottleneck"


def test_backbone_depths_from_params(params):
    for experiment, layers in [("psp50", [3, 4, 6, 3]), ("psp101", [3, 4, 23, 3]),
                               ("psp152", [3, 8, 36, 3])]:
        body = build(params, experiment).backbone.body
        assert [len(getattr(body, f"layer{i}")) for i in range(1, 5)] == layers, experiment


def test_pretrained_offline_names_the_backbone(params, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        import huggingface_hub.constants as hub_constants
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    except ImportError:
        pass
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    config = deep_merge(params.paper("pspnet")["model"], {"backbone": {"pretrained": True}})
    with pytest.raises(SegreproError, match="resnet50s") as info:
        build_model(config, NUM_CLASSES)
    message = str(info.value)
    assert "\n" not in message
    # The weight by name, the cache it is looked for in, and the alternative.
    assert "'timm/resnet50s.gluon_in1k'" in message
    assert "/nonexistent-hf-home" in message or "cache" in message
    assert "model.backbone.pretrained to its path" in message


def _offline_hub(monkeypatch, home: Path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(home / "hub"))


def test_pretrained_true_reads_the_hub_cache_offline(monkeypatch, tmp_path):
    """`pretrained: true` takes timm's ImageNet weights from the Hugging Face cache when offline:
    a cache entry written by hand (the hub's layout: refs/main -> snapshots/<rev>/) is what loads."""
    import timm
    from safetensors.torch import save_file
    from timm.models import get_pretrained_cfg

    from segrepro.models.common.backbone import create_timm_model

    _offline_hub(monkeypatch, tmp_path)
    repo = get_pretrained_cfg("resnet18").hf_hub_id                      # timm/resnet18.a1_in1k
    entry = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text("0" * 40)
    (entry / "snapshots" / ("0" * 40)).mkdir(parents=True)
    torch.manual_seed(3)
    weights = {k: v.contiguous() for k, v in timm.create_model("resnet18").state_dict().items()}
    save_file(weights, entry / "snapshots" / ("0" * 40) / "model.safetensors")
    model = create_timm_model("resnet18", True)
    assert torch.equal(model.conv1.weight, weights["conv1.weight"])
    assert torch.equal(model.fc.weight, weights["fc.weight"])


def test_pretrained_file_is_loaded_weights_only(tmp_path):
    """A weights file holding anything but tensors (a pickled object) is refused, not executed."""
    import timm

    from segrepro.models.common.backbone import create_timm_model

    good = tmp_path / "resnet18.pth"
    state = timm.create_model("resnet18").state_dict()
    torch.save(state, good)
    assert torch.equal(create_timm_model("resnet18", str(good)).conv1.weight, state["conv1.weight"])
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": _Opaque()}, bad)
    with pytest.raises(SegreproError, match="bad.pth could not be loaded"):
        create_timm_model("resnet18", str(bad))


class _Opaque:
    """Not a tensor: unpickling it needs code, which weights_only loading refuses."""


def test_pretrained_with_custom_width_is_refused(params):
    config = tiny_model_config(params, "psp50", backbone={"pretrained": True})
    with pytest.raises(SegreproError, match="resnet50s.*custom layers/channels"):
        build_model(config, NUM_CLASSES)


def test_pretrained_missing_file_names_the_file(params, tmp_path):
    missing = tmp_path / "nonexistent.pth"
    config = tiny_model_config(params, "psp50", backbone={"pretrained": str(missing)})
    with pytest.raises(SegreproError, match="nonexistent.pth") as info:
        build_model(config, NUM_CLASSES)
    assert str(missing) in str(info.value)


def test_unknown_family_and_backbone(params):
    with pytest.raises(SegreproError, match="deeplab"):
        build_model(tiny_model_config(params, family="deeplab"), NUM_CLASSES)
    with pytest.raises(SegreproError, match="resnet-7"):
        build_model(tiny_model_config(params, backbone={"name": "resnet-7"}), NUM_CLASSES)


def test_direct_construction_matches_build_model(params):
    config = tiny_model_config(params)
    torch.manual_seed(0)
    a = PSPNet(NUM_CLASSES, **model_arguments(config)[1])
    torch.manual_seed(0)
    b = build_model(config, NUM_CLASSES)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_every_pretrained_backbone_in_the_registry_has_timm_weights(params):
    """Offline check of the paper scale: each `pretrained: true` names a timm model that has
    published weights (what `timm.create_model(pretrained=True)` will download)."""
    import timm

    names = set()
    for paper, registry in params.papers.items():
        for experiment in registry["experiments"]:
            for scale in params.scales:
                backbone = params.resolve(paper, experiment, scale)["model"]["backbone"]
                if backbone["pretrained"] is True:
                    names.add(backbone["name"])
    assert names, "no run uses pretrained weights"
    for name in sorted(names):
        # A name with a tag ("model.tag") must be one of the published weights, a bare name have some.
        published = timm.list_pretrained(name if "." in name else f"{name}.*")
        assert name in published if "." in name else published, f"timm has no pretrained weights for {name}"


def test_local_weights_file_loads_and_a_misfit_is_named(tmp_path):
    """`pretrained: <file>` loads a state dict through timm; a file for another shape is refused
    with one line (not a size-mismatch traceback)."""
    import timm

    from segrepro.models.common.backbone import create_timm_model

    torch.manual_seed(0)
    source = timm.create_model("resnet18", pretrained=False, num_classes=10)
    weights = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), weights)
    loaded = create_timm_model("resnet18", str(weights), num_classes=10)
    assert torch.equal(loaded.conv1.weight, source.conv1.weight)
    with pytest.raises(SegreproError, match="do not fit its shape") as info:
        create_timm_model("resnet18", str(weights), num_classes=10, channels=[8, 16, 32, 64])
    assert "\n" not in str(info.value)
