"""Class colours: the PASCAL VOC colour map and palettes given in configs."""

from __future__ import annotations

from typing import Any

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf

from segtrain.errors import ConfigError


def default_palette(num_classes: int) -> np.ndarray:
    """The PASCAL VOC bit-interleaved colour map."""
    pal = np.zeros((num_classes, 3), np.uint8)
    for i in range(num_classes):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


def palette_array(value: Any, key: str) -> np.ndarray | None:
    """A K x 3 uint8 palette from a list of [r, g, b], or None."""
    if value is None:
        return None
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    try:
        pal = np.asarray(value, dtype=np.int64)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a list of [r, g, b] colours, got {value!r}") from None
    if pal.ndim != 2 or pal.shape[1] != 3 or pal.min(initial=0) < 0 or pal.max(initial=0) > 255:
        raise ConfigError(f"{key} must be a list of [r, g, b] colours with values in [0, 255]")
    return pal.astype(np.uint8)


def palette_of(num_classes: int, *candidates: tuple[Any, str]) -> np.ndarray:
    """The colours of ``num_classes`` mask classes: the first of ``candidates`` (``(colours, key)`` pairs, e.g. the
    data set's or ``data.palette``, then a checkpoint's) that has enough of them, else the VOC colour map."""
    for value, key in candidates:
        pal = palette_array(value, key)
        if pal is not None and len(pal) >= num_classes:
            return pal[:num_classes]
    return default_palette(num_classes)
