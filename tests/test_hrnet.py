"""Stride-4 feature extractors (segrepro.models.common.hrnet, segrepro.models.saf.features): the
upsample+concat fusion on hand-computed values, output shapes and channel counts of HRNetFeatures
and ResNetDecoder (Sec. 5.1.2, App. D), gradient flow, the config builder and its one-line errors.
Random init only (no downloads)."""

import pytest
import torch

from segrepro.core.errors import SegreproError
from segrepro.models.common.hrnet import HRNetFeatures, upsample_concat
from segrepro.models.factory import saf_features_config
from segrepro.models.saf.config import DecoderConfig, SafFeaturesConfig
from segrepro.models.saf.features import build_feature_extractor
from segrepro.models.saf.resnet_decoder import ResNetDecoder

# A tiny ResNet-18 (timm kwargs) and a tiny decoder: 8+16+32+64 = 120 channels at stride 4.
TINY_RESNET = {"channels": [8, 16, 32, 64], "stem_width": 8, "layers": [1, 1, 1, 1]}
TINY_DECODER = {"channels": [8, 16, 32, 64], "modules": 1, "blocks": 1}


def tiny_decoder(seed=0, **override):
    torch.manual_seed(seed)
    return ResNetDecoder("resnet18", kwargs=TINY_RESNET, **{**TINY_DECODER, **override})


# ----------------------------------------------------------------------------- fusion

def test_upsample_concat_hand_computed_align_corners_true():
    fine = torch.arange(8.0).reshape(1, 2, 1, 4)      # already at the target size: untouched
    coarse = torch.tensor([[[[0.0, 3.0]]]])            # 1x2 -> 1x4
    out = upsample_concat([fine, coarse], align_corners=True)
    assert out.shape == (1, 3, 1, 4)
    assert torch.equal(out[:, :2], fine)               # order kept, finest first
    # align_corners=True: end points pinned, linear in between.
    assert torch.allclose(out[0, 2, 0], torch.tensor([0.0, 1.0, 2.0, 3.0]))


def test_upsample_concat_hand_computed_align_corners_false():
    coarse = torch.tensor([[[[0.0, 3.0]]]])
    out = upsample_concat([torch.zeros(1, 1, 1, 4), coarse], align_corners=False)
    # Source positions (i + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25, clamped to [0, 1].
    assert torch.allclose(out[0, 1, 0], torch.tensor([0.0, 0.75, 2.25, 3.0]))


def test_upsample_concat_three_levels_and_order_independent_target():
    # A constant map stays constant at any scale; the target is the largest map wherever it sits.
    maps = [torch.full((2, 1, 2, 3), 5.0), torch.full((2, 2, 4, 6), 1.0), torch.full((2, 1, 1, 1), -2.0)]
    out = upsample_concat(maps)
    assert out.shape == (2, 4, 4, 6)
    assert torch.allclose(out[:, 0], torch.full((2, 4, 6), 5.0))
    assert torch.equal(out[:, 1:3], maps[1])
    assert torch.allclose(out[:, 3], torch.full((2, 4, 6), -2.0))


def test_upsample_concat_2x2_to_4x4_align_corners_true():
    coarse = torch.tensor([[[[0.0, 3.0], [6.0, 9.0]]]])
    out = upsample_concat([torch.zeros(1, 1, 4, 4), coarse], align_corners=True)[0, 1]
    expected = torch.tensor([[0.0, 1.0, 2.0, 3.0], [2.0, 3.0, 4.0, 5.0], [4.0, 5.0, 6.0, 7.0], [6.0, 7.0, 8.0, 9.0]])
    assert torch.allclose(out, expected)


# ----------------------------------------------------------------------------- HRNetFeatures

@pytest.mark.parametrize("size", [(64, 64), (64, 96), (96, 32)])
def test_hrnet_w18_small_shape(size):
    torch.manual_seed(0)
    model = HRNetFeatures("hrnet_w18_small").eval()
    assert tuple(model.body.feature_info.reduction()) == (4, 8, 16, 32)
    assert model.body.feature_info.channels() == [16, 32, 64, 128]
    assert (model.out_channels, model.reduction) == (240, 4)
    assert model.feature_info.channels() == [240] and model.feature_info.reduction() == [4]
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = model(images)
        branches = model.body(images)
    assert out.shape == (2, 240, size[0] // 4, size[1] // 4)
    # The output is the branches upsampled to stride 4 (align_corners=True) and concatenated.
    assert [tuple(b.shape[-2:]) for b in branches] == [(size[0] // s, size[1] // s) for s in (4, 8, 16, 32)]
    assert torch.allclose(out, upsample_concat(branches, align_corners=True))
    assert torch.equal(out[:, :16], branches[0])


@pytest.mark.parametrize("name, channels, total", [
    ("hrnet_w32", [32, 64, 128, 256], 480),
    ("hrnet_w48", [48, 96, 192, 384], 720),   # Sec. 5.1.3: D = 720
])
def test_hrnet_paper_widths(name, channels, total):
    model = HRNetFeatures(name).eval()
    assert model.body.feature_info.channels() == channels
    assert model.out_channels == total
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 64)).shape == (1, total, 8, 16)


def test_hrnet_align_corners_switch():
    torch.manual_seed(0)
    model = HRNetFeatures("hrnet_w18_small", align_corners=False).eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = model(images)
        expected = upsample_concat(model.body(images), align_corners=False)
        other = upsample_concat(model.body(images), align_corners=True)
    assert torch.allclose(out, expected)
    assert not torch.allclose(out[:, 16:], other[:, 16:])  # the switch really changes the upsampling


def test_hrnet_gradients_reach_first_layer():
    torch.manual_seed(0)
    model = HRNetFeatures("hrnet_w18_small").train()
    model(torch.randn(2, 3, 64, 64)).square().mean().backward()
    assert model.body.conv1.weight.grad is not None
    assert model.body.conv1.weight.grad.abs().sum() > 0
    # Every parameter takes part in the output (no dead classification head).
    assert all(p.grad is not None for p in model.parameters())


def test_hrnet_rejects_other_names():
    with pytest.raises(SegreproError, match="'resnet18' is not a timm HRNet"):
        HRNetFeatures("resnet18")
    with pytest.raises(SegreproError, match="'hrnet_w99' is not a timm HRNet"):
        HRNetFeatures("hrnet_w99")


def test_hrnet_bad_kwargs_are_one_line_errors():
    with pytest.raises(SegreproError, match="hrnet_w18_small.*fixed by the feature extractor"):
        HRNetFeatures("hrnet_w18_small", kwargs={"out_indices": (4,)})
    with pytest.raises(SegreproError, match="hrnet_w18_small' rejects kwargs \\['widht'\\]"):
        HRNetFeatures("hrnet_w18_small", kwargs={"widht": 3})


def test_input_not_multiple_of_32():
    with pytest.raises(ValueError, match="48x64 is not a multiple of 32"):
        HRNetFeatures("hrnet_w18_small")(torch.zeros(1, 3, 48, 64))


# ----------------------------------------------------------------------------- ResNetDecoder

@pytest.mark.parametrize("size", [(64, 64), (64, 96)])
def test_tiny_resnet_decoder_shape(size):
    model = tiny_decoder().eval()
    assert model.body.feature_info.channels() == [8, 16, 32, 64]
    assert tuple(model.body.feature_info.reduction()) == (4, 8, 16, 32)
    assert (model.out_channels, model.reduction, model.feature_info.channels()) == (120, 4, [120])
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 120, size[0] // 4, size[1] // 4)


def test_resnet_decoder_structure_and_wiring():
    model = tiny_decoder(channels=[4, 8, 12, 16], modules=2, blocks=3).eval()
    # App. D: one Conv3x3 (+BN+ReLU) per stage, from the stage width to the decoder width.
    convs = [lateral[0] for lateral in model.lateral]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (8, 4, (3, 3)), (16, 8, (3, 3)), (32, 12, (3, 3)), (64, 16, (3, 3))]
    # The last HRNet stage: `modules` modules, each with `blocks` BasicBlocks per branch.
    assert len(model.stage) == 2
    assert all([len(branch) for branch in module.branches] == [3, 3, 3, 3] for module in model.stage)
    assert model.out_channels == 4 + 8 + 12 + 16
    # Forward = body -> laterals -> HRNet modules -> upsample+concat.
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        branches = [lateral(f) for lateral, f in zip(model.lateral, model.body(images))]
        for module in model.stage:
            branches = module(branches)
        assert [b.shape[1] for b in branches] == [4, 8, 12, 16]
        assert torch.allclose(model(images), upsample_concat(branches, align_corners=True))


def test_resnet101_decoder_paper_widths():
    # App. D: 256/512/1024/2048 -> [48, 96, 192, 384] -> 720 channels at stride 4.
    model = ResNetDecoder("resnet101")
    assert model.body.feature_info.channels() == [256, 512, 1024, 2048]
    assert tuple(model.body.feature_info.reduction()) == (4, 8, 16, 32)  # not dilated
    assert [lateral[0].out_channels for lateral in model.lateral] == [48, 96, 192, 384]
    assert len(model.stage) == 3 and [len(b) for b in model.stage[0].branches] == [4, 4, 4, 4]
    assert model.out_channels == 720


def test_resnet_decoder_gradients_reach_first_layer():
    model = tiny_decoder().train()
    model(torch.randn(2, 3, 64, 64)).square().mean().backward()
    grad = model.body.conv1.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())


def test_resnet_decoder_stem_width():
    # timm's ResNet reads stem_width only for a deep (3x3 x 3) stem; the default 7x7 stem stays 64 wide.
    plain = ResNetDecoder("resnet18", kwargs={"channels": [8, 16, 32, 64], "stem_width": 8}, **TINY_DECODER)
    assert plain.body.conv1.out_channels == 64
    deep = ResNetDecoder("resnet18", kwargs={**TINY_RESNET, "stem_width": 4, "stem_type": "deep"},
                         **TINY_DECODER).eval()
    assert [m.out_channels for m in deep.body.conv1 if isinstance(m, torch.nn.Conv2d)] == [4, 4, 8]
    with torch.no_grad():
        assert deep(torch.randn(1, 3, 32, 64)).shape == (1, 120, 8, 16)


def test_pretrained_with_custom_channels_is_an_error():
    with pytest.raises(SegreproError, match="'resnet18' with custom layers/channels has no pretrained weights"):
        ResNetDecoder("resnet18", pretrained=True, kwargs=TINY_RESNET)


def test_missing_weights_file_is_an_error(tmp_path):
    with pytest.raises(SegreproError, match="weights file not found"):
        HRNetFeatures("hrnet_w18_small", pretrained=str(tmp_path / "missing.pth"))


def test_resnet_decoder_rejects_bad_arguments():
    with pytest.raises(SegreproError, match="'hrnet_w18_small' is not a timm ResNet"):
        ResNetDecoder("hrnet_w18_small")
    with pytest.raises(SegreproError, match="'resnet-7' is not a timm ResNet"):
        ResNetDecoder("resnet-7")
    with pytest.raises(SegreproError, match="decoder channels \\[8, 16, 32\\]"):
        ResNetDecoder("resnet18", kwargs=TINY_RESNET, channels=[8, 16, 32])
    with pytest.raises(SegreproError, match="modules=0"):
        ResNetDecoder("resnet18", kwargs=TINY_RESNET, modules=0)
    # A dilated ResNet would break the four-stride layout App. D asks for.
    with pytest.raises(SegreproError, match="fixed by the feature extractor"):
        ResNetDecoder("resnet18", kwargs={**TINY_RESNET, "output_stride": 8})


# ----------------------------------------------------------------------------- builder

def test_build_hrnet():
    model = build_feature_extractor(SafFeaturesConfig("hrnet", "hrnet_w18_small"))
    assert isinstance(model, HRNetFeatures) and model.out_channels == 240 and model.align_corners


def test_build_resnet_decoder():
    model = build_feature_extractor(SafFeaturesConfig(
        "resnet_decoder", "resnet18", kwargs=TINY_RESNET, align_corners=False,
        decoder=DecoderConfig(channels=(8, 16, 32, 64), modules=2, blocks=1),
    ))
    assert isinstance(model, ResNetDecoder)
    assert model.out_channels == 120 and len(model.stage) == 2 and not model.align_corners


def test_build_from_the_configuration_mapping():
    """The factory reads `model.backbone` into the same arguments: the decoder's list becomes a tuple."""
    features = saf_features_config({"kind": "resnet_decoder", "name": "resnet18", "kwargs": TINY_RESNET,
                                    "decoder": {"channels": [8, 16, 32, 64], "modules": 2, "blocks": 1}})
    assert features == SafFeaturesConfig("resnet_decoder", "resnet18", kwargs=TINY_RESNET,
                                         decoder=DecoderConfig((8, 16, 32, 64), 2, 1))


def test_build_errors():
    with pytest.raises(SegreproError, match="unknown feature extractor kind 'vit'"):
        build_feature_extractor(saf_features_config({"kind": "vit", "name": "vit_small_patch16_224"}))
    with pytest.raises(SegreproError, match="model.backbone.decoder: only a resnet_decoder has a decoder"):
        saf_features_config({"kind": "hrnet", "name": "hrnet_w18_small", "decoder": {}})
    with pytest.raises(SegreproError, match="model.backbone.decoder: unknown key\\(s\\) block"):
        saf_features_config({"kind": "resnet_decoder", "name": "resnet18", "decoder": {"block": 1}})
    with pytest.raises(SegreproError, match="model.backbone: missing key 'name'"):
        saf_features_config({"kind": "hrnet"})
