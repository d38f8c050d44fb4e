"""U-Net (Ronneberger et al., 2015).

    contracting path                                expanding path
    x -> [conv3x3 x2] ------------------------------ concat -> [conv3x3 x2] -> 1x1 -> logits
           | maxpool 2                                  ^ up-conv 2x2
           [conv3x3 x2] ------------------------ concat -> [conv3x3 x2]
             | maxpool 2                            ^ up-conv 2x2
             ...  4 poolings down, 4 transposed-conv ups  ...
                        [conv3x3 x2]  (bottleneck, 16 x base_channels)

Differences from the paper, all standard today: padded convolutions (so the
output has the input's size and no cropping is needed), BatchNorm after each
conv (``model.norm=none`` removes it), and a size fix-up after each up-conv so
that any input size works: an odd size loses a row when pooled, and the
up-sampled map is padded back to the size of its skip connection.

With ``model.backbone`` (e.g. ``resnet18``) an ImageNet encoder is the
contracting path (:class:`BackboneUNet`): its pyramid C1..C5 (strides 2..32)
gives the skips, and the expanding path climbs back with the same up-conv,
concat, double-conv blocks, one more without a skip to full resolution.  An
encoder with four levels (strides 4..32, such as ``timm:convnext_tiny``) has no
C1: its stride-2 stage then has no skip either (as smp does for such encoders).
``model.base_channels`` sets the decoder's widths: 16 x base at stride 16,
halving at every step down to base at full resolution (16: 256, 128, 64, 32,
16, as segmentation_models_pytorch's U-Net; 64: the paper's 1024 ... 64).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from segtrain.models.blocks import ConvBNReLU, UpConv2x2, fit_to, tracing

if TYPE_CHECKING:  # a plain U-Net does not load torchvision (seconds of start-up on a small CPU)
    from segtrain.models.backbones import Backbone


class DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int, norm: str = "bn"):
        super().__init__(ConvBNReLU(cin, cout, 3, norm=norm), ConvBNReLU(cout, cout, 3, norm=norm))


class Up(nn.Module):
    """2x2 transposed conv (halves the channels), concat with the skip, double conv."""

    def __init__(self, cin: int, cout: int, norm: str = "bn"):
        super().__init__()
        self.up = UpConv2x2(cin, cout)
        self.conv = DoubleConv(2 * cout, cout, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        dh, dw = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]
        if tracing() or dh or dw:  # odd input sizes: pad (or crop) to the skip's size
            x = F.pad(x, [dw // 2, dw - dw // 2, dh // 2, dh - dh // 2])
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    def __init__(
        self, num_classes: int, in_channels: int = 3, base_channels: int = 64, norm: str = "bn", depth: int = 4
    ):
        super().__init__()
        widths = [base_channels * 2**i for i in range(depth + 1)]  # 64, 128, 256, 512, 1024 in the paper
        self.inc = DoubleConv(in_channels, widths[0], norm)
        self.down = nn.ModuleList(DoubleConv(widths[i], widths[i + 1], norm) for i in range(depth))
        self.up = nn.ModuleList(Up(widths[i + 1], widths[i], norm) for i in reversed(range(depth)))
        self.classifier = nn.Conv2d(widths[0], num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for block in self.down:
            skips.append(block(F.max_pool2d(skips[-1], 2)))
        y = skips.pop()
        for block in self.up:
            y = block(y, skips.pop())
        return self.classifier(y)


class BackboneUp(nn.Module):
    """Up-conv 2x2 -> concat the skip (any width, or none) -> double conv."""

    def __init__(self, cin: int, cskip: int, cout: int, norm: str = "bn"):
        super().__init__()
        self.up = UpConv2x2(cin, cout)
        self.conv = DoubleConv(cout + cskip, cout, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor:
        x = fit_to(self.up(x), size)  # a row/column off when the encoder rounded an odd size up
        return self.conv(x if skip is None else torch.cat([skip, x], dim=1))


class BackboneUNet(nn.Module):
    """U-Net whose contracting path is a backbone's feature pyramid (output stride 32)."""

    def __init__(self, backbone: Backbone, num_classes: int, base_channels: int = 16, norm: str = "bn"):
        super().__init__()
        self.backbone = backbone
        widths = [base_channels * 2**i for i in reversed(range(5))]  # at strides 16, 8, 4, 2, 1
        skips = [*reversed(backbone.channels[:4]), 0]  # C4, C3, C2, C1, none
        cin = backbone.channels[4]
        self.up = nn.ModuleList()
        for cskip, cout in zip(skips, widths):
            self.up.append(BackboneUp(cin, cskip, cout, norm))
            cin = cout
        self.classifier = nn.Conv2d(widths[-1], num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.backbone(x)
        h, w = x.shape[-2:]
        y = c[4]
        sizes = [c[3].shape[-2:], c[2].shape[-2:], c[1].shape[-2:], ((h + 1) // 2, (w + 1) // 2), (h, w)]
        for block, skip, size in zip(self.up, [c[3], c[2], c[1], c[0], None], sizes):
            y = block(y, skip, size if skip is None else skip.shape[-2:])
        return self.classifier(y)
