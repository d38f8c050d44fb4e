"""segtrain.inference: whole / slide / multi-scale / flip prediction."""

import pytest
import torch
from torch import nn

from segtrain.inference import predict, slide_windows
from segtrain.models.unet import UNet

K = 3


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet(num_classes=K, base_channels=4, depth=2).eval()


def pixel_model() -> nn.Module:
    """A per-pixel (1x1 conv) model: translation- and flip-equivariant, no context."""
    return nn.Conv2d(3, K, kernel_size=1).eval()


class Counter(nn.Module):
    """Wraps a model and records the spatial size of every call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        return self.model(x)


@torch.no_grad()
def test_whole_is_model_output(unet):
    x = torch.randn(2, 3, 40, 56)
    out = predict(unet, x, K)
    assert out.dtype == torch.float32 and out.shape == (2, K, 40, 56)
    assert torch.equal(out, unet(x))


@torch.no_grad()
@pytest.mark.parametrize("crop", [(40, 56), (64, 64), 100])
def test_slide_with_covering_crop_equals_whole(unet, crop):
    x = torch.randn(1, 3, 40, 56)
    counted = Counter(unet)
    out = predict(counted, x, K, mode="slide", crop_size=crop, stride=8)
    assert len(counted.calls) == 1
    assert torch.equal(out, predict(unet, x, K))


@torch.no_grad()
def test_slide_small_crop_on_real_net_runs_windows(unet):
    x = torch.randn(2, 3, 40, 56)
    counted = Counter(unet)
    out = predict(counted, x, K, mode="slide", crop_size=(24, 24), stride=16)
    # rows: ceil((40-24)/16)+1 = 2, cols: ceil((56-24)/16)+1 = 3; each call is a batch of both images
    assert counted.calls == [(2, 3, 24, 24)] * 6
    assert out.shape == (2, K, 40, 56) and torch.isfinite(out).all()
    # a U-Net has context: cropping changes the answer somewhere (the test would notice a no-op slide)
    assert not torch.allclose(out, predict(unet, x, K))


@pytest.mark.parametrize(
    "size,crop,stride",
    [
        ((37, 53), (16, 16), (11, 11)),
        ((37, 53), (16, 24), (5, 24)),
        ((20, 9), (7, 3), (7, 1)),
        ((5, 5), (16, 16), (11, 11)),
    ],
)
def test_slide_windows_cover_every_pixel(size, crop, stride):
    h, w = size
    count = torch.zeros(h, w, dtype=torch.int64)
    windows = slide_windows(h, w, crop, stride)
    for y1, y2, x1, x2 in windows:
        assert 0 <= y1 < y2 <= h and 0 <= x1 < x2 <= w
        assert y2 - y1 == min(crop[0], h) and x2 - x1 == min(crop[1], w)  # never padded, never shrunk
        count[y1:y2, x1:x2] += 1
    assert int(count.min()) >= 1
    ys, xs = {wd[0] for wd in windows}, {wd[2] for wd in windows}
    assert max(ys) == max(h - crop[0], 0) and max(xs) == max(w - crop[1], 0)  # last window ends at the border


def test_slide_windows_mmseg_grid():
    wins = slide_windows(37, 53, (16, 16), (11, 11))
    assert sorted({w[0] for w in wins}) == [0, 11, 21]  # third row shifted back from 22 to end at 37
    assert sorted({w[2] for w in wins}) == [0, 11, 22, 33, 37]


@torch.no_grad()
@pytest.mark.parametrize("crop,stride", [(16, 11), ((16, 24), (5, 24)), (7, None), ((37, 8), (1, 3))])
def test_slide_equals_whole_for_per_pixel_model(crop, stride):
    model = pixel_model()
    x = torch.randn(2, 3, 37, 53)
    whole = predict(model, x, K)
    slide = predict(model, x, K, mode="slide", crop_size=crop, stride=stride)
    assert slide.shape == whole.shape
    torch.testing.assert_close(slide, whole, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_slide_averages_logits_over_overlaps():
    # a model returning all-ones logits per window -> average 1 everywhere; the count divides correctly
    # only if overlaps are counted: a sum without division would give 1, 2, 4 ... on overlaps
    def ones(x):
        return torch.ones(x.shape[0], K, *x.shape[-2:])

    out = predict(ones, torch.zeros(1, 3, 37, 53), K, mode="slide", crop_size=16, stride=11)
    torch.testing.assert_close(out, torch.ones(1, K, 37, 53))


@torch.no_grad()
def test_single_scale_no_flip_equals_whole(unet):
    x = torch.randn(1, 3, 40, 56)
    assert torch.equal(predict(unet, x, K, scales=[1.0], flip=False), unet(x))
    assert torch.equal(predict(unet, x, K, scales=(1.0,)), unet(x))


@torch.no_grad()
def test_flip_with_equivariant_model():
    model = pixel_model()
    x = torch.randn(2, 3, 33, 47)
    whole = predict(model, x, K)
    flipped = predict(model, x, K, flip=True)
    assert torch.equal(flipped.argmax(1), whole.argmax(1))
    torch.testing.assert_close(flipped.exp(), whole.softmax(1), rtol=0, atol=1e-5)


@torch.no_grad()
def test_flip_unflips_scores():
    # a model that is NOT flip-equivariant: logits depend on the column index. Averaging the view with
    # its un-flipped mirror must be symmetric under mirroring the input.
    def column_model(x):
        col = torch.arange(x.shape[-1], dtype=torch.float32).expand(x.shape[0], 1, x.shape[-2], -1)
        return torch.cat([col, -col, x[:, :1]], dim=1)

    x = torch.randn(1, 3, 8, 11)
    out = predict(column_model, x, K, flip=True)
    mirrored = predict(column_model, x.flip(-1), K, flip=True)
    torch.testing.assert_close(out, mirrored.flip(-1), rtol=1e-5, atol=1e-5)
    # and it really mixed two views (without the un-flip, class 0 would win on the right only)
    assert not torch.allclose(out, predict(column_model, x, K).log_softmax(1), atol=1e-3)


@torch.no_grad()
@pytest.mark.parametrize("size", [(37, 53), (41, 29)])
@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_multiscale_keeps_input_size(unet, size, mode):
    x = torch.randn(2, 3, *size)
    counted = Counter(unet)
    out = predict(counted, x, K, mode=mode, crop_size=24, scales=[0.5, 0.75, 1.25])
    assert out.shape == (2, K, *size) and out.dtype == torch.float32
    sizes = {c[-2:] for c in counted.calls}
    if mode == "whole":
        h, w = size
        assert sizes == {(round(h * s), round(w * s)) for s in (0.5, 0.75, 1.25)}
    else:
        assert all(hh <= 24 and ww <= 24 for hh, ww in sizes)
    probs = out.exp()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(probs.sum(1), torch.ones(2, *size), rtol=0, atol=1e-4)


@torch.no_grad()
def test_multiscale_per_pixel_model_is_close_to_whole():
    # constant image: every scale's prediction is the same constant -> log-mean-softmax == log_softmax(whole)
    model = pixel_model()
    x = torch.randn(1, 3, 1, 1).expand(1, 3, 37, 53).contiguous()
    out = predict(model, x, K, scales=[0.5, 1.0, 1.5], flip=True)
    torch.testing.assert_close(out, predict(model, x, K).log_softmax(1), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_single_non_unit_scale_returns_resized_logits(unet):
    x = torch.randn(1, 3, 40, 56)
    out = predict(unet, x, K, scales=[0.5])
    assert out.shape == (1, K, 40, 56)
    assert not torch.allclose(out.logsumexp(1), torch.zeros(1, 40, 56))  # logits, not log-probabilities


@torch.no_grad()
@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_dict_output(mode):
    base = pixel_model()

    def dict_model(x):
        return {"out": base(x), "aux": base(x) * 0}

    x = torch.randn(1, 3, 30, 30)
    out = predict(dict_model, x, K, mode=mode, crop_size=16, stride=8)
    torch.testing.assert_close(out, base(x), rtol=1e-5, atol=1e-5)
    out = predict(dict_model, x, K, mode=mode, crop_size=16, flip=True, scales=[1.0, 0.5])
    assert out.shape == (1, K, 30, 30)


@torch.no_grad()
def test_half_precision_logits_are_cast_to_float32():
    base = pixel_model()
    out = predict(lambda x: base(x).half(), torch.randn(1, 3, 8, 8), K)
    assert out.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"mode": "sliding"}, "mode"),
        ({"mode": "slide"}, "crop_size"),
        ({"mode": "slide", "crop_size": 0}, "crop_size"),
        ({"mode": "slide", "crop_size": (16, -1)}, "crop_size"),
        ({"mode": "slide", "crop_size": "16"}, "crop_size"),
        ({"mode": "slide", "crop_size": 16, "stride": 0}, "stride"),
        ({"mode": "slide", "crop_size": 16, "stride": 17}, "stride"),
        ({"scales": [1.0, 0.0]}, "scales"),
        ({"scales": [-0.5]}, "scales"),
        ({"scales": []}, "scales"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        predict(pixel_model(), torch.randn(1, 3, 8, 8), K, **kwargs)


def test_wrong_num_classes_raises():
    with pytest.raises(ValueError, match="expected"):
        predict(pixel_model(), torch.randn(1, 3, 8, 8), K + 1)


# --- one sigmoid logit -------------------------------------------------------------------------------


def test_one_logit_tta_averages_sigmoid_probabilities():
    from segtrain.inference import labels

    model = UNet(num_classes=1, base_channels=4, depth=2).eval()
    x = torch.randn(2, 3, 24, 30)
    with torch.no_grad():
        views = [model(x), model(x.flip(-1)).flip(-1)]
        scores = predict(model, x, 1, flip=True)
    expect = torch.logit((views[0].sigmoid() + views[1].sigmoid()) / 2, eps=1e-8)
    assert scores.shape == (2, 1, 24, 30)
    torch.testing.assert_close(scores, expect, rtol=1e-5, atol=1e-5)
    # not the softmax rule: over one channel it would give log(1) = 0 everywhere
    assert scores.abs().max() > 1e-3
    p = scores.sigmoid()[:, 0]
    for t in (0.3, 0.5, 0.7):
        assert torch.equal(labels(scores, t), (p > t).long())
    many = torch.randn(2, K, 5, 5)
    assert torch.equal(labels(many, 0.9), many.argmax(1))  # K > 1: argmax, the threshold plays no part


class Constant(nn.Module):
    """Scores ``value`` everywhere, whatever the input (a saturated, confident network)."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value

    def forward(self, x):
        return self.value.to(x.dtype).expand(x.shape[0], -1, *x.shape[-2:])


@pytest.mark.parametrize("logit", [30.0, -40.0, 100.0])
def test_tta_of_saturated_views_stays_finite_and_exact(logit):
    """Averaging in probability space made logit(1.0) = +inf (float32 cannot hold 1 - 1e-8): log space keeps
    the exact logit of the mean sigmoid / log of the mean softmax."""
    x = torch.randn(1, 3, 8, 10)
    one = predict(Constant(torch.tensor([logit])[:, None, None]), x, 1, flip=True, scales=[1.0, 0.5])
    assert torch.isfinite(one).all()
    torch.testing.assert_close(one, torch.full_like(one, logit), rtol=1e-5, atol=1e-4)
    z = torch.tensor([logit, 0.0, -logit])
    many = predict(Constant(z[:, None, None]), x, 3, flip=True)
    assert torch.isfinite(many).all()
    expect = torch.log_softmax(z.double(), 0).float()[None, :, None, None].expand_as(many)
    torch.testing.assert_close(many, expect, rtol=1e-5, atol=1e-4)
