"""Training speed: images per second over the wall time (loader waits included) and over the steps alone.

The first step of every process is not counted: it includes the warm-up (allocator, cuDNN autotuning,
compilation), after a resume too.  ``wait``: seconds spent waiting for the loader; ``compute``: seconds in the
training step and its logging.  Once per run a validation says so when the loader is the bottleneck.
"""

from __future__ import annotations

import logging
import time

from segtrain.hooks.base import Hook, StepResult

log = logging.getLogger("segtrain")


class Throughput(Hook):
    name = "speed"

    def __init__(self):
        self.images, self.wait, self.compute = 0, 0.0, 0.0
        self.warned, self._warm = False, False
        self._window: tuple[float, float] | None = None  # (wait, compute) at the previous check

    def after_step(self, trainer, step: StepResult) -> None:
        self.add(step.images * trainer.world_size, step.waited, time.perf_counter() - step.started)

    def after_validation(self, trainer, validation) -> None:
        if trainer.is_main:
            self.warn_if_loader_bound(trainer.train_loader.num_workers)

    def warn_if_loader_bound(self, num_workers: int) -> None:
        """Once per run: say so when more than 10% of the training time since the previous check went to waiting
        for batches.  The first window is warm-up (loader processes starting, the built-in set being generated
        and cached) and is not judged."""
        if self._window is None:
            self._window = (self.wait, self.compute)
            return
        wait, compute = self.wait - self._window[0], self.compute - self._window[1]
        self._window = (self.wait, self.compute)
        if wait + compute > 0 and wait / (wait + compute) > 0.1 and not self.warned:
            self.warned = True
            log.warning(
                "the data loader is the bottleneck: %.0f%% of the training time went to waiting for batches; "
                "raise data.num_workers (now %d)",
                100 * wait / (wait + compute),
                num_workers,
            )

    def add(self, images: int, wait: float, compute: float) -> None:
        if not self._warm:  # this process's first step: not counted
            self._warm = True
            return
        self.images += images
        self.wait += wait
        self.compute += compute

    def rates(self) -> dict[str, float | None]:
        """``train_images_per_sec`` (wall time, loader waits included), ``compute_images_per_sec`` (the
        steps alone) and ``data_wait_fraction`` (the share of wall time spent waiting for data)."""
        wall = self.wait + self.compute
        return {
            "train_images_per_sec": self.images / wall if wall > 0 else None,
            "compute_images_per_sec": self.images / self.compute if self.compute > 0 else None,
            "data_wait_fraction": self.wait / wall if wall > 0 else None,
        }

    def summary(self, trainer) -> dict:
        return self.rates()

    def state_dict(self) -> dict:
        return {"images": self.images, "wait": self.wait, "compute": self.compute}

    def load_state_dict(self, state: dict | None) -> None:
        if state:
            self.images, self.wait, self.compute = state["images"], state["wait"], state["compute"]
