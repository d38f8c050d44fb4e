"""Parameters, FLOPs and inference latency of a network: what ``segtrain-info`` (:mod:`segtrain.apps.info`) reports.

    segtrain-info ckpt=PATH                          # the network stored in a checkpoint (its weights loaded)
    segtrain-info model=deeplabv3plus model.backbone=resnet50 data=voc info.size=512
    segtrain-info model=pspnet model.backbone=resnet50 device=cuda info.batch_size=16

A Hydra app like ``segtrain``: ``model=`` / ``data=`` (for ``num_classes`` and the input size) /
``device=`` / ``info.*``; with ``ckpt=PATH`` the model and data config come from the checkpoint.  The data
set itself is never read.  It prints a table and writes ``info.json`` into its run dir
(``outputs/info/DATE/TIME``):

* ``params``, ``trainable_params`` and ``backbone_params``;
* ``gflops`` for one image of ``info.size`` (default ``data.crop_size``, else the synthetic
  ``data.image_size``, else 512) with ``data.in_channels`` bands in eval mode, counted by ``torch.utils.flop_counter.FlopCounterMode``: the
  matrix products and convolutions (forward and transposed), **a multiply-add counted as 2 FLOPs** (as
  torch does; mmsegmentation's ``get_flops`` and fvcore count a multiply-add as 1, so their "FLOPs" are
  ``gmacs`` here); element-wise work (normalisation, activations, interpolation, pooling) is not counted.
  ``gflops_by_module`` splits it over the network's top-level modules (backbone, heads);
* ``latency``: at batch 1 and batch ``info.batch_size``, ``info.warmup`` untimed forward passes and then
  ``info.iters`` timed ones (each followed by ``torch.cuda.synchronize`` on CUDA), in eval mode under
  ``torch.inference_mode`` with the ``device.*`` settings (precision / autocast, channels_last, compile):
  mean, median and 90th-percentile milliseconds per batch, images per second (batch / mean time) and,
  on CUDA, the peak memory.  The forward pass only: no data loading, normalisation or argmax.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from segtrain.checkpoint import load_checkpoint
from segtrain.config import validate
from segtrain.errors import ConfigError, ResourceError
from segtrain.models import min_input_size
from segtrain.models.build import build_model, checkpoint_model
from segtrain.runtime import autocast, resolve_device
from segtrain.utils import as_hw

log = logging.getLogger("segtrain")


def count_flops(model: nn.Module, x: torch.Tensor) -> tuple[int, dict[str, int]]:
    """(total FLOPs of ``model(x)``, FLOPs per top-level child module); a multiply-add counts as 2."""

    counter = FlopCounterMode(display=False, depth=2)
    with torch.no_grad(), counter:
        model(x)
    per_module, root = counter.get_flop_counts(), type(model).__name__  # keys: "UNet.backbone" ...
    children = {name: sum(per_module.get(f"{root}.{name}", {}).values()) for name, _ in model.named_children()}
    return counter.get_total_flops(), {k: v for k, v in children.items() if v}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(net, x: torch.Tensor, autocast, warmup: int, iters: int) -> dict:
    """Milliseconds per ``net(x)`` after ``warmup`` untimed calls: mean, median, p90, images/s."""
    device = x.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    with torch.inference_mode(), autocast():
        for _ in range(warmup):
            net(x)
        _sync(device)
        for _ in range(iters):
            t0 = time.perf_counter()
            net(x)
            _sync(device)
            times.append(1000 * (time.perf_counter() - t0))
    times.sort()
    mean = statistics.fmean(times)
    out = {
        "batch_size": x.shape[0],
        "ms_mean": mean,
        "ms_median": statistics.median(times),
        "ms_p90": times[min(len(times) - 1, int(0.9 * len(times)))],
        "images_per_sec": 1000 * x.shape[0] / mean,
    }
    if device.type == "cuda":
        out["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


PROBE = 64  # px: the side of the small image whose layer sizes, scaled, tell what a large one needs


def available_memory(device: torch.device) -> int | None:
    """Bytes a new allocation on ``device`` can get: free GPU memory (plus what PyTorch holds unused), or the
    machine's available RAM and free swap; None when unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return (int(fields["MemAvailable"].split()[0]) + int(fields.get("SwapFree", "0 kB").split()[0])) * 1024
    except (OSError, KeyError, ValueError):
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (OSError, ValueError, AttributeError):
            return None


def layer_bytes_per_pixel(model: nn.Module, bands: int, device: torch.device, memory_format, autocast) -> float | None:
    """Bytes per input pixel of the largest layer (its input and output together) in a forward pass of one
    image: a lower bound on the memory a forward pass needs, measured on a PROBE x PROBE image (convolutions
    scale with the pixels); None when the network does not run at that size."""
    largest = 0

    def hook(module, inputs, output) -> None:
        nonlocal largest
        tensors = (*inputs, *(output if isinstance(output, (tuple, list)) else [output]))
        largest = max(largest, sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)))

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        x = torch.zeros(1, bands, PROBE, PROBE, device=device).contiguous(memory_format=memory_format)
        with torch.inference_mode(), autocast():
            model(x)
    except Exception:  # noqa: BLE001 - no estimate: the real pass decides
        return None
    finally:
        for h in handles:
            h.remove()
    return largest / PROBE**2


def _gib(n: float) -> str:
    return f"{n / 2**40:.1f} TiB" if n >= 2**40 else f"{n / 2**30:.1f} GiB"


def check_fits(model: nn.Module, cfg: DictConfig, device: torch.device, memory_format, autocast) -> None:
    """A ResourceError (exit 5) before anything large is allocated when one image of ``info.size`` (the FLOP
    count), or a batch of ``info.batch_size`` (the latency), needs more memory than ``device`` has, by a lower
    bound (the largest layer's input and output, scaled from a small image)."""
    (h, w), i, bands = input_size(cfg), cfg.info, cfg.data.in_channels
    free = available_memory(device)
    if free is None or bands * h * w * 4 * max(1, i.batch_size if i.latency else 1) < free // 64:
        return  # unknown, or far from the limit: no probe needed
    per_pixel = layer_bytes_per_pixel(model, bands, device, memory_format, autocast)
    per_image = max(per_pixel or 0.0, bands * 4.0) * h * w * 0.9  # 0.9: sizes round down in strided layers
    where = f"{'GPU memory' if device.type == 'cuda' else 'memory (RAM + swap)'} available on {device}"
    if per_image > free:
        scale = (free / per_image) ** 0.5
        fit = f"{max(1, int(h * scale) // 32 * 32)}x{max(1, int(w * scale) // 32 * 32)}"
        raise ResourceError(
            f"one {h}x{w} image needs at least {_gib(per_image)} in a forward pass of {cfg.model.name}, more than "
            f"the {_gib(free)} of {where}: set a smaller info.size (about {fit} at most)"
        )
    if i.latency and i.batch_size * per_image > free:
        raise ResourceError(
            f"a batch of {i.batch_size} {h}x{w} images needs at least {_gib(i.batch_size * per_image)} in a forward "
            f"pass of {cfg.model.name}, more than the {_gib(free)} of {where}: set info.batch_size="
            f"{max(1, int(free // per_image))} or less (or info.latency=false)"
        )


def input_size(cfg: DictConfig) -> tuple[int, int]:
    """``info.size``, else ``data.crop_size``, else the synthetic ``data.image_size``, else 512."""
    i, d = cfg.info, cfg.data
    if i.size is not None:
        return as_hw(i.size, "info.size")
    if d.crop_size is not None:
        return as_hw(d.crop_size, "data.crop_size")
    if d.name == "synthetic":
        return as_hw(d.image_size, "data.image_size")
    return 512, 512


def checkpoint_config(cfg: DictConfig) -> tuple[DictConfig, dict]:
    """The model and data config stored in ``cfg.ckpt`` (with ``cfg``'s device and info settings), and the
    checkpoint (its weights are loaded, no pretrained download)."""
    path = Path(cfg.ckpt).expanduser()
    state, stored = load_checkpoint(path)
    out = OmegaConf.merge(stored, {"device": cfg.device})
    with open_dict(out):
        out.info, out.ckpt = cfg.info, str(path)
        out.model.pretrained, out.model.init_from = False, None
    return out, state


def model_info(cfg: DictConfig) -> dict:
    """Parameters, FLOPs and latency of the configured network, or (``cfg.ckpt``) the checkpoint's with its
    weights; see the module docstring."""
    state = None
    if cfg.ckpt is not None:
        cfg, state = checkpoint_config(cfg)
    i = cfg.info
    for key, low in (("batch_size", 1), ("warmup", 0), ("iters", 1)):
        if i[key] < low:
            raise ConfigError(f"info.{key} must be >= {low}, got {i[key]}")
    validate(cfg)
    if cfg.model.pretrained:
        with open_dict(cfg):
            cfg.model.pretrained = False  # FLOPs and latency do not depend on the weights: no download
    device, precision = resolve_device(cfg.device)
    bands = cfg.data.in_channels
    if state is None:
        model = build_model(cfg.model, cfg.data.num_classes, bands)
    else:
        model = checkpoint_model(state, cfg, cfg.ckpt)
    memory_format = torch.channels_last if cfg.device.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format).eval()
    h, w = input_size(cfg)
    need = min_input_size(cfg.model)
    if min(h, w) < need:
        raise ConfigError(
            f"info.size {h}x{w} is smaller than the {need} px model={cfg.model.name} takes: set info.size={need} or more"
        )
    check_fits(model, cfg, device, memory_format, lambda: autocast(device, precision))
    x1 = torch.randn(1, bands, h, w, device=device).contiguous(memory_format=memory_format)
    flops, by_module = count_flops(model, x1)
    backbone = getattr(model, "backbone", None)
    out = {
        "model": cfg.model.name,
        "backbone": cfg.model.backbone,
        "num_classes": cfg.data.num_classes,
        "checkpoint": cfg.ckpt,
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "backbone_params": sum(p.numel() for p in backbone.parameters()) if isinstance(backbone, nn.Module) else None,
        "input_size": [h, w],
        "in_channels": bands,
        "gflops": flops / 1e9,
        "gmacs": flops / 2e9,
        "gflops_by_module": {k: v / 1e9 for k, v in by_module.items()},
        "flop_convention": "torch.utils.flop_counter: a multiply-add is 2 FLOPs; convolutions and matrix products only",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": precision,
        "channels_last": cfg.device.channels_last,
        "compile": cfg.device.compile,
        "torch": torch.__version__,
        "latency": [],
    }
    if i.latency:
        net = torch.compile(model) if cfg.device.compile else model
        for n in sorted({1, i.batch_size}):
            x = torch.randn(n, bands, h, w, device=device).contiguous(memory_format=memory_format)
            out["latency"].append(time_forward(net, x, lambda: autocast(device, precision), i.warmup, i.iters))
    return out


def format_info(info: dict) -> str:
    h, w = info["input_size"]
    lines = [
        f"model        {info['model']}" + (f" ({info['backbone']})" if info["backbone"] else ""),
        f"parameters   {info['params']:,}"
        + (f" (backbone {info['backbone_params']:,})" if info["backbone_params"] is not None else ""),
        f"FLOPs        {info['gflops']:.2f} GFLOPs = {info['gmacs']:.2f} GMACs per {h}x{w} image (a multiply-add = 2 FLOPs)",
    ]
    if info["gflops_by_module"]:
        lines.append("             " + ", ".join(f"{k} {v:.2f}" for k, v in info["gflops_by_module"].items()))
    for r in info["latency"]:
        lines.append(
            f"batch {r['batch_size']:<6} {r['ms_mean']:8.2f} ms (median {r['ms_median']:.2f}, p90 {r['ms_p90']:.2f}) "
            f"{r['images_per_sec']:9.1f} img/s"
            + (f"  peak {r['peak_memory_mb']:.0f} MiB" if "peak_memory_mb" in r else "")
        )
    lines.append(
        f"device       {info['device_name']} ({info['device']}), {info['precision']}, channels_last "
        f"{info['channels_last']}, compile {info['compile']}, torch {info['torch']}"
    )
    return "\n".join(lines)
