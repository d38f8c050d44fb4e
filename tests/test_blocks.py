"""The layers in segtrain/models/blocks.py, in particular that each alternative implementation is the same function."""

import pytest
import torch

from segtrain.models import blocks


@pytest.fixture
def flag():
    """Flip a module-level implementation switch for the block, restoring it after."""
    saved = {k: getattr(blocks, k) for k in ("UPCONV_AS_SHUFFLE",)}
    yield lambda name, value: setattr(blocks, name, value)
    for k, v in saved.items():
        setattr(blocks, k, v)


@pytest.mark.parametrize("hw", [(4, 4), (7, 3), (1, 1), (5, 9)])
@pytest.mark.parametrize("factor", [2, 8, 32])
def test_fcn_upsampling_is_bilinear_interpolation_up_to_the_borders(hw, factor):
    """The learnable transposed conv at initialisation and the fixed layer are F.interpolate everywhere: the
    border is not faded towards zero (torchvision's FCN; the paper's 100-pixel padding)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, *hw)
    ref = torch.nn.functional.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    for up in (blocks.BilinearConvTranspose2d(3, factor), blocks.FixedBilinearUpsample(3, factor)):
        y = up(x)
        assert y.shape == ref.shape == (2, 3, hw[0] * factor, hw[1] * factor)
        torch.testing.assert_close(y, ref, rtol=0, atol=1e-5)


def test_upconv_as_pixel_shuffle_is_the_same_function(flag):
    torch.manual_seed(0)
    m = blocks.UpConv2x2(6, 4)
    x = torch.randn(2, 6, 5, 7, requires_grad=True)
    flag("UPCONV_AS_SHUFFLE", False)
    a = m(x)
    (ga,) = torch.autograd.grad(a.square().sum(), m.weight)
    flag("UPCONV_AS_SHUFFLE", True)
    b = m(x)
    (gb,) = torch.autograd.grad(b.square().sum(), m.weight)
    assert a.shape == (2, 4, 10, 14)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-4)
    assert list(m.state_dict()) == ["weight", "bias"]  # checkpoints of either form load in the other
