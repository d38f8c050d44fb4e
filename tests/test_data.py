"""segtrain.data (build_datasets, build_loader) and segtrain.data.base (SegDataset, EpochSampler): batches and
types, augmentation drawn by (epoch, index) whatever the worker count, and a sampler that resumes mid-epoch and
shards across ranks."""

import torch
from omegaconf import OmegaConf

from segtrain.config import DataConfig
from segtrain.data.base import EpochSampler
from segtrain.data.build import build_datasets, build_loader


def data_cfg(**kw):
    cfg = OmegaConf.structured(DataConfig(name="synthetic"))
    cfg.merge_with(kw)
    return cfg


def test_loader_batches_and_types():
    train, val, _ = build_datasets(
        data_cfg(image_size=[33, 45], num_train=10, num_val=3, batch_size=4, num_workers=0), seed=0
    )
    loader = build_loader(train, data_cfg(batch_size=4, num_workers=0), train=True, seed=0)
    images, masks = next(iter(loader))
    assert images.shape == (4, 3, 33, 45) and images.dtype == torch.uint8
    assert masks.shape == (4, 33, 45)
    assert len(loader) == 2  # drop_last on train
    vloader = build_loader(val, data_cfg(batch_size=4, num_workers=0), train=False, seed=0)
    assert sum(x.shape[0] for x, _ in vloader) == 3  # validation keeps every image


def test_augmentation_depends_on_epoch_and_index_not_worker():
    train, _, _ = build_datasets(data_cfg(image_size=48, num_train=8), seed=0)
    a = train[(0, 5)][0]
    assert torch.equal(a, train[(0, 5)][0])  # same (epoch, index) -> same augmentation
    flips = {tuple(train[(e, 5)][0].flatten()[:64].tolist()) for e in range(12)}
    assert len(flips) > 1  # different epochs draw different flips
    cfg = data_cfg(image_size=48, num_train=8, batch_size=2)
    batches = []
    for workers in (0, 2):
        cfg.num_workers = workers
        loader = build_loader(train, cfg, train=True, seed=1)
        loader.sampler.set_epoch(3)
        batches.append(torch.cat([x for x, _ in loader]))
    assert torch.equal(batches[0], batches[1])


def test_sampler_resumes_mid_epoch_and_shards():
    s = EpochSampler(10, shuffle=True, seed=0)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start=4)
    assert list(s) == full[4:] and len(s) == 6
    s.set_epoch(3)
    assert list(s) != full
    shards = []
    for rank in range(3):
        r = EpochSampler(10, shuffle=True, seed=0, rank=rank, world_size=3)
        r.set_epoch(2)
        shards.append([i for _, i in r])
    assert all(len(x) == 4 for x in shards)
    assert set(sum(shards, [])) == set(range(10))
