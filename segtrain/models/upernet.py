"""UPerNet (Xiao et al., 2018): a feature pyramid network with a pyramid pooling module on top.

    image -> backbone (output stride 32) -> C2 (1/4), C3 (1/8), C4 (1/16), C5 (1/32)

    C5 -> PPM: avg pool 1, 2, 3, 6 -> 1x1 conv (512) each -> up, concat with C5 -> 3x3 conv (512) ---> P5
    C4 -> 1x1 conv (512) -> (+) <- up(P5) ------------------------------------------------------------> L4 -> 3x3 conv -> P4
    C3 -> 1x1 conv (512) -> (+) <- up(L4) ------------------------------------------------------------> L3 -> 3x3 conv -> P3
    C2 -> 1x1 conv (512) -> (+) <- up(L3) ------------------------------------------------------------> L2 -> 3x3 conv -> P2
    fuse: concat [P2, up(P3), up(P4), up(P5)] (2048) -> 3x3 conv (512) -> dropout -> 1x1 conv -> up x4 -> logits
    C4 -> auxiliary FCN head (3x3 conv to 256, dropout, 1x1 conv) -> up -> aux logits (training only, ``model.aux``)

Every conv but the classifiers is conv (no bias) -> BN -> ReLU; upsampling is bilinear.  The top-down
path adds each coarser level (after its own additions) to the next finer lateral, as in FPN; the 3x3
convs then smooth each sum.  This is mmsegmentation's ``UPerHead`` (``channels=512``) with its auxiliary
``FCNHead`` (``channels=256``, one conv) on stage 3, the recipe of its UPerNet configs; the same head as
transformers' ``UperNetForSemanticSegmentation`` (a test loads its weights and compares the output).

Any backbone: torchvision's ResNets, MobileNetV3 and VGG, timm's encoders (ConvNeXt, Swin ...), plain ViTs
through their simple feature pyramid (``backbones.ViTPyramid``).  Parameters for 150 classes with the aux
head and torchvision's ResNet-50: 66,496,876 (mmsegmentation's ResNet-50-V1c has a three-conv stem,
19,232 parameters more: 66,516,108).
"""

from __future__ import annotations

import torch
from torch import nn

from segtrain.models.blocks import ConvBNReLU, FCNHead, resize_to, with_aux
from segtrain.models.pspnet import PyramidPooling


class UPerHead(nn.Module):
    def __init__(
        self,
        in_channels: list[int],
        num_classes: int,
        channels: int = 512,
        bins: tuple[int, ...] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ):
        """``in_channels``: the channels of C2 .. C5."""
        super().__init__()
        self.ppm = PyramidPooling(in_channels[-1], bins, channels)
        self.bottleneck = ConvBNReLU(self.ppm.out_channels, channels, 3)
        self.lateral = nn.ModuleList(ConvBNReLU(c, channels, 1) for c in in_channels[:-1])
        self.fpn = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in in_channels[:-1])
        self.fuse = ConvBNReLU(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        levels = [conv(c) for conv, c in zip(self.lateral, features)]
        levels.append(self.bottleneck(self.ppm(features[-1])))
        for i in range(len(levels) - 1, 0, -1):  # top-down
            levels[i - 1] = levels[i - 1] + resize_to(levels[i], levels[i - 1].shape[-2:])
        outs = [conv(level) for conv, level in zip(self.fpn, levels)] + [levels[-1]]
        size = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([resize_to(o, size) for o in outs], dim=1))
        return self.classifier(self.dropout(fused))


class UPerNet(nn.Module):
    def __init__(
        self, backbone: nn.Module, num_classes: int, aux: bool = True, dropout: float = 0.1, channels: int = 512
    ):
        """``channels``: the head's width (``model.head_channels``; mmsegmentation's 512)."""
        super().__init__()
        self.backbone = backbone
        self.head = UPerHead(backbone.channels[1:], num_classes, channels, dropout=dropout)
        self.aux_head = FCNHead(backbone.channels[3], num_classes, dropout, channels=256) if aux else None

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        size = x.shape[-2:]
        c = self.backbone(x)
        out = resize_to(self.head(c[1:]), size)
        return with_aux(out, self.aux_head, c[3], size, self.training)
