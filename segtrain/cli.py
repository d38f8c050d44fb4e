"""Command-line entry points.

``segtrain`` is a Hydra app: ``segtrain [group=option ...] [key=value ...]``,
``segtrain -m ...`` for sweeps, ``segtrain --help`` for the config groups.
User errors (bad values, unknown keys or options, missing files) are printed
as one line, ``segtrain: error: ...``, with a non-zero exit and no traceback;
``HYDRA_FULL_ERROR=1`` or ``trainer.debug_errors=true`` shows the traceback.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

# Before albumentations is imported anywhere: it would otherwise check PyPI for updates.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from segtrain.config import register_configs, validate  # noqa: E402
from segtrain.errors import Preempted, SegtrainError  # noqa: E402

log = logging.getLogger("segtrain")


def config_dir() -> str:
    """The shipped configs: ``segtrain/configs`` in a wheel, the repo's ``configs/`` in a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise SystemExit("segtrain: error: cannot find the shipped configs (config.yaml); reinstall segtrain")


def _train(cfg: DictConfig) -> float:
    from segtrain.trainer import Trainer

    validate(cfg)
    run_dir = cfg.run_dir or HydraConfig.get().runtime.output_dir
    summary = Trainer(cfg, run_dir).fit()
    return summary["best_miou"]


def _one_line(exc: BaseException) -> str:
    """Fold an exception (and Hydra/OmegaConf causes) into one informative line."""
    parts = []
    e: BaseException | None = exc
    while e is not None and len(parts) < 3:
        text = str(e).strip()
        if text:
            full_key = re.search(r"full_key:\s*(\S+)", text)
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            lines = [ln for ln in lines if not ln.startswith(("full_key:", "object_type=", "reference_type="))]
            msg = "; ".join(lines)
            msg = msg.replace("Available options in", "available options in")
            if full_key and full_key.group(1) not in msg:
                msg += f" (key: {full_key.group(1)})"
            if msg not in parts:
                parts.append(msg)
        e = e.__cause__ or (e.__context__ if not e.__suppress_context__ else None)
    return ": ".join(parts) if parts else type(exc).__name__


def _user_message(exc: BaseException) -> str:
    """The message of a SegtrainError; one raised in a DataLoader worker arrives wrapped in its traceback."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        last = [ln for ln in text.splitlines() if ln.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split("\n"))


def _hint(msg: str, prog: str = "segtrain") -> str:
    if "not in struct" in msg or "not in '" in msg or "Could not override" in msg:
        return f" (check the key's spelling: `{prog} --cfg job` prints every key)"
    if "no config '" in msg or "Could not load" in msg:
        return f" (`{prog} --help` lists every group and option)"
    return ""


def _missing_config(msg: str) -> str:
    """Hydra's 'Could not find' message, without the search path, options comma-separated."""
    m = re.search(r"Could not find '([^']+)'", msg)
    opts = re.search(r"Available options in '([^']+)':(.*?)(Config search path|$)", msg, re.S)
    if not m:
        return msg
    out = f"no config '{m.group(1)}'"
    if opts:
        names = [o.strip() for o in opts.group(2).split() if o.strip() and o.strip() != ";"]
        out += f"; options in '{opts.group(1)}': {', '.join(names)}"
    return out


class _Failures:
    """Jobs of a sweep that failed (the others go on).

    Each job writes ``status.json`` in its dir; :meth:`report` reads those of the current sweep, so it
    works with launchers that run jobs in other processes (joblib, SLURM).  ``jobs`` (the failures of
    jobs run in this process) is the fallback when the sweep dir is unknown (no SweepSummary callback).
    """

    jobs: list[tuple[str, str]] = []

    @classmethod
    def report(cls, summarise: bool = False) -> bool:
        """Print the failed jobs of this sweep (from their status.json) on one line; True if any.
        ``summarise``: also write the sweep summary (a sweep that stopped part-way skips the callback)."""
        from segtrain import sweep

        current = sweep.current_sweep()
        if summarise and current:
            sweep.summarise(current[0])
        failures = (sweep.failed_jobs(*current) if current else []) or list(cls.jobs)
        if failures:
            print(
                f"segtrain: error: {len(failures)} job(s) of the sweep failed: "
                + "; ".join(f"[{name}] {msg}" for name, msg in failures),
                file=sys.stderr,
                flush=True,
            )
        return bool(failures)


def _guarded(task, full_errors: bool, prog: str = "segtrain"):
    """Wrap a task: user errors become one line (``PROG: error: ...``); in a sweep a failed job is recorded
    and the sweep goes on."""

    def job(cfg: DictConfig):
        import time

        from hydra.types import RunMode

        from segtrain.sweep import write_status

        hc = HydraConfig.get()
        multirun = hc.mode == RunMode.MULTIRUN
        main_rank = os.environ.get("RANK", "0") == "0"
        start = time.perf_counter()

        def status(state: str, error: str | None, result=None) -> None:
            if main_rank:
                write_status(
                    hc.runtime.output_dir, state, error, list(hc.overrides.task), time.perf_counter() - start, result
                )

        try:
            result = task(cfg)
            status("done", None, result)
            return result
        except SegtrainError as e:
            msg, code = _user_message(e), e.exit_code
            kind = "stopped" if isinstance(e, Preempted) else "error"  # resumable, not a failure of the config
            if full_errors:
                status("failed", msg)
                raise
        except Exception as e:  # a bug or an environment fault: one line, the trace on request
            msg, code, kind = (
                f"{type(e).__name__}: {_one_line(e)} (set HYDRA_FULL_ERROR=1 for the traceback)",
                1,
                "error",
            )
            if full_errors:
                status("failed", msg)
                raise
        print(f"{prog}: {kind}: {msg}", file=sys.stderr, flush=True)
        status("failed" if kind == "error" else "stopped", msg)
        if not multirun:
            raise SystemExit(code)
        log.error("job failed: %s", msg)
        _Failures.jobs.append((str(hc.job.num), msg))
        return None  # not NaN: the optuna sweeper records None as a failed trial (NaN would abort the study)

    job.__name__ = getattr(task, "__name__", "job")
    job.__module__ = getattr(task, "__module__", __name__)
    return job


def run_hydra_app(task, config_name: str = "config", prog: str = "segtrain") -> None:
    """Run ``task`` as a Hydra app with segtrain's error handling; errors start with ``prog``."""
    register_configs()
    from segtrain import distributed

    scratch = distributed.scratch_run_dir()
    if scratch:  # torchrun rank > 0: Hydra works in a throw-away dir, rank 0 owns the run dir and the logs
        import atexit
        import shutil

        sys.argv += [
            f"hydra.run.dir={scratch}",
            "hydra.output_subdir=null",
            "hydra/job_logging=disabled",
            "hydra/hydra_logging=disabled",
        ]
        atexit.register(shutil.rmtree, scratch, True)
    argv_debug = any(a.replace(" ", "").lower() == "trainer.debug_errors=true" for a in sys.argv)
    full_errors = os.environ.get("HYDRA_FULL_ERROR") == "1" or argv_debug
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises; we print the one-line message
    app = hydra.main(version_base="1.3", config_path=config_dir(), config_name=config_name)(
        _guarded(task, full_errors, prog)
    )
    try:
        app()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # Hydra/OmegaConf composition errors
        if full_errors:
            raise
        _Failures.report(summarise=True)  # a sweep stopped part-way: what its jobs did so far
        msg = _one_line(e)
        if "Could not find" in msg:
            msg = _missing_config(str(e))
        user_error = type(e).__module__.split(".")[0] in ("hydra", "omegaconf")
        if not user_error:
            msg = f"{type(e).__name__}: {msg} (set HYDRA_FULL_ERROR=1 for the traceback)"
        print(f"{prog}: error: {msg}{_hint(msg, prog)}", file=sys.stderr)
        sys.exit(2 if user_error else 1)
    if _Failures.report():
        sys.exit(1)


def main() -> None:
    """``segtrain``: train a network."""
    run_hydra_app(_train)


if __name__ == "__main__":
    main()
