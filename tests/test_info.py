"""``segtrain-info``: parameters, FLOPs (a hand count) and latency (segtrain/info.py)."""

import json

import torch
from conftest import in_process
from omegaconf import OmegaConf
from torch import nn

from segtrain import checkpoint
from segtrain.config import to_yaml
from segtrain.info import count_flops, input_size
from segtrain.models.build import build_model, count_parameters
from segtrain.version import __version__
from tests.conftest import console_script, run_cli
from tests.test_config import composed


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Conv2d(4, 2, 1, bias=False)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = self.head(self.backbone(x))  # [N, 2, 8, 8]
        return self.fc(y.flatten(2)[..., :8])  # [N, 2, 5]


def test_flops_equal_a_hand_count():
    """A multiply-add is 2 FLOPs; bias, BatchNorm, ReLU and slicing are not counted."""
    n, h, w = 2, 8, 8
    conv3x3 = 2 * n * 4 * h * w * (3 * 3 * 3)  # outputs x (cin x k x k) multiply-adds
    conv1x1 = 2 * n * 2 * h * w * 4
    linear = 2 * n * 2 * 5 * 8  # [N*2, 8] @ [8, 5]
    total, by_module = count_flops(Tiny().eval(), torch.randn(n, 3, h, w))
    assert total == conv3x3 + conv1x1 + linear == 30016
    assert by_module == {"backbone": conv3x3, "head": conv1x1, "fc": linear}


def test_input_size_defaults():
    assert input_size(OmegaConf.create({"info": {"size": [100, 60]}, "data": {"crop_size": 32}})) == (100, 60)
    assert input_size(OmegaConf.create({"info": {"size": None}, "data": {"crop_size": 48, "name": "voc"}})) == (48, 48)
    cfg = OmegaConf.create({"info": {"size": None}, "data": {"crop_size": None, "name": "synthetic", "image_size": 40}})
    assert input_size(cfg) == (40, 40)
    assert input_size(OmegaConf.create({"info": {"size": None}, "data": {"crop_size": None, "name": "voc"}})) == (
        512,
        512,
    )


def info_exe() -> list[str]:
    return console_script("segtrain-info")


def test_segtrain_info_on_a_checkpoint(tmp_path):
    """``segtrain-info ckpt=PATH``: the stored network, its parameter count and FLOPs, latency at batch 1 and N."""
    cfg = composed("model=deeplabv3plus", "model.backbone=resnet18", "data.num_classes=3", "data.image_size=40")
    torch.manual_seed(0)
    model = build_model(cfg.model, 3)
    meta = {"model": "deeplabv3plus", "num_classes": 3, "class_names": ["a", "b", "c"], "segtrain_version": __version__}
    checkpoint.save_atomic({"model": model.state_dict(), "config": to_yaml(cfg), "meta": meta}, tmp_path / "best.pt")
    args = ["ckpt=best.pt", "device=cpu", "info.batch_size=2", "info.warmup=1", "info.iters=2", "hydra.run.dir=info"]
    proc = run_cli(args, tmp_path, exe=info_exe())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    info = json.loads((tmp_path / "info" / "info.json").read_text())
    assert info["model"] == "deeplabv3plus" and info["num_classes"] == 3 and info["input_size"] == [40, 40]
    assert info["params"] == count_parameters(model) and 0 < info["backbone_params"] < info["params"]
    flops, _ = count_flops(model.eval(), torch.randn(1, 3, 40, 40))
    assert info["gflops"] == flops / 1e9 and info["gmacs"] == flops / 2e9
    assert set(info["gflops_by_module"]) == {"backbone", "aspp", "low_level", "decoder"}
    assert [r["batch_size"] for r in info["latency"]] == [1, 2]
    assert all(r["ms_mean"] > 0 and r["images_per_sec"] > 0 for r in info["latency"])
    assert "GFLOPs" in proc.stdout and "img/s" in proc.stdout
    # the refusal through the same entry point, in this process (a process start-up saved)
    bad = in_process(["ckpt=best.pt", "model=unet", "hydra.run.dir=bad"], tmp_path, "segtrain-info")
    assert bad.returncode == 2 and "takes model from the checkpoint" in bad.stderr and "Traceback" not in bad.stderr


def test_segtrain_info_without_a_checkpoint(tmp_path):
    """``segtrain-info model=...`` (the README's example, smaller): the configured network, built from scratch;
    through the command's entry point in this process (as a subprocess: test_segtrain_info_on_a_checkpoint)."""
    args = ["model=deeplabv3plus", "model.backbone=resnet18", "data.num_classes=3", "info.latency=false",
            "info.size=64", "device=cpu", "hydra.run.dir=info"]  # fmt: skip
    proc = in_process(args, tmp_path, "segtrain-info")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    info = json.loads((tmp_path / "info" / "info.json").read_text())
    model = build_model(composed("model=deeplabv3plus", "model.backbone=resnet18").model, 3).eval()
    assert info["checkpoint"] is None and info["num_classes"] == 3 and info["input_size"] == [64, 64]
    assert info["params"] == count_parameters(model) and info["latency"] == []
    assert info["gflops"] == count_flops(model, torch.randn(1, 3, 64, 64))[0] / 1e9


def info_config(*overrides):
    """segtrain-info's config (configs/info.yaml) with ``overrides``, composed in-process."""
    from hydra import compose, initialize_config_dir

    from segtrain.config import config_dir, register_configs

    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("info", overrides=list(overrides))


def test_info_counts_every_input_band(tmp_path):
    """data.in_channels=4: a 4-band checkpoint loads, and FLOPs are counted for 4 bands, with or without it."""
    from segtrain.info import model_info

    args = ["model=unet", "model.base_channels=8", "data=folder", "data.root=fields", "data.num_classes=3",
            "data.in_channels=4", "data.mean=[0.5,0.5,0.5,0.5]", "data.std=[0.2,0.2,0.2,0.2]", "device=cpu"]  # fmt: skip
    cfg = composed(*args)
    torch.manual_seed(0)
    model = build_model(cfg.model, 3, 4).eval()
    checkpoint.save_atomic({"model": model.state_dict(), "config": to_yaml(cfg), "meta": {}}, tmp_path / "best.pt")
    flops = count_flops(model, torch.randn(1, 4, 32, 32))[0]
    assert flops != count_flops(build_model(cfg.model, 3).eval(), torch.randn(1, 3, 32, 32))[0]
    for extra in ([f"ckpt={tmp_path / 'best.pt'}"], args):
        info = model_info(info_config("info.size=32", "info.batch_size=2", "info.warmup=0", "info.iters=1", *extra))
        assert info["in_channels"] == 4 and info["params"] == count_parameters(model)
        assert info["gflops"] == flops / 1e9 and len(info["latency"]) == 2


def test_sizes_that_cannot_fit_are_refused_before_allocating(monkeypatch):
    """info.size=[100000,100000] or info.batch_size=100000000: one line naming the knob and what would fit (exit 5),
    before the input is allocated; a size below the network's minimum, info.iters=0 or info.warmup=-1 are config
    errors (exit 2)."""
    import pytest

    from segtrain import info as info_module
    from segtrain.errors import ConfigError, ResourceError

    def no_allocation(*size, **kw):
        raise AssertionError(f"allocated {size}")

    base = ["model=unet", "model.base_channels=4", "device=cpu"]
    monkeypatch.setattr(info_module.torch, "randn", no_allocation)  # the FLOP count's and the latency's inputs
    monkeypatch.setattr(info_module, "available_memory", lambda device: 8 * 2**30)  # any machine: 8 GiB free
    with pytest.raises(ResourceError) as e:
        info_module.model_info(info_config(*base, "info.size=[100000,100000]"))
    msg = str(e.value)
    assert (
        e.value.exit_code == 5
        and msg.startswith("one 100000x100000 image needs at least")
        and "set a smaller info.size" in msg
    )
    with pytest.raises(ResourceError) as e:
        info_module.model_info(info_config(*base, "info.size=64", "info.batch_size=100000000"))
    assert "a batch of 100000000 64x64 images" in str(e.value) and "set info.batch_size=" in str(e.value)
    with pytest.raises(ConfigError, match="info.size 8x8 is smaller than the 16 px model=unet takes"):
        info_module.model_info(info_config(*base, "info.size=8"))
    for key, value, low in (("iters", 0, 1), ("warmup", -1, 0)):
        with pytest.raises(ConfigError, match=f"info.{key} must be >= {low}, got {value}"):
            info_module.model_info(info_config(*base, f"info.{key}={value}"))


def test_info_on_segformer_and_upernet():
    """``segtrain-info model=segformer`` / ``model=upernet``: their parameters (encoder apart) and FLOPs."""
    from segtrain.info import model_info

    for network in (["model=segformer", "model.variant=b0"], ["model=upernet", "model.backbone=resnet18"]):
        info = model_info(info_config(*network, "info.latency=false", "info.size=64", "device=cpu"))
        model = build_model(composed(*network).model, 6).eval()
        assert info["params"] == count_parameters(model) and 0 < info["backbone_params"] < info["params"]
        assert info["gflops"] == count_flops(model, torch.randn(1, 3, 64, 64))[0] / 1e9 > 0
        assert set(info["gflops_by_module"]) >= {"backbone", "head"}
