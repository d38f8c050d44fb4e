"""The data set's fingerprint: what the images and masks hold, measured once and cached.

:func:`fingerprint` (or :func:`compute_fingerprint` on data sets already built) reads a data set through its
own readers (``DiskDataset.read_image``, ``read_mask`` with the layout's table and ``data.label_map`` applied,
as the label check reads them) and returns a plain JSON-able dict (``version`` field) per split:

* ``sizes``: image height, width, short and long side (min, 10th percentile, median, 90th percentile, max),
  the median ``[h, w]`` and ``[short, long]`` (what ``data.base_size=auto`` uses) and a histogram; read from
  every file's header (no decoding) for on-disk sets.
* ``pixels``: the carried type (uint8, uint16, float32), the bands, and per band min, max, the 0.5th and
  99.5th percentiles (in the image's own values), the mean and standard deviation (in ``data.mean``'s units:
  fractions of 255 / 65535 for uint8 / uint16, own values for float images) and, for integer types, the
  share of the type's range used (``(p99.5 - p0.5) / type max``) and the bits used.  **Sample rule**: the
  pixels of at most ``max_images`` images per split (default 256), drawn with a fixed seed; exact percentiles
  for uint8 / uint16 (per-band histograms), percentiles of a 1-in-k pixel subsample (at most 16,384 pixels
  per image) for float images.
* ``masks``: **every** mask of an on-disk set (the sample for generated sets), per mask value (after the
  mapping): its pixels, the images holding it, its connected components (8-connected, ``cv2`` per value per
  mask: count, median area, 10th-percentile area, smallest), and the co-occurrence of values (pixels of
  value ``u`` in the images holding ``v``, for median-frequency class weights); the ``ignore_index``
  fraction.
* ``differences``: how the validation split differs from the training split (sizes, statistics, values).

The result is cached as JSON in ``$SEGTRAIN_CACHE/fingerprint/`` (default ``~/.cache/segtrain/fingerprint/``,
beside the label-check and image-statistics caches), keyed by every image and mask file (path, size, mtime)
and the reading settings; a cache that cannot be written is a warning.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from omegaconf import DictConfig, OmegaConf

from segtrain.data.build import open_datasets
from segtrain.data.checks import cache_dir as labelcheck_dir
from segtrain.data.disk import resolve_root
from segtrain.data.folder import LAYOUT, read_classes
from segtrain.data.images import read_header
from segtrain.errors import DataError
from segtrain.utils import atomic_write, files_digest

log = logging.getLogger("segtrain")

VERSION = 1
MAX_IMAGES = 256  # images per split whose pixels are read for the statistics (a seeded sample beyond that)
SAMPLE_SEED = 0
FLOAT_SUBSAMPLE = 16384  # float images: at most this many pixels per image enter the percentiles
QUANTILES = (0.5, 99.5)
SIZE_BINS = 16
TYPE_MAX = {"uint8": 255.0, "uint16": 65535.0}  # what data.mean's units divide by; float images: 1


def cache_dir() -> Path:
    """``$SEGTRAIN_CACHE/fingerprint`` (default ``~/.cache/segtrain/fingerprint``)."""

    return labelcheck_dir().parent / "fingerprint"


def _workers(workers: int | None) -> int:
    return max(1, workers or min(8, os.cpu_count() or 2))


def sample_indices(n: int, k: int, seed: int = SAMPLE_SEED) -> list[int]:
    """Every index of ``range(n)`` when ``n <= k``, else ``k`` of them drawn with ``seed`` (sorted)."""
    if n <= k:
        return list(range(n))
    return sorted(np.random.default_rng(seed).choice(n, size=k, replace=False).tolist())


def spread(values: Any) -> dict[str, float] | None:
    """min, 10th percentile, median, 90th percentile and max of ``values`` (None when empty)."""
    a = np.asarray(values, np.float64)
    if a.size == 0:
        return None
    p10, med, p90 = np.percentile(a, [10, 50, 90])
    return {"min": float(a.min()), "p10": float(p10), "median": float(med), "p90": float(p90), "max": float(a.max())}


# ---------------------------------------------------------------------------
# Reading the data sets.


def datasets_for(cfg_data: DictConfig, seed: int = 0) -> tuple[Any, Any]:
    """(train, val) of ``cfg_data``'s layout, built to be read as stored (no augmentation, no checks).

    ``data=folder``: when ``ROOT/classes.yaml`` (or ``data.class_names`` / ``data.palette``) lists a number of
    classes other than ``data.num_classes``, the sets are built with that number, so that the fingerprint can
    be taken before the plan has set ``data.num_classes``."""

    cfg = OmegaConf.create(OmegaConf.to_container(cfg_data, resolve=True))
    if cfg.name == "folder":
        declared = declared_classes(cfg)
        if declared is not None and not (cfg.num_classes == 1 and declared == 2):
            cfg.num_classes = declared
    train, val = open_datasets(cfg, seed, True)
    for ds in (train, val):
        if ds is not None and hasattr(ds, "in_channels"):
            ds.in_channels = cfg.in_channels
        if ds is not None and cfg.get("class_names") is not None:
            ds.class_names = list(cfg.class_names)
    return train, val


def declared_classes(cfg_data: DictConfig) -> int | None:
    """``data=folder``: the number of classes that ``data.class_names``, ``data.palette`` or ``ROOT/classes.yaml``
    (names, else palette) lists, or None."""

    if cfg_data.get("class_names") is not None:
        return len(cfg_data.class_names)
    if cfg_data.get("palette") is not None:
        return len(cfg_data.palette)
    meta = read_classes(resolve_root(cfg_data, LAYOUT))
    if meta.get("names") is not None:
        return len(meta["names"])
    if meta.get("palette") is not None:
        return len(meta["palette"])
    return None


def _readers(ds: Any) -> tuple[Callable[[int], np.ndarray], Callable[[int], np.ndarray]]:
    if hasattr(ds, "read_image") and hasattr(ds, "read_mask"):
        return ds.read_image, ds.read_mask
    return (lambda i: ds.load(i)[0]), (lambda i: ds.load(i)[1])


def _on_disk(ds: Any) -> bool:
    return hasattr(ds, "images") and hasattr(ds, "masks") and hasattr(ds, "read_mask")


# ---------------------------------------------------------------------------
# Pixels.


def _hist_quantile(hist: np.ndarray, q: float) -> float:
    """numpy's default (linear) percentile ``q`` of the values whose counts are ``hist`` (value = index)."""
    n = int(hist.sum())
    cum = np.cumsum(hist)
    pos = q / 100.0 * (n - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    v_lo = float(np.searchsorted(cum, lo, side="right"))
    v_hi = float(np.searchsorted(cum, hi, side="right"))
    return v_lo + (pos - lo) * (v_hi - v_lo)


class _PixelStats:
    """Per-band sums, extremes and value histograms (integer types) or subsamples (float) over images."""

    def __init__(self) -> None:
        self.dtype: str | None = None
        self.bands = 0
        self.count = 0
        self.images = 0
        self.total = self.total_sq = self.lo = self.hi = self.hist = None
        self.subsample: list[np.ndarray] = []

    @staticmethod
    def measure(img: np.ndarray) -> dict:
        img = img if img.ndim == 3 else img[..., None]
        x = img.reshape(-1, img.shape[-1])
        out: dict[str, Any] = {"dtype": img.dtype.name, "n": x.shape[0], "hw": img.shape[:2]}
        if img.dtype.name in TYPE_MAX:  # sums and extremes from the exact histogram: no float copy
            bins = int(TYPE_MAX[img.dtype.name]) + 1
            hist = np.stack([np.bincount(x[:, b], minlength=bins) for b in range(x.shape[1])])
            v = np.arange(bins, dtype=np.float64)
            seen = hist > 0
            out.update(hist=hist, sum=hist @ v, sq=hist @ (v * v))
            out.update(
                min=np.argmax(seen, 1).astype(np.float64),
                max=(bins - 1 - np.argmax(seen[:, ::-1], 1)).astype(np.float64),
            )
        else:
            xf = x.astype(np.float64)
            step = max(1, math.ceil(x.shape[0] / FLOAT_SUBSAMPLE))
            out.update(sum=xf.sum(0), sq=np.square(xf).sum(0), min=xf.min(0), max=xf.max(0), sub=xf[::step])
        return out

    def add(self, m: dict) -> None:
        if self.dtype is None:
            self.dtype, self.bands = m["dtype"], len(m["sum"])
            self.total, self.total_sq = np.zeros(self.bands), np.zeros(self.bands)
            self.lo, self.hi = np.full(self.bands, np.inf), np.full(self.bands, -np.inf)
        elif (m["dtype"], len(m["sum"])) != (self.dtype, self.bands):
            raise DataError(
                f"images mix types or bands ({self.dtype} x {self.bands}, {m['dtype']} x {len(m['sum'])}); "
                "convert the images to one type and band count"
            )
        self.images += 1
        self.count += m["n"]
        self.total += m["sum"]
        self.total_sq += m["sq"]
        self.lo, self.hi = np.minimum(self.lo, m["min"]), np.maximum(self.hi, m["max"])
        if "hist" in m:
            self.hist = m["hist"].astype(np.int64) if self.hist is None else self.hist + m["hist"]
        else:
            self.subsample.append(m["sub"])

    def result(self) -> dict | None:
        if not self.count:
            return None
        scale = TYPE_MAX.get(self.dtype, 1.0)
        mean = self.total / self.count
        std = np.sqrt(np.maximum(self.total_sq / self.count - mean**2, 0.0))
        if self.hist is not None:
            qs = [[_hist_quantile(h, q) for h in self.hist] for q in QUANTILES]
        else:
            sub = np.concatenate(self.subsample)
            qs = [np.percentile(sub, q, axis=0).tolist() for q in QUANTILES]
        out = {
            "images": self.images,
            "pixels": self.count,
            "dtype": self.dtype,
            "bands": self.bands,
            "type_max": scale,
            "min": self.lo.tolist(),
            "max": self.hi.tolist(),
            "p0.5": [float(v) for v in qs[0]],
            "p99.5": [float(v) for v in qs[1]],
            "mean": (mean / scale).tolist(),
            "std": (std / scale).tolist(),
            "exact_percentiles": self.hist is not None,
            "range_used": None,
            "bits_used": None,
        }
        if self.dtype in TYPE_MAX:
            out["range_used"] = [(hi - lo) / scale for lo, hi in zip(out["p0.5"], out["p99.5"])]
            out["bits_used"] = int(max(self.hi)).bit_length()
        return out


# ---------------------------------------------------------------------------
# Masks.


class _MaskStats:
    """Per-value pixel counts, images holding each value, connected-component areas and co-occurrence."""

    def __init__(self, ignore_index: int) -> None:
        self.ignore_index = ignore_index
        self.masks = 0
        self.pixels = 0
        self.counts = np.zeros(256, np.int64)
        self.images = np.zeros(256, np.int64)
        self.cooc = np.zeros((256, 256), np.int64)
        self.areas: dict[int, list[np.ndarray]] = {}

    def measure(self, mask: np.ndarray) -> dict:
        mask = np.ascontiguousarray(mask, dtype=np.uint8)
        counts = np.bincount(mask.ravel(), minlength=256)
        present = np.flatnonzero(counts)
        areas = {}
        for v in present.tolist():
            if v == self.ignore_index:
                continue
            n, _, stats, _ = cv2.connectedComponentsWithStats((mask == v).view(np.uint8), connectivity=8)
            areas[v] = stats[1:n, cv2.CC_STAT_AREA].astype(np.int64)
        return {"counts": counts, "areas": areas, "hw": mask.shape[:2]}

    def add(self, m: dict) -> None:
        counts = m["counts"]
        present = np.flatnonzero(counts)
        self.masks += 1
        self.pixels += int(counts.sum())
        self.counts += counts
        self.images[present] += 1
        self.cooc[np.ix_(present, present)] += counts[present][None, :]
        for v, a in m["areas"].items():
            self.areas.setdefault(v, []).append(a)

    def result(self) -> dict:
        values = {}
        for v in np.flatnonzero(self.counts).tolist():
            entry: dict[str, Any] = {"pixels": int(self.counts[v]), "images": int(self.images[v])}
            if v in self.areas:
                a = np.concatenate(self.areas[v])
                entry.update(
                    objects=int(a.size),
                    area_median=float(np.median(a)),
                    area_p10=float(np.percentile(a, 10)),
                    area_min=int(a.min()),
                )
            values[str(v)] = entry
        present = np.flatnonzero(self.counts)
        cooc = {str(v): {str(u): int(self.cooc[v, u]) for u in present.tolist()} for v in present.tolist()}
        ignored = int(self.counts[self.ignore_index]) if 0 <= self.ignore_index < 256 else 0
        return {
            "images": self.masks,
            "pixels": self.pixels,
            "ignore_index": self.ignore_index,
            "ignore_fraction": ignored / self.pixels if self.pixels else 0.0,
            "values": values,
            "cooccurrence": cooc,
        }


# ---------------------------------------------------------------------------
# Sizes.


def _header_sizes(ds: Any, workers: int) -> tuple[list[tuple[int, int]], dict]:

    with ThreadPoolExecutor(max_workers=workers) as pool:
        headers = list(pool.map(read_header, ds.images))
    file_bands = sorted({b for _, _, b, _ in headers})
    file_dtypes = sorted({dt for _, _, _, dt in headers})
    return [(h, w) for h, w, _, _ in headers], {"file_bands": file_bands, "file_dtypes": file_dtypes}


def size_summary(sizes: list[tuple[int, int]], source: str) -> dict | None:
    """The size spread of ``sizes`` ((h, w) pairs), their medians and a histogram of h and w."""
    if not sizes:
        return None
    a = np.asarray(sizes, np.float64).reshape(-1, 2)
    short, long = a.min(1), a.max(1)
    lo, hi = float(a.min()), float(a.max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1, SIZE_BINS + 1)
    return {
        "source": source,
        "images": len(sizes),
        "h": spread(a[:, 0]),
        "w": spread(a[:, 1]),
        "short": spread(short),
        "long": spread(long),
        "median_hw": [int(round(v)) for v in np.median(a, axis=0)],
        "median_short_long": [int(round(np.median(short))), int(round(np.median(long)))],
        "histogram": {
            "edges": [round(float(e), 3) for e in edges],
            "h": np.histogram(a[:, 0], edges)[0].tolist(),
            "w": np.histogram(a[:, 1], edges)[0].tolist(),
        },
    }


# ---------------------------------------------------------------------------
# One split, and the two together.


def split_fingerprint(
    ds: Any, max_images: int = MAX_IMAGES, ignore_index: int = 255, workers: int | None = None
) -> dict:
    """The fingerprint of one data set (see the module doc): sizes, pixels of a seeded sample, every mask."""
    workers = _workers(workers)
    read_image, read_mask = _readers(ds)
    n = len(ds)
    sample = sample_indices(n, max_images)
    on_disk = _on_disk(ds)
    mask_indices = list(range(n)) if on_disk else sample
    pixels, masks = _PixelStats(), _MaskStats(ignore_index)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for m in pool.map(lambda i: _PixelStats.measure(read_image(i)), sample):
            pixels.add(m)
        mask_hw = []
        for m in pool.map(lambda i: masks.measure(read_mask(i)), mask_indices):
            masks.add(m)
            mask_hw.append(m["hw"])
    extra: dict = {}
    if on_disk:
        sizes, extra = _header_sizes(ds, workers)
        source = "headers"
    else:
        sizes, source = mask_hw, "sample"
    out = {
        "images": n,
        "sizes": size_summary(sizes, source),
        "pixels": pixels.result(),
        "masks": masks.result(),
        **extra,
    }
    return out


def _digest(datasets: list, *extra: Any) -> str:
    files = [p for ds in datasets for p in (*ds.images, *ds.masks)]
    return files_digest(files, f"fingerprint-v{VERSION}", *extra, *(ds.cache_key() for ds in datasets))


def compute_fingerprint(
    train: Any,
    val: Any,
    *,
    name: str = "",
    in_channels: int = 3,
    ignore_index: int = 255,
    max_images: int = MAX_IMAGES,
    workers: int | None = None,
    cache: bool = True,
    declared: int | None = None,
) -> dict:
    """The fingerprint of a (train, val) pair (``train`` may be None); cached for on-disk sets (see the module doc).
    ``declared``: the number of classes a folder's classes.yaml (or data.class_names) lists, recorded as is."""
    sets = [ds for ds in (train, val) if ds is not None]
    key = path = None
    if cache and sets and all(_on_disk(ds) and hasattr(ds, "cache_key") for ds in sets):
        key = _digest(sets, name, in_channels, ignore_index, max_images, train is None)
        path = cache_dir() / f"{key}.json"
        try:
            found = json.loads(path.read_text())
            if found.get("version") == VERSION:
                log.info("fingerprint: cached %s", path)
                return _with_classes(found, train if train is not None else val, declared)
        except (OSError, ValueError):
            pass
    splits = {}
    for split, ds in (("train", train), ("val", val)):
        if ds is not None:
            splits[split] = split_fingerprint(ds, max_images, ignore_index, workers)
    first = train if train is not None else val
    fp = {
        "version": VERSION,
        "key": key,
        "layout": name,
        "in_channels": in_channels,
        "ignore_index": ignore_index,
        "max_images": max_images,
        "sample_rule": f"pixels of at most {max_images} images per split (seed {SAMPLE_SEED}); every mask"
        + ("" if key else " of the sample"),
        "splits": splits,
        "differences": differences(splits.get("train"), splits.get("val")),
    }
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, json.dumps(fp), durable=False)
        except OSError as e:  # a read-only home is no reason to stop
            log.warning("fingerprint: cannot write cache %s: %s", path, e)
    return _with_classes(fp, first, declared)


def _with_classes(fp: dict, first: Any, declared: int | None) -> dict:
    """``fp`` with the layout's class names and colours (not cached: classes.yaml is not among the keyed files)."""
    names = [str(c) for c in getattr(first, "class_names", []) or []]
    palette = getattr(first, "palette", None)
    return {
        **fp,
        "class_names": names,
        "palette": None if palette is None else np.asarray(palette).tolist(),
        "declared_classes": declared,
    }


def fingerprint(cfg_data: DictConfig, max_images: int = MAX_IMAGES, workers: int | None = None, seed: int = 0) -> dict:
    """Build ``cfg_data``'s data sets (:func:`datasets_for`) and return their fingerprint (cached)."""
    train, val = datasets_for(cfg_data, seed)
    return compute_fingerprint(
        train,
        val,
        name=str(cfg_data.name),
        in_channels=int(cfg_data.in_channels),
        ignore_index=int(cfg_data.ignore_index),
        max_images=max_images,
        workers=workers,
        declared=declared_classes(cfg_data) if cfg_data.name == "folder" else None,
    )


# ---------------------------------------------------------------------------
# Train against val.


def differences(train: dict | None, val: dict | None) -> list[str]:
    """How the validation split differs from the training split: median image size by more than 1.25x, a band
    mean by more than half the training standard deviation, type or bands, and mask values only one holds."""
    if not train or not val:
        return []
    out = []
    ts, vs = train.get("sizes"), val.get("sizes")
    if ts and vs:
        t_short, v_short = ts["median_short_long"][0], vs["median_short_long"][0]
        ratio = v_short / max(t_short, 1)
        if ratio > 1.25 or ratio < 0.8:
            out.append(
                f"sizes: the median validation image ({vs['median_hw'][0]}x{vs['median_hw'][1]}) is {ratio:.2f}x the "
                f"median training image ({ts['median_hw'][0]}x{ts['median_hw'][1]}) (short side)"
            )
    tp, vp = train.get("pixels"), val.get("pixels")
    if tp and vp:
        if (tp["dtype"], tp["bands"]) != (vp["dtype"], vp["bands"]):
            out.append(
                f"type: training images are {tp['bands']} x {tp['dtype']}, validation {vp['bands']} x {vp['dtype']}"
            )
        else:
            for b, (mt, st, mv) in enumerate(zip(tp["mean"], tp["std"], vp["mean"])):
                if st > 0 and abs(mv - mt) > 0.5 * st:
                    out.append(
                        f"statistics: band {b} mean {mv:.4g} in validation vs {mt:.4g} in training ({abs(mv - mt) / st:.1f} training std apart)"
                    )
    ignore = train["masks"]["ignore_index"]
    t_vals = {int(v) for v in train["masks"]["values"]} - {ignore}
    v_vals = {int(v) for v in val["masks"]["values"]} - {ignore}
    if v_vals - t_vals:
        out.append(f"values: {sorted(v_vals - t_vals)} appear in validation masks only")
    if t_vals - v_vals:
        out.append(f"values: {sorted(t_vals - v_vals)} appear in training masks only")
    return out


# ---------------------------------------------------------------------------
# In words.


def _num(v: float) -> str:
    if isinstance(v, float) and not float(v).is_integer() and abs(v) < 1000:
        return f"{v:.4g}"
    return f"{round(v)}"


def _bands(values: list, limit: int = 4) -> str:
    shown = ", ".join(_num(float(v)) for v in values[:limit])
    return shown + (f", ... ({len(values)} bands)" if len(values) > limit else "")


def class_name(fp: dict, value: int) -> str:
    names = fp.get("class_names") or []
    return f"{value} {names[value]}" if 0 <= value < len(names) else str(value)


def describe(fp: dict, max_classes: int = 8) -> list[str]:
    """The fingerprint in a few lines: images, sizes, pixel values, classes, ignored pixels, train vs val."""
    splits = fp["splits"]
    train = splits.get("train") or splits["val"]
    counts = " / ".join(f"{s['images']} {name}" for name, s in splits.items())
    head = f"data={fp.get('layout') or '?'}: {counts} images"
    if "file_bands" in train:
        head += f"; files: {'/'.join(map(str, train['file_bands']))} band(s), {'/'.join(train['file_dtypes'])}"
    lines = [head]
    sz = train.get("sizes")
    if sz:
        h, w = sz["median_hw"]
        lines.append(
            f"sizes: median {h}x{w} px (h x w); h {_num(sz['h']['min'])}-{_num(sz['h']['max'])}, "
            f"w {_num(sz['w']['min'])}-{_num(sz['w']['max'])} (10-90%: short side {_num(sz['short']['p10'])}-"
            f"{_num(sz['short']['p90'])})"
        )
    px = train.get("pixels")
    if px:
        top = px["type_max"]
        text = f"pixels ({px['images']} images, {px['bands']} x {px['dtype']}): min {_bands(px['min'])}; max {_bands(px['max'])}"
        if px["dtype"] in TYPE_MAX:
            spans = _bands([round(100 * r, 2) for r in px["range_used"]])
            text += f" of {int(top)} ({px['bits_used']} bits used); p0.5-p99.5 span {spans} % of the range"
        lines.append(text)
        lines.append(f"statistics (data.mean units): mean {_bands(px['mean'])}; std {_bands(px['std'])}")
    masks = train["masks"]
    ignore = masks["ignore_index"]
    vals = sorted(((int(v), e) for v, e in masks["values"].items() if int(v) != ignore), key=lambda x: -x[1]["pixels"])
    total = max(1, masks["pixels"])
    parts = []
    for v, e in vals[:max_classes]:
        part = f"{class_name(fp, v)} {100 * e['pixels'] / total:.3g}% px, {100 * e['images'] / max(1, masks['images']):.0f}% img"
        if e.get("objects"):
            part += f", {e['objects']} obj (median {_num(e['area_median'])} px, p10 {_num(e['area_p10'])})"
        parts.append(part)
    more = f"; +{len(vals) - max_classes} more" if len(vals) > max_classes else ""
    lines.append(f"classes ({masks['images']} masks): " + "; ".join(parts) + more)
    lines.append(f"ignored: {100 * masks['ignore_fraction']:.3g}% of the pixels (value {ignore})")
    diffs = fp.get("differences") or []
    lines.append("train vs val: " + ("; ".join(diffs) if diffs else "no difference found" if "val" in splits else "-"))
    return lines
