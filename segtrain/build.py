"""A training run from its config, built before anything trains.

:func:`build_run` fits the config to the data and makes every object the run needs: device and processes,
data sets and loaders, network, loss, optimizer and schedule, and the checkpoint to resume from.  Fitting
returns values, never changes the config given:

* the plan (:func:`plan_run`, when the keys the user set are known: the command line's): the data's fingerprint
  (:mod:`segtrain.data.fingerprint`, cached) and every data-dependent setting the user left unset, each by a
  stated rule (:mod:`segtrain.data.plan`), written into a new config;
* the ``auto`` settings (``data.base_size``, ``data.mean`` / ``std``, ``loss.class_weights``) come back as
  numbers in the resolved config, which is what checkpoints store.

:func:`build_trainer` wires the objects and the hooks into a :class:`~segtrain.trainer.Trainer`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from segtrain import checkpoint, distributed, resume, rundir, runtime
from segtrain.config import check_run_length, validate
from segtrain.data import mask_classes
from segtrain.data.base import SegDataset
from segtrain.data.build import build_datasets, build_loader, resolved
from segtrain.data.fingerprint import compute_fingerprint, datasets_for, declared_classes
from segtrain.data.palette import palette_of
from segtrain.data.plan import Plan, describe_device, make_plan
from segtrain.distributed import DistInfo
from segtrain.evaluation import class_names
from segtrain.hooks.datacard import DataCard
from segtrain.hooks.ema import EMA
from segtrain.hooks.guard import DivergenceGuard
from segtrain.hooks.logging import LoggerHook, Progress, ValidationPictures
from segtrain.hooks.monitor import Monitor
from segtrain.hooks.preflight import Preflight
from segtrain.hooks.rundir import RunDirLock
from segtrain.hooks.throughput import Throughput
from segtrain.losses.functions import auto_class_weights, build_loss
from segtrain.models.build import build_model, count_parameters
from segtrain.optim import build_optimizer, build_scheduler
from segtrain.recipe import optimizer_for_batch
from segtrain.trainer import Trainer

log = logging.getLogger("segtrain")


@dataclass
class Run:
    """A training run's objects.  ``cfg``: the resolved config (no ``auto`` left); ``resume``: the checkpoint to
    continue from and its path (``trainer.resume``), already checked against this network and optimizer."""

    cfg: DictConfig
    run_dir: Path
    device: torch.device
    precision: str
    dist: DistInfo
    train_set: SegDataset
    val_set: SegDataset
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    model: torch.nn.Module
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    class_names: list[str]
    palette: np.ndarray
    max_iters: int
    resume: tuple[dict, Path] | None
    plan: tuple[Plan, dict] | None = None  # the plan and the fingerprint it was made from (a planned run)


def _processes(cfg: DictConfig, run_dir: str | Path) -> tuple[torch.device, str, DistInfo, Path]:
    """The device and precision, the process group (torchrun), and the run dir (rank 0's, claimed by it)."""
    device, precision = runtime.resolve_device(cfg.device)
    dist = distributed.setup(device.type)
    if dist.enabled:
        if device.type == "cuda":
            device = torch.device("cuda", dist.local_rank)
        run_dir = distributed.broadcast_object(str(run_dir), dist)  # rank 0's run dir
        if not dist.is_main:
            log.setLevel(logging.WARNING)
    run_dir = Path(run_dir)
    if dist.is_main:  # the run's dir: locked, never overwritten in silence (a no-op after the command line's claim)
        rundir.claim(run_dir, cfg.trainer.resume, cfg.trainer.overwrite)
    return device, precision, dist, run_dir


def plan_run(cfg: DictConfig, explicit: set[str], seed: int = 0) -> tuple[DictConfig, Plan, dict]:
    """The data's fingerprint and the plan for ``cfg``: (the planned config, the plan, the fingerprint).
    ``explicit``: the keys the user set (:func:`segtrain.data.plan.explicit_keys`), which the plan never changes."""
    d = cfg.data
    train_set, val_set = datasets_for(d, seed)
    declared = declared_classes(d) if d.name == "folder" else None
    fp = compute_fingerprint(
        train_set, val_set, name=str(d.name), in_channels=d.in_channels, ignore_index=d.ignore_index, declared=declared
    )
    device = describe_device(cfg.device, cfg.model, d.in_channels, d.num_classes)
    plan = make_plan(fp, d, cfg.loss, cfg.model, explicit, device, cfg_trainer=cfg.trainer)
    plan.log()
    return plan.apply(cfg), plan, fp


def build_run(cfg: DictConfig, run_dir: str | Path, explicit: set[str] | None = None) -> Run:
    """Every object of the run that ``cfg`` describes, in the order that makes a seeded run repeatable.
    ``explicit``: the keys the user set, to plan the others from the data (:func:`plan_run`); None: no plan, the
    config as given."""
    device, precision, dist, run_dir = _processes(cfg, run_dir)
    planned = None
    if explicit is not None:
        cfg, plan, fp = plan_run(cfg, explicit, cfg.data.seed)
        planned = (plan, fp)
    validate(cfg)  # the config the run is built from (what the plan fills is checked once it is filled)
    t = cfg.trainer
    runtime.seed_everything(cfg.seed)
    runtime.configure_backends(device, t.deterministic, cfg.device.cudnn_benchmark)

    # --- data: the sets, and the config fitted to them --------------------------------------------------
    train_set, val_set, data_cfg = build_datasets(cfg.data, cfg.seed)
    cfg = resolved(cfg, {"data": data_cfg})
    d, k = cfg.data, cfg.data.num_classes
    if cfg.loss.class_weights == "auto":
        cfg = resolved(cfg, {"loss.class_weights": auto_class_weights(train_set, mask_classes(k), d.ignore_index)})
    train_loader = build_loader(train_set, d, True, cfg.seed, dist.rank, dist.world_size)
    val_loader = build_loader(val_set, d, False, cfg.seed, dist.rank, dist.world_size)
    iters_per_epoch = len(train_loader) // t.accumulate
    max_iters = t.max_iters if t.max_iters is not None else t.max_epochs * iters_per_epoch
    check_run_length(cfg, max_iters, len(train_set), iters_per_epoch, dist.world_size)

    # --- network, loss, optimizer, schedule -------------------------------------------------------------------
    memory_format = torch.channels_last if cfg.device.channels_last else torch.contiguous_format
    model = build_model(cfg.model, k, d.in_channels).to(device, memory_format=memory_format)
    criterion = build_loss(cfg.loss, k, d.ignore_index).to(device)
    opt_cfg = optimizer_for_batch(cfg, dist.world_size, dist.is_main)  # recipe.total_batch, optimizer.lr_scaling
    optimizer = build_optimizer(opt_cfg, model)
    scheduler = build_scheduler(cfg.scheduler, optimizer, max_iters, opt_cfg.lr)

    # --- the checkpoints: room for them, weights to start from, a run to continue ---------------------------
    ckpt_dir = run_dir / "checkpoints"
    if dist.is_main:
        rundir.check_writable(ckpt_dir, count_parameters(model))
        checkpoint.remove_stale_temporaries(ckpt_dir)
    if cfg.model.init_from:
        resume.init_from(model, cfg.model.init_from, cfg.model.name)
    found = resume.resume_state(cfg, ckpt_dir, model, k, optimizer)
    names = class_names(train_set, k)
    return Run(
        cfg,
        run_dir,
        device,
        precision,
        dist,
        train_set,
        val_set,
        train_loader,
        val_loader,
        model,
        criterion,
        optimizer,
        scheduler,
        names,
        palette_of(mask_classes(k), (getattr(train_set, "palette", None), "the data set's palette")),
        max_iters,
        found,
        planned,
    )


def build_trainer(cfg: DictConfig, run_dir: str | Path, on_abort=None, explicit: set[str] | None = None) -> Trainer:
    """A Trainer for ``cfg`` with the standard hooks, resumed from ``trainer.resume`` when set.  ``on_abort(msg)``:
    called when a second stop signal aborts the run at once (the command line records it in status.json);
    ``explicit``: the keys the user set, to plan the others (:func:`build_run`)."""
    run = build_run(cfg, run_dir, explicit)
    t = run.cfg.trainer
    speed = Throughput()
    records = LoggerHook(run.run_dir, speed)
    hooks = [Preflight(run.val_set), DivergenceGuard()]  # the guard first: a diverged step goes no further
    if run.plan is not None:
        hooks.append(DataCard(run.run_dir, run.plan[1], run.plan[0], run.train_set))
    if t.ema_decay:
        hooks.append(EMA(run.model, t.ema_decay, t.ema_warmup))
    hooks += [
        Monitor(t, run.run_dir / "checkpoints", run.class_names),  # first to judge a validation
        records,
        ValidationPictures(run.run_dir, records, run.palette),
        Progress(speed),
        speed,  # after the loggers and the bar: they show the rate up to the step before
        RunDirLock(run.run_dir),
    ]
    trainer = Trainer(
        run.cfg,
        run.model,
        run.optimizer,
        run.scheduler,
        run.criterion,
        run.train_loader,
        run.val_loader,
        run_dir=run.run_dir,
        device=run.device,
        precision=run.precision,
        hooks=hooks,
        dist=run.dist,
        class_names=run.class_names,
        palette=run.palette,
        max_iters=run.max_iters,
        on_abort=on_abort,
    )
    if run.resume is not None:
        trainer.load_state_dict(*run.resume)
    return trainer
