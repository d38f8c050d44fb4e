"""segtrain.data.synthetic: the built-in shapes data set is deterministic by seed, split and index, draws every
class with background the majority, and bounds data.num_classes."""

import numpy as np
import pytest

from segtrain.data.synthetic import MAX_CLASSES, SyntheticShapes
from segtrain.errors import ConfigError


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


def test_cache_is_bounded_and_shared_out_among_loader_workers(monkeypatch):
    import torch

    import segtrain.data.synthetic as S

    monkeypatch.setattr(S, "CACHE_BYTES", 5 * 16 * 16 * 4)  # five 16x16 samples
    ds = SyntheticShapes(12, (16, 16), 6)
    first = [ds.load(i)[0].copy() for i in range(12)]
    assert sorted(ds._cache) == [0, 1, 2, 3, 4]  # the first five kept, the rest generated again when asked
    assert all(np.array_equal(ds.load(i)[0], first[i]) for i in range(12))

    class CacheSize(torch.utils.data.Dataset):  # what each worker process's copy of ds holds after a pass
        def __len__(self):
            return 12

        def __getitem__(self, i):
            ds.load(i)
            return len(ds._cache)

    ds._cache.clear()
    sizes = list(torch.utils.data.DataLoader(CacheSize(), batch_size=None, num_workers=2))
    assert max(sizes) == 2  # 5 // 2 samples each: the workers together keep no more than the budget
