"""The layers in segtrain/models/blocks.py, in particular that each alternative implementation is the same function."""

import pytest
import torch

from segtrain.models import blocks


@pytest.fixture
def flag():
    """Flip a module-level implementation switch for the block, restoring it after."""
    saved = {k: getattr(blocks, k) for k in ("BILINEAR_AS_INTERPOLATE", "UPCONV_AS_SHUFFLE")}
    yield lambda name, value: setattr(blocks, name, value)
    for k, v in saved.items():
        setattr(blocks, k, v)


@pytest.mark.parametrize("hw", [(4, 4), (7, 3), (1, 1), (5, 9)])
@pytest.mark.parametrize("factor", [2, 8, 32])
def test_fixed_bilinear_upsample_as_interpolation_is_the_same_function(flag, hw, factor):
    torch.manual_seed(0)
    up = blocks.FixedBilinearUpsample(3, factor)
    x = torch.randn(2, 3, *hw)
    flag("BILINEAR_AS_INTERPOLATE", False)
    conv = up(x)
    flag("BILINEAR_AS_INTERPOLATE", True)
    interp = up(x)
    assert conv.shape == interp.shape == (2, 3, hw[0] * factor, hw[1] * factor)
    torch.testing.assert_close(interp, conv, rtol=0, atol=1e-5)
    # the edges fade (zero padding): the first output row is not a copy of the first input row
    assert not torch.allclose(conv[..., 0, :], torch.nn.functional.interpolate(x, scale_factor=factor)[..., 0, :])


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


def test_fixed_bilinear_upsample_default_picks_the_form_by_device(flag):
    """None (the default): the transposed conv on a CPU and in exported graphs; interpolation on CUDA."""
    assert blocks.BILINEAR_AS_INTERPOLATE is None
    torch.manual_seed(0)
    up, x = blocks.FixedBilinearUpsample(3, 8), torch.randn(2, 3, 5, 9)
    flag("BILINEAR_AS_INTERPOLATE", False)
    conv = up(x)
    flag("BILINEAR_AS_INTERPOLATE", None)
    assert torch.equal(up(x), conv)  # the same kernel, bit for bit
    if torch.cuda.is_available():
        flag("BILINEAR_AS_INTERPOLATE", True)
        interp = up.cuda()(x.cuda())
        flag("BILINEAR_AS_INTERPOLATE", None)
        assert torch.equal(up(x.cuda()), interp)
        traced = torch.jit.trace(up, x.cuda())  # exported graphs keep the one transposed-conv operator
        assert "conv_transpose" in str(traced.graph) or "_convolution" in str(traced.graph)
