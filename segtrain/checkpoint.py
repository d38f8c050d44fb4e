"""Checkpoints: atomic writes, safe loads.

A checkpoint is a dict of tensors and plain Python values only, so it loads
with ``torch.load(weights_only=True)``: a file whose pickle would construct
arbitrary objects (and so could run code) is refused.  Writes go to a
temporary file in the same directory, are fsynced, and are then renamed over
the target, so a crash at any moment leaves either the old or the new file.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from segtrain.config import SegtrainConfig
from segtrain.console import first_line
from segtrain.errors import CheckpointError
from segtrain.files import checkpoint_file, inspect
from segtrain.utils import atomic_write


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` through :func:`segtrain.utils.atomic_write`: the old file or the complete new one."""
    atomic_write(path, lambda f: torch.save(obj, f))


def numbered(path: Path, i: int) -> Path:
    """``last.pt`` -> ``last-1.pt`` (i=1) ...; i=0 is the path itself."""
    return path if i == 0 else path.with_name(f"{path.stem}-{i}{path.suffix}")


def save_rotating(obj: Any, path: str | Path, keep: int) -> None:
    """Atomically replace ``path``, keeping its ``keep`` previous versions as ``NAME-1.pt`` ... ``NAME-keep.pt``.

    The current file is hard-linked (copied where links fail) to ``NAME-1.pt`` before the new one is
    renamed over it, so at every moment ``path`` holds a complete checkpoint.
    """
    path = Path(path)
    if keep > 0 and path.is_file():
        for i in range(keep - 1, 0, -1):
            if numbered(path, i).is_file():
                os.replace(numbered(path, i), numbered(path, i + 1))
        link_atomic(path, numbered(path, 1))
    save_atomic(obj, path)


def link_atomic(source: str | Path, target: str | Path) -> None:
    """Make ``target`` a hard link to ``source`` (a copy where links fail), replacing it atomically."""
    source, target = Path(source), Path(target)
    tmp = target.with_name(f".{target.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copy2(source, tmp)
    os.replace(tmp, target)


def remove_stale_temporaries(folder: str | Path) -> None:
    """Delete ``.*.tmp`` files a killed process left behind (never a complete checkpoint)."""
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def load(path: str | Path, map_location: str | torch.device = "cpu", require_model: bool = True) -> Any:
    """Load a checkpoint with ``weights_only=True``; every failure is a one-line CheckpointError (complete:
    torch's own text goes to the log with the traceback), and torch's warnings about the file are not printed.

    ``require_model=False`` also accepts files that are not segtrain checkpoints (plain state dicts)."""
    path = checkpoint_file(path)
    inspect(path)
    try:
        with warnings.catch_warnings():  # e.g. "received a zip file that looks like a TorchScript archive"
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        what = re.search(r"unsupported GLOBAL ([\w.]+)|Unsupported global: GLOBAL ([\w.]+)", str(e))
        detail = f"it would call {what.group(1) or what.group(2)}" if what else first_line(e, 120)
        raise CheckpointError(
            f"refusing to load {path}: it holds objects other than tensors and plain values ({detail}); "
            "only load checkpoints you trust, and re-save their state_dict"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path} is truncated or not a segtrain checkpoint (a TorchScript/ONNX export?): torch cannot read "
            f"it ({type(e).__name__}); use a .pt file written by segtrain (last.pt, best.pt)"
        ) from e
    if require_model and (not isinstance(obj, dict) or "model" not in obj):
        raise CheckpointError(f"{path} is not a segtrain checkpoint (no 'model' entry)")
    return obj


# ---------------------------------------------------------------------------
# RNG state as plain tensors/values (numpy's state is a tuple with an ndarray,
# which weights_only refuses, so it is stored as a tensor).


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # the training device's generator only (under DDP each rank's current device; every rank is seeded
        # alike): the states of all visible GPUs would not fit a machine that shows fewer
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def load_checkpoint(path: str | Path) -> tuple[dict, DictConfig]:
    """A segtrain checkpoint (:func:`load`) and the config it was trained with, typed by the schema: what eval,
    predict, export and info start from."""
    path = Path(path).expanduser()
    state = load(path)
    if "config" not in state:
        raise CheckpointError(f"{path} holds no stored config (not written by segtrain's trainer)")
    return state, OmegaConf.merge(OmegaConf.structured(SegtrainConfig), stored_config(state))


def stored_config(state: dict) -> DictConfig:
    """The config a checkpoint was trained with (empty when absent or unparsable: weights still count)."""
    try:
        return OmegaConf.create(state.get("config") or {})
    except Exception:
        return OmegaConf.create({})
