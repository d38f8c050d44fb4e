"""Checks at start, before the first training step (a hook's ``before_train``), so that a run that would crash at
its first validation (after a whole interval of training) fails in seconds instead.

* :func:`check_val_images`: the smallest validation image (found by the label check) against the
  network's minimum input size;
* :class:`Preflight`: one validation image through the real evaluation path (the ``eval.*``
  settings, autocast, the loss and the confusion matrix) with the network about to be trained.

The cross-key checks of config values (strides, crops, sizes, seeds ...) live in
:func:`segtrain.config.validate`.
"""

from __future__ import annotations

import logging
import math
import time

from segtrain.config import smallest_eval_scale
from segtrain.data.transforms import val_scale
from segtrain.errors import ConfigError, DataError
from segtrain.evaluation import evaluate_loader
from segtrain.hooks.base import Hook
from segtrain.models import min_input_size
from segtrain.runtime import autocast

log = logging.getLogger("segtrain")


def check_val_images(val_set, cfg) -> None:
    """A validation image smaller than the network accepts (``val_set.smallest``: (path, h, w), set by the
    label check of on-disk data sets) is named before training; when validation rescales every image
    (``data.val_size``, else ``data.base_size``: ``transforms.val_scale``) the sizes are checked in
    ``config.validate``."""

    smallest = getattr(val_set, "smallest", None)
    need = min_input_size(cfg.model)
    if smallest is None or val_scale(cfg.data) is not None:
        return
    path, h, w = smallest
    low = smallest_eval_scale(cfg)
    if min(h, w) * low < need:
        scaled = f" (x{low:g} at the smallest eval.scales)" if low < 1 else ""
        raise DataError(
            f"validation image {path} is {w}x{h} px{scaled}, smaller than the {need} px model={cfg.model.name} "
            f"needs; remove it, or set data.val_size={math.ceil(need / low)} (or larger)"
        )


class _FirstImage(list):
    """The first image of a loader's first batch, as a one-batch loader that still names its file (the
    ``dataset``/``batch_size``/``sampler`` that :func:`segtrain.evaluation.evaluate_loader` reads)."""

    def __init__(self, batch, loader):
        super().__init__([] if batch is None else [(batch[0][:1], batch[1][:1])])
        self.dataset, self.batch_size = loader.dataset, 1
        self.sampler = list(loader.sampler)[:1]


class Preflight(Hook):
    """Before the first step: :func:`check_val_images`, then one validation image through
    :func:`segtrain.evaluation.evaluate_loader`, as at the first validation (the plain module: no compilation, no
    DDP hooks).  Under DDP every process runs it (it all-reduces)."""

    def __init__(self, val_set):
        self.val_set = val_set

    def before_train(self, trainer) -> None:
        check_val_images(self.val_set, trainer.cfg)
        t0 = time.perf_counter()
        try:
            batch = next(iter(trainer.val_loader), None)
        except RuntimeError as e:
            if "stack expects each tensor to be equal size" not in str(e):
                raise
            d = trainer.cfg.data
            raise ConfigError(
                f"validation images differ in size, so they cannot be batched {d.val_batch_size or d.batch_size} at "
                "a time: set data.val_batch_size=1, or data.val_size to resize them"
            ) from None
        batches = _FirstImage(batch, trainer.val_loader)
        model = trainer.model
        was_training = model.training
        model.eval()  # left so on failure: an out-of-memory error is then reported as one "in validation"
        evaluate_loader(
            model,
            batches,
            trainer.batch_to_device,
            lambda: autocast(trainer.device, trainer.precision),
            trainer.cfg,
            trainer.class_names,
            criterion=trainer.criterion,
        )
        model.train(was_training)
        log.debug("dry validation pass: %.2f s", time.perf_counter() - t0)
