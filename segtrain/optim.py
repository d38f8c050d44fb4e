"""Optimizers and learning-rate schedules (stepped once per iteration)."""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig
from torch import nn

from segtrain.errors import ConfigError


def build_optimizer(cfg: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    raise ConfigError(f"unknown optimizer.name {cfg.name!r}; choose one of: sgd, adamw")


def lr_factor(cfg: DictConfig, step: int, total: int, base_lr: float) -> float:
    """The multiplier of the base lr at iteration ``step`` (0-based) of ``total``.

    * warmup (``warmup_iters > 0``): linear from ``warmup_ratio`` to 1, applied on top of
    * ``poly``:     ``(1 - min_lr/base) * (1 - step/total) ** power + min_lr/base``  (mmseg's PolyLR)
    * ``cosine``:   ``min_lr/base + (1 - min_lr/base) * (1 + cos(pi * step/total)) / 2``
    * ``constant``: 1
    """
    floor = min(cfg.min_lr / base_lr, 1.0) if base_lr > 0 else 0.0
    progress = min(step, total) / max(total, 1)
    if cfg.name == "poly":
        factor = (1 - floor) * (1 - progress) ** cfg.power + floor
    elif cfg.name == "cosine":
        factor = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    elif cfg.name == "constant":
        factor = 1.0
    else:
        raise ConfigError(f"unknown scheduler.name {cfg.name!r}; choose one of: poly, cosine, constant")
    if cfg.warmup_iters > 0 and step < cfg.warmup_iters:
        factor *= cfg.warmup_ratio + (1 - cfg.warmup_ratio) * step / cfg.warmup_iters
    return factor


def build_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer, total_iters: int, base_lr: float):
    lr_factor(cfg, 0, total_iters, base_lr)  # validates the name before training starts
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step, total_iters, base_lr))
