"""CAR losses (notes-hfgd.md §2) checked against numbers worked out by hand, and the CAR module."""

import math

import pytest
import torch

from segrepro.core.errors import SegreproError
from segrepro.models.hfgd.car import CARModule, car_losses, resize_labels

IGNORE = 255
EPS = 1e-7


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def two_class_example():
    """N=1, C=2, a 2x2 feature map; pixels in row-major order:
        p0 = (0, 1)  class 0      p1 = (2, -1)  class 0
        p2 = (3, 0)  class 1      p3 = (5, 5)   ignored
    Labels come at a 3x3 "image" whose corners are the 2x2 pixels' labels under the
    align-corners nearest resize; every other image pixel is ignored, so sampling any
    other position would change the numbers."""
    features = torch.tensor([[[0.0, 2.0], [3.0, 5.0]], [[1.0, -1.0], [0.0, 5.0]]])[None]  # (1, 2, 2, 2)
    labels = torch.tensor([[0, IGNORE, 0], [IGNORE, IGNORE, IGNORE], [1, IGNORE, IGNORE]])[None]
    return features, labels


# Centres: mu0 = (p0 + p1) / 2 = (1, 0); mu1 = p2 = (3, 0). The ignored p3 is in neither.
# sqrt(C) = sqrt(2); with K = 2 a two-way softmax is a sigmoid of the difference.


def test_intra_by_hand():
    # |p0 - mu0| = (1, 1), |p1 - mu0| = (1, 1), |p2 - mu1| = (0, 0), p3 masked: (0, 0).
    # mean over N*h*w*C = 8 entries = 4 / 8 = 0.5; squared = 0.25 (> the 1e-5 floor).
    features, labels = two_class_example()
    losses = car_losses(features, labels, num_classes=2, ignore_index=IGNORE)
    assert losses["car_intra"].item() == pytest.approx(0.25, rel=1e-6)


def test_c2c_by_hand():
    # mu mu^T = [[1, 3], [3, 9]]; threshold 0.5 / (K - 1) = 0.5.
    # row 0: R01 = sigmoid((3 - 1) / sqrt 2) = 0.8044 -> hinge 0.3044
    # row 1: R10 = sigmoid((3 - 9) / sqrt 2) = 0.0142 -> hinge 0 -> clipped to 1e-7
    r01 = sigmoid(2 / math.sqrt(2))
    expected = ((r01 - 0.5 + EPS) / 2) ** 2
    features, labels = two_class_example()
    losses = car_losses(features, labels, num_classes=2, ignore_index=IGNORE)
    assert losses["car_c2c"].item() == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(0.02317, abs=1e-5)


def test_c2p_by_hand():
    # threshold 0.25 / (K - 1) = 0.25; own-class energy = ||mu_y||^2: ||mu0||^2 = 1, ||mu1||^2 = 9.
    # p0 (class 0): E = (1, p0.mu1 = 0)       -> P01 = sigmoid((0 - 1) / sqrt 2) -> hinge P01 - 0.25
    # p1 (class 0): E = (1, p1.mu1 = 6)       -> P01 = sigmoid((6 - 1) / sqrt 2) -> hinge P01 - 0.25
    # p2 (class 1): E = (p2.mu0 = 3, 9)       -> P10 = sigmoid((3 - 9) / sqrt 2) = 0.014 -> 0 -> 1e-7
    # p3 (ignored, every class is "other"): E = (p3.mu0 = 5, p3.mu1 = 15)
    #     P = (sigmoid(-10 / sqrt 2), sigmoid(10 / sqrt 2)) = (0.00085, 0.99915) -> 0 + (0.99915 - 0.25)
    hinge0 = sigmoid(-1 / math.sqrt(2)) - 0.25
    hinge1 = sigmoid(5 / math.sqrt(2)) - 0.25
    hinge2 = EPS
    hinge3 = sigmoid(10 / math.sqrt(2)) - 0.25
    expected = ((hinge0 + hinge1 + hinge2 + hinge3) / 4) ** 2
    features, labels = two_class_example()
    losses = car_losses(features, labels, num_classes=2, ignore_index=IGNORE)
    assert losses["car_c2p"].item() == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(0.15037, abs=1e-4)


def test_intra_gradient_treats_the_centres_as_constants():
    # intra = (S / 8)^2 with S = sum m_i |f_ic - sg(mu)|: d intra / d f_ic = 2 (S / 8) / 8 * sign(f_ic - mu_c) m_i
    # = 0.125 * sign. p0 - mu0 = (-1, 1), p1 - mu0 = (1, -1); p2 sits on its centre (sign 0); p3 ignored.
    # Without the stop-gradient the centre would pull back and p0, p1 would get opposite-sign extras.
    features, labels = two_class_example()
    features.requires_grad_(True)
    car_losses(features, labels, num_classes=2, ignore_index=IGNORE)["car_intra"].backward()
    expected = 0.125 * torch.tensor([[[-1.0, 1.0], [0.0, 0.0]], [[1.0, -1.0], [0.0, 0.0]]])[None]
    assert torch.allclose(features.grad, expected)


def test_labels_are_resized_with_aligned_corners():
    labels = torch.arange(9 * 9).reshape(1, 9, 9)
    resized = resize_labels(labels, (3, 5))
    assert resized.tolist() == [[[0, 2, 4, 6, 8], [36, 38, 40, 42, 44], [72, 74, 76, 78, 80]]]
    assert resize_labels(labels, (1, 1)).tolist() == [[[0]]]
    assert resize_labels(labels, (9, 9)) is labels


def test_gradients_reach_the_features_and_the_output_is_float32():
    torch.manual_seed(0)
    features = torch.randn(2, 8, 5, 5, dtype=torch.float16, requires_grad=True)
    labels = torch.randint(0, 4, (2, 17, 17))
    labels[:, :3] = IGNORE
    losses = car_losses(features, labels, num_classes=4, ignore_index=IGNORE)
    assert set(losses) == {"car_intra", "car_c2c", "car_c2p"}
    assert all(v.dtype == torch.float32 and v.ndim == 0 for v in losses.values())
    sum(losses.values()).backward()
    assert torch.isfinite(features.grad).all() and features.grad.abs().sum() > 0


@pytest.mark.parametrize("case", ["single_class", "all_ignored"])
def test_no_nan_when_classes_or_all_pixels_are_absent(case):
    torch.manual_seed(0)
    features = torch.randn(1, 4, 3, 3, requires_grad=True)
    labels = torch.full((1, 9, 9), 2 if case == "single_class" else IGNORE)
    losses = car_losses(features, labels, num_classes=5, ignore_index=IGNORE)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert torch.isfinite(features.grad).all()
    if case == "all_ignored":
        # every centre is 0: intra hits its floor; every relation is uniform, 1/5 against the
        # threshold 0.5/4, so each class's hinge is 4 * (0.2 - 0.125) = 0.3 and c2c = 0.3^2.
        assert losses["car_intra"].item() == pytest.approx(1e-5)
        assert losses["car_c2c"].item() == pytest.approx(0.09, rel=1e-5)


def test_one_class_is_refused():
    with pytest.raises(SegreproError, match="num_classes=1"):
        car_losses(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), 1, IGNORE)


def test_car_module_returns_the_linear_features_and_the_activated_output():
    torch.manual_seed(0)
    module = CARModule(16)
    assert module.channels == 16 and CARModule(1024).channels == 512 and CARModule(16, 8).channels == 8
    x = torch.randn(2, 16, 4, 5)
    out, car_features = module(x)
    assert out.shape == car_features.shape == (2, 16, 4, 5)
    assert torch.allclose(car_features, module.linear(x))
    assert (out >= 0).all()
