"""Albumentations pipelines.

Pipelines produce uint8 images; normalisation by ``data.mean``/``data.std``
happens on the device in the trainer (see ``segtrain.trainer.Normalize``).
"""

from __future__ import annotations

import albumentations as A
import cv2
from omegaconf import DictConfig

from segtrain.config import as_hw


def synthetic_train(cfg: DictConfig) -> A.Compose:
    ops: list = [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    if cfg.crop_size is not None:
        h, w = as_hw(cfg.crop_size, "data.crop_size")
        ops.append(A.PadIfNeeded(h, w, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=cfg.ignore_index))
        ops.append(A.RandomCrop(h, w))
    return A.Compose(ops if cfg.augment else ops[2:])


def no_augment(cfg: DictConfig) -> A.Compose | None:
    return None
