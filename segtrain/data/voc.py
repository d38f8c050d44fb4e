"""PASCAL VOC 2012 segmentation: ``VOCdevkit/VOC2012/{JPEGImages, SegmentationClass,
ImageSets/Segmentation/<split>.txt}``.  Masks are palette PNGs read as class indices;
255 (object boundaries) is ignored.  ``data.root`` may be the folder holding
VOCdevkit, VOCdevkit itself, or VOC2012.

``data=voc_aug``: trains on the SBD-augmented set already converted to
``VOC2012/SegmentationClassAug/*.png`` (index PNGs) with the list
``ImageSets/Segmentation/<data.train_split>.txt`` (default ``aug``: 10,582 ids, VOC val
excluded), as mmseg's ``tools/dataset_converters/voc_aug.py`` writes them; validates on
VOC ``val`` with ``SegmentationClass``.  ``segtrain-data sbd`` writes this layout."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from segtrain.data.disk import DiskDataset, label_map_lut, read_list, require_files, resolve_root
from segtrain.data.palette import default_palette
from segtrain.errors import DataError

CLASS_NAMES = [
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
]
PALETTE = default_palette(len(CLASS_NAMES))
LAYOUT = "ROOT/VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation/{train,val}.txt}"
AUG_LAYOUT = "ROOT/VOCdevkit/VOC2012/{JPEGImages,SegmentationClassAug,ImageSets/Segmentation/aug.txt} (+ SegmentationClass, val.txt)"


def find_voc2012(root: Path) -> Path:
    for cand in (root / "VOCdevkit" / "VOC2012", root / "VOC2012", root):
        if (cand / "JPEGImages").is_dir():
            return cand
    raise DataError(
        f"data.root={root} holds no VOC data: no JPEGImages folder in it, VOCdevkit/VOC2012 or VOC2012 "
        f"(expected layout: {LAYOUT})"
    )


def voc_split(
    base: Path,
    split: str,
    seed: int,
    lut,
    ignore_index: int,
    mask_dir: str = "SegmentationClass",
    layout: str = LAYOUT,
) -> DiskDataset:
    names = read_list(base / "ImageSets" / "Segmentation" / f"{split}.txt", layout)
    images = [base / "JPEGImages" / f"{n}.jpg" for n in names]
    masks = [base / mask_dir / f"{n}.png" for n in names]
    for kind, paths in (("image", images), ("mask", masks)):
        require_files(paths, f"{kind}(s) listed in ImageSets/Segmentation/{split}.txt are", layout)
    ds = DiskDataset(images, masks, CLASS_NAMES, PALETTE, None, seed, lut=lut, ignore_index=ignore_index)
    ds.kind = "voc"
    return ds


def build(cfg: DictConfig, seed: int, train: bool = True) -> tuple[DiskDataset | None, DiskDataset]:
    base = find_voc2012(resolve_root(cfg, LAYOUT))
    lut = label_map_lut(cfg.label_map)
    train = voc_split(base, cfg.train_split, seed, lut, cfg.ignore_index) if train else None
    val = voc_split(base, cfg.val_split, seed, lut, cfg.ignore_index)
    return train, val


def build_aug(cfg: DictConfig, seed: int, train: bool = True) -> tuple[DiskDataset | None, DiskDataset]:
    base = find_voc2012(resolve_root(cfg, AUG_LAYOUT))
    if not (base / "SegmentationClassAug").is_dir():
        raise DataError(
            f"{base / 'SegmentationClassAug'} is missing: convert SBD first with "
            f"`segtrain-data sbd --root DIR` (expected layout: {AUG_LAYOUT})"
        )
    lut = label_map_lut(cfg.label_map)
    train = (
        voc_split(base, cfg.train_split, seed, lut, cfg.ignore_index, "SegmentationClassAug", AUG_LAYOUT)
        if train
        else None
    )
    val = voc_split(base, cfg.val_split, seed, lut, cfg.ignore_index, layout=AUG_LAYOUT)
    if train is not None:  # SBD masks; val keeps VOC's own
        train.kind = "voc_aug"
    return train, val
