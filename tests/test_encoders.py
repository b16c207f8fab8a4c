"""HFGD's extra encodings (Table 1, Sec. 3.2, Table 8) and its attention layers, at tiny widths."""

import math

import pytest
import torch

from segrepro.core.errors import SegreproError
from segrepro.models.hfgd.config import EncoderConfig
from segrepro.models.hfgd.encoders import (
    ENCODER_TYPES,
    AxialAttention,
    SelfAttention,
    build_encoder,
)

IN_CHANNELS, CHANNELS = 12, 6
TINY = {"hidden": 8, "key_channels": 4, "wide": 16}
NUM_CLASSES = 3


def tiny_encoder(kind: str, output_stride: int = 32, **config):
    torch.manual_seed(0)
    return build_encoder(EncoderConfig(type=kind, **TINY, **config), IN_CHANNELS, CHANNELS, output_stride, NUM_CLASSES)


@pytest.mark.parametrize("output_stride, size", [(32, (4, 5)), (8, (9, 7))])
@pytest.mark.parametrize("kind", ENCODER_TYPES)
def test_every_encoder_keeps_the_size_and_gives_the_token_width(kind, output_stride, size):
    encoder = tiny_encoder(kind, output_stride)
    x = torch.randn(2, IN_CHANNELS, *size)
    out, extras = encoder(x)
    assert out.shape == (2, CHANNELS, *size)
    if kind in ("sa_car", "cae"):
        assert set(extras) == {"car_features"}
        assert extras["car_features"].shape == (2, TINY["hidden"], *size)  # min(hidden, 512) wide
    else:
        assert extras == {}
    encoder.eval()
    with torch.no_grad():
        assert encoder(x)[0].shape == (2, CHANNELS, *size)


@pytest.mark.parametrize("kind", ENCODER_TYPES)
def test_gradients_reach_every_parameter(kind):
    encoder = tiny_encoder(kind)
    out, extras = encoder(torch.randn(2, IN_CHANNELS, 4, 5))
    loss = out.square().mean() + sum(v.square().mean() for v in extras.values())
    loss.backward()
    missing = [name for name, p in encoder.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_aspp_rates_scale_with_the_output_stride():
    def dilations(encoder):
        return [branch[0].dilation[0] for branch in encoder.layers[0].atrous]

    assert dilations(tiny_encoder("aspp", 32)) == [3, 6, 9]
    assert dilations(tiny_encoder("aspp", 8)) == [12, 24, 36]
    assert dilations(tiny_encoder("aspp", 16, rates=[1, 2])) == [2, 4]


def test_cae_starts_with_the_wide_linear_layers():
    stem = tiny_encoder("cae").stem
    assert [(m.in_channels, m.out_channels, m.kernel_size, m.bias is not None) for m in stem] == [
        (IN_CHANNELS, 16, (1, 1), True),
        (16, 8, (1, 1), True),
    ]
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.ReLU)) for m in stem)


def test_cae_default_wide_and_reduction_layers_are_one_linear_map():
    """Sec. 3.2 as written (two "linear" 1x1 layers, the authors' word for a conv without norm
    or activation): they compose into one 1x1 conv, W = W2 W1, b = W2 b1 + b2."""
    wide, reduce = tiny_encoder("cae").stem
    weight = reduce.weight.flatten(1) @ wide.weight.flatten(1)
    bias = reduce.weight.flatten(1) @ wide.bias + reduce.bias
    x = torch.randn(2, IN_CHANNELS, 3, 4)
    with torch.no_grad():
        composed = torch.nn.functional.conv2d(x, weight[:, :, None, None], bias)
        torch.testing.assert_close(reduce(wide(x)), composed)


def test_cae_wide_bn_relu_puts_a_nonlinearity_after_the_wide_layer():
    stem = tiny_encoder("cae", wide_bn_relu=True).stem
    wide, reduce = stem
    assert [type(m) for m in wide] == [torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.ReLU]
    assert (wide[0].out_channels, wide[0].kernel_size, wide[0].bias) == (16, (1, 1), None)
    assert (reduce.in_channels, reduce.out_channels, reduce.kernel_size) == (16, 8, (1, 1))
    # the composition is no longer linear: f(-x) != -f(x) + 2 f(0)
    stem.eval()
    x = torch.randn(1, IN_CHANNELS, 2, 2)
    zero = torch.zeros_like(x)
    with torch.no_grad():
        assert not torch.allclose(stem(-x), -stem(x) + 2 * stem(zero))


def test_unknown_type_and_ocr_without_classes_are_refused():
    with pytest.raises(SegreproError, match="'nonlocal'"):
        build_encoder(EncoderConfig(type="nonlocal"), IN_CHANNELS, CHANNELS, 32)
    with pytest.raises(SegreproError, match="num_classes"):
        build_encoder(EncoderConfig(type="ocr"), IN_CHANNELS, CHANNELS, 32)


def test_self_attention_matches_a_per_pixel_loop():
    torch.manual_seed(0)
    attention = SelfAttention(6, key_channels=3)
    x = torch.randn(2, 6, 3, 4)
    with torch.no_grad():
        q, k, v = (conv(x).flatten(2) for conv in (attention.query, attention.key, attention.value))
        out = attention(x)
    expected = torch.zeros(2, 6, 12)
    for n in range(2):
        for p in range(12):
            # unscaled dot products of this pixel's query with every key, softmax over the keys
            scores = torch.tensor([float(q[n, :, p] @ k[n, :, j]) for j in range(12)])
            weights = torch.softmax(scores, dim=0)
            expected[n, :, p] = sum(weights[j] * v[n, :, j] for j in range(12))
    assert torch.allclose(out, expected.reshape(2, 6, 3, 4), atol=1e-5)


def test_query_and_key_start_equal_but_are_separate_parameters():
    for attention in (SelfAttention(6, 3), AxialAttention(8, heads=2)):
        assert torch.equal(attention.query.weight, attention.key.weight)
        assert torch.equal(attention.query.bias, attention.key.bias)
        assert attention.query.weight is not attention.key.weight


def naive_axial(attention: AxialAttention, x: torch.Tensor) -> torch.Tensor:
    """x + AA(x) by loops: per head, each pixel (i, w) first mixes the values of its column with
    softmax_j(q_iw . k_jw / sqrt d), then the results along its row with softmax_u(q_iw . k_iu / sqrt d)."""
    n_batch, channels, height, width = x.shape
    heads = attention.heads
    d = channels // heads
    q, k, v = attention.query(x), attention.key(x), attention.value(x)
    out = x.clone()
    for n in range(n_batch):
        for a in range(heads):
            sl = slice(a * d, (a + 1) * d)
            column_mixed = torch.zeros(d, height, width)
            for i in range(height):
                for w in range(width):
                    s = torch.stack([q[n, sl, i, w] @ k[n, sl, j, w] for j in range(height)]) / math.sqrt(d)
                    column_mixed[:, i, w] = (torch.softmax(s, 0)[None] * v[n, sl, :, w]).sum(1)
            for i in range(height):
                for w in range(width):
                    s = torch.stack([q[n, sl, i, w] @ k[n, sl, i, u] for u in range(width)]) / math.sqrt(d)
                    out[n, sl, i, w] += (torch.softmax(s, 0)[None] * column_mixed[:, i, :]).sum(1)
    return out


def test_axial_attention_matches_a_loop_over_columns_then_rows():
    torch.manual_seed(0)
    attention = AxialAttention(8, heads=2)
    with torch.no_grad():  # make q and k differ, as after training
        attention.key.weight.add_(0.3 * torch.randn_like(attention.key.weight))
    x = torch.randn(2, 8, 3, 4)
    out = attention(x)
    assert out.shape == x.shape
    with torch.no_grad():
        assert torch.allclose(out, naive_axial(attention, x), atol=1e-5)


def test_axial_attention_on_a_single_pixel_returns_x_plus_its_value():
    # one key along each axis: both softmaxes are 1, so AA(x) = v(x)
    torch.manual_seed(0)
    attention = AxialAttention(8)
    x = torch.randn(1, 8, 1, 1)
    assert torch.allclose(attention(x), x + attention.value(x))


def test_axial_attention_heads_must_divide_the_channels():
    with pytest.raises(SegreproError, match="heads"):
        AxialAttention(10, heads=4)
