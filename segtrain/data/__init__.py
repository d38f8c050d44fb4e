"""Data sets and loaders: ``build_datasets(cfg)`` and ``build_loader(...)``."""

from __future__ import annotations

import cv2
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from segtrain.config import as_hw
from segtrain.data.base import EpochSampler, SegDataset
from segtrain.errors import ConfigError

__all__ = ["build_datasets", "build_loader", "SegDataset", "EpochSampler"]


def _synthetic(cfg: DictConfig, seed: int) -> tuple[SegDataset, SegDataset]:
    from segtrain.data import transforms
    from segtrain.data.synthetic import SyntheticShapes

    size = as_hw(cfg.image_size, "data.image_size")
    common = dict(image_size=size, num_classes=cfg.num_classes, seed=cfg.seed, aug_seed=seed)
    train = SyntheticShapes(cfg.num_train, split="train", transform=transforms.synthetic_train(cfg), **common)
    val = SyntheticShapes(cfg.num_val, split="val", transform=None, **common)
    return train, val


BUILDERS = {"synthetic": _synthetic}


def build_datasets(cfg: DictConfig, seed: int) -> tuple[SegDataset, SegDataset]:
    """(train, val) data sets for ``cfg.data``; ``seed`` seeds augmentation."""
    if cfg.name not in BUILDERS:
        raise ConfigError(f"unknown data.name {cfg.name!r}; choose one of: {', '.join(sorted(BUILDERS))}")
    train, val = BUILDERS[cfg.name](cfg, seed)
    if cfg.class_names is not None:
        train.class_names = val.class_names = list(cfg.class_names)
    return train, val


def _worker_init(worker_id: int) -> None:
    cv2.setNumThreads(0)  # one OpenCV thread per worker: workers are the parallelism
    cv2.ocl.setUseOpenCL(False)
    torch.set_num_threads(1)


def build_loader(dataset: SegDataset, cfg: DictConfig, train: bool, seed: int, rank: int = 0, world_size: int = 1) -> DataLoader:
    sampler = EpochSampler(len(dataset), shuffle=train, seed=seed, rank=rank, world_size=world_size, drop_last=False)
    workers = cfg.num_workers
    batch = cfg.batch_size if train else (cfg.val_batch_size or cfg.batch_size)
    return DataLoader(
        dataset,
        batch_size=batch,
        sampler=sampler,
        num_workers=workers,
        pin_memory=cfg.pin_memory and torch.cuda.is_available(),
        persistent_workers=cfg.persistent_workers and workers > 0,
        drop_last=train and len(sampler) >= batch * 2,
        worker_init_fn=_worker_init if workers > 0 else None,
        prefetch_factor=4 if workers > 0 else None,
    )
