"""Confusion-matrix segmentation metrics.

The public API::

    from segtrain.metrics import ConfusionMatrix, compute_metrics

    cm = ConfusionMatrix(num_classes=21, ignore_index=255, device="cuda")
    for logits, target in batches:
        cm.update(logits.argmax(1), target)   # accumulates on the device
    m = cm.compute()                          # dict, see compute_metrics
    m["miou"], m["per_class_iou"]

Definitions (the same as mmsegmentation's ``IoUMetric``), with ``C`` the
``K x K`` confusion matrix summed over the whole data set (rows: ground truth,
columns: prediction; pixels equal to ``ignore_index`` are excluded):

* ``IoU_k  = C_kk / (sum_j C_kj + sum_i C_ik - C_kk)``, NaN when class k is in
  neither the target nor the prediction;
* ``mIoU  = nanmean_k IoU_k`` (the mean over classes that appear in the target
  or the prediction);
* ``Acc_k = C_kk / sum_j C_kj`` (NaN when k is absent from the target), ``mAcc``
  its nanmean; ``aAcc = trace(C) / sum(C)``;
* ``Dice_k = 2 C_kk / (sum_j C_kj + sum_i C_ik)``, ``mDice`` its nanmean.

All values are fractions in [0, 1].
"""

from __future__ import annotations

import math

import torch

from segtrain.distributed import all_reduce

__all__ = ["ConfusionMatrix", "compute_metrics", "confusion_matrix"]


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = 255
) -> torch.Tensor:
    """``K x K`` int64 confusion matrix (rows: target, columns: prediction) of one batch.

    Pixels whose target is ``ignore_index`` or outside ``[0, K)`` are excluded.
    """
    pred = pred.reshape(-1)
    target = target.reshape(-1)
    keep = (target >= 0) & (target < num_classes)
    if ignore_index is not None:
        keep &= target != ignore_index
    idx = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def compute_metrics(cm: torch.Tensor, class_names: list[str] | None = None) -> dict:
    """Metrics from a confusion matrix; see the module docstring for definitions.

    Returns ``miou, aacc, macc, mdice`` (floats) and ``iou, acc, dice`` (lists
    of per-class floats, NaN for absent classes), plus ``per_class_iou``: a
    dict class name -> IoU (None for absent classes, so it is valid JSON).
    """
    cm = cm.double().cpu()
    tp = cm.diag()
    gt = cm.sum(1)
    pr = cm.sum(0)
    union = gt + pr - tp
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), nan)
    dice = torch.where(gt + pr > 0, 2 * tp / (gt + pr).clamp(min=1), nan)
    total = cm.sum()

    def nanmean(t: torch.Tensor) -> float:
        return float(t.nanmean()) if (~t.isnan()).any() else float("nan")

    names = class_names or [str(i) for i in range(cm.shape[0])]
    return {
        "miou": nanmean(iou),
        "aacc": float(tp.sum() / total) if total > 0 else float("nan"),
        "macc": nanmean(acc),
        "mdice": nanmean(dice),
        "iou": iou.tolist(),
        "acc": acc.tolist(),
        "dice": dice.tolist(),
        "per_class_iou": {n: (None if math.isnan(v) else v) for n, v in zip(names, iou.tolist())},
    }


class ConfusionMatrix:
    """A data-set-level confusion matrix accumulated on ``device``."""

    def __init__(
        self,
        num_classes: int,
        ignore_index: int | None = 255,
        device: torch.device | str = "cpu",
        class_names: list[str] | None = None,
    ):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = class_names
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.mat.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``pred`` are class ids (``[N, H, W]``), not logits."""
        self.mat += confusion_matrix(
            pred.to(self.mat.device), target.to(self.mat.device), self.num_classes, self.ignore_index
        )

    def all_reduce(self) -> None:
        """Sum the matrix over processes (DDP); a no-op without torch.distributed."""

        all_reduce(self.mat)

    def compute(self) -> dict:
        return compute_metrics(self.mat, self.class_names)
