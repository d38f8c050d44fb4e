"""Losses.  ``build_loss(cfg.loss, num_classes, ignore_index)`` returns a
:class:`SegLoss` that takes the network output (logits, or ``{"out", "aux"}``)
and the target, and returns the weighted total.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from segtrain.errors import ConfigError


class CrossEntropy(nn.Module):
    """Pixel-wise cross entropy with ignore_index, class weights and label smoothing."""

    def __init__(self, ignore_index: int = 255, weight: torch.Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.ignore_index, self.label_smoothing = ignore_index, label_smoothing
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), target, weight=self.weight, ignore_index=self.ignore_index,
                               label_smoothing=self.label_smoothing)


class SegLoss(nn.Module):
    """``criterion(out) + aux_weight * criterion(aux)``."""

    def __init__(self, criterion: nn.Module, aux_weight: float = 0.4):
        super().__init__()
        self.criterion, self.aux_weight = criterion, aux_weight

    def forward(self, output, target: torch.Tensor) -> torch.Tensor:
        if isinstance(output, dict):
            loss = self.criterion(output["out"], target)
            if "aux" in output and self.aux_weight > 0:
                loss = loss + self.aux_weight * self.criterion(output["aux"], target)
            return loss
        return self.criterion(output, target)


def build_loss(cfg: DictConfig, num_classes: int, ignore_index: int) -> SegLoss:
    weight = None
    if cfg.class_weights is not None:
        weight = torch.tensor(list(cfg.class_weights), dtype=torch.float32)
        if weight.numel() != num_classes:
            raise ConfigError(f"loss.class_weights has {weight.numel()} values but data.num_classes={num_classes}")
    if cfg.name == "ce":
        criterion = CrossEntropy(ignore_index, weight, cfg.label_smoothing)
    else:
        raise ConfigError(f"unknown loss.name {cfg.name!r}; choose one of: ce")
    return SegLoss(criterion, cfg.aux_weight)
