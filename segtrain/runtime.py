"""Where and how the numbers are computed: device, precision, autocast, batches on the device, seeds.  Shared by
training, ``segtrain-eval`` and prediction.  (The training loop's stop signals: :mod:`segtrain.signals`.)"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from segtrain.errors import ConfigError

log = logging.getLogger("segtrain")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 instructions (AVX512-BF16 or AMX), where bf16 autocast is fast."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        fn = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        return bool(fn and fn())


def _value(x) -> str:
    return str(x.value if hasattr(x, "value") else x)


def resolve_device(cfg: DictConfig) -> tuple[torch.device, str]:
    """(device, precision) from ``cfg.device``, with the auto rules applied."""
    kind = _value(cfg.type)
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available here; use device=auto or device=cpu")
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(kind)
    precision = _value(cfg.precision)
    if precision == "auto":
        if device.type == "cuda":
            precision = "fp16"
        else:
            precision = "bf16" if cpu_has_native_bf16() else "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("device.precision=bf16 but this GPU has no bf16 support; use device.precision=fp16")
    return device, precision


def configure_backends(device: torch.device, deterministic: bool, cudnn_benchmark: bool) -> None:
    """Deterministic algorithms, or cuDNN autotuning and TF32 matmuls on CUDA.  Determinism and autotuning are
    set either way: jobs of a sweep run one after another in one process, and one job's must not leak into the
    next (TF32 is deterministic too)."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if deterministic or torch.are_deterministic_algorithms_enabled():  # else already off: the call would only
        torch.use_deterministic_algorithms(deterministic, warn_only=True)  # import torch._inductor (seconds on a CPU)
    torch.backends.cudnn.benchmark = cudnn_benchmark and not deterministic and device.type == "cuda"
    if device.type == "cuda" and not deterministic:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast(device: torch.device, precision: str):
    """The autocast context for ``precision`` (fp32: disabled)."""
    return torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "fp32")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile / DDP wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class BatchToDevice:
    """Images -> normalised float on the device (in ``memory_format``); masks -> int64.

    ``(x / r - mean) / std`` per band, with ``r`` the image type's range: 255 for uint8, 65535 for uint16,
    1 for float images (``data.mean`` / ``data.std`` are in those units).  Images travel in their own type
    (uint8 moves 4x fewer bytes than float32) and are converted on the device."""

    RANGES = {torch.uint8: 255.0, torch.uint16: 65535.0}

    def __init__(self, device: torch.device, mean, std, memory_format=torch.contiguous_format):
        self.device, self.memory_format = device, memory_format
        self.mean = torch.tensor([float(v) for v in mean], device=device).view(1, -1, 1, 1)
        self.std = torch.tensor([float(v) for v in std], device=device).view(1, -1, 1, 1)
        self.shift = -self.mean / self.std
        self._scales: dict[torch.dtype, torch.Tensor] = {}  # 1 / (range x std), per image type

    def _scale(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._scales:
            self._scales[dtype] = 1.0 / (self.RANGES.get(dtype, 1.0) * self.std)
        return self._scales[dtype]

    def images(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True)
        if x.shape[1] != self.mean.shape[1]:
            raise ConfigError(
                f"the images have {x.shape[1]} band(s) but data.mean / data.std have {self.mean.shape[1]} values; "
                f"set data.in_channels={x.shape[1]} and data.mean / data.std to match (or auto)"
            )
        x = x.float() * self._scale(x.dtype) + self.shift
        return x.contiguous(memory_format=self.memory_format)

    def __call__(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images(images), masks.to(self.device, non_blocking=True).long()
