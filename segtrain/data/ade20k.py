"""ADE20K (SceneParsing / ADEChallengeData2016): ``images/{training,validation}/*.jpg`` and
``annotations/{training,validation}/*.png``.  150 classes; 0 ("other") is ignored by
reduce-zero-label: 0 -> 255, every other value minus 1."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from segtrain.data.disk import DiskDataset, label_map_lut, list_images, require_files, resolve_root
from segtrain.data.palette import default_palette
from segtrain.errors import DataError

# the 150 SceneParsing classes in id order (1..150 in the files, 0..149 after reduce-zero-label)
CLASS_NAMES = [
    "wall",
    "building",
    "sky",
    "floor",
    "tree",
    "ceiling",
    "road",
    "bed",
    "windowpane",
    "grass",
    "cabinet",
    "sidewalk",
    "person",
    "earth",
    "door",
    "table",
    "mountain",
    "plant",
    "curtain",
    "chair",
    "car",
    "water",
    "painting",
    "sofa",
    "shelf",
    "house",
    "sea",
    "mirror",
    "rug",
    "field",
    "armchair",
    "seat",
    "fence",
    "desk",
    "rock",
    "wardrobe",
    "lamp",
    "bathtub",
    "railing",
    "cushion",
    "base",
    "box",
    "column",
    "signboard",
    "chest of drawers",
    "counter",
    "sand",
    "sink",
    "skyscraper",
    "fireplace",
    "refrigerator",
    "grandstand",
    "path",
    "stairs",
    "runway",
    "case",
    "pool table",
    "pillow",
    "screen door",
    "stairway",
    "river",
    "bridge",
    "bookcase",
    "blind",
    "coffee table",
    "toilet",
    "flower",
    "book",
    "hill",
    "bench",
    "countertop",
    "stove",
    "palm",
    "kitchen island",
    "computer",
    "swivel chair",
    "boat",
    "bar",
    "arcade machine",
    "hovel",
    "bus",
    "towel",
    "light",
    "truck",
    "tower",
    "chandelier",
    "awning",
    "streetlight",
    "booth",
    "television receiver",
    "airplane",
    "dirt track",
    "apparel",
    "pole",
    "land",
    "bannister",
    "escalator",
    "ottoman",
    "bottle",
    "buffet",
    "poster",
    "stage",
    "van",
    "ship",
    "fountain",
    "conveyer belt",
    "canopy",
    "washer",
    "plaything",
    "swimming pool",
    "stool",
    "barrel",
    "basket",
    "waterfall",
    "tent",
    "bag",
    "minibike",
    "cradle",
    "oven",
    "ball",
    "food",
    "step",
    "tank",
    "trade name",
    "microwave",
    "pot",
    "animal",
    "bicycle",
    "lake",
    "dishwasher",
    "screen",
    "blanket",
    "sculpture",
    "hood",
    "sconce",
    "vase",
    "traffic light",
    "tray",
    "ashcan",
    "fan",
    "pier",
    "crt screen",
    "plate",
    "monitor",
    "bulletin board",
    "shower",
    "radiator",
    "glass",
    "clock",
    "flag",
]
assert len(CLASS_NAMES) == 150
PALETTE = default_palette(151)[1:]  # the VOC colour map (not mmseg's ADE palette)
LAYOUT = "ROOT/ADEChallengeData2016/{images,annotations}/{training,validation}/*.{jpg,png}"
SPLITS = {"train": "training", "val": "validation"}


def reduce_zero_lut(ignore_index: int = 255) -> np.ndarray:
    lut = (np.arange(256, dtype=np.int64) - 1).clip(0, 255).astype(np.uint8)
    lut[0] = lut[255] = ignore_index
    return lut


def find_root(root: Path) -> Path:
    for cand in (root / "ADEChallengeData2016", root):
        if (cand / "images").is_dir() and (cand / "annotations").is_dir():
            return cand
    raise DataError(
        f"data.root={root} holds no ADE20K data: no images/ and annotations/ folders in it or in "
        f"ADEChallengeData2016/ (expected layout: {LAYOUT})"
    )


def ade_split(root: Path, split: str, seed: int, lut: np.ndarray, ignore_index: int) -> DiskDataset:
    sub = SPLITS.get(split, split)
    img_dir, ann_dir = root / "images" / sub, root / "annotations" / sub
    for d in (img_dir, ann_dir):
        if not d.is_dir():
            raise DataError(f"split folder {d} is missing (expected layout: {LAYOUT})")
    images = list_images(img_dir)
    if not images:
        raise DataError(f"{img_dir} holds no images (expected layout: {LAYOUT})")
    masks = [ann_dir / f"{stem}.png" for stem in images]
    require_files(masks, "annotation(s) are", LAYOUT)
    ds = DiskDataset(list(images.values()), masks, CLASS_NAMES, PALETTE, None, seed, lut=lut, ignore_index=ignore_index)
    ds.kind = "ade20k-reduce-zero"
    return ds


def build(cfg: DictConfig, seed: int, train: bool = True) -> tuple[DiskDataset | None, DiskDataset]:
    root = find_root(resolve_root(cfg, LAYOUT))
    lut = label_map_lut(cfg.label_map, base=reduce_zero_lut(cfg.ignore_index))
    train = ade_split(root, cfg.train_split, seed, lut, cfg.ignore_index) if train else None
    val = ade_split(root, cfg.val_split, seed, lut, cfg.ignore_index)
    return train, val
