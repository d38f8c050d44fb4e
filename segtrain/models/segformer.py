"""SegFormer (Xie et al., 2021): a hierarchical Transformer encoder and an all-MLP decoder.

    image (H x W)
      |  Mix Transformer encoder (MiT), four stages; stage i:
      |    overlapping patch embedding: conv k x k, stride s (7/4 in stage 1, 3/2 after), LayerNorm
      |    N_i x  [ x = x + EfficientSelfAttention(LayerNorm(x));  x = x + MixFFN(LayerNorm(x)) ]
      |    LayerNorm                                     -> F_i: C_i channels at H/4, H/8, H/16, H/32
      v
    all-MLP decoder:
      F_i -> Linear(C_i -> C) -> bilinear up to H/4                       (i = 1 .. 4)
      concat [F_4, F_3, F_2, F_1] (4C) -> 1x1 conv (C), BN, ReLU -> dropout -> 1x1 conv -> up x4 -> logits

Efficient self-attention: queries come from every token; keys and values from the map reduced R times
per side by an R x R convolution of stride R (R = 8, 4, 2, 1 in the four stages) and a LayerNorm, which
cuts the cost of attention by R^2.  Mix-FFN: Linear(C -> 4C), 3x3 depthwise conv, GELU, Linear(4C -> C);
the depthwise conv's zero padding leaks where a token is, so there is no positional encoding and any
input size works.  Stochastic depth: each block's two residual branches are dropped per sample with a
probability rising linearly from 0 to 0.1 over the blocks (the paper's code).

``model.variant`` (channels C_1..C_4; blocks N_1..N_4; decoder width C; parameters at 150 classes, equal to
transformers' ``SegformerForSemanticSegmentation``):

    b0   32,  64, 160, 256    2, 2,  2, 2    256     3,752,694
    b1   64, 128, 320, 512    2, 2,  2, 2    256    13,715,798
    b2   64, 128, 320, 512    3, 4,  6, 3    768    27,461,974
    b3   64, 128, 320, 512    3, 4, 18, 3    768    47,337,814
    b4   64, 128, 320, 512    3, 8, 27, 3    768    64,108,374
    b5   64, 128, 320, 512    3, 6, 40, 3    768    84,708,694

Every stage has 1, 2, 5, 8 attention heads and an MLP ratio of 4.  Sizes: each patch embedding pads
by k // 2, so stage i has ceil(H / stride) rows (97 x 131 -> 25 x 33 at H/4) and the logits are resized to
the input; the R x R reduction needs stage 1 to have 8 rows, so inputs need 29 px (``config.min_input_size``
says 32).

Weights (:meth:`SegFormer.load_pretrained`, ``model.pretrained=PATH``): a Hugging Face checkpoint
(``nvidia/mit-b0``: the ImageNet encoder; ``nvidia/segformer-b0-finetuned-ade-512-512``: the whole network),
in transformers' names before and after version 5, or the paper's own files (``mit_b0.pth``).  The encoder
must be complete; decoder tensors load where name and shape match (a classifier for other classes does
not).  ``model.pretrained=true`` fetches ``nvidia/mit-<variant>`` from the Hugging Face hub into the torch hub
cache, or says where to put it.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from segtrain.models.backbones import adapt_conv_weight
from segtrain.models.blocks import ConvBNReLU, resize_to
from segtrain.models.weights import match

log = logging.getLogger("segtrain")

# name: (channels C_1..C_4, blocks N_1..N_4, decoder width)
VARIANTS: dict[str, tuple[tuple[int, ...], tuple[int, ...], int]] = {
    "b0": ((32, 64, 160, 256), (2, 2, 2, 2), 256),
    "b1": ((64, 128, 320, 512), (2, 2, 2, 2), 256),
    "b2": ((64, 128, 320, 512), (3, 4, 6, 3), 768),
    "b3": ((64, 128, 320, 512), (3, 4, 18, 3), 768),
    "b4": ((64, 128, 320, 512), (3, 8, 27, 3), 768),
    "b5": ((64, 128, 320, 512), (3, 6, 40, 3), 768),
}
HEADS = (1, 2, 5, 8)
REDUCTION = (8, 4, 2, 1)  # R: keys and values from a map R x R times smaller
PATCH = ((7, 4), (3, 2), (3, 2), (3, 2))  # (kernel, stride) of each stage's patch embedding
MLP_RATIO = 4
DROP_PATH = 0.1
WEIGHTS_URL = "https://huggingface.co/nvidia/mit-{variant}/resolve/main/pytorch_model.bin"  # the ImageNet encoders


def tokens_to_map(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[N, h*w, C] tokens -> [N, C, h, w]."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a residual branch for a random ``p`` of the samples (rescaling the rest)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class OverlapPatchEmbed(nn.Module):
    """Conv k x k with stride s < k (patches overlap, padding k // 2), then LayerNorm over the channels."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, kernel, stride, kernel // 2)
        self.norm = nn.LayerNorm(cout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class EfficientSelfAttention(nn.Module):
    """Multi-head attention whose keys and values come from the map reduced R x R times (R x R conv, stride R)."""

    def __init__(self, channels: int, heads: int, reduction: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(channels, channels)
        self.k = nn.Linear(channels, channels)
        self.v = nn.Linear(channels, channels)
        self.proj = nn.Linear(channels, channels)
        self.sr = nn.Conv2d(channels, channels, reduction, reduction) if reduction > 1 else None
        self.sr_norm = nn.LayerNorm(channels) if reduction > 1 else None

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # [N, L, C] -> [N, heads, L, C / heads]
        return x.reshape(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        context = x
        if self.sr is not None:
            context = self.sr_norm(self.sr(tokens_to_map(x, h, w)).flatten(2).transpose(1, 2))
        y = F.scaled_dot_product_attention(
            self._split(self.q(x)), self._split(self.k(context)), self._split(self.v(context))
        )
        return self.proj(y.transpose(1, 2).flatten(2))


class MixFFN(nn.Module):
    """Linear(C -> 4C) -> 3x3 depthwise conv -> GELU -> Linear(4C -> C)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = self.dwconv(tokens_to_map(self.fc1(x), h, w)).flatten(2).transpose(1, 2)
        return self.fc2(F.gelu(x))


class MiTBlock(nn.Module):
    def __init__(self, channels: int, heads: int, reduction: int, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(channels, eps=1e-6)
        self.attn = EfficientSelfAttention(channels, heads, reduction)
        self.norm2 = nn.LayerNorm(channels, eps=1e-6)
        self.ffn = MixFFN(channels, MLP_RATIO * channels)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.ffn(self.norm2(x), h, w))


class MiTStage(nn.Module):
    def __init__(self, cin: int, cout: int, depth: int, index: int, drop_paths: list[float]):
        super().__init__()
        self.patch_embed = OverlapPatchEmbed(cin, cout, *PATCH[index])
        self.blocks = nn.ModuleList(MiTBlock(cout, HEADS[index], REDUCTION[index], p) for p in drop_paths)
        self.norm = nn.LayerNorm(cout, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, h, w = self.patch_embed(x)
        for block in self.blocks:
            x = block(x, h, w)
        return tokens_to_map(self.norm(x), h, w)


class MixTransformer(nn.Module):
    """The MiT encoder with segtrain's backbone interface: ``forward`` gives ``[None, F_1, F_2, F_3, F_4]`` (no
    stride-2 map, as the 4-level timm encoders), ``channels`` ``[0, C_1, .., C_4]``, strides 4-32."""

    def __init__(self, variant: str, in_channels: int = 3, drop_path: float = DROP_PATH):
        super().__init__()
        widths, depths, _ = VARIANTS[variant]
        n = sum(depths)
        rates = [drop_path * i / max(n - 1, 1) for i in range(n)]  # 0 .. drop_path over the blocks
        self.stages = nn.ModuleList()
        for i, (cin, cout, depth) in enumerate(zip((in_channels, *widths[:-1]), widths, depths)):
            first = sum(depths[:i])
            self.stages.append(MiTStage(cin, cout, depth, i, rates[first : first + depth]))
        self.name = f"mit_{variant}"
        self.channels = [0, *widths]
        self.strides = [2, 4, 8, 16, 32]
        self.output_stride = 32
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor | None]:
        features: list[torch.Tensor | None] = [None]
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


def _init_weights(m: nn.Module) -> None:
    """The paper's initialisation: truncated normal (std 0.02) linear layers, He-normal convolutions (fan out)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
        nn.init.zeros_(m.bias)


class AllMLPDecoder(nn.Module):
    def __init__(self, channels: list[int], width: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.linear_c = nn.ModuleList(nn.Linear(c, width) for c in channels)
        self.fuse = ConvBNReLU(len(channels) * width, width, 1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[-2:]
        unified = [
            resize_to(mlp(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), size) for mlp, f in zip(self.linear_c, features)
        ]
        return self.classifier(self.dropout(self.fuse(torch.cat(unified[::-1], dim=1))))


class SegFormer(nn.Module):
    def __init__(
        self,
        num_classes: int,
        variant: str = "b0",
        in_channels: int = 3,
        dropout: float = 0.1,
        decoder_width: int | None = None,
    ):
        """``decoder_width``: C of the decoder (``model.head_channels``), default the variant's (256 or 768)."""
        super().__init__()
        self.variant = variant
        self.backbone = MixTransformer(variant, in_channels)
        width = decoder_width or VARIANTS[variant][2]
        self.head = AllMLPDecoder(self.backbone.channels[1:], width, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return resize_to(self.head(self.backbone(x)[1:]), x.shape[-2:])

    def load_pretrained(self, state: dict[str, torch.Tensor], source: str) -> None:
        """A Hugging Face or paper checkpoint (see the module docstring): the whole encoder, and the decoder's
        tensors whose names and shapes match."""

        encoder, decoder = convert_state_dict(state)
        ours = self.backbone.state_dict()
        first = "stages.0.patch_embed.proj.weight"
        if first in encoder and encoder[first].shape[1] != ours[first].shape[1]:  # data.in_channels
            encoder[first] = adapt_conv_weight(encoder[first], ours[first].shape[1])
        shapes = {k: v.shape for k, v in ours.items()}
        self.backbone.load_state_dict(
            match(encoder, shapes, f"the MiT-{self.variant} encoder", source, file_tensors=len(state))
        )
        head = self.head.state_dict()
        usable = {k: v for k, v in decoder.items() if k in head and v.shape == head[k].shape}
        self.head.load_state_dict(usable, strict=False)
        log.info(
            "model.pretrained=%s: the MiT-%s encoder (%d tensors) and %d of the decoder's %d tensors loaded",
            source,
            self.variant,
            len(ours),
            len(usable),
            len(head),
        )


# ---------------------------------------------------------------------------
# Other implementations' names for the same tensors


def _rule(pattern: str, repl: str | Callable[[re.Match], str]) -> tuple[re.Pattern, str | Callable[[re.Match], str]]:
    return re.compile(pattern), repl


def _minus_one(template: str) -> Callable[[re.Match], str]:
    """A replacement that writes the first group (1-based in the paper's code) 0-based into ``template``."""
    return lambda m: template.format(int(m.group(1)) - 1, *m.groups()[1:])


ENCODER_RULES = [  # applied in order to every name; the encoder's names then start at "stages."
    # transformers < 5 (the Hugging Face hub's files)
    _rule(r"encoder\.patch_embeddings\.(\d+)\.layer_norm\.", r"stages.\1.patch_embed.norm."),
    _rule(r"encoder\.patch_embeddings\.(\d+)\.proj\.", r"stages.\1.patch_embed.proj."),
    _rule(r"encoder\.block\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2."),
    _rule(r"encoder\.layer_norm\.(\d+)\.", r"stages.\1.norm."),
    _rule(r"\.layer_norm_1\.", ".norm1."),
    _rule(r"\.layer_norm_2\.", ".norm2."),
    _rule(r"\.attention\.self\.query\.", ".attn.q."),
    _rule(r"\.attention\.self\.key\.", ".attn.k."),
    _rule(r"\.attention\.self\.value\.", ".attn.v."),
    _rule(r"\.attention\.self\.sr\.", ".attn.sr."),
    _rule(r"\.attention\.self\.layer_norm\.", ".attn.sr_norm."),
    _rule(r"\.attention\.output\.dense\.", ".attn.proj."),
    _rule(r"\.mlp\.dense1\.", ".ffn.fc1."),
    _rule(r"\.mlp\.dense2\.", ".ffn.fc2."),
    # transformers >= 5
    _rule(r"\.patch_embeddings\.layer_norm\.", ".patch_embed.norm."),
    _rule(r"\.patch_embeddings\.proj\.", ".patch_embed.proj."),
    _rule(r"(stages\.\d+)\.layer_norm\.", r"\1.norm."),
    _rule(r"\.layernorm_before\.", ".norm1."),
    _rule(r"\.layernorm_after\.", ".norm2."),
    _rule(r"\.attention\.([qkv])_proj\.", r".attn.\1."),
    _rule(r"\.attention\.o_proj\.", ".attn.proj."),
    _rule(r"\.attention\.sequence_reduction\.sequence_reduction\.", ".attn.sr."),
    _rule(r"\.attention\.sequence_reduction\.layer_norm\.", ".attn.sr_norm."),
    # the paper's code (NVlabs/SegFormer: patch_embed1 .. 4, block1 .. 4, norm1 .. 4; attn.kv is split below)
    _rule(r"(?:^|\.)patch_embed(\d)\.", _minus_one("stages.{}.patch_embed.")),
    _rule(r"(?:^|\.)block(\d)\.(\d+)\.", _minus_one("stages.{}.blocks.{}.")),
    _rule(r"^(?!.*blocks?[.\d])(?:.*\.)?norm(\d)\.(weight|bias)$", _minus_one("stages.{}.norm.{}")),
    _rule(r"\.attn\.norm\.", ".attn.sr_norm."),
    # both
    _rule(r"\.mlp\.dwconv\.dwconv\.", ".ffn.dwconv."),
    _rule(r"\.mlp\.fc([12])\.", r".ffn.fc\1."),
]
DECODER_RULES = [  # the decoder's names then start at "decode_head." (cut off)
    _rule(r"decode_head\.linear_c\.(\d+)\.proj\.", r"decode_head.linear_c.\1."),  # transformers < 5
    _rule(r"decode_head\.linear_projections\.(\d+)\.proj\.", r"decode_head.linear_c.\1."),  # >= 5
    _rule(r"decode_head\.linear_c(\d)\.proj\.", _minus_one("decode_head.linear_c.{}.")),  # the paper's code
    _rule(r"decode_head\.(batch_norm|linear_fuse\.bn)\.", "decode_head.fuse.1."),
    _rule(r"decode_head\.linear_fuse\.(conv\.)?", "decode_head.fuse.0."),
    _rule(r"decode_head\.linear_pred\.", "decode_head.classifier."),
]


def _renamed(name: str, rules) -> str:
    for pattern, repl in rules:
        name = pattern.sub(repl, name)
    return name


def convert_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(encoder, decoder) tensors of a SegFormer checkpoint in another implementation's names, renamed to
    :class:`MixTransformer`'s and :class:`AllMLPDecoder`'s (the paper's joint key/value layer split)."""
    encoder, decoder = {}, {}
    for name, tensor in state.items():
        if "decode_head." in name:
            new = _renamed(name, DECODER_RULES)
            decoder[new[new.index("decode_head.") + len("decode_head.") :]] = tensor
            continue
        new = _renamed(name, ENCODER_RULES)
        if "stages." not in new:
            continue  # a classifier, or not SegFormer's
        new = new[new.index("stages.") :]
        if new.endswith((".attn.kv.weight", ".attn.kv.bias")):  # the paper's code: keys and values in one layer
            k, v = tensor.chunk(2, dim=0)
            encoder[new.replace(".attn.kv.", ".attn.k.")], encoder[new.replace(".attn.kv.", ".attn.v.")] = k, v
        else:
            encoder[new] = tensor
    return encoder, decoder
