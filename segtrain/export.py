"""A trained network for deployment: ONNX or TorchScript with dynamic sizes, checked against PyTorch (what the
``segtrain-export`` command, :mod:`segtrain.apps.export`, runs).

The exported graph takes float32 NCHW RGB input normalised as in training, ``(pixel / range - mean) / std``
(range 255 for 8-bit images, 65535 for 16-bit, 1 for float), of any batch, height and width, and returns
logits ``[N, num_classes, H, W]`` (one whole-image forward pass; the checkpoint's eval settings and
``data.val_size`` are recorded in the sidecar, not baked in).

* ONNX: ``torch.onnx.export`` (torch.export based, opset >= 18) with dynamic batch, height and width.
* TorchScript: ``torch.jit.trace``; the networks take their size-dependent paths while traced
  (:func:`segtrain.models.blocks.tracing`), so every pad, crop and resize follows the input.

PSPNet's pyramid pooling (``nn.AdaptiveAvgPool2d`` with 2x2, 3x3 and 6x6 bins) is replaced for export by
:class:`AdaptiveAvgPool2dDynamic`: the same bins (torch's boundaries ``floor(i*H/b)`` .. ``ceil((i+1)*H/b)``)
as two matrix products whose matrices are built from the runtime height and width, so the bins follow
the input size (a plain export would freeze them at the example's size).

Every export checks itself: the file is loaded back (onnxruntime / ``torch.jit.load``) and run next to the
PyTorch network at ``check_sizes`` (batch 1 and 2); the largest absolute logit difference is printed and
must be ``<= tolerance`` (1e-3, fp32), else the command fails (exit code 6) and leaves no file behind.
``FILE.json`` beside the file holds what a deployment needs: mean, std, class names, palette, the input
and output spec, the checkpoint's eval settings and the check's numbers.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.export import Dim

from segtrain.console import first_line
from segtrain.data import mask_classes
from segtrain.errors import ExportError, cause_chain
from segtrain.evaluation import class_names
from segtrain.predict import checkpoint_palette
from segtrain.utils import as_hw
from segtrain.version import __version__

log = logging.getLogger("segtrain")

EXAMPLE_SHAPE = (2, 3, 67, 93)  # traced example: batch 2 and sizes that are multiples of nothing (no special cases)
INPUT_NAME, OUTPUT_NAME = "image", "logits"
MIN_SIZE = 32  # the smallest height and width the exported graph is made for


def _bin_matrix(n, bins: int, like: torch.Tensor) -> torch.Tensor:
    """[bins, n]: row i averages input positions floor(i*n/bins) .. ceil((i+1)*n/bins) - 1 (torch's bins).

    Integer arithmetic on non-negative values only: exported graphs divide integers by truncation."""

    i = torch.arange(bins, device=like.device)
    start = (i * n) // bins
    end = ((i + 1) * n + bins - 1) // bins
    pos = torch.arange(n, device=like.device)
    inside = (pos[None, :] >= start[:, None]) & (pos[None, :] < end[:, None])
    return inside.to(like.dtype) / (end - start)[:, None].to(like.dtype)


class AdaptiveAvgPool2dDynamic(nn.Module):
    """``nn.AdaptiveAvgPool2d(output_size)`` as ``A_h @ x @ A_w^T`` with bin matrices built from the input's
    runtime size: exported, its bins follow the input size (the same numbers as torch's, up to rounding)."""

    def __init__(self, output_size):
        super().__init__()
        size = output_size if isinstance(output_size, (tuple, list)) else (output_size, output_size)
        self.bins = (int(size[0]), int(size[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _bin_matrix(x.shape[-2], self.bins[0], x)
        cols = _bin_matrix(x.shape[-1], self.bins[1], x)
        return rows @ x @ cols.transpose(0, 1)


def exportable(model: nn.Module) -> nn.Module:
    """A CPU fp32 eval-mode copy of ``model`` whose adaptive average pools (other than global ones) follow
    the input size when exported."""

    model = copy.deepcopy(model).float().cpu().eval()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.AdaptiveAvgPool2d):
                size = child.output_size
                sizes = size if isinstance(size, (tuple, list)) else (size, size)
                if None in sizes:
                    raise ExportError(f"nn.AdaptiveAvgPool2d({size}) with a free dimension cannot be exported")
                if tuple(sizes) != (1, 1):  # a global pool exports as it is
                    setattr(parent, name, AdaptiveAvgPool2dDynamic(sizes))
    return model


def _reraise_interrupt(e: BaseException) -> None:
    """A KeyboardInterrupt when ``e`` is the exporter's own error wrapped around one (its ``__cause__`` or
    ``__context__`` chain): a Ctrl-C, not a network that cannot be exported."""
    for seen in cause_chain(e, 20):
        if isinstance(seen, KeyboardInterrupt):
            raise seen


def _example(channels: int) -> torch.Tensor:

    return torch.randn(EXAMPLE_SHAPE[0], channels, *EXAMPLE_SHAPE[2:])


def export_onnx(model: nn.Module, path: Path, opset: int, metadata: dict[str, str], channels: int = 3) -> int:
    """Write ``model`` (from :func:`exportable`) as ONNX with dynamic batch, height and width; the opset written."""

    # min 32: every network pools its input at least 32x (a guard a smaller range would trip, sending the
    # exporter to a slower fallback strategy)
    dims = {0: Dim("batch"), 2: Dim("height", min=MIN_SIZE), 3: Dim("width", min=MIN_SIZE)}
    example = _example(channels)
    quiet = io.StringIO()
    try:
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet), _quiet_loggers():
            program = torch.onnx.export(
                model,
                (example,),
                None,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                dynamo=True,
                dynamic_shapes=(dims,),
                verbose=False,
            )
    except Exception as e:  # the exporter names the construct it cannot express
        log.debug("ONNX export output:\n%s", quiet.getvalue())
        _reraise_interrupt(e)
        raise ExportError(
            f"the network cannot be exported to ONNX ({type(e).__name__}: {first_line(e, 200)}); format=torchscript "
            "traces it instead (timm encoders of 4 levels, such as ConvNeXt and Swin, need that)"
        ) from None
    log.debug("ONNX export output:\n%s", quiet.getvalue())
    written = int(program.model.opset_imports.get("", opset))
    for key, value in metadata.items():
        program.model.metadata_props[key] = value
    program.save(str(path))
    return written


def export_torchscript(model: nn.Module, path: Path, channels: int = 3) -> None:
    """Trace ``model`` (from :func:`exportable`) with torch.jit.trace and save it."""

    example = _example(channels)
    try:
        with _quiet_loggers(), torch.no_grad():
            traced = torch.jit.trace(model, example, check_trace=False)
    except Exception as e:
        _reraise_interrupt(e)
        raise ExportError(
            f"the network cannot be traced to TorchScript: {type(e).__name__}: {first_line(e, 200)}"
        ) from None
    traced.save(str(path))  # an OSError (a full disk) is no tracing error


@contextlib.contextmanager
def _quiet_loggers():
    """The exporter's and its optimizer's INFO lines stay out of the console (they go to the debug log)."""

    loggers = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _runner(path: Path, fmt: str):
    """A function numpy NCHW float32 -> numpy logits that runs the exported file."""

    if fmt == "onnx":
        import onnxruntime as ort  # an optional dependency (segtrain[export]): only for format=onnx

        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - e.g. an opset newer than this onnxruntime knows
            raise ExportError(
                f"onnxruntime {ort.__version__} cannot load the exported file ({first_line(e, 200)}); "
                "try a lower opset="
            ) from None
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[0], f"onnxruntime {ort.__version__}"
    with _quiet_loggers():
        module = torch.jit.load(str(path), map_location="cpu").eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()

    return run, f"torch.jit {torch.__version__}"


def check_export(path: Path, fmt: str, model: nn.Module, sizes: list, tolerance: float, channels: int = 3) -> dict:
    """Run the exported file and ``model`` (fp32, CPU) on the same random inputs at ``sizes`` (the second
    one with batch 2); the largest absolute difference per size, and whether all are within ``tolerance``."""

    run, runtime = _runner(path, fmt)
    model = copy.deepcopy(model).float().cpu().eval()
    g = torch.Generator().manual_seed(0)
    results = []
    for k, size in enumerate(sizes):
        h, w = as_hw(size, "check_sizes")
        x = torch.randn(2 if k == 1 else 1, channels, h, w, generator=g)
        with torch.no_grad():
            ref = model(x)
        try:
            out = run(x.numpy())
        except Exception as e:
            raise ExportError(
                f"the exported {fmt} model fails at input {list(x.shape)}: {first_line(e, 200)}"
            ) from None
        if tuple(out.shape) != tuple(ref.shape):
            raise ExportError(
                f"the exported {fmt} model returns shape {list(out.shape)} at input {list(x.shape)}, PyTorch "
                f"{list(ref.shape)}: its sizes do not follow the input"
            )
        results.append({"input_shape": list(x.shape), "max_abs_diff": float(np.abs(out - ref.numpy()).max())})
    largest = float(np.max([r["max_abs_diff"] for r in results]))  # NaN stays NaN (and fails)
    return {
        "runtime": runtime,
        "tolerance": tolerance,
        "max_abs_diff": largest,
        "passed": largest <= tolerance,
        "results": results,
    }


def sidecar(cfg: DictConfig, state: dict, fmt: str, path: Path, opset: int | None, check: dict) -> dict:
    """What a deployment needs to feed the exported file and read its output."""

    meta = state.get("meta", {})
    k, c = cfg.data.num_classes, cfg.data.in_channels
    return {
        "format": fmt,
        "file": path.name,
        "opset": opset,
        "input": {
            "name": INPUT_NAME,
            "layout": "NCHW",
            "dtype": "float32",
            "shape": ["batch", c, "height", "width"],
            "channels": "RGB" if c == 3 else f"{c} bands, in the order training read them",
            "normalisation": "(pixel / range - mean) / std per channel, range = 255 for 8-bit images, 65535 "
            "for 16-bit, 1 for float",
            "dynamic_axes": ["batch", "height", "width"],
        },
        "output": {
            "name": OUTPUT_NAME,
            "layout": "NCHW",
            "dtype": "float32",
            "shape": ["batch", k, "height", "width"],
            "meaning": "class scores (logits) at the input size; argmax over axis 1 gives the class map"
            if k > 1
            else f"one logit at the input size: sigmoid(logit) > {cfg.eval.threshold} is the foreground (class 1)",
        },
        "mean": list(cfg.data.mean),
        "std": list(cfg.data.std),
        "num_classes": k,
        "class_names": class_names(None, mask_classes(k), cfg.data.class_names or meta.get("class_names")),
        "palette": checkpoint_palette(cfg, meta).tolist(),
        "ignore_index": cfg.data.ignore_index,
        "val_size": OmegaConf.to_container(cfg.data)["val_size"],
        "eval": OmegaConf.to_container(cfg.eval),
        "model": OmegaConf.to_container(cfg.model),
        "step": state.get("step"),
        "check": check,
        "segtrain_version": __version__,
        "torch_version": torch.__version__,
    }
