"""segtrain.runtime.BatchToDevice: images of any type normalised on the device by data.mean / data.std."""

import pytest
import torch

from segtrain.config import IMAGENET_MEAN, IMAGENET_STD
from segtrain.errors import ConfigError
from segtrain.runtime import BatchToDevice

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
