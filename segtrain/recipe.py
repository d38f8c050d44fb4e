"""Published recipes on other hardware: the total batch a number was published with, and the lr for yours.

A recipe (``experiment=``) records what its published number was trained with::

    recipe:
      total_batch: 16     # processes x data.batch_size x trainer.accumulate of the published run
      miou: 37.41         # its published mIoU (%)
      source: ...         # where the number comes from

A run whose total batch differs says so at its start, in one warning line naming the number it will
likely miss (a halved batch took SegFormer-B0 on ADE20K from 37 % to 15 % mIoU, mmsegmentation issue
#1569).  ``optimizer.lr_scaling`` adapts the learning rate to the batch actually used:

    none     the recipe's lr (default)
    linear   lr x actual / published          (Goyal et al. 2017, the linear scaling rule for SGD)
    sqrt     lr x sqrt(actual / published)    (often preferred for Adam-type optimizers)

The same keys work for your own runs: set ``recipe.total_batch`` to the batch an lr was tuned with.
Nothing here changes the config: :func:`optimizer_for_batch` returns a scaled copy of ``cfg.optimizer``.
"""

from __future__ import annotations

import logging
import math

from omegaconf import DictConfig

log = logging.getLogger("segtrain")


def total_batch(cfg: DictConfig, world_size: int) -> int:
    """The images per optimizer step: processes x ``data.batch_size`` x ``trainer.accumulate``."""
    return world_size * cfg.data.batch_size * cfg.trainer.accumulate


def lr_factor(scaling: str, actual: int, published: int) -> float:
    if scaling == "linear":
        return actual / published
    if scaling == "sqrt":
        return math.sqrt(actual / published)
    return 1.0


def optimizer_for_batch(cfg: DictConfig, world_size: int, announce: bool = True) -> DictConfig:
    """``cfg.optimizer`` with its lr scaled to this run's total batch (``optimizer.lr_scaling``), after saying
    (``announce``: the main process) when that batch is not the one ``recipe.total_batch`` records."""
    opt, published = cfg.optimizer, cfg.recipe.total_batch
    if published is None:
        return opt
    actual = total_batch(cfg, world_size)
    factor = lr_factor(opt.lr_scaling, actual, published)
    if announce and actual != published:
        number = f"{cfg.recipe.miou:g} % mIoU" if cfg.recipe.miou is not None else "result"
        advice = (
            f"optimizer.lr_scaling={opt.lr_scaling} adapts the lr to it"
            if factor != 1
            else "keep the batch (e.g. trainer.accumulate), or adapt the lr with optimizer.lr_scaling=linear|sqrt"
        )
        log.warning(
            "total batch %d (%d process(es) x data.batch_size %d x trainer.accumulate %d) is not the recipe's %d: "
            "expect to miss its published %s (SegFormer-B0 at half its batch: 15 %% mIoU instead of 37 %%, "
            "mmsegmentation#1569); %s",
            actual,
            world_size,
            cfg.data.batch_size,
            cfg.trainer.accumulate,
            published,
            number,
            advice,
        )
    if factor == 1:
        return opt
    scaled = opt.copy()
    scaled.lr = opt.lr * factor
    if announce:
        log.info(
            "optimizer.lr_scaling=%s: lr %g x %s(%d / %d) = %g",
            opt.lr_scaling,
            opt.lr,
            "" if opt.lr_scaling == "linear" else "sqrt",
            actual,
            published,
            scaled.lr,
        )
    return scaled
