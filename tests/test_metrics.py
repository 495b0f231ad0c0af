import math

import numpy as np
import pytest

from lowlabel.eval.metrics import ConfusionMatrix


def test_hand_computed_iou_with_ignore_and_absent_class():
    gt = np.array([[0, 0, 1, 1], [0, 255, 1, 2]])
    pred = np.array([[0, 1, 1, 1], [0, 3, 2, 2]])
    cm = ConfusionMatrix(4).update(pred, gt)
    # class 0: TP 2, FN 1 (pred 1), FP 0 -> 2/3 ; class 1: TP 2, FP 1, FN 1 -> 2/4
    # class 2: TP 1, FP 1 -> 1/2 ; class 3: never in gt, predicted only on an ignored pixel -> absent
    iou = cm.iou()
    assert iou[0] == pytest.approx(2 / 3) and iou[1] == pytest.approx(0.5) and iou[2] == pytest.approx(0.5)
    assert math.isnan(iou[3])
    assert cm.miou() == pytest.approx((2 / 3 + 0.5 + 0.5) / 3)
    assert cm.pixel_accuracy() == pytest.approx(5 / 7)
    s = cm.summary(["a", "b", "c", "d"])
    assert s["per_class_iou"]["d"] is None and s["pixels"] == 7


def test_predicted_but_absent_class_counts_as_zero():
    cm = ConfusionMatrix(2).update(np.array([1, 1]), np.array([0, 0]))
    assert cm.iou()[0] == 0 and cm.iou()[1] == 0 and cm.miou() == 0


def test_bad_ids_rejected():
    with pytest.raises(ValueError):
        ConfusionMatrix(2).update(np.array([0]), np.array([5]))
