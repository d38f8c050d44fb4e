"""segtrain-export: every network family to ONNX (checked with onnxruntime) and TorchScript, at input sizes
other than the traced one; the self-check; the sidecar."""

import json

import numpy as np
import pytest
import torch
from conftest import console_script, run_cli
from omegaconf import OmegaConf
from torch import nn

from segtrain.config import ExportAppConfig, ModelConfig
from segtrain.errors import ConfigError, ExportError
from segtrain.export import AdaptiveAvgPool2dDynamic, check_export, export_onnx, export_torchscript, exportable
from segtrain.models import build_model

pytest.importorskip("onnxruntime")

SIZES = [[97, 131], [160, 96]]  # neither is the traced example's size (67x93); the first is odd

UNET = {"name": "unet", "base_channels": 4}  # the sixth family: test_segtrain_export_onnx_with_sidecar exports it
FAMILIES = {
    "fcn_8s": {"name": "fcn", "backbone": "resnet18", "variant": "8s"},
    "deconvnet": {"name": "deconvnet", "base_channels": 4},
    "pspnet": {"name": "pspnet", "backbone": "resnet18"},
    "deeplabv3": {"name": "deeplabv3", "backbone": "resnet18"},
    "deeplabv3plus": {"name": "deeplabv3plus", "backbone": "resnet18"},
    "segformer": {"name": "segformer", "variant": "tiny"},  # one block per stage (fixture below), else MiT-b0
    "upernet": {"name": "upernet", "backbone": "resnet18", "head_channels": 32},  # its pyramid pooling made dynamic
}
MORE = {  # the other variants and a MobileNetV3 backbone: pytest -m slow
    "unet_resnet18": {"name": "unet", "backbone": "resnet18", "base_channels": 4},
    "fcn_16s": {"name": "fcn", "backbone": "resnet18", "variant": "16s"},
    "fcn_32s": {"name": "fcn", "backbone": "resnet18", "variant": "32s"},
    "segnet": {"name": "deconvnet", "base_channels": 4, "variant": "segnet"},
    "deeplabv3plus_mobilenet": {"name": "deeplabv3plus", "backbone": "mobilenet_v3_large"},
    "upernet_vit": {"name": "upernet", "backbone": "timm:vit_tiny_patch16_224", "head_channels": 32},
}


@pytest.fixture(autouse=True)
def tiny_segformer(monkeypatch):
    """A test-only MiT with one block per stage and narrow widths: MiT-b0's layers, half its export time."""
    from segtrain.models import segformer

    monkeypatch.setitem(segformer.VARIANTS, "tiny", ((16, 32, 80, 128), (1, 1, 1, 1), 64))


def network(spec: dict) -> nn.Module:
    """A randomly initialised network with random BatchNorm statistics (nothing trivially zero)."""
    if spec.get("backbone", "").startswith("timm:"):
        pytest.importorskip("timm")
    torch.manual_seed(0)
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), spec)
    model = build_model(cfg, 3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _onnx_round_trip(spec, tmp_path):
    model = network(spec)
    path = tmp_path / "m.onnx"
    assert export_onnx(exportable(model), path, 18, {"k": "v"}) == 18
    check = check_export(path, "onnx", model, SIZES, 1e-3)
    assert [r["input_shape"] for r in check["results"]] == [[1, 3, 97, 131], [2, 3, 160, 96]]
    assert check["passed"], check
    import onnx

    proto = onnx.load(str(path))
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]  # dynamic batch, height and width


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_exports_to_onnx(family, tmp_path):
    """With test_segtrain_export_onnx_with_sidecar (U-Net): all eight families."""
    _onnx_round_trip(FAMILIES[family], tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(MORE))
def test_more_variants_export_to_onnx(family, tmp_path):
    _onnx_round_trip(MORE[family], tmp_path)


TRACED = {"unet": UNET, **{k: FAMILIES[k] for k in ("deeplabv3plus", "deconvnet", "segformer")}}
SLOW_TRACED = {k: v for k, v in {**FAMILIES, **MORE}.items() if k not in TRACED}


@pytest.mark.parametrize("family", [*TRACED, *(pytest.param(k, marks=pytest.mark.slow) for k in SLOW_TRACED)])
def test_networks_trace_to_torchscript(family, tmp_path):
    model = network({**TRACED, **SLOW_TRACED}[family])
    export_torchscript(exportable(model), tmp_path / "m.pt")
    check = check_export(tmp_path / "m.pt", "torchscript", model, SIZES, 1e-3)
    assert check["passed"], check


def test_four_bands_and_one_sigmoid_logit_export(tmp_path):
    """data.in_channels=4 and data.num_classes=1: the exported file takes 4 bands and returns one logit."""
    torch.manual_seed(0)
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), {"name": "deeplabv3plus", "backbone": "resnet18"})
    model = build_model(cfg, 1, in_channels=4).eval()
    export_torchscript(exportable(model), tmp_path / "m.pt", channels=4)
    check = check_export(tmp_path / "m.pt", "torchscript", model, SIZES, 1e-3, channels=4)
    assert check["passed"], check
    assert [r["input_shape"] for r in check["results"]] == [[1, 4, 97, 131], [2, 4, 160, 96]]
    out = torch.jit.load(str(tmp_path / "m.pt"))(torch.randn(1, 4, 64, 80))
    assert out.shape == (1, 1, 64, 80)


@pytest.mark.parametrize("size", [(13, 13), (9, 20), (6, 6), (31, 7), (2, 5)])
@pytest.mark.parametrize("bins", [1, 2, 3, 6])
def test_dynamic_adaptive_pool_equals_torch(size, bins):
    x = torch.randn(2, 4, *size, dtype=torch.float64)
    ours = AdaptiveAvgPool2dDynamic(bins)(x)
    assert torch.allclose(ours, nn.AdaptiveAvgPool2d(bins)(x), atol=1e-12)


def test_exportable_replaces_pyramid_pools_only():
    model = exportable(network(FAMILIES["pspnet"]))
    pools = [m for m in model.modules() if isinstance(m, (nn.AdaptiveAvgPool2d, AdaptiveAvgPool2dDynamic))]
    assert sorted(type(m).__name__ for m in pools) == ["AdaptiveAvgPool2d"] + ["AdaptiveAvgPool2dDynamic"] * 3
    with pytest.raises(ExportError, match="AdaptiveAvgPool2d"):
        exportable(nn.Sequential(nn.AdaptiveAvgPool2d((None, 3))))


def test_segtrain_export_onnx_with_sidecar(tiny_run, tmp_path):
    """A U-Net checkpoint (base_channels 4) through the command: checked at 97x131, 75x109 (batch 2) and
    160x96 by default."""
    ckpt = tiny_run / "checkpoints" / "best.pt"
    proc = run_cli([f"ckpt={ckpt}", "output=deploy/model.onnx", "hydra.run.dir=run"], tmp_path,
                   exe=console_script("segtrain-export"))  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "self-check onnxruntime" in proc.stdout and "largest" in proc.stdout
    side = json.loads((tmp_path / "deploy" / "model.onnx.json").read_text())
    shapes = [r["input_shape"] for r in side["check"]["results"]]
    assert shapes == [[1, 3, 97, 131], [2, 3, 75, 109], [1, 3, 160, 96]]
    assert side["format"] == "onnx" and side["opset"] == 18 and side["num_classes"] == 6
    assert side["class_names"][:2] == ["background", "circle"] and len(side["palette"]) == 6
    assert side["mean"] == [0.485, 0.456, 0.406] and side["input"]["layout"] == "NCHW"
    assert side["check"]["passed"] and side["check"]["max_abs_diff"] <= 1e-3
    import onnxruntime as ort

    from segtrain import Predictor

    p = Predictor.from_checkpoint(ckpt, device="cpu", precision="fp32")
    image = np.random.default_rng(0).integers(0, 256, (45, 77, 3), dtype=np.uint8)
    x = ((image / 255.0 - side["mean"]) / side["std"]).transpose(2, 0, 1)[None].astype(np.float32)
    session = ort.InferenceSession(str(tmp_path / "deploy" / "model.onnx"))
    logits = session.run(None, {side["input"]["name"]: x})[0]
    assert np.abs(logits - p.scores([image]).numpy()).max() < 1e-3  # the sidecar's recipe is the Predictor's
    assert not list((tmp_path / "deploy").glob(".*tmp"))


def test_failed_self_check_leaves_no_file(tiny_run, tmp_path, monkeypatch):
    import segtrain.export as export

    real = export.exportable

    def broken(model):  # an exported network that is not the checkpoint's
        out = real(model)
        with torch.no_grad():
            next(out.parameters()).add_(0.5)
        return out

    monkeypatch.setattr(export, "exportable", broken)
    cfg = OmegaConf.merge(
        OmegaConf.structured(ExportAppConfig),
        {"ckpt": str(tiny_run / "checkpoints" / "best.pt"), "format": "torchscript", "output": str(tmp_path / "m.pt")},
    )
    with pytest.raises(ExportError, match="self-check failed"):
        export.export_checkpoint(cfg)
    assert list(tmp_path.iterdir()) == []


def test_export_output_folder_and_suffix(tiny_run, tmp_path):
    """output= an existing folder or a path ending in / gets model.pt inside; a suffix of another format is
    refused before anything is exported."""
    import segtrain.export as export

    base = OmegaConf.merge(
        OmegaConf.structured(ExportAppConfig),
        {"ckpt": str(tiny_run / "checkpoints" / "best.pt"), "format": "torchscript", "check_sizes": [[32, 48]]},
    )
    (tmp_path / "deploy").mkdir()
    for output, folder in ((tmp_path / "deploy", "deploy"), (f"{tmp_path / 'new'}/", "new")):
        export.export_checkpoint(OmegaConf.merge(base, {"output": str(output)}))
        assert sorted(p.name for p in (tmp_path / folder).iterdir()) == ["model.pt", "model.pt.json"]
    export.export_checkpoint(OmegaConf.merge(base, {"output": str(tmp_path / "m.pth")}))
    with pytest.raises(ConfigError, match="format=torchscript writes .pt or .pth files, not .onnx; name it x.pt"):
        export.export_checkpoint(OmegaConf.merge(base, {"output": str(tmp_path / "x.onnx")}))
    with pytest.raises(ConfigError, match="format=onnx writes .onnx files, not .pt"):
        export.export_checkpoint(OmegaConf.merge(base, {"format": "onnx", "output": str(tmp_path / "x.pt")}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deploy", "m.pth", "m.pth.json", "new"]


def test_export_config_checks():
    from segtrain.config import validate_export
    from segtrain.errors import ConfigError

    base = OmegaConf.structured(ExportAppConfig)
    with pytest.raises(ConfigError, match="missing ckpt="):
        validate_export(base)
    for kw, match in (({"opset": 17}, "opset must be >= 18"), ({"check_sizes": [[16, 40]]}, "32x32 minimum")):
        with pytest.raises(ConfigError, match=match):
            validate_export(OmegaConf.merge(base, {"ckpt": "a.pt", **kw}))


def test_export_errors_are_plain_text():
    from segtrain.export import _first_line

    e = RuntimeError("\x1b[96mCannot create Dim\x1b[0m with inconsistent min=0\nmore detail")
    assert _first_line(e) == "Cannot create Dim with inconsistent min=0"
