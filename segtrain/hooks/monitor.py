"""Checkpoints and early stopping by a chosen validation value.

``trainer.monitor`` names any value a validation logs: ``val/mIoU`` (default), ``val/aAcc``, ``val/mAcc``,
``val/mDice``, ``val/loss`` or ``val_iou/<class>``.  ``trainer.monitor_mode`` is ``max``, ``min`` or
``auto`` (min for ``val/loss``, else max).  After each validation:

* ``best.pt`` is written when the value is strictly better than every earlier one (NaN never is);
* ``trainer.save_top_k`` = k > 0 keeps the k best validations as ``best-<step>-<value>.pt`` (the k-th best
  is replaced by a better one; ties keep the earlier), -1 keeps every validation, 0 (default) none; best.pt
  is then a hard link to the best of them (a copy where links fail);
* early stopping (``trainer.early_stop_patience`` = p, null: off): a validation that does not beat the last
  improvement (at first: the first validation) by more than ``trainer.early_stop_min_delta`` counts as bad;
  p bad validations in a row stop training, as Lightning's EarlyStopping does.  The reason goes to the
  log, ``metrics.json`` and ``status.json``.

A hook (:mod:`segtrain.hooks.base`): it judges every validation (before the checkpoints are written) and writes
its files after ``last.pt``.  Its whole state (best value and step, the bad count, the kept files) is in every
checkpoint, so a resumed run stops at the same validation and keeps the same files as one that never stopped.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from omegaconf import DictConfig

from segtrain import checkpoint
from segtrain.config.validate import check_monitor
from segtrain.hooks.base import Hook, ValidationResult

log = logging.getLogger("segtrain")


def monitor_mode(monitor: str, mode: str) -> str:
    """``auto``: min for ``val/loss``, max for a score."""
    return ("min" if monitor == "val/loss" else "max") if mode == "auto" else mode


class Monitor(Hook):
    name = "monitor"

    def __init__(self, t: DictConfig, ckpt_dir: Path, class_names: list[str]):
        check_monitor(t.monitor, class_names)
        self.key, self.mode = t.monitor, monitor_mode(t.monitor, t.monitor_mode)
        self.patience, self.min_delta, self.top_k = t.early_stop_patience, t.early_stop_min_delta, t.save_top_k
        self.ckpt_dir = Path(ckpt_dir)
        self.best, self.best_step = math.nan, None
        self.reference, self.bad = math.nan, 0  # early stopping: the best by more than min_delta, bad in a row
        self.kept: list[dict] = []  # top-k: {"step", "value", "file"}, best first
        self.stop_reason: str | None = None
        self.pending: dict = {}  # the files the next save() writes and deletes (decided in update())

    def better(self, value: float, than: float, delta: float = 0.0) -> bool:
        if not math.isfinite(value):
            return False
        if math.isnan(than):
            return True
        return value - delta > than if self.mode == "max" else value + delta < than

    def _reason(self) -> str:
        return (
            f"early stopping: {self.key} did not improve on {self.reference:.4f} by more than {self.min_delta} "
            f"for {self.bad} validation(s) (trainer.early_stop_patience={self.patience}); best "
            f"{self.best:.4f} at step {self.best_step}"
        )

    def update(self, scalars: dict[str, float], step: int) -> bool:
        """Record one validation (on every rank: the metrics are the same); True when it is the best yet."""
        value = float(scalars[self.key])
        improved = self.better(value, self.best)
        if improved:
            self.best, self.best_step = value, step
        if self.better(value, self.reference, self.min_delta):
            self.reference, self.bad = value, 0
        else:
            self.bad += 1
        if self.patience is not None and self.bad >= self.patience:
            self.stop_reason = self._reason()
        self.pending = {"best": improved, "write": None, "delete": [], "stop": self.stop_reason is not None}
        worst = self.kept[-1]["value"] if self.kept else math.nan
        finite = math.isfinite(value)  # a NaN (an absent class's IoU) takes no top-k place, and sorts last in -1
        if self.top_k < 0 or (self.top_k > 0 and finite and (len(self.kept) < self.top_k or self.better(value, worst))):
            entry = {"step": step, "value": value, "file": f"best-{step}-{value:.4f}.pt"}
            self.kept.append(entry)
            sign = -1 if self.mode == "max" else 1
            self.kept.sort(
                key=lambda e: (-1, sign * e["value"], e["step"]) if math.isfinite(e["value"]) else (0, 0, e["step"])
            )
            self.pending["write"] = entry["file"]
            while 0 < self.top_k < len(self.kept):
                self.pending["delete"].append(self.kept.pop()["file"])
        return improved

    def after_validation(self, trainer, validation: ValidationResult) -> None:
        validation.improved = self.update(validation.scalars, trainer.step)

    def after_save(self, trainer, state: dict) -> None:
        self.save(state)

    def save(self, state: dict) -> None:
        """Rank 0, after last.pt: the new top-k file, best.pt, the files that left the top k; logs a stop."""
        p, self.pending = self.pending, {}
        if p.get("write"):
            checkpoint.save_atomic(state, self.ckpt_dir / p["write"])
        if p.get("best"):
            if p.get("write"):
                checkpoint.link_atomic(self.ckpt_dir / p["write"], self.ckpt_dir / "best.pt")
            else:
                checkpoint.save_atomic(state, self.ckpt_dir / "best.pt")
        for name in p.get("delete", []):
            (self.ckpt_dir / name).unlink(missing_ok=True)
        if p.get("stop"):  # said here, after the validation's line, on rank 0 only
            log.info("%s", self.stop_reason)

    def summary(self, trainer) -> dict:
        done = trainer.step >= trainer.max_iters
        reason = self.stop_reason or (f"completed trainer.max_iters ({trainer.max_iters})" if done else None)
        return {
            "monitor": self.key,
            "monitor_mode": self.mode,
            "best_value": self.best,
            "best_step": self.best_step,
            "best_checkpoint": str(self.ckpt_dir / "best.pt") if self.best_step is not None else None,
            "top_k_checkpoints": [str(self.ckpt_dir / e["file"]) for e in self.kept],
            "stop_reason": reason,
        }

    def state_dict(self) -> dict:
        return {
            "key": self.key,
            "mode": self.mode,
            "best": self.best,
            "best_step": self.best_step,
            "reference": self.reference,
            "bad": self.bad,
            "kept": [dict(e) for e in self.kept],
            "stop_reason": self.stop_reason,
        }

    def load_state_dict(self, state: dict | None) -> None:
        """Restore; a checkpoint of another monitor (or of a run without one) starts the record afresh."""
        if not state or (state["key"], state["mode"]) != (self.key, self.mode):
            log.warning(
                "resuming with trainer.monitor=%s (%s): its best value and early-stopping count start "
                "afresh (the checkpoint has %s)",
                self.key,
                self.mode,
                f"{state['key']} ({state['mode']})" if state else "none",
            )
            return
        self.best, self.best_step = state["best"], state["best_step"]
        self.reference, self.bad, self.stop_reason = state["reference"], state["bad"], state["stop_reason"]
        self.kept = [dict(e) for e in state["kept"]]
        if self.patience is None or self.bad < self.patience:  # trainer.early_stop_patience raised: go on
            self.stop_reason = None
        elif self.stop_reason is None:  # lowered to the bad count or below: stop now, as such a run would have
            self.stop_reason = self._reason()
            log.info("%s", self.stop_reason)
        if self.top_k >= 0:  # trainer.save_top_k lowered on resume: keep the record of the k best
            self.kept = self.kept[: self.top_k] if self.top_k else []
