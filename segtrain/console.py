"""The console: output that can never stop a run, and error lines that stay one short line.

* :func:`protect_std_streams` wraps ``sys.stdout`` and ``sys.stderr`` so that a closed pipe
  (``segtrain | head -1``), a full device (``> /dev/full``) or any other write error ends console output
  quietly instead of raising into logging, tqdm or ``print``: the first failure is noted once in the run's
  log file, the stream's file descriptor is pointed at ``/dev/null`` (so nothing buffered fails again at
  exit), and the run goes on with its file log.
* :func:`error_line` folds a message into one line of at most :data:`MAX_LINE` characters; the full text
  goes to the run's log file (:func:`to_log_files`) and the line says where.

Imports only the standard library: the CLI loads it before Hydra parses the command line.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

MAX_LINE = 300  # characters in any error line the CLI prints


class QuietStream:
    """A text stream that swallows write errors (EPIPE, ENOSPC, EIO ...) and then discards its output."""

    def __init__(self, stream, name: str):
        self._stream, self._name = stream, name
        self.failed: OSError | None = None

    def _fail(self, error: OSError) -> None:
        if self.failed is not None:
            return
        self.failed = error
        try:  # later writes (and the interpreter's final flush of what is buffered) go nowhere, without error
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass
        reason = error.strerror or type(error).__name__
        to_log_files(logging.WARNING, f"{self._name} failed ({reason}): console output stops here, this log goes on")

    def write(self, text: str) -> int:
        if self.failed is None:
            try:
                return self._stream.write(text)
            except (OSError, ValueError) as e:  # ValueError: the stream was closed
                self._fail(e if isinstance(e, OSError) else OSError(str(e)))
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if self.failed is None:
            try:
                self._stream.flush()
            except (OSError, ValueError) as e:
                self._fail(e if isinstance(e, OSError) else OSError(str(e)))

    def isatty(self) -> bool:
        try:
            return self.failed is None and self._stream.isatty()
        except (OSError, ValueError):
            return False

    def __getattr__(self, name: str):  # fileno, encoding, errors, buffer ...
        return getattr(self._stream, name)


def protect_std_streams() -> None:
    """Wrap ``sys.stdout`` and ``sys.stderr`` in :class:`QuietStream` (once; before logging is configured)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, QuietStream):
            setattr(sys, name, QuietStream(stream, name))


def log_files() -> list[str]:
    """The files the root logger writes to (the run dir's job log under Hydra)."""
    handlers = logging.getLogger().handlers
    return [h.baseFilename for h in handlers if isinstance(h, logging.FileHandler) and h.baseFilename != os.devnull]


def to_log_files(level: int, msg: str, exc: BaseException | None = None) -> None:
    """Write ``msg`` (and ``exc``'s traceback) to the log files only, never to the console."""
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    record = logging.getLogger("segtrain").makeRecord("segtrain", level, __file__, 0, msg, (), exc_info)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            try:
                handler.handle(record)
            except Exception:  # noqa: BLE001 - a log that cannot be written must not hide the error itself
                pass


def short_path(path: str | Path, limit: int = 90) -> str:
    """``path`` with its middle elided when it is longer than ``limit`` characters."""
    text = str(path)
    if len(text) <= limit:
        return text
    keep = (limit - 1) // 2
    return f"{text[:keep]}…{text[-keep:]}"


_PATH = re.compile(r"[^\s,;'\"()\[\]{}]*/[^\s,;'\"()\[\]{}]*")


def _shorten_paths(msg: str, keep: int = 2) -> str:
    """Long paths in ``msg`` cut to their last ``keep`` parts: ``/data/a/b/c/masks/x.png`` -> ``…/masks/x.png``;
    a ``key=`` in front of one stays, and URLs stay whole (a cut one cannot be used)."""

    def cut(m: re.Match) -> str:
        text = m.group(0)
        key, _, path = text.rpartition("=") if "=" in text.split("/", 1)[0] else ("", "", text)
        parts = path.rstrip("/.").split("/")
        if "://" in text or len(path) <= 40 or len(parts) <= keep:
            return text
        return f"{key}{'=' if key else ''}…/" + "/".join(parts[-keep:])

    return _PATH.sub(cut, msg)


def error_line(prefix: str, msg: str, exc: BaseException | None = None) -> str:
    """``prefix + msg`` as one line of at most MAX_LINE characters (long paths shortened first, then the middle
    cut: what is wrong comes first and the fix last, so both stay); the full text, and ``exc``'s traceback, go
    to the log files."""
    msg = " ".join(str(msg).split())
    files = log_files()
    if exc is not None or len(prefix) + len(msg) > MAX_LINE:
        to_log_files(logging.ERROR, prefix + msg, exc)
    if len(prefix) + len(msg) <= MAX_LINE:
        return prefix + msg
    note = f" (full message in {short_path(_relative(files[0]), 60)})" if files else ""
    msg = _shorten_paths(msg)
    room = MAX_LINE - len(prefix) - len(note)
    if len(msg) > room:
        head = (room - 3) * 3 // 5
        msg = msg[:head].rstrip() + " … " + msg[len(msg) - (room - 3 - head) :].lstrip()
    return prefix + msg + note


def _relative(path: str) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return path


def first_line(exc: BaseException, limit: int = 160, lines: int = 1) -> str:
    """The first ``lines`` non-empty lines of ``exc``'s message joined (its type name when empty), at most
    ``limit`` characters."""
    found = [ln.strip() for ln in str(exc).splitlines() if ln.strip()][:lines]
    text = " ".join(found) if found else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
