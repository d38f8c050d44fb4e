"""DeepLabv3 (Chen et al., 2017) and DeepLabv3+ (Chen et al., 2018).

DeepLabv3:

    image -> dilated backbone -> C5 -> ASPP -> 3x3 conv (256) -> 1x1 conv -> up -> logits
                                 C4 -> auxiliary FCN head -> up -> aux logits (training only, ``model.aux=true``)

ASPP (atrous spatial pyramid pooling), five parallel branches on C5, each
with BN and ReLU, concatenated and projected:

    1x1 conv (256)
    3x3 conv (256), rate 6      \
    3x3 conv (256), rate 12      }  at output stride 16; doubled at 8 (12, 24, 36), halved at 32
    3x3 conv (256), rate 18     /
    image pooling: global avg pool -> 1x1 conv (256) -> upsample
    -> concat (1280) -> 1x1 conv (256) -> dropout

With a ResNet-50 this is layer for layer torchvision's ``deeplabv3_resnet50``
(the same 39,638,869 parameters for 21 classes, no aux head).

DeepLabv3+ adds a decoder that recovers detail from the stride-4 features:

    C5 -> ASPP (256) ------------------------> up to C2's size --+
    C2 -> 1x1 conv (48), BN, ReLU ----------------------------> concat (304)
                                   -> 3x3 conv (256) -> 3x3 conv (256) -> 1x1 conv -> up x4 -> logits

Batch size 1: the image-pooling branch's BN is SafeBatchNorm2d (see
``blocks.py``), which normalises a single pooled value per channel with its
running statistics instead of failing.
"""

from __future__ import annotations

import torch
from torch import nn

from segtrain.models.backbones import Backbone
from segtrain.models.blocks import ConvBNReLU, FCNHead, resize_to, with_aux


def atrous_rates(output_stride: int) -> tuple[int, int, int]:
    """(6, 12, 18) at output stride 16, scaled with the feature resolution."""
    return tuple(r * 16 // output_stride for r in (6, 12, 18))


class ImagePooling(nn.Sequential):
    """Image-level features: global average pool -> 1x1 conv -> BN -> ReLU, broadcast back to the map's size."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.AdaptiveAvgPool2d(1), ConvBNReLU(cin, cout, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return resize_to(super().forward(x), x.shape[-2:])


class ASPP(nn.Module):
    def __init__(self, cin: int, rates: tuple[int, ...], cout: int = 256, dropout: float = 0.1):
        super().__init__()
        self.branches = nn.ModuleList(
            [
                ConvBNReLU(cin, cout, 1),
                *(ConvBNReLU(cin, cout, 3, dilation=r) for r in rates),
                ImagePooling(cin, cout),
            ]
        )
        self.project = nn.Sequential(ConvBNReLU(len(self.branches) * cout, cout, 1), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.branches], dim=1))


class DeepLabV3(nn.Module):
    def __init__(self, backbone: Backbone, num_classes: int, aux: bool = False, dropout: float = 0.1):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(
            ASPP(backbone.channels[4], atrous_rates(backbone.output_stride), 256, dropout),
            ConvBNReLU(256, 256, 3),
            nn.Conv2d(256, num_classes, 1),
        )
        self.aux_head = FCNHead(backbone.channels[3], num_classes, dropout) if aux else None

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        size = x.shape[-2:]
        c = self.backbone(x)
        out = resize_to(self.head(c[4]), size)
        return with_aux(out, self.aux_head, c[3], size, self.training)


class DeepLabV3Plus(nn.Module):
    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        aux: bool = False,
        dropout: float = 0.1,
        low_level_channels: int = 48,
    ):
        super().__init__()
        self.backbone = backbone
        self.aspp = ASPP(backbone.channels[4], atrous_rates(backbone.output_stride), 256, dropout)
        self.low_level = ConvBNReLU(backbone.channels[1], low_level_channels, 1)
        self.decoder = nn.Sequential(
            ConvBNReLU(256 + low_level_channels, 256, 3),
            ConvBNReLU(256, 256, 3),
            nn.Conv2d(256, num_classes, 1),
        )
        self.aux_head = FCNHead(backbone.channels[3], num_classes, dropout) if aux else None

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        size = x.shape[-2:]
        c = self.backbone(x)
        low = self.low_level(c[1])
        y = torch.cat([resize_to(self.aspp(c[4]), low.shape[-2:]), low], dim=1)
        out = resize_to(self.decoder(y), size)
        return with_aux(out, self.aux_head, c[3], size, self.training)
