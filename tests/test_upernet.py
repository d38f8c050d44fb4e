"""UPerNet: parameter counts against mmsegmentation's config and transformers' model, the head's function against
transformers' head, any backbone (torchvision, timm 4-level, plain ViT) at odd sizes, training with the aux head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from segtrain.config import ModelConfig
from segtrain.errors import ConfigError
from segtrain.models.blocks import FCNHead
from segtrain.models.build import build_model, count_parameters
from segtrain.models.upernet import UPerHead

pytestmark = pytest.mark.usefixtures("one_thread")
H, W, K = 97, 131, 3


def build(num_classes: int = K, **kw):
    torch.manual_seed(0)
    return build_model(
        OmegaConf.merge(OmegaConf.structured(ModelConfig), {"name": "upernet", "aux": True, **kw}), num_classes
    )


def conv_bn(cin: int, cout: int, k: int) -> int:
    """A conv without bias followed by BatchNorm (mmcv's ConvModule)."""
    return cin * cout * k * k + 2 * cout


def test_resnet50_parameters_equal_mmsegmentations_config_and_transformers():
    """mmseg's upernet_r50 (UPerHead channels 512, pool scales 1-6; FCNHead 256 on stage 3) for 150 classes, by its
    formula; and transformers' UperNetForSemanticSegmentation with its ResNet-50 when installed.  mmseg's own
    ResNet-50-V1c has a deep stem (three 3x3 convs, 32-32-64) instead of one 7x7 conv: 19,232 more parameters."""
    c, ins, k = 512, [256, 512, 1024, 2048], 150
    head = (
        4 * conv_bn(2048, c, 1)  # PPM
        + conv_bn(2048 + 4 * c, c, 3)  # its bottleneck
        + sum(conv_bn(i, c, 1) for i in ins[:-1])  # laterals
        + 3 * conv_bn(c, c, 3)  # FPN convs
        + conv_bn(4 * c, c, 3)  # fusion
        + c * k
        + k  # classifier
    )
    aux = conv_bn(1024, 256, 3) + 256 * k + k
    with torch.device("meta"):
        model = build(k, backbone="resnet50", aux=True)
    parts = {name: count_parameters(m) for name, m in model.named_children()}
    assert parts == {"backbone": 23_508_032, "head": head, "aux_head": aux} and (head, aux) == (40_590_486, 2_398_358)
    assert count_parameters(model) == 66_496_876
    deep_stem = conv_bn(3, 32, 3) + conv_bn(32, 32, 3) + conv_bn(32, 64, 3) - conv_bn(3, 64, 7)
    assert count_parameters(model) + deep_stem == 66_516_108  # mmseg's ResNet-50-V1c
    transformers = pytest.importorskip("transformers")
    backbone = transformers.ResNetConfig(
        layer_type="bottleneck",
        depths=[3, 4, 6, 3],
        hidden_sizes=ins,
        embedding_size=64,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    cfg = transformers.UperNetConfig(backbone_config=backbone, auxiliary_in_channels=1024, num_labels=k)
    with torch.device("meta"):
        assert count_parameters(transformers.UperNetForSemanticSegmentation(cfg)) == 66_496_876


def test_head_computes_transformers_upernet_head():
    """transformers' UPerNet decode and auxiliary heads (a ConvNeXt backbone's channels, narrow widths), their
    weights copied by name into ours: the same logits from the same four feature maps of odd sizes."""
    transformers = pytest.importorskip("transformers")
    ins = [16, 32, 64, 128]
    backbone = transformers.ConvNextConfig(
        hidden_sizes=ins, depths=[1, 1, 1, 1], out_features=["stage1", "stage2", "stage3", "stage4"]
    )
    cfg = transformers.UperNetConfig(
        backbone_config=backbone, hidden_size=48, auxiliary_channels=24, auxiliary_in_channels=64, num_labels=5
    )
    torch.manual_seed(0)
    ref = transformers.UperNetForSemanticSegmentation(cfg).eval()
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5)
    head, aux = UPerHead(ins, 5, channels=48).eval(), FCNHead(64, 5, channels=24).eval()
    assert count_parameters(head) == count_parameters(ref.decode_head)
    assert count_parameters(aux) == count_parameters(ref.auxiliary_head)
    names = {
        "bottleneck.0": "bottleneck.conv",
        "bottleneck.1": "bottleneck.batch_norm",
        "classifier": "classifier",
        "fuse.0": "fpn_bottleneck.conv",
        "fuse.1": "fpn_bottleneck.batch_norm",
    }  # ours: transformers'
    for i in range(4):
        names |= {
            f"ppm.levels.{i}.1.0": f"psp_modules.{i}.1.conv",
            f"ppm.levels.{i}.1.1": f"psp_modules.{i}.1.batch_norm",
        }
    for i in range(3):
        names |= {
            f"lateral.{i}.0": f"lateral_convs.{i}.conv",
            f"lateral.{i}.1": f"lateral_convs.{i}.batch_norm",
            f"fpn.{i}.0": f"fpn_convs.{i}.conv",
            f"fpn.{i}.1": f"fpn_convs.{i}.batch_norm",
        }
    aux_names = {"0.0": "convs.0.conv", "0.1": "convs.0.batch_norm", "2": "classifier"}
    for ours, theirs, table in ((head, ref.decode_head, names), (aux, ref.auxiliary_head, aux_names)):
        state = theirs.state_dict()
        ours.load_state_dict(
            {k: state[f"{table[k.rpartition('.')[0]]}.{k.rpartition('.')[2]}"] for k in ours.state_dict()}
        )
    torch.manual_seed(1)
    features = [torch.randn(2, c, 25 // 2**i + 1, 33 // 2**i + 1) for i, c in enumerate(ins)]
    with torch.no_grad():
        torch.testing.assert_close(head(features), ref.decode_head(features), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(aux[2](aux[0](features[2])), ref.auxiliary_head(features), rtol=1e-4, atol=1e-4)


BACKBONES = {
    "resnet18": {"backbone": "resnet18"},
    "mobilenet-os16": {"backbone": "mobilenet_v3_large", "output_stride": 16},
    "convnext": {"backbone": "timm:convnext_atto"},
    "vit": {"backbone": "timm:vit_tiny_patch16_224"},
}


@pytest.mark.parametrize("case", list(BACKBONES))
def test_every_kind_of_backbone_at_odd_sizes(case):
    """Eval: logits at the input size; training: {"out", "aux"} at the input size, and a backward pass."""
    if BACKBONES[case]["backbone"].startswith("timm:"):
        pytest.importorskip("timm")
    model = build(head_channels=16, **BACKBONES[case])
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, H, W)).shape == (1, K, H, W)
    out = model.train()(torch.randn(2, 3, 65, 71))
    assert out["out"].shape == out["aux"].shape == (2, K, 65, 71)
    (out["out"].mean() + 0.4 * out["aux"].mean()).backward()
    assert all(p.grad is not None for p in model.head.parameters())


def test_loss_falls_and_aux_off():
    torch.manual_seed(0)
    target = torch.zeros(2, 48, 48, dtype=torch.long)
    target[:, :, 24:] = 1
    target[:, 30:] = 2
    x = F.one_hot(target, 3).permute(0, 3, 1, 2).float() + 0.1 * torch.randn(2, 3, 48, 48)
    model = build(backbone="resnet18", head_channels=32).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        out = model(x)
        loss = F.cross_entropy(out["out"], target) + 0.4 * F.cross_entropy(out["aux"], target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert build(backbone="resnet18", head_channels=8, aux=False).aux_head is None


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"variant": "b0"}, "model.variant=b0 is not used by model=upernet"),
        ({"backbone": "timm:vit_tiny_patch16_224", "output_stride": 8}, "a plain ViT has one map at stride 16"),
        ({"name": "deeplabv3", "head_channels": 64}, "model.head_channels=64 is not used by model=deeplabv3"),
    ],
)
def test_config_errors(kw, match):
    pytest.importorskip("timm")
    with pytest.raises(ConfigError, match=match) as e:
        build(**kw)
    assert "\n" not in str(e.value)
