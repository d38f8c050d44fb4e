"""Run outputs: TensorBoard scalars/images/hparams, metrics.json, the per-class table."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segtrain.utils import atomic_write


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


def display_images(images: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] images of any bands and type as uint8 RGB [N, 3, H, W] for TensorBoard: 3-band uint8
    images as they are; otherwise the first three bands (one band: gray), each stretched per image from its
    2nd to its 98th percentile."""
    if images.dtype == torch.uint8 and images.shape[1] == 3:
        return images
    x = images[:, :3].float()
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x if x.shape[1] == 3 else x[:, :1].expand(-1, 3, -1, -1)
    flat = x.flatten(2)
    lo, hi = flat.quantile(0.02, dim=2)[..., None, None], flat.quantile(0.98, dim=2)[..., None, None]
    return ((x - lo) / (hi - lo).clamp_min(1e-12) * 255).clamp(0, 255).round().to(torch.uint8)


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
    from torchvision.utils import make_grid

    rows = [images, overlay(images, masks, palette, ignore_index), overlay(images, pred, palette, ignore_index)]
    return make_grid(torch.stack(rows, 1).flatten(0, 1), nrow=3, padding=2, pad_value=255)


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


class TensorBoard:
    """A thin SummaryWriter wrapper that can be disabled (non-zero ranks)."""

    def __init__(self, log_dir: str | Path | None):
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir))

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                self.writer.add_scalar(k, v, step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image, step)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        """Record hparams with final metrics in this run's own event file (TensorBoard's HPARAMS tab)."""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams as hp_summary

        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        metrics = {k: v for k, v in metrics.items() if v is not None and not math.isnan(v)}
        exp, ssi, sei = hp_summary(clean, metrics)
        fw = self.writer._get_file_writer()
        for s in (exp, ssi, sei):
            fw.add_summary(s)
        for k, v in metrics.items():
            self.writer.add_scalar(k, v)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
