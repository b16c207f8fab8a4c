import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segrepro.core.errors import SegreproError
from segrepro.engine.inference import (
    evaluate,
    odd_keeping_size,
    predict_probs,
    scaled_size,
    sliding_window_logits,
    tile_starts,
)


def integer_conv(num_classes=4, seed=0):
    """A pointwise (1x1) model with integer weights: on integer-valued images every sum is
    exact in float32, so averaging overlapping tiles must reproduce the whole-image logits
    bit for bit."""
    g = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(3, num_classes, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.randint(-3, 4, conv.weight.shape, generator=g).float())
        conv.bias.copy_(torch.randint(-3, 4, conv.bias.shape, generator=g).float())
    return conv.eval()


def integer_image(h, w, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-5, 6, (1, 3, h, w), generator=g).float()


class CountingForward:
    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x):
        self.calls.append(tuple(x.shape[-2:]))
        return self.fn(x)


@pytest.mark.parametrize("size", [(13, 21), (5, 30), (30, 5), (8, 9), (24, 24)])
def test_sliding_equals_whole_for_pointwise_model(size):
    model = integer_conv()
    image = integer_image(*size)
    with torch.no_grad():
        whole = model(image)
        slid = sliding_window_logits(model, image, 4, crop_size=8)
    assert slid.shape == whole.shape
    assert torch.equal(slid, whole)


def test_fits_in_crop_is_one_whole_forward():
    fwd = CountingForward(integer_conv())
    with torch.no_grad():
        sliding_window_logits(fwd, integer_image(7, 8), 4, crop_size=8)
    assert fwd.calls == [(7, 8)]  # no padding either


def test_tile_grid_and_border_coverage():
    # 20x20, crop 8, default stride ceil(16/3) = 6 -> starts 0, 6, 12 per axis.
    assert tile_starts(20, 8, 6) == [0, 6, 12]
    fwd = CountingForward(lambda x: torch.zeros(x.shape[0], 2, *x.shape[-2:]))
    sliding_window_logits(fwd, torch.zeros(1, 3, 20, 20), 2, crop_size=8)
    assert fwd.calls == [(8, 8)] * 9
    # Last tile ends exactly at the border, steps never exceed the stride.
    for size in range(8, 60):
        for stride in (1, 3, 6, 8):
            starts = tile_starts(size, 8, stride)
            assert starts[0] == 0 and starts[-1] == size - 8
            assert all(0 < b - a <= stride for a, b in zip(starts, starts[1:]))
    with pytest.raises(ValueError):
        tile_starts(5, 8, 6)


def test_sliding_covers_every_pixel_with_non_square_crop():
    # A model returning the input: any uncovered or mis-placed pixel would show up
    # (uncovered ones as NaN from the 0/0 average).
    image = integer_image(11, 29)
    out = sliding_window_logits(lambda x: x, image, 3, crop_size=(6, 10), stride=(4, 7))
    assert torch.equal(out, image)


def test_bad_model_output_is_reported():
    with pytest.raises(ValueError, match="shape"):
        sliding_window_logits(lambda x: x[:, :, ::2, ::2], torch.zeros(1, 3, 9, 9), 3, 4)


def test_single_scale_no_flip_is_plain_softmax():
    model = integer_conv()
    image = torch.randn(1, 3, 10, 14)
    with torch.no_grad():
        expected = torch.softmax(model(image), dim=1)[0]
        big = predict_probs(model, image, 4, scales=[1.0], flip=False, crop_size=64)
        small = predict_probs(model, image, 4, scales=[1.0], flip=False, crop_size=6)
    assert torch.equal(big, expected)
    torch.testing.assert_close(small, expected)


def ramp_forward(x):
    """Position-dependent logits, blind to the input: class 0 grows to the right."""
    n, _, h, w = x.shape
    ramp = torch.linspace(-2, 2, w).expand(n, 1, h, w)
    return torch.cat([ramp, torch.zeros_like(ramp)], dim=1)


def test_flip_is_mapped_back():
    image = torch.randn(1, 3, 4, 9)
    plain = predict_probs(ramp_forward, image, 2, scales=[1.0], flip=False, crop_size=16)
    flipped = predict_probs(ramp_forward, image, 2, scales=[1.0], flip=True, crop_size=16)
    # Without flip the class-0 probability increases left to right ...
    assert torch.all(plain[0, :, 1:] > plain[0, :, :-1])
    # ... the mirrored pass, mapped back, is its mirror image, so the average is symmetric.
    torch.testing.assert_close(flipped, (plain + plain.flip(-1)) / 2)
    torch.testing.assert_close(flipped, flipped.flip(-1))


def test_flip_leaves_flip_equivariant_model_unchanged():
    model = integer_conv()
    image = torch.randn(1, 3, 6, 11)  # asymmetric input
    with torch.no_grad():
        a = predict_probs(model, image, 4, scales=[1.0], flip=False, crop_size=32)
        b = predict_probs(model, image, 4, scales=[1.0], flip=True, crop_size=32)
    torch.testing.assert_close(a, b)


def test_multi_scale_probabilities():
    model = integer_conv()
    image = torch.randn(1, 3, 15, 22)
    with torch.no_grad():
        probs = predict_probs(
            model, image, 4, scales=[0.5, 0.75, 1.0, 1.5], flip=True, crop_size=12
        )
    assert probs.shape == (4, 15, 22)
    assert probs.dtype == torch.float32
    assert torch.all(probs >= 0)
    torch.testing.assert_close(probs.sum(0), torch.ones(15, 22))


def test_multi_scale_resizes_input():
    fwd = CountingForward(integer_conv())
    with torch.no_grad():
        predict_probs(fwd, torch.randn(1, 3, 10, 20), 4, scales=[0.5, 2.0], crop_size=64)
    assert fwd.calls == [(5, 10), (20, 40)]


def test_scaled_size():
    assert scaled_size(10, 20, 0.75) == (8, 15)  # 7.5 rounds up
    assert scaled_size(100, 200, 0.5, base_size=512) == (128, 256)
    assert scaled_size(1024, 2048, 1.0, base_size=2048) == (1024, 2048)
    assert scaled_size(300, 200, 1.25, base_size=400) == (500, 333)


def oracle_forward(x):
    """Predicts the class id written into channel 0 of the image."""
    cls = x[:, 0].round().long().clamp(0, 2)
    return F.one_hot(cls, 3).permute(0, 3, 1, 2).float() * 10


class TinyDataset:
    def __init__(self):
        self.items = [
            (
                torch.tensor([[0, 1, 2], [2, 2, 1]]),  # predicted classes
                torch.tensor([[0, 1, 1], [2, 255, 1]]),  # labels
            ),
            (
                torch.tensor([[0, 0], [1, 1], [2, 0]]),
                torch.tensor([[0, 1], [1, 1], [255, 2]]),
            ),
        ]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        pred, label = self.items[i]
        image = pred.float().expand(3, *pred.shape).clone()
        return image, label, f"img{i}"


@pytest.mark.parametrize("protocol", [{"scales": [1.0], "flip": False},
                                      {"scales": [1.0], "flip": True, "name": "ss+f"}])
def test_evaluate_tiny_dataset(protocol):
    cm = evaluate(
        oracle_forward, TinyDataset(), protocol, "cpu", num_classes=3, crop_size=2, progress=False
    )
    # image 0 pairs (gt, pred): (0,0) (1,1) (1,2) (2,2) (1,1)
    # image 1 pairs:            (0,0) (1,0) (1,1) (1,1) (2,0)
    np.testing.assert_array_equal(cm.matrix, [[2, 0, 0], [1, 4, 1], [1, 0, 1]])


def test_evaluate_sets_eval_mode_and_accepts_iterables():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3)).train()
    data = iter([(torch.randn(3, 5, 6), torch.zeros(5, 6, dtype=torch.long), "x")])
    cm = evaluate(model, data, {"scales": [1.0]}, "cpu", 3, crop_size=4, progress=True)
    assert not model.training
    assert cm.matrix.sum() == 30


def test_evaluate_rejects_protocol_without_scales():
    with pytest.raises(SegreproError):
        evaluate(oracle_forward, TinyDataset(), {"flip": True}, "cpu", 3, crop_size=4)


# ----------------------------------------------------------------------------- small images: padding

class RecordingForward:
    """Logits of 2 classes, class 0 = the window's row index, class 1 = 0; records every input."""

    def __init__(self):
        self.inputs = []

    def __call__(self, x):
        self.inputs.append(x.clone())
        rows = torch.arange(x.shape[-2], dtype=torch.float32).view(1, 1, -1, 1).expand(x.shape[0], 1, -1, x.shape[-1])
        return torch.cat([rows, torch.zeros_like(rows)], dim=1)


def test_pad_to_crop_feeds_the_crop_and_cuts_back():
    """semseg tool/test.py scale_process: a 10x14 image under a 16 crop is padded centrally with
    the mean (0 once normalised): 3 rows above, 1 column left; the model sees 16x16 and the
    logits come back at 10x14, shifted by the padding."""
    image = torch.randn(1, 3, 10, 14)
    forward = RecordingForward()
    logits = sliding_window_logits(forward, image, 2, crop_size=16, pad_to_crop=True)
    assert [tuple(x.shape[-2:]) for x in forward.inputs] == [(16, 16)]
    seen = forward.inputs[0]
    assert torch.equal(seen[:, :, 3:13, 1:15], image)
    assert seen[:, :, :3].abs().sum() == 0 and seen[:, :, 13:].abs().sum() == 0 and seen[..., 0].abs().sum() == 0
    assert logits.shape == (1, 2, 10, 14)
    assert torch.equal(logits[0, 0, :, 0], torch.arange(3, 13, dtype=torch.float32))
    # The old way (pad none): the image at its own size.
    forward = RecordingForward()
    sliding_window_logits(forward, image, 2, crop_size=16)
    assert [tuple(x.shape[-2:]) for x in forward.inputs] == [(10, 14)]


@pytest.mark.parametrize("pad, seen", [("none", [(10, 10), (16, 16)]), ("each_scale", [(16, 16)])])
def test_each_scale_padding_in_multi_scale_testing(pad, seen):
    """Scale 0.5 of a 20x20 image is 10x10: padded up to the 16 crop with each_scale; scale 1.0
    is tiled either way (16x16 windows over the image, padded along no side)."""
    forward = RecordingForward()
    probs = predict_probs(forward, torch.randn(1, 3, 20, 20), 2, scales=[0.5, 1.0], crop_size=(16, 16), pad=pad)
    assert probs.shape == (2, 20, 20)
    assert sorted({tuple(x.shape[-2:]) for x in forward.inputs}) == seen


def test_before_scaling_pads_once_at_the_bottom_right():
    """iSeg (HFGD): the 10x14 image is padded at its bottom and right to the 16 window, then
    each test scale resizes that: 16x16 at 1.0, 8x8 at 0.5 (not padded again)."""
    image = torch.randn(1, 3, 10, 14)
    forward = RecordingForward()
    probs = predict_probs(forward, image, 2, scales=[1.0, 0.5], crop_size=16, pad="before_scaling")
    assert [tuple(x.shape[-2:]) for x in forward.inputs] == [(16, 16), (8, 8)]
    full = forward.inputs[0]
    assert torch.equal(full[:, :, :10, :14], image)
    assert full[:, :, 10:].abs().sum() == 0 and full[:, :, :, 14:].abs().sum() == 0
    assert probs.shape == (2, 10, 14)
    # Scale 1.0 alone: class 0's logit is the row index from the image's top (padding below).
    forward = RecordingForward()
    alone = predict_probs(forward, image, 2, scales=[1.0], crop_size=16, pad="before_scaling")
    torch.testing.assert_close(alone[0, :, 0], torch.sigmoid(torch.arange(10, dtype=torch.float32)))


def test_iseg_test_sizes_keep_odd_sides_odd():
    # iSeg utils/common.py get_scaled_size(pad_mode=1): floor, then +1 where an odd side turned even.
    assert [odd_keeping_size(513, 512, f) for f in (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)] == [
        (257, 256), (385, 384), (513, 512), (641, 640), (769, 768), (897, 896)]


def test_unknown_pad_is_refused():
    with pytest.raises(SegreproError, match="pad"):
        evaluate(oracle_forward, TinyDataset(), {"scales": [1.0], "pad": "mirror"}, "cpu", 3, crop_size=4)
    with pytest.raises(ValueError, match="pad"):
        predict_probs(oracle_forward, torch.zeros(1, 3, 4, 4), 3, pad="mirror", crop_size=4)


def test_evaluate_passes_the_protocols_pad():
    forward = RecordingForward()
    data = [(torch.randn(3, 5, 6), torch.zeros(5, 6, dtype=torch.long), "x")]
    evaluate(forward, data, {"scales": [1.0], "flip": False, "pad": "each_scale"}, "cpu", 2, crop_size=9,
             progress=False)
    assert [tuple(x.shape[-2:]) for x in forward.inputs] == [(9, 9)]

