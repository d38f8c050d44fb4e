"""The run dir: checked before training starts, and the command that resumes a run in it."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

from segtrain.errors import OutputError


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
            f"cannot write to the run dir {folder}: {e.strerror or e}; choose a writable one with hydra.run.dir=PATH"
        ) from None
    need = num_params * 4 * 3 * 3  # weights + optimizer state, for last.pt, last-1.pt and best.pt
    free = shutil.disk_usage(folder).free
    if free < need:
        raise OutputError(
            f"only {free / 2**20:.0f} MiB free in {folder}, checkpoints need about "
            f"{need / 2**20:.0f} MiB; free space or choose another hydra.run.dir"
        )


def resume_command(run_dir: Path) -> str:
    """The command line of this run, with trainer.resume=auto and its run dir."""
    drop = ("trainer.resume=", "hydra.run.dir=", "trainer.stop_at=", "run_dir=")
    args = [a for a in sys.argv[1:] if not a.startswith(drop)]
    prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "segtrain"
    prog = "segtrain" if prog in ("__main__.py", "") else prog
    return " ".join(shlex.quote(a) for a in [prog, *args, "trainer.resume=auto", f"hydra.run.dir={run_dir}"])
