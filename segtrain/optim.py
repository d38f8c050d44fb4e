"""Optimizers and learning-rate schedules (stepped once per iteration)."""

from __future__ import annotations

import math
from functools import partial

import torch
from omegaconf import DictConfig
from torch import nn

from segtrain.config.schema import OPTIMIZERS, SCHEDULERS
from segtrain.errors import ConfigError

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def param_groups(cfg: DictConfig, model: nn.Module) -> list[dict]:
    """Split the trainable parameters into up to four groups (mmseg's ``paramwise_cfg``).

    * backbone vs. head: parameters under ``model.backbone`` keep ``lr``; all others (decoder,
      heads) get ``lr * head_lr_mult``.  A network without a backbone (a from-scratch U-Net)
      has only head parameters, so the multiplier does not apply there.
    * ``no_decay_norm_bias``: norm-layer weights/biases and every bias get ``weight_decay=0``.

    Each group carries ``lr_mult`` so the schedule scales every group from its own base lr.
    """
    backbone = getattr(model, "backbone", None)
    in_backbone = {id(p) for p in backbone.parameters()} if isinstance(backbone, nn.Module) else set()
    mult = cfg.head_lr_mult if in_backbone else 1.0
    no_decay: set[int] = set()
    if cfg.no_decay_norm_bias:
        for m in model.modules():
            if isinstance(m, NORM_TYPES):
                no_decay.update(id(p) for p in m.parameters(recurse=False))
        no_decay.update(id(p) for n, p in model.named_parameters() if n.endswith(".bias"))
    groups: dict[tuple[bool, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (id(p) in in_backbone, id(p) in no_decay)
        if key not in groups:
            is_backbone, skip_decay = key
            lr_mult = 1.0 if is_backbone else mult
            groups[key] = {
                "params": [],
                "names": [],
                "lr": cfg.lr * lr_mult,
                "lr_mult": lr_mult,
                "weight_decay": 0.0 if skip_decay else cfg.weight_decay,
                "group": ("backbone" if is_backbone else "head") + ("/no_decay" if skip_decay else ""),
            }
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(cfg: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = param_groups(cfg, model)
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            nesterov=cfg.nesterov and cfg.momentum > 0,
        )
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    raise ConfigError(f"unknown optimizer.name {cfg.name!r}; choose one of: {', '.join(OPTIMIZERS)}")


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
        raise ConfigError(f"unknown scheduler.name {cfg.name!r}; choose one of: {', '.join(SCHEDULERS)}")
    if cfg.warmup_iters > 0 and step < cfg.warmup_iters:
        factor *= cfg.warmup_ratio + (1 - cfg.warmup_ratio) * step / cfg.warmup_iters
    return factor


def build_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer, total_iters: int, base_lr: float):
    """Per-iteration LambdaLR with one factor per parameter group, each from the group's own base lr
    (``lr * lr_mult``), so that ``scheduler.min_lr`` is the same floor for every group (mmengine's eta_min)."""
    lr_factor(cfg, 0, total_iters, base_lr)  # validates the name before training starts
    bases = [base_lr * g.get("lr_mult", 1.0) for g in optimizer.param_groups]
    factors = [partial(lr_factor, cfg, total=total_iters, base_lr=b) for b in bases]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
