"""The built-in data set: shapes on textured backgrounds.

Each sample is drawn procedurally from ``(seed, split, index)`` alone, so the
data set is the same on every machine and needs no download.  A picture holds
1-4 shapes of up to seven classes (circle, square, triangle, ring, cross,
star, ellipse) drawn over a textured background (a smooth colour field,
stripes or speckle):

* shapes vary in scale (~20%-55% of the short side), rotation and aspect, and
  overlap, so later shapes occlude earlier ones;
* three in four shapes wear their class's hue (with jitter), the rest a random
  flat colour or a texture: colour gets a network started, but only the
  *geometry* (a receptive field that covers the whole shape) separates ring
  from circle or square from cross everywhere.

Class 0 is the background; ``num_classes`` (2..8) picks how many shape
classes appear (larger values add classes that never appear).
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from omegaconf import DictConfig
from torch.utils.data import get_worker_info

from segtrain.data import mask_classes, transforms
from segtrain.data.base import SegDataset
from segtrain.data.palette import default_palette
from segtrain.errors import ConfigError
from segtrain.utils import as_hw

SHAPES = ["circle", "square", "triangle", "ring", "cross", "star", "ellipse"]
CLASS_NAMES = ["background", *SHAPES]
MAX_CLASSES = len(CLASS_NAMES)
# fmt: off
PALETTE = np.array([
    [0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
    [145, 30, 180], [70, 240, 240],
], dtype=np.uint8)
# fmt: on
_SPLIT_IDS = {"train": 1, "val": 2, "test": 3}
CACHE_BYTES = 512 * 2**20


def _texture(rng: np.random.Generator, h: int, w: int, contrast: float = 1.0) -> np.ndarray:
    """An RGB float32 texture: a smooth colour field, stripes, or speckle around a base colour."""
    base = rng.integers(0, 256, size=3).astype(np.float32)
    kind = rng.integers(3)
    if kind == 0:  # smooth low-frequency colour field
        small = rng.normal(0, 40 * contrast, size=(int(rng.integers(2, 5)), int(rng.integers(2, 5)), 3)).astype(
            np.float32
        )
        tex = base + cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    elif kind == 1:  # stripes at a random angle and period
        delta = rng.normal(0, 40 * contrast, size=3).astype(np.float32)
        theta = rng.uniform(0, math.pi)
        period = rng.uniform(4, 16)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        s = np.sin((xx * math.cos(theta) + yy * math.sin(theta)) * 2 * math.pi / period)
        tex = base + s[..., None] * delta
    else:  # speckle
        tex = base + rng.normal(0, 20 * contrast, size=(h, w, 3)).astype(np.float32)
    return np.clip(tex, 0, 255)


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float, aspect: float) -> list[np.ndarray]:
    """Vertices (int32 arrays) of a polygonal shape centred at (cx, cy) with radius r."""
    if kind == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        pts = [(x * 0.8, y * 0.8 * aspect) for x, y in pts]
    elif kind == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif kind == "star":
        pts = [
            (
                (1.0 if i % 2 == 0 else 0.45) * math.cos(i * math.pi / 5 - math.pi / 2),
                (1.0 if i % 2 == 0 else 0.45) * math.sin(i * math.pi / 5 - math.pi / 2),
            )
            for i in range(10)
        ]
    elif kind == "cross":
        t = 0.33
        pts = [
            (-t, -1),
            (t, -1),
            (t, -t),
            (1, -t),
            (1, t),
            (t, t),
            (t, 1),
            (-t, 1),
            (-t, t),
            (-1, t),
            (-1, -t),
            (-t, -t),
        ]
    else:
        raise ValueError(kind)
    ca, sa = math.cos(angle), math.sin(angle)
    out = [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]
    return [np.round(np.array(out) * 16).astype(np.int32)]  # 4 fractional bits


def _draw(
    canvas: np.ndarray, kind: str, cx: float, cy: float, r: float, angle: float, aspect: float, value, aa: bool
) -> None:
    """Draw one filled shape into ``canvas`` (an image with colour value, or a mask with a class id)."""
    line = cv2.LINE_AA if aa else cv2.LINE_8
    sh = 4  # fractional bits used by cv2's shift argument
    c = (int(round(cx * 16)), int(round(cy * 16)))
    if kind == "circle":
        cv2.circle(canvas, c, int(round(r * 16)), value, -1, line, sh)
    elif kind == "ellipse":
        axes = (int(round(r * 16)), int(round(r * 16 * aspect * 0.55)))
        cv2.ellipse(canvas, c, axes, math.degrees(angle), 0, 360, value, -1, line, sh)
    elif kind == "ring":
        cv2.circle(canvas, c, int(round(r * 16)), value, -1, line, sh)
    else:
        cv2.fillPoly(canvas, _polygon(kind, cx, cy, r, angle, aspect), value, line, sh)


class SyntheticShapes(SegDataset):
    """``num_samples`` procedurally drawn images of ``image_size`` (h, w), deterministic in (seed, split, index)."""

    def __init__(
        self,
        num_samples: int,
        image_size: tuple[int, int],
        num_classes: int = 6,
        split: str = "train",
        seed: int = 0,
        transform=None,
        aug_seed: int = 0,
        cache: bool = True,
        colour_cue: float = 0.75,
    ):
        super().__init__(transform, aug_seed)
        if num_classes < 2:
            raise ConfigError(f"data=synthetic needs data.num_classes >= 2, got {num_classes}")
        self.num_samples, self.image_size, self.num_classes = num_samples, tuple(image_size), num_classes
        self.split_id, self.content_seed = _SPLIT_IDS[split], seed
        # beyond the 8 drawn classes, extra classes exist but never appear (e.g. num_classes=21 to mimic VOC's head)
        self.class_names = (CLASS_NAMES + [f"class{i}" for i in range(MAX_CLASSES, num_classes)])[:num_classes]
        self.palette = np.concatenate([PALETTE, default_palette(max(num_classes, MAX_CLASSES))[MAX_CLASSES:]])[
            :num_classes
        ]
        self.colour_cue = colour_cue
        # each loader process keeps what it generated: CACHE_BYTES in all, shared out among the loader workers
        self._sample_bytes = self.image_size[0] * self.image_size[1] * 4  # RGB + mask, uint8
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = {} if cache else None

    def __len__(self) -> int:
        return self.num_samples

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        sample = self.generate(index)
        if self._cache is not None and (len(self._cache) + 1) * self._sample_bytes <= self._cache_share():
            self._cache[index] = sample
        return sample

    @staticmethod
    def _cache_share() -> int:

        info = get_worker_info()  # None in the main process (data.num_workers=0)
        return CACHE_BYTES // (info.num_workers if info is not None else 1)

    def generate(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.content_seed, self.split_id, index])
        h, w = self.image_size
        image = _texture(rng, h, w)
        mask = np.zeros((h, w), np.uint8)
        shapes = SHAPES[: self.num_classes - 1]
        short = min(h, w)
        for _ in range(int(rng.integers(1, 5))):
            cls = int(rng.integers(len(shapes)))
            kind = shapes[cls]
            r = short * rng.uniform(0.2, 0.55) / 2 * 1.4  # radius: the shape spans ~20%-55% of the short side
            cx, cy = rng.uniform(0.1 * w, 0.9 * w), rng.uniform(0.1 * h, 0.9 * h)
            angle, aspect = rng.uniform(0, 2 * math.pi), rng.uniform(0.6, 1.0)
            shape_mask = np.zeros((h, w), np.uint8)
            _draw(shape_mask, kind, cx, cy, r, angle, aspect, 255, aa=True)
            if kind == "ring":  # punch the hole
                _draw(shape_mask, "circle", cx, cy, r * rng.uniform(0.45, 0.65), 0, 1, 0, aa=True)
            u = rng.random()
            if u < self.colour_cue:  # the class's own hue (a cue that is right only some of the time)
                hue = (cls * 180 / len(SHAPES) + rng.uniform(-8, 8)) % 180
                hsv = np.array([[[hue, rng.uniform(150, 255), rng.uniform(140, 255)]]], np.float32).astype(np.uint8)
                paint = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)
            elif u < self.colour_cue + 0.1:  # a textured shape
                paint = _texture(rng, h, w, contrast=0.6)
            else:  # a random flat colour, kept apart from the background under it
                under = image[int(min(cy, h - 1)), int(min(cx, w - 1))]
                paint = rng.integers(0, 256, size=3).astype(np.float32)
                while np.abs(paint - under).max() < 60:
                    paint = rng.integers(0, 256, size=3).astype(np.float32)
            x, y, bw, bh = cv2.boundingRect(shape_mask)  # blend inside the shape's box only (alpha is 0 outside)
            box = (slice(y, y + bh), slice(x, x + bw))
            alpha = shape_mask[box].astype(np.float32)[..., None] / 255.0
            image[box] = image[box] * (1 - alpha) + (paint[box] if paint.ndim == 3 else paint) * alpha
            mask[box][shape_mask[box] >= 128] = cls + 1
        image = image + rng.normal(0, 4, size=image.shape).astype(np.float32)
        return np.clip(image, 0, 255).astype(np.uint8), mask


def build(cfg: DictConfig, seed: int, train: bool = True) -> tuple[SegDataset, SegDataset]:
    """The built-in set's (train, val) for the data config ``cfg``; ``seed`` seeds augmentation."""
    size = as_hw(cfg.image_size, "data.image_size")
    common = dict(image_size=size, num_classes=mask_classes(cfg.num_classes), seed=cfg.seed, aug_seed=seed)
    train = SyntheticShapes(cfg.num_train, split="train", transform=transforms.synthetic_train(cfg), **common)
    val = SyntheticShapes(cfg.num_val, split="val", transform=None, **common)
    return train, val
