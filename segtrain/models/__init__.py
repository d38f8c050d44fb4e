"""The networks: their names, the ``model.*`` keys each one reads, their variants and the smallest input they take.

These are facts, checked by :mod:`segtrain.config.validate` before anything is built (this module imports no
torch); :func:`segtrain.models.build.build_model` builds a network.  The contract every network keeps:

* ``forward(x)`` takes ``[N, C, H, W]`` of any ``H, W`` (``C = data.in_channels``; pretrained first layers adapted,
  see ``backbones.adapt_first_conv``) and, in eval mode, returns logits ``[N, num_classes, H, W]``
  (``num_classes=1``: one sigmoid logit);
* in training mode a network with an auxiliary head returns ``{"out": logits, "aux": aux_logits}`` (both at the
  input size); without one it returns the logits tensor.

``backbone`` (resnet50 when unset) is one of :mod:`segtrain.models.backbones`.  ``backbone``, ``pretrained``,
``output_stride``, ``aux``, ``variant``, ``freeze_backbone`` or ``head_channels`` set for a network that does not
read it is a ConfigError, not silently ignored.
"""

from __future__ import annotations

from typing import Any

# The optional model.* keys each network reads (the others must stay unset, see UNSET).  Keys with a rule of their
# own (a network that builds its own encoder and takes no backbone, output strides a network cannot run at,
# variants) are checked where the network is built (segtrain.models.build), with a message of their own.
ENCODER = frozenset({"backbone", "pretrained", "output_stride", "aux", "freeze_backbone"})
NETWORKS: dict[str, frozenset[str]] = {
    "unet": frozenset({"backbone", "pretrained", "output_stride", "freeze_backbone"}),
    "fcn": ENCODER | {"variant"},
    "deconvnet": frozenset({"backbone", "pretrained", "output_stride", "variant"}),
    "pspnet": ENCODER | {"head_channels"},
    "deeplabv3": ENCODER,
    "deeplabv3plus": ENCODER,
    "segformer": frozenset({"backbone", "pretrained", "variant", "freeze_backbone", "head_channels"}),
    "upernet": ENCODER | {"head_channels"},
}
UNSET: dict[str, Any] = {  # the value of an optional model.* key that is not set
    "backbone": None,
    "pretrained": False,
    "output_stride": None,
    "aux": False,
    "variant": None,
    "freeze_backbone": False,
    "head_channels": None,
}


def min_input_size(model: Any) -> int:
    """The smallest image side the network (a ``model`` config) accepts: the from-scratch encoders halve it 4
    (U-Net) or 5 (DeconvNet/SegNet) times with plain pooling, as a VGG backbone does (FCN pads its input to a
    multiple of 32 first); SegFormer's first stage needs 8 rows for its 8 x 8 key/value reduction (29 px; 32 said);
    the other backbone networks run at any size (rounding up)."""
    if model.name == "unet" and model.backbone is None:
        return 16
    if model.name == "segformer":
        return 32
    if model.name == "deconvnet" or (str(model.backbone or "").startswith("vgg") and model.name != "fcn"):
        return 32
    return 1
