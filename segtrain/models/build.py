"""Network construction: ``build_model(cfg.model, num_classes, in_channels)`` (the contract every network keeps:
:mod:`segtrain.models`).

The networks (``model.name``) and the ``model.*`` keys each one reads:

    unet           base_channels, norm; backbone (+ pretrained): an ImageNet encoder as the contracting path
    fcn            backbone, pretrained, output_stride (32), variant (32s | 16s | 8s), aux, dropout
    deconvnet      base_channels, norm, variant (deconvnet | segnet), pretrained (base_channels=64: VGG16 weights)
    pspnet         backbone, pretrained, output_stride (8), aux, dropout, head_channels (512)
    deeplabv3      backbone, pretrained, output_stride (16), aux, dropout
    deeplabv3plus  backbone, pretrained, output_stride (16), aux, dropout
    segformer      variant (b0 .. b5), pretrained (a Hugging Face / paper checkpoint), dropout, head_channels
    upernet        backbone, pretrained, output_stride (32), aux (true), dropout, head_channels (512)

Output strides in brackets are the defaults when ``output_stride`` is unset.  A key set for a network that does
not read it is refused by :func:`segtrain.config.validate.check_model` (called here too).  ``pretrained`` is ``true`` (download), ``false``, or the PATH of
a local file (:mod:`segtrain.models.weights`).  ``freeze_backbone=true``
(:func:`freeze_backbone`) trains everything but the pretrained encoder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

from omegaconf import DictConfig
from torch import nn

from segtrain.config.validate import check_model
from segtrain.errors import CheckpointError, ConfigError
from segtrain.models import deconvnet, fcn, segformer
from segtrain.models.backbones import VGGS, backbone_from_config, load_pretrained, torchvision_state
from segtrain.models.deconvnet import DeconvNet
from segtrain.models.deeplab import DeepLabV3, DeepLabV3Plus
from segtrain.models.fcn import FCN
from segtrain.models.pspnet import PSPNet
from segtrain.models.segformer import SegFormer
from segtrain.models.unet import BackboneUNet, UNet
from segtrain.models.upernet import UPerNet
from segtrain.models.vit import ViTPyramid
from segtrain.models.weights import read_weights


def _variant(cfg: DictConfig, network: str, variants: tuple[str, ...], default: str) -> str:
    variant = cfg.variant if cfg.variant is not None else default
    if variant not in variants:
        raise ConfigError(f"unknown model.variant {variant!r} for {network}; choose one of: {', '.join(variants)}")
    return variant


def _unet(cfg: DictConfig, num_classes: int, in_channels: int = 3) -> nn.Module:

    if cfg.backbone is None:
        return UNet(num_classes, in_channels, base_channels=cfg.base_channels, norm=cfg.norm)
    if cfg.output_stride not in (None, 32):
        raise ConfigError(
            f"model.output_stride={cfg.output_stride} is not supported by unet (its decoder climbs the full "
            "stride-32 pyramid); remove model.output_stride"
        )

    return BackboneUNet(
        backbone_from_config(cfg, 32, in_channels=in_channels), num_classes, cfg.base_channels, cfg.norm
    )


def _fcn(cfg: DictConfig, num_classes: int, in_channels: int = 3) -> nn.Module:

    variant = _variant(cfg, "fcn", tuple(fcn.VARIANTS), "8s")
    vgg_state = None  # VGG: FCN also turns the pretrained fc6/fc7 into convolutions
    if cfg.pretrained and cfg.backbone in VGGS:
        vgg_state = torchvision_state(cfg.backbone, cfg.pretrained)
    backbone = backbone_from_config(cfg, 32, state=vgg_state, in_channels=in_channels)
    return FCN(backbone, num_classes, variant, cfg.dropout, cfg.aux, vgg_fc=vgg_state)


def _deconvnet(cfg: DictConfig, num_classes: int, in_channels: int = 3) -> nn.Module:

    variant = _variant(cfg, "deconvnet", deconvnet.VARIANTS, "deconvnet")
    if cfg.backbone is not None:
        raise ConfigError(
            "model=deconvnet builds its own VGG16-style encoder (scaled by model.base_channels); remove "
            "model.backbone (model.pretrained=true with base_channels=64 loads ImageNet VGG16 weights into it)"
        )
    if cfg.output_stride not in (None, 32):
        raise ConfigError(f"model.output_stride={cfg.output_stride} is not supported by deconvnet; remove it")
    if cfg.pretrained and cfg.base_channels != 64:
        raise ConfigError(
            f"model.pretrained=true for deconvnet needs model.base_channels=64 (VGG16's widths), "
            f"got {cfg.base_channels}"
        )
    model = DeconvNet(num_classes, cfg.base_channels, variant, cfg.norm, in_channels)
    if cfg.pretrained:
        model.load_vgg16(torchvision_state("vgg16_bn" if cfg.norm == "bn" else "vgg16", cfg.pretrained))
    return model


def _pspnet(cfg: DictConfig, num_classes: int, in_channels: int = 3) -> nn.Module:

    backbone = backbone_from_config(cfg, 8, in_channels=in_channels)
    return PSPNet(backbone, num_classes, cfg.aux, cfg.dropout, head_channels=cfg.head_channels or 512)


def _deeplabv3(cfg: DictConfig, num_classes: int, in_channels: int = 3) -> nn.Module:

    return DeepLabV3(backbone_from_config(cfg, 16, in_channels=in_channels), num_classes, cfg.aux, cfg.dropout)


def _deeplabv3plus(cfg: DictConfig, num_classes: int, in_channels: int = 3) -> nn.Module:

    return DeepLabV3Plus(backbone_from_config(cfg, 16, in_channels=in_channels), num_classes, cfg.aux, cfg.dropout)


def _segformer(cfg: DictConfig, num_classes: int, in_channels: int = 3) -> nn.Module:

    variant = _variant(cfg, "segformer", tuple(segformer.VARIANTS), "b0")
    if cfg.backbone is not None:
        raise ConfigError(
            f"model=segformer builds its own Mix Transformer encoder (model.variant=b0 .. b5); remove "
            f"model.backbone={cfg.backbone}"
        )
    model = SegFormer(num_classes, variant, in_channels, cfg.dropout, cfg.head_channels)
    if cfg.pretrained:
        model.load_pretrained(_segformer_weights(cfg.pretrained, variant), str(cfg.pretrained))
    return model


def _segformer_weights(pretrained: bool | str, variant: str) -> dict:

    if isinstance(pretrained, str):
        return read_weights(pretrained)

    return load_pretrained(
        SimpleNamespace(url=segformer.WEIGHTS_URL.format(variant=variant)), f"nvidia-mit-{variant}.bin"
    )


def _upernet(cfg: DictConfig, num_classes: int, in_channels: int = 3) -> nn.Module:

    backbone = backbone_from_config(cfg, 32, in_channels=in_channels)
    return UPerNet(backbone, num_classes, cfg.aux, cfg.dropout, cfg.head_channels or 512)


BUILDERS: dict[str, Callable[[DictConfig, int, int], nn.Module]] = {
    "fcn": _fcn,
    "deconvnet": _deconvnet,
    "unet": _unet,
    "pspnet": _pspnet,
    "deeplabv3": _deeplabv3,
    "deeplabv3plus": _deeplabv3plus,
    "segformer": _segformer,
    "upernet": _upernet,
}


def build_model(cfg: DictConfig, num_classes: int, in_channels: int = 3) -> nn.Module:
    """The network ``cfg`` (the ``model`` config) asks for, with ``num_classes`` outputs and ``in_channels`` bands."""
    check_model(cfg)
    model = BUILDERS[cfg.name](cfg, num_classes, in_channels)
    if cfg.freeze_backbone:
        freeze_backbone(model, cfg.name)
    return model


class _Frozen:
    """Mixed into a frozen encoder's class: ``train()`` keeps it in eval mode (BatchNorm statistics and dropout as
    at inference), whatever the network around it does."""

    def train(self, mode: bool = True):
        return super().train(False)


_FROZEN: dict[type, type] = {}


def freeze_backbone(model: nn.Module, network: str) -> nn.Module:
    """``model.freeze_backbone=true``: the pretrained encoder (``model.backbone``; of a plain ViT's pyramid, the ViT
    alone: the pyramid's new layers train) gets ``requires_grad=False`` (so the optimizer leaves it out) and stays
    in eval mode in training.  The state-dict keys do not change."""

    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise ConfigError(f"model.freeze_backbone=true needs a network with an encoder; model={network} has none")
    part = backbone.model if isinstance(backbone, ViTPyramid) else backbone
    part.requires_grad_(False)
    cls = type(part)
    if cls not in _FROZEN:
        _FROZEN[cls] = type(f"Frozen{cls.__name__}", (_Frozen, cls), {})
    part.__class__ = _FROZEN[cls]
    part.eval()
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def checkpoint_model(state: dict, cfg: DictConfig, path: str | Path) -> nn.Module:
    """The network of ``cfg.model`` with the checkpoint's weights (on the CPU, in training mode)."""
    num_classes = cfg.data.num_classes
    stored_classes = state.get("meta", {}).get("num_classes", num_classes)
    if stored_classes != num_classes:
        raise ConfigError(f"the checkpoint predicts {stored_classes} classes but data.num_classes={num_classes}")
    model = build_model(cfg.model, num_classes, cfg.data.in_channels)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(
            f"the weights in {path} do not fit model={cfg.model.name}: {str(e).splitlines()[-1].strip()}"
        ) from None
    return model
