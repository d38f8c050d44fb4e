"""The run dir's lock (:mod:`segtrain.rundir`), taken when the run was built, is released when the run ends,
however it ends."""

from __future__ import annotations

from pathlib import Path

from segtrain import rundir
from segtrain.hooks.base import Hook


class RunDirLock(Hook):
    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def close(self, trainer, status: str) -> None:
        rundir.release(self.run_dir)
