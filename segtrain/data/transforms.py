"""Albumentations pipelines, and the scale rule shared by validation, ``segtrain-eval`` and prediction.

Pipelines keep the image's type (uint8, uint16 or float32) and its bands; normalisation by
``data.mean``/``data.std`` happens on the device (``segtrain.runtime.BatchToDevice``).  The geometric
operations (rescale, crop, pad, flip) work on any number of bands and any of these types; the photometric
distortion (``ColorJitter``) only on 3-band 8-bit images.

:func:`val_scale` is the one rule for the scale at which a whole image is predicted: ``data.val_size`` when
set, else ``data.base_size`` (the scale training rescales to before its jitter), else the image's own size.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import albumentations as A
import cv2
import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig

from segtrain.errors import ConfigError
from segtrain.utils import as_hw, as_size

log = logging.getLogger("segtrain")


def synthetic_train(cfg: DictConfig) -> A.Compose:
    ops: list = [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    if cfg.crop_size is not None:
        h, w = as_hw(cfg.crop_size, "data.crop_size")
        ops.append(A.PadIfNeeded(h, w, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=cfg.ignore_index))
        ops.append(A.RandomCrop(h, w))
    return A.Compose(ops if cfg.augment else ops[2:])


# ---------------------------------------------------------------------------
# On-disk data sets: the standard recipe (mmseg-style) and custom pipelines.


def scale_factor(h: float, w: float, size: Any, ratio: float = 1.0) -> float:
    """The keep-ratio factor that takes an ``h x w`` image to ``size`` times ``ratio``: None keeps its own size;
    an int sets the short side; [h, w] fits the image into (long, short) = (max, min) of that box, as mmseg's
    ``Resize(keep_ratio=True)``.  The one rule of training's rescale, validation's, prediction's and the scale
    report's."""
    if size is None:
        return ratio
    if isinstance(size, int):
        return size * ratio / min(h, w)
    return min(max(size) * ratio / max(h, w), min(size) * ratio / min(h, w))


def rescaled_size(h: int, w: int, size: Any, ratio: float = 1.0) -> tuple[int, int]:
    """(h, w) of an ``h x w`` image after the keep-ratio rescale of :func:`scale_factor` (rounded, at least 1)."""
    scale = scale_factor(h, w, size, ratio)
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


class RescaleKeepRatio(A.DualTransform):
    """Resize keeping the aspect ratio to ``size`` (None: the image's own size) times a ratio drawn from ``ratio_range``."""

    def __init__(
        self, size: Any, ratio_range: tuple[float, float] = (1.0, 1.0), resize_mask: bool = True, p: float = 1.0
    ):
        super().__init__(p=p)
        self.size = size if size is None or isinstance(size, int) else tuple(int(v) for v in size)
        self.ratio_range = (float(ratio_range[0]), float(ratio_range[1]))
        self.resize_mask = resize_mask  # False: evaluation scores at the mask's original size

    def get_params_dependent_on_data(self, params: dict, data: dict) -> dict:
        h, w = params["shape"][:2]
        lo, hi = self.ratio_range
        ratio = self.py_random.uniform(lo, hi) if hi > lo else lo
        return {"out_hw": rescaled_size(h, w, self.size, ratio)}

    def apply(self, img: np.ndarray, out_hw: tuple[int, int] = (1, 1), **params: Any) -> np.ndarray:
        if img.shape[:2] == out_hw:
            return img
        return cv2.resize(img, (out_hw[1], out_hw[0]), interpolation=cv2.INTER_LINEAR)

    def apply_to_mask(self, mask: np.ndarray, out_hw: tuple[int, int] = (1, 1), **params: Any) -> np.ndarray:
        if mask.shape[:2] == out_hw or not self.resize_mask:
            return mask
        return cv2.resize(mask, (out_hw[1], out_hw[0]), interpolation=cv2.INTER_NEAREST)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("size", "ratio_range", "resize_mask")


class CatMaxRatioCrop(A.DualTransform):
    """A random ``height x width`` crop (clipped to the image), re-drawn up to 10 times while a single
    class fills more than ``cat_max_ratio`` of its labelled pixels (mmseg's ``RandomCrop``)."""

    def __init__(self, height: int, width: int, cat_max_ratio: float = 0.75, ignore_index: int = 255, p: float = 1.0):
        super().__init__(p=p)
        self.height, self.width = int(height), int(width)
        self.cat_max_ratio, self.ignore_index = float(cat_max_ratio), int(ignore_index)

    def _draw(self, h: int, w: int) -> tuple[int, int, int, int]:
        ch, cw = min(self.height, h), min(self.width, w)
        y = self.py_random.randint(0, h - ch)
        x = self.py_random.randint(0, w - cw)
        return y, x, y + ch, x + cw

    def get_params_dependent_on_data(self, params: dict, data: dict) -> dict:
        h, w = params["shape"][:2]
        box = self._draw(h, w)
        mask = data.get("mask")
        if mask is not None and self.cat_max_ratio < 1.0:
            for _ in range(10):
                y0, x0, y1, x1 = box
                _, counts = (
                    np.unique(mask[y0:y1, x0:x1], return_counts=True)
                    if self.ignore_index < 0
                    else np.unique(mask[y0:y1, x0:x1][mask[y0:y1, x0:x1] != self.ignore_index], return_counts=True)
                )
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                box = self._draw(h, w)
        return {"box": box}

    def apply(self, img: np.ndarray, box: tuple[int, int, int, int] = (0, 0, 0, 0), **params: Any) -> np.ndarray:
        y0, x0, y1, x1 = box
        return np.ascontiguousarray(img[y0:y1, x0:x1])

    def apply_to_mask(
        self, mask: np.ndarray, box: tuple[int, int, int, int] = (0, 0, 0, 0), **params: Any
    ) -> np.ndarray:
        y0, x0, y1, x1 = box
        return np.ascontiguousarray(mask[y0:y1, x0:x1])

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("height", "width", "cat_max_ratio", "ignore_index")


def custom_pipeline(spec: Any, key: str) -> A.Compose:
    """``data.train_pipeline``: a list of ``{_target_: albumentations.X, ...}`` dicts -> ``A.Compose``."""

    if not isinstance(spec, (list, ListConfig)):
        raise ConfigError(
            f"{key} must be a list of {{_target_: albumentations.X, ...}} dicts, got {type(spec).__name__}"
        )
    ops = []
    for i, item in enumerate(spec):
        target = item.get("_target_") if isinstance(item, (dict, DictConfig)) else None
        if not target:
            raise ConfigError(
                f"{key}[{i}] needs a _target_ (e.g. _target_: albumentations.HorizontalFlip), got {item!r}"
            )
        try:
            op = instantiate(item, _convert_="all")
        except Exception as e:  # hydra wraps import / argument errors
            msg = " ".join(str(e).split())
            raise ConfigError(f"{key}[{i}] ({target}) cannot be built: {msg}") from None
        bad = next((t for t in _nested(op) if type(t).__name__ in DEVICE_SIDE), None)
        if bad is not None:
            raise ConfigError(
                f"{key}[{i}] holds {type(bad).__name__}: remove it; segtrain makes tensors and normalises them on "
                "the device, by data.mean/data.std"
            )
        ops.append(op)
    return A.Compose(ops)


DEVICE_SIDE = ("Normalize", "ToTensorV2", "ToTensor")  # BatchToDevice does these, on the device


def _nested(t: Any):
    """``t`` and every transform inside it (``OneOf``, ``Sequential``, ``SomeOf``, ``Compose``)."""
    yield t
    for child in getattr(t, "transforms", None) or []:
        yield from _nested(child)


def standard_train(cfg: DictConfig, colour: bool = True) -> A.Compose:
    """Rescale (base_size x scale_range), cat_max_ratio crop, pad (image 0, mask ignore_index),
    horizontal flip, photometric distortion (``colour``: 3-band 8-bit images only); or ``data.train_pipeline``."""
    if cfg.train_pipeline is not None:
        return custom_pipeline(cfg.train_pipeline, "data.train_pipeline")
    ops: list = []
    base = as_size(cfg.base_size, "data.base_size")
    lo, hi = (float(v) for v in cfg.scale_range)
    if not cfg.augment:
        lo = hi = 1.0
    if base is not None or (lo, hi) != (1.0, 1.0):  # no base_size: jitter around the image's own size
        ops.append(RescaleKeepRatio(base, (lo, hi)))
    if cfg.crop_size is not None:
        h, w = as_hw(cfg.crop_size, "data.crop_size")
        ratio = float(cfg.cat_max_ratio) if cfg.augment else 1.0
        ops.append(CatMaxRatioCrop(h, w, ratio, cfg.ignore_index))
        ops.append(
            A.PadIfNeeded(
                h, w, position="top_left", border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=cfg.ignore_index
            )
        )
    if cfg.augment:
        ops.append(A.HorizontalFlip(p=0.5))
        if cfg.photometric and colour:
            ops.append(A.ColorJitter(brightness=0.125, contrast=0.5, saturation=0.5, hue=0.05, p=0.5))
    return A.Compose(ops)


def val_scale(cfg: DictConfig) -> int | tuple[int, int] | None:
    """The keep-ratio size a whole image is rescaled to before prediction (validation, ``segtrain-eval``,
    prediction), or None for its own size: ``data.val_size`` when set, else ``data.base_size`` (the scale
    the standard training pipeline rescales to before its jitter; not with a ``data.train_pipeline``, which
    ignores it, nor for ``data=synthetic``).  An int sets the short side; ``(h, w)`` fits into that box."""
    if cfg.val_size is not None:
        return as_size(cfg.val_size, "data.val_size")
    if cfg.base_size is None or cfg.train_pipeline is not None or cfg.name == "synthetic":
        return None
    if cfg.base_size == "auto":
        raise ConfigError("data.base_size=auto is resolved from the training images by build_datasets; call it first")
    return as_size(cfg.base_size, "data.base_size")


def standard_val(cfg: DictConfig) -> A.Compose | None:
    """No augmentation, the whole image, rescaled (keep ratio) to :func:`val_scale`.

    The mask keeps its original size: the evaluation resizes the predicted scores back to it, so metrics
    are computed on the original annotation (as mmsegmentation does), whatever the test scale."""
    size = val_scale(cfg)
    return None if size is None else A.Compose([RescaleKeepRatio(size, resize_mask=False)])


# ---------------------------------------------------------------------------
# The scale report: what training and validation do to the median training image.


def _shown(size: Any) -> str:
    return "own size" if size is None else str(list(size) if isinstance(size, tuple) else size)


def suggested_crop(h: float, w: float) -> int:
    """A crop that fits inside an ``h x w`` image: a multiple of 32 (of 8 below 32 px)."""
    side = int(min(h, w))
    step = 32 if side >= 32 else 8
    return max(step, side // step * step)


def report_scales(cfg: DictConfig, median_hw: tuple[int, int], base_from_auto: bool = False) -> list[str]:
    """Log the training and validation scales of the median training image in one line; warn (and return
    the warnings) when they differ by more than 1.25x, when ``data.base_size`` enlarges the median image
    more than 2x, or when ``data.crop_size`` is larger than it.  Nothing for a custom ``train_pipeline``."""
    if cfg.train_pipeline is not None:
        log.info("scale: data.train_pipeline sets the training scale; validation at %s", _shown(val_scale(cfg)))
        return []
    h, w = median_hw
    base = as_size(cfg.base_size, "data.base_size")
    lo, hi = (float(v) for v in cfg.scale_range) if cfg.augment else (1.0, 1.0)
    to_base = scale_factor(h, w, base)
    train, val = to_base * math.sqrt(lo * hi), scale_factor(h, w, val_scale(cfg))
    if cfg.val_size is not None:
        val_from = f"data.val_size={_shown(val_scale(cfg))}"
    else:
        val_from = "own size" if val_scale(cfg) is None else f"data.base_size={_shown(base)}, data.val_size null"
    train_from = "own size" if base is None else f"data.base_size={_shown(base)}"
    log.info(
        "scale: the median training image (%dx%d px, h x w) is trained at %.2fx-%.2fx its size (%s x "
        "data.scale_range [%g, %g]; centre %.2fx) and validated at %.2fx (%s)",
        h,
        w,
        to_base * lo,
        to_base * hi,
        train_from,
        lo,
        hi,
        train,
        val,
        val_from,
    )
    warnings = []
    if max(train / val, val / train) > 1.25:
        fix = "data.val_size=null" if abs(math.log(lo * hi)) < 1e-9 else f"data.val_size={round(min(h, w) * train)}"
        warnings.append(
            f"validation sees images at {val:.2f}x their size but training at {train:.2f}x (the centre of "
            f"data.scale_range around data.base_size): set {fix} to validate at the training scale"
        )
    if base is not None and to_base > 2 and not base_from_auto:
        warnings.append(
            f"data.base_size={_shown(base)} enlarges the median training image ({h}x{w} px) {to_base:.1f}x: that "
            "recipe is for ~500 px photos (PASCAL VOC); for other images use data.base_size=auto (their median "
            "size) or data.base_size=null (own size)"
        )
    if cfg.crop_size is not None:
        ch, cw = as_hw(cfg.crop_size, "data.crop_size")
        th, tw = h * train, w * train
        if ch > th or cw > tw:
            warnings.append(
                f"data.crop_size={_shown(cfg.crop_size)} is larger than most training images ({round(th)}x{round(tw)} "
                f"px at the training scale, h x w): crops are mostly padding; try data.crop_size={suggested_crop(th, tw)}"
            )
    for text in warnings:
        log.warning(text)
    return warnings
