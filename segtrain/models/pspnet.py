"""PSPNet (Zhao et al., 2017): pyramid scene parsing network.

    image -> dilated backbone (output stride 8) -> C5 ---------------------------+
                                  |                 | avg pool 1x1 -> 1x1 conv -> up |
                                  |                 | avg pool 2x2 -> 1x1 conv -> up |-- concat
                                  |                 | avg pool 3x3 -> 1x1 conv -> up |
                                  |                 | avg pool 6x6 -> 1x1 conv -> up |
                                  |                                         3x3 conv (512), dropout, 1x1 -> up -> logits
                                  C4 -> auxiliary FCN head -> up -> aux logits (training only, ``model.aux=true``)

The pyramid pooling module pools C5 (C channels) into 1x1, 2x2, 3x3 and 6x6
bins; each level is reduced to C/4 channels by a 1x1 conv (BN, ReLU) and
upsampled bilinearly to C5's size; the levels are concatenated with C5 (2C
channels in all).

Batch size 1: the 1x1 bin then holds one value per channel, which BatchNorm
cannot normalise.  Its BN (like every BN in this package) is
:class:`~segtrain.models.blocks.SafeBatchNorm2d`, which uses its running
statistics for such a batch and is plain BatchNorm otherwise, so the module
is the paper's for any batch of two or more.
"""

from __future__ import annotations

import torch
from torch import nn

from segtrain.models.backbones import Backbone
from segtrain.models.blocks import ConvBNReLU, FCNHead, resize_to, with_aux


class PyramidPooling(nn.Module):
    def __init__(self, cin: int, bins: tuple[int, ...] = (1, 2, 3, 6), cout: int | None = None):
        """``cout`` channels per level (default C / number of bins, PSPNet's; UPerNet: 512)."""
        super().__init__()
        cout = cout or cin // len(bins)
        self.levels = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(b), ConvBNReLU(cin, cout, 1)) for b in bins)
        self.out_channels = cin + len(bins) * cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        return torch.cat([x, *(resize_to(level(x), size) for level in self.levels)], dim=1)


class PSPNet(nn.Module):
    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        aux: bool = False,
        dropout: float = 0.1,
        bins: tuple[int, ...] = (1, 2, 3, 6),
        head_channels: int = 512,
    ):
        super().__init__()
        self.backbone = backbone
        self.ppm = PyramidPooling(backbone.channels[4], bins)
        self.head = nn.Sequential(
            ConvBNReLU(self.ppm.out_channels, head_channels, 3),
            nn.Dropout(dropout),
            nn.Conv2d(head_channels, num_classes, 1),
        )
        self.aux_head = FCNHead(backbone.channels[3], num_classes, dropout) if aux else None

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        size = x.shape[-2:]
        c = self.backbone(x)
        out = resize_to(self.head(self.ppm(c[4])), size)
        return with_aux(out, self.aux_head, c[3], size, self.training)
