"""Sweep summaries: one table of every job of a ``segtrain -m ...`` sweep.

Each job writes ``status.json`` into its own directory (:mod:`segtrain.apps.runner`):
``{"status": "running" | "done" | "failed" | "stopped" | "aborted", "error", "overrides", "wall_time_sec",
"result"}`` (the best value of ``trainer.monitor``), and for a finished training job ``monitor``, ``best_value``,
``best_checkpoint`` and ``stop_reason``;
a finished job also has the trainer's ``metrics.json`` (``best_miou``, ``step``,
``max_iters``, ...).  When the sweep ends, the :class:`SweepSummary` Hydra callback
(registered in ``configs/config.yaml`` under ``hydra.callbacks``) reads them and
writes, in the sweep directory (``hydra.sweep.dir``):

* ``summary.csv`` and ``summary.md``: one row per job (the job's subdirectory),
  best mIoU first, failed jobs last, with the job's overrides and error line;
  the markdown table is also printed.

This works with any sweeper (basic grid, ``hparams_search=optuna``) and any
launcher (``hydra/launcher=joblib`` runs the jobs in other processes: the
status files, not in-process state, are the record).  To compare the runs'
curves and hyperparameters, point TensorBoard at the sweep directory: every job
writes its scalars and its hparams (HPARAMS tab) into its own ``tb/``::

    tensorboard --logdir multirun/2024-01-01/12-00-00
"""

from __future__ import annotations

import csv
import json
import math
import re
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from segtrain.utils import atomic_write

STATUS_FILE = "status.json"
COLUMNS = ("job", "status", "best_miou", "steps", "wall_time_sec", "overrides", "error")

# The sweep this process runs (set by SweepSummary.on_multirun_start): the CLI derives its
# "N job(s) failed" line and exit status from the status files written since then.
_current: dict[str, Any] = {}


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _number(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def _job_key(job: str) -> list:
    """Natural order: job 2 before job 10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", job)]


def write_status(
    run_dir: str | Path,
    status: str,
    error: str | None,
    overrides: list[str],
    wall_time: float,
    result: Any = None,
    details: dict | None = None,
) -> None:
    """Write a job's ``status.json`` (never raises: the record must not fail the job); ``details`` (the
    trainer's: ``monitor``, ``best_value``, ``best_checkpoint``, ``stop_reason`` ...) are added to it."""
    try:
        path = Path(run_dir) / STATUS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "status": status,
            "error": error,
            "overrides": [str(o) for o in overrides],
            "wall_time_sec": round(float(wall_time), 3),
            "result": _number(result),
            **{k: (_number(v) if isinstance(v, float) else v) for k, v in (details or {}).items()},
        }
        atomic_write(path, json.dumps(record, indent=2) + "\n", durable=False)
    except Exception:  # noqa: BLE001 - a full disk or a read-only dir: the job's own outcome stands
        pass


def mark_status(run_dir: str | Path, status: str, error: str | None) -> None:
    """Set the status (and error) of the ``status.json`` a job wrote at its start (never raises): e.g.
    "aborted" when a second signal kills the process."""
    path = Path(run_dir) / STATUS_FILE
    record = _read_json(path)
    if record is None:
        return
    record.update(status=status, error=error)
    try:
        atomic_write(path, json.dumps(record, indent=2) + "\n", durable=False)
    except Exception:  # noqa: BLE001 - the record must not fail the job
        pass


def collect(sweep_dir: str | Path) -> list[dict]:
    """One row per job directory under ``sweep_dir`` with a ``status.json``: best mIoU first, failed jobs last."""
    sweep_dir = Path(sweep_dir)
    rows = []
    for status_path in sweep_dir.rglob(STATUS_FILE):
        job_dir = status_path.parent
        if any(part.startswith("previous-") for part in job_dir.relative_to(sweep_dir).parts):
            continue  # an earlier run's files, moved aside by trainer.overwrite=true
        status = _read_json(status_path) or {"status": "failed", "error": f"unreadable {STATUS_FILE}"}
        metrics = _read_json(job_dir / "metrics.json") or {}
        best = _number(metrics.get("best_miou"))
        if best is None:
            best = _number(status.get("result"))
        step, max_iters = metrics.get("step"), metrics.get("max_iters")
        steps = "" if step is None else (f"{step}/{max_iters}" if max_iters is not None else str(step))
        wall = _number(status.get("wall_time_sec"))
        if wall is None:
            wall = _number(metrics.get("wall_time_sec"))
        overrides = status.get("overrides") or []
        rows.append(
            {
                "job": job_dir.relative_to(sweep_dir).as_posix(),
                "status": str(status.get("status") or "failed"),
                "best_miou": best,
                "steps": steps,
                "wall_time_sec": None if wall is None else round(wall, 1),
                "overrides": " ".join(str(o) for o in overrides) if isinstance(overrides, list) else str(overrides),
                "error": status.get("error") or "",
                "mtime": status_path.stat().st_mtime,
            }
        )

    def key(r: dict):
        failed = r["status"] != "done"
        no_score = r["best_miou"] is None
        return (failed, no_score, -(r["best_miou"] or 0.0), _job_key(r["job"]))

    return sorted(rows, key=key)


def _cell(column: str, value: Any) -> str:
    if value is None:
        return ""
    if column == "best_miou":
        return f"{value:.4f}"
    if column == "wall_time_sec":
        return f"{value:.1f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown(rows: list[dict]) -> str:
    """The rows as a GitHub markdown table."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(_cell(c, r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_summary(sweep_dir: str | Path, rows: list[dict]) -> tuple[Path, Path]:
    """Write ``summary.csv`` and ``summary.md`` in ``sweep_dir``; returns their paths."""
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = sweep_dir / "summary.csv", sweep_dir / "summary.md"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({c: "" if r[c] is None else r[c] for c in COLUMNS})
    md_path.write_text(markdown(rows))
    return csv_path, md_path


def summarise(sweep_dir: str | Path) -> list[dict]:
    """Collect the jobs under ``sweep_dir``, write ``summary.csv``/``summary.md`` there and print the table."""
    rows = collect(sweep_dir)
    if rows:
        csv_path, _ = write_summary(sweep_dir, rows)
        done = sum(r["status"] == "done" for r in rows)
        print(f"\nSweep summary ({done}/{len(rows)} jobs done; {csv_path}, summary.md):\n")
        print(markdown(rows), flush=True)
    return rows


def failed_jobs(sweep_dir: str | Path, since: float | None = None) -> list[tuple[str, str]]:
    """(job, error) of the failed jobs under ``sweep_dir`` whose status was written at or after ``since``."""
    return [
        (r["job"], r["error"] or f"did not finish (status {r['status']})")
        for r in collect(sweep_dir)
        if r["status"] != "done" and (since is None or r["mtime"] >= since)
    ]


def current_sweep() -> tuple[Path, float] | None:
    """(sweep dir, start time) of the sweep this process ran, if any."""
    return (_current["dir"], _current["start"]) if _current else None


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, write ``summary.csv``/``summary.md`` in the sweep dir and print it."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _current["dir"] = Path(str(config.hydra.sweep.dir)).absolute()
        _current["start"] = time.time() - 1.0  # file mtimes may be coarser than time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        summarise(Path(str(config.hydra.sweep.dir)))
