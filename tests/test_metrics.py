import math

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassJaccardIndex

from segtrain.metrics import ConfusionMatrix, compute_metrics, confusion_matrix


def reference(pred, target, k, ignore):
    """Independent definitions in numpy (mmseg IoUMetric semantics)."""
    p, t = pred.numpy().ravel(), target.numpy().ravel()
    keep = t != ignore
    p, t = p[keep], t[keep]
    iou, acc, dice = [], [], []
    for c in range(k):
        inter = np.sum((p == c) & (t == c))
        union = np.sum((p == c) | (t == c))
        iou.append(inter / union if union else np.nan)
        acc.append(inter / np.sum(t == c) if np.sum(t == c) else np.nan)
        denom = np.sum(p == c) + np.sum(t == c)
        dice.append(2 * inter / denom if denom else np.nan)
    return np.array(iou), np.array(acc), np.array(dice), np.mean(p == t)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_torchmetrics_and_reference(seed):
    g = torch.Generator().manual_seed(seed)
    k, ignore = 6, 255
    target = torch.randint(0, k - 1, (4, 33, 47), generator=g)  # class k-1 never in the target
    target[:, :5] = ignore  # ignored rows
    pred = torch.randint(0, k - 2, (4, 33, 47), generator=g)  # classes k-2, k-1 never predicted
    cm = ConfusionMatrix(k, ignore)
    cm.update(pred[:2], target[:2])
    cm.update(pred[2:], target[2:])  # accumulation over batches == one big batch
    m = cm.compute()

    tm = MulticlassJaccardIndex(num_classes=k, average=None, ignore_index=ignore)(pred, target)
    present = [c for c in range(k) if ((target == c).any() or (pred == c).any())]
    assert present == [0, 1, 2, 3, 4]  # class 5 is absent from both -> excluded from the mean
    np.testing.assert_allclose([m["iou"][c] for c in present], tm[present].numpy(), rtol=1e-6)
    assert math.isnan(m["iou"][5]) and m["per_class_iou"]["5"] is None

    iou, acc, dice, aacc = reference(pred, target, k, ignore)
    np.testing.assert_allclose(m["iou"], iou, rtol=1e-9, equal_nan=True)
    np.testing.assert_allclose(m["acc"], acc, rtol=1e-9, equal_nan=True)
    np.testing.assert_allclose(m["dice"], dice, rtol=1e-9, equal_nan=True)
    assert m["miou"] == pytest.approx(np.nanmean(iou))
    assert m["macc"] == pytest.approx(np.nanmean(acc))
    assert m["mdice"] == pytest.approx(np.nanmean(dice))
    assert m["aacc"] == pytest.approx(aacc)


def test_perfect_and_disjoint_predictions():
    t = torch.tensor([[0, 0, 1, 1, 255]])
    m = compute_metrics(confusion_matrix(t.clone().masked_fill(t == 255, 0), t, 3, 255))
    assert m["miou"] == 1.0 and m["aacc"] == 1.0  # class 2 absent everywhere -> not counted
    m = compute_metrics(confusion_matrix(torch.tensor([[1, 1, 0, 0, 2]]), t, 3, 255))
    assert m["miou"] == 0.0 and m["aacc"] == 0.0


def test_ignore_pixels_do_not_count_even_when_predicted():
    t = torch.full((1, 4, 4), 255)
    t[0, 0, 0] = 1
    p = torch.full((1, 4, 4), 2)
    p[0, 0, 0] = 1
    m = compute_metrics(confusion_matrix(p, t, 3, 255))
    assert m["miou"] == 1.0  # class 2 predicted only on ignored pixels: absent


def test_class_names_in_per_class_iou():
    cm = ConfusionMatrix(2, 255, class_names=["bg", "fg"])
    cm.update(torch.tensor([[0, 1]]), torch.tensor([[0, 0]]))
    m = cm.compute()
    assert m["per_class_iou"] == {"bg": 0.5, "fg": 0.0}
