"""What segtrain reads from the images before training, and the ``auto`` values it computes from them.

* :func:`scan_images` reads every image's header (no pixel decoding): its size, bands and bit depth.  A
  file whose bands do not fit ``data.in_channels``, or images of mixed bit depths, are a one-line
  :class:`DataError` naming a file; the training images' median size feeds ``data.base_size=auto``, the
  scale report and the crop-size check (``transforms.report_scales``).
* :func:`channel_stats` computes the per-band mean and standard deviation of the training images (every
  pixel of every image, un-augmented) for ``data.mean=auto`` / ``data.std=auto``, in the units of
  ``data.mean``: fractions of the type's range for uint8 (/ 255) and uint16 (/ 65535), the image's own
  values for float images.
* :func:`resolve_auto` returns the numbers for the config's ``auto`` values; the run's resolved config holds
  them, so that the checkpoint's stored config (and therefore ``segtrain-eval`` and prediction) does.

Both results are cached as JSON files in ``$SEGTRAIN_CACHE/images/`` (default ``~/.cache/segtrain/images/``,
beside the label-check cache), keyed by the image files' paths, sizes and mtimes and ``data.in_channels``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from segtrain.data.checks import cache_dir as labelcheck_dir
from segtrain.data.checks import read_cache, write_cache
from segtrain.data.disk import DiskDataset
from segtrain.data.images import band_message, header_bands_fit, read_header
from segtrain.errors import ConfigError, DataError
from segtrain.utils import files_digest

log = logging.getLogger("segtrain")

VALUE_RANGE = {"uint8": 255.0, "uint16": 65535.0}  # everything else (float32): its own values
HEADER_KEYS = ("images", "dtype", "median_hw", "median_short_long")


def value_range(dtype: Any) -> float:
    """What an image of ``dtype`` is divided by before ``data.mean`` / ``data.std`` apply (float: 1)."""
    return VALUE_RANGE.get(np.dtype(dtype).name if not isinstance(dtype, str) else dtype, 1.0)


def cache_dir() -> Path:
    """``$SEGTRAIN_CACHE/images`` (default ``~/.cache/segtrain/images``), beside the label-check cache."""

    return labelcheck_dir().parent / "images"


def _workers() -> int:
    return min(8, os.cpu_count() or 2)


def _cached(kind: str, key: str, compute: Callable[[], dict], keys: tuple[str, ...]) -> tuple[dict, Path | None]:
    """``compute()`` once per key: its JSON result (a dict with ``keys``) is kept as ``KIND-KEY.json`` in
    :func:`cache_dir`; returns it and the cache file, None when it could not be written."""
    path = cache_dir() / f"{kind}-{key}.json"
    result = read_cache(path, keys)
    if result is not None:
        return result, path
    result = compute()
    return result, path if write_cache(path, result) else None


# ---------------------------------------------------------------------------
# Headers: sizes, bands, bit depth.


def _scan(train: DiskDataset | None, val: DiskDataset, in_channels: int) -> dict:
    train_images = [] if train is None else train.images
    n_train, paths = len(train_images), [*train_images, *val.images]
    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        headers = list(pool.map(read_header, paths))
    bad = [(p, b) for p, (_, _, b, _) in zip(paths, headers) if not header_bands_fit(b, in_channels, p)]
    if bad:
        more = f" ({len(bad)} images affected)" if len(bad) > 1 else ""
        raise DataError(band_message(bad[0][0], bad[0][1], in_channels) + more)
    dtypes: dict[str, Path] = {}
    for p, (_, _, _, dt) in zip(paths, headers):
        dtypes.setdefault(dt, p)
    if len(dtypes) > 1:
        (a, _), (b, pb) = list(dtypes.items())[:2]
        raise DataError(f"images mix bit depths ({a}, {b}): {pb} is {b}; convert the images to one type")
    sizes = np.array([(h, w) for h, w, _, _ in headers[:n_train]], np.float64).reshape(-1, 2)
    return {
        "images": len(paths),
        "dtype": next(iter(dtypes)),
        "median_hw": [int(round(v)) for v in np.median(sizes, axis=0)] if n_train else None,
        "median_short_long": [int(round(np.median(sizes.min(1)))), int(round(np.median(sizes.max(1))))]
        if n_train
        else None,
    }


def scan_images(train: DiskDataset | None, val: DiskDataset, in_channels: int) -> dict:
    """Headers of every image: ``dtype`` (the one carried type), the training images' ``median_hw`` and
    ``median_short_long`` (None without a training set); a one-line DataError for bands that do not fit
    ``in_channels`` or mixed bit depths."""
    train_images = [] if train is None else train.images
    key = files_digest([*train_images, *val.images], "headers-v1", in_channels, len(train_images))
    result, path = _cached("headers", key, lambda: _scan(train, val, in_channels), HEADER_KEYS)
    log.debug("image headers: %s (%s)", result, path)
    return result


# ---------------------------------------------------------------------------
# Per-band statistics.


def _image_reader(dataset: Any) -> Callable[[int], np.ndarray]:
    if hasattr(dataset, "read_image"):
        return dataset.read_image
    return lambda i: dataset.load(i)[0]


def _stats(dataset: Any) -> dict:
    read = _image_reader(dataset)

    def one(i: int) -> tuple[np.ndarray, np.ndarray, int]:
        img = read(i)
        img = img if img.ndim == 3 else img[..., None]
        x = img.reshape(-1, img.shape[-1]).astype(np.float64) / value_range(img.dtype)
        return x.sum(0), np.square(x).sum(0), x.shape[0]

    total = total_sq = None
    count = 0
    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        for s, sq, n in pool.map(one, range(len(dataset))):
            total = s if total is None else total + s
            total_sq = sq if total_sq is None else total_sq + sq
            count += n
    if not count:
        raise DataError("data.mean=auto: the training set holds no pixels")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return {"images": len(dataset), "mean": mean.tolist(), "std": std.tolist()}


def channel_stats(dataset: Any, in_channels: int) -> tuple[list[float], list[float]]:
    """Per-band (mean, std) over every pixel of ``dataset``'s un-augmented images, in ``data.mean``'s units.
    Cached for on-disk data sets; a band with no variation gets std 1 (with a warning)."""
    if isinstance(dataset, DiskDataset):
        key = files_digest(dataset.images, "stats-v1", in_channels)
        result, path = _cached("stats", key, lambda: _stats(dataset), ("images", "mean", "std"))
        where = f"cached in {path}" if path is not None else "not cached"
    else:
        result, where = _stats(dataset), "not cached"
    mean, std = list(result["mean"]), list(result["std"])
    if len(mean) != in_channels:  # the reader enforces in_channels; a custom data set might not
        raise DataError(
            f"data.mean=auto: the training images have {len(mean)} bands but data.in_channels={in_channels}"
        )
    flat = [i for i, s in enumerate(std) if not s > 1e-8]
    if flat:
        log.warning("data.std=auto: band(s) %s do not vary over the training images; std set to 1", flat)
        std = [1.0 if i in flat else s for i, s in enumerate(std)]
    log.info(
        "data.mean/std=auto from %d training images: mean %s std %s (%s)",
        result["images"],
        [round(v, 6) for v in mean],
        [round(v, 6) for v in std],
        where,
    )
    return mean, std


# ---------------------------------------------------------------------------
# The ``auto`` values.


def resolve_auto(cfg: DictConfig, train: Any, scan: dict | None) -> dict[str, Any]:
    """The numbers for ``base_size: auto`` and ``mean`` / ``std: auto`` of ``cfg`` (the data config), by key."""
    autos = [k for k in ("base_size", "mean", "std") if cfg[k] == "auto"]
    if autos and train is None:  # segtrain-eval: the checkpoint's config holds the numbers training found
        raise ConfigError(
            f"data.{autos[0]}=auto is computed from the training images, which segtrain-eval does not read: "
            f"leave data.{autos[0]} as the checkpoint stores it, or give numbers"
        )
    values: dict[str, Any] = {}
    if cfg.base_size == "auto":
        if scan is None:
            raise ConfigError("data.base_size=auto needs images on disk")
        short, long = scan["median_short_long"]
        values["base_size"] = [short, long]
        h, w = scan["median_hw"]
        log.info(
            "data.base_size=auto: %s (the training images' median short and long sides; median %dx%d px, h x w)",
            [short, long],
            h,
            w,
        )
    if cfg.mean == "auto" or cfg.std == "auto":  # either computes both (segtrain.config.validate)
        values["mean"], values["std"] = channel_stats(train, cfg.in_channels)
    return values
