"""The run dir a command may use, checked before Hydra writes anything into it (a Hydra callback), and the
command that continues a stopped run.

* :class:`RunDirGuard` (``hydra.callbacks.run_dir_guard`` of every command's config): the command line, the
  config's values and the checkpoint paths first (:mod:`segtrain.config`, :mod:`segtrain.files`), then the run
  dir: training claims it (:func:`segtrain.rundir.claim`: the lock, no silent overwrite); eval, predict, export and
  info may not write into a training run's dir, nor into its own folders, nor (predict, export) into an earlier
  run's without ``overwrite=true``.  A refusal leaves the dir exactly as it was.
* :func:`resume_command`: the command line of this run with ``trainer.resume=auto`` and its run dir, quoted so
  that it works when pasted.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback

from segtrain.config import check_command_line, override, validate, validate_app
from segtrain.console import short_path
from segtrain.errors import OutputError, SegtrainError
from segtrain.files import checkpoint_file, inspect
from segtrain.rundir import check_path, check_sweep, claim, made_for, run_outputs
from segtrain.writeguard import run_file


class Refused(BaseException):
    """A SegtrainError of :class:`RunDirGuard`, carried past Hydra (which turns a callback's ``Exception``
    into a warning and goes on); the CLI prints it as one line and exits with its code."""

    def __init__(self, error: SegtrainError):
        super().__init__(str(error))
        self.error = error


class RunDirGuard(Callback):
    """Hydra callback: claim the run dir before Hydra writes its files (``.hydra/``, the job log) there,
    so a refused run leaves the dir exactly as it was.

    ``train=False`` (``segtrain-eval`` and other commands that write results): only check that the dir can
    be created and does not hold a training run."""

    def __init__(self, train: bool = True):
        self.train = train

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        if os.environ.get("RANK", "0") != "0":
            return
        try:
            self.check_config(config, values=False)  # each job's values: its own config (the sweep's values differ)
            if self.train:
                check_sweep(Path(str(config.hydra.sweep.dir)), config.trainer.resume, config.trainer.overwrite)
        except SegtrainError as e:
            raise Refused(e) from None

    def check_config(self, config: Any, values: bool = True) -> None:
        """What the command line asks for, before any file is written (the run dir included): the overrides,
        keys and numbers of any command (:func:`segtrain.config.check_command_line`); with ``values``, for
        training every value (:func:`segtrain.config.validate`), for the other commands their own keys, and the
        checkpoint paths (``trainer.resume``, ``model.init_from``, ``ckpt``: a file that can be a checkpoint,
        told without torch)."""

        warnings = check_command_line(config)
        if not values:
            paths = {}
        elif self.train:
            validate(config, before_plan=True)  # what the plan fills is checked once it is filled
            paths = {"trainer.resume": config.trainer.resume, "model.init_from": config.model.init_from}
        else:
            validate_app(config, str(config.hydra.job.name), prog_name())
            paths = {"ckpt": config.get("ckpt")}
        for key, value in paths.items():
            if value and value != "auto" and isinstance(value, str):
                inspect(checkpoint_file(value, key), f"{key}={value}")
        for warning in warnings:  # after the checks: an error stays the one line printed
            print(f"{prog_name()}: warning: {warning}", file=sys.stderr, flush=True)

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        if os.environ.get("RANK", "0") != "0":
            return  # DDP: rank 0 owns the run dir; the others run in a scratch dir
        folder = Path(str(config.get("run_dir") or config.hydra.run.dir))
        try:
            self.check_config(config)  # a config mistake is reported before the run dir is touched
            if not self.train:
                _check_command_dir(folder, config)
                check_path(folder)
                return
            claim(folder, config.trainer.resume, config.trainer.overwrite, keep=set())
        except SegtrainError as e:
            for empty in made_for(folder):  # the default outputs/DATE/TIME made for this run: not left
                with contextlib.suppress(OSError):
                    empty.rmdir()  # only an empty dir goes
            raise Refused(e) from None


COMMAND_WRITES = {
    "predict": "predict.json (and, without output=, the masks)",
    "info": "info.json",
    "export": "its log (and, without output=, the exported model)",
}


def _check_command_dir(folder: Path, config: Any) -> None:
    """The run dir of segtrain-eval/-predict/-export/-info (which write their results, log and ``.hydra/``
    there) is not a training run's, nor inside one's own folders (``checkpoints/`` ...); for the commands
    with ``overwrite`` (predict, export) not an earlier run's either, unless ``overwrite=true``."""

    name = str(config.hydra.job.name)
    prog, where = f"segtrain-{name}", short_path(folder, 80)
    found = [n for n in run_outputs(folder) if n.startswith("checkpoints/")]
    if found and name == "eval":
        raise OutputError(
            f"{where} holds a training run, whose metrics.json this would replace; give the evaluation its own "
            "hydra.run.dir"
        )
    if found:
        raise OutputError(
            f"{where} holds a training run ({found[0]}); {prog} would write {COMMAND_WRITES.get(name, 'its results')} "
            "there and replace the run's .hydra/: give it its own hydra.run.dir, or leave hydra.run.dir out"
        )
    inside = run_file(folder.absolute().resolve() / "x")
    if inside is not None:
        raise OutputError(
            f"hydra.run.dir={where} is in {inside[1]} of the run {short_path(inside[0], 80)}; give {prog} its own "
            "hydra.run.dir, or leave it out"
        )
    if config.get("overwrite") is False and (folder / ".hydra").is_dir():
        raise OutputError(
            f"{where} holds an earlier run (.hydra/), whose record {prog} would replace; give it its own "
            "hydra.run.dir (or leave it out), or set overwrite=true"
        )


def prog_name() -> str:
    """The command's name as typed (``segtrain``, ``segtrain-eval`` ...; ``python -m segtrain``: segtrain)."""
    prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    if prog.endswith(".py") or not prog:  # python -m segtrain[.evaluate ...]
        stem = prog.removesuffix(".py")
        return "segtrain" if stem in ("__main__", "cli", "") else "segtrain-" + {"evaluate": "eval"}.get(stem, stem)
    return prog


def resume_command(run_dir: Path, limit: int | None = 160) -> str:
    """The command line of this run, with trainer.resume=auto and its run dir: in a sweep (``-m``) the sweep
    dir, which resumes every job; under torchrun on one node with ``torchrun``.  A short form when the command
    is longer than ``limit`` characters, so that the stop line stays one short line."""
    drop = (
        "trainer.resume=",
        "hydra.run.dir=",
        "hydra.sweep.dir=",
        "trainer.stop_at=",
        "run_dir=",
        "trainer.overwrite=",
    )
    args = [a for a in sys.argv[1:] if not a.startswith(drop)]

    where = override("hydra.run.dir", str(run_dir))  # quoted for Hydra where the path needs it (spaces, '=', é)
    if "-m" in args or "--multirun" in args:
        where = override("hydra.sweep.dir", str(_sweep_dir(Path(run_dir))))
    prog = prog_name()
    same, written_out = "the same command", True
    world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
    if world > 1 and "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun: one node's command can be written out
        if world == local:
            prog = f"torchrun --nproc_per_node={local} -m segtrain"
        else:
            same, written_out = "the same torchrun command on every node", False
    full = " ".join([prog, *(shlex.quote(a) for a in [*args, "trainer.resume=auto", where])])
    if written_out and (limit is None or len(full) <= limit):
        return full
    return f"{same} plus trainer.resume=auto {shlex.quote(where)}"


def _sweep_dir(job_dir: Path) -> Path:
    try:
        return Path(HydraConfig.get().sweep.dir).absolute()
    except (ImportError, ValueError):  # no Hydra run (the Python API): the job dir's parent
        return job_dir.parent
