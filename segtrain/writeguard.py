"""What ``segtrain-export`` and ``segtrain-predict`` may write over, checked before any work starts.

* A file the command did not write in this same run is never replaced unless the user says so
  (``overwrite=true``): an earlier export, an earlier prediction, a file of the user's.
* Never, not even with ``overwrite=true``: a segtrain checkpoint (any ``torch.save`` file), an input of
  the command (the ``ckpt``, an input image; symbolic and hard links included), or a file of a run dir
  (a training run's ``checkpoints/``, ``metrics.json``, ``status.json``, ``.hydra/``, logs, ``tb/`` ...).

Also: :func:`describe` names what a path is when it is not a regular file (a folder, a FIFO, a device).
(A Ctrl-C or SIGTERM stops these commands cleanly, even inside the ONNX exporter: :class:`segtrain.signals.Interrupts`.)
Imports the standard library and PIL only.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from segtrain.files import describe, is_checkpoint

# A run dir (of any segtrain command) holds one of these; its own entries (below) are never written over.
RUN_MARKERS = (".hydra", ".segtrain.lock", "status.json", "metrics.json", "multirun.yaml")
RUN_DIRS = ("checkpoints", ".hydra", "tb", "mlruns", "wandb", "previous-*")  # no output goes in there
RUN_FILES = (
    "metrics.json",
    "status.json",
    "loggers.json",
    "metrics.csv",
    "*.log",
    ".segtrain.lock*",
    "confusion_matrix.png",
    "per_class_iou.png",
    "predictions.png",
    "multirun.yaml",
    "summary.csv",
    "summary.md",
)


def _run_roots(folder: Path, cache: dict[Path, list[Path]]) -> list[Path]:
    """The run dirs ``folder`` is in or below (itself included), nearest first."""
    if folder in cache:
        return cache[folder]
    here = [folder] if any(os.path.lexists(folder / m) for m in RUN_MARKERS) or _has_checkpoints(folder) else []
    above = [] if folder.parent == folder else _run_roots(folder.parent, cache)
    cache[folder] = here + above
    return cache[folder]


def _has_checkpoints(folder: Path) -> bool:
    try:
        return any(p.suffix == ".pt" for p in (folder / "checkpoints").iterdir())
    except OSError:
        return False


def run_file(path: Path, cache: dict[Path, list[Path]] | None = None) -> tuple[Path, str] | None:
    """(run dir, entry) when ``path`` (absolute, links resolved) is or would be one of a run dir's own
    files (``checkpoints/...``, ``metrics.json``, ``.hydra/...``, a log ...), else None."""
    cache = {} if cache is None else cache
    for root in _run_roots(path.parent, cache):
        parts = path.relative_to(root).parts
        if len(parts) > 1 and any(fnmatch.fnmatch(parts[0], d) for d in RUN_DIRS):
            return root, f"{parts[0]}/"
        if len(parts) == 1 and any(fnmatch.fnmatch(parts[0], f) for f in RUN_FILES):
            return root, parts[0]
    return None


def file_ids(paths: Iterable[Path]) -> dict[tuple[int, int], Path]:
    """(device, inode) -> path of the files that exist: the same file under another name or link."""
    ids = {}
    for p in paths:
        with contextlib.suppress(OSError):
            st = os.stat(p)
            ids.setdefault((st.st_dev, st.st_ino), p)
    return ids


class Refusal:
    """Why one output path may not be written (``what``: 'is a checkpoint', 'is in checkpoints/ of the
    training run R' ...): ``hard`` (a checkpoint, an input, a run file: never) or not (a file this command did
    not write: only with overwrite=true)."""

    def __init__(self, path: Path, what: str, hard: bool):
        self.path, self.what, self.hard = path, what, hard


def _run_kind(root: Path) -> str:
    training = _has_checkpoints(root) or (root / "metrics.json").is_file()
    return f"the training run {root}" if training else f"the run dir {root}"


def refusal(path: Path, inputs: dict[tuple[int, int], Path], cache: dict) -> Refusal | None:
    """Why the command may not write ``path`` (None: it may).  ``inputs``: :func:`file_ids` of the command's
    inputs, with what each is ('the checkpoint ckpt=...', 'the input image ...')."""
    absolute = Path(os.path.abspath(path))
    if os.path.lexists(absolute):
        with contextlib.suppress(OSError):
            st = os.stat(absolute)
            if (st.st_dev, st.st_ino) in inputs:
                return Refusal(path, f"is {inputs[(st.st_dev, st.st_ino)]}", True)
        if is_checkpoint(absolute):
            return Refusal(path, "is a checkpoint", True)
    for candidate in dict.fromkeys((absolute, absolute.resolve())):
        found = run_file(candidate, cache)
        if found is not None:
            root, entry = found
            where = f"in {entry}" if entry.endswith("/") else entry
            return Refusal(path, f"is {where} of {_run_kind(root)}", True)
    what = describe(absolute)
    if what is not None and not what.startswith("a broken"):
        return Refusal(path, f"is {what}", True)  # a folder, a FIFO ...: nothing to replace
    if not os.path.lexists(absolute):
        return None
    return Refusal(path, "is a file this command did not write", False)


def check_outputs(paths: Iterable[Path], inputs: dict, overwrite: bool, earlier=None) -> list[Refusal]:
    """The refusals of ``paths``: every hard one, and the soft ones when not ``overwrite`` (hard first).
    ``earlier(path)``: what an existing file is when the command wrote it in an earlier run ('an earlier
    prediction'), or None; asked of the first refusal only, when it is a soft one (the message names it)."""
    cache: dict[Path, list[Path]] = {}
    found = [r for r in (refusal(p, inputs, cache) for p in paths) if r is not None]
    refused = sorted((r for r in found if r.hard or not overwrite), key=lambda r: not r.hard)
    if refused and not refused[0].hard and earlier is not None:
        known = earlier(Path(os.path.abspath(refused[0].path)))
        refused[0].what = f"is {known}" if known else refused[0].what
    return refused


PREDICTION_MARK = "segtrain-predict"  # the PNG masks' Software text and the overlays' JPEG comment


def earlier_prediction(path: Path) -> bool:
    """Whether ``path`` is a mask, overlay or probabilities file that segtrain-predict wrote (its mark; a
    ``.npy`` by its mask's)."""

    path = Path(path)
    if path.suffix.lower() == ".npy":
        path = path.with_suffix(".png")
    if path.suffix.lower() not in (".png", ".jpg"):
        return False
    try:
        with Image.open(path) as im:
            mark = im.info.get("Software") if im.format == "PNG" else im.info.get("comment")
    except Exception:  # noqa: BLE001 - unreadable: not ours
        return False
    mark = mark.decode("latin-1") if isinstance(mark, bytes) else str(mark or "")
    return mark.startswith(PREDICTION_MARK)


OUTPUT_SUFFIXES = {"mask": ".png", "overlay": "_overlay.jpg", "probs": ".npy"}  # appended to an image's stem
