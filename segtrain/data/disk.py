"""On-disk data sets: :class:`DiskDataset` and the listers that every layout uses (the image reader:
:mod:`segtrain.data.images`).

:class:`DiskDataset` holds parallel lists of image and mask paths.  Masks are
read with PIL (palette PNGs give their indices), mapped by a per-data-set
lookup table (Cityscapes labelId -> trainId, ADE20K reduce-zero-label) and then
by ``data.label_map``; folder data sets may also map RGB colour masks through
their palette.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image, UnidentifiedImageError

from segtrain.data.base import SegDataset
from segtrain.data.images import loads_rotated, read_image
from segtrain.errors import ConfigError, DataError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


# ---------------------------------------------------------------------------
# Config helpers shared by the builders.


def resolve_root(cfg: DictConfig, layout: str) -> Path:
    """``data.root`` as an existing folder, or a one-line DataError naming the expected layout."""
    if cfg.root is None or str(cfg.root).strip() == "":
        raise DataError(f"data={cfg.name} needs data.root: set data.root=/path/to/data (expected layout: {layout})")
    root = Path(os.path.expandvars(str(cfg.root))).expanduser()
    if not root.exists():
        raise DataError(f"data.root={root} does not exist (expected layout: {layout})")
    if not root.is_dir():
        raise DataError(f"data.root={root} is not a folder (expected layout: {layout})")
    return root


def label_map_lut(label_map: Any, base: np.ndarray | None = None) -> np.ndarray | None:
    """``data.label_map`` ({raw: new}) as a 256-entry uint8 lookup table (None when unset and no ``base``).

    ``base`` is a layout's own table (Cityscapes labelId -> trainId, ADE20K reduce-zero); the user's map
    then applies to its output."""
    if label_map is None:
        return base
    if base is not None:
        return label_map_lut(label_map)[base]
    if isinstance(label_map, DictConfig):
        label_map = OmegaConf.to_container(label_map)
    if not isinstance(label_map, dict):
        raise ConfigError(f"data.label_map must be a dict like {{255: 1}}, got {label_map!r}")
    lut = np.arange(256, dtype=np.uint8)
    for k, v in label_map.items():
        try:
            k, v = int(k), int(v)
        except (TypeError, ValueError):
            raise ConfigError(f"data.label_map needs integer keys and values in [0, 255], got {k!r}: {v!r}") from None
        if not (0 <= k < 256 and 0 <= v < 256):
            raise ConfigError(f"data.label_map needs integer keys and values in [0, 255], got {k}: {v}")
        lut[k] = v
    return lut


def open_pil(path: Path, kind: str) -> Image.Image:
    """Open and fully decode ``path`` with PIL (truncated files fail here)."""
    try:
        im = Image.open(path)
        im.load()
        return im
    except FileNotFoundError:
        raise DataError(f"{kind} {path} is missing") from None
    except UnidentifiedImageError:
        raise DataError(f"{kind} {path} cannot be read as an image (corrupt or unsupported format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        msg = " ".join(str(e).split())
        raise DataError(f"{kind} {path} is unreadable or truncated ({msg}); re-copy or remove it") from None


def _map_colours(rgb: np.ndarray, palette: np.ndarray, path: Path, ignore_color: Any, ignore_index: int) -> np.ndarray:
    codes = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2].astype(np.int32)
    table = {int(r) << 16 | int(g) << 8 | int(b): i for i, (r, g, b) in enumerate(palette)}
    if ignore_color is not None:
        r, g, b = (int(v) for v in ignore_color)
        table[r << 16 | g << 8 | b] = ignore_index
    uniq, inv = np.unique(codes, return_inverse=True)
    out = np.empty(len(uniq), np.uint8)
    for j, c in enumerate(uniq.tolist()):
        if c not in table:
            colour = (c >> 16 & 255, c >> 8 & 255, c & 255)
            raise DataError(
                f"mask {path} has colour {colour} that is not in the palette; add it to the palette in root/classes.yaml "
                f"(or data.palette), or set ignore_color in root/classes.yaml"
            )
        out[j] = table[c]
    return out[inv.reshape(codes.shape)]


def valid_values(num_classes: int, ignore_index: int) -> np.ndarray:
    """The 256-entry table of accepted mask values: the class ids and ``ignore_index``."""
    valid = np.zeros(256, bool)
    valid[:num_classes] = True
    valid[ignore_index] = True
    return valid


class DiskDataset(SegDataset):
    """Images and masks as files.  ``lut``: a 256-entry uint8 table applied to the mask's values."""

    kind = "disk"  # the data set's mapping, part of the label-check cache key
    in_channels = 3  # data.in_channels (set by build_datasets)

    def __init__(
        self,
        images: list[Path],
        masks: list[Path],
        class_names: list[str],
        palette: np.ndarray,
        transform: Any = None,
        seed: int = 0,
        lut: np.ndarray | None = None,
        colour_palette: np.ndarray | None = None,
        ignore_color: Any = None,
        ignore_index: int = 255,
    ):
        super().__init__(transform, seed)
        assert len(images) == len(masks)
        self.images, self.masks = list(images), list(masks)
        self.class_names, self.palette = list(class_names), palette
        self.lut = lut
        self.colour_palette, self.ignore_color, self.ignore_index = colour_palette, ignore_color, ignore_index

    def __len__(self) -> int:
        return len(self.images)

    def describe(self, index: int) -> str:
        return str(self.images[index])

    def read_mask(self, index: int, im: Image.Image | None = None, mapped: bool = True) -> np.ndarray:
        """The HxW uint8 mask of sample ``index`` after the data set's mapping and ``data.label_map``
        (``mapped=False``: before them, the values as stored, colours already turned into indices)."""
        path = self.masks[index]
        im = im if im is not None else open_pil(path, "mask")
        if im.mode in ("LA", "PA"):  # an alpha channel on an index mask: keep the indices
            im = im.getchannel(0)
        if im.mode in ("RGB", "RGBA"):
            arr = np.asarray(im.convert("RGB"))
            if self.colour_palette is not None:
                mask = _map_colours(arr, self.colour_palette, path, self.ignore_color, self.ignore_index)
            elif (arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all():
                mask = np.ascontiguousarray(arr[..., 0])
            else:
                raise DataError(
                    f"mask {path} is an RGB colour image: use class-index masks (palette or grayscale PNG), or "
                    f"(data=folder) list the class colours as palette: [[r, g, b], ...] in root/classes.yaml"
                )
        else:
            arr = np.array(im)  # a writable copy
            if arr.ndim != 2:
                raise DataError(f"mask {path} has shape {arr.shape}; expected a single-channel class-index image")
            if arr.dtype != np.uint8:
                if arr.size and (arr.min() < 0 or arr.max() > 255):
                    raise DataError(f"mask {path} has values up to {int(arr.max())}; class indices must be in [0, 255]")
                arr = arr.astype(np.uint8)
            mask = arr
        if self.lut is not None and mapped:
            mask = self.lut[mask]
        return mask

    def read_image(self, index: int) -> np.ndarray:
        """The HxWxC image of sample ``index``, as read for training (no augmentation)."""
        return read_image(self.images[index], self.in_channels)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image = self.read_image(index)
        mask = self.read_mask(index)
        if image.shape[:2] != mask.shape[:2]:
            raise DataError(
                size_message(self.images[index], image.shape[:2], self.masks[index], mask.shape[:2], self.in_channels)
            )
        if self.valid is not None and not self.valid[mask].all():  # data.check_labels=false: checked here
            bad = np.unique(mask[~self.valid[mask]]).tolist()
            raise DataError(
                f"bad mask (data.check_labels=false skipped the check before training): "
                f"{value_problem(self, index, bad, self.num_classes, self.ignore_index)}"
            )
        return image, mask

    # Set by build_datasets when data.check_labels=false: load() then checks each mask (a 256-entry lookup).
    valid: np.ndarray | None = None  # the accepted mask values
    num_classes: int = 0
    smallest: tuple[str, int, int] | None = None  # (path, h, w) of the smallest image, found by the label check

    def check_values(self, num_classes: int, ignore_index: int) -> None:
        """Make :meth:`load` reject mask values outside ``[0, num_classes)`` and ``ignore_index``."""
        self.valid = valid_values(num_classes, ignore_index)
        self.num_classes, self.ignore_index = num_classes, ignore_index

    def cache_key(self) -> str:
        pal = None if self.colour_palette is None else self.colour_palette.tolist()
        return json.dumps([self.kind, None if self.lut is None else self.lut.tolist(), pal, self.ignore_color])


def size_message(img_path: Path, img_hw: tuple, mask_path: Path, mask_hw: tuple, in_channels: int = 3) -> str:
    """The error for an image and mask of different sizes (``img_hw`` as loaded, EXIF rotation applied)."""
    orientation = loads_rotated(img_path, in_channels)
    if orientation and tuple(img_hw[::-1]) == tuple(mask_hw):
        return (
            f"image {img_path} has EXIF orientation {orientation}: it loads rotated by 90 degrees as "
            f"{img_hw[1]}x{img_hw[0]}, while its mask {mask_path} is {mask_hw[1]}x{mask_hw[0]} (WxH) as stored; "
            "remove the orientation tag from the image (e.g. exiftool -Orientation= FILE), or rotate the mask too"
        )
    return (
        f"image {img_path} is {img_hw[1]}x{img_hw[0]} but its mask {mask_path} is {mask_hw[1]}x{mask_hw[0]} (WxH); "
        f"image and mask must have the same size"
    )


def mapped_from(ds: DiskDataset, index: int, values: list[int]) -> list[int]:
    """The raw values in sample ``index``'s file that the label mapping (``data.label_map``, or the layout's
    own table) turned into one of ``values`` (empty when the file holds ``values`` themselves)."""
    if ds.lut is None:
        return []
    raw = np.unique(ds.read_mask(index, mapped=False)).tolist()
    return sorted(r for r in raw if int(ds.lut[r]) in values and int(ds.lut[r]) != r)


def value_problem(ds: DiskDataset, index: int, values: list[int], num_classes: int, ignore_index: int) -> str:
    """What is wrong with mask values ``values`` (after the mapping) of sample ``index``, and the fix:
    JPEG masks, values made by ``data.label_map``, or values that need num_classes / a remap."""
    path, ignore = ds.masks[index], ignore_index
    if Path(path).suffix.lower() in (".jpg", ".jpeg"):
        return (
            f"{path} has values {values[:8]}: the masks are JPEG files, whose lossy compression changes class "
            "values at edges; save masks as PNG"
        )
    sources = mapped_from(ds, index, values)
    if sources:
        return (
            f"{path} has values {sources} that data.label_map turns into {values}, outside the classes; map them "
            f"to a class in [0, {num_classes}) or to data.ignore_index={ignore}"
        )
    return (
        f"{path} has values {values[:8]}; if these are classes set data.num_classes={max(values) + 1}, otherwise "
        f"remap them with data.label_map={{{values[0]}:{ignore}}}"
    )


# ---------------------------------------------------------------------------
# Listing files.


def require_files(paths: list[Path], what: str, layout: str) -> None:
    """A one-line DataError naming how many of ``paths`` are missing and the first one."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{len(missing)} {what} missing, e.g. {missing[0]} (expected layout: {layout})")


def list_images(folder: Path) -> dict[str, Path]:
    """{stem: path} of the image files in ``folder`` (any letter case of the known extensions)."""
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS:
            if p.stem in out:
                raise DataError(
                    f"{folder} holds two files with the stem {p.stem!r} ({out[p.stem].name}, {p.name}); keep one"
                )
            out[p.stem] = p
    return out


def read_list(path: Path, layout: str) -> list[str]:
    """Non-empty lines of a split list, or a DataError naming the file and the layout."""
    if not path.is_file():
        there = sorted(p.stem for p in path.parent.glob("*.txt")) if path.parent.is_dir() else []
        splits = f"; the split lists there: {', '.join(there[:8])}" if there else ""
        raise DataError(f"split file {path} is missing{splits} (expected layout: {layout})")
    text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not part of a name
    names = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not names:
        raise DataError(f"split file {path} is empty (expected one image name per line)")
    return names
