"""Data: the layouts segtrain reads and what a mask's values mean.  The data sets and loaders are built by
:mod:`segtrain.data.build` (``build_datasets``, ``build_loader``).  Imports no torch: the config is checked against
these facts before anything heavy loads."""

from __future__ import annotations

# data.name -> the function (segtrain.data.MODULE:FUNCTION) that builds its (train, val) sets
LAYOUTS = {
    "synthetic": "synthetic:build",
    "voc": "voc:build",
    "voc_aug": "voc:build_aug",
    "cityscapes": "cityscapes:build",
    "ade20k": "ade20k:build",
    "folder": "folder:build",
}


def mask_classes(num_classes: int) -> int:
    """The classes a mask holds and the metrics count: ``data.num_classes``, or 2 (background, foreground) when
    ``data.num_classes=1`` trains one sigmoid logit."""
    return max(int(num_classes), 2)
