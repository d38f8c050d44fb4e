"""``segtrain-export ckpt=PATH format=onnx|torchscript output=FILE``: a trained network for deployment.

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
import functools
import io
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from segtrain.cli import command
from segtrain.console import short_path
from segtrain.errors import ConfigError, ExportError, OutputError

if TYPE_CHECKING:  # torch loads when the command works, not when it starts
    import numpy as np
    import torch
    from torch import nn

log = logging.getLogger("segtrain")

EXAMPLE_SHAPE = (2, 3, 67, 93)  # traced example: batch 2 and sizes that are multiples of nothing (no special cases)
INPUT_NAME, OUTPUT_NAME = "image", "logits"
MIN_SIZE = 32  # the smallest height and width the exported graph is made for


def _bin_matrix(n, bins: int, like: torch.Tensor) -> torch.Tensor:
    """[bins, n]: row i averages input positions floor(i*n/bins) .. ceil((i+1)*n/bins) - 1 (torch's bins).

    Integer arithmetic on non-negative values only: exported graphs divide integers by truncation."""
    import torch

    i = torch.arange(bins, device=like.device)
    start = (i * n) // bins
    end = ((i + 1) * n + bins - 1) // bins
    pos = torch.arange(n, device=like.device)
    inside = (pos[None, :] >= start[:, None]) & (pos[None, :] < end[:, None])
    return inside.to(like.dtype) / (end - start)[:, None].to(like.dtype)


@functools.cache
def _pool_class() -> type:
    """:class:`AdaptiveAvgPool2dDynamic`, defined on first use: this module imports torch only when it works,
    so that the command answers ``--help`` and a Ctrl-C at once while it starts."""
    from torch import nn

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

    AdaptiveAvgPool2dDynamic.__qualname__ = "AdaptiveAvgPool2dDynamic"  # found (and pickled) as a module attribute
    return AdaptiveAvgPool2dDynamic


def __getattr__(name: str):
    if name == "AdaptiveAvgPool2dDynamic":
        return _pool_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def exportable(model: nn.Module) -> nn.Module:
    """A CPU fp32 eval-mode copy of ``model`` whose adaptive average pools (other than global ones) follow
    the input size when exported."""
    from torch import nn

    model = copy.deepcopy(model).float().cpu().eval()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.AdaptiveAvgPool2d):
                size = child.output_size
                sizes = size if isinstance(size, (tuple, list)) else (size, size)
                if None in sizes:
                    raise ExportError(f"nn.AdaptiveAvgPool2d({size}) with a free dimension cannot be exported")
                if tuple(sizes) != (1, 1):  # a global pool exports as it is
                    setattr(parent, name, _pool_class()(sizes))
    return model


def _first_line(e: BaseException) -> str:
    """The error's first line, without the terminal colour codes torch.export puts in it."""
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:200]


def _reraise_interrupt(e: BaseException) -> None:
    """A KeyboardInterrupt when ``e`` is the exporter's own error wrapped around one (its ``__cause__`` or
    ``__context__`` chain): a Ctrl-C, not a network that cannot be exported."""
    seen: BaseException | None = e
    for _ in range(20):
        if seen is None:
            return
        if isinstance(seen, KeyboardInterrupt):
            raise seen
        seen = seen.__cause__ or seen.__context__


def _example(channels: int) -> torch.Tensor:
    import torch

    return torch.randn(EXAMPLE_SHAPE[0], channels, *EXAMPLE_SHAPE[2:])


def export_onnx(model: nn.Module, path: Path, opset: int, metadata: dict[str, str], channels: int = 3) -> int:
    """Write ``model`` (from :func:`exportable`) as ONNX with dynamic batch, height and width; the opset written."""
    import torch
    from torch.export import Dim

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
            f"the network cannot be exported to ONNX ({type(e).__name__}: {_first_line(e)}); format=torchscript "
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
    import torch

    example = _example(channels)
    try:
        with _quiet_loggers(), torch.no_grad():
            traced = torch.jit.trace(model, example, check_trace=False)
    except Exception as e:
        _reraise_interrupt(e)
        raise ExportError(
            f"the network cannot be traced to TorchScript: {type(e).__name__}: {_first_line(e)}"
        ) from None
    traced.save(str(path))  # an OSError (a full disk) is no tracing error


@contextlib.contextmanager
def _quiet_loggers():
    """The exporter's and its optimizer's INFO lines stay out of the console (they go to the debug log)."""
    import warnings

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
    import torch

    if fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - e.g. an opset newer than this onnxruntime knows
            raise ExportError(
                f"onnxruntime {ort.__version__} cannot load the exported file ({_first_line(e)}); try a lower opset="
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
    import numpy as np
    import torch

    from segtrain.utils import as_hw

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
            raise ExportError(f"the exported {fmt} model fails at input {list(x.shape)}: {_first_line(e)}") from None
        if tuple(out.shape) != tuple(ref.shape):
            raise ExportError(
                f"the exported {fmt} model returns shape {list(out.shape)} at input {list(x.shape)}, PyTorch "
                f"{list(ref.shape)}: its sizes do not follow the input"
            )
        results.append({"input_shape": list(x.shape), "max_abs_diff": float(np.abs(out - ref.numpy()).max())})
    largest = float(np.max([r["max_abs_diff"] for r in results]))  # NaN stays NaN (and fails)
    return {"runtime": runtime, "tolerance": tolerance, "max_abs_diff": largest, "passed": largest <= tolerance,
            "results": results}  # fmt: skip


def sidecar(cfg: DictConfig, state: dict, fmt: str, path: Path, opset: int | None, check: dict) -> dict:
    """What a deployment needs to feed the exported file and read its output."""
    import torch

    from segtrain import __version__
    from segtrain.config import mask_classes
    from segtrain.evaluation import class_names
    from segtrain.predict import palette_of

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
        "palette": palette_of(cfg, meta).tolist(),
        "ignore_index": cfg.data.ignore_index,
        "val_size": OmegaConf.to_container(cfg.data)["val_size"],
        "eval": OmegaConf.to_container(cfg.eval),
        "model": OmegaConf.to_container(cfg.model),
        "step": state.get("step"),
        "check": check,
        "segtrain_version": __version__,
        "torch_version": torch.__version__,
    }


def _require_onnx() -> None:
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"format=onnx needs {', '.join(missing)}: pip install 'segtrain[export]'")


SUFFIXES = {"onnx": (".onnx",), "torchscript": (".pt", ".pth")}  # the first: the default file name's
MAX_CHECK_SIDE = 2048  # the self-check runs the network twice per size on the CPU, in fp32


def _target(cfg: DictConfig) -> Path:
    """The file to write: ``output`` (a folder, existing or ending in ``/``, gets ``model.onnx`` / ``model.pt``),
    else that name in the run dir.  A file name whose suffix belongs to no format's files is refused, and so is
    one without a suffix (``output=model``: a file or a folder?)."""
    from hydra.core.hydra_config import HydraConfig

    fmt = _format(cfg)
    name = f"model{SUFFIXES[fmt][0]}"
    if cfg.output is None or cfg.output == "":
        return Path(HydraConfig.get().runtime.output_dir) / name
    if not str(cfg.output).strip():
        raise ConfigError(
            f"output={cfg.output!r} is blank: give a file (model{SUFFIXES[fmt][0]}) or a folder (deploy/)"
        )
    out = os.path.expanduser(cfg.output)
    if out.endswith(("/", os.sep)) or Path(out).is_dir():
        return Path(out) / name
    suffix = Path(out).suffix
    if not suffix:
        raise ConfigError(
            f"output={cfg.output} has no file extension: name the file {out}{SUFFIXES[fmt][0]}, or write {out}/ for "
            f"a folder (which gets {name})"
        )
    if suffix.lower() not in SUFFIXES[fmt]:
        raise ConfigError(
            f"{_key(cfg)}: format={fmt} writes {' or '.join(SUFFIXES[fmt])} files, not {suffix}; "
            f"name it {Path(out).stem}{SUFFIXES[fmt][0]}, or set the format= that {suffix} stands for"
        )
    return Path(out)


def _format(cfg: DictConfig) -> str:
    return str(getattr(cfg.format, "value", cfg.format))


def opset_range() -> tuple[int, int]:
    """The ONNX opsets the installed exporter writes: 18 (torch.export's) to the installed onnx's newest (the
    exporter converts to it; asked for a newer one, it would silently write opset 18)."""
    import onnx.defs

    return 18, int(onnx.defs.onnx_opset_version())


def check_settings(cfg: DictConfig, fmt: str) -> None:
    """``opset``, ``tolerance`` and ``check_sizes`` beyond :func:`segtrain.config.validate_export`: the opsets the
    installed exporter writes, a finite tolerance of at most 1 logit, self-check sizes the CPU can run."""
    import math

    from segtrain.utils import as_hw

    if fmt == "onnx":
        low, high = opset_range()
        if not low <= cfg.opset <= high:
            raise ConfigError(
                f"opset={cfg.opset}: the installed exporter writes opset {low} to {high}; e.g. opset={low}"
            )
    if not (math.isfinite(cfg.tolerance) and 0 < cfg.tolerance <= 1):
        raise ConfigError(
            f"tolerance must be a number in (0, 1], the largest logit difference the self-check accepts (default "
            f"1e-3), got {cfg.tolerance}"
        )
    for size in cfg.check_sizes:
        h, w = as_hw(size, "check_sizes")
        if max(h, w) > MAX_CHECK_SIDE:
            raise ConfigError(
                f"check_sizes: {h}x{w} is larger than the self-check's {MAX_CHECK_SIDE} px limit (it runs the "
                "network on the CPU in fp32); the exported graph takes any size, check it at smaller ones"
            )
    if len(cfg.check_sizes) > 8:
        raise ConfigError(
            f"check_sizes lists {len(cfg.check_sizes)} sizes; at most 8 (each one costs two forward passes)"
        )


def _check_target(cfg: DictConfig, paths: list[Path], ckpt: Path) -> None:
    """An OutputError (exit 4) when one of ``paths`` (the file, its sidecar ...) may not be written: see
    :mod:`segtrain.writeguard`; the message names the file, why, and the way out."""
    from segtrain.writeguard import check_outputs, file_ids

    refused = check_outputs(
        paths, {k: f"the checkpoint ckpt={cfg.ckpt}" for k in file_ids([ckpt])}, bool(cfg.overwrite), _earlier_export
    )
    if not refused:
        return
    r = refused[0]
    fix = (
        "set overwrite=true to replace it, or choose"
        if not r.hard
        else "never replaced, not even with overwrite=true: choose"
    )
    raise OutputError(f"{_key(cfg)}: {short_path(r.path, 100)} {r.what}; {fix} another output=")


def _key(cfg: DictConfig) -> str:
    """How the messages name the output: ``output=...``, or the run dir it defaults to."""
    return f"output={cfg.output}" if cfg.output else "the run dir (no output= given)"


def _earlier_export(path: Path) -> str | None:
    """'an earlier export' for a file that has the sidecar of one (or that is one's sidecar)."""
    for side in (path.with_name(path.name + ".json"), path):
        try:
            info = json.loads(side.read_text()) if side.suffix == ".json" and side.is_file() else None
        except (OSError, ValueError):
            continue
        if (
            isinstance(info, dict)
            and "format" in info
            and "check" in info
            and info.get("file") in (path.name, path.stem)
        ):
            return "an earlier export"
    return None


def _staging(cfg: DictConfig, target: Path) -> Path:
    """A new temporary folder beside ``target`` (its name starts with ``.NAME.``, ends in ``.tmp``): the file
    is written and checked there, then moved into place."""
    import tempfile

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as e:
        raise OutputError(
            f"{_key(cfg)}: cannot write in {short_path(target.parent, 100)} ({e.strerror or e}); choose another output="
        ) from None


def export_checkpoint(cfg: DictConfig) -> dict:
    """The ``segtrain-export`` job: every check first, then export and self-check in a temporary folder beside
    the target, and move the file and ``FILE.json`` into place."""
    from segtrain.config import validate_export
    from segtrain.writeguard import Interrupts, check_ckpt_path

    validate_export(cfg)
    fmt, target = _format(cfg), _target(cfg)
    if fmt == "onnx":
        _require_onnx()
    check_settings(cfg, fmt)
    ckpt = Path(cfg.ckpt).expanduser()
    check_ckpt_path(ckpt, f"ckpt={cfg.ckpt}")
    sidecar_path = target.with_name(target.name + ".json")
    _check_target(cfg, [target, sidecar_path], ckpt)
    with Interrupts("segtrain-export") as stop:
        staging = _staging(cfg, target)
        stop.cleanups.append(lambda: shutil.rmtree(staging, ignore_errors=True))
        try:
            return _export_staged(cfg, fmt, ckpt, target, staging, stop)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _export_staged(cfg: DictConfig, fmt: str, ckpt: Path, target: Path, staging: Path, stop) -> dict:
    """Export, check and describe the network in ``staging``, then move the files into place: a failure or an
    interrupt at any moment leaves no file (but the staging folder, which the caller removes)."""
    from segtrain.evaluate import checkpoint_model, load_checkpoint
    from segtrain.outputs import write_json

    state, stored = load_checkpoint(ckpt)
    stored.model.pretrained, stored.model.init_from = False, None
    model = checkpoint_model(state, stored, ckpt).eval()
    t0 = time.perf_counter()
    tmp, ready, opset = staging / target.name, exportable(model), None
    try:
        with stop.deferred("the exporter"):  # a Ctrl-C inside it would come out as its own error, or abort
            if fmt == "onnx":
                meta = {"segtrain": json.dumps(_short_meta(stored, state))}
                opset = export_onnx(ready, tmp, cfg.opset, meta, stored.data.in_channels)
            else:
                export_torchscript(ready, tmp, stored.data.in_channels)
    except OSError as e:
        raise OutputError(
            f"{_key(cfg)}: cannot write {target} ({e.strerror or e}); free space or choose another output="
        ) from None
    if opset is not None and opset != cfg.opset:
        raise ExportError(f"the exporter wrote opset {opset}, not opset={cfg.opset}; no file written")
    seconds = time.perf_counter() - t0
    check = check_export(tmp, fmt, model, list(cfg.check_sizes), cfg.tolerance, stored.data.in_channels)
    _log_check(check, fmt)
    if not check["passed"]:
        raise ExportError(
            f"self-check failed: the exported {fmt} model differs from PyTorch by up to "
            f"{check['max_abs_diff']:.3g} (> tolerance {cfg.tolerance:g}); no file written"
        )
    info = sidecar(stored, state, fmt, target, opset, check)
    write_json(staging / f"{target.name}.json", info)
    staged = sorted(staging.iterdir(), key=lambda f: f.name != target.name)  # the file first, its sidecar last
    _check_target(cfg, [target.with_name(f.name) for f in staged], ckpt)  # an external-data file too
    try:
        with stop.deferred("the files' move", critical=True):
            for f in staged:
                os.replace(f, target.with_name(f.name))
    except OSError as e:
        raise OutputError(
            f"{_key(cfg)}: cannot move the export into {short_path(target.parent, 100)} "
            f"({e.strerror or e}); choose another output="
        ) from None
    size_mb = target.stat().st_size / 2**20
    what = f"ONNX opset {opset}" if fmt == "onnx" else "TorchScript"
    log.info("exported %s (%s, %.1f MB, %.1f s) | sidecar %s.json", target, what, size_mb, seconds, target)
    return info


def _short_meta(cfg: DictConfig, state: dict) -> dict:
    from segtrain import __version__

    return {"model": cfg.model.name, "num_classes": cfg.data.num_classes, "mean": list(cfg.data.mean),
            "std": list(cfg.data.std), "step": state.get("step"), "segtrain_version": __version__}  # fmt: skip


def _log_check(check: dict, fmt: str) -> None:
    parts = ", ".join(
        f"{'x'.join(str(v) for v in r['input_shape'])}: {r['max_abs_diff']:.2e}" for r in check["results"]
    )
    verdict = "ok" if check["passed"] else "FAILED"
    log.info(
        "self-check %s vs PyTorch (fp32, max |logit difference|): %s | largest %.2e, tolerance %g: %s",
        check["runtime"], parts, check["max_abs_diff"], check["tolerance"], verdict,
    )  # fmt: skip


def _export(cfg: DictConfig) -> float:
    return export_checkpoint(cfg)["check"]["max_abs_diff"]


main = command(_export, "export", "segtrain-export")  # the console script

if __name__ == "__main__":
    main()
