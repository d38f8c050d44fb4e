"""Run outputs: metrics.json, the per-class table, and the pictures (confusion matrix, per-class IoU bars,
prediction grid with error maps) drawn with OpenCV.

The experiment loggers (TensorBoard, CSV, W&B, MLflow) are in :mod:`segtrain.loggers`."""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from segtrain.console import is_terminal
from segtrain.utils import atomic_write

log = logging.getLogger("segtrain")


def bars_wanted(enabled: bool) -> bool:
    """Progress bars only on a terminal that can redraw them (not a pipe or file, TERM=dumb or NO_COLOR);
    otherwise the trainer logs a plain line every ``trainer.log_interval`` steps."""

    dumb = os.environ.get("TERM") == "dumb" or "NO_COLOR" in os.environ
    return enabled and not dumb and is_terminal(sys.stderr)  # sys.stderr is None after `2>&-`


def format_table(metrics: dict, class_names: list[str]) -> str:
    """The per-class table, values in percent; absent classes show as '-'."""

    def pct(v: float | None) -> str:
        return "    -" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:6.2f}"

    width = max(10, *(len(n) for n in class_names))
    lines = [f"{'class':<{width}}    IoU    Acc   Dice", "-" * (width + 22)]
    for i, name in enumerate(class_names):
        lines.append(f"{name:<{width}} {pct(metrics['iou'][i])} {pct(metrics['acc'][i])} {pct(metrics['dice'][i])}")
    lines.append("-" * (width + 22))
    lines.append(
        f"{'mean':<{width}} {pct(metrics['miou'])} {pct(metrics['macc'])} {pct(metrics['mdice'])}   aAcc {pct(metrics['aacc']).strip()}"
    )
    return "\n".join(lines)


DISPLAY_PERCENTILES = (2, 98)  # the stretch of images that are not 8-bit (as GIS viewers show rasters)


def display_rgb(image: np.ndarray) -> np.ndarray:
    """An HxWx3 uint8 RGB picture of an HxW or HxWxC image of any bands and type: what overlays, the data card
    and the validation pictures show.  The first three bands (fewer than three: the first, as gray); an 8-bit
    image as it is; any other type (16-bit, float) with each band stretched from its 2nd to its 98th
    percentile (:data:`DISPLAY_PERCENTILES`) to 0..255: a few extreme pixels do not darken the rest."""
    img = image if image.ndim == 3 else image[..., None]
    x = img[..., :3] if img.shape[2] >= 3 else np.repeat(img[..., :1], 3, axis=2)
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    x = x.astype(np.float32)
    lo, hi = np.percentile(x, DISPLAY_PERCENTILES, axis=(0, 1))
    return np.clip((x - lo) / np.maximum(hi - lo, 1e-12) * 255, 0, 255).round().astype(np.uint8)


def display_images(images: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] images of any bands and type as uint8 RGB [N, 3, H, W] (:func:`display_rgb`, image by
    image), for the validation pictures."""
    if images.dtype == torch.uint8 and images.shape[1] == 3:
        return images
    shown = [display_rgb(image.permute(1, 2, 0).numpy()) for image in images.cpu()]
    return torch.from_numpy(np.stack(shown)).permute(0, 3, 1, 2).contiguous()


def overlay(
    image: np.ndarray, mask: np.ndarray, palette, ignore_index: int, alpha: float = 0.6, outline: bool = False
) -> np.ndarray:
    """``image`` (HxWx3 uint8 RGB) blended with the class colours of ``mask`` (HxW class indices): every pixel
    ``(1 - alpha) x image + alpha x colour``, where ignored pixels (``ignore_index``, or a value the palette has
    no colour for) take white; a black class colour (VOC's background) darkens.  ``outline``: each class's
    outline drawn in its colour too, black classes and ignored pixels aside (the data card's small tiles).
    Prediction overlays, the validation pictures (:func:`prediction_grid`) and the data card draw with it."""
    pal = np.asarray(palette, np.float32)
    lab = np.asarray(mask).astype(np.int64)
    ignore = (lab == ignore_index) | (lab < 0) | (lab >= len(pal))
    colours = pal[np.clip(lab, 0, len(pal) - 1)]
    colours[ignore] = 255.0
    out = image.astype(np.float32) * np.float32(1 - alpha) + colours * np.float32(alpha)
    out = np.clip(out, 0, 255).astype(np.uint8)
    if outline:
        for v in np.unique(lab[~ignore]).tolist():
            if pal[v].any():
                contours, _ = cv2.findContours((lab == v).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
                cv2.drawContours(out, contours, -1, tuple(int(c) for c in pal[v]), 1)
    return out


def _overlays(images: torch.Tensor, labels: torch.Tensor, palette, ignore_index: int) -> torch.Tensor:
    """:func:`overlay` of a batch: uint8 [N, 3, H, W] images, [N, H, W] labels."""
    pictures = [
        overlay(image.permute(1, 2, 0).cpu().numpy(), label.cpu().numpy(), palette, ignore_index)
        for image, label in zip(images, labels)
    ]
    return torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).to(images.device)


def error_map(images: torch.Tensor, masks: torch.Tensor, pred: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """uint8 [N,3,H,W]: the image in dim grey where the prediction is right, red where it is wrong, white
    where the ground truth is ignored."""
    grey = images.float().mean(1, keepdim=True).expand(-1, 3, -1, -1) * 0.5
    out = grey.clone()
    wrong = (pred.long() != masks.long()).unsqueeze(1).expand_as(out)
    ignored = (masks.long() == ignore_index).unsqueeze(1).expand_as(out)
    red = torch.tensor([255.0, 0.0, 0.0], device=out.device).view(1, 3, 1, 1).expand_as(out)
    out = torch.where(wrong, red, out)
    out = torch.where(ignored, torch.full_like(out, 255.0), out)
    return out.round().to(torch.uint8)


def prediction_grid(images: torch.Tensor, masks: torch.Tensor, pred: torch.Tensor, palette, ignore_index: int):
    """A CHW uint8 grid with one row per image: the input, the ground truth and the prediction as overlays,
    and the error map (red: wrong, white: ignored)."""
    pred = pred.to(masks.device)
    rows = [
        images,
        _overlays(images, masks, palette, ignore_index),
        _overlays(images, pred, palette, ignore_index),
        error_map(images, masks, pred, ignore_index),
    ]
    return image_grid(torch.stack(rows, 1).flatten(0, 1), ncol=len(rows))


def image_grid(images: torch.Tensor, ncol: int, padding: int = 2, pad_value: int = 255) -> torch.Tensor:
    """[N, C, H, W] images in rows of ``ncol``, ``padding`` pixels apart (torchvision's ``make_grid``
    layout, without importing torchvision: seconds of start-up on a small CPU)."""
    n, c, h, w = images.shape
    if n == 1:
        return images[0]
    cols, rows = min(ncol, n), -(-n // ncol)
    grid = images.new_full((c, rows * (h + padding) + padding, cols * (w + padding) + padding), pad_value)
    for k in range(n):
        y, x = (k // cols) * (h + padding) + padding, (k % cols) * (w + padding) + padding
        grid[:, y : y + h, x : x + w] = images[k]
    return grid


def _text(canvas: np.ndarray, text: str, xy: tuple[int, int], scale: float = 0.35, colour=(0, 0, 0)) -> None:

    cv2.putText(canvas, text, xy, cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)


def confusion_matrix_image(cm: torch.Tensor | np.ndarray, class_names: list[str]) -> np.ndarray:
    """The row-normalised confusion matrix (rows: ground truth, columns: prediction) as an HxWx3 uint8 RGB
    heat map.

    Up to 40 classes, each cell shows its percentage, rows carry class names and columns their first
    letters (up to 20 classes) or indices; larger matrices
    (ADE20K's 150 classes) are drawn as a plain heat map with small cells.
    """

    mat = np.asarray(cm, dtype=np.float64)
    k = mat.shape[0]
    rows = mat.sum(1, keepdims=True)
    norm = np.divide(mat, rows, out=np.zeros_like(mat), where=rows > 0)
    cell = 36 if k <= 20 else 22 if k <= 40 else max(4, 900 // k)
    labelled = k <= 40
    left = (max(len(n) for n in class_names) * 8 + 16) if labelled else 8
    top = 40
    heat = cv2.applyColorMap((norm * 255).round().astype(np.uint8), cv2.COLORMAP_VIRIDIS)
    heat = cv2.resize(heat, (k * cell, k * cell), interpolation=cv2.INTER_NEAREST)
    canvas = np.full((top + k * cell + 8, left + k * cell + 8, 3), 255, np.uint8)
    canvas[top : top + k * cell, left : left + k * cell] = heat
    _text(canvas, "rows: ground truth, columns: prediction (row-normalised)", (4, 14), 0.4)
    if labelled:
        for i, name in enumerate(class_names):
            y = top + i * cell + cell // 2 + 4
            _text(canvas, name, (4, y))
            col = name[:4] if cell >= 30 else str(i)  # short names fit above wide cells, else the index
            _text(canvas, col, (left + i * cell + 2, top - 6))
            for j in range(k):
                if mat[i, j] > 0:
                    v = norm[i, j]
                    colour = (0, 0, 0) if v > 0.5 else (255, 255, 255)
                    text = f"{100 * v:.0f}" if cell >= 30 or v >= 0.1 else ""
                    _text(canvas, text, (left + j * cell + 3, y), 0.33, colour)
    return cv2.cvtColor(canvas, cv2.COLOR_BGR2RGB)


def per_class_iou_image(iou: list[float | None], class_names: list[str], palette=None) -> np.ndarray:
    """A horizontal bar chart of per-class IoU (percent) as an HxWx3 uint8 RGB image: one bar per class in
    its palette colour, its value at the end ("-" for a class absent from ground truth and prediction),
    and the mean IoU as a vertical line."""

    k = len(class_names)
    vals = [None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in iou]
    row = 18 if k <= 40 else 10
    scale = 0.35 if k <= 40 else 0.28
    left = max(len(n) for n in class_names) * (7 if k <= 40 else 5) + 12
    plot, top = 300, 30
    canvas = np.full((top + k * row + 24, left + plot + 56, 3), 255, np.uint8)
    pal = np.asarray(palette if palette is not None else [[31, 119, 180]] * k, np.uint8)
    present = [v for v in vals if v is not None]
    miou = float(np.mean(present)) if present else float("nan")
    _text(canvas, f"per-class IoU (%), mean {100 * miou:.1f}" if present else "per-class IoU (%)", (4, 16), 0.42)
    for i, (name, v) in enumerate(zip(class_names, vals)):
        y0 = top + i * row
        _text(canvas, name, (4, y0 + row - 5), scale)
        if v is None:
            _text(canvas, "-", (left + 4, y0 + row - 5), scale)
            continue
        x1 = left + int(round(plot * min(max(v, 0.0), 1.0)))
        colour = tuple(int(c) for c in pal[i % len(pal)][::-1])  # RGB -> BGR
        cv2.rectangle(canvas, (left, y0 + 2), (max(x1, left + 1), y0 + row - 3), colour, -1)
        cv2.rectangle(canvas, (left, y0 + 2), (max(x1, left + 1), y0 + row - 3), (60, 60, 60), 1)
        _text(canvas, f"{100 * v:.1f}", (x1 + 4, y0 + row - 5), scale)
    bottom = top + k * row
    cv2.line(canvas, (left, top - 2), (left, bottom), (0, 0, 0), 1)
    for t in (0, 50, 100):
        x = left + plot * t // 100
        cv2.line(canvas, (x, bottom), (x, bottom + 4), (0, 0, 0), 1)
        _text(canvas, str(t), (x - 6, bottom + 16), 0.33)
    if present:
        x = left + int(round(plot * miou))
        for y in range(top - 2, bottom, 6):  # dashed: the mean
            cv2.line(canvas, (x, y), (x, min(y + 3, bottom)), (0, 0, 0), 1)
    return cv2.cvtColor(canvas, cv2.COLOR_BGR2RGB)


def write_png(path: str | Path, image: np.ndarray) -> None:
    """Write an HxWx3 uint8 RGB image as a PNG, atomically."""

    ok, data = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"cannot encode {path} as PNG")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data.tobytes(), durable=False)


def confusion_matrix_png(cm: torch.Tensor | np.ndarray, class_names: list[str], path: str | Path) -> None:
    """Write :func:`confusion_matrix_image` as a PNG."""
    write_png(path, confusion_matrix_image(cm, class_names))


def validation_pictures(
    loggers, run_dir, cm, metrics: dict, vis, class_names: list[str], palette, ignore_index: int, step: int
) -> None:
    """The pictures of a validation, logged as images (``val/confusion_matrix``, ``val/per_class_iou``,
    ``val/input_gt_pred``) and written to ``run_dir`` as ``confusion_matrix.png``, ``per_class_iou.png`` and
    ``predictions.png`` (rewritten at every validation, so the run dir holds the latest).  ``run_dir`` None
    (DDP ranks other than 0): nothing."""
    if run_dir is None:
        return
    pictures = {
        "confusion_matrix": confusion_matrix_image(cm, class_names),
        "per_class_iou": per_class_iou_image(metrics["iou"], class_names, palette),
    }
    if vis is not None:
        pictures["predictions"] = prediction_grid(*vis, palette, ignore_index).permute(1, 2, 0).cpu().numpy()
    tags = {
        "confusion_matrix": "val/confusion_matrix",
        "per_class_iou": "val/per_class_iou",
        "predictions": "val/input_gt_pred",
    }
    for name, image in pictures.items():
        loggers.image(tags[name], torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1), step)
        write_png(Path(run_dir) / f"{name}.png", image)


def run_hparams(cfg, max_iters: int, precision: str) -> dict[str, Any]:
    """The settings that identify a run in TensorBoard's HPARAMS tab (and other loggers)."""
    c = cfg
    return {
        "model": c.model.name,
        "backbone": str(c.model.backbone),
        "data": c.data.name,
        "optimizer": c.optimizer.name,
        "lr": c.optimizer.lr,
        "weight_decay": c.optimizer.weight_decay,
        "scheduler": c.scheduler.name,
        "batch_size": c.data.batch_size,
        "crop_size": str(c.data.crop_size),
        "max_iters": max_iters,
        "precision": precision,
        "seed": c.seed,
    }
