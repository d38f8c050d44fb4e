"""User-facing errors.

Each one is printed by the CLI as a single line (``segtrain: error: ...``)
with a non-zero exit and no traceback.  Raise them for anything a user can
fix: a bad path, a bad value, a foreign checkpoint.  :func:`cause_chain` walks what an error arose from.
"""

from __future__ import annotations

from collections.abc import Iterator


def cause_chain(exc: BaseException | None, limit: int = 5) -> Iterator[BaseException]:
    """``exc``, then the exception it arose from (``__cause__``, else ``__context__``), and so on, at most ``limit``:
    where a library's own error wraps the one that tells what happened (an OSError, an out-of-memory error, a
    Ctrl-C)."""
    for _ in range(limit):
        if exc is None:
            return
        yield exc
        exc = exc.__cause__ or exc.__context__


class SegtrainError(Exception):
    """A problem the user can fix; the message says what and how."""

    exit_code = 2


class ConfigError(SegtrainError, ValueError):
    """An impossible or inconsistent config value (also a ValueError, for the Python API)."""


class DataError(SegtrainError):
    """A missing, unreadable or inconsistent data set."""


class CheckpointError(SegtrainError):
    """A missing, corrupt, unsafe or foreign checkpoint."""


class NonFiniteLossError(SegtrainError):
    """The loss became NaN or inf."""

    exit_code = 3


class Preempted(SegtrainError):
    """SIGINT/SIGTERM/SIGUSR2 (or trainer.stop_at): last.pt was written and the run can be resumed.
    ``by_signal``: stopped by a signal (a sweep then stops too), not by ``trainer.stop_at``."""

    exit_code = 75  # EX_TEMPFAIL: try again (resume)

    def __init__(self, message: str, by_signal: bool = False):
        super().__init__(message)
        self.by_signal = by_signal


class OutputError(SegtrainError):
    """The run dir cannot be written (permissions, full disk)."""

    exit_code = 4


class ExportError(SegtrainError):
    """An exported model that disagrees with PyTorch, or a construct the format cannot express."""

    exit_code = 6


class ResourceError(SegtrainError):
    """Out of (GPU) memory."""

    exit_code = 5


def missing_extra(what: str, package: str, extra: str, alternative: str = "") -> str:
    """The one line for ``what`` (a setting) whose optional ``package`` is not installed: the extra that installs
    it, and the ``alternative`` (what to change instead), e.g. ``missing_extra("logger=wandb", "wandb", "wandb",
    "or drop wandb from logger=...")``."""
    instead = f" ({alternative})" if alternative else ""
    return f"{what} needs the {package} package, which is not installed: pip install 'segtrain[{extra}]'{instead}"
