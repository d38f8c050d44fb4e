"""Cityscapes (fine annotations): ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` and
``gtFine/<split>/<city>/*_gtFine_labelIds.png``; labelIds are mapped to the 19
training ids (everything else -> ignore 255)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from segtrain.data.disk import DiskDataset, label_map_lut, require_files, resolve_root
from segtrain.errors import DataError

CLASS_NAMES = [
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
]
# fmt: off
PALETTE = np.array([
    [128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156], [190, 153, 153], [153, 153, 153],
    [250, 170, 30], [220, 220, 0], [107, 142, 35], [152, 251, 152], [70, 130, 180], [220, 20, 60],
    [255, 0, 0], [0, 0, 142], [0, 0, 70], [0, 60, 100], [0, 80, 100], [0, 0, 230],
    [119, 11, 32],
], dtype=np.uint8)
# fmt: on
# labelId -> trainId (cityscapesScripts' labels.py); ids not listed are ignored (255)
LABEL_TO_TRAIN = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
}
LAYOUT = "ROOT/{leftImg8bit,gtFine}/{train,val}/CITY/*_{leftImg8bit,gtFine_labelIds}.png"


def trainid_lut(ignore_index: int = 255) -> np.ndarray:
    lut = np.full(256, ignore_index, np.uint8)
    for k, v in LABEL_TO_TRAIN.items():
        lut[k] = v
    return lut


def find_root(root: Path) -> Path:
    for cand in (root, root / "cityscapes"):
        if (cand / "leftImg8bit").is_dir() and (cand / "gtFine").is_dir():
            return cand
    raise DataError(
        f"data.root={root} holds no Cityscapes data: leftImg8bit/ and gtFine/ are not both there "
        f"(expected layout: {LAYOUT})"
    )


def cityscapes_split(root: Path, split: str, seed: int, lut: np.ndarray, ignore_index: int) -> DiskDataset:
    img_dir = root / "leftImg8bit" / split
    if not img_dir.is_dir():
        raise DataError(f"split folder {img_dir} is missing (expected layout: {LAYOUT})")
    images = sorted(img_dir.glob("*/*_leftImg8bit.png"))
    if not images:
        raise DataError(f"{img_dir} holds no CITY/*_leftImg8bit.png images (expected layout: {LAYOUT})")
    masks = [
        root / "gtFine" / split / p.parent.name / p.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png")
        for p in images
    ]
    require_files(masks, "gtFine label file(s) are", LAYOUT)
    ds = DiskDataset(images, masks, CLASS_NAMES, PALETTE, None, seed, lut=lut, ignore_index=ignore_index)
    ds.kind = "cityscapes-trainid"
    return ds


def build(cfg: DictConfig, seed: int, train: bool = True) -> tuple[DiskDataset | None, DiskDataset]:
    root = find_root(resolve_root(cfg, LAYOUT))
    lut = label_map_lut(cfg.label_map, base=trainid_lut(cfg.ignore_index))
    train = cityscapes_split(root, cfg.train_split, seed, lut, cfg.ignore_index) if train else None
    val = cityscapes_split(root, cfg.val_split, seed, lut, cfg.ignore_index)
    return train, val
