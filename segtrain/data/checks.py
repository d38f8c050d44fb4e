"""The label check run before training.

:func:`check_labels` reads every image and mask once, in a thread pool, and
raises a one-line :class:`DataError` for a value outside ``[0, num_classes)`` that is
not ``ignore_index`` (``num_classes``: the classes a mask holds, 2 for one sigmoid
logit), an image/mask size mismatch, or an unreadable or truncated file.  A passing
result is cached as a JSON file under ``$SEGTRAIN_CACHE/labelcheck/`` (default ``~/.cache/segtrain/labelcheck/``),
keyed by the files' paths, sizes and mtimes and the label settings.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from segtrain.data.disk import DiskDataset, open_pil, size_message, valid_values, value_problem
from segtrain.data.images import EXIF_ORIENTATION, TIFF_EXTS
from segtrain.errors import DataError
from segtrain.utils import atomic_write, files_digest

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# The label check.


def cache_dir() -> Path:
    base = os.environ.get("SEGTRAIN_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "segtrain") / "labelcheck"


_NOT_WRITABLE: set[str] = set()  # cache roots already reported as not writable (once per process)


def write_cache(path: Path, record: dict) -> bool:
    """Write a cache file (``record`` as JSON) atomically; False when it cannot be written (a read-only home,
    ``SEGTRAIN_CACHE`` naming a file, a full disk ...): a cache never stops a run, and that is said once per
    process, not at every cache."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(record), durable=False)  # DDP ranks may write it at once
        return True
    except OSError as e:
        root = str(cache_dir().parent)
        if root not in _NOT_WRITABLE:
            _NOT_WRITABLE.add(root)
            log.warning(
                "not cached: cannot write %s (%s); the label check and image statistics are computed again at "
                "every run (set SEGTRAIN_CACHE to a writable folder to keep them)",
                e.filename or path,
                e.strerror or e,
            )
        return False


def read_cache(path: Path, keys: tuple[str, ...]) -> dict | None:
    """A cache file's record if it holds ``keys``; None when missing, unreadable or not such a record."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and all(k in record for k in keys) else None


def _fingerprint(datasets: list[DiskDataset], num_classes: int, ignore_index: int) -> str:
    files = [p for ds in datasets for p in (*ds.images, *ds.masks)]
    return files_digest(files, num_classes, ignore_index, *(ds.cache_key() for ds in datasets))


def _check_one(ds: DiskDataset, i: int) -> tuple[np.ndarray | None, str | None, tuple[int, int]]:
    """(256-bool presence of the mask's values as stored, error message, image (h, w) as loaded) of sample ``i``."""
    try:
        if Path(ds.images[i]).suffix.lower() in TIFF_EXTS:  # bands and bit depths PIL cannot read
            h, w = ds.read_image(i).shape[:2]
        else:
            img = open_pil(ds.images[i], "image")
            w, h = img.size
            if ds.in_channels == 3 and int(img.getexif().get(EXIF_ORIENTATION, 1)) >= 5:  # OpenCV rotates it
                w, h = h, w
        raw = ds.read_mask(i, mapped=False)
        if raw.shape != (h, w):
            return None, size_message(ds.images[i], (h, w), ds.masks[i], raw.shape, ds.in_channels), (h, w)
        return np.bincount(raw.ravel(), minlength=256) > 0, None, (h, w)
    except DataError as e:
        return None, str(e), (0, 0)


def _mapped(ds: DiskDataset, raw_present: np.ndarray) -> np.ndarray:
    """Presence of the values after the data set's mapping, from the presence of the stored values."""
    if ds.lut is None:
        return raw_present
    out = np.zeros(256, bool)
    out[ds.lut[np.flatnonzero(raw_present)]] = True
    return out


def check_labels(
    datasets: list[DiskDataset], num_classes: int, ignore_index: int, workers: int | None = None
) -> list[tuple[str, int, int] | None]:
    """Read every sample once; raise a one-line DataError on the first problem found (see the module doc).

    Returns the smallest image (path, h, w) of each data set, for the checks against the network's minimum
    input size (None from a cache written before segtrain recorded it)."""
    key = _fingerprint(datasets, num_classes, ignore_index)
    cache = cache_dir() / f"{key}.json"
    record = read_cache(cache, ("smallest",))  # none yet, or unreadable: check again
    if record is not None:
        log.info("label check: cached result %s", cache)
        smallest = record.get("smallest")
        if isinstance(smallest, list) and len(smallest) == len(datasets):
            return [tuple(x) if isinstance(x, list) and len(x) == 3 else None for x in smallest]
        return [None] * len(datasets)
    jobs = [(ds, i) for ds in datasets for i in range(len(ds))]
    workers = workers or min(8, os.cpu_count() or 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda job: _check_one(*job), jobs))
    errors = [err for _, err, _ in results if err is not None]
    if errors:
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise DataError(errors[0] + more)
    valid = valid_values(num_classes, ignore_index)
    union = np.zeros(256, bool)
    bad_files: list[tuple[DiskDataset, int, list[int]]] = []
    for (ds, i), (present, _, _) in zip(jobs, results):
        present = _mapped(ds, present)
        union |= present
        bad = np.flatnonzero(present & ~valid)
        if len(bad):
            bad_files.append((ds, i, bad.tolist()))
    values = np.flatnonzero(union).tolist()
    if bad_files or (num_classes == 2 and set(values) == {0, 255}):
        raise DataError(_label_error(jobs, bad_files, values, num_classes, ignore_index))
    smallest: list = []
    for ds in datasets:
        sizes = [(min(hw), hw, str(d.images[i])) for (d, i), (_, _, hw) in zip(jobs, results) if d is ds]
        smallest.append((min(sizes)[2], *min(sizes)[1]) if sizes else None)  # (path, h, w)
    record = {"ok": True, "samples": len(jobs), "values": values, "smallest": smallest}
    cached = f"cached in {cache}" if write_cache(cache, record) else "not cached"
    log.info("label check: %d samples ok (values %s; %s)", len(jobs), values, cached)
    return smallest


def _label_error(jobs: list, bad_files: list, values: list[int], num_classes: int, ignore_index: int) -> str:
    """The one-line label-check error: the first bad mask, its values and the fix."""
    head = f"label check failed: mask values must be in [0, {num_classes}) or data.ignore_index={ignore_index}; "
    more = f" ({len(bad_files)} masks affected)" if len(bad_files) > 1 else ""
    tail = " (data.check_labels=false skips this check)"
    if num_classes == 2 and set(values) == {0, 255}:
        ds, i = jobs[0]
        what = (
            f"{bad_files[0][0].masks[bad_files[0][1]]} has values {bad_files[0][2]}"
            if bad_files
            else f"every mask holds only 0 and 255 (= data.ignore_index), e.g. {ds.masks[i]}, so class 1 never appears"
        )
        return f"{head}{what}{more}; masks look binary 0/255: set data.label_map={{255:1}}{tail}"
    ds, i, bad = bad_files[0]
    return f"{head}{value_problem(ds, i, bad, num_classes, ignore_index)}{more}{tail}"
