"""An exponential moving average (EMA) of the model's weights: ``trainer.ema_decay`` (null: off).

After every optimizer step, for every floating-point parameter and buffer (BatchNorm statistics
included; the integer ``num_batches_tracked`` is copied)::

    ema = d_n * ema + (1 - d_n) * weight,    d_n = min(ema_decay, (1 + n) / (ema_warmup + n))

where n is the number of updates before this one (TensorFlow's ``ExponentialMovingAverage`` with
``num_updates``).  The warm-up keeps the average from remembering the random initial weights: the first
update takes 1/ema_warmup of the old average, and the average spans roughly the last n/(ema_warmup - 1)
steps until ``ema_decay`` caps it (about 1/(1 - ema_decay) steps).  ``trainer.ema_warmup=null``: d_n =
ema_decay from the first step.

A hook (:mod:`segtrain.hooks.base`): it updates after every step and is the trainer's validation model, so
validation, ``best.pt`` and ``best-*.pt`` use the averaged weights.  Every checkpoint's ``model`` holds the
weights validation uses (the EMA's), so ``segtrain-eval`` and ``model.init_from`` read them; the raw training
weights are in ``raw_model`` and the update count in ``ema``, so that a resume continues bitwise.  Under DDP
the average is of the unwrapped module on every rank (the weights are identical after each step);
validation runs the averaged copy eagerly, as it runs the raw model (``device.compile`` compiles training).
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from segtrain.hooks.base import Hook
from segtrain.runtime import unwrap

log = logging.getLogger("segtrain")


class EMA(Hook):
    name = "ema"

    def __init__(self, model: nn.Module, decay: float, warmup: int | None):
        self.module = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)
        self.decay, self.warmup, self.num_updates = decay, warmup, 0
        self._pairs: list | None = None

    def current_decay(self) -> float:
        n = self.num_updates
        return self.decay if self.warmup is None else min(self.decay, (1 + n) / (self.warmup + n))

    def _tensors(self, model: nn.Module) -> tuple[list, list, list, list]:
        """(ema floats, model floats, ema others, model others), matched by name."""
        ours, theirs = self.module.state_dict(keep_vars=True), unwrap(model).state_dict(keep_vars=True)
        seen: set[int] = set()
        unique = [k for k, v in ours.items() if not (id(v) in seen or seen.add(id(v)))]  # tied weights once
        floats = [k for k in unique if ours[k].is_floating_point()]
        others = [k for k in unique if not ours[k].is_floating_point()]
        return (
            [ours[k] for k in floats],
            [theirs[k] for k in floats],
            [ours[k] for k in others],
            [theirs[k] for k in others],
        )

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of the average towards ``model``'s current weights (call after the optimizer step)."""
        if self._pairs is None:
            self._pairs = self._tensors(model)  # the same tensor objects for the whole run
        ema_f, model_f, ema_o, model_o = self._pairs
        torch._foreach_lerp_(ema_f, model_f, 1.0 - self.current_decay())
        for e, m in zip(ema_o, model_o):
            e.copy_(m)
        self.num_updates += 1

    def after_step(self, trainer, step) -> None:
        self.update(trainer.model)

    def validation_model(self) -> nn.Module:
        return self.module

    def state_dict(self) -> dict:
        return {"num_updates": self.num_updates, "decay": self.decay, "warmup": self.warmup}

    def load_state_dict(self, state: dict | None) -> None:
        """The update count; the averaged weights come with the checkpoint's ``model`` (the trainer loads them).  A
        checkpoint trained without EMA holds none: the average starts from its weights."""
        if state is None:
            log.warning("the checkpoint has no EMA weights: the average starts from its weights now")
            return
        self.num_updates = state["num_updates"]
