"""Small building blocks shared by the networks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SafeBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that survives a batch with one value per channel.

    Globally pooled features (PSPNet's 1x1 bin, DeepLab's image-level branch, a
    DeconvNet fc6 on a tiny input) have ``N * H * W == 1`` when training with
    batch size 1.  Batch statistics of a single value are meaningless (the
    output would be ``bias`` whatever the input) and ``nn.BatchNorm2d`` raises.
    This layer then normalises with its running statistics, as in eval mode,
    and leaves them untouched.  For every other batch it *is* BatchNorm2d, so
    the networks keep the papers' (and torchvision's) layers, parameter counts
    and state-dict keys.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] * x.shape[2] * x.shape[3] == 1:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


def norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "bn":
        return SafeBatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}")


class ConvBNReLU(nn.Sequential):
    """k x k conv (padding keeps the size) -> norm -> ReLU."""

    def __init__(self, cin: int, cout: int, k: int = 3, dilation: int = 1, norm: str = "bn"):
        super().__init__(
            nn.Conv2d(cin, cout, k, padding=dilation * (k - 1) // 2, dilation=dilation, bias=norm == "none"),
            norm_layer(norm, cout),
            nn.ReLU(inplace=True),
        )


class FCNHead(nn.Sequential):
    """3x3 conv to C/4 (or ``channels``) -> BN -> ReLU -> dropout -> 1x1 classifier.

    torchvision's FCN head; every network here also uses it as its auxiliary
    head on the backbone's stage-3 features (C4), as PSPNet introduced
    (UPerNet with mmsegmentation's fixed width, ``channels=256``).
    """

    def __init__(self, cin: int, num_classes: int, dropout: float = 0.1, channels: int | None = None):
        mid = channels or cin // 4
        super().__init__(ConvBNReLU(cin, mid, 3), nn.Dropout(dropout), nn.Conv2d(mid, num_classes, 1))


def bilinear_kernel(factor: int) -> torch.Tensor:
    """The ``2f x 2f`` kernel with which a stride-``f`` transposed conv does bilinear upsampling (FCN)."""
    size = 2 * factor
    center = factor - 0.5
    og = torch.arange(size, dtype=torch.float32)
    filt = 1 - (og - center).abs() / factor
    return filt[:, None] * filt[None, :]


class BilinearConvTranspose2d(nn.ConvTranspose2d):
    """Learnable ``f``-times upsampling of class scores, initialised to bilinear interpolation (FCN).

    Kernel ``2f``, stride ``f``, padding ``f/2``: an ``n``-pixel map becomes exactly ``n * f`` pixels, each input
    pixel centred on its ``f x f`` output cell.  The map is edge-padded by one pixel first (and the extra ``f``
    output pixels cropped), so that near the border the kernel sees border values, not zeros: at
    initialisation it is then ``F.interpolate(mode="bilinear", align_corners=False)`` everywhere, as
    torchvision's FCN, and as the paper's 100-pixel padding made it inside the image."""

    def __init__(self, channels: int, factor: int):
        super().__init__(channels, channels, 2 * factor, stride=factor, padding=factor // 2, bias=False)
        with torch.no_grad():
            self.weight.zero_()
            self.weight[range(channels), range(channels)] = bilinear_kernel(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.stride[0]
        return super().forward(F.pad(x, [1, 1, 1, 1], mode="replicate"))[..., f:-f, f:-f]


class FixedBilinearUpsample(nn.Module):
    """The FCN paper's last upsampling layer, a bilinear transposed conv whose kernel is frozen: bilinear
    interpolation (``align_corners=False``), computed as such."""

    def __init__(self, channels: int, factor: int):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.factor, mode="bilinear", align_corners=False)


# UpConv2x2's other form, the same function (tests/test_blocks.py), whose speed scripts/benchmark.py compares
UPCONV_AS_SHUFFLE = False  # a 1x1 conv to 4x the channels + pixel shuffle instead of a transposed conv


class UpConv2x2(nn.ConvTranspose2d):
    """2x2 transposed conv with stride 2 (U-Net's up-conv): each input pixel becomes a 2x2 block.

    With no overlap between blocks it equals a 1x1 conv to ``4 x out_channels`` followed by a pixel shuffle,
    the form ``UPCONV_AS_SHUFFLE`` computes (same weights, same state-dict keys)."""

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not UPCONV_AS_SHUFFLE:
            return super().forward(x)
        cin, cout = self.weight.shape[:2]
        weight = self.weight.permute(1, 2, 3, 0).reshape(cout * 4, cin, 1, 1)
        return F.pixel_shuffle(F.conv2d(x, weight, self.bias.repeat_interleave(4)), 2)


def tracing() -> bool:
    """True while ``torch.export`` / the ONNX exporter or ``torch.jit.trace`` records the network: code that
    skips work when two sizes happen to match must then take the general path, or the recorded graph would
    hold the example input's sizes."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting()


def with_aux(out: torch.Tensor, aux_head: nn.Module | None, feature: torch.Tensor, size, training: bool):
    """The network output: in training with an aux head ``{"out", "aux"}`` (aux resized to ``size``), else ``out``."""
    if aux_head is None or not training:
        return out
    return {"out": out, "aux": resize_to(aux_head(feature), size)}


def crop_to(out: torch.Tensor | dict[str, torch.Tensor], size: tuple[int, int]):
    """The top-left ``size`` of a network output (a tensor or ``{"out", "aux"}``): undoes bottom/right padding."""
    h, w = size
    if isinstance(out, dict):
        return {k: v[..., :h, :w] for k, v in out.items()}
    return out[..., :h, :w]


def resize_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of logits/features to ``size`` (no-op when equal)."""
    if not tracing() and tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def fit_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Zero-pad or crop ``x`` at the bottom/right to ``size``.

    Strided convs and floor-mode pooling keep feature maps aligned at the
    top-left corner, so an up-sampled map that is a row or column off its skip
    connection is fixed up at the bottom/right.
    """
    dh, dw = size[0] - x.shape[-2], size[1] - x.shape[-1]
    if tracing() or dh or dw:
        x = F.pad(x, [0, dw, 0, dh])
    return x


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad ``x`` at the bottom/right so that its height and width are multiples of ``multiple``."""
    h, w = x.shape[-2:]
    # (h + m - 1) // m, not -(-h // m): exported graphs divide integers by truncation, not floor
    return fit_to(x, ((h + multiple - 1) // multiple * multiple, (w + multiple - 1) // multiple * multiple))
