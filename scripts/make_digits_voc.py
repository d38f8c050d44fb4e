#!/usr/bin/env python
"""Write a VOC-layout data set of real handwriting: scikit-learn's bundled digits (1,797 scans by 43 writers).

    pip install scikit-learn
    python scripts/make_digits_voc.py /tmp/digits_voc
    segtrain data=voc data.root=/tmp/digits_voc model=unet data.num_classes=11 \\
        'data.class_names=[background,0,1,2,3,4,5,6,7,8,9]' data.base_size=null data.crop_size=64 \\
        'data.scale_range=[0.75,1.25]' data.batch_size=16 data.num_workers=2 trainer.max_iters=2500 trainer.val_interval=500

Each picture (odd sizes, 64-96 x 72-120 px) holds 2-4 upscaled (18-30 px) handwritten digits on a noisy paper-like
background; a third of the JPEGs are grayscale.  Masks are palette PNGs: 0 background, digit d -> class d+1,
and a 255 (ignore) band along every digit's outline, as VOC marks object boundaries.  Train and val use
digits from disjoint sets of scans (the first 1,400 vs the remaining 397), so no validation digit was seen in training.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from segtrain.data.palette import default_palette


def compose(rng: np.random.Generator, digits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h, w = int(rng.integers(64, 97)), int(rng.integers(72, 121))
    paper = rng.uniform(170, 245)
    image = np.full((h, w), paper, np.float32) + rng.normal(0, 6, (h, w)).astype(np.float32)
    mask = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(2, 5))):
        k = int(rng.integers(len(digits)))
        size = int(rng.integers(18, 31))
        glyph = cv2.resize(digits[k].astype(np.float32) / 16.0, (size, size), interpolation=cv2.INTER_CUBIC).clip(0, 1)
        y, x = int(rng.integers(0, h - size)), int(rng.integers(0, w - size))
        ink = rng.uniform(10, 90)
        region = image[y : y + size, x : x + size]
        image[y : y + size, x : x + size] = region * (1 - glyph) + ink * glyph
        fg = glyph > 0.35
        band = (cv2.dilate(fg.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0) & ~fg  # a 1-px outline outside the ink
        sub = mask[y : y + size, x : x + size]
        sub[fg] = labels[k] + 1
        sub[band] = 255
    return np.clip(image, 0, 255).astype(np.uint8), mask


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path)
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--val", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    from sklearn.datasets import load_digits

    data = load_digits()
    base = args.root / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / d).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    pal = default_palette(256).flatten().tolist()
    pools = {"train": (data.images[:1400], data.target[:1400]), "val": (data.images[1400:], data.target[1400:])}
    for split, n in (("train", args.train), ("val", args.val)):
        names = []
        for i in range(n):
            image, mask = compose(rng, *pools[split])
            name = f"{split}_{i:05d}"
            if rng.random() < 1 / 3:
                cv2.imwrite(str(base / "JPEGImages" / f"{name}.jpg"), image)  # grayscale JPEG
            else:
                tint = rng.uniform(0.8, 1.0, size=3)
                rgb = np.clip(image[..., None] * tint, 0, 255).astype(np.uint8)
                cv2.imwrite(str(base / "JPEGImages" / f"{name}.jpg"), rgb)
            png = Image.fromarray(mask, mode="P")
            png.putpalette(pal)
            png.save(base / "SegmentationClass" / f"{name}.png")
            names.append(name)
        (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    print(f"wrote {args.train} train / {args.val} val images to {base}")


if __name__ == "__main__":
    main()
