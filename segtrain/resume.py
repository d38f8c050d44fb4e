"""Checkpoint policy: which checkpoint a run resumes from, whether it fits, and partial weight loads.

* :func:`resume_state` finds ``trainer.resume`` (a path, or ``auto``: this run dir's ``last.pt``, falling
  back to ``last-1.pt`` ... when the newest is unreadable), refuses a checkpoint of another network with
  the list of differences, and warns about training settings that changed.
* :func:`init_from` (``model.init_from``) loads every tensor whose name and shape match and reports the rest.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from segtrain import checkpoint
from segtrain.checkpoint import stored_config
from segtrain.errors import CheckpointError
from segtrain.files import checkpoint_file

log = logging.getLogger("segtrain")

# Keys whose change on resume is expected (run length, logging, paths), so not worth a warning.
_UNWARNED = {
    "resume",
    "stop_at",
    "progress",
    "debug_errors",
    "num_workers",
    "root",
    "max_iters",
    "max_epochs",
    "val_interval",
    "log_interval",
}


def _candidates(resume: str, ckpt_dir: Path, keep_last: int) -> list[Path]:
    if resume != "auto":
        return [checkpoint_file(resume, "trainer.resume")]
    last = ckpt_dir / "last.pt"
    return [p for p in (checkpoint.numbered(last, i) for i in range(keep_last + 1)) if p.is_file()]


def resume_state(
    cfg: DictConfig, ckpt_dir: Path, model: nn.Module, num_classes: int, optimizer: torch.optim.Optimizer
) -> tuple[dict, Path] | None:
    """The checkpoint to resume from and its path, or None (no ``trainer.resume``, or ``auto`` with none yet)."""
    resume = cfg.trainer.resume
    if not resume:
        return None
    candidates = _candidates(resume, ckpt_dir, cfg.trainer.keep_last)
    if not candidates:
        log.info("trainer.resume=auto: no %s yet, starting from scratch", ckpt_dir / "last.pt")
        return None
    for i, path in enumerate(candidates):
        try:
            state = checkpoint.load(path)
            break
        except CheckpointError as e:
            if i == len(candidates) - 1:
                raise
            log.warning("trainer.resume=auto: %s; trying %s", e, candidates[i + 1])
    stored = stored_config(state)
    diffs = differences(state, stored, cfg.model, model, num_classes)
    if diffs:
        raise CheckpointError(f"cannot resume from {path}: it differs from this config: {'; '.join(diffs)}")
    ours, theirs = cfg.optimizer.name, (stored.get("optimizer") or {}).get("name", "?")
    groups = (len(state["optimizer"]["param_groups"]), len(optimizer.param_groups))
    if ours != theirs or groups[0] != groups[1]:  # its state (momenta, param groups) cannot carry over
        raise CheckpointError(
            f"cannot resume from {path.name}: its optimizer state is {theirs}, {groups[0]} parameter group(s), here "
            f"{ours}, {groups[1]}; resume with the checkpoint's optimizer settings, or start anew from its weights "
            "with model.init_from=PATH"
        )
    warn_changed(cfg, stored)
    return state, path


def warn_changed(cfg: DictConfig, stored: DictConfig) -> None:
    """Say which training settings differ from the checkpoint's: its optimizer and schedule state win."""
    changed = []
    for group in ("optimizer", "scheduler", "loss", "data", "trainer"):
        ours, theirs = cfg.get(group), stored.get(group)
        if ours is None or theirs is None:
            continue
        for key, value in OmegaConf.to_container(ours, resolve=True).items():
            if key in _UNWARNED or key not in theirs:
                continue
            if str(theirs.get(key)) != str(value):
                changed.append(f"{group}.{key} {theirs.get(key)} -> {value}")
    if changed:
        log.warning(
            "resuming with settings that differ from the checkpoint's: %s (the optimizer and schedule state "
            "come from the checkpoint)",
            ", ".join(changed[:8]),
        )


def _listed(label: str, items: list[str]) -> str:
    more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
    return f"{label}: {', '.join(items[:3])}{more}"


def differences(
    state: dict, stored: DictConfig, model_cfg: DictConfig, model: nn.Module, num_classes: int
) -> list[str]:
    """What makes ``state`` unusable for ``model``: config keys, class count, tensor names and shapes."""
    meta, diffs = state.get("meta", {}), []
    if meta.get("model") != model_cfg.name:
        diffs.append(f"model {meta.get('model')} (here {model_cfg.name})")
    if meta.get("num_classes") != num_classes:
        diffs.append(f"num_classes {meta.get('num_classes')} (here {num_classes})")
    theirs_cfg = stored.get("model") or {}
    for key in ("backbone", "variant", "output_stride", "aux", "base_channels", "norm"):
        if key in theirs_cfg and theirs_cfg[key] != model_cfg.get(key):
            diffs.append(f"model.{key} {theirs_cfg[key]} (here {model_cfg.get(key)})")
    ours, theirs = model.state_dict(), state["model"]
    missing = [k for k in ours if k not in theirs]
    extra = [k for k in theirs if k not in ours]
    shapes = [
        f"{k} {list(theirs[k].shape)} (here {list(v.shape)})"
        for k, v in ours.items()
        if k in theirs and hasattr(theirs[k], "shape") and theirs[k].shape != v.shape
    ]
    for label, items in (("missing tensors", missing), ("unexpected tensors", extra), ("shape", shapes)):
        if items:
            diffs.append(_listed(label, items))
    return diffs


def init_from(model: nn.Module, path_str: str, network: str) -> None:
    """``model.init_from``: load every tensor whose name and shape match; report what was skipped."""
    path = checkpoint_file(path_str, "model.init_from")
    obj = checkpoint.load(path, require_model=False)  # also a plain state dict
    theirs = obj.get("model", obj.get("state_dict", obj)) if isinstance(obj, dict) else None
    if not isinstance(theirs, dict):
        raise CheckpointError(f"model.init_from={path_str} holds no state dict")
    theirs = {k.removeprefix("module."): v for k, v in theirs.items() if isinstance(v, torch.Tensor)}
    ours = model.state_dict()
    load = {k: v for k, v in theirs.items() if k in ours and v.shape == ours[k].shape}
    if not load:
        raise CheckpointError(
            f"model.init_from={path_str}: no tensor matches model={network} by name and shape "
            f"(e.g. {next(iter(theirs), 'none')}); is it a checkpoint of this network?"
        )
    model.load_state_dict(load, strict=False)
    shape = [k for k in theirs if k in ours and k not in load]
    absent = [k for k in ours if k not in theirs]
    unused = [k for k in theirs if k not in ours]
    log.info(
        "model.init_from=%s: loaded %d of %d tensors; kept fresh: %d (shape differs: %s; not in the file: %d); "
        "unused from the file: %d",
        path,
        len(load),
        len(ours),
        len(ours) - len(load),
        ", ".join(shape[:4]) or "none",
        len(absent),
        len(unused),
    )
