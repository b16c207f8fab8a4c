"""HFGD upsamplers (segrepro.models.hfgd.upsamplers): shapes and strides, odd sizes, gradients, FaPN's DCNv2."""

import pytest
import torch
import torch.nn.functional as F

from segrepro.core.errors import SegreproError
from segrepro.models.hfgd.config import UpsamplerConfig
from segrepro.models.hfgd.upsamplers import ModulatedDeformConv, build_upsampler, top_down

CHANNELS = 8
RESNET_SKIPS = {4: 6, 8: 10, 16: 12}  # a ResNet-like pyramid, shrunk
PYRAMID_TYPES = ["sfpn", "usfpn", "fapn", "uper"]


def side(length: int, stride: int) -> int:
    """Feature size at a stride for a stride-2 'SAME' backbone: ceil at every halving (51 -> 26 -> 13)."""
    while stride > 1:
        length, stride = -(-length // 2), stride // 2
    return length


def make_inputs(skip_channels: dict, top_stride: int, height: int, width: int, batch: int = 2):
    torch.manual_seed(0)
    skips = {s: torch.randn(batch, c, side(height, s), side(width, s)) for s, c in skip_channels.items()}
    top = torch.randn(batch, CHANNELS, side(height, top_stride), side(width, top_stride))
    return skips, top


def build(kind: str, skip_channels: dict, **config) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_upsampler(UpsamplerConfig(type=kind, **config), skip_channels, CHANNELS, CHANNELS)


def case(kind: str):
    """(skip channels, top stride) of the Table 8 setting of each type: DeepLabV3+ on a D8 backbone."""
    return ({4: 6}, 8) if kind == "deeplabv3p" else (RESNET_SKIPS, 32)


@pytest.mark.parametrize("kind", PYRAMID_TYPES + ["deeplabv3p"])
@pytest.mark.parametrize("image", [(64, 64), (51, 67)])
def test_output_is_at_stride_4_with_the_stride_4_skips_size(kind, image):
    skip_channels, top_stride = case(kind)
    skips, top = make_inputs(skip_channels, top_stride, *image)
    model = build(kind, skip_channels)
    out = model(skips, top)
    assert model.output_stride == 4
    assert out.shape == (2, CHANNELS) + tuple(skips[4].shape[-2:])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("image", [(64, 64), (51, 67)])
def test_usfpn_at_output_stride_2_doubles_the_side(image):
    skips, top = make_inputs(RESNET_SKIPS, 32, *image)
    model = build("usfpn", RESNET_SKIPS, output_stride=2)
    h4, w4 = skips[4].shape[-2:]
    assert model.output_stride == 2
    assert model(skips, top).shape == (2, CHANNELS, 2 * h4, 2 * w4)


def test_usfpn_os2_extra_block_convolves_at_stride_4_then_upsamples():
    """Sec. 3.3 "one more conv-upsample block for every branch": each branch's last 3x3 runs at
    stride 4 and is then upsampled to stride 2; the 1x1 fuse runs at stride 2."""
    skips, top = make_inputs(RESNET_SKIPS, 32, 51, 67)
    model = build("usfpn", RESNET_SKIPS, output_stride=2)
    h4, w4 = skips[4].shape[-2:]
    seen = {}
    for level, branch in enumerate(model.branches):
        branch.convs[-1].register_forward_hook(
            lambda m, i, o, level=level: seen.__setitem__(level, tuple(i[0].shape[-2:])))
    fuse_input = []
    model.fuse.register_forward_hook(lambda m, i, o: fuse_input.append(tuple(i[0].shape[-2:])))
    model(skips, top)
    assert seen == {level: (h4, w4) for level in range(4)}
    assert [len(branch.convs) for branch in model.branches] == [2, 2, 3, 4]
    assert fuse_input == [(2 * h4, 2 * w4)]


def test_mmseg_semantic_fpn_layout():
    """mmsegmentation's FPN neck + FPNHead: plain 1x1 laterals with bias, a 3x3 output conv per
    level, max(1, i) ConvBnReLU per level at head width, output at stride 4, head_channels wide."""
    skips, top = make_inputs(RESNET_SKIPS, 32, 51, 67)
    model = build("sfpn_mmseg", RESNET_SKIPS, head_channels=4)
    assert [(m.in_channels, m.kernel_size, m.bias is not None) for m in model.laterals] == [
        (6, (1, 1), True), (10, (1, 1), True), (12, (1, 1), True)]
    assert [m.kernel_size for m in model.outputs] == [(3, 3)] * 4
    assert [len(convs) for convs in model.branches] == [1, 1, 2, 3]
    assert [convs[0][0].in_channels for convs in model.branches] == [CHANNELS] * 4
    assert model.out_channels == 4
    assert model(skips, top).shape == (2, 4, *skips[4].shape[-2:])


def test_deeplabv3p_uses_only_the_stride_4_skip():
    skips, top = make_inputs(RESNET_SKIPS, 32, 64, 64)
    model = build("deeplabv3p", RESNET_SKIPS)
    assert model(skips, top).shape == (2, CHANNELS, 16, 16)
    assert model.low_level[0].out_channels == 48


@pytest.mark.parametrize("output_stride", [4, 2])
def test_sfpn_branches_follow_semantic_pyramid_block_v2(output_stride):
    """Branch i (stride 4 * 2^i) has max(1, i) 3x3 convs, plus one conv-upsample block at OS 2."""
    kind = "usfpn" if output_stride == 2 else "sfpn"
    model = build(kind, RESNET_SKIPS, output_stride=output_stride)
    extra = 1 if output_stride == 2 else 0
    assert [len(b.convs) for b in model.branches] == [1 + extra, 1 + extra, 2 + extra, 3 + extra]
    assert all(conv[0].kernel_size == (3, 3) for b in model.branches for conv in b.convs)
    assert model.fuse[0].kernel_size == (1, 1)


@pytest.mark.parametrize("kind, kernel", [("sfpn", 1), ("usfpn", 3)])
def test_usfpn_widens_the_laterals_to_3x3(kind, kernel):
    model = build(kind, RESNET_SKIPS)
    assert [lat[0].kernel_size for lat in model.laterals] == [(kernel, kernel)] * 3


def test_top_down_adds_every_coarser_level():
    # constant maps 1, 2, 3, 4 (fine -> coarse): bilinear resizing keeps constants, so the merged
    # levels are the suffix sums 10, 9, 7, 4.
    levels = [torch.full((1, 1, s, s), float(v)) for s, v in [(8, 1), (4, 2), (2, 3), (1, 4)]]
    merged = top_down(levels)
    assert [m.shape[-1] for m in merged] == [8, 4, 2, 1]
    for m, expected in zip(merged, [10.0, 9.0, 7.0, 4.0]):
        assert torch.allclose(m, torch.full_like(m, expected))


@pytest.mark.parametrize("kind", PYRAMID_TYPES + ["deeplabv3p"])
def test_gradients_reach_every_parameter(kind):
    skip_channels, top_stride = case(kind)
    skips, top = make_inputs(skip_channels, top_stride, 51, 67)
    model = build(kind, skip_channels, **({"output_stride": 2} if kind == "usfpn" else {}))
    out = model(skips, top)
    (out * torch.randn_like(out)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        # FaPN's offset features feed a zero-initialised conv: no gradient reaches them before step 1
        if not name.endswith(".offset.weight"):
            assert p.grad.abs().sum() > 0, name


def test_dcnv2_with_zero_init_offsets_is_half_a_plain_conv():
    torch.manual_seed(0)
    dcn = ModulatedDeformConv(4, 5, guide_channels=3)
    x, guide = torch.randn(2, 4, 7, 9), torch.randn(2, 3, 7, 9)
    expected = 0.5 * F.conv2d(x, dcn.weight, padding=1) + dcn.bias.view(1, -1, 1, 1)
    assert torch.allclose(dcn(x, guide), expected, atol=1e-5)


def test_fapn_trains_one_sgd_step():
    skips, top = make_inputs(RESNET_SKIPS, 32, 51, 67)
    model = build("fapn", RESNET_SKIPS)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    target = torch.randn(2, CHANNELS, 13, 17)

    def loss_value():
        return F.mse_loss(model(skips, top), target)

    before = loss_value()
    before.backward()
    optimizer.step()
    optimizer.zero_grad()
    after = loss_value()
    assert torch.isfinite(after) and after < before
    # the offset predictor has moved, so the offset features now receive gradient as well
    assert model.align[0].align.offset_mask.weight.abs().sum() > 0
    after.backward()
    assert all(a.offset.weight.grad.abs().sum() > 0 for a in model.align)


def test_unknown_type_is_named():
    with pytest.raises(SegreproError, match="'fpn9'"):
        build_upsampler(UpsamplerConfig(type="fpn9"), RESNET_SKIPS, CHANNELS, CHANNELS)


@pytest.mark.parametrize("kind", ["sfpn", "fapn", "uper", "deeplabv3p"])
def test_output_stride_2_is_usfpn_only(kind):
    with pytest.raises(SegreproError, match="output_stride 2"):
        build_upsampler(UpsamplerConfig(type=kind, output_stride=2), RESNET_SKIPS, CHANNELS, CHANNELS)


def test_pyramid_needs_consecutive_strides_from_4():
    with pytest.raises(SegreproError, match="strides"):
        build_upsampler(UpsamplerConfig(type="sfpn"), {4: 6, 16: 12}, CHANNELS, CHANNELS)
    with pytest.raises(SegreproError, match="stride-4"):
        build_upsampler(UpsamplerConfig(type="deeplabv3p"), {8: 6}, CHANNELS, CHANNELS)


def test_a_wider_top_is_projected_to_the_pyramid_width():
    skips, _ = make_inputs(RESNET_SKIPS, 32, 64, 64)
    top = torch.randn(2, 20, 2, 2)
    for kind in PYRAMID_TYPES:
        model = build_upsampler(UpsamplerConfig(type=kind), RESNET_SKIPS, 20, CHANNELS)
        assert model(skips, top).shape == (2, CHANNELS, 16, 16)
