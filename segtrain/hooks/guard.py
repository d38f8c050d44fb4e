"""The divergence guard: a run whose loss is no longer finite stops before any checkpoint is overwritten.

Under fp16 the GradScaler skips a step whose gradients hold inf/NaN and lowers its scale: such steps are
counted (``skipped_steps`` in ``metrics.json``) and logged; a non-finite loss on a step that was not skipped, or
``MAX_SKIPS_IN_ROW`` skips in a row, raise :class:`~segtrain.errors.NonFiniteLossError` (exit code 3).
"""

from __future__ import annotations

import logging
import math
import warnings

from segtrain.errors import NonFiniteLossError
from segtrain.hooks.base import Hook, StepResult

log = logging.getLogger("segtrain")

MAX_SKIPS_IN_ROW = 25  # fp16 steps skipped in a row before the run is stopped as diverged


class DivergenceGuard(Hook):
    name = "guard"

    def __init__(self):
        self.skipped_steps, self.in_row = 0, 0
        self.scale: float | None = None  # the GradScaler's scale after the previous step (None: no fp16)

    def before_train(self, trainer) -> None:
        if trainer.scaler.is_enabled():
            self.scale = trainer.scaler.get_scale()
            # a skipped step is logged here; PyTorch's schedule-order warning says nothing more
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")

    def after_step(self, trainer, step: StepResult) -> None:
        """The scale only changes in the scaler's update: lower than after the previous step means skipped."""
        skipped = False
        if self.scale is not None:
            now = trainer.scaler.get_scale()
            skipped, self.scale = now < self.scale, now
        self.in_row = self.in_row + 1 if skipped else 0
        if skipped:
            self.skipped_steps += 1
            log.warning(
                "step %d: fp16 gradients overflowed, the scaler skipped the step (%d so far, scale now %g)",
                trainer.step,
                self.skipped_steps,
                self.scale,
            )
        if self.in_row >= MAX_SKIPS_IN_ROW:
            self._fail(f"{MAX_SKIPS_IN_ROW} fp16 steps in a row overflowed", trainer)
        if not math.isfinite(step.loss) and not skipped:
            self._fail(f"loss is {step.loss} (non-finite)", trainer)

    @staticmethod
    def _fail(what: str, trainer) -> None:
        raise NonFiniteLossError(
            f"{what} at step {trainer.step}: lower optimizer.lr, set trainer.grad_clip, or try another "
            f"device.precision (now {trainer.precision}); checkpoints were not overwritten"
        )

    def summary(self, trainer) -> dict:
        return {"skipped_steps": self.skipped_steps}

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict | None) -> None:
        self.skipped_steps = state["skipped_steps"] if state else 0
