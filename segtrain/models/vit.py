"""Plain vision transformers (ViT, DeiT, DINOv2 ... from timm) as a feature pyramid: ViTDet's simple
feature pyramid (Li et al., 2022, "Exploring Plain Vision Transformer Backbones for Object Detection").

    image -> zero-pad to a multiple of 2p -> ViT (patch p: 16, DINOv2's 14), positional embeddings
             interpolated to the input's grid -> the last block's tokens, final LayerNorm -> map M (C channels)
    C2, stride 4:   2x2 transposed conv, stride 2 (C/2) -> LayerNorm -> GELU -> 2x2 transposed conv (C/4)
    C3, stride 8:   2x2 transposed conv, stride 2 (C/2)
    C4, stride 16:  M
    C5, stride 32:  2x2 max pool                             (model.output_stride=16: M)

The same interface as every segtrain backbone (``forward`` -> ``[None, C2, C3, C4, C5]``, ``channels`` with
``channels[0] == 0``, ``strides``), so UPerNet, DeepLabv3/v3+, PSPNet, FCN and U-Net take it; every map is
cropped to ``ceil(size / stride)``.  With a patch of 14 the maps are at 14/4, 7, 14, 28 pixels: each is
resized to the nominal stride's size first (bilinear), so the networks see the same sizes as with 16.
A ViT cannot trade strides for dilation: ``model.output_stride`` 16 or 32 (16 keeps M as C5).

Only the pyramid's transposed convs and LayerNorm are new layers: ``model.freeze_backbone=true`` freezes
the (pretrained) ViT and lets them train with the head, as DINOv2's frozen-feature recipes train what is
new on top of frozen features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segtrain.models.blocks import pad_to_multiple, resize_to


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of each pixel of an NCHW map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def is_plain_vit(model: nn.Module) -> bool:
    """A timm model whose feature maps all have one stride (a ViT, DeiT, DINOv2 ...) and that returns them."""
    info = getattr(model, "feature_info", None)
    reductions = {f["reduction"] for f in info} if isinstance(info, list) and info else set()
    return len(reductions) == 1 and hasattr(model, "forward_intermediates") and hasattr(model, "patch_embed")


class ViTPyramid(nn.Module):
    def __init__(self, name: str, vit: nn.Module, output_stride: int = 32):
        super().__init__()
        c = vit.embed_dim
        self.name = name
        self.model = vit
        self.patch = int(vit.patch_embed.patch_size[0])
        self.output_stride = output_stride
        self.channels = [0, c // 4, c // 2, c, c]
        self.strides = [2, 4, 8, 16, output_stride]
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(c, c // 2, 2, 2),
            LayerNorm2d(c // 2),
            nn.GELU(),
            nn.ConvTranspose2d(c // 2, c // 4, 2, 2),
        )
        self.up2 = nn.ConvTranspose2d(c, c // 2, 2, 2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor | None]:
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, 2 * self.patch)
        m = self.model.forward_intermediates(x, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True)[-1]
        top = F.max_pool2d(m, 2) if self.output_stride == 32 else m
        features: list[torch.Tensor | None] = [None]
        for f, s in zip((self.up4(m), self.up2(m), m, top), self.strides[1:]):
            if self.patch != 16:  # the map of stride s * p / 16 resized to stride s
                f = resize_to(f, ((x.shape[-2] + s - 1) // s, (x.shape[-1] + s - 1) // s))
            features.append(f[..., : (h + s - 1) // s, : (w + s - 1) // s])
        return features
