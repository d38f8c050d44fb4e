"""The run dir belongs to one run.

* :func:`claim` (the command line's Hydra callback, :class:`segtrain.apps.guard.RunDirGuard`, calls it before
  Hydra writes anything into the run dir; :func:`segtrain.build.build_run` calls it again, a no-op then, so the
  Python API is covered too):

  - the path must be a directory this process can create and write, else a one-line
    :class:`OutputError` (exit 4) that says to change ``hydra.run.dir``;
  - a lock file (``.segtrain.lock``: pid, host, start time, command line) makes a second process on the
    same dir fail at once, naming the pid; a lock whose process is gone (same host) is taken over with a
    warning; under DDP only rank 0 claims;
  - a dir that already holds checkpoints or ``metrics.json`` is refused unless the run continues it
    (``trainer.resume=auto``, or a ``trainer.resume`` path inside it) or starts over
    (``trainer.overwrite=true``: the old files move to ``previous-<timestamp>/`` in the run dir, never
    deleted).

* :func:`unique_dir` (the ``unique_dir`` resolver of ``configs/config.yaml``'s ``hydra.run.dir`` and
  ``hydra.sweep.dir``): the default ``outputs/DATE/TIME``, or ``TIME_2``, ``TIME_3`` ... when another run
  created that dir first (atomic mkdir: two runs started in the same second get two dirs).
* :func:`check_writable`: free space for the checkpoints.

Imports the standard library and Hydra only: the command line's callback uses it before torch is loaded.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig

from segtrain.console import log_files, short_path, to_log_files
from segtrain.errors import ConfigError, OutputError

log = logging.getLogger("segtrain")

LOCK_NAME = ".segtrain.lock"
OUTPUTS = ("metrics.json",)  # besides checkpoints/*.pt: files that make a dir a run's


# ---------------------------------------------------------------------------
# Unique default run dirs.

_unique: dict[str, str] = {}
_made: dict[str, list[Path]] = {}  # a unique dir -> it and the parents created for it, innermost first


def unique_dir(path: str) -> str:
    """``path`` if this process creates it, else ``path_2``, ``path_3`` ... (created here, atomically).

    Registered as the ``unique_dir`` resolver (cached per config, and memoised per process, so every
    lookup of ``hydra.run.dir`` in a run gives the same dir).  When the parent cannot be created, ``path``
    is returned unchanged and :func:`claim` reports why."""
    if path in _unique:
        return _unique[path]
    base = Path(path)
    made = [p for p in reversed(base.parents) if not p.exists()]  # removed again when the run is refused
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return path
    for i in range(1, 10_000):
        candidate = base if i == 1 else base.with_name(f"{base.name}_{i}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        except OSError:
            return path
        _unique[path] = str(candidate)
        _made[str(candidate)] = [candidate, *reversed(made)]
        return str(candidate)
    return path


def made_for(folder: str | Path) -> list[Path]:
    """The dirs :func:`unique_dir` created for the run dir ``folder`` (it and its new parents, innermost first):
    what a refused command removes again, so that it leaves nothing behind."""
    return list(_made.get(str(folder), []))


# ---------------------------------------------------------------------------
# The path itself.


def _fail(folder: Path, reason: str) -> OutputError:
    return OutputError(f"cannot use {short_path(folder)} as the run dir: {reason}; change hydra.run.dir")


def _file_above(folder: Path) -> Path | None:
    for parent in [folder, *folder.parents]:
        if parent.exists():
            return parent if not parent.is_dir() else None
    return None


def check_path(folder: Path) -> None:
    """Create ``folder`` (and its parents) or raise a one-line OutputError naming the reason."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return
    except FileExistsError:
        raise _fail(folder, "it is a file, not a directory") from None
    except NotADirectoryError:
        above = _file_above(folder)
        raise _fail(folder, f"{short_path(above) if above else 'a parent'} is a file, not a directory") from None
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            longest = max(len(p) for p in folder.parts)
            raise _fail(folder, f"a name in it is {longest} characters, longer than the file system allows") from None
        raise _fail(folder, e.strerror or str(e)) from None


def check_writable(folder: Path, num_params: int) -> None:
    """Fail before training when ``folder`` cannot take a checkpoint (permissions, or too little free space)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}.tmp"
        with open(probe, "wb") as f:
            f.write(b"0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise OutputError(
            f"cannot write to the run dir {short_path(folder)}: {e.strerror or e}; choose a writable one with "
            "hydra.run.dir=PATH"
        ) from None
    need = num_params * 4 * 3 * 3  # weights + optimizer state, for last.pt, last-1.pt and best.pt
    free = shutil.disk_usage(folder).free
    if free < need:
        raise OutputError(
            f"only {free / 2**20:.0f} MiB free in {short_path(folder)}, checkpoints need about "
            f"{need / 2**20:.0f} MiB; free space or choose another hydra.run.dir"
        )


# ---------------------------------------------------------------------------
# The lock.


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of process ``pid`` from /proc (Linux), else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], fields[19]
    except (OSError, IndexError):
        return None


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid``, to tell a reused pid apart."""
    stat = _proc_stat(pid)
    return stat[1] if stat else None


def _alive(info: dict) -> bool:
    """Whether the process that wrote the lock ``info`` still runs (True when it cannot be told)."""
    if info.get("host") != socket.gethostname():
        return True  # another machine: no way to check, so assume it runs
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    stat = _proc_stat(pid)
    if stat is None:
        return True  # no /proc: the pid exists, assume it is that run
    state, started = stat
    return state not in ("Z", "X") and info.get("proc_start") in (None, started)  # a zombie or a reused pid: gone


class Lock:
    """This process's lock on a run dir (a file created with O_EXCL, removed by :meth:`release`)."""

    def __init__(self, folder: Path):
        self.folder, self.path = folder, folder / LOCK_NAME
        self.token = f"{os.getpid()}-{time.time_ns()}"
        self.info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "proc_start": _process_start(os.getpid()),
            "token": self.token,
            "command": " ".join(sys.argv),
        }
        self.held = False
        self.notes: list[str] = []  # warnings of the claim, repeated into the run's log once it exists

    def note(self, msg: str) -> None:
        log.warning(msg)
        self.notes.append(msg)

    def _create(self) -> None:
        """Create the lock file with its content in one step: written to a temporary file, then hard-linked
        to the lock's name (which fails if it exists), so no process ever reads a half-written lock.  Where
        hard links are not supported, an exclusive create."""
        tmp = self.folder / f"{LOCK_NAME}.{self.token}.tmp"
        tmp.write_text(json.dumps(self.info))
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            raise
        except OSError:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "w") as f:
                json.dump(self.info, f)
        finally:
            tmp.unlink(missing_ok=True)

    def acquire(self) -> None:
        for _ in range(5):
            try:
                self._create()
            except FileExistsError:
                self._take_over_if_stale()
                continue
            except OSError as e:
                raise _fail(self.folder, f"cannot write in it ({e.strerror or e})") from None
            self.held = True
            return
        raise _fail(self.folder, f"cannot take its lock file {LOCK_NAME}")

    def _take_over_if_stale(self) -> None:
        try:
            info = json.loads(self.path.read_text() or "{}")
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (OSError, ValueError):
            info = {}  # torn or empty: its writer died while writing it
        if not isinstance(info, dict):
            info = {}
        if info and _alive(info):
            where = "" if info.get("host") == socket.gethostname() else f" on host {info.get('host')}"
            raise OutputError(
                f"the run dir {short_path(self.folder, 80)} is in use by pid {info.get('pid')}{where} (started "
                f"{info.get('started')}); wait for it, stop it, or change hydra.run.dir (delete {LOCK_NAME} "
                "there if that run is gone)"
            )
        stale = self.path.with_name(f"{LOCK_NAME}.stale-{self.token}")
        try:
            os.rename(self.path, stale)  # atomic: of two processes taking over, one wins
        except FileNotFoundError:
            return
        try:
            moved = json.loads(stale.read_text() or "{}")
        except (OSError, ValueError):
            moved = {}
        if moved != info:  # another process took the stale lock over meanwhile: give its lock back
            with contextlib.suppress(OSError):
                os.link(stale, self.path)
            stale.unlink(missing_ok=True)
            return
        stale.unlink(missing_ok=True)
        self.note(
            f"run dir {self.folder}: took over the lock of pid {info.get('pid', '?')} (started "
            f"{info.get('started', '?')}), which is no longer running"
        )

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            info = json.loads(self.path.read_text())
            if info.get("token") == self.token:
                self.path.unlink()
        except (OSError, ValueError):
            pass


_locks: dict[str, Lock] = {}


def release(folder: str | Path | None = None) -> None:
    """Release this process's lock on ``folder`` (every lock when None)."""
    keys = list(_locks) if folder is None else [os.path.abspath(folder)]
    for key in keys:
        lock = _locks.pop(key, None)
        if lock is not None:
            lock.release()


atexit.register(release)


# ---------------------------------------------------------------------------
# Ownership.


def run_outputs(folder: Path) -> list[str]:
    """The files that make ``folder`` a run's: checkpoints/*.pt and metrics.json."""
    found = [f"checkpoints/{p.name}" for p in sorted((folder / "checkpoints").glob("*.pt"))]
    return found + [name for name in OUTPUTS if (folder / name).is_file()]


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def move_previous(folder: Path, keep: set[str]) -> Path:
    """Move everything in ``folder`` except ``keep``, the lock and earlier ``previous-*`` into
    ``previous-<timestamp>/`` (renames within one file system: nothing is copied or deleted)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = folder / f"previous-{stamp}"
    n = 1
    while target.exists():
        n += 1
        target = folder / f"previous-{stamp}_{n}"
    target.mkdir()
    for entry in sorted(folder.iterdir()):
        if entry == target or entry.name in keep or entry.name.startswith((LOCK_NAME, "previous-")):
            continue
        os.rename(entry, target / entry.name)
    return target


def _has_last(folder: Path) -> bool:
    return any((folder / "checkpoints").glob("last*.pt"))


def _check_outputs(folder: Path, resume: str | None, overwrite: bool, keep: set[str], lock: Lock) -> None:
    found = run_outputs(folder)
    # resume=auto continues a run only when there is a last*.pt to continue from: a dir whose last*.pt are
    # gone (best.pt and metrics.json left) would otherwise be trained over from scratch
    continues = (resume == "auto" and _has_last(folder)) or (
        resume and resume != "auto" and _inside(Path(resume).expanduser(), folder)
    )
    if overwrite and resume and continues:
        raise ConfigError(
            f"trainer.overwrite=true would move away the checkpoint trainer.resume={resume} continues; drop one"
        )
    if not found or continues:
        return
    if overwrite:
        target = move_previous(folder, keep)
        lock.note(f"trainer.overwrite=true: moved the earlier run's files ({', '.join(found[:3])}) to {target}")
        return
    if resume == "auto":
        raise OutputError(
            f"the run dir {short_path(folder, 80)} holds a run ({', '.join(found[:2])}) but no last*.pt to "
            "continue; start over with trainer.overwrite=true (moves its files to previous-*/), or change hydra.run.dir"
        )
    raise OutputError(
        f"the run dir {short_path(folder, 80)} already holds a run ({', '.join(found[:2])}); continue it with "
        "trainer.resume=auto, start over with trainer.overwrite=true (moves its files to previous-*/), or change "
        "hydra.run.dir"
    )


def _runs_below(folder: Path) -> list[Path]:
    """The dirs under ``folder`` that hold a run (checkpoints or metrics.json), earlier ``previous-*`` aside."""
    found = {p.parent for p in folder.rglob("metrics.json")} | {
        p.parent.parent for p in folder.rglob("checkpoints/*.pt")
    }
    return sorted(d for d in found if not any(part.startswith("previous-") for part in d.relative_to(folder).parts))


def check_sweep(sweep_dir: Path, resume: str | None, overwrite: bool) -> None:
    """Before a sweep's first job: Hydra writes each job's ``.hydra/`` and log before the job can claim its
    dir, so job dirs that hold runs are dealt with here, as :func:`claim` deals with one run dir: refused,
    continued (``trainer.resume=auto``, each with a ``last*.pt``) or moved to ``previous-*/``
    (``trainer.overwrite=true``; a job dir in use by a live process is refused)."""
    runs = _runs_below(sweep_dir) if sweep_dir.is_dir() else []
    if not runs:
        return
    rel = [d.relative_to(sweep_dir).as_posix() or "." for d in runs]
    if overwrite:
        for job in runs:
            lock = Lock(job)
            lock.acquire()  # a live run's dir: refused (OutputError)
            try:
                moved = move_previous(job, keep=set())
            finally:
                lock.release()
            print(f"segtrain: trainer.overwrite=true: moved the earlier run in {job} to {moved.name}/", file=sys.stderr)
        return
    if resume == "auto":
        missing = [r for r, d in zip(rel, runs) if not _has_last(d)]
        if not missing:
            return
        raise OutputError(
            f"job dir(s) {', '.join(missing[:3])} of the sweep dir {short_path(sweep_dir, 80)} hold a run but no "
            "last*.pt to continue; start over with trainer.overwrite=true, or change hydra.sweep.dir"
        )
    raise OutputError(
        f"the sweep dir {short_path(sweep_dir, 80)} already holds runs (job dir(s) {', '.join(rel[:3])}); continue "
        "them with trainer.resume=auto, start over with trainer.overwrite=true (moves their files to previous-*/), "
        "or change hydra.sweep.dir"
    )


def claim(folder: str | Path, resume: str | None = None, overwrite: bool = False, keep: set[str] | None = None) -> None:
    """Make ``folder`` this process's run dir (see the module doc); a no-op when this process holds it.

    ``keep``: entries that belong to this run already (Hydra's ``.hydra`` and job log) and must not move
    with ``overwrite``; by default the log files this process writes in ``folder``."""
    folder = Path(os.path.abspath(folder))
    if str(folder) in _locks:  # claimed before Hydra set up the run's log: put the claim's warnings there too
        for msg in _locks[str(folder)].notes:
            to_log_files(logging.WARNING, msg)
        _locks[str(folder)].notes = []
        return
    check_path(folder)
    lock = Lock(folder)
    lock.acquire()
    _locks[str(folder)] = lock
    try:
        if keep is None:
            keep = {Path(f).name for f in log_files() if Path(f).parent == folder}
            keep |= {".hydra"} if HydraConfig.initialized() else set()
        _check_outputs(folder, resume, overwrite, keep, lock)
    except BaseException:
        release(folder)
        raise
