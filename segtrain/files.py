"""What a path is, told without torch: before a command creates its run dir, every path it was given is checked.

* :func:`describe`: what a path that is not a regular file is, in words (a directory, a FIFO, a broken link ...);
* :func:`is_checkpoint`: whether a file is a ``torch.save`` file (a checkpoint or a state dict);
* :func:`checkpoint_file`: the file ``key=value`` names, or a one-line CheckpointError saying what the path is
  instead and which file to give;
* :func:`inspect`: a CheckpointError for a file that cannot be a segtrain checkpoint (empty, text, cut short, a
  TorchScript or ONNX export), from its first bytes and its zip members.

Imports only the standard library.
"""

from __future__ import annotations

import os
import stat
import zipfile
from pathlib import Path

from segtrain.errors import CheckpointError

EXAMPLE = "outputs/DATE/TIME/checkpoints/best.pt"
TORCHSCRIPT_MEMBERS = ("constants.pkl", "code/")  # in every torch.jit.save archive, in no torch.save one
KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def describe(path: str | Path) -> str | None:
    """What ``path`` is when it exists but is not a regular file: 'a directory', 'a FIFO (named pipe)', 'a broken
    symbolic link (to ...)' ...; None for a regular file (through links) or a path that does not exist."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return f"a broken symbolic link (to {os.readlink(path)})" if os.path.islink(path) else None
    except OSError as e:
        return f"a path that cannot be read ({e.strerror or e})"
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in KINDS if test(mode)), "not a regular file")


def zip_members(path: Path) -> list[str] | None:
    """The member names of a zip archive (``torch.save`` writes one), or None when it cannot be read as one."""
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return None


def _torchscript(names: list[str]) -> bool:
    return any(m in n for n in names for m in TORCHSCRIPT_MEMBERS)


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a ``torch.save`` file (a zip archive with a ``data.pkl`` and no TorchScript code, or a
    legacy pickle): a checkpoint or a state dict."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    if head.startswith(b"\x80"):
        return True
    names = zip_members(Path(path)) if head.startswith(b"PK") else None
    return bool(names) and any(n.endswith("data.pkl") for n in names) and not _torchscript(names)


def checkpoint_file(value: str | Path, key: str | None = None) -> Path:
    """The checkpoint file that ``key=value`` names (``key``: ``ckpt``, ``trainer.resume``, ``model.init_from``;
    None: a path given in code).  A one-line CheckpointError says what the path is instead (missing, a broken
    link, a directory, a device or FIFO) and what was expected; a directory that holds a run's checkpoints is
    answered with the file to give."""
    path = Path(value).expanduser()
    shown = f"{key}={value}" if key else str(value)
    kind = describe(path)
    if kind is None and path.is_file():
        return path
    if kind is None:
        raise CheckpointError(f"{shown}: no such file (a .pt checkpoint is expected, e.g. {EXAMPLE})")
    if kind.startswith("a broken"):
        raise CheckpointError(f"{shown} is {kind}; give a .pt checkpoint file")
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


def inspect(path: Path, shown: str | None = None) -> None:
    """A CheckpointError for a file that cannot be a segtrain checkpoint, told from its first bytes and (a zip
    archive, as ``torch.save`` writes) its list of members: empty, text, cut short, a TorchScript or ONNX
    export, or not a PyTorch file at all (files of torch < 1.6 are a pickle)."""
    shown = shown or str(path)
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {shown}: {e.strerror or e}") from None
    if head.startswith(b"\x80"):
        return
    use = "use a .pt file written by segtrain (last.pt, best.pt)"
    export = "not a training checkpoint; give the .pt checkpoint it was exported from"
    if head.startswith(b"PK"):
        names = zip_members(path)
        if names is None:
            raise CheckpointError(
                f"{shown} is truncated or not a segtrain checkpoint (a TorchScript/ONNX export?); {use}"
            )
        if _torchscript(names):
            raise CheckpointError(f"{shown} is a TorchScript export (segtrain-export), {export} (e.g. {EXAMPLE})")
        return
    if head.startswith(b"\x08") and (b"pytorch" in head or b"onnx" in head.lower() or path.suffix == ".onnx"):
        raise CheckpointError(f"{shown} is an ONNX export (segtrain-export), {export} (e.g. {EXAMPLE})")
    if not head:
        raise CheckpointError(f"checkpoint {shown} is an empty file; {use}")
    text = head.decode("utf-8", "replace")
    printable = sum(c.isprintable() or c.isspace() for c in text) / len(text) > 0.9
    quoted = f" (it starts with {' '.join(text.split())[:40]!r})" if printable else ""
    kind = "a text file" if printable else "not a PyTorch file"
    raise CheckpointError(f"{shown} is {kind}, not a checkpoint{quoted}; {use}")
