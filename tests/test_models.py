"""The networks: the forward contract, backbones and output strides, config errors, pretrained loading."""

from __future__ import annotations

import hashlib
import http.server
import socket
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import torchvision
from omegaconf import DictConfig, OmegaConf

from segtrain.config import ModelConfig
from segtrain.errors import ConfigError
from segtrain.models import backbones
from segtrain.models.blocks import SafeBatchNorm2d
from segtrain.models.build import build_model, count_parameters
from segtrain.models.deconvnet import DeconvNet
from segtrain.models.fcn import VGGFullyConv

REPO = Path(__file__).resolve().parents[1]
H, W = 97, 131  # odd, and no multiple of 8, 16 or 32
K = 3  # classes


pytestmark = pytest.mark.usefixtures("one_thread")  # one intra-op thread keeps this file at ~20 s either way


def model_cfg(**kw) -> DictConfig:
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), kw)


def build(num_classes: int = K, in_channels: int = 3, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(model_cfg(**kw), num_classes, in_channels)


# Every network and its key variants, small enough for a 2-core CPU.
CASES = {
    "unet": dict(name="unet", base_channels=4),
    "unet-resnet18": dict(name="unet", backbone="resnet18", base_channels=4),
    "fcn32s-resnet18": dict(name="fcn", backbone="resnet18", variant="32s"),
    "fcn16s-resnet18": dict(name="fcn", backbone="resnet18", variant="16s"),
    "fcn8s-resnet18-aux": dict(name="fcn", backbone="resnet18", variant="8s", aux=True),
    "fcn8s-mobilenet-os16": dict(name="fcn", backbone="mobilenet_v3_large", variant="8s", output_stride=16),
    "deconvnet": dict(name="deconvnet", base_channels=4),
    "segnet": dict(name="deconvnet", base_channels=4, variant="segnet"),
    "pspnet-resnet18-aux": dict(name="pspnet", backbone="resnet18", aux=True),
    "pspnet-mobilenet-aux": dict(name="pspnet", backbone="mobilenet_v3_large", aux=True),
    "deeplabv3-resnet18-aux": dict(name="deeplabv3", backbone="resnet18", aux=True),
    "deeplabv3plus-resnet18": dict(name="deeplabv3plus", backbone="resnet18"),
    "deeplabv3plus-mobilenet-os8": dict(name="deeplabv3plus", backbone="mobilenet_v3_large", output_stride=8),
    "segformer-b0": dict(name="segformer", variant="b0"),
    "upernet-resnet18-aux": dict(name="upernet", backbone="resnet18", aux=True, head_channels=16),
}


@pytest.mark.parametrize("case", list(CASES))
def test_output_size_and_aux_only_in_training(case):
    kw = CASES[case]
    model = build(**kw)
    x = torch.randn(1, 3, H, W)
    with torch.no_grad():
        model.eval()
        y = model(x)
        assert torch.is_tensor(y) and y.shape == (1, K, H, W)
        model.train()
        y = model(torch.randn(2, 3, H, W))
    if kw.get("aux"):
        assert set(y) == {"out", "aux"}
        assert y["out"].shape == y["aux"].shape == (2, K, H, W)
    else:
        assert torch.is_tensor(y) and y.shape == (2, K, H, W)


@pytest.mark.parametrize("case", list(CASES))
def test_bf16_autocast_channels_last(case):
    model = build(**CASES[case]).to(memory_format=torch.channels_last).eval()
    x = torch.randn(1, 3, 64, 75).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.shape == (1, K, 64, 75) and torch.isfinite(y.float()).all()


def test_fcn_vgg16_paper_network():
    model = build(name="fcn", backbone="vgg16", variant="8s").eval()
    assert 134_000_000 < count_parameters(model) < 135_000_000  # the paper's FCN-8s: 134M
    with torch.no_grad():
        assert model(torch.randn(1, 3, 67, 93)).shape == (1, K, 67, 93)


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_large"])
def test_pspnet_batch_size_1(backbone):
    """The 1x1 pyramid bin holds one value per channel at batch size 1: training must still work."""
    model = build(name="pspnet", backbone=backbone, aux=True).train()
    out = model(torch.randn(1, 3, 65, 71))
    (out["out"].mean() + 0.4 * out["aux"].mean()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 65, 71)).shape == (1, K, 65, 71)


def test_deeplab_image_pooling_batch_size_1():
    model = build(name="deeplabv3", backbone="resnet18").train()
    model(torch.randn(1, 3, 64, 64)).mean().backward()


def test_safe_batchnorm():
    torch.manual_seed(0)
    safe, plain = SafeBatchNorm2d(4), torch.nn.BatchNorm2d(4)
    x = torch.randn(3, 4, 1, 1)  # two or more values: plain BatchNorm
    assert torch.allclose(safe(x), plain(x))
    assert torch.allclose(safe.running_mean, plain.running_mean)
    one = torch.randn(1, 4, 1, 1)  # one value per channel: running statistics, left as they are
    before = safe.running_mean.clone()
    expected = (one - before[None, :, None, None]) / torch.sqrt(safe.running_var[None, :, None, None] + safe.eps)
    assert torch.allclose(safe(one), expected, atol=1e-6)
    assert torch.equal(safe.running_mean, before)


@pytest.mark.parametrize("case", ["unet", "pspnet-resnet18-aux"])
def test_loss_falls_on_a_tiny_problem(case):
    torch.manual_seed(0)
    target = torch.zeros(2, 48, 48, dtype=torch.long)
    target[:, :, 24:] = 1
    target[:, 30:, :] = 2
    x = F.one_hot(target, 3).permute(0, 3, 1, 2).float() + 0.1 * torch.randn(2, 3, 48, 48)
    model = build(**CASES[case]).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        out = model(x)
        if isinstance(out, dict):
            loss = F.cross_entropy(out["out"], target) + 0.4 * F.cross_entropy(out["aux"], target)
        else:
            loss = F.cross_entropy(out, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


# --- backbones ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_large", "vgg16"])
@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_backbone_pyramid_and_output_stride(name, output_stride):
    if name == "vgg16" and output_stride != 32:
        with pytest.raises(ConfigError, match="output_stride=32"):
            backbones.build_backbone(name, output_stride)
        return
    backbone = backbones.build_backbone(name, output_stride).eval()
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in features] == backbone.channels
    assert (
        [64 // f.shape[-1] for f in features] == backbone.strides == [min(s, output_stride) for s in (2, 4, 8, 16, 32)]
    )


def test_resnet_basic_block_dilation_follows_torchvision():
    """torchvision dilates only Bottleneck ResNets; ResNet-18/34 get the same rule: the strided conv keeps the
    previous dilation, every conv after it gets the new one."""
    backbone = backbones.build_backbone("resnet18", 8)
    layer3, layer4 = backbone.stages[3], backbone.stages[4]
    dilations = [(b.conv1.dilation[0], b.conv2.dilation[0]) for b in (*layer3, *layer4)]
    assert dilations == [(1, 2), (2, 2), (2, 4), (4, 4)]
    assert all(m.stride == (1, 1) for m in backbone.stages[3:].modules() if isinstance(m, torch.nn.Conv2d))


def test_mobilenet_dilation_matches_torchvision():
    ours = backbones.build_backbone("mobilenet_v3_large", 16)
    theirs = torchvision.models.mobilenet_v3_large(dilated=True).features

    def geometry(module):
        return [(c.stride, c.dilation, c.padding) for c in module.modules() if isinstance(c, torch.nn.Conv2d)]

    assert geometry(ours) == geometry(theirs)


def test_deeplabv3_resnet50_matches_torchvision_parameter_count():
    ours = build(21, name="deeplabv3", backbone="resnet50", output_stride=8, aux=False)
    theirs = torchvision.models.segmentation.deeplabv3_resnet50(
        weights=None, weights_backbone=None, num_classes=21, aux_loss=False
    )
    assert count_parameters(ours) == count_parameters(theirs) == 39_638_869


@pytest.mark.parametrize(
    "name, torchvision_name, aux", [("deeplabv3", "deeplabv3_resnet50", True), ("fcn", "fcn_resnet50", False)]
)
def test_resnet50_networks_compute_torchvisions_function(name, torchvision_name, aux):
    """torchvision's weights (random, BN statistics too) loaded tensor by tensor in order give the same output,
    borders included: dilations and ASPP rates at output stride 8, FCN's upsampling, the aux head on C4."""
    torch.manual_seed(0)
    theirs = getattr(torchvision.models.segmentation, torchvision_name)(
        weights=None, weights_backbone=None, num_classes=K, aux_loss=aux
    ).eval()
    for m in theirs.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 2.0)
    extra = {"variant": "32s"} if name == "fcn" else {}
    ours = build(K, name=name, backbone="resnet50", output_stride=8, aux=aux, **extra).eval()
    keys = [[k for k in net.state_dict() if not k.endswith("num_batches_tracked")] for net in (ours, theirs)]
    assert len(keys[0]) == len(keys[1])
    ours.load_state_dict({a: theirs.state_dict()[b] for a, b in zip(*keys)}, strict=False)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x)["out"], rtol=1e-4, atol=1e-4)
        if aux:
            ours.train(), theirs.train()
            ours.apply(lambda m: m.eval() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) else None)
            theirs.apply(lambda m: m.eval() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) else None)
            torch.manual_seed(1)
            a = ours(x)["aux"]
            torch.manual_seed(1)
            torch.testing.assert_close(a, theirs(x)["aux"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["fcn", "unet", "deeplabv3plus"])
def test_one_image_whose_deepest_map_is_one_pixel_trains(name):
    """Batch 1 at 32 px: torchvision's backbone BNs see one value per channel at stride 32 (SafeBatchNorm2d)."""
    model = build(K, name=name, backbone="resnet18").train()
    out = model(torch.randn(1, 3, 32, 32))
    (out["out"] if isinstance(out, dict) else out).sum().backward()
    assert not [m for m in model.modules() if type(m) is torch.nn.BatchNorm2d]


def test_vgg_fc_layers_become_convolutions():
    """fc6 as a 7x7 conv on a 7x7 pool5 map computes exactly the linear layer (its centre pixel)."""
    torch.manual_seed(0)
    head = VGGFullyConv(512, K, width=8).eval()
    fc6, fc7 = torch.nn.Linear(512 * 49, 8), torch.nn.Linear(8, 8)
    head.load_fc(
        {
            "classifier.0.weight": fc6.weight,
            "classifier.0.bias": fc6.bias,
            "classifier.3.weight": fc7.weight,
            "classifier.3.bias": fc7.bias,
        }
    )
    pool5 = torch.randn(1, 512, 7, 7)
    with torch.no_grad():
        conv = head.fc7(head.fc6(pool5).relu())[0, :, 3, 3]
        linear = fc7(fc6(pool5.flatten(1)).relu())[0]
    assert torch.allclose(conv, linear, atol=1e-4)


def test_segnet_decoder_mirrors_the_encoder_as_its_prototxt():
    """SegNet's decoder has VGG16's 13 convs in reverse, the last one (conv1_1_D) the 3x3 classifier; the
    DeconvNet decoder mirrors all 13 with transposed convs and scores with a 1x1 conv."""
    segnet, deconvnet = DeconvNet(12, base_channels=64, variant="segnet"), DeconvNet(12, base_channels=64)
    assert [len(s) for s in segnet.decoder] == [3, 3, 3, 2, 1] and segnet.classifier.kernel_size == (3, 3)
    assert [len(s) for s in deconvnet.decoder] == [3, 3, 3, 2, 2] and deconvnet.classifier.kernel_size == (1, 1)
    assert count_parameters(segnet) == pytest.approx(29.5e6, rel=0.01)  # the paper's 29.5M (CamVid, 12 classes)


def test_deconvnet_encoder_takes_vgg16_bn_weights():
    """Pretrained DeconvNet/SegNet: VGG16-BN's conv biases fold into the BN running means; same function."""
    torch.manual_seed(0)
    vgg = backbones.build_backbone("vgg16_bn", 32).eval()
    for m in vgg.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    state = {"features." + k.split(".", 2)[2]: v for k, v in vgg.state_dict().items()}
    net = DeconvNet(K, base_channels=64, variant="segnet")
    net.load_vgg16(state)
    net.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        y = x
        for stage in net.encoder:
            y = net.pool(stage(y))[0]
        assert torch.allclose(y, vgg(x)[-1], atol=1e-4)


# --- other input bands than RGB -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        "unet",
        "unet-resnet18",
        "deconvnet",
        "fcn8s-mobilenet-os16",
        "pspnet-resnet18-aux",
        "deeplabv3plus-resnet18",
        "segformer-b0",
    ],
)
def test_any_number_of_bands(case):
    for bands in (1, 5):
        model = build(in_channels=bands, **CASES[case]).eval()
        first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        assert first.in_channels == bands and first.weight.shape[1] == bands
        with torch.no_grad():
            assert model(torch.randn(1, bands, 45, 61)).shape == (1, K, 45, 61)


def _repeat_bands(x: torch.Tensor, bands: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a 3-band input, the same for ``bands`` bands): 1 band is gray with R = G = B, more repeat R, G, B."""
    if bands == 1:
        x = x[:, :1].expand(-1, 3, -1, -1)
        return x, x[:, :1]
    return x, x.repeat(1, bands // 3, 1, 1)


@pytest.mark.parametrize("bands", [1, 6])
def test_pretrained_first_layer_adapted_keeps_the_output(torch_home, bands):
    """ImageNet weights for other bands, as smp adapts them: bands that repeat RGB give the RGB network's output."""
    torch.manual_seed(1)
    torch_home.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), torch_home / "resnet18-f37072fd.pth")
    kw = dict(name="deeplabv3", backbone="resnet18", pretrained=True)
    rgb, other = build(**kw).eval(), build(in_channels=bands, **kw).eval()  # same seed: same heads
    x, xb = _repeat_bands(torch.randn(2, 3, 40, 56), bands)
    with torch.no_grad():
        torch.testing.assert_close(other(xb), rgb(x), rtol=1e-4, atol=1e-4)
        other.backbone.stages[0][0].weight.mul_(bands / 3)  # without smp's scaling (or with a mean for 1 band)
        assert not torch.allclose(other(xb), rgb(x), atol=1e-3)
    if bands == 6:  # 4 bands: R, G, B, R, scaled by 3/4
        w = backbones.build_backbone("resnet18", pretrained=True, in_channels=4).stages[0][0].weight
        torch.testing.assert_close(w[:, 3], w[:, 0])
        torch.testing.assert_close(w[:, :3] * 4 / 3, rgb.backbone.stages[0][0].weight)


@pytest.mark.parametrize("name", ["mobilenet_v3_large", "vgg16"])
def test_pretrained_adaptation_other_encoders(name):
    torch.manual_seed(2)
    if name == "vgg16":
        state = {"features." + k.split(".", 2)[2]: v for k, v in backbones.build_backbone("vgg16").state_dict().items()}
    else:
        state = torchvision.models.mobilenet_v3_large().state_dict()
    rgb = backbones.build_backbone(name, state=state).eval()
    six = backbones.build_backbone(name, state=state, in_channels=6).eval()
    x, x6 = _repeat_bands(torch.randn(1, 3, 64, 64), 6)
    with torch.no_grad():
        torch.testing.assert_close(six(x6)[-1], rgb(x)[-1], rtol=1e-4, atol=1e-4)


def test_pretrained_deconvnet_adapts_vgg16_bn():
    torch.manual_seed(0)
    vgg = backbones.build_backbone("vgg16_bn", 32).eval()
    state = {"features." + k.split(".", 2)[2]: v for k, v in vgg.state_dict().items()}
    net = DeconvNet(K, base_channels=64, variant="segnet", in_channels=6)
    net.load_vgg16(state)
    net.eval()
    x, x6 = _repeat_bands(torch.randn(1, 3, 32, 32), 6)
    with torch.no_grad():
        y = x6
        for stage in net.encoder:
            y = net.pool(stage(y))[0]
        torch.testing.assert_close(y, vgg(x)[-1], rtol=1e-4, atol=1e-4)


def test_timm_backbone_other_bands():
    pytest.importorskip("timm")
    model = build(name="deeplabv3plus", backbone="timm:resnet18d", output_stride=16, in_channels=4).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 4, 65, 71)).shape == (1, K, 65, 71)


# --- config errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(name="pspnet", backbone="resnet999"), "unknown model.backbone 'resnet999'; choose one of: resnet18"),
        (dict(name="pspnet", backbone="vgg16"), "vgg16 cannot run at model.output_stride=8"),
        (dict(name="deeplabv3", backbone="vgg16_bn", output_stride=16), "set model.output_stride=32"),
        (dict(name="fcn", backbone="resnet18", variant="4s"), "unknown model.variant '4s' for fcn; choose one of"),
        (dict(name="deconvnet", variant="unet"), "choose one of: deconvnet, segnet"),
        (dict(name="pspnet", backbone="resnet18", variant="8s"), "model.variant=8s is not used by model=pspnet"),
        (dict(name="deconvnet", backbone="resnet18"), "remove model.backbone"),
        (dict(name="deconvnet", pretrained=True), "needs model.base_channels=64"),
        (dict(name="deconvnet", aux=True), "model.aux=true is not used by model=deconvnet"),
        (dict(name="unet", pretrained=True), "set model.backbone"),
        (dict(name="unet", backbone="resnet18", output_stride=8), "not supported by unet"),
        (dict(name="unet", aux=True), "model.aux=true is not used by model=unet"),
        (dict(name="nope"), "unknown model.name 'nope'"),
    ],
)
def test_config_errors_are_one_clear_line(kw, match):
    with pytest.raises(ConfigError, match=match) as info:
        build(**kw)
    assert "\n" not in str(info.value)


def test_timm_backbone_without_timm(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(ConfigError, match="needs the timm package"):
        build(name="deeplabv3", backbone="timm:resnet50d")


def test_timm_backbone_with_timm():
    pytest.importorskip("timm")
    model = build(name="deeplabv3plus", backbone="timm:resnet18d", output_stride=16).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 65, 71)).shape == (1, K, 65, 71)


# --- timm encoders with four levels (strides 4-32) -----------------------------------------------------------------

TIMM_4 = {
    "unet": dict(name="unet", base_channels=4),
    "fcn8s": dict(name="fcn", variant="8s", aux=True),
    "pspnet": dict(name="pspnet", aux=True),  # output stride 8: ConvNeXt dilates its last two stages
    "deeplabv3": dict(name="deeplabv3"),  # output stride 16
    "deeplabv3plus": dict(name="deeplabv3plus", aux=True),
}


@pytest.mark.parametrize("case", list(TIMM_4))
def test_four_level_timm_encoder_in_every_network(case):
    """ConvNeXt (random weights) has no stride-2 map: C1 is None and each network still maps any size to itself."""
    pytest.importorskip("timm")
    model = build(backbone="timm:convnext_atto", **TIMM_4[case])
    bb = model.backbone
    assert bb.channels[0] == 0 and bb.channels[1:] == [40, 80, 160, 320]
    c = bb(torch.randn(1, 3, H, W))
    assert c[0] is None
    for f, s in zip(c[1:], bb.strides[1:]):  # every map covers the whole input: ceil(size / stride)
        assert f.shape[-2:] == (-(-H // s), -(-W // s)), (f.shape, s)
    out = model.train()(torch.randn(2, 3, H, W))
    logits = out["out"] if isinstance(out, dict) else out
    assert logits.shape == (2, K, H, W) and (not isinstance(out, dict) or out["aux"].shape == (2, K, H, W))
    logits.mean().backward()
    assert bb.model.stem_0.weight.grad is not None
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 48)).shape == (1, K, 64, 48)


@pytest.fixture
def small_swin(monkeypatch):
    """timm's Swin-T with one block per stage and narrow widths (the same code path, a fraction of the cost)."""
    timm = pytest.importorskip("timm")
    create = timm.create_model

    def small(name, **kw):
        if name.startswith("swin"):
            kw.update(embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
        return create(name, **kw)

    monkeypatch.setattr(timm, "create_model", small)


def test_swin_encoder_any_size_and_no_dilation(small_swin):
    """Swin gives channels-last maps and needs sizes divisible by its patch: padded, permuted, cropped back."""
    name = "timm:swin_tiny_patch4_window7_224"
    model = build(name="deeplabv3plus", backbone=name, output_stride=32).eval()
    assert model.backbone.nhwc and model.backbone.channels == [0, 24, 48, 96, 192]
    with torch.no_grad():
        assert model(torch.randn(1, 3, 65, 71)).shape == (1, K, 65, 71)
    with pytest.raises(ConfigError, match=r"cannot run at model.output_stride=16: timm has no dilated variant") as e:
        build(name="deeplabv3", backbone=name)  # DeepLabv3's default output stride is 16
    assert "\n" not in str(e.value) and "model.output_stride=32" in str(e.value)


def test_timm_pretrained_weights_that_cannot_download_are_named_at_any_output_stride(monkeypatch):
    """Offline, a dilatable timm encoder's failing download is reported as such, not as "no dilated variant"."""
    timm = pytest.importorskip("timm")
    create = timm.create_model

    def offline(name, **kw):
        if kw.get("pretrained"):
            raise OSError("We couldn't connect to huggingface.co")
        return create(name, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ConfigError, match=r"timm could not create it with its pretrained weights .*huggingface"):
        backbones.build_backbone("timm:resnet18d", 16, pretrained=True)


def test_timm_encoder_with_other_strides_is_refused():
    """gMLP's maps all have stride 16 but it is no ViT (plain ViTs get a pyramid: test_upernet.py)."""
    pytest.importorskip("timm")
    with pytest.raises(ConfigError, match=r"strides \[16, 16, 16\].*4 at strides 4-32"):
        build(name="deeplabv3", backbone="timm:gmlp_ti16_224", output_stride=32)


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "model").glob("*.yaml")), ids=lambda p: p.stem)
def test_model_yaml_files_build(path):
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path))
    if cfg.backbone is not None:
        cfg.backbone = "resnet18"  # the networks as configured, with a lighter encoder
    model = build_model(cfg, K)
    assert count_parameters(model) > 0


# --- pretrained weights --------------------------------------------------------------------------------------


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(backbones, "DOWNLOAD_TIMEOUT", 2.0)
    return tmp_path / "hub" / "checkpoints"


def _online() -> bool:
    try:
        socket.create_connection(("download.pytorch.org", 443), timeout=1).close()
        return True
    except OSError:
        return False


def test_pretrained_offline_fails_fast_with_url_and_cache_path(torch_home):
    if _online():
        pytest.skip("the network is up: this would download ResNet-18")
    start = time.monotonic()
    with pytest.raises(ConfigError) as info:
        build(name="pspnet", backbone="resnet18", pretrained=True)
    assert time.monotonic() - start < 5
    msg = str(info.value)
    assert "\n" not in msg
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in msg
    assert str(torch_home / "resnet18-f37072fd.pth") in msg
    assert "model.pretrained=false" in msg


def test_pretrained_download_never_hangs(torch_home):
    """A server that accepts the connection and never answers: a ConfigError after the timeout."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:
        url = f"http://127.0.0.1:{server.getsockname()[1]}/resnet18-f37072fd.pth"
        start = time.monotonic()
        with pytest.raises(ConfigError, match="could not be downloaded"):
            backbones.load_pretrained(SimpleNamespace(url=url))
        assert time.monotonic() - start < 5
    finally:
        server.close()


def test_pretrained_loads_from_the_hub_cache(torch_home):
    torch.manual_seed(1)
    state = torchvision.models.resnet18().state_dict()
    torch_home.mkdir(parents=True)
    torch.save(state, torch_home / "resnet18-f37072fd.pth")
    model = build(name="fcn", backbone="resnet18", pretrained=True)
    assert torch.equal(model.backbone.stages[0][0].weight, state["conv1.weight"])
    assert torch.equal(model.backbone.stages[4][1].conv2.weight, state["layer4.1.conv2.weight"])


def test_pretrained_corrupt_cache_file(torch_home):
    torch_home.mkdir(parents=True)
    (torch_home / "resnet18-f37072fd.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="delete the file to download it again"):
        build(name="pspnet", backbone="resnet18", pretrained=True)


def test_pretrained_download_checks_the_hash(torch_home, tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    torch.save({"w": torch.arange(3)}, served / "blob.pth")
    digest = hashlib.sha256((served / "blob.pth").read_bytes()).hexdigest()
    (served / f"tiny-{digest[:8]}.pth").write_bytes((served / "blob.pth").read_bytes())
    (served / "bad-00000000.pth").write_bytes((served / "blob.pth").read_bytes())

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(served), **kw)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        state = backbones.load_pretrained(SimpleNamespace(url=f"{base}/tiny-{digest[:8]}.pth"))
        assert torch.equal(state["w"], torch.arange(3))
        assert (torch_home / f"tiny-{digest[:8]}.pth").is_file()
        with pytest.raises(ConfigError, match="sha256"):
            backbones.load_pretrained(SimpleNamespace(url=f"{base}/bad-00000000.pth"))
        assert not (torch_home / "bad-00000000.pth").exists()
        assert not list(torch_home.glob("*.partial"))
    finally:
        server.shutdown()
        server.server_close()


# --- torch.compile (slow on a CPU) -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "case", ["pspnet-resnet18-aux", "deconvnet", "fcn8s-resnet18-aux", "segformer-b0", "upernet-resnet18-aux"]
)
def test_torch_compile(case):
    model = build(**CASES[case])
    compiled = torch.compile(model)
    out = compiled.train()(torch.randn(2, 3, 64, 80))
    (out["out"] if isinstance(out, dict) else out).mean().backward()
    with torch.no_grad():
        assert compiled.eval()(torch.randn(2, 3, 64, 80)).shape == (2, K, 64, 80)


def test_timm_convnext_deeplabv3plus_trains_in_a_smoke_run(tmp_path):
    """``segtrain debug=smoke model=deeplabv3plus model.backbone=timm:convnext_atto`` (in-process, 2 steps)."""
    pytest.importorskip("timm")
    from segtrain.build import build_trainer
    from segtrain.config import validate
    from tests.test_config import composed

    cfg = composed("debug=smoke", "model=deeplabv3plus", "model.backbone=timm:convnext_atto", "device=cpu",
                   "trainer.max_iters=2", "data.num_val=4", "trainer.num_vis=0", "trainer.progress=false", "logger=[]")  # fmt: skip
    validate(cfg)
    summary = build_trainer(cfg, tmp_path).fit()
    assert summary["step"] == 2 and 0 <= summary["best_miou"] <= 1
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert any(k.startswith("backbone.model.stages_3") for k in state["model"])


def test_a_plain_unet_loads_neither_torchvision_nor_the_compiler():
    """A U-Net is built (every network's module imported), and the backends set, without importing torchvision or
    torch._dynamo (which torchvision and torch.use_deterministic_algorithms import): seconds of start-up of every
    command on a small CPU."""
    import subprocess

    code = (
        "import sys, torch\n"
        "from omegaconf import OmegaConf\n"
        "from segtrain.config import ModelConfig\n"
        "from segtrain.models.build import build_model\n"
        "from segtrain.runtime import configure_backends\n"
        "build_model(OmegaConf.merge(OmegaConf.structured(ModelConfig), {'name': 'unet'}), 3)\n"
        "configure_backends(torch.device('cpu'), False, False)\n"
        "heavy = [m for m in ('torchvision', 'torch._dynamo', 'torch._inductor') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "configure_backends(torch.device('cpu'), True, False)\n"
        "assert torch.are_deterministic_algorithms_enabled()\n"
        "configure_backends(torch.device('cpu'), False, False)\n"
        "assert not torch.are_deterministic_algorithms_enabled()\n"
        "from segtrain.models.backbones import imagenet_weights\n"
        "assert 'resnet18' in imagenet_weights('resnet18').url\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
