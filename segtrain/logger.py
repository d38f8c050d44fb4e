"""Run outputs: TensorBoard scalars/images/hparams, metrics.json, the per-class table."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch


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
    """Write JSON atomically (NaN becomes null)."""

    def clean(x):
        if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
            return None
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(clean(obj), indent=2) + "\n")
    os.replace(tmp, path)


def overlay(images: torch.Tensor, labels: torch.Tensor, palette: np.ndarray, ignore_index: int, alpha: float = 0.6) -> torch.Tensor:
    """uint8 [N,3,H,W] images blended with class colours of [N,H,W] labels (ignore pixels stay white-ish)."""
    pal = torch.as_tensor(palette, dtype=torch.float32, device=labels.device)
    lab = labels.long()
    ignore = (lab == ignore_index) | (lab < 0) | (lab >= len(pal))
    colours = pal[lab.clamp(0, len(pal) - 1)].permute(0, 3, 1, 2)
    colours[ignore.unsqueeze(1).expand_as(colours)] = 255.0
    out = images.float() * (1 - alpha) + colours * alpha
    return out.clamp(0, 255).to(torch.uint8)


def default_palette(num_classes: int) -> np.ndarray:
    """The PASCAL VOC bit-interleaved colour map."""
    pal = np.zeros((num_classes, 3), np.uint8)
    for i in range(num_classes):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


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
