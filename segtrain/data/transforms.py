"""Albumentations pipelines.

Pipelines produce uint8 images; normalisation by ``data.mean``/``data.std``
happens on the device (``segtrain.runtime.BatchToDevice``).
"""

from __future__ import annotations

from typing import Any

import albumentations as A
import cv2
import numpy as np
from omegaconf import DictConfig, ListConfig

from segtrain.errors import ConfigError
from segtrain.utils import as_hw, as_size


def synthetic_train(cfg: DictConfig) -> A.Compose:
    ops: list = [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    if cfg.crop_size is not None:
        h, w = as_hw(cfg.crop_size, "data.crop_size")
        ops.append(A.PadIfNeeded(h, w, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=cfg.ignore_index))
        ops.append(A.RandomCrop(h, w))
    return A.Compose(ops if cfg.augment else ops[2:])


# ---------------------------------------------------------------------------
# On-disk data sets: the standard recipe (mmseg-style) and custom pipelines.


def _target_size(h: int, w: int, size: tuple[int, int] | int, ratio: float = 1.0) -> tuple[int, int]:
    """(h, w) after a keep-ratio rescale: an int sets the short side; [h, w] fits the image into
    (long, short) = (max, min) of that box, as mmseg's ``Resize(keep_ratio=True)``."""
    if size is None:
        scale = ratio
    elif isinstance(size, int):
        scale = size * ratio / min(h, w)
    else:
        long_edge, short_edge = max(size) * ratio, min(size) * ratio
        scale = min(long_edge / max(h, w), short_edge / min(h, w))
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
        return {"out_hw": _target_size(h, w, self.size, ratio)}

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
    from hydra.utils import instantiate

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
        if str(target).rsplit(".", 1)[-1] == "Normalize":
            raise ConfigError(
                f"{key}[{i}] is Normalize: remove it, images are normalised on the device by data.mean/data.std"
            )
        try:
            ops.append(instantiate(item, _convert_="all"))
        except Exception as e:  # hydra wraps import / argument errors
            msg = " ".join(str(e).split())
            raise ConfigError(f"{key}[{i}] ({target}) cannot be built: {msg}") from None
    return A.Compose(ops)


def standard_train(cfg: DictConfig) -> A.Compose:
    """Rescale (base_size x scale_range), cat_max_ratio crop, pad (image 0, mask ignore_index),
    horizontal flip, photometric distortion; or ``data.train_pipeline`` when given."""
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
        if cfg.photometric:
            ops.append(A.ColorJitter(brightness=0.125, contrast=0.5, saturation=0.5, hue=0.05, p=0.5))
    return A.Compose(ops)


def standard_val(cfg: DictConfig) -> A.Compose | None:
    """No augmentation, the whole image; a keep-ratio resize of the image to ``data.val_size`` when set.

    The mask keeps its original size: the evaluation resizes the predicted scores back to it, so metrics
    are computed on the original annotation (as mmsegmentation does), whatever the test scale."""
    size = as_size(cfg.val_size, "data.val_size")
    return None if size is None else A.Compose([RescaleKeepRatio(size, resize_mask=False)])
