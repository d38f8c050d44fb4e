"""Network construction: ``build_model(cfg.model, num_classes)``.

The contract every network keeps:

* ``forward(x)`` takes ``[N, C, H, W]`` of any ``H, W`` and, in eval mode,
  returns logits ``[N, num_classes, H, W]``.
* In training mode a network with an auxiliary head returns
  ``{"out": logits, "aux": aux_logits}`` (both at the input size); without one it
  returns the logits tensor.
"""

from __future__ import annotations

from typing import Callable

from omegaconf import DictConfig
from torch import nn

from segtrain.errors import ConfigError


def _unet(cfg: DictConfig, num_classes: int) -> nn.Module:
    from segtrain.models.unet import UNet

    return UNet(num_classes, base_channels=cfg.base_channels, norm=cfg.norm)


BUILDERS: dict[str, Callable[[DictConfig, int], nn.Module]] = {
    "unet": _unet,
}


def build_model(cfg: DictConfig, num_classes: int) -> nn.Module:
    if cfg.name not in BUILDERS:
        raise ConfigError(f"unknown model.name {cfg.name!r}; choose one of: {', '.join(sorted(BUILDERS))}")
    return BUILDERS[cfg.name](cfg, num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
