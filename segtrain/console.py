"""The console: output that can never stop a run, and error lines that stay one short line.

* :func:`protect_std_streams` wraps ``sys.stdout`` and ``sys.stderr`` so that a closed pipe
  (``segtrain | head -1``), a full device (``> /dev/full``) or any other write error ends console output
  quietly instead of raising into logging, tqdm or ``print``: the first failure is noted once in the run's
  log file, the stream's file descriptor is pointed at ``/dev/null`` (so nothing buffered fails again at
  exit), and the run goes on with its file log.
  A standard stream closed before the start (``2>&-``: Python then has no ``sys.stderr``) becomes
  ``/dev/null``, its file descriptor too, so that no file the run opens later takes descriptor 0, 1 or 2
  (where C libraries and child processes would write into it); a character the terminal's encoding cannot
  show (``LC_ALL=C`` with a non-ASCII path) is escaped, not fatal.
* :func:`quiet_background_threads` routes an ``OSError`` in a background thread (TensorBoard's event
  writer on a full disk, a tqdm monitor ...) or in a finaliser into the log file instead of a traceback on
  the console: the thread's owner notices and says so in one line (a logger is switched off).
* :func:`out_of_memory` recognises an out-of-memory error (CUDA, CPU allocator, numpy) by type and message,
  for the CLI's exit code 5.
* :func:`error_line` folds a message into one line of at most :data:`MAX_LINE` characters; the full text
  goes to the run's log file (:func:`to_log_files`) and the line says where.

Imports the standard library, OmegaConf and :mod:`segtrain.errors` only: the command line loads it before Hydra
parses its arguments.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
import threading
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from segtrain.errors import cause_chain

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
                try:
                    return self._stream.write(text)
                except UnicodeEncodeError:  # a character the stream's encoding lacks (LC_ALL=C): escaped, not fatal
                    enc = getattr(self._stream, "encoding", None) or "ascii"
                    return self._stream.write(text.encode(enc, "backslashreplace").decode(enc, "replace"))
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


def _fill_closed_descriptors() -> None:
    """Point a closed descriptor 0, 1 or 2 at ``/dev/null``: otherwise the next file opened (a log, a
    checkpoint) gets it, and whatever writes to "stderr" below Python (a C++ warning, a child process) writes
    into that file."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            try:
                null = os.open(os.devnull, os.O_RDONLY if fd == 0 else os.O_WRONLY)
                if null != fd:
                    os.dup2(null, fd)
                    os.close(null)
            except OSError:
                pass


def protect_std_streams() -> None:
    """Make the standard streams safe for the rest of the process (once; before logging is configured):
    closed descriptors and missing streams become ``/dev/null``, ``sys.stdout`` and ``sys.stderr`` are
    wrapped in :class:`QuietStream` and escape what their encoding cannot write, and background threads
    fail quietly (:func:`quiet_background_threads`)."""
    _fill_closed_descriptors()
    if sys.stdin is None:  # `0<&-`: nothing reads it, but code that checks sys.stdin.isatty() must not fail
        sys.stdin = open(os.devnull)  # noqa: SIM115 - for the life of the process
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if isinstance(stream, QuietStream):
            continue
        if stream is None:  # closed when Python started: the output goes nowhere
            stream = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
        try:  # a path that is not valid in the locale's encoding: its bytes, as the file system has them
            stream.reconfigure(errors="surrogateescape")
        except (AttributeError, ValueError, OSError):
            pass
        setattr(sys, name, QuietStream(stream, name))
    quiet_background_threads()


def is_terminal(stream) -> bool:
    """``stream.isatty()``, False for a missing (None), closed or odd stream."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _thread_failed(args) -> None:
    """``threading.excepthook``: an error in a background thread goes into the log file with its traceback,
    not onto the console.  An OSError (a full disk under TensorBoard's event writer) is reported by the
    thread's owner (the logger is switched off at its next call); anything else gets one warning line on
    stderr.  With no log file to take it (segtrain used as a library), Python shows it as usual."""
    if args.exc_value is None or not log_files():
        threading.__excepthook__(args)
        return
    name = args.thread.name if args.thread is not None else "?"
    msg = f"background thread {name} failed ({type(args.exc_value).__name__}: {first_line(args.exc_value, 120)})"
    if isinstance(args.exc_value, OSError):
        to_log_files(logging.WARNING, msg, args.exc_value)
        return
    to_log_files(logging.ERROR, msg, args.exc_value)
    where = short_path(_relative(log_files()[0]), 60)
    print(error_line("segtrain: warning: ", f"{msg}; the traceback is in {where}"), file=sys.stderr, flush=True)


def _unraisable(args) -> None:
    """``sys.unraisablehook``: an OSError in a finaliser (a file flushed onto a full disk as it is collected)
    goes into the log file, not the console."""
    if isinstance(args.exc_value, OSError) and log_files():
        where = f" in {args.object!r}"[:120] if args.object is not None else ""
        to_log_files(logging.WARNING, f"ignored{where}: {first_line(args.exc_value)}", args.exc_value)
        return
    sys.__unraisablehook__(args)


def quiet_background_threads() -> None:
    """Install :func:`_thread_failed` and :func:`_unraisable` (once)."""
    threading.excepthook = _thread_failed
    sys.unraisablehook = _unraisable


_OOM_TEXT = (
    "out of memory",  # CUDA, HIP, MPS
    "can't allocate memory",  # torch's DefaultCPUAllocator
    "cannot allocate memory",  # ENOMEM
    "insufficient memory",  # OpenCV's cv2.error (-4: Insufficient memory)
    "is killed by signal: killed",  # a DataLoader worker killed by the kernel's out-of-memory killer
)


def out_of_memory(exc: BaseException) -> str | None:
    """``"GPU"`` or ``"CPU"`` when ``exc`` (or its cause) is an out-of-memory error: ``torch.OutOfMemoryError``
    (CUDA), an allocator's error (torch's ``DefaultCPUAllocator: can't allocate memory``, MPS, OpenCV), a
    Python / numpy ``MemoryError`` or ENOMEM (a loader worker that cannot be forked); else None."""
    for e in cause_chain(exc):
        text = str(e).lower()
        if type(e).__name__ == "OutOfMemoryError" or ("out of memory" in text and ("cuda" in text or "mps" in text)):
            return "GPU"
        if isinstance(e, MemoryError) or (isinstance(e, OSError) and e.errno == errno.ENOMEM):
            return "CPU"
        if not isinstance(e, OSError) and any(t in text for t in _OOM_TEXT):  # RuntimeError, cv2.error ...
            return "CPU"
    return None


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
    """``path`` relative to the working directory when it lies below it, else as it is."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


_COLOURS = re.compile(r"\x1b\[[0-9;]*m")  # terminal colour codes (torch.export puts them in its errors)


def first_line(exc: BaseException | str, limit: int | None = 160, lines: int = 1) -> str:
    """The first ``lines`` non-empty lines of ``exc``'s message (an exception, or its text) joined, without terminal
    colour codes; the exception's type name when there is no text.  At most ``limit`` characters (a cut ends in
    "…"); ``limit=None``: the whole line(s).  The one way any segtrain message quotes an error."""
    text = _COLOURS.sub("", str(exc))
    found = [ln.strip() for ln in text.splitlines() if ln.strip()][:lines]
    text = " ".join(found) if found else type(exc).__name__
    return text if limit is None or len(text) <= limit else text[: limit - 1] + "…"


def _plain(value):
    value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    return getattr(value, "value", value)  # an Enum (device.precision): its name


def oom_message(cfg: DictConfig, precision: str | None, where: str, prog: str = "segtrain", kind: str = "GPU") -> str:
    """Advice for an out-of-memory error of ``prog`` (``kind``: ``GPU`` or ``CPU`` memory): what ran out, and
    the settings that shrink that job.  ``where``: "at step N" or "in validation" for a training run ("" when
    not known)."""

    def get(key: str, default=None):
        return _plain(OmegaConf.select(cfg, key, default=default)) if cfg is not None else default

    memory = "GPU memory" if kind == "GPU" else "memory (RAM)"
    precision = precision or get("device.precision")
    slide = "eval.mode=slide with a smaller eval.crop_size"
    n_info, n_predict = get("info.batch_size", 8), get("predict.batch_size", 8)
    size = f" (now {get('info.size')})" if get("info.size") else ""
    b, k = get("data.batch_size", 16), get("trainer.accumulate", 1)
    fixes = {
        "segtrain-info": f"info.batch_size={max(1, n_info // 2)} (now {n_info}), a smaller info.size{size}, or "
        "info.latency=false (parameters and FLOPs only)",
        "segtrain-predict": f"predict.batch_size={max(1, n_predict // 2)} (now {n_predict}), a smaller "
        f"data.val_size, {slide}, or fewer eval.scales",
        "segtrain-eval": f"data.val_batch_size=1, {slide}, a smaller data.val_size, or fewer eval.scales",
        "segtrain-export": f"smaller check_sizes (now {get('check_sizes')})",
        "in validation": f"{slide}, a smaller data.val_size, or data.val_batch_size=1",
        "training": f"data.batch_size={max(1, b // 2)} trainer.accumulate={2 * k} (same effective batch), "
        + ("device.precision=fp16, " if kind == "GPU" and precision == "fp32" else "")
        + ("fewer data.num_workers, " if kind == "CPU" else "")
        + "or a smaller data.crop_size",
    }
    if prog != "segtrain":
        setting = f" (precision {precision})" if precision not in (None, "auto") else ""
        return f"out of {memory}{setting}: try {fixes.get(prog, 'a smaller batch or input size')}"
    fix = fixes["in validation" if where == "in validation" else "training"]
    settings = f"data.batch_size={b}, crop {get('data.crop_size')}, precision {precision}, model {get('model.name')}"
    return f"out of {memory}{f' {where}' if where else ''} ({settings}): try {fix}"
