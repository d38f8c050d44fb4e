"""DeconvNet (Noh, Hong & Han, 2015) and SegNet (Badrinarayanan, Kendall & Cipolla, 2017).

    convolution network (VGG16, 13 convs)              deconvolution network (mirrored)
    x -> [conv x2] -> pool1 ---- switches ---------> unpool1 -> [deconv x2] -> 1x1 -> logits
           [conv x2] -> pool2 ---- switches ---> unpool2 -> [deconv x2]
             [conv x3] -> pool3 ---------- unpool3 -> [deconv x3]
               [conv x3] -> pool4 --- unpool4 -> [deconv x3]
                 [conv x3] -> pool5 - unpool5 -> [deconv x3]
                          fc6 (7x7) -> fc7 (1x1) -> deconv-fc6 (7x7)

Max pooling remembers where each maximum was (the "switches"); unpooling puts
every value back at that place, and the transposed convolutions ("deconv")
densify the sparse map.  BatchNorm follows every conv and deconv, as in the
paper.

``model.variant``:
* ``deconvnet`` (default): the paper's network, fc6/fc7 included.  fc6 is a
  padded 7x7 conv (the paper's unpadded one needs a 224x224 input) and
  deconv-fc6 its padded transpose, so any input size works.
* ``segnet``: SegNet's lighter decoder: no fc layers, and each unpooling is
  followed by regular 3x3 convs (BN, ReLU); the last is a 3x3 conv to the classes.

``model.base_channels`` is the width of the first stage: 64 gives the papers'
widths (64-128-256-512-512, fc 4096; 252M parameters for DeconvNet, 29M for
SegNet); the default 16 fits a CPU.  Any input size works: pooling drops an
odd row, and unpooling is told the size to restore.  ``model.pretrained=true``
(with ``base_channels=64``) initialises the encoder with torchvision's ImageNet
VGG16-BN weights (VGG16 with ``model.norm=none``).
"""

from __future__ import annotations

import torch
from torch import nn

from segtrain.errors import ConfigError
from segtrain.models.backbones import adapt_conv_weight
from segtrain.models.blocks import ConvBNReLU, norm_layer

STAGES = (2, 2, 3, 3, 3)  # convs in each of VGG16's five stages
VARIANTS = ("deconvnet", "segnet")


def unpool(x: torch.Tensor, indices: torch.Tensor, size) -> torch.Tensor:
    """Max-unpooling to ``size`` (``F.max_unpool2d`` without its Python-side size check, which
    ``torch.jit.trace`` cannot record with sizes that follow the input)."""
    return torch._C._nn.max_unpool2d(x, indices, size)


class DeconvBNReLU(nn.Sequential):
    """k x k transposed conv with stride 1 (padding keeps the size) -> norm -> ReLU: one "deconvolution" layer."""

    def __init__(self, cin: int, cout: int, k: int = 3, norm: str = "bn"):
        super().__init__(
            nn.ConvTranspose2d(cin, cout, k, padding=(k - 1) // 2, bias=norm == "none"),
            norm_layer(norm, cout),
            nn.ReLU(inplace=True),
        )


class DeconvNet(nn.Module):
    def __init__(
        self,
        num_classes: int,
        base_channels: int = 64,
        variant: str = "deconvnet",
        norm: str = "bn",
        in_channels: int = 3,
    ):
        super().__init__()
        b = base_channels
        widths = [b, 2 * b, 4 * b, 8 * b, 8 * b]

        self.encoder = nn.ModuleList()
        cin = in_channels
        for n, w in zip(STAGES, widths):
            self.encoder.append(nn.Sequential(*(ConvBNReLU(cin if i == 0 else w, w, 3, norm=norm) for i in range(n))))
            cin = w
        self.pool = nn.MaxPool2d(2, 2, return_indices=True)

        if variant == "deconvnet":
            fc = 64 * b  # 4096 in the paper
            self.center = nn.Sequential(
                ConvBNReLU(widths[-1], fc, 7, norm=norm),  # fc6
                ConvBNReLU(fc, fc, 1, norm=norm),  # fc7
                DeconvBNReLU(fc, widths[-1], 7, norm=norm),  # deconv-fc6
            )
            layer = DeconvBNReLU
        else:
            self.center = nn.Identity()
            layer = ConvBNReLU

        # Decoder stage i mirrors encoder stage i: its last layer goes back to the width that stage i got
        # (stage 1 stays at b channels).  Listed deepest first, in the order they run.  SegNet's classifier, a
        # 3x3 conv, is the last layer of decoder stage 1 (conv1_1_D of its prototxt), which has one conv less.
        self.decoder = nn.ModuleList()
        for stage, (n, w, wout) in reversed(list(enumerate(zip(STAGES, widths, [b, *widths[:-1]])))):
            n = n - 1 if variant == "segnet" and stage == 0 else n
            self.decoder.append(nn.Sequential(*(layer(w, w if i < n - 1 else wout, 3, norm=norm) for i in range(n))))
        k = 1 if variant == "deconvnet" else 3
        self.classifier = nn.Conv2d(b, num_classes, k, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        switches = []
        for stage in self.encoder:
            x = stage(x)
            size = x.shape[-2:]
            x, indices = self.pool(x)
            switches.append((indices, size))
        x = self.center(x)
        for stage, (indices, size) in zip(self.decoder, reversed(switches)):
            x = stage(unpool(x, indices, size))
        return self.classifier(x)

    def load_vgg16(self, state: dict[str, torch.Tensor]) -> None:
        """Copy torchvision's VGG16 (or VGG16-BN) conv and BN weights into the encoder, in order.

        With BN, our convs have no bias (the BN after them absorbs it), so the
        bias is folded into the running mean: the same function in eval mode.
        Other input bands than RGB: the first conv's filters are adapted (``backbones.adapt_conv_weight``).
        """

        convs = [k[: -len(".weight")] for k, v in state.items() if k.startswith("features.") and v.dim() == 4]
        ours = [m for stage in self.encoder for m in stage]
        if convs:
            first = f"{convs[0]}.weight"
            state = {**state, first: adapt_conv_weight(state[first], ours[0][0].in_channels)}
        if len(convs) != len(ours) or any(state[f"{k}.weight"].shape != m[0].weight.shape for k, m in zip(convs, ours)):
            raise ConfigError("pretrained deconvnet needs model.base_channels=64 (VGG16's widths)")
        with torch.no_grad():
            for key, (conv, norm, _) in zip(convs, ours):
                conv.weight.copy_(state[f"{key}.weight"])
                bias = state[f"{key}.bias"]
                if conv.bias is not None:
                    conv.bias.copy_(bias)
                if isinstance(norm, nn.BatchNorm2d):
                    idx = int(key.split(".")[1]) + 1  # torchvision: conv, bn, relu
                    bn = {n: state[f"features.{idx}.{n}"] for n in ("weight", "bias", "running_mean", "running_var")}
                    norm.weight.copy_(bn["weight"])
                    norm.bias.copy_(bn["bias"])
                    norm.running_mean.copy_(bn["running_mean"] - bias)
                    norm.running_var.copy_(bn["running_var"])
