"""Data sets and loaders: ``build_datasets(cfg)`` and ``build_loader(...)``.

``build_datasets`` also fits the recipe to the data before anything trains: it reads the image headers
(bands, bit depth, sizes), runs the label check, resolves ``data.base_size`` / ``data.mean`` / ``data.std``
``auto`` into numbers (returned in a new data config: the one given is not changed), logs the training and
validation scales (with warnings), and attaches the standard pipelines (``transforms.standard_train`` /
``standard_val``, built from the resolved config) to on-disk sets."""

from __future__ import annotations

import atexit
import copy
import importlib
import logging
import multiprocessing
import os
import signal
from typing import TYPE_CHECKING, NamedTuple

import cv2
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from segtrain.data import LAYOUTS, mask_classes, transforms
from segtrain.data.base import EpochSampler, SegDataset
from segtrain.data.checks import check_labels
from segtrain.data.palette import palette_array
from segtrain.data.stats import resolve_auto, scan_images
from segtrain.errors import ConfigError
from segtrain.signals import worker_signals

if TYPE_CHECKING:
    from segtrain.data.disk import DiskDataset

log = logging.getLogger("segtrain")

__all__ = ["build_datasets", "build_loader", "Datasets", "SegDataset", "EpochSampler"]


class Datasets(NamedTuple):
    """What :func:`build_datasets` returns: the training set (None when not read), the validation set, and the
    data config with its ``auto`` values resolved into numbers (the one to train and store)."""

    train: SegDataset | None
    val: SegDataset
    cfg: DictConfig


def resolved(cfg: DictConfig, values: dict) -> DictConfig:
    """A copy of ``cfg`` with ``values`` (dotted key -> value) set; ``cfg`` itself is not changed."""
    out = copy.deepcopy(cfg)
    for key, value in values.items():
        OmegaConf.update(out, key, value, merge=False)
    return out


def open_datasets(cfg: DictConfig, seed: int, train: bool = True) -> tuple[SegDataset | None, SegDataset]:
    """The (train, val) sets of the layout ``cfg.name`` (``segtrain.data.LAYOUTS``) as stored: no checks, no
    pipelines (``train=False``: the training set is not read and comes back as None for on-disk layouts)."""
    if cfg.name not in LAYOUTS:
        raise ConfigError(f"unknown data.name {cfg.name!r}; choose one of: {', '.join(sorted(LAYOUTS))}")
    module, fn = LAYOUTS[cfg.name].split(":")
    return getattr(importlib.import_module(f"segtrain.data.{module}"), fn)(cfg, seed, train)


def build_datasets(cfg: DictConfig, seed: int, train: bool = True) -> Datasets:
    """(train, val, resolved config) for the data config ``cfg``; ``seed`` seeds augmentation.  The resolved
    config holds the numbers computed from the training images for the ``auto`` values (``base_size``, ``mean``,
    ``std``).  ``train=False`` (``segtrain-eval``, whose config holds those numbers): only the validation split
    is read and checked, and the on-disk training set comes back as None."""
    on_disk = cfg.name != "synthetic"
    if train and on_disk and cfg.train_pipeline is None and cfg.crop_size is None and cfg.batch_size > 1:
        raise ConfigError(
            "data.crop_size is null but on-disk images differ in size: set data.crop_size=512 (or data.batch_size=1)"
        )
    train_set, val = open_datasets(cfg, seed, train)
    if cfg.class_names is not None:
        for ds in (train_set, val):
            if ds is not None:
                ds.class_names = list(cfg.class_names)
    if on_disk:
        cfg = _prepare_on_disk(cfg, train_set, val)
    else:
        cfg = resolved(cfg, resolve_auto(cfg, train_set, None))
    return Datasets(train_set, val, cfg)


def _prepare_on_disk(cfg: DictConfig, train: DiskDataset | None, val: DiskDataset) -> DictConfig:
    """Checks, ``auto`` values, the scale report and the standard pipelines of an on-disk (train, val) pair
    (train None: the validation split alone, for ``segtrain-eval``); the resolved config.  The builders refuse
    empty splits."""

    sets = [ds for ds in (train, val) if ds is not None]
    if cfg.palette is not None:
        pal = palette_array(cfg.palette, "data.palette")
        if len(pal) != mask_classes(cfg.num_classes):
            raise ConfigError(f"data.palette has {len(pal)} colours but data.num_classes={cfg.num_classes}")
        for ds in sets:
            ds.palette = pal
    for ds in sets:
        ds.in_channels = cfg.in_channels
    scan = scan_images(train, val, cfg.in_channels)  # bands and bit depth of every image (headers only)
    if cfg.check_labels:  # every mask, once (cached); also finds the smallest image of each split
        for ds, smallest in zip(sets, check_labels(sets, mask_classes(cfg.num_classes), cfg.ignore_index)):
            ds.smallest = smallest
    else:  # each mask as it is loaded, naming the file
        for ds in sets:
            ds.check_values(mask_classes(cfg.num_classes), cfg.ignore_index)
    base_from_auto = cfg.base_size == "auto"
    cfg = resolved(cfg, resolve_auto(cfg, train, scan))
    if train is not None:
        transforms.report_scales(cfg, scan["median_hw"], base_from_auto)
        colour = cfg.in_channels == 3 and scan["dtype"] == "uint8"
        if cfg.photometric and cfg.augment and not colour and cfg.train_pipeline is None:
            log.info(
                "photometric distortion off: it needs 3-band 8-bit images, these have %d band(s) of %s",
                cfg.in_channels,
                scan["dtype"],
            )
        train.transform = transforms.standard_train(cfg, colour)
    val.transform = transforms.standard_val(cfg)
    return cfg


def _stop_workers_at_exit() -> None:
    """Training's loader workers ignore SIGTERM (:func:`worker_init`), so multiprocessing's exit handler, which terminates daemonic
    children with SIGTERM and waits, would wait forever for any still alive at exit (a loader kept alive by
    an exception's traceback): kill them first (they only read data).  Registered after multiprocessing's
    handler, so it runs before it."""

    children = [c for c in multiprocessing.active_children() if c.daemon]
    if children:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # not the loader's "worker killed" error, at exit
    for child in children:
        child.kill()


atexit.register(_stop_workers_at_exit)


def worker_init(worker_id: int, stop_on_sigterm: bool = False) -> None:
    """A loader worker's set-up (``worker_init_fn``): Ctrl-C ignored (it reaches the whole process group; the main
    process handles it and shuts the loader down); SIGTERM ignored too while training (the main process finishes
    its step and writes last.pt first: a worker dying before would crash the loader), or, ``stop_on_sigterm``
    (prediction, which has nothing to finish), the default action: the worker dies of it, rather than running the
    main process's handler that it inherited.  One OpenCV and one torch thread: the workers are the parallelism."""

    worker_signals(sigterm=signal.SIG_DFL if stop_on_sigterm else signal.SIG_IGN)
    cv2.setNumThreads(0)  # one OpenCV thread per worker: workers are the parallelism
    cv2.ocl.setUseOpenCL(False)
    torch.set_num_threads(1)


def num_workers(value, world_size: int = 1) -> int:
    """``data.num_workers``: a number, or ``auto``: the CPUs this process may use, shared among the training
    processes of this node, one left for the training process itself, at most 16; none (batches made in the
    training process) when there are 2 CPUs or fewer, where a loader process would only take CPU time from
    the training step (measured: docs/performance.md)."""
    if value != "auto":
        return int(value)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 2
    per_process = cpus // max(1, world_size)
    return 0 if per_process <= 2 else min(16, per_process - 1)


def build_loader(
    dataset: SegDataset, cfg: DictConfig, train: bool, seed: int, rank: int = 0, world_size: int = 1
) -> DataLoader:
    # Validation shards are not padded: every image is scored exactly once over all ranks.
    sampler = EpochSampler(
        len(dataset), shuffle=train, seed=seed, rank=rank, world_size=world_size, drop_last=False, pad=train
    )
    workers = num_workers(cfg.num_workers, world_size)
    batch = cfg.batch_size if train else (cfg.val_batch_size or cfg.batch_size)
    return DataLoader(
        dataset,
        batch_size=batch,
        sampler=sampler,
        num_workers=workers,
        pin_memory=cfg.pin_memory and torch.cuda.is_available(),
        persistent_workers=cfg.persistent_workers and workers > 0,
        drop_last=train and len(sampler) >= batch * 2,
        worker_init_fn=worker_init if workers > 0 else None,
        prefetch_factor=4 if workers > 0 else None,
        # Its own generator: creating an iterator then draws worker seeds without touching the global torch
        # RNG (dropout's), so a resumed run consumes that RNG exactly as an uninterrupted one.  Augmentation
        # is seeded per sample (SegDataset), so worker seeds do not change the data.
        generator=torch.Generator().manual_seed(seed + (0 if train else 1)),
    )
