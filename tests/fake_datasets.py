"""Miniature on-disk data set trees (real JPEG/PNG files) for the data set tests, and ``data_cfg``: the data
config of a shipped data option that reads them."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import yaml
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from segtrain.config import DataConfig
from segtrain.data.palette import default_palette

REPO = Path(__file__).resolve().parents[1]

SIZES = [(61, 83), (50, 70), (64, 48), (72, 90)]  # (h, w), odd on purpose


def data_cfg(name: str, root=None, **over) -> DictConfig:
    """configs/data/NAME.yaml over the schema, reading ``root``, with 32-px crops in batches of 2 and the
    ``over`` keys (dotted keys allowed) set as given."""
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(REPO / "configs" / "data" / f"{name}.yaml"))
    cfg.root = None if root is None else str(root)
    cfg.crop_size, cfg.batch_size = 32, 2
    for k, v in over.items():
        OmegaConf.update(cfg, k, v, merge=False)
    return cfg


def _image(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _mask(h: int, w: int, values: list[int], border: int | None = None) -> np.ndarray:
    """Vertical bands of ``values``; an optional 2-px ``border`` value around the first band."""
    m = np.zeros((h, w), np.uint8)
    for i, v in enumerate(values):
        m[:, i * w // len(values) : (i + 1) * w // len(values)] = v
    if border is not None:
        x = w // len(values)
        m[:, max(0, x - 1) : x + 1] = border
    return m


def write_jpeg(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    assert cv2.imwrite(str(path), arr)


def write_png(path: Path, mask: np.ndarray, palette: np.ndarray | None = None) -> None:
    """A grayscale PNG, an RGB PNG (HxWx3), or a palette ("P") PNG when ``palette`` is given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(mask)
    if palette is not None:
        im.putpalette(np.asarray(palette, np.uint8).ravel().tolist())
        assert im.mode == "P"
    im.save(path)


def write_voc(
    root: Path, n_train: int = 4, n_val: int = 2, bad_value: int | None = None, aug: bool = False
) -> dict[str, np.ndarray]:
    """``root/VOCdevkit/VOC2012``; image 0 is a grayscale JPEG; masks are palette PNGs with 255 borders.
    ``aug``: also SegmentationClassAug (grayscale PNGs) for the training ids + aug.txt.
    Returns {name: expected mask}."""
    base = root / "VOCdevkit" / "VOC2012"
    pal = default_palette(256)
    expected = {}
    names = [f"2007_{i:06d}" for i in range(n_train + n_val)]
    for i, name in enumerate(names):
        h, w = SIZES[i % len(SIZES)]
        img = _image(h, w, i)
        write_jpeg(base / "JPEGImages" / f"{name}.jpg", img[..., 0] if i == 0 else img)
        mask = _mask(h, w, [0, 1 + i % 20, 15], border=255)
        if bad_value is not None and i == 1:
            mask[:5, :5] = bad_value
        write_png(base / "SegmentationClass" / f"{name}.png", mask, pal)
        if aug and i < n_train:
            write_png(base / "SegmentationClassAug" / f"{name}.png", mask)
        expected[name] = mask
    sets = base / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / "train.txt").write_text("\n".join(names[:n_train]) + "\n")
    (sets / "val.txt").write_text("\n".join(names[n_train:]) + "\n")
    (sets / "trainval.txt").write_text("\n".join(names) + "\n")
    if aug:
        (sets / "aug.txt").write_text("\n".join(names[:n_train]) + "\n")
    return expected


def write_cityscapes(root: Path) -> dict[str, np.ndarray]:
    """labelId masks: road (7), car (26), person (24), unlabelled (0), bicycle (33)."""
    expected = {}
    for split, cities in (("train", ["aachen", "bonn"]), ("val", ["frankfurt"])):
        for ci, city in enumerate(cities):
            for j in range(2 if split == "train" else 1):
                h, w = SIZES[(ci + j) % len(SIZES)]
                stem = f"{city}_{j:06d}_000019"
                write_png(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", _image(h, w, ci * 10 + j))
                mask = _mask(h, w, [7, 26, 24, 0, 33])
                write_png(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", mask)
                expected[stem] = mask
    return expected


def write_ade(root: Path) -> dict[str, np.ndarray]:
    base = root / "ADEChallengeData2016"
    expected = {}
    for split, n in (("training", 3), ("validation", 2)):
        for i in range(n):
            h, w = SIZES[i % len(SIZES)]
            stem = f"ADE_{split[:5]}_{i:08d}"
            write_jpeg(base / "images" / split / f"{stem}.jpg", _image(h, w, i))
            mask = _mask(h, w, [0, 1, 150, 13])
            write_png(base / "annotations" / split / f"{stem}.png", mask)
            expected[stem] = mask
    return expected


FOLDER_PALETTE = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0]], np.uint8)


def write_folder(
    root: Path, masks: str = "index", layout: str = "flat", n: int = 6, num_classes: int = 3, classes_yaml: bool = True
) -> dict[str, np.ndarray]:
    """``masks``: index (grayscale PNG), rgb (colours of FOLDER_PALETTE), binary (0/255).
    ``layout``: flat (images/ + masks/), lists (+ train.txt/val.txt), dirs (train|val/{images,masks})."""
    exts = [".jpg", ".PNG", ".jpeg", ".JPG", ".png", ".bmp"]
    expected = {}
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        stem = f"img_{i:02d}"
        sub = root if layout != "dirs" else root / ("val" if i >= n - 2 else "train")
        ext = exts[i % len(exts)]
        img = _image(h, w, i)
        if ext.lower() in (".jpg", ".jpeg"):
            write_jpeg(sub / "images" / f"{stem}{ext}", img)
        else:
            (sub / "images").mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(sub / "images" / f"{stem}{ext}"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        if masks == "binary":
            idx = _mask(h, w, [0, 1])
            write_png(sub / "masks" / f"{stem}.png", (idx * 255).astype(np.uint8))
        else:
            idx = _mask(h, w, list(range(num_classes)))
            if masks == "rgb":
                write_png(sub / "masks" / f"{stem}.png", FOLDER_PALETTE[idx])
            else:
                write_png(sub / "masks" / f"{stem}.png", idx)
        expected[stem] = idx
    if layout == "lists":
        stems = sorted(expected)
        (root / "train.txt").write_text("\n".join(stems[:-2]) + "\n")
        (root / "val.txt").write_text("\n".join(stems[-2:]) + "\n")
    if classes_yaml:
        names = ["background", "red", "green"][:num_classes]
        (root / "classes.yaml").write_text(
            yaml.safe_dump({"names": names, "palette": FOLDER_PALETTE[:num_classes].tolist()})
        )
    return expected


def write_tiff_folder(
    root: Path, n: int = 8, bands: int = 4, dtype=np.uint16, size: tuple[int, int] = (40, 48), planar: bool = False
) -> dict[str, np.ndarray]:
    """``root/{images,masks}``: ``bands``-band TIFFs (samples last, or planar) whose last band carries a square
    (class 1) at ``0.5 x`` the type's range over a noisy ~1/8-range background; masks are 0/1 PNGs."""
    import tifffile

    rng = np.random.default_rng(0)
    top = 1.0 if np.dtype(dtype).kind == "f" else float(np.iinfo(dtype).max)
    expected = {}
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = size[0] + 4 * (i % 3), size[1] - 2 * (i % 2)  # sizes differ a little
        img = rng.normal(top / 8, top / 40, size=(h, w, bands))
        mask = np.zeros((h, w), np.uint8)
        s = int(rng.integers(10, 18))
        y, x = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
        mask[y : y + s, x : x + s] = 1
        img[..., -1][mask == 1] = top / 2
        img = np.clip(img, 0, top).astype(dtype)
        stem = f"tile_{i:02d}"
        if bands == 1:
            tifffile.imwrite(root / "images" / f"{stem}.tif", img[..., 0])
        elif planar:
            tifffile.imwrite(root / "images" / f"{stem}.tif", np.moveaxis(img, 2, 0), photometric="minisblack")
        else:
            tifffile.imwrite(root / "images" / f"{stem}.tif", img, photometric="minisblack", planarconfig="contig")
        write_png(root / "masks" / f"{stem}.png", mask)
        expected[stem] = (img, mask)
    return expected


def write_squares(root: Path, n: int = 24, size: int = 32, seed: int = 0) -> None:
    """``root/{images,masks}``: grayscale 8-bit PNGs of one bright square (6-14 px) on dark noise; 0/1 masks."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = rng.normal(60, 25, size=(size, size))
        mask = np.zeros((size, size), np.uint8)
        s = int(rng.integers(6, 15))
        y, x = int(rng.integers(0, size - s)), int(rng.integers(0, size - s))
        mask[y : y + s, x : x + s] = 1
        img[mask == 1] += 110
        write_png(root / "images" / f"sq_{i:03d}.png", np.clip(img, 0, 255).astype(np.uint8))
        write_png(root / "masks" / f"sq_{i:03d}.png", mask)
