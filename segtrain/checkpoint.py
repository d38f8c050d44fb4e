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
import stat
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segtrain.errors import CheckpointError
from segtrain.utils import atomic_write

if TYPE_CHECKING:
    import torch

# torch and numpy load in the functions that use them: checkpoint_file and inspect check a path before a
# command's run dir is made (segtrain.rundir), where torch is not loaded yet.


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` through :func:`segtrain.utils.atomic_write`: the old file or the complete new one."""
    import torch

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
        import shutil

        shutil.copy2(source, tmp)
    os.replace(tmp, target)


def remove_stale_temporaries(folder: str | Path) -> None:
    """Delete ``.*.tmp`` files a killed process left behind (never a complete checkpoint)."""
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


EXAMPLE = "outputs/DATE/TIME/checkpoints/best.pt"


KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
)


def _kind(path: Path) -> str:
    """What a path that is not a regular file is, in words."""
    mode = path.stat().st_mode
    return next((kind for test, kind in KINDS if test(mode)), "not a regular file")


def checkpoint_file(value: str | Path, key: str | None = None) -> Path:
    """The checkpoint file that ``key=value`` names (``key``: ``ckpt``, ``trainer.resume``, ``model.init_from``;
    None: a path given in code).  A one-line CheckpointError says what the path is instead (missing, a broken
    link, a directory, a device or FIFO) and what was expected; a directory that holds a run's checkpoints is
    answered with the file to give."""
    path = Path(value).expanduser()
    shown = f"{key}={value}" if key else str(value)
    if path.is_file():
        return path
    if path.is_symlink() and not path.exists():
        raise CheckpointError(f"{shown} is a broken symbolic link (to {os.readlink(path)}); give a .pt checkpoint file")
    if not path.exists():
        raise CheckpointError(f"{shown}: no such file (a .pt checkpoint is expected, e.g. {EXAMPLE})")
    kind = _kind(path)
    if kind == "a directory":
        name = "last.pt" if key == "trainer.resume" else "best.pt"
        candidates = [path / "checkpoints" / name, path / name, *sorted(path.glob("checkpoints/*.pt"))]
        found = [p for p in [*candidates, *sorted(path.glob("*.pt"))] if p.is_file()]
        if not found:
            raise CheckpointError(f"{shown} is a directory, not a checkpoint file, and holds none; give a .pt file")
        hint = f"{key}={found[0]}" if key else str(found[0])
        if key == "trainer.resume" and (path / "checkpoints" / "last.pt").is_file():
            hint += " (or trainer.resume=auto with hydra.run.dir set to it)"
        raise CheckpointError(f"{shown} is a directory, not a checkpoint file; give the file in it: {hint}")
    raise CheckpointError(f"{shown} is {kind}, not a checkpoint file; give a .pt checkpoint, e.g. {EXAMPLE}")


TORCHSCRIPT_MEMBERS = ("constants.pkl", "code/")  # in every torch.jit.save archive, in no torch.save one


def inspect(path: Path, shown: str | None = None) -> None:
    """A CheckpointError for a file that cannot be a segtrain checkpoint, told from its first bytes and (a zip
    archive, as ``torch.save`` writes) its list of members, without torch: empty, text, cut short, a
    TorchScript or ONNX export, or not a PyTorch file at all (files of torch < 1.6 are a pickle)."""
    shown = shown or str(path)
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {shown}: {e.strerror or e}") from None
    if head.startswith(b"\x80"):
        return
    use = "use a .pt file written by segtrain (last.pt, best.pt)"
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            raise CheckpointError(
                f"{shown} is truncated or not a segtrain checkpoint (a TorchScript/ONNX export?); {use}"
            ) from None
        if any(m in n for n in names for m in TORCHSCRIPT_MEMBERS):
            raise CheckpointError(
                f"{shown} is a TorchScript export (segtrain-export), not a training checkpoint; give the .pt "
                f"checkpoint it was exported from (e.g. {EXAMPLE})"
            )
        return
    if head.startswith(b"\x08") and (b"pytorch" in head or b"onnx" in head.lower() or path.suffix == ".onnx"):
        raise CheckpointError(
            f"{shown} is an ONNX export (segtrain-export), not a training checkpoint; give the .pt checkpoint it "
            f"was exported from (e.g. {EXAMPLE})"
        )
    if not head:
        raise CheckpointError(f"checkpoint {shown} is an empty file; {use}")
    text = head.decode("utf-8", "replace")
    printable = sum(c.isprintable() or c.isspace() for c in text) / len(text) > 0.9
    quoted = f" (it starts with {' '.join(text.split())[:40]!r})" if printable else ""
    kind = "a text file" if printable else "not a PyTorch file"
    raise CheckpointError(f"{shown} is {kind}, not a checkpoint{quoted}; {use}")


def load(path: str | Path, map_location: str | torch.device = "cpu", require_model: bool = True) -> Any:
    """Load a checkpoint with ``weights_only=True``; every failure is a one-line CheckpointError (complete:
    torch's own text goes to the log with the traceback), and torch's warnings about the file are not printed.

    ``require_model=False`` also accepts files that are not segtrain checkpoints (plain state dicts)."""
    import torch

    path = checkpoint_file(path)
    inspect(path)
    try:
        with warnings.catch_warnings():  # e.g. "received a zip file that looks like a TorchScript archive"
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        what = re.search(r"unsupported GLOBAL ([\w.]+)|Unsupported global: GLOBAL ([\w.]+)", str(e))
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        detail = f"it would call {what.group(1) or what.group(2)}" if what else first[:120]
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
    import numpy as np
    import torch

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
    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]  # older checkpoints hold a list, one per visible GPU: the first
        torch.cuda.set_rng_state((cuda[0] if isinstance(cuda, (list, tuple)) else cuda).cpu())
