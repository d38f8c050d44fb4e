"""Full-image prediction: whole, sliding window, and test-time augmentation.

Three ways to turn a network into per-pixel scores for an image of any size:

* ``whole``: one forward pass over the full image (networks here accept any
  size and return logits at the input resolution).
* ``slide``: overlapping ``crop_size`` windows every ``stride`` pixels, as
  mmsegmentation's ``slide_inference``: ``ceil((H - crop) / stride) + 1`` rows
  (at least one), the last window of a row/column shifted back to end at the
  border, and windows never padded (a crop larger than the image is clipped to
  it, so a crop covering the image is exactly ``whole``). The **logits** of
  the windows are summed and divided by the number of windows covering each
  pixel. ``stride=None`` means ``ceil(2/3 * crop)`` per dimension.
* test-time augmentation (``scales`` and/or ``flip``): the input is resized
  bilinearly to ``round(H * s), round(W * s)`` for every scale (and also
  mirrored horizontally when ``flip``), each view is predicted with ``whole``
  or ``slide`` (same crop and stride, in the resized image's pixels), its
  logits are resized back to ``H, W`` (and un-mirrored), and the softmax
  **probabilities** of the views are averaged. Their log is returned so the
  result is still usable as logits (argmax, cross-entropy).  With one output
  channel (``data.num_classes=1``, a sigmoid logit) the sigmoid probabilities
  are averaged and their logit is returned.  Both are computed in log space
  (``logaddexp`` of log-probabilities), so saturated views stay finite.

:func:`labels` turns scores into a label map: the argmax over classes, or for
one sigmoid logit ``sigmoid(score) > threshold`` (1 foreground, 0 background).

A single view (``scales=[1.0]``, no flip) returns that view's raw logits:
single-view ``whole`` is exactly the model's output (cast to float32).

The caller handles ``torch.no_grad()``/autocast and ``model.eval()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from segtrain.utils import as_hw

MODES = ("whole", "slide")


def default_stride(crop: tuple[int, int]) -> tuple[int, int]:
    """ceil(2/3 of the crop) per dimension: every pixel seen by one or two windows."""
    return math.ceil(2 * crop[0] / 3), math.ceil(2 * crop[1] / 3)


def slide_windows(
    height: int, width: int, crop: tuple[int, int], stride: tuple[int, int]
) -> list[tuple[int, int, int, int]]:
    """The (y1, y2, x1, x2) windows of ``slide`` mode for an image of ``height`` x ``width``."""
    (ch, cw), (sh, sw) = crop, stride
    h_grids = max(height - ch + sh - 1, 0) // sh + 1
    w_grids = max(width - cw + sw - 1, 0) // sw + 1
    windows = []
    for i in range(h_grids):
        y2 = min(i * sh + ch, height)
        y1 = max(y2 - ch, 0)
        for j in range(w_grids):
            x2 = min(j * sw + cw, width)
            x1 = max(x2 - cw, 0)
            windows.append((y1, y2, x1, x2))
    return windows


def _logits(model: Callable, images: torch.Tensor) -> torch.Tensor:
    out = model(images)
    if isinstance(out, dict):
        out = out["out"]
    return out.float()


def _whole(model: Callable, images: torch.Tensor, num_classes: int) -> torch.Tensor:
    logits = _logits(model, images)
    if logits.dim() != 4 or logits.shape[1] != num_classes or logits.shape[-2:] != images.shape[-2:]:
        raise ValueError(
            f"model returned logits of shape {tuple(logits.shape)}, expected "
            f"[{images.shape[0]}, {num_classes}, {images.shape[-2]}, {images.shape[-1]}]"
        )
    return logits


def _slide(
    model: Callable, images: torch.Tensor, num_classes: int, crop: tuple[int, int], stride: tuple[int, int]
) -> torch.Tensor:
    n, _, height, width = images.shape
    windows = slide_windows(height, width, crop, stride)
    if len(windows) == 1:  # the crop covers the image: exactly whole mode
        return _whole(model, images, num_classes)
    total = images.new_zeros((n, num_classes, height, width), dtype=torch.float32)
    count = images.new_zeros((1, 1, height, width), dtype=torch.float32)
    for y1, y2, x1, x2 in windows:  # each window is one batch of all N images
        total[:, :, y1:y2, x1:x2] += _whole(model, images[:, :, y1:y2, x1:x2], num_classes)
        count[:, :, y1:y2, x1:x2] += 1
    return total / count  # every pixel covered: stride <= crop (_crop_and_stride)


def _check_args(mode: str, images: torch.Tensor, num_classes: int, scales: Sequence[float]) -> None:
    if mode not in MODES:
        raise ValueError(f"inference mode must be one of {', '.join(MODES)}, got {mode!r}")
    if images.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not scales:
        raise ValueError("scales must list at least one scale")
    for s in scales:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
            raise ValueError(f"scales must be positive numbers, got {s!r}")


def _crop_and_stride(crop_size: Any, stride: Any) -> tuple[tuple[int, int], tuple[int, int]]:
    if crop_size is None:
        raise ValueError("slide inference needs crop_size (an int or (h, w))")
    crop = as_hw(crop_size, "crop_size")
    stride_hw = default_stride(crop) if stride is None else as_hw(stride, "stride")
    if stride_hw[0] > crop[0] or stride_hw[1] > crop[1]:
        raise ValueError(f"stride {stride_hw} must not exceed crop_size {crop} (pixels would be skipped)")
    return crop, stride_hw


def predict(
    model: Callable,
    images: torch.Tensor,
    num_classes: int,
    mode: str = "whole",
    crop_size: Any = None,
    stride: Any = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
) -> torch.Tensor:
    """Float32 scores [N, K, H, W] for normalised ``images`` [N, C, H, W].

    ``model`` returns logits [N, K, h, w] at its input size (or a dict with
    ``"out"``). ``mode``: ``"whole"`` or ``"slide"`` (needs ``crop_size``; an
    int or (h, w); ``stride`` likewise, None = ceil(2/3 of the crop)).
    One view (``scales == [1.0]``, ``flip=False``): that view's logits; several
    views: log of the mean of their softmax probabilities (clamped at 1e-8),
    or for ``K == 1`` the logit of the mean of their sigmoid probabilities.
    """
    scales = [scales] if isinstance(scales, (int, float)) else list(scales)
    _check_args(mode, images, num_classes, scales)
    crop = stride_hw = None
    if mode == "slide":
        crop, stride_hw = _crop_and_stride(crop_size, stride)
    height, width = images.shape[-2:]

    def view(x: torch.Tensor) -> torch.Tensor:
        if mode == "slide":
            return _slide(model, x, num_classes, crop, stride_hw)
        return _whole(model, x, num_classes)

    def scaled(x: torch.Tensor, s: float) -> torch.Tensor:
        size = (max(1, round(height * s)), max(1, round(width * s)))
        if size == (height, width):
            return view(x)
        logits = view(F.interpolate(x, size=size, mode="bilinear", align_corners=False))
        return F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)

    flips = (False, True) if flip else (False,)
    if len(scales) * len(flips) == 1:
        return scaled(images, float(scales[0]))

    acc = None  # log of the summed probabilities: (log p) for softmax, (log p, log(1 - p)) for one sigmoid logit
    for s in scales:
        for mirrored in flips:
            logits = scaled(images.flip(-1), float(s)).flip(-1) if mirrored else scaled(images, float(s))
            logits = logits.float()
            logp = (F.logsigmoid(logits), F.logsigmoid(-logits)) if num_classes == 1 else (logits.log_softmax(1),)
            acc = logp if acc is None else tuple(torch.logaddexp(a, b) for a, b in zip(acc, logp))
    if num_classes == 1:
        return acc[0] - acc[1]  # logit of the mean sigmoid
    return acc[0] - math.log(len(scales) * len(flips))  # log of the mean softmax


def labels(scores: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """[N, H, W] int64 labels from scores [N, K, H, W]: the argmax, or for one sigmoid logit (K = 1)
    1 where ``sigmoid(score) > threshold`` and 0 elsewhere."""
    if scores.shape[1] == 1:
        return (scores[:, 0] > math.log(threshold / (1 - threshold))).long()
    return scores.argmax(1)
