import numpy as np
import pytest
import torch

from segrepro.engine.metrics import ConfusionMatrix

# Hand-computed case, 3 classes, last pixel ignored:
#   target = 0 0 1 1 2 2 255
#   pred   = 0 1 1 1 2 0 2
# counted (gt, pred) pairs: (0,0) (0,1) (1,1) (1,1) (2,2) (2,0)
#   matrix (rows gt) = [[1,1,0],[0,2,0],[1,0,1]]
#   tp = [1,2,1], gt = [2,2,2], pred = [2,3,1], union = gt+pred-tp = [3,3,2]
#   IoU = [33.33, 66.67, 50.0] -> mIoU 50.0
#   acc = [50, 100, 50] -> mean acc 66.67; pixel acc 4/6 = 66.67
TARGET = torch.tensor([0, 0, 1, 1, 2, 2, 255])
PRED = torch.tensor([0, 1, 1, 1, 2, 0, 2])


def test_hand_computed_case():
    cm = ConfusionMatrix(3)
    cm.update(PRED, TARGET)
    np.testing.assert_array_equal(cm.matrix, [[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    assert cm.matrix.dtype == np.int64
    s = cm.summary(["a", "b", "c"])
    assert s["per_class_iou"] == pytest.approx({"a": 100 / 3, "b": 200 / 3, "c": 50.0})
    assert s["miou"] == pytest.approx(50.0)
    assert s["pixel_acc"] == pytest.approx(400 / 6)
    assert s["per_class_acc"] == pytest.approx({"a": 50.0, "b": 100.0, "c": 50.0})
    assert s["mean_acc"] == pytest.approx(200 / 3)
    assert s["num_pixels"] == 6


def test_shape_does_not_matter():
    cm = ConfusionMatrix(3)
    cm.update(PRED[:6].reshape(2, 3), TARGET[:6].reshape(2, 3))
    np.testing.assert_array_equal(cm.matrix, [[1, 1, 0], [0, 2, 0], [1, 0, 1]])


def test_ignore_index():
    cm = ConfusionMatrix(3, ignore_index=1)
    cm.update(torch.tensor([0, 2, 2, 0]), torch.tensor([0, 1, 1, 2]))
    np.testing.assert_array_equal(cm.matrix, [[1, 0, 0], [0, 0, 0], [1, 0, 0]])
    all_ignored = ConfusionMatrix(3)
    all_ignored.update(torch.tensor([1, 2]), torch.tensor([255, 255]))
    assert all_ignored.matrix.sum() == 0
    s = all_ignored.summary()
    assert s["miou"] is None and s["pixel_acc"] is None and s["num_pixels"] == 0


def test_absent_class_is_excluded():
    cm = ConfusionMatrix(4)  # class 3 never in GT nor prediction
    cm.update(PRED, TARGET)
    s = cm.summary()
    assert s["per_class_iou"]["3"] is None
    assert s["per_class_acc"]["3"] is None
    assert s["miou"] == pytest.approx(50.0)
    assert s["mean_acc"] == pytest.approx(200 / 3)


def test_predicted_only_class_counts_as_zero():
    # Class 3 only predicted (a false positive): IoU 0 and it is part of the mean;
    # accuracy is undefined (no GT pixels).
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([0, 3]), torch.tensor([0, 0]))
    s = cm.summary()
    assert s["per_class_iou"] == {"0": 50.0, "1": None, "2": None, "3": 0.0}
    assert s["miou"] == pytest.approx(25.0)
    assert s["per_class_acc"]["3"] is None
    assert s["mean_acc"] == pytest.approx(50.0)


def test_merge_equals_single_update():
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 5, (4, 7, 9), generator=g)
    target = torch.randint(0, 6, (4, 7, 9), generator=g)
    target[target == 5] = 255
    whole = ConfusionMatrix(5)
    whole.update(pred, target)
    a, b = ConfusionMatrix(5), ConfusionMatrix(5)
    a.update(pred[:1], target[:1])
    b.update(pred[1:], target[1:])
    assert a.merge(b) is a
    np.testing.assert_array_equal(a.matrix, whole.matrix)
    assert a.summary() == whole.summary()


def test_errors():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError):
        cm.update(torch.tensor([0, 1]), torch.tensor([0]))
    with pytest.raises(ValueError):
        cm.update(torch.tensor([0]), torch.tensor([7]))
    with pytest.raises(ValueError):
        cm.update(torch.tensor([3]), torch.tensor([0]))
    with pytest.raises(ValueError):
        ConfusionMatrix(4).merge(cm)
    with pytest.raises(ValueError):
        cm.summary(["only", "two"])
