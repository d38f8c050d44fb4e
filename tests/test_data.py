import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from segtrain.config import DataConfig
from segtrain.data import build_datasets, build_loader
from segtrain.data.base import EpochSampler
from segtrain.data.synthetic import MAX_CLASSES, SyntheticShapes
from segtrain.errors import ConfigError


def data_cfg(**kw):
    cfg = OmegaConf.structured(DataConfig(name="synthetic"))
    cfg.merge_with(kw)
    return cfg


def test_synthetic_is_deterministic_by_seed_and_index():
    a = SyntheticShapes(4, (40, 56), 6, seed=3, cache=False)
    b = SyntheticShapes(4, (40, 56), 6, seed=3, cache=False)
    for i in range(4):
        ia, ma = a.load(i)
        ib, mb = b.load(i)
        assert np.array_equal(ia, ib) and np.array_equal(ma, mb)
    assert not np.array_equal(a.load(0)[0], a.load(1)[0])
    assert not np.array_equal(a.load(0)[0], SyntheticShapes(4, (40, 56), 6, seed=4).load(0)[0])
    assert not np.array_equal(a.load(0)[0], SyntheticShapes(4, (40, 56), 6, seed=3, split="val").load(0)[0])


def test_synthetic_content():
    ds = SyntheticShapes(64, (97, 131), 6)
    image, mask = ds.load(0)
    assert image.shape == (97, 131, 3) and image.dtype == np.uint8 and mask.shape == (97, 131)
    counts = np.bincount(np.concatenate([ds.load(i)[1].ravel() for i in range(64)]), minlength=6)
    assert len(counts) == 6 and (counts > 0).all()  # every class appears; nothing >= num_classes
    assert 0.3 < counts[0] / counts.sum() < 0.9  # background is the majority, not everything


def test_num_classes_bounds():
    with pytest.raises(ConfigError):
        SyntheticShapes(1, (32, 32), 1)
    assert SyntheticShapes(8, (32, 32), 2).load(0)[1].max() <= 1
    wide = SyntheticShapes(8, (32, 32), 21)  # more classes than shapes: the extra ones never appear
    assert len(wide.class_names) == 21 and len(wide.palette) == 21
    assert max(wide.load(i)[1].max() for i in range(8)) < MAX_CLASSES


def test_loader_batches_and_types():
    train, val = build_datasets(
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
    train, _ = build_datasets(data_cfg(image_size=48, num_train=8), seed=0)
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
