"""Small on-disk data sets unlike segtrain's recipes, for the fingerprint and plan tests: 16-bit TIFFs that use a
small part of their range, 8-bit photos of very different sizes, tiny objects on big images, a 95/5 binary
set with 0/255 masks, and VOC-layout photos of VOC's size.  Each writer returns what it wrote, so that tests
can check the fingerprint against numpy on the same arrays."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from fake_datasets import write_jpeg, write_png

from segtrain.data.palette import default_palette


def write_nuclei16(
    root: Path, n_train: int = 6, n_val: int = 2, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``root/{train,val}/{images,masks}``: 1-band uint16 TIFFs whose values stay below 256 (the bottom 8 bits of
    16) with bright blurred ellipses (class 1) on a dark noisy background; sizes 40-56 x 48-64; 0/1 masks."""
    import tifffile

    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n_train + n_val):
        h, w = 40 + 8 * (i % 3), 48 + 8 * (i % 3)
        mask = np.zeros((h, w), np.uint8)
        for _ in range(2 + i % 3):
            cv2.ellipse(mask, (int(rng.integers(6, w - 6)), int(rng.integers(6, h - 6))), (4, 6), 0, 0, 360, 1, -1)
        img = 15 + 150 * cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 1.0) + rng.normal(0, 5, (h, w))
        img = np.clip(img, 0, 255).astype(np.uint16)
        sub = root / ("train" if i < n_train else "val")
        (sub / "images").mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(sub / "images" / f"n{i:02d}.tif", img)
        write_png(sub / "masks" / f"n{i:02d}.png", mask)
        out[f"n{i:02d}"] = (img, mask)
    return out


def write_photos(
    root: Path, sizes: list[tuple[int, int]], n_val: int = 2, seed: int = 1
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """8-bit RGB PNG photos of the given (h, w) sizes in ``root/{train,val}``; a disc (class 1) and a square
    (class 2) scaled with each picture; the last ``n_val`` are the validation split."""
    rng = np.random.default_rng(seed)
    out = {}
    for i, (h, w) in enumerate(sizes):
        img = np.clip(rng.normal(0, 30, (h, w, 3)) + rng.uniform(40, 210, 3), 0, 255).astype(np.uint8)
        mask = np.zeros((h, w), np.uint8)
        r = max(2, min(h, w) // 6)
        cv2.circle(mask, (w // 4, h // 2), r, 1, -1)
        cv2.rectangle(mask, (3 * w // 4 - r, h // 2 - r), (3 * w // 4 + r, h // 2 + r), 2, -1)
        sub = root / ("train" if i < len(sizes) - n_val else "val")
        write_png(sub / "images" / f"p{i:02d}.png", img)
        write_png(sub / "masks" / f"p{i:02d}.png", mask)
        out[f"p{i:02d}"] = (img, mask)
    return out


def write_tiny_objects(
    root: Path, n: int = 4, size: int = 200, seed: int = 2
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``root/images`` + ``root/masks`` (a seeded hold-out split): big 8-bit photos with a few tiny squares of
    known sides (2-5 px, class 1) far apart; returns the arrays."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        img = np.clip(rng.normal(120, 25, (size, size, 3)), 0, 255).astype(np.uint8)
        mask = np.zeros((size, size), np.uint8)
        for k, side in enumerate((2, 3, 4, 5, 3)[: 3 + i % 3]):
            y, x = 20 + 35 * k, 30 + 30 * ((i + k) % 5)
            mask[y : y + side, x : x + side] = 1
        img[mask == 1] = (230, 30, 30)
        write_png(root / "images" / f"t{i:02d}.png", img)
        write_png(root / "masks" / f"t{i:02d}.png", mask)
        out[f"t{i:02d}"] = (img, mask)
    return out


def write_binary_95_5(
    root: Path, n_train: int = 6, n_val: int = 2, size: int = 40, seed: int = 3
) -> dict[str, np.ndarray]:
    """Grayscale 8-bit photos with 5% foreground (a band of 2 of 40 rows), masks saved as 0/255 PNGs."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n_train + n_val):
        mask = np.zeros((size, size), np.uint8)
        y = 4 + 3 * i
        mask[y : y + size // 20, :] = 255
        img = np.clip(rng.normal(140, 30, (size, size)) - 60 * (mask > 0), 0, 255).astype(np.uint8)
        sub = root / ("train" if i < n_train else "val")
        write_png(sub / "images" / f"b{i:02d}.png", img)
        write_png(sub / "masks" / f"b{i:02d}.png", mask)
        out[f"b{i:02d}"] = mask
    return out


def write_voc_photos(root: Path, n_train: int = 4, n_val: int = 2, seed: int = 4) -> None:
    """VOC layout with VOC-sized photos (500x375 and 375x500 JPEGs), palette PNG masks with 255 borders."""
    base = root / "VOCdevkit" / "VOC2012"
    rng = np.random.default_rng(seed)
    names = [f"2008_{i:06d}" for i in range(n_train + n_val)]
    pal = default_palette(256)
    for i, name in enumerate(names):
        h, w = (375, 500) if i % 3 else (500, 375)
        small = rng.integers(0, 256, (h // 25, w // 25, 3)).astype(np.uint8)
        img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
        write_jpeg(base / "JPEGImages" / f"{name}.jpg", img)
        mask = np.zeros((h, w), np.uint8)
        cv2.rectangle(mask, (w // 4, h // 4), (3 * w // 4, 3 * h // 4), 1 + i % 20, -1)
        cv2.rectangle(mask, (w // 4, h // 4), (3 * w // 4, 3 * h // 4), 255, 3)
        write_png(base / "SegmentationClass" / f"{name}.png", mask, pal)
    sets = base / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / "train.txt").write_text("\n".join(names[:n_train]) + "\n")
    (sets / "val.txt").write_text("\n".join(names[n_train:]) + "\n")
