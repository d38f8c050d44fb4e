"""What every data set in segtrain shares.

* :class:`SegDataset` returns ``(image, mask)``: a ``[C, H, W]`` image tensor
  (``uint8``; ``uint16`` or ``float32`` for other bit depths, ``C = data.in_channels``)
  and a ``uint8``/``int64 [H, W]`` tensor.  Images are normalised on the device
  (4x less host-to-device traffic for uint8 than float32 from the workers).
* Augmentation is an albumentations pipeline seeded per sample from
  ``(seed, epoch, index)``, so a sample's augmentation does not depend on the
  worker that loads it or on where an interrupted epoch resumed.
* :class:`EpochSampler` yields ``(epoch, index)`` keys: a seeded permutation per
  epoch, sharded across DDP ranks, that can start mid-epoch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from segtrain.errors import DataError


def seed_pipeline(pipeline: Any, seed: int) -> None:
    """Seed an albumentations pipeline and each transform with distinct seeds."""
    if hasattr(pipeline, "set_random_seed"):
        pipeline.set_random_seed(seed)
    for i, t in enumerate(getattr(pipeline, "transforms", []) or []):
        seed_pipeline(t, (seed * 1_000_003 + 7919 * (i + 1)) % (2**63))


class SegDataset(Dataset):
    """Base class: subclasses implement ``__len__`` and ``load(index) -> (HxWxC image, HxW uint8 mask)``
    (C = 3 RGB for photos; uint8, uint16 or float32)."""

    class_names: list[str] = []
    palette: np.ndarray | None = None  # K x 3 uint8 colours for visualisation

    def __init__(self, transform: Any = None, seed: int = 0):
        self.transform = transform
        self.seed = seed

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """A human name for sample ``index`` (a file path for on-disk sets)."""
        return f"sample {index}"

    def __getitem__(self, key: Any) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image, mask = self.load(index)
        if self.transform is not None:
            seed_pipeline(self.transform, int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0]))
            try:
                out = self.transform(image=image, mask=mask)
            except Exception as e:  # e.g. albumentations' CropSizeError: a data.train_pipeline that does not fit
                raise DataError(
                    f"the pipeline failed on {self.describe(index)} ({type(e).__name__}: {' '.join(str(e).split())[:120]}); "
                    "check data.train_pipeline (a crop larger than the image needs a PadIfNeeded before it)"
                ) from e
            image, mask = out["image"], out["mask"]
        if image.ndim == 2:  # OpenCV drops the band axis of a 1-band image
            image = image[..., None]
        image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        mask = torch.from_numpy(np.ascontiguousarray(mask))
        return image, mask


class EpochSampler(Sampler):
    """Seeded per-epoch order of ``(epoch, index)`` keys, sharded over ranks, resumable mid-epoch."""

    def __init__(
        self,
        size: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        pad: bool = True,
    ):
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world_size, self.drop_last, self.pad = rank, world_size, drop_last, pad
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch ``epoch`` from its ``start``-th sample (of this rank)."""
        self.epoch, self.start = epoch, start

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        if self.world_size > 1:
            if self.drop_last:
                order = order[: len(order) - len(order) % self.world_size]
            elif self.pad:  # pad by wrapping so every rank gets the same count (training)
                order += order[: (-len(order)) % self.world_size]
            order = order[self.rank :: self.world_size]
        return order

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i in self._indices()[self.start :]:
            yield self.epoch, i

    def __len__(self) -> int:
        return max(0, len(self._indices()) - self.start)
