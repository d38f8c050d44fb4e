"""ImageNet encoders as feature pyramids.

Every backbone is an ImageNet classifier with its classifier removed, cut into
five stages.  ``forward(x)`` returns the output of each stage, the pyramid

    [C1, C2, C3, C4, C5]   at nominal strides 2, 4, 8, 16, 32

with ``backbone.channels[i]`` channels and actual stride ``backbone.strides[i]``.
Below ``model.output_stride`` (8 or 16) the remaining strides are replaced by
dilation, so e.g. at output stride 8 the strides are ``[2, 4, 8, 8, 8]`` and
C4, C5 keep the resolution of C3 with a 2x / 4x larger receptive field
(DeepLab's atrous convolution):

    name                 C1   C2    C3    C4    C5    output strides
    resnet18/34          64   64   128   256   512    8, 16, 32
    resnet50/101         64  256   512  1024  2048    8, 16, 32
    vgg16, vgg16_bn      64  128   256   512   512    32 (pool1 .. pool5)
    mobilenet_v3_large   16   24    40   112   960    8, 16, 32
    timm:NAME            from ``timm.create_model(NAME, features_only=True)``: 5 levels (CNNs), or
                         4 (strides 4-32: ConvNeXt, Swin ...) with C1 = None, channels[0] = 0
    timm:<plain ViT>     ViT, DeiT, DINOv2 (``timm:vit_small_patch14_dinov2``): ViTDet's simple feature
                         pyramid from the last block (:mod:`segtrain.models.vit`), C1 = None; 16, 32

Any number of input bands (``data.in_channels``): the first convolution takes
them; with pretrained weights its RGB filters are adapted as
segmentation_models_pytorch does (:func:`adapt_conv_weight`), so a network fed
bands that repeat a 3-band image computes what the 3-band network computes.

``model.pretrained=true`` loads torchvision's ImageNet weights from the torch
hub cache (``torch.hub.get_dir()/checkpoints/``), downloading them there first
if they are missing.  The download gives up after a short timeout and then
raises a one-line ConfigError that names the file, its URL and where to put
it, so an offline machine never hangs.  ``model.pretrained=PATH`` reads a local
file instead (:mod:`segtrain.models.weights`): torchvision's or timm's state dict
of the encoder (``.pth``, ``.pt``, ``.bin``, ``.safetensors``, or a Hugging Face
folder), its tensors found by name; timm then loads them as its own downloads.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from segtrain.errors import ConfigError, missing_extra
from segtrain.models.blocks import SafeBatchNorm2d
from segtrain.models.vit import ViTPyramid, is_plain_vit
from segtrain.models.weights import match, read_weights
from segtrain.utils import download

log = logging.getLogger("segtrain")

# Seconds to wait for the weights server (connection, then each read) before giving up.
DOWNLOAD_TIMEOUT = float(os.environ.get("SEGTRAIN_DOWNLOAD_TIMEOUT", "10"))

# name: (its torchvision.models constructor, its Weights enum), looked up in torchvision.models when used (:func:`_tvm`)
RESNETS: dict[str, tuple[str, str]] = {
    "resnet18": ("resnet18", "ResNet18_Weights"),
    "resnet34": ("resnet34", "ResNet34_Weights"),
    "resnet50": ("resnet50", "ResNet50_Weights"),
    "resnet101": ("resnet101", "ResNet101_Weights"),
}
VGGS: dict[str, tuple[bool, str]] = {  # name: (batch norm, weights)
    "vgg16": (False, "VGG16_Weights"),
    "vgg16_bn": (True, "VGG16_BN_Weights"),
}
MOBILENETS: dict[str, tuple[str, str]] = {
    "mobilenet_v3_large": ("mobilenet_v3_large", "MobileNet_V3_Large_Weights"),
}
NAMES = [*RESNETS, *VGGS, *MOBILENETS]
CLASSIFIERS = ("fc.", "classifier.")  # torchvision's classifier layers (ResNet; VGG, MobileNetV3): no encoder part


def _tvm(attribute: str) -> Any:
    """``torchvision.models.ATTRIBUTE``, imported when a torchvision backbone is built or its weights looked up."""
    # torchvision imports torch._dynamo: seconds of start-up on a small CPU that a U-Net, DeconvNet or SegFormer never needs
    from torchvision import models

    return getattr(models, attribute)


class Backbone(nn.Module):
    """Five stages run in sequence; ``forward`` returns each stage's output ``[C1, ..., C5]``."""

    def __init__(self, name: str, stages: list[nn.Module], channels: list[int], output_stride: int):
        super().__init__()
        self.name = name
        self.stages = nn.ModuleList(stages)
        self.channels = list(channels)
        self.output_stride = output_stride
        self.strides = [min(2**i, output_stride) for i in range(1, 6)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


def _load_classifier(net: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """torchvision's ImageNet state dict into its classifier ``net``; the classifier layer itself may be absent (a
    file of encoder weights), the rest may not."""
    missing = [k for k in net.load_state_dict(state, strict=False).missing_keys if not k.startswith(CLASSIFIERS)]
    if missing:
        raise ConfigError(f"pretrained weights lack {len(missing)} of the encoder's tensors, e.g. {missing[0]}")


# ---------------------------------------------------------------------------
# ResNet


def _dilate_basic_blocks(layer: nn.Sequential, previous: int, dilation: int) -> None:
    """``replace_stride_with_dilation`` for BasicBlock stages (ResNet-18/34), which torchvision refuses.

    As torchvision does for Bottleneck: the first block drops its stride and its
    (formerly strided) 3x3 conv keeps the previous dilation; every 3x3 conv
    after it is dilated by ``dilation``.
    """
    for i, block in enumerate(layer):
        for conv in (block.conv1, block.conv2):
            d = previous if (i == 0 and conv is block.conv1) else dilation
            conv.stride, conv.dilation, conv.padding = (1, 1), (d, d), (d, d)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)


def resnet(name: str, output_stride: int = 32, state: dict | None = None) -> Backbone:
    make = _tvm(RESNETS[name][0])
    dilate = [output_stride <= 4, output_stride <= 8, output_stride <= 16]  # layer2, layer3, layer4
    bottleneck = name in ("resnet50", "resnet101")
    net = make(weights=None, replace_stride_with_dilation=dilate if bottleneck else None)
    if state is not None:
        _load_classifier(net, state)
    if not bottleneck:
        dilation = 1
        for layer, dil in zip((net.layer2, net.layer3, net.layer4), dilate):
            if dil:
                _dilate_basic_blocks(layer, dilation, dilation * 2)
                dilation *= 2
    stages = [
        nn.Sequential(net.conv1, net.bn1, net.relu),
        nn.Sequential(net.maxpool, net.layer1),
        net.layer2,
        net.layer3,
        net.layer4,
    ]
    width = 4 if bottleneck else 1
    return Backbone(name, stages, [64, 64 * width, 128 * width, 256 * width, 512 * width], output_stride)


# ---------------------------------------------------------------------------
# VGG


def vgg(name: str, output_stride: int = 32, state: dict | None = None) -> Backbone:
    """VGG16's 13 convs; stage i ends with pool i.  torchvision's layout, so its weights load as they are.

    ``state``: torchvision's VGG state dict; its ``features.*`` fill the convs (FCN turns its classifier into
    convolutions itself, see ``fcn.VGGFullyConv.load_fc``)."""
    if output_stride != 32:
        raise ConfigError(
            f"model.backbone={name} cannot run at model.output_stride={output_stride}: VGG has no dilated variant "
            "here; set model.output_stride=32 or use a resnet or mobilenet_v3_large backbone"
        )
    batch_norm, _ = VGGS[name]
    layers: list[nn.Module] = []
    stages: list[nn.Module] = []
    cin = 3
    for widths in ([64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]):
        for w in widths:
            conv = nn.Conv2d(cin, w, 3, padding=1)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.BatchNorm2d(w), nn.ReLU(inplace=True)] if batch_norm else [conv, nn.ReLU(inplace=True)]
            cin = w
        layers.append(nn.MaxPool2d(2, 2))
    features = nn.Sequential(*layers)
    if state is not None:
        features.load_state_dict({k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")})
    pools = [i for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d)]
    starts = [0] + [p + 1 for p in pools[:-1]]
    # Slices of one Sequential keep torchvision's numbering inside each stage.
    for start, pool in zip(starts, pools):
        stages.append(features[start : pool + 1])
    return Backbone(name, stages, [64, 128, 256, 512, 512], 32)


# ---------------------------------------------------------------------------
# MobileNetV3


def _dilate_inverted_residuals(blocks: nn.Sequential, dilation: int) -> None:
    """torchvision's ``dilated=True``: each block's depthwise conv drops its stride and is dilated."""
    for block in blocks:
        for conv in block.modules():
            if isinstance(conv, nn.Conv2d) and conv.groups > 1 and conv.kernel_size[0] > 1:
                k = conv.kernel_size[0]
                conv.stride, conv.dilation = (1, 1), (dilation, dilation)
                conv.padding = ((k - 1) // 2 * dilation,) * 2


def mobilenet(name: str, output_stride: int = 32, state: dict | None = None) -> Backbone:
    make = _tvm(MOBILENETS[name][0])
    net = make(weights=None)
    if state is not None:
        _load_classifier(net, state)
    f = net.features
    # The blocks with stride 2 (torchvision's ``_is_cn``) start the stages: 2, 4, 7, 13 for the large model.
    starts = [0, *(i for i, m in enumerate(f) if getattr(m, "_is_cn", False))]
    bounds = [*starts[1:], len(f)]
    stages = [f[s:e] for s, e in zip(starts, bounds)]
    assert len(stages) == 5, f"{name}: expected 4 strided blocks, found {len(starts) - 1}"
    dilation = 1
    for stage, stride in zip(stages[3:], (8, 16)):  # C4 (stride 16) and C5 (stride 32)
        if output_stride <= stride:
            dilation *= 2
            _dilate_inverted_residuals(stage, dilation)
    return Backbone(name, stages, [stage[-1].out_channels for stage in stages], output_stride)


# ---------------------------------------------------------------------------
# timm (optional)


class TimmBackbone(Backbone):
    """A timm ``features_only`` encoder as the pyramid ``[C1, ..., C5]``.

    Five levels (strides 2-32, CNNs such as ``resnet50d``, ``efficientnet_b0``) are the pyramid as they
    are.  Four levels (strides 4-32: ConvNeXt, Swin, PVTv2, CAFormer ...) have no stride-2 map: C1 is then
    ``None`` with ``channels[0] == 0`` (U-Net's stride-2 decoder stage has no skip, as in smp for transformer
    encoders; no other network reads C1).  Such encoders get their input zero-padded at the bottom/right to
    a multiple of their largest stride (patch embeddings need it) and every map cropped back to
    ``ceil(size / stride)``, so they take any input size; channels-last (NHWC) outputs become NCHW.
    """

    def __init__(self, name: str, model: nn.Module, channels: list[int], strides: list[int], output_stride: int):
        super().__init__(name, [], channels, output_stride)
        self.model = model
        self.strides = strides
        self.levels = 5 if channels[0] else 4
        self.nhwc = str(getattr(model, "output_fmt", "NCHW")).endswith("NHWC")
        self.multiple = max(model.feature_info.reduction())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor | None]:
        if self.levels == 5:
            return list(self.model(x))
        h, w = x.shape[-2:]
        m = self.multiple
        x = torch.nn.functional.pad(x, [0, -w % m, 0, -h % m])
        features: list[torch.Tensor | None] = [None]
        for f, s in zip(self.model(x), self.strides[1:]):
            f = f.permute(0, 3, 1, 2) if self.nhwc else f
            features.append(f[..., : -(-h // s), : -(-w // s)])
        return features


def _create_timm(timm: Any, arch: str, kwargs: dict) -> nn.Module:
    """``timm.create_model``; vision transformers that allow it (Swin) take any input size."""
    try:
        return timm.create_model(arch, strict_img_size=False, **kwargs)
    except TypeError as e:
        if "strict_img_size" not in str(e):
            raise
        return timm.create_model(arch, **kwargs)


def _import_timm(name: str) -> Any:
    try:
        import timm  # an optional package (segtrain[timm])
    except ImportError:
        raise ConfigError(
            missing_extra(f"model.backbone={name}", "timm", "timm", f"or use one of: {', '.join(NAMES)}")
        ) from None
    return timm


def _reference(timm: Any, arch: str, **kwargs: Any) -> nn.Module:
    """``arch`` built on the meta device (no memory, no weights): its names, shapes and feature strides."""
    with torch.device("meta"):
        return _create_timm(timm, arch, {"pretrained": False, **kwargs})


def _timm_file(timm: Any, name: str, path: str, **kwargs: Any) -> dict:
    """``pretrained_cfg_overlay`` that has timm load ``path`` (its own filter, first-layer and positional-embedding
    adaptation) after :func:`~segtrain.models.weights.match` found every tensor of the encoder in it."""

    reference = _reference(timm, name.split(":", 1)[1], **kwargs)
    classifier = reference.pretrained_cfg.get("classifier") or ()
    heads = tuple(f"{c}." for c in ([classifier] if isinstance(classifier, str) else classifier))
    wanted = {k: v.shape for k, v in reference.state_dict().items() if not heads or not k.startswith(heads)}
    state = match(read_weights(path), wanted, name, path, check_shapes=False)
    return {"state_dict": state, "num_classes": 0}  # num_classes: timm then skips the classifier it lacks


def timm_backbone(
    name: str, output_stride: int = 32, pretrained: bool | str = False, in_channels: int = 3
) -> Backbone | nn.Module:
    """A timm encoder: ``features_only`` (5 or 4 levels), or a plain ViT's simple feature pyramid (:mod:`.vit`).
    ``pretrained``: timm's weights (downloaded by timm), or a file's (``model.pretrained=PATH``)."""

    arch = name.split(":", 1)[1]
    timm = _import_timm(name)
    try:
        plain = is_plain_vit(_reference(timm, arch))
    except Exception:  # an unknown name: reported below, by the real creation
        plain = False
    if plain:
        return vit_backbone(timm, name, output_stride, pretrained, in_channels)
    kwargs: dict[str, Any] = {"features_only": True, "pretrained": bool(pretrained)}
    if in_channels != 3:  # timm adapts the pretrained first layer itself, as adapt_conv_weight does
        kwargs["in_chans"] = in_channels
    if output_stride != 32:
        kwargs["output_stride"] = output_stride
    if isinstance(pretrained, str):
        kwargs["pretrained_cfg_overlay"] = _timm_file(timm, name, pretrained)
    try:
        model = _create_timm(timm, arch, kwargs)
    except Exception as e:  # unknown name, no dilation support, weights not downloadable ...
        if output_stride != 32 and not _creates(timm, arch, output_stride) and _creates(timm, arch):
            raise ConfigError(
                f"model.backbone={name} cannot run at model.output_stride={output_stride}: timm has no dilated "
                "variant of it; set model.output_stride=32 (or use a CNN such as timm:convnext_tiny or resnet50)"
            ) from None
        raise ConfigError(f"model.backbone={name}: timm could not create {_what(pretrained)} ({_reason(e)})") from None
    reductions = model.feature_info.reduction()
    nominal = [min(2**i, output_stride) for i in range(1, 6)]
    if reductions not in (nominal, nominal[1:]):
        raise ConfigError(
            f"model.backbone={name} gives feature maps at strides {reductions} with model.output_stride="
            f"{output_stride}; segtrain needs 5 levels at strides 2-32 (a CNN such as timm:resnet50d), 4 at "
            "strides 4-32 (ConvNeXt, Swin: timm:convnext_tiny) or a plain ViT (timm:vit_small_patch14_dinov2)"
        )
    channels = model.feature_info.channels()
    channels = channels if len(channels) == 5 else [0, *channels]
    return TimmBackbone(name, model, channels, nominal, output_stride)


def _what(pretrained: bool | str) -> str:
    if isinstance(pretrained, str):
        return f"it with the weights of {pretrained}"
    return "it with its pretrained weights" if pretrained else "it"


def _reason(e: Exception) -> str:
    return (" ".join(str(e).split()) or type(e).__name__)[:200]


def vit_backbone(timm: Any, name: str, output_stride: int, pretrained: bool | str, in_channels: int) -> nn.Module:
    """A plain ViT (any input size: positional embeddings interpolated) and its simple feature pyramid."""

    if output_stride not in (16, 32):
        raise ConfigError(
            f"model.backbone={name} cannot run at model.output_stride={output_stride}: a plain ViT has one map at "
            "stride 16 (14 for DINOv2), so its pyramid runs at model.output_stride 16 or 32"
        )
    arch = name.split(":", 1)[1]
    kwargs: dict[str, Any] = {"pretrained": bool(pretrained), "dynamic_img_size": True, "num_classes": 0}
    if in_channels != 3:
        kwargs["in_chans"] = in_channels
    if isinstance(pretrained, str):
        kwargs["pretrained_cfg_overlay"] = _timm_file(timm, name, pretrained, dynamic_img_size=True, num_classes=0)
    try:
        vit = timm.create_model(arch, **kwargs)
    except Exception as e:
        raise ConfigError(f"model.backbone={name}: timm could not create {_what(pretrained)} ({_reason(e)})") from None
    return ViTPyramid(name, vit, output_stride)


def _creates(timm: Any, arch: str, output_stride: int = 32) -> bool:
    """Whether timm builds ``arch`` at ``output_stride`` with random weights: "cannot dilate" is told apart
    from other failures (such as pretrained weights that cannot be downloaded)."""
    stride = {} if output_stride == 32 else {"output_stride": output_stride}
    try:
        _create_timm(timm, arch, {"features_only": True, "pretrained": False, **stride})
        return True
    except Exception:  # noqa: BLE001 - any failure: the original error is the one to report
        return False


# ---------------------------------------------------------------------------


def imagenet_weights(name: str) -> Any:
    """The torchvision ``Weights`` entry of backbone ``name`` (not timm)."""
    for table in (RESNETS, VGGS, MOBILENETS):
        if name in table:
            return _tvm(table[name][1]).IMAGENET1K_V1
    raise ConfigError(f"unknown model.backbone {name!r}; choose one of: {', '.join(NAMES)}, or timm:NAME")


def torchvision_state(name: str, pretrained: bool | str) -> dict[str, torch.Tensor] | None:
    """The ImageNet state dict of torchvision backbone ``name``: downloaded (``pretrained=True``), read from a file
    (``pretrained=PATH``: its tensors found by name, :func:`segtrain.models.weights.match`), or None."""
    if not pretrained:
        return None
    if not isinstance(pretrained, str):
        return load_pretrained(imagenet_weights(name))

    table = RESNETS if name in RESNETS else MOBILENETS if name in MOBILENETS else None
    with torch.device("meta"):  # names and shapes only
        net = _tvm(table[name][0] if table is not None else "vgg16_bn" if VGGS[name][0] else "vgg16")()
    wanted = {k: v.shape for k, v in net.state_dict().items()}
    return match(read_weights(pretrained), wanted, f"torchvision's {name}", pretrained, optional=CLASSIFIERS)


def build_backbone(
    name: str,
    output_stride: int = 32,
    pretrained: bool | str = False,
    state: dict | None = None,
    in_channels: int = 3,
) -> Backbone | nn.Module:
    """``name`` at ``output_stride`` (8, 16 or 32, checked by the config); ImageNet weights when
    ``pretrained`` (``True``: downloaded; a path: that file's), or the given torchvision ``state``;
    ``in_channels`` input bands (:func:`adapt_first_conv`)."""
    if name.startswith("timm:"):
        return timm_backbone(name, output_stride, pretrained, in_channels)
    if state is None and pretrained:
        imagenet_weights(name)  # an unknown name is reported as such, before any file is read
        state = torchvision_state(name, pretrained)
    for table, make in ((RESNETS, resnet), (VGGS, vgg), (MOBILENETS, mobilenet)):
        if name in table:
            backbone = adapt_first_conv(make(name, output_stride, state), in_channels, pretrained=state is not None)
            return _safe_batch_norm(backbone)
    raise ConfigError(f"unknown model.backbone {name!r}; choose one of: {', '.join(NAMES)}, or timm:NAME")


def _safe_batch_norm(module: nn.Module) -> nn.Module:
    """torchvision's BatchNorm2d layers as :class:`SafeBatchNorm2d` (the same layer, weights and keys), so that a
    training batch of one image whose deepest map is 1x1 (a 32-px crop) does not raise."""
    for m in module.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = SafeBatchNorm2d
    return module


def backbone_from_config(
    cfg: DictConfig, default_output_stride: int, state: dict | None = None, in_channels: int = 3
) -> Backbone:
    """The backbone that ``model.backbone`` / ``output_stride`` / ``pretrained`` ask for (resnet50 when unset)."""
    os_ = cfg.output_stride if cfg.output_stride is not None else default_output_stride
    return build_backbone(cfg.backbone or "resnet50", os_, cfg.pretrained, state, in_channels)


# ---------------------------------------------------------------------------
# Input bands other than RGB


def adapt_conv_weight(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """RGB filters ``[out, 3, k, k]`` for ``in_channels`` bands, as smp's ``patch_first_conv`` adapts pretrained
    weights: one band gets the sum over RGB (a gray image then gives the RGB network's response to R = G = B);
    more bands repeat R, G, B, R, ... scaled by ``3 / in_channels`` (bands that repeat RGB give its response)."""
    if in_channels == weight.shape[1]:
        return weight
    if in_channels == 1:
        return weight.sum(1, keepdim=True)
    index = torch.arange(in_channels, device=weight.device) % weight.shape[1]
    return weight[:, index] * (weight.shape[1] / in_channels)


def adapt_first_conv(module: nn.Module, in_channels: int, pretrained: bool = True) -> nn.Module:
    """Make the first ``Conv2d`` of ``module`` take ``in_channels`` bands, in place; returns ``module``.

    ``pretrained``: its weights are adapted (:func:`adapt_conv_weight`); otherwise new weights are drawn
    with the init torchvision's ResNet, VGG and MobileNet use (Kaiming normal, fan out)."""
    conv = next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None or conv.in_channels == in_channels:
        return module
    if conv.groups != 1:
        raise ConfigError(f"cannot adapt a grouped first convolution to data.in_channels={in_channels}")
    with torch.no_grad():
        if pretrained:
            weight = adapt_conv_weight(conv.weight.detach(), in_channels).clone()
        else:
            weight = conv.weight.new_empty((conv.out_channels, in_channels, *conv.kernel_size))
            nn.init.kaiming_normal_(weight, mode="fan_out", nonlinearity="relu")
    conv.weight = nn.Parameter(weight)
    conv.in_channels = in_channels
    if pretrained:
        how = "summed over RGB" if in_channels == 1 else f"RGB repeated, scaled by 3/{in_channels}"
        log.info("pretrained first layer adapted to %d input bands (%s)", in_channels, how)
    return module


# ---------------------------------------------------------------------------
# Pretrained weights


def cache_path(url: str) -> Path:
    """Where torch.hub keeps (and we look for) the file of ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def load_pretrained(weights: Any, filename: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict of a torchvision ``Weights`` entry (or anything with a ``url``): from the hub cache, else
    downloaded there (as ``filename``, default the URL's)."""
    url = weights.url
    path = cache_path(url) if filename is None else cache_path(url).with_name(filename)
    if not path.is_file():
        try:
            prefix = re.search(r"-([a-f0-9]{6,})\.", path.name)
            download(url, path, DOWNLOAD_TIMEOUT, prefix.group(1) if prefix else None)
        except Exception as e:
            reason = " ".join(str(e).split()) or type(e).__name__
            raise ConfigError(
                f"pretrained weights {path.name} are not in the torch hub cache and could not be downloaded from "
                f"{url} ({reason}); download that file and place it at {path}, or set model.pretrained=false"
            ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise ConfigError(
            f"cannot read pretrained weights {path} ({reason}); delete the file to download it again"
        ) from None
