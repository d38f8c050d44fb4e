"""Signals: every handler segtrain installs, each behaviour once.

Python runs signal handlers in the main thread only: each ``with`` block below is a no-op in another thread.

* :class:`Handling`: within a ``with`` block, a handler receives some signals; the handlers before it come back
  when the block ends.  The base of the others; the CLI's job runner uses it as it is (a SIGTERM outside the
  training loop is recorded in status.json, then the process dies of it).
* :class:`AsInterrupt`: the signals (SIGTERM by default) raise :class:`Interrupted`, a KeyboardInterrupt that
  carries the signal, so that a SIGTERM runs the clean-up of a Ctrl-C (``segtrain-data``: a partial download
  is removed).
* :class:`Interrupts`: :class:`AsInterrupt` for SIGINT and SIGTERM in the commands that write
  (``segtrain-export``, ``segtrain-predict``), with sections no exception may cross.
* :class:`StopSignals`: the training loop's: the first SIGINT, SIGTERM or SIGUSR2 asks it to stop after its
  step (last.pt is written), a second one aborts.
* :func:`die_of`: a handler that has done its part ends the process by the signal's default action.
* :func:`worker_signals`: a forked worker process (loader, conversion pool) replaces the handlers it inherited.

Imports the standard library only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

Handler = Callable[[int, Any], Any]


def die_of(signum: int) -> None:
    """End this process by ``signum``'s default action, as if no handler had caught it (its parent sees it killed
    by that signal: exit 128 + N in a shell), once a handler has done its part (recorded the abort ...)."""
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def worker_signals(sigterm: Any = signal.SIG_IGN, sigint: Any = signal.SIG_IGN) -> None:
    """In a worker process started by fork, which inherits the main process's Python handlers (they would unwind
    the main process's job inside the worker): its own, ``signal.SIG_IGN`` or ``signal.SIG_DFL`` each; None
    leaves that signal as inherited.  (Positional order for ``ProcessPoolExecutor(initargs=...)``.)"""
    if sigint is not None:
        signal.signal(signal.SIGINT, sigint)
    if sigterm is not None:
        signal.signal(signal.SIGTERM, sigterm)


class Handling:
    """Within the ``with`` block, ``handler`` (or a subclass's :meth:`handle`) receives ``signals`` (SIGTERM by
    default) in the main thread; the handlers before it come back when the block ends (``previous``).
    ``keep_ignored``: a signal ignored when the block starts (``nohup``, a background job's SIGINT) stays so."""

    signals: tuple[int, ...] = (signal.SIGTERM,)
    keep_ignored = False

    def __init__(self, handler: Handler | None = None, signals: Iterable[int] | None = None):
        if handler is not None:
            self.handle = handler
        if signals is not None:
            self.signals = tuple(signals)
        self.previous: dict[int, Any] = {}

    def handle(self, signum: int, frame: Any) -> None:
        raise NotImplementedError

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                if self.keep_ignored and signal.getsignal(sig) is signal.SIG_IGN:
                    continue
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        for sig, old in self.previous.items():
            signal.signal(sig, signal.SIG_DFL if old is None else old)  # None: a handler not set from Python
        return False


class Interrupted(KeyboardInterrupt):
    """A signal (``signum``: SIGINT or SIGTERM) raised as Ctrl-C is, so that the same clean-up runs."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class AsInterrupt(Handling):
    """Within the block, ``signals`` (SIGTERM by default) raise :class:`Interrupted` in the main thread."""

    def __init__(self, signals: Iterable[int] | None = None):
        super().__init__(None, signals)

    def handle(self, signum: int, frame: Any) -> None:
        raise Interrupted(signum)


class Interrupts(AsInterrupt):
    """SIGINT and SIGTERM while a command writes: outside a :meth:`deferred` section they raise
    :class:`Interrupted` at once, so that every ``finally`` runs (temporary files removed); inside one (code
    a Python exception must not cross: the ONNX exporter and the tracer, whose C++ callbacks turn it into
    their own error or abort the process; the final renames) the signal is recorded and raised when the
    section ends, however it ends.  A second signal inside a section stops at once: ``cleanups`` run and the
    process exits with 128 + the signal (a pending rename section is always finished first).  A signal
    ignored when the command starts stays ignored.

    On leaving the ``with`` block after a SIGTERM, the previous SIGTERM handler gets it (the CLI records the
    job as aborted and dies of it: exit 143); a SIGINT leaves as a KeyboardInterrupt (exit 130)."""

    signals = (signal.SIGINT, signal.SIGTERM)
    keep_ignored = True

    def __init__(self, prog: str):
        super().__init__()
        self.prog, self.pending, self.depth, self.critical, self.what = prog, None, 0, False, ""
        self.cleanups: list = []

    def handle(self, signum: int, frame: Any) -> None:
        if self.depth == 0:
            raise Interrupted(signum)
        if self.pending is not None and not self.critical:
            for fn in self.cleanups:
                with contextlib.suppress(Exception):
                    fn()
            os.write(2, f"{self.prog}: interrupted\n".encode())
            os._exit(128 + signum)
        self.pending = self.pending or signum
        if not self.critical:
            os.write(2, f"{self.prog}: stopping once {self.what} returns (again: at once)\n".encode())

    def __exit__(self, kind, exc, tb) -> bool:
        super().__exit__(kind, exc, tb)
        if isinstance(exc, Interrupted) and exc.signum == signal.SIGTERM:
            handler = self.previous.get(signal.SIGTERM)
            if callable(handler):
                handler(exc.signum, None)  # the CLI's records the job as 'aborted' and dies of SIGTERM
            elif handler == signal.SIG_DFL:
                die_of(signal.SIGTERM)
        return False

    @contextlib.contextmanager
    def deferred(self, what: str, critical: bool = False) -> Iterator[None]:
        """Signals in the block are recorded and raised (as :class:`Interrupted`) when it ends, whatever it
        raised meanwhile (an exporter error caused by the interrupt is no error of the network)."""
        self.depth, self.critical, self.what = self.depth + 1, critical, what
        try:
            yield
        except BaseException:
            if self.pending is None:
                raise
        finally:
            self.depth -= 1
            self.critical = False
        self.raise_pending()

    def raise_pending(self) -> None:
        if self.pending is not None and self.depth == 0:
            signum, self.pending = self.pending, None
            raise Interrupted(signum)


# SIGUSR2: what SLURM sends before a time limit or preemption under submitit (--signal=USR2@120); handled
# here on every rank, so all ranks stop at the same step and write last.pt (submitit's own handler would
# stop rank 0 only, with no checkpoint).  Windows has no SIGUSR2.
PREEMPT_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGUSR2") if hasattr(signal, n))


class StopSignals(Handling):
    """Within the block, the first SIGINT/SIGTERM/SIGUSR2 sets ``received`` (the loop stops after its step, or at
    the next validation batch); a second one aborts at once, after ``on_abort("aborted by a second SIGINT")``
    (which records the abort in status.json)."""

    signals = PREEMPT_SIGNALS

    def __init__(self, on_abort=None):
        super().__init__()
        self.received: str | None = None
        self.on_abort = on_abort

    def handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:  # the second signal: abort now
            if self.on_abort is not None:
                try:
                    self.on_abort(f"aborted by a second {name}")
                except Exception:  # noqa: BLE001 - nothing may delay the abort
                    pass
            die_of(signum)
            return
        self.received = name
        sys.stderr.write(
            f"\nsegtrain: {name}: stopping after this step and writing last.pt (send it again to abort at once)\n"
        )
