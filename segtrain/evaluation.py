"""The evaluation loop, shared by validation during training and ``segtrain-eval``.

``evaluate_loader`` predicts every batch with the ``eval`` settings (whole image, sliding window,
multi-scale + flip; see :mod:`segtrain.inference`), scores at the mask's own size, and fills one
confusion matrix (summed over processes under DDP).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from tqdm import tqdm

from segtrain import distributed
from segtrain.inference import predict
from segtrain.metrics import ConfusionMatrix
from segtrain.utils import as_hw


def eval_settings(cfg: DictConfig) -> dict[str, Any]:
    """``cfg.eval`` as keyword arguments of :func:`segtrain.inference.predict`."""
    e = cfg.eval
    crop = stride = None
    if e.mode == "slide":
        crop = as_hw(e.crop_size if e.crop_size is not None else cfg.data.crop_size, "eval.crop_size")
        stride = as_hw(e.stride, "eval.stride") if e.stride is not None else None
    return {"mode": e.mode, "crop_size": crop, "stride": stride, "scales": [float(v) for v in e.scales], "flip": e.flip}


def class_names(dataset: Any, num_classes: int, stored: list[str] | None = None) -> list[str]:
    """The data set's class names, else ``stored`` (a checkpoint's), else ``"0" ... "K-1"``."""
    names = list(getattr(dataset, "class_names", None) or stored or [])
    return names if len(names) == num_classes else [str(i) for i in range(num_classes)]


@torch.no_grad()
def evaluate_loader(
    forward,
    loader,
    batch_to_device,
    autocast,
    cfg: DictConfig,
    class_names: list[str],
    criterion: nn.Module | None = None,
    progress: bool = False,
    num_vis: int = 0,
):
    """Predict every batch of ``loader`` with ``cfg.eval`` and fill a confusion matrix.

    Returns (metrics, confusion matrix, the first ``num_vis`` images, masks and predictions or None).
    ``forward`` must be in eval mode; ``autocast`` is a no-argument context factory.
    ``metrics["loss"]`` is the criterion on the (possibly TTA-averaged) scores.
    """
    settings = eval_settings(cfg)
    num_classes = cfg.data.num_classes
    device = batch_to_device.device
    cm = ConfusionMatrix(num_classes, cfg.data.ignore_index, device, class_names)
    loss_sum, n_batches, vis = torch.zeros((), device=device), 0, None
    for images, masks in tqdm(loader, desc="val", leave=False, dynamic_ncols=True, disable=not progress):
        x, y = batch_to_device(images, masks)
        with autocast():
            scores = predict(forward, x, num_classes, **settings)
        if scores.shape[-2:] != y.shape[-2:]:  # data.val_size rescaled the image: score at the mask's size
            scores = F.interpolate(scores, size=y.shape[-2:], mode="bilinear", align_corners=False)
        if criterion is not None:
            loss_sum += criterion(scores, y).detach()
        n_batches += 1
        pred = scores.argmax(1)
        cm.update(pred, y)
        if vis is None and num_vis > 0 and images.dtype == torch.uint8:
            shown = images[:num_vis]
            if shown.shape[-2:] != masks.shape[-2:]:
                shown = F.interpolate(shown.float(), size=masks.shape[-2:], mode="bilinear").round().to(torch.uint8)
            vis = (shown, masks[:num_vis], pred[:num_vis].cpu())
    cm.all_reduce()
    count = torch.tensor(float(n_batches), device=device, dtype=torch.float64)
    totals = distributed.all_reduce(torch.stack([loss_sum.double(), count]))
    m = cm.compute()
    m["loss"] = float(totals[0] / totals[1].clamp(min=1)) if criterion is not None else float("nan")
    return m, cm, vis
