"""Run outputs: metrics.json, the per-class table, confusion-matrix PNG, prediction grids, hparams.

The experiment loggers (TensorBoard, CSV, W&B, MLflow) are in :mod:`segtrain.loggers`."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segtrain.utils import atomic_write

log = logging.getLogger("segtrain")


def bars_wanted(enabled: bool) -> bool:
    """Progress bars only on a terminal that can redraw them (not a pipe or file, TERM=dumb or NO_COLOR);
    otherwise the trainer logs a plain line every ``trainer.log_interval`` steps."""
    dumb = os.environ.get("TERM") == "dumb" or "NO_COLOR" in os.environ
    return enabled and not dumb and sys.stderr.isatty()


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


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (NaN and inf become null)."""

    def clean(x):
        if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
            return None
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    atomic_write(path, json.dumps(clean(obj), indent=2) + "\n")


def overlay(
    images: torch.Tensor, labels: torch.Tensor, palette: np.ndarray, ignore_index: int, alpha: float = 0.6
) -> torch.Tensor:
    """uint8 [N,3,H,W] images blended with class colours of [N,H,W] labels (ignore pixels stay white-ish)."""
    pal = torch.as_tensor(palette, dtype=torch.float32, device=labels.device)
    lab = labels.long()
    ignore = (lab == ignore_index) | (lab < 0) | (lab >= len(pal))
    colours = pal[lab.clamp(0, len(pal) - 1)].permute(0, 3, 1, 2)
    colours[ignore.unsqueeze(1).expand_as(colours)] = 255.0
    out = images.float() * (1 - alpha) + colours * alpha
    return out.clamp(0, 255).to(torch.uint8)


def prediction_grid(images: torch.Tensor, masks: torch.Tensor, pred: torch.Tensor, palette, ignore_index: int):
    """A CHW uint8 grid with one row per image: the input, the ground truth and the prediction as overlays."""
    rows = [images, overlay(images, masks, palette, ignore_index), overlay(images, pred, palette, ignore_index)]
    return image_grid(torch.stack(rows, 1).flatten(0, 1), ncol=3)


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


def confusion_matrix_png(cm: torch.Tensor | np.ndarray, class_names: list[str], path: str | Path) -> None:
    """Write the row-normalised confusion matrix (rows: ground truth, columns: prediction) as a PNG heat map.

    Up to 40 classes, each cell shows its percentage, rows carry class names and columns their first
    letters (up to 20 classes) or indices; larger matrices
    (ADE20K's 150 classes) are drawn as a plain heat map with small cells.
    """
    import cv2

    mat = np.asarray(cm, dtype=np.float64)
    k = mat.shape[0]
    rows = mat.sum(1, keepdims=True)
    norm = np.divide(mat, rows, out=np.zeros_like(mat), where=rows > 0)
    cell = 36 if k <= 20 else 22 if k <= 40 else max(4, 900 // k)
    labelled = k <= 40
    left = (max(len(n) for n in class_names) * 8 + 16) if labelled else 8
    top, font = 40, cv2.FONT_HERSHEY_SIMPLEX
    heat = cv2.applyColorMap((norm * 255).round().astype(np.uint8), cv2.COLORMAP_VIRIDIS)
    heat = cv2.resize(heat, (k * cell, k * cell), interpolation=cv2.INTER_NEAREST)
    canvas = np.full((top + k * cell + 8, left + k * cell + 8, 3), 255, np.uint8)
    canvas[top : top + k * cell, left : left + k * cell] = heat
    cv2.putText(
        canvas,
        "rows: ground truth, columns: prediction (row-normalised)",
        (4, 14),
        font,
        0.4,
        (0, 0, 0),
        1,
        cv2.LINE_AA,
    )
    if labelled:
        for i, name in enumerate(class_names):
            y = top + i * cell + cell // 2 + 4
            cv2.putText(canvas, name, (4, y), font, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
            col = name[:4] if cell >= 30 else str(i)  # short names fit above wide cells, else the index
            cv2.putText(canvas, col, (left + i * cell + 2, top - 6), font, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
            for j in range(k):
                if mat[i, j] > 0:
                    v = norm[i, j]
                    colour = (0, 0, 0) if v > 0.5 else (255, 255, 255)
                    text = f"{100 * v:.0f}" if cell >= 30 or v >= 0.1 else ""
                    cv2.putText(canvas, text, (left + j * cell + 3, y), font, 0.33, colour, 1, cv2.LINE_AA)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), canvas):
        raise OSError(f"cannot write {path}")


def log_run_start(trainer) -> None:
    """The run's opening lines: network, device and precision, data and schedule, processes, run dir."""
    cfg, d, t, tr = trainer.cfg, trainer.cfg.data, trainer.cfg.trainer, trainer
    log.info(
        "model %s: %s parameters | device %s, precision %s, channels_last %s, compile %s", cfg.model.name,
        f"{tr.num_params:,}", tr.device, tr.precision, cfg.device.channels_last, cfg.device.compile,
    )  # fmt: skip
    log.info(
        "data %s: %d train / %d val images, batch %d x %d process(es) x accumulate %d = %d, %d iterations "
        "(%.1f epochs) | run dir %s", d.name, len(tr.train_set), len(tr.val_set), d.batch_size, tr.world_size,
        t.accumulate, d.batch_size * tr.world_size * t.accumulate, tr.max_iters, tr.max_iters / tr.iters_per_epoch,
        tr.run_dir,
    )  # fmt: skip
    if tr.dist.enabled:
        log.info("world size %d (backend %s, SyncBN %s)", tr.world_size, tr.dist.backend, tr.sync_bn)


def log_run_end(trainer, summary: dict) -> None:
    """The run's closing lines: the last validation's per-class table, the best mIoU, the speed, the run dir."""
    if trainer.last_metrics is not None:
        table = format_table(trainer.last_metrics, trainer.class_names)
        log.info("final validation (step %d):\n%s", trainer.step, table)
    ips = summary["train_images_per_sec"] or float("nan")
    log.info("best val mIoU %.4f | %.1f train img/s | outputs in %s", summary["best_miou"], ips, trainer.run_dir)


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
