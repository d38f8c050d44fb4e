"""model.pretrained=PATH (torch files, .safetensors, Hugging Face folders; names found under any prefix) and
model.freeze_backbone=true."""

from __future__ import annotations

import copy
import re
import sys

import pytest
import torch
import torchvision
from omegaconf import OmegaConf

from segtrain.config import ModelConfig
from segtrain.errors import ConfigError
from segtrain.models.build import build_model
from segtrain.models.weights import read_safetensors, read_weights
from segtrain.optim import build_optimizer
from tests.safetensors_writer import save_safetensors

pytestmark = pytest.mark.usefixtures("one_thread")


def build(num_classes: int = 3, in_channels: int = 3, **kw):
    torch.manual_seed(0)
    return build_model(OmegaConf.merge(OmegaConf.structured(ModelConfig), kw), num_classes, in_channels)


@pytest.mark.parametrize("writer", ["safetensors", "by the format"])
def test_safetensors_reader(tmp_path, monkeypatch, writer):
    """Every common dtype, an empty and a 0-d tensor, as written by the safetensors package (when installed) and by
    the format's definition; broken files are one-line errors."""
    if writer == "safetensors":
        pytest.importorskip("safetensors")
    else:
        monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # import -> ImportError
    state = {
        "f32": torch.randn(3, 4),
        "f16": torch.randn(5).half(),
        "bf16": torch.randn(2, 3).bfloat16(),
        "i64": torch.arange(7),
        "u8": torch.arange(3, dtype=torch.uint8),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5),
    }
    save_safetensors(state, tmp_path / "w.safetensors")
    back = read_safetensors(tmp_path / "w.safetensors")
    assert back.keys() == state.keys()
    for k, v in state.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    data = (tmp_path / "w.safetensors").read_bytes()
    for name, content, match in [
        ("short", data[:5], "only 5 bytes"),
        ("cut", data[:-8], "do not hold"),
        ("huge", (10**9).to_bytes(8, "little") + data[8:], "header length"),
    ]:
        (tmp_path / f"{name}.safetensors").write_bytes(content)
        with pytest.raises(ConfigError, match=match) as e:
            read_weights(tmp_path / f"{name}.safetensors")
        assert "\n" not in str(e.value)


def test_torchvision_encoder_from_files(tmp_path):
    """A torchvision state dict saved by DataParallel (module. prefix) and an encoder-only .safetensors (no fc) give
    the same encoder; one band sums the RGB filters."""
    torch.manual_seed(1)
    state = torchvision.models.resnet18().state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "r18.pth")
    save_safetensors({k: v for k, v in state.items() if not k.startswith("fc.")}, tmp_path / "r18.safetensors")
    for name in ("r18.pth", "r18.safetensors"):
        model = build(name="deeplabv3plus", backbone="resnet18", pretrained=str(tmp_path / name))
        assert torch.equal(model.backbone.stages[4][1].conv2.weight, state["layer4.1.conv2.weight"])
        assert torch.equal(model.backbone.stages[0][1].running_var, state["bn1.running_var"])
    gray = build(1 + 2, 1, name="fcn", backbone="resnet18", pretrained=str(tmp_path / "r18.safetensors"))
    torch.testing.assert_close(gray.backbone.stages[0][0].weight, state["conv1.weight"].sum(1, keepdim=True))


def test_timm_encoder_and_vit_from_files(tmp_path):
    """timm classifiers' state dicts (with their heads): a ConvNeXt into features_only, a ViT into its pyramid."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(2)
    convnext = timm.create_model("convnext_atto").state_dict()
    save_safetensors(convnext, tmp_path / "convnext.safetensors")
    model = build(
        name="upernet",
        backbone="timm:convnext_atto",
        head_channels=8,
        pretrained=str(tmp_path / "convnext.safetensors"),
    )
    assert torch.equal(
        model.backbone.model.stages_3.blocks[0].conv_dw.weight, convnext["stages.3.blocks.0.conv_dw.weight"]
    )
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=10).state_dict()
    torch.save({"model": vit}, tmp_path / "vit.pth")  # DeiT's layout
    model = build(name="deeplabv3plus", backbone="timm:vit_tiny_patch16_224", pretrained=str(tmp_path / "vit.pth"))
    assert torch.equal(model.backbone.model.blocks[11].attn.qkv.weight, vit["blocks.11.attn.qkv.weight"])
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 97, 131)).shape == (1, 3, 97, 131)


def test_a_file_of_another_encoder_is_one_line(tmp_path):
    torch.save(torchvision.models.mobilenet_v3_large().state_dict(), tmp_path / "mnv3.pth")
    with pytest.raises(ConfigError) as e:
        build(name="pspnet", backbone="resnet18", pretrained=str(tmp_path / "mnv3.pth"))
    msg = str(e.value)
    assert "\n" not in msg and len(msg) <= 300
    assert re.search(
        r"0 of the 120 tensors of torchvision's resnet18 match the file's \d+; missing conv1\.weight", msg
    ), msg
    timm = pytest.importorskip("timm")
    save_safetensors(timm.create_model("resnet18d").state_dict(), tmp_path / "r18d.safetensors")
    with pytest.raises(
        ConfigError, match=r"tensors of timm:convnext_atto match the file's \d+; missing stem\.0\.weight"
    ) as e:
        build(name="upernet", backbone="timm:convnext_atto", pretrained=str(tmp_path / "r18d.safetensors"))
    assert "\n" not in str(e.value) and len(str(e.value)) <= 300
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds neither model.safetensors nor pytorch_model.bin"):
        build(name="upernet", backbone="resnet18", pretrained=str(tmp_path / "empty"))


def test_freeze_backbone(tmp_path):
    """The encoder is left out of the optimizer and stays in eval mode (BatchNorm statistics untouched) while the
    head trains; the state-dict keys are those of the unfrozen network; a deep copy (EMA) stays frozen."""
    model = build(name="upernet", backbone="resnet18", head_channels=8, aux=True, freeze_backbone=True)
    assert (
        model.state_dict().keys()
        == build(name="upernet", backbone="resnet18", head_channels=8, aux=True).state_dict().keys()
    )
    frozen = {id(p) for p in model.backbone.parameters()}
    hyper = {"name": "adamw", "lr": 1e-2, "weight_decay": 0.0, "betas": [0.9, 0.999], "head_lr_mult": 1.0}
    opt = build_optimizer(OmegaConf.create({**hyper, "no_decay_norm_bias": False}), model)
    assert not any(id(p) in frozen for g in opt.param_groups for p in g["params"])
    model.train()
    assert not any(m.training for m in model.backbone.modules()) and model.head.training
    before = copy.deepcopy(model.state_dict())
    out = model(torch.randn(2, 3, 64, 64))
    (out["out"].mean() + out["aux"].mean()).backward()
    opt.step()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith("backbone."))
    assert not torch.equal(after["head.classifier.weight"], before["head.classifier.weight"])
    twin = copy.deepcopy(model).train()
    assert not twin.backbone.training and twin.head.training


def test_freeze_a_vit_keeps_its_pyramid_training():
    """A plain ViT frozen: its new pyramid layers (transposed convs) still train; networks without an encoder refuse."""
    pytest.importorskip("timm")
    model = build(name="upernet", backbone="timm:vit_tiny_patch16_224", head_channels=8, freeze_backbone=True).train()
    assert not any(p.requires_grad for p in model.backbone.model.parameters())
    assert all(p.requires_grad for p in model.backbone.up4.parameters()) and model.backbone.up4.training
    assert not model.backbone.model.training
    for kw in ({"name": "unet"}, {"name": "deconvnet", "base_channels": 4}):
        with pytest.raises(ConfigError, match="model.freeze_backbone=true is not used by model="):
            build(freeze_backbone=True, **kw)
