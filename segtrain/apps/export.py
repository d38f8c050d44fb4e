"""``segtrain-export ckpt=PATH format=onnx|torchscript output=FILE``: a trained network for deployment.

The export itself and its self-check against PyTorch are :mod:`segtrain.export`.  This command checks everything
first (the settings, the checkpoint path, every file it would write: never one it did not write in this command
unless ``overwrite=true``, never a checkpoint, an input or a run's file), then exports into a temporary folder
beside the target and moves the file and its sidecar ``FILE.json`` into place; a failure or an interrupt at any
moment leaves no file.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from segtrain.apps.runner import command
from segtrain.config import validate_export
from segtrain.console import short_path
from segtrain.errors import ConfigError, ExportError, OutputError
from segtrain.files import checkpoint_file
from segtrain.signals import Interrupts
from segtrain.utils import as_hw, write_json
from segtrain.version import __version__
from segtrain.writeguard import check_outputs, file_ids

log = logging.getLogger("segtrain")


SUFFIXES = {"onnx": (".onnx",), "torchscript": (".pt", ".pth")}  # the first: the default file name's


MAX_CHECK_SIDE = 2048  # the self-check runs the network twice per size on the CPU, in fp32


def _target(cfg: DictConfig) -> Path:
    """The file to write: ``output`` (a folder, existing or ending in ``/``, gets ``model.onnx`` / ``model.pt``),
    else that name in the run dir.  A file name whose suffix belongs to no format's files is refused, and so is
    one without a suffix (``output=model``: a file or a folder?)."""

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
    import onnx.defs  # an optional dependency (segtrain[export]), asked only for format=onnx

    return 18, int(onnx.defs.onnx_opset_version())


def check_settings(cfg: DictConfig, fmt: str) -> None:
    """``opset``, ``tolerance`` and ``check_sizes`` beyond :func:`segtrain.config.validate_export`: the opsets the
    installed exporter writes, a finite tolerance of at most 1 logit, self-check sizes the CPU can run."""

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

    validate_export(cfg)
    fmt, target = _format(cfg), _target(cfg)
    if fmt == "onnx":
        _require_onnx()
    check_settings(cfg, fmt)
    ckpt = Path(cfg.ckpt).expanduser()
    checkpoint_file(ckpt, "ckpt")
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
    # torch and the network load only now, after every check (a refused command and --help stay quick)
    from segtrain.checkpoint import load_checkpoint
    from segtrain.export import check_export, export_onnx, export_torchscript, exportable, sidecar
    from segtrain.models.build import checkpoint_model

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
    return {
        "model": cfg.model.name,
        "num_classes": cfg.data.num_classes,
        "mean": list(cfg.data.mean),
        "std": list(cfg.data.std),
        "step": state.get("step"),
        "segtrain_version": __version__,
    }


def _log_check(check: dict, fmt: str) -> None:
    parts = ", ".join(
        f"{'x'.join(str(v) for v in r['input_shape'])}: {r['max_abs_diff']:.2e}" for r in check["results"]
    )
    verdict = "ok" if check["passed"] else "FAILED"
    log.info(
        "self-check %s vs PyTorch (fp32, max |logit difference|): %s | largest %.2e, tolerance %g: %s",
        check["runtime"],
        parts,
        check["max_abs_diff"],
        check["tolerance"],
        verdict,
    )


def _require_onnx() -> None:
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"format=onnx needs {', '.join(missing)}: pip install 'segtrain[export]'")


def _export(cfg: DictConfig) -> float:
    return export_checkpoint(cfg)["check"]["max_abs_diff"]


main = command(_export, "export", "segtrain-export")  # the console script


if __name__ == "__main__":
    main()
