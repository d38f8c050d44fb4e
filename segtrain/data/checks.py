"""The label check run before training.

:func:`check_labels` reads every image and mask once, in a thread pool, and
raises a one-line :class:`DataError` for a value outside ``[0, num_classes)`` that is
not ``ignore_index`` (``num_classes``: the classes a mask holds, 2 for one sigmoid
logit), an image/mask size mismatch, or an unreadable or truncated file.  A passing
result is cached as a JSON file under ``$SEGTRAIN_CACHE/labelcheck/`` (default ``~/.cache/segtrain/labelcheck/``),
keyed by the files' paths, sizes and mtimes and the label settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from segtrain.data.disk import TIFF_EXTS, DiskDataset, open_pil, size_message
from segtrain.errors import DataError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# The label check.


def cache_dir() -> Path:
    base = os.environ.get("SEGTRAIN_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "segtrain") / "labelcheck"


def _fingerprint(datasets: list[DiskDataset], num_classes: int, ignore_index: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([num_classes, ignore_index]).encode())
    for ds in datasets:
        h.update(ds.cache_key().encode())
        for p in (*ds.images, *ds.masks):
            try:
                st = os.stat(p)
                h.update(f"{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()[:32]


def _check_one(ds: DiskDataset, i: int) -> tuple[np.ndarray | None, str | None]:
    """(256-bool presence of mask values, error message) for sample ``i``."""
    try:
        if Path(ds.images[i]).suffix.lower() in TIFF_EXTS:  # bands and bit depths PIL cannot read
            h, w = ds.read_image(i).shape[:2]
        else:
            w, h = open_pil(ds.images[i], "image").size
        mask = ds.read_mask(i)
        if mask.shape != (h, w):
            return None, size_message(ds.images[i], (h, w), ds.masks[i], mask.shape)
        return np.bincount(mask.ravel(), minlength=256) > 0, None
    except DataError as e:
        return None, str(e)


def check_labels(datasets: list[DiskDataset], num_classes: int, ignore_index: int, workers: int | None = None) -> None:
    """Read every sample once; raise a one-line DataError on the first problem found (see the module doc)."""
    key = _fingerprint(datasets, num_classes, ignore_index)
    cache = cache_dir() / f"{key}.json"
    if cache.is_file():
        log.info("label check: cached result %s", cache)
        return
    jobs = [(ds, i) for ds in datasets for i in range(len(ds))]
    workers = workers or min(8, os.cpu_count() or 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda job: _check_one(*job), jobs))
    errors = [err for _, err in results if err is not None]
    if errors:
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise DataError(errors[0] + more)
    valid = np.zeros(256, bool)
    valid[:num_classes] = True
    if 0 <= ignore_index < 256:
        valid[ignore_index] = True
    union = np.zeros(256, bool)
    bad_files: list[tuple[str, list[int]]] = []
    for (ds, i), (present, _) in zip(jobs, results):
        union |= present
        bad = np.flatnonzero(present & ~valid)
        if len(bad):
            bad_files.append((str(ds.masks[i]), bad.tolist()))
    values = np.flatnonzero(union).tolist()
    binary = num_classes == 2 and set(values) == {0, 255}
    if bad_files or binary:
        if binary:
            hint = "masks look binary 0/255: set data.label_map={255:1}"
            first = bad_files[0] if bad_files else (str(jobs[0][0].masks[jobs[0][1]]), [255])
            what = (
                f"{first[0]} has values {first[1]}"
                if bad_files
                else f"every mask holds only 0 and 255 (= data.ignore_index), e.g. {first[0]}, so class 1 never appears"
            )
        else:
            first = bad_files[0]
            bad_all = sorted({v for _, vs in bad_files for v in vs})
            top = max(bad_all)
            hint = (
                f"if these are classes set data.num_classes={top + 1}, otherwise remap them with "
                f"data.label_map={{{bad_all[0]}:{ignore_index if 0 <= ignore_index < 256 else 255}}}"
            )
            what = f"{first[0]} has values {first[1]}"
        more = f" ({len(bad_files)} mask(s) affected)" if len(bad_files) > 1 else ""
        raise DataError(
            f"label check failed: mask values must be in [0, {num_classes}) or data.ignore_index={ignore_index}; "
            f"{what}{more}; {hint} (data.check_labels=false skips this check)"
        )
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"ok": True, "samples": len(jobs), "values": values}))
    except OSError as e:  # a read-only home is no reason to stop
        log.warning("label check: cannot write cache %s: %s", cache, e)
    log.info("label check: %d samples ok (values %s)", len(jobs), values)
