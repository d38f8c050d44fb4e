"""FCN (Long, Shelhamer & Darrell, 2015): fully convolutional networks.

    image -> backbone -> C3 (pool3, /8) -> C4 (pool4, /16) -> C5 (pool5, /32)
                          |                 |                  |
                          |                 |                  "fc" head: the classifier as convolutions
                          |                 |                  score_fr (1x1 conv -> K)
                          |                 |                  |
                          |                 score_pool4 ----> (+) <- up x2      FCN-16s
                          score_pool3 --------------------->  (+) <- up x2      FCN-8s
                                                               |
                                                               up x8 (x16, x32) -> logits

``model.variant``: ``32s`` (no skips), ``16s`` (fuse pool4), ``8s`` (fuse pool4
and pool3).  The x2 upsamplings are transposed convs initialised to bilinear
interpolation and learned; the last one is fixed bilinear, as in the paper.
The skip score layers start at zero, so training starts from FCN-32s' output.

The "fc" head:
* VGG16 (the paper): fc6 as a 7x7 conv with 4096 outputs (padded, so any input
  size works), ReLU, dropout; fc7 as a 1x1 conv with 4096 outputs, ReLU,
  dropout; pretrained weights convert torchvision's fc6/fc7 into these convs.
* ResNet / MobileNetV3: torchvision's FCN head (3x3 conv to C/4, BN, ReLU,
  dropout, 1x1 conv) on the last stage; the skips come from the stride-16 and
  stride-8 stages.

Sizes: the input is zero-padded at the bottom/right to a multiple of the
backbone's output stride, so every fused map matches exactly, and the output
is cropped back (the paper's padding and crop layers, simplified).  With a
dilated backbone (``model.output_stride`` 8 or 16) a fusion between maps of
the same stride needs no upsampling.
"""

from __future__ import annotations

import torch
from torch import nn

from segtrain.models.backbones import Backbone
from segtrain.models.blocks import (
    BilinearConvTranspose2d,
    FCNHead,
    FixedBilinearUpsample,
    crop_to,
    pad_to_multiple,
    with_aux,
)

VARIANTS = {"32s": 0, "16s": 1, "8s": 2}  # number of skip connections


class VGGFullyConv(nn.Sequential):
    """VGG16's classifier as convolutions: fc6 (7x7, 4096), fc7 (1x1, 4096), score_fr (1x1, K)."""

    def __init__(self, cin: int, num_classes: int, dropout: float = 0.5, width: int = 4096):
        super().__init__()
        self.fc6 = nn.Conv2d(cin, width, 7, padding=3)
        self.relu6 = nn.ReLU(inplace=True)
        self.drop6 = nn.Dropout(dropout)
        self.fc7 = nn.Conv2d(width, width, 1)
        self.relu7 = nn.ReLU(inplace=True)
        self.drop7 = nn.Dropout(dropout)
        self.score_fr = nn.Conv2d(width, num_classes, 1)
        for conv in (self.fc6, self.fc7):
            nn.init.normal_(conv.weight, 0, 0.01)  # torchvision's init of VGG's linear layers
            nn.init.zeros_(conv.bias)
        _zero(self.score_fr)

    def load_fc(self, state: dict[str, torch.Tensor]) -> None:
        """Convolutionalise torchvision's ``classifier.0`` (fc6) and ``classifier.3`` (fc7)."""
        with torch.no_grad():
            for conv, key in ((self.fc6, "classifier.0"), (self.fc7, "classifier.3")):
                conv.weight.copy_(state[f"{key}.weight"].view_as(conv.weight))
                conv.bias.copy_(state[f"{key}.bias"])


def _zero(conv: nn.Conv2d) -> nn.Conv2d:
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def _upsample(num_classes: int, factor: int, learned: bool) -> nn.Module:
    if factor == 1:
        return nn.Identity()
    return BilinearConvTranspose2d(num_classes, factor) if learned else FixedBilinearUpsample(num_classes, factor)


class FCN(nn.Module):
    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        variant: str = "8s",
        dropout: float = 0.1,
        aux: bool = False,
        vgg_fc: dict[str, torch.Tensor] | None = None,
    ):
        """``vgg_fc``: torchvision's pretrained VGG16 state dict, whose fc6/fc7 initialise the VGG head."""
        super().__init__()
        self.backbone = backbone
        self.skips = VARIANTS[variant]
        c3, c4, c5 = backbone.channels[2:]
        s3, s4, s5 = backbone.strides[2:]
        if backbone.name.startswith("vgg"):
            self.head = VGGFullyConv(c5, num_classes, dropout)
            if vgg_fc is not None and "classifier.0.weight" in vgg_fc:  # a file of the encoder alone: fc6/fc7 fresh
                self.head.load_fc(vgg_fc)
        else:
            self.head = FCNHead(c5, num_classes, dropout)
        stride = s5
        if self.skips >= 1:
            self.up_pool4 = _upsample(num_classes, s5 // s4, learned=True)
            self.score_pool4 = _zero(nn.Conv2d(c4, num_classes, 1))
            stride = s4
        if self.skips >= 2:
            self.up_pool3 = _upsample(num_classes, s4 // s3, learned=True)
            self.score_pool3 = _zero(nn.Conv2d(c3, num_classes, 1))
            stride = s3
        self.upsample = _upsample(num_classes, stride, learned=False)
        self.aux_head = FCNHead(c4, num_classes, dropout) if aux else None

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        h, w = x.shape[-2:]
        padded = pad_to_multiple(x, self.backbone.output_stride)
        c = self.backbone(padded)
        score = self.head(c[4])
        if self.skips >= 1:
            score = self.up_pool4(score) + self.score_pool4(c[3])
        if self.skips >= 2:
            score = self.up_pool3(score) + self.score_pool3(c[2])
        out = with_aux(self.upsample(score), self.aux_head, c[3], padded.shape[-2:], self.training)
        return crop_to(out, (h, w))
