"""segtrain.runtime.BatchToDevice: images of any type normalised on the device by data.mean / data.std."""

import pytest
import torch

from segtrain.config import IMAGENET_MEAN, IMAGENET_STD
from segtrain.errors import ConfigError
from segtrain.runtime import BatchToDevice, Throughput

CPU = torch.device("cpu")


def test_uint8_is_the_imagenet_normalisation_bit_for_bit():
    images = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    x, y = BatchToDevice(CPU, IMAGENET_MEAN, IMAGENET_STD)(images, torch.zeros(2, 5, 7, dtype=torch.uint8))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.equal(x, images.float() * (1.0 / (255.0 * std)) + (-mean / std))  # the formula before 16-bit
    assert x.dtype == torch.float32 and y.dtype == torch.int64


@pytest.mark.parametrize("dtype, top", [(torch.uint16, 65535.0), (torch.float32, 1.0)])
def test_16_bit_and_float_images_in_fractions_of_their_range(dtype, top):
    mean, std = [0.1, 0.2, 0.3, 0.4], [0.05, 0.1, 0.2, 0.4]
    fractions = torch.rand(2, 4, 6, 6, dtype=torch.float64)
    images = (fractions * top).round().to(dtype) if dtype == torch.uint16 else fractions.float()
    x = BatchToDevice(CPU, mean, std).images(images)
    expect = (images.double() / top - torch.tensor(mean).view(1, 4, 1, 1).double()) / torch.tensor(std).view(1, 4, 1, 1)
    torch.testing.assert_close(x.double(), expect, rtol=1e-5, atol=1e-5)


def test_band_count_mismatch_is_a_config_error():
    with pytest.raises(ConfigError, match="the images have 4 band\\(s\\) but data.mean / data.std have 3 values"):
        BatchToDevice(CPU, IMAGENET_MEAN, IMAGENET_STD).images(torch.zeros(1, 4, 2, 2, dtype=torch.uint8))


def test_throughput_rates_count_loader_waits_in_the_wall_time():
    speed = Throughput()
    speed.add(images=30, wait=1.0, compute=2.0)
    r = speed.rates()
    assert r == {
        "train_images_per_sec": 10.0,
        "compute_images_per_sec": 15.0,
        "data_wait_fraction": pytest.approx(1 / 3),
    }


def test_loader_warning_judges_each_window_after_the_warm_up_once(caplog):
    speed = Throughput()
    speed.add(16, wait=5.0, compute=1.0)  # the first window: the built-in set generated, workers starting
    speed.warn_if_loader_bound(0)
    speed.add(16, wait=0.05, compute=1.0)  # 5%: fine
    speed.warn_if_loader_bound(0)
    assert "bottleneck" not in caplog.text
    speed.add(16, wait=0.5, compute=1.0)  # 33% of this window (the run's total is lower than the first's)
    speed.warn_if_loader_bound(2)
    speed.add(16, wait=0.5, compute=1.0)
    speed.warn_if_loader_bound(2)
    assert caplog.text.count("the data loader is the bottleneck: 33% of the training time") == 1
    assert "raise data.num_workers (now 2)" in caplog.text
