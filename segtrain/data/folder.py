"""Your own data: ``root/images`` + ``root/masks`` with matching file stems.

Splits, first match wins:

1. ``root/train.txt`` and ``root/val.txt``: one image name (stem, extension optional) per line;
2. ``root/train/{images,masks}`` and ``root/val/{images,masks}``;
3. a seeded hold-out of ``data.val_fraction`` of ``root/images`` (seed ``data.seed``); for ``segtrain-eval``
   on a separate test set, ``data.val_fraction=1`` scores every image.

Class names and colours come from ``root/classes.yaml`` (or ``data.class_names`` /
``data.palette``)::

    names: [background, crack]          # or a plain list of names
    palette: [[0, 0, 0], [255, 0, 0]]   # optional; needed for RGB colour masks
    ignore_color: [255, 255, 255]       # optional: this colour -> data.ignore_index

Masks are class-index images (palette or grayscale PNG), or RGB colour masks mapped
through the palette.  ``data.label_map`` remaps values afterwards.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from omegaconf import DictConfig

from segtrain.data import mask_classes
from segtrain.data.disk import IMAGE_EXTS, DiskDataset, label_map_lut, list_images, read_list, resolve_root
from segtrain.data.palette import default_palette, palette_array
from segtrain.errors import ConfigError, DataError

LAYOUT = (
    "ROOT/images/* + ROOT/masks/* with matching names [+ ROOT/{train,val}.txt], or ROOT/{train,val}/{images,masks}/*"
)


def read_classes(root: Path) -> dict:
    path = root / "classes.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise DataError(f"{path} is not valid YAML ({' '.join(str(e).split())})") from None
    if isinstance(data, list):
        data = {"names": data}
    if not isinstance(data, dict):
        raise DataError(
            f"{path} must be a list of class names or a mapping with names: [...] and palette: [[r, g, b], ...]"
        )
    names = data.get("names", data.get("classes"))
    if names is not None and not (isinstance(names, list) and all(isinstance(n, (str, int)) for n in names)):
        raise DataError(f"{path}: names must be a list of class names")
    out = {"names": [str(n) for n in names] if names is not None else None, "path": path}
    for key, value, many in (("palette", data.get("palette"), True), ("ignore_color", data.get("ignore_color"), False)):
        try:
            colours = palette_array(value if many or value is None else [value], f"{path} {key}")
        except ConfigError:
            shape = "a list of [r, g, b] colours" if many else "one [r, g, b] colour"
            raise DataError(f"{path}: {key} must be {shape} with integers in [0, 255], got {value!r}") from None
        out[key] = colours if many or colours is None else colours[0].tolist()
    return out


def _pairs(
    img_dir: Path, mask_dir: Path, stems: list[str] | None = None, source: str = ""
) -> tuple[list[Path], list[Path]]:
    for d in (img_dir, mask_dir):
        if not d.is_dir():
            raise DataError(f"folder {d} is missing (expected layout: {LAYOUT})")
    images, masks = list_images(img_dir), list_images(mask_dir)
    if stems is None:
        stems = sorted(images)
        if not stems:
            raise DataError(f"{img_dir} holds no images ({'/'.join(IMAGE_EXTS)}) (expected layout: {LAYOUT})")
    else:
        stems = [Path(s).stem if Path(s).suffix.lower() in IMAGE_EXTS else s for s in stems]
        missing = [s for s in stems if s not in images]
        if missing:
            raise DataError(f"{len(missing)} name(s) in {source} have no image in {img_dir}, e.g. {missing[0]!r}")
    no_mask = [s for s in stems if s not in masks]
    if no_mask:
        raise DataError(
            f"{len(no_mask)} image(s) in {img_dir} have no mask with the same name in {mask_dir}, "
            f"e.g. {images[no_mask[0]].name}"
        )
    return [images[s] for s in stems], [masks[s] for s in stems]


Pairs = tuple[list[Path], list[Path]]


def splits(root: Path, cfg: DictConfig, train: bool = True) -> tuple[Pairs | None, Pairs]:
    """(train, val) image and mask paths; train None when not wanted (``segtrain-eval``: the training split
    may then be absent, and ``data.val_fraction=1`` makes every image of ``ROOT/images`` the validation set)."""
    names = [cfg.train_split, cfg.val_split]
    lists = [root / f"{n}.txt" for n in names]
    if any(p.is_file() for p in lists):
        found = [
            _pairs(root / "images", root / "masks", read_list(p, LAYOUT), str(p)) if train or k else None
            for k, p in enumerate(lists)
        ]
        return found[0], found[1]
    dirs = [root / n for n in names]
    if any((d / "images").is_dir() for d in dirs):
        found = [_pairs(d / "images", d / "masks") if train or k else None for k, d in enumerate(dirs)]
        return found[0], found[1]
    if not (root / "images").is_dir():
        raise DataError(f"data.root={root} has no images/ folder (expected layout: {LAYOUT})")
    named = [("data.val_split", cfg.val_split, "val")] + ([("data.train_split", cfg.train_split, "train")] * train)
    for key, name, default in named:
        if name != default:  # a split asked for by name that is not there: not the hold-out in its place
            raise DataError(
                f"{key}={name}: {root} has no split {name} ({name}.txt or {name}/images/), nor any other split: its "
                f"images are split by data.val_fraction; drop {key} (or add the split)"
            )
    images, masks = _pairs(root / "images", root / "masks")
    if not 0 < cfg.val_fraction <= 1:
        raise DataError(f"data.val_fraction must be in (0, 1], got {cfg.val_fraction}")
    if cfg.val_fraction == 1:
        if train:
            raise DataError(
                "data.val_fraction=1 puts every image in validation, leaving none to train on: it is for "
                "segtrain-eval on a separate test set; use a fraction such as 0.1"
            )
        return None, (images, masks)
    if len(images) < 2:
        raise DataError(f"{root / 'images'} holds {len(images)} image; a train/val hold-out needs at least 2")
    order = np.random.default_rng(cfg.seed).permutation(len(images))
    n_val = min(len(images) - 1, max(1, int(round(len(images) * cfg.val_fraction))))
    val_idx, train_idx = sorted(order[:n_val].tolist()), sorted(order[n_val:].tolist())
    val = [images[i] for i in val_idx], [masks[i] for i in val_idx]
    return ([images[i] for i in train_idx], [masks[i] for i in train_idx]) if train else None, val


def build(cfg: DictConfig, seed: int, train: bool = True) -> tuple[DiskDataset | None, DiskDataset]:
    root = resolve_root(cfg, LAYOUT)
    meta = read_classes(root)
    k = mask_classes(cfg.num_classes)  # one sigmoid logit (num_classes=1): background and foreground
    names = list(cfg.class_names) if cfg.class_names is not None else meta.get("names")
    if names is not None and len(names) != k:
        src = "data.class_names" if cfg.class_names is not None else str(meta["path"])
        raise DataError(
            f"{src} lists {len(names)} classes but data.num_classes={cfg.num_classes}: set data.num_classes="
            f"{len(names)}"
            + (" (one sigmoid logit: 2 names, background and foreground)" if cfg.num_classes == 1 else "")
        )
    names = names or (["background", "foreground"] if cfg.num_classes == 1 else [f"class{i}" for i in range(k)])
    colours = palette_array(cfg.palette, "data.palette") if cfg.palette is not None else meta.get("palette")
    if colours is not None and len(colours) != k:
        src = "data.palette" if cfg.palette is not None else f"{meta['path']} palette"
        raise DataError(
            f"{src} has {len(colours)} colours but data.num_classes={cfg.num_classes}: give one [r, g, b] per class "
            f"({k})"
        )
    palette = colours if colours is not None else default_palette(k)
    lut = label_map_lut(cfg.label_map)
    common = dict(lut=lut, colour_palette=colours, ignore_color=meta.get("ignore_color"), ignore_index=cfg.ignore_index)
    found = [
        None if pairs is None else DiskDataset(*pairs, names, palette, None, seed, **common)
        for pairs in splits(root, cfg, train)
    ]
    for ds in found:
        if ds is not None:
            ds.kind = "folder"
    return found[0], found[1]
