"""The evaluation loop, shared by validation during training and ``segtrain-eval``.

``evaluate_loader`` predicts every batch with the ``eval`` settings (whole image, sliding window,
multi-scale + flip; see :mod:`segtrain.inference`), scores at the mask's own size, and fills one
confusion matrix (summed over processes under DDP).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from tqdm import tqdm

from segtrain import distributed
from segtrain.console import first_line
from segtrain.data import mask_classes
from segtrain.errors import DataError
from segtrain.inference import labels, predict
from segtrain.metrics import ConfusionMatrix
from segtrain.models import min_input_size
from segtrain.outputs import display_images
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
    """The data set's class names, else ``stored`` (a checkpoint's), else ``"0" ... "K-1"`` (one sigmoid
    logit, ``num_classes=1``: two classes, ``background`` and ``foreground`` by default)."""
    k = mask_classes(num_classes)
    for names in (getattr(dataset, "class_names", None), stored):
        if names and len(names) == k:
            return list(names)
    return ["background", "foreground"] if num_classes == 1 else [str(i) for i in range(k)]


def _batch_names(loader, b: int) -> list[str]:
    """The images of batch ``b`` of a DataLoader over a SegDataset (empty when that cannot be told)."""
    dataset, size = getattr(loader, "dataset", None), getattr(loader, "batch_size", None)
    if dataset is None or not size or not hasattr(dataset, "describe"):
        return []
    keys = list(loader.sampler)[b * size : (b + 1) * size]
    return [dataset.describe(k[1] if isinstance(k, tuple) else k) for k in keys]


def _failed(e: RuntimeError, loader, b: int, x: torch.Tensor, cfg: DictConfig) -> Exception:
    """The error of a failed validation batch, naming its image(s) and their size."""
    names = _batch_names(loader, b)
    what = (names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1} more)") if names else f"batch {b}"
    h, w = x.shape[-2:]
    need = min_input_size(cfg.model)
    if min(h, w) < need:
        return DataError(
            f"validation image {what} is {w}x{h} px, smaller than the {need} px model={cfg.model.name} needs; "
            f"remove it, or set data.val_size={need} (or larger)"
        )
    return RuntimeError(f"validation failed on {what} ({w}x{h} px): {first_line(e, 200)}")


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
    should_stop: Callable[[], bool] | None = None,
):
    """Predict every batch of ``loader`` with ``cfg.eval`` and fill a confusion matrix.

    Returns (metrics, confusion matrix, the first ``num_vis`` images (uint8 RGB for display), masks and
    predictions or None), or (None, None, None) when ``should_stop()`` became true before a batch (a stop
    signal: the caller saves and exits).  With one sigmoid logit (``data.num_classes=1``) predictions are
    ``sigmoid > eval.threshold``, the matrix has two classes and ``metrics["fg_iou"]`` is the foreground IoU.
    ``forward`` must be in eval mode; ``autocast`` is a no-argument context factory.
    ``metrics["loss"]`` is the criterion on the (possibly TTA-averaged) scores.
    A batch that fails in the network raises an error naming its image(s).
    """
    settings = eval_settings(cfg)
    num_classes = cfg.data.num_classes
    device = batch_to_device.device
    cm = ConfusionMatrix(mask_classes(num_classes), cfg.data.ignore_index, device, class_names)
    loss_sum, n_batches, n_images, vis = torch.zeros((), device=device), 0, 0, None
    for images, masks in tqdm(loader, desc="val", leave=False, dynamic_ncols=True, disable=not progress):
        if should_stop is not None and should_stop():
            return None, None, None
        x, y = batch_to_device(images, masks)
        try:
            with autocast():
                scores = predict(forward, x, num_classes, **settings)
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as e:
            raise _failed(e, loader, n_batches, x, cfg) from e
        if scores.shape[-2:] != y.shape[-2:]:  # data.val_size rescaled the image: score at the mask's size
            scores = F.interpolate(scores, size=y.shape[-2:], mode="bilinear", align_corners=False)
        if criterion is not None:  # weighted by images: the same mean whatever the batch size or DDP shards
            loss_sum += criterion(scores, y).detach() * y.shape[0]
        n_batches, n_images = n_batches + 1, n_images + y.shape[0]
        pred = labels(scores, cfg.eval.threshold)
        cm.update(pred, y)
        if vis is None and num_vis > 0:
            shown = display_images(images[:num_vis])
            if shown.shape[-2:] != masks.shape[-2:]:
                shown = F.interpolate(shown.float(), size=masks.shape[-2:], mode="bilinear").round().to(torch.uint8)
            vis = (shown, masks[:num_vis], pred[:num_vis].cpu())
    cm.all_reduce()
    count = torch.tensor(float(n_images), device=device, dtype=torch.float64)
    totals = distributed.all_reduce(torch.stack([loss_sum.double(), count]))
    m = cm.compute()
    if num_classes == 1:  # one sigmoid logit: the foreground's IoU on its own (the table keeps both rows)
        m["fg_iou"] = m["iou"][1]
    m["loss"] = float(totals[0] / totals[1].clamp(min=1)) if criterion is not None else float("nan")
    return m, cm, vis
