"""The data card: one picture of a data set's fingerprint and plan, drawn with OpenCV.

:func:`write_card` writes a ``CARD_WIDTH`` x ``CARD_HEIGHT`` PNG: a title, the fingerprint and the plan in
text (:func:`segtrain.data.fingerprint.describe`, :meth:`segtrain.data.plan.Plan.lines`), class frequency
bars (share of the pixels and of the images, in the class colours), a histogram of image heights and
widths, and a grid of up to 8 samples with their masks over them (class colours, outlines; ignored pixels
white).  ``segtrain-data inspect`` writes it; a training run can write the same into its run dir.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from segtrain.data.fingerprint import class_name, describe
from segtrain.data.palette import default_palette
from segtrain.outputs import display_rgb, overlay, write_png

CARD_WIDTH = 1000
TITLE_H, LINE_H, TEXT_LINES = 30, 15, 20
CHART_H = 250
TILE_W, TILE_H, COLS, ROWS = 242, 182, 4, 2
GRID_H = ROWS * (TILE_H + 6) + 8
CARD_HEIGHT = TITLE_H + TEXT_LINES * LINE_H + 10 + CHART_H + GRID_H
MAX_BARS = 13
FONT = cv2.FONT_HERSHEY_SIMPLEX
GREY, BLACK = (110, 110, 110), (20, 20, 20)


def _text(
    canvas: np.ndarray, text: str, xy: tuple[int, int], scale: float = 0.38, colour=BLACK, width: int = 0
) -> None:
    """``text`` at ``xy`` (bottom left), cut with '...' to fit ``width`` pixels when given."""
    if width:
        while len(text) > 4 and cv2.getTextSize(text, FONT, scale, 1)[0][0] > width:
            text = text[: int(len(text) * 0.9) - 3] + "..."
    cv2.putText(canvas, text, xy, FONT, scale, colour, 1, cv2.LINE_AA)


def _palette(fp: dict) -> np.ndarray:
    pal = default_palette(256)
    if fp.get("palette"):
        given = np.asarray(fp["palette"], np.uint8).reshape(-1, 3)[:256]
        pal[: len(given)] = given
    return pal


def _fit(img: np.ndarray, mask: np.ndarray, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    s = min(w / img.shape[1], h / img.shape[0])
    size = (max(1, round(img.shape[1] * s)), max(1, round(img.shape[0] * s)))
    inter = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    return cv2.resize(img, size, interpolation=inter), cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)


def _class_bars(canvas: np.ndarray, fp: dict, x0: int, y0: int, width: int) -> None:
    train = fp["splits"].get("train") or fp["splits"]["val"]
    masks, pal = train["masks"], _palette(fp)
    ignore = masks["ignore_index"]
    vals = [(int(v), e) for v, e in masks["values"].items()]
    vals.sort(key=lambda x: (x[0] == ignore, -x[1]["pixels"]))
    total, n_masks = max(1, masks["pixels"]), max(1, masks["images"])
    _text(
        canvas,
        f"classes in the training masks: share of pixels (bar) and of images ({masks['images']} masks)",
        (x0, y0 + 12),
        0.4,
    )
    label_w, bar_w, row = 150, width - 150 - 150, (CHART_H - 40) // (MAX_BARS + 1)
    top = max((e["pixels"] for _, e in vals), default=1)
    for i, (v, e) in enumerate(vals[:MAX_BARS]):
        y = y0 + 24 + i * row
        name = "ignored" if v == ignore else class_name(fp, v)
        _text(canvas, name, (x0, y + row - 4), 0.36, width=label_w - 6)
        length = max(1, round(bar_w * e["pixels"] / top))
        colour = (200, 200, 200) if v == ignore else tuple(int(c) for c in pal[v])
        cv2.rectangle(canvas, (x0 + label_w, y + 2), (x0 + label_w + length, y + row - 2), colour, -1)
        cv2.rectangle(canvas, (x0 + label_w, y + 2), (x0 + label_w + length, y + row - 2), GREY, 1)
        share = f"{100 * e['pixels'] / total:.3g}% px, {100 * e['images'] / n_masks:.0f}% img"
        _text(canvas, share, (x0 + label_w + length + 4, y + row - 4), 0.34)
    if len(vals) > MAX_BARS:
        _text(canvas, f"+ {len(vals) - MAX_BARS} more values", (x0, y0 + 24 + MAX_BARS * row + row - 4), 0.36, GREY)


def _size_histogram(canvas: np.ndarray, fp: dict, x0: int, y0: int, width: int) -> None:
    train = fp["splits"].get("train") or fp["splits"]["val"]
    sizes = train.get("sizes")
    _text(canvas, "image sizes of the training set: height (blue), width (orange)", (x0, y0 + 12), 0.4)
    if not sizes:
        return
    hist = sizes["histogram"]
    counts_h, counts_w, edges = hist["h"], hist["w"], hist["edges"]
    plot_h, base = CHART_H - 80, y0 + CHART_H - 40
    peak = max(1, *counts_h, *counts_w)
    step = (width - 20) / len(counts_h)
    for i, (ch, cw) in enumerate(zip(counts_h, counts_w)):
        x = x0 + 10 + int(i * step)
        for k, (n, colour) in enumerate(((ch, (31, 119, 180)), (cw, (255, 127, 14)))):
            if n:
                top = base - max(1, round(plot_h * n / peak))
                cv2.rectangle(canvas, (x + k * int(step / 2), top), (x + (k + 1) * int(step / 2) - 1, base), colour, -1)
    cv2.line(canvas, (x0 + 10, base), (x0 + width - 10, base), BLACK, 1)
    _text(canvas, f"{edges[0]:g} px", (x0 + 4, base + 14), 0.34)
    _text(canvas, f"{edges[-1]:g} px", (x0 + width - 60, base + 14), 0.34)
    h, w = sizes["median_hw"]
    _text(canvas, f"median {h}x{w} (h x w), {sizes['images']} images; peak bin {peak}", (x0 + 4, base + 28), 0.36)


def _samples(canvas: np.ndarray, fp: dict, samples: list, y0: int) -> None:
    pal, ignore = _palette(fp), fp.get("ignore_index", 255)
    for k, (image, mask) in enumerate(samples[: COLS * ROWS]):
        img, m = _fit(display_rgb(image), np.asarray(mask, np.uint8), TILE_W, TILE_H)
        tile = overlay(img, m, pal, ignore, alpha=0.45, outline=True)
        r, c = divmod(k, COLS)
        y = y0 + r * (TILE_H + 6) + (TILE_H - tile.shape[0]) // 2
        x = 6 + c * (TILE_W + 6) + (TILE_W - tile.shape[1]) // 2
        canvas[y : y + tile.shape[0], x : x + tile.shape[1]] = tile


def card_image(fp: dict, plan: Any = None, samples: list | None = None, title: str | None = None) -> np.ndarray:
    """The card as an HxWx3 uint8 RGB array (``CARD_HEIGHT`` x ``CARD_WIDTH``); ``plan``: a Plan or None;
    ``samples``: (image, mask) pairs as read (any bands and type)."""
    canvas = np.full((CARD_HEIGHT, CARD_WIDTH, 3), 255, np.uint8)
    cv2.rectangle(canvas, (0, 0), (CARD_WIDTH, TITLE_H - 4), (235, 240, 250), -1)
    _text(canvas, title or f"data card: {fp.get('layout') or 'data'}", (8, 19), 0.55, width=CARD_WIDTH - 16)
    lines = describe(fp) + (plan.lines() if plan is not None else [])
    for i, line in enumerate(lines[:TEXT_LINES]):
        colour = (150, 70, 0) if line.startswith("plan") else BLACK
        _text(canvas, line, (8, TITLE_H + (i + 1) * LINE_H - 3), 0.36, colour, width=CARD_WIDTH - 16)
    if len(lines) > TEXT_LINES:
        _text(
            canvas,
            f"... {len(lines) - TEXT_LINES} more lines",
            (CARD_WIDTH - 160, TITLE_H + TEXT_LINES * LINE_H - 3),
            0.36,
            GREY,
        )
    y = TITLE_H + TEXT_LINES * LINE_H + 10
    cv2.line(canvas, (0, y - 5), (CARD_WIDTH, y - 5), (220, 220, 220), 1)
    _class_bars(canvas, fp, 8, y, 580)
    _size_histogram(canvas, fp, 600, y, CARD_WIDTH - 608)
    _samples(canvas, fp, list(samples or []), y + CHART_H)
    return canvas


def write_card(fingerprint: dict, plan: Any, samples: list | None, path: str | Path, title: str | None = None) -> Path:
    """Write :func:`card_image` as a PNG at ``path`` (atomically); returns the path."""
    path = Path(path)
    write_png(path, card_image(fingerprint, plan, samples, title))
    return path


def card_samples(dataset: Any, n: int = COLS * ROWS) -> list[tuple[np.ndarray, np.ndarray]]:
    """Up to ``n`` (image, mask) pairs of ``dataset``, evenly spread over it, read as stored (no augmentation)."""
    if dataset is None or len(dataset) == 0:
        return []
    idx = sorted({int(i) for i in np.linspace(0, len(dataset) - 1, min(n, len(dataset)))})
    if hasattr(dataset, "read_image") and hasattr(dataset, "read_mask"):
        return [(dataset.read_image(i), dataset.read_mask(i)) for i in idx]
    return [dataset.load(i) for i in idx]
