"""Network construction: ``build_model(cfg.model, num_classes, in_channels)``.

The contract every network keeps:

* ``forward(x)`` takes ``[N, C, H, W]`` of any ``H, W`` (``C = in_channels``,
  ``data.in_channels``; pretrained first layers adapted, see ``backbones.adapt_first_conv``)
  and, in eval mode, returns logits ``[N, num_classes, H, W]`` (``num_classes=1``: one
  sigmoid logit).
* In training mode a network with an auxiliary head returns
  ``{"out": logits, "aux": aux_logits}`` (both at the input size); without one it
  returns the logits tensor.

The networks (``model.name``) and the ``model.*`` keys each one reads:

    unet           base_channels, norm; backbone (+ pretrained): an ImageNet encoder as the contracting path
    fcn            backbone, pretrained, output_stride (32), variant (32s | 16s | 8s), aux, dropout
    deconvnet      base_channels, norm, variant (deconvnet | segnet), pretrained (base_channels=64: VGG16 weights)
    pspnet         backbone, pretrained, output_stride (8), aux, dropout
    deeplabv3      backbone, pretrained, output_stride (16), aux, dropout
    deeplabv3plus  backbone, pretrained, output_stride (16), aux, dropout

``backbone`` (resnet50 when unset) is one of :mod:`segtrain.models.backbones`;
output strides in brackets are the defaults when ``output_stride`` is unset.
``backbone``, ``pretrained``, ``output_stride``, ``aux`` or ``variant`` set for a
network that does not read it is a ConfigError, not silently ignored.
"""

from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig
from torch import nn

from segtrain.errors import ConfigError


def _reject(cfg: DictConfig, network: str, *keys: str) -> None:
    """ConfigError for a model key that ``network`` does not use (so it is not silently ignored)."""
    unset = {"backbone": None, "pretrained": False, "output_stride": None, "aux": False, "variant": None}
    for key in keys:
        value = cfg[key]
        if value != unset[key]:
            shown = str(value).lower() if isinstance(value, bool) else value
            raise ConfigError(f"model.{key}={shown} is not used by model={network}; remove it")


def _variant(cfg: DictConfig, network: str, variants: tuple[str, ...], default: str) -> str:
    variant = cfg.variant if cfg.variant is not None else default
    if variant not in variants:
        raise ConfigError(f"unknown model.variant {variant!r} for {network}; choose one of: {', '.join(variants)}")
    return variant


def _unet(cfg: DictConfig, num_classes: int, in_channels: int = 3) -> nn.Module:
    from segtrain.models.unet import BackboneUNet, UNet

    _reject(cfg, "unet", "aux", "variant")
    if cfg.backbone is None:
        if cfg.pretrained:
            raise ConfigError("model.pretrained=true needs an ImageNet encoder: set model.backbone (e.g. resnet18)")
        _reject(cfg, "unet", "output_stride")
        return UNet(num_classes, in_channels, base_channels=cfg.base_channels, norm=cfg.norm)
    if cfg.output_stride not in (None, 32):
        raise ConfigError(
            f"model.output_stride={cfg.output_stride} is not supported by unet (its decoder climbs the full "
            "stride-32 pyramid); remove model.output_stride"
        )
    from segtrain.models.backbones import backbone_from_config

    return BackboneUNet(
        backbone_from_config(cfg, 32, in_channels=in_channels), num_classes, cfg.base_channels, cfg.norm
    )


def _fcn(cfg: DictConfig, num_classes: int, in_channels: int = 3) -> nn.Module:
    from segtrain.models.backbones import VGGS, backbone_from_config, imagenet_weights, load_pretrained
    from segtrain.models.fcn import FCN, VARIANTS

    variant = _variant(cfg, "fcn", tuple(VARIANTS), "8s")
    vgg_state = None  # VGG: FCN also turns the pretrained fc6/fc7 into convolutions
    if cfg.pretrained and cfg.backbone in VGGS:
        vgg_state = load_pretrained(imagenet_weights(cfg.backbone))
    backbone = backbone_from_config(cfg, 32, state=vgg_state, in_channels=in_channels)
    return FCN(backbone, num_classes, variant, cfg.dropout, cfg.aux, vgg_fc=vgg_state)


def _deconvnet(cfg: DictConfig, num_classes: int, in_channels: int = 3) -> nn.Module:
    from segtrain.models.backbones import imagenet_weights, load_pretrained
    from segtrain.models.deconvnet import VARIANTS, DeconvNet

    variant = _variant(cfg, "deconvnet", VARIANTS, "deconvnet")
    if cfg.backbone is not None:
        raise ConfigError(
            "model=deconvnet builds its own VGG16-style encoder (scaled by model.base_channels); remove "
            "model.backbone (model.pretrained=true with base_channels=64 loads ImageNet VGG16 weights into it)"
        )
    _reject(cfg, "deconvnet", "aux")
    if cfg.output_stride not in (None, 32):
        raise ConfigError(f"model.output_stride={cfg.output_stride} is not supported by deconvnet; remove it")
    if cfg.pretrained and cfg.base_channels != 64:
        raise ConfigError(
            f"model.pretrained=true for deconvnet needs model.base_channels=64 (VGG16's widths), "
            f"got {cfg.base_channels}"
        )
    model = DeconvNet(num_classes, cfg.base_channels, variant, cfg.norm, in_channels)
    if cfg.pretrained:
        model.load_vgg16(load_pretrained(imagenet_weights("vgg16_bn" if cfg.norm == "bn" else "vgg16")))
    return model


def _pspnet(cfg: DictConfig, num_classes: int, in_channels: int = 3) -> nn.Module:
    from segtrain.models.backbones import backbone_from_config
    from segtrain.models.pspnet import PSPNet

    _reject(cfg, "pspnet", "variant")
    return PSPNet(backbone_from_config(cfg, 8, in_channels=in_channels), num_classes, cfg.aux, cfg.dropout)


def _deeplabv3(cfg: DictConfig, num_classes: int, in_channels: int = 3) -> nn.Module:
    from segtrain.models.backbones import backbone_from_config
    from segtrain.models.deeplab import DeepLabV3

    _reject(cfg, "deeplabv3", "variant")
    return DeepLabV3(backbone_from_config(cfg, 16, in_channels=in_channels), num_classes, cfg.aux, cfg.dropout)


def _deeplabv3plus(cfg: DictConfig, num_classes: int, in_channels: int = 3) -> nn.Module:
    from segtrain.models.backbones import backbone_from_config
    from segtrain.models.deeplab import DeepLabV3Plus

    _reject(cfg, "deeplabv3plus", "variant")
    return DeepLabV3Plus(backbone_from_config(cfg, 16, in_channels=in_channels), num_classes, cfg.aux, cfg.dropout)


BUILDERS: dict[str, Callable[[DictConfig, int, int], nn.Module]] = {
    "fcn": _fcn,
    "deconvnet": _deconvnet,
    "unet": _unet,
    "pspnet": _pspnet,
    "deeplabv3": _deeplabv3,
    "deeplabv3plus": _deeplabv3plus,
}


def build_model(cfg: DictConfig, num_classes: int, in_channels: int = 3) -> nn.Module:
    """The network ``cfg`` (the ``model`` config) asks for, with ``num_classes`` outputs and ``in_channels`` bands."""
    if cfg.name not in BUILDERS:
        raise ConfigError(f"unknown model.name {cfg.name!r}; choose one of: {', '.join(sorted(BUILDERS))}")
    return BUILDERS[cfg.name](cfg, num_classes, in_channels)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
