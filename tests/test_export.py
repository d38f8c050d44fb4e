"""segtrain-export: every network family to ONNX (checked with onnxruntime) and TorchScript, at input sizes
other than the traced one; the self-check; the sidecar."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import console_script
from omegaconf import OmegaConf
from torch import nn

from segtrain.config import ExportAppConfig, ModelConfig
from segtrain.errors import ConfigError, ExportError
from segtrain.export import AdaptiveAvgPool2dDynamic, check_export, export_onnx, export_torchscript, exportable
from segtrain.models.build import build_model

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


def _resnet10(weights=None, **kw) -> nn.Module:
    """torchvision's ResNet-18 with one BasicBlock per stage: its stem, stages, widths, strides, downsampling and
    (segtrain's) dilation rule, half its blocks to export."""
    from torchvision.models.resnet import BasicBlock, ResNet

    assert weights is None
    return ResNet(BasicBlock, [1, 1, 1, 1], **kw)


def build_shallow(cfg, num_classes: int, **kw) -> nn.Module:
    """``build_model`` with ``resnet18`` backbones of one block per stage (:func:`_resnet10`): the exporters' time
    grows with the graph."""
    from unittest import mock

    import torchvision.models

    with mock.patch.object(torchvision.models, "resnet18", _resnet10):
        return build_model(cfg, num_classes, **kw)


def network(spec: dict) -> nn.Module:
    """A randomly initialised network (:func:`build_shallow`) with random BatchNorm statistics (nothing trivially
    zero)."""
    if spec.get("backbone", "").startswith("timm:"):
        pytest.importorskip("timm")
    torch.manual_seed(0)
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), spec)
    model = build_shallow(cfg, 3)
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
    model = build_shallow(cfg, 1, in_channels=4).eval()
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
    """A U-Net checkpoint (base_channels 4) through the command's entry point, in this process (a process start-up
    saved; the command as a subprocess: test_segtrain_export_stops_cleanly_on_signals): checked at 97x131, 75x109
    (batch 2) and 160x96 by default."""
    from conftest import in_process

    ckpt = tiny_run / "checkpoints" / "best.pt"
    args = [f"ckpt={ckpt}", "output=deploy/model.onnx", "hydra.run.dir=run"]
    proc = in_process(args, tmp_path, "segtrain-export")
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
    from segtrain.apps.export import export_checkpoint

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
        export_checkpoint(cfg)
    assert list(tmp_path.iterdir()) == []


def test_export_output_folder_and_suffix(tiny_run, tmp_path):
    """output= an existing folder or a path ending in / gets model.pt inside; a suffix of another format is
    refused before anything is exported."""
    from segtrain.apps.export import export_checkpoint

    base = OmegaConf.merge(
        OmegaConf.structured(ExportAppConfig),
        {"ckpt": str(tiny_run / "checkpoints" / "best.pt"), "format": "torchscript", "check_sizes": [[32, 48]]},
    )
    (tmp_path / "deploy").mkdir()
    for output, folder in ((tmp_path / "deploy", "deploy"), (f"{tmp_path / 'new'}/", "new")):
        export_checkpoint(OmegaConf.merge(base, {"output": str(output)}))
        assert sorted(p.name for p in (tmp_path / folder).iterdir()) == ["model.pt", "model.pt.json"]
    export_checkpoint(OmegaConf.merge(base, {"output": str(tmp_path / "m.pth")}))
    with pytest.raises(ConfigError, match="format=torchscript writes .pt or .pth files, not .onnx; name it x.pt"):
        export_checkpoint(OmegaConf.merge(base, {"output": str(tmp_path / "x.onnx")}))
    with pytest.raises(ConfigError, match="format=onnx writes .onnx files, not .pt"):
        export_checkpoint(OmegaConf.merge(base, {"format": "onnx", "output": str(tmp_path / "x.pt")}))
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
    from segtrain.console import first_line

    e = RuntimeError("\x1b[96mCannot create Dim\x1b[0m with inconsistent min=0\nmore detail")
    assert first_line(e) == "Cannot create Dim with inconsistent min=0"


# ----------------------------------------------------------------------------------------------------
# Hostile outputs, settings and signals (issue 21).


def _export_cfg(tiny_run, **keys):
    base = {"ckpt": str(tiny_run / "checkpoints" / "best.pt"), "format": "torchscript", "check_sizes": [[32, 48]]}
    return OmegaConf.merge(OmegaConf.structured(ExportAppConfig), {**base, **keys})


def test_export_never_replaces_what_it_did_not_write(tiny_run, tmp_path, monkeypatch):
    """The training checkpoint (as output=, or through a link), another checkpoint, a file inside a run dir's
    checkpoints/ or tb/: never, not even with overwrite=true; a file of the user's or an earlier export
    (and its sidecar): only with overwrite=true.  Every refusal comes before the checkpoint is loaded."""
    import os
    import shutil

    import segtrain.checkpoint
    from segtrain.apps.export import export_checkpoint
    from segtrain.errors import OutputError

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    ckpts = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    ckpt = run / "checkpoints" / "best.pt"
    os.symlink(run / "checkpoints" / "last.pt", tmp_path / "link.pt")
    (tmp_path / "mine.pt").write_bytes(b"the user's own file")
    (tmp_path / "side.pt.json").write_text("{}")
    never = {
        "checkpoints/best.pt is the checkpoint ckpt=": run / "checkpoints" / "best.pt",
        "checkpoints/last.pt is a checkpoint": run / "checkpoints" / "last.pt",
        "link.pt is a checkpoint": tmp_path / "link.pt",
        "new.pt is in checkpoints/ of the training run": run / "checkpoints" / "new.pt",
        "tb/m.pt is in tb/ of the training run": run / "tb" / "m.pt",
    }
    real_load = segtrain.checkpoint.load_checkpoint
    monkeypatch.setattr(segtrain.checkpoint, "load_checkpoint", lambda p: pytest.fail(f"loaded {p} before refusing"))
    for match, output in never.items():
        for overwrite in (False, True):
            with pytest.raises(OutputError, match=f"{match}.*; never replaced, not even with overwrite=true: choose"):
                export_checkpoint(_export_cfg(tiny_run, ckpt=str(ckpt), output=str(output), overwrite=overwrite))
    for name, what in (("mine.pt", "mine.pt is a file this command did not write"), ("side.pt", "side.pt.json is a")):
        with pytest.raises(OutputError, match=f"{what}.*; set overwrite=true to replace it"):
            export_checkpoint(_export_cfg(tiny_run, output=str(tmp_path / name)))
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == ckpts
    assert os.path.islink(tmp_path / "link.pt") and (tmp_path / "mine.pt").read_bytes() == b"the user's own file"
    monkeypatch.setattr(segtrain.checkpoint, "load_checkpoint", real_load)
    export_checkpoint(_export_cfg(tiny_run, output=str(tmp_path / "mine.pt"), overwrite=True))
    assert (tmp_path / "mine.pt").read_bytes()[:2] == b"PK" and (tmp_path / "mine.pt.json").is_file()
    with pytest.raises(OutputError, match="mine.pt is an earlier export; set overwrite=true"):
        export_checkpoint(_export_cfg(tiny_run, output=str(tmp_path / "mine.pt")))
    (tmp_path / "mine.pt").rename(tmp_path / "moved.pt")  # its sidecar alone is still an earlier export's
    with pytest.raises(OutputError, match="mine.pt.json is an earlier export; set overwrite=true"):
        export_checkpoint(_export_cfg(tiny_run, output=str(tmp_path / "mine.pt")))
    assert not list(tmp_path.glob(".*tmp")) and not list(run.rglob("*.tmp"))


def test_export_settings_and_outputs_refused_before_work(tiny_run, tmp_path):
    """Out-of-range opset (the exporter would write opset 18 instead), non-finite or absurd tolerance, huge
    self-check sizes, an output without an extension or a blank one, a ckpt= that is no file."""
    import onnx.defs

    from segtrain.apps.export import _target, check_settings, opset_range
    from segtrain.errors import CheckpointError
    from segtrain.files import checkpoint_file

    assert opset_range() == (18, onnx.defs.onnx_opset_version())
    newest = opset_range()[1]
    bad = {
        f"opset=99: the installed exporter writes opset 18 to {newest}": {"opset": 99},
        f"opset={newest + 1}: the installed": {"opset": newest + 1},
        "tolerance must be a number in \\(0, 1\\].*got nan": {"tolerance": float("nan")},
        "tolerance must be .*got inf": {"tolerance": float("inf")},
        "tolerance must be .*got 5.0": {"tolerance": 5.0},
        "check_sizes: 100000x64 is larger than the self-check's 2048 px limit": {"check_sizes": [[100000, 64]]},
        "check_sizes lists 9 sizes; at most 8": {"check_sizes": [[32, 32]] * 9},
    }
    for match, keys in bad.items():
        with pytest.raises(ConfigError, match=match):
            check_settings(_export_cfg(tiny_run, **keys), "onnx")
    check_settings(_export_cfg(tiny_run, opset=newest), "onnx")
    check_settings(_export_cfg(tiny_run, opset=99), "torchscript")  # not used by TorchScript
    (tmp_path / "deploy").mkdir()
    outputs = {
        "model": "output=model has no file extension: name the file model.onnx, or write model/ for a folder",
        ".hidden": "name the file .hidden.onnx, or write .hidden/",
        "  ": "output='  ' is blank",
    }
    for output, match in outputs.items():
        with pytest.raises(ConfigError, match=match):
            _target(_export_cfg(tiny_run, format="onnx", output=output))
    with pytest.raises(ConfigError, match="name the file model.pt"):
        _target(_export_cfg(tiny_run, output="model"))
    assert _target(_export_cfg(tiny_run, output=str(tmp_path / "deploy"))) == tmp_path / "deploy" / "model.pt"
    assert _target(_export_cfg(tiny_run, output="~")) == Path.home() / "model.pt"
    with pytest.raises(
        CheckpointError,
        match="ckpt=.* is a directory, not a checkpoint file; give the file in it: ckpt=.*checkpoints/best.pt",
    ):
        checkpoint_file(tiny_run, "ckpt")
    with pytest.raises(CheckpointError, match="ckpt=/dev/null is a character device, not a checkpoint file"):
        checkpoint_file("/dev/null", "ckpt")
    from segtrain.apps.export import export_checkpoint

    with pytest.raises(CheckpointError, match="ckpt=.*gone.pt: no such file"):  # before any folder is made
        export_checkpoint(_export_cfg(tiny_run, ckpt=str(tmp_path / "gone.pt"), output=str(tmp_path / "new" / "m.pt")))
    assert not (tmp_path / "new").exists()


def test_interrupt_inside_the_exporter_is_an_interrupt(tiny_run, tmp_path, monkeypatch):
    """A Ctrl-C that reaches the exporter's own code comes out as its error (torch.export wraps it), which
    once made a stopped export 'cannot be exported' (exit 6): it is recorded and raised as an interrupt when
    the exporter returns; nothing is left (no staging folder, no file, no sidecar)."""
    import os
    import signal

    import segtrain.export as export
    from segtrain.apps.export import export_checkpoint

    real = export.export_torchscript

    def wrapping(model, path, channels=3):  # an exporter that turns an interrupt into its own error, as torch's does
        real(model, path, channels)
        try:
            os.kill(os.getpid(), signal.SIGINT)
        except KeyboardInterrupt as e:
            raise RuntimeError("TorchExportError: failed while tracing") from e

    monkeypatch.setattr(export, "export_torchscript", wrapping)
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(_export_cfg(tiny_run, output=str(tmp_path / "m.pt")))
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are restored


def test_segtrain_export_stops_cleanly_on_signals(tiny_run, tmp_path):
    """Real signals on the command (two at once, to save time; a single Ctrl-C inside the exporter:
    test_interrupt_inside_the_exporter_is_an_interrupt): Ctrl-C during the ONNX export (once it says it waits
    for the exporter, a second Ctrl-C, which stops at once), and SIGTERM during a TorchScript export.  Each ends
    with its code (130; SIGTERM: killed by it, 143 in a shell) and leaves no staging folder, no file, no sidecar."""
    import signal
    import subprocess
    import threading
    import time

    from conftest import cli_env

    runs = {"onnx": ("onnx", signal.SIGINT, 2.5), "ts-term": ("torchscript", signal.SIGTERM, 0.0)}
    procs, errs = {}, {}
    for name, (fmt, _, _) in runs.items():
        suffix = ".onnx" if fmt == "onnx" else ".pt"
        args = [
            f"ckpt={tiny_run / 'checkpoints' / 'best.pt'}",
            f"format={fmt}",
            f"output={name}/m{suffix}",
            "check_sizes=[[32,32]]",
            f"hydra.run.dir=run-{name}",
        ]
        procs[name] = subprocess.Popen(
            console_script("segtrain-export") + args,
            cwd=tmp_path,
            env=cli_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        errs[name] = []
        threading.Thread(target=lambda p=procs[name], e=errs[name]: e.extend(p.stderr), daemon=True).start()
    signalled: dict[str, float] = {}
    deadline = time.time() + 240
    while len(signalled) < len(runs) and time.time() < deadline:
        for name, (_, sig, delay) in runs.items():
            if name not in signalled and procs[name].poll() is None and list((tmp_path / name).glob(".m.*.tmp")):
                time.sleep(delay)  # the export has begun (its staging folder exists): stop it a moment later
                procs[name].send_signal(sig)
                signalled[name] = time.time()
        time.sleep(0.01)
    while procs["onnx"].poll() is None and time.time() < deadline:
        if any("stopping once the exporter returns" in line for line in errs["onnx"]):
            procs["onnx"].send_signal(signal.SIGINT)  # inside the exporter: the second Ctrl-C stops at once
            break
        time.sleep(0.01)
    for name, p in procs.items():
        p.wait(timeout=120)
        expected = -signal.SIGTERM if runs[name][1] == signal.SIGTERM else 130
        assert p.returncode == expected, (name, p.returncode, errs[name])
        assert not any("Traceback" in line for line in errs[name]), errs[name]
        assert list((tmp_path / name).iterdir()) == [], name  # nothing: no .m.*.tmp/, no m.onnx, no m.onnx.json


def test_an_interrupt_wrapped_by_the_tracer_stays_an_interrupt(tmp_path):
    """Called directly (no command around it): a KeyboardInterrupt that the tracer wraps in its own error
    (its __cause__ / __context__ chain) comes out as KeyboardInterrupt, not 'cannot be traced' (exit 6)."""
    from segtrain.export import export_torchscript

    class Stopped(nn.Module):
        def forward(self, x):
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt as e:
                raise RuntimeError("the tracer's own error") from e

    with pytest.raises(KeyboardInterrupt):
        export_torchscript(Stopped(), tmp_path / "m.pt")
    with pytest.raises(ExportError, match="cannot be traced to TorchScript: RuntimeError: boom"):
        export_torchscript(nn.Sequential(nn.Conv2d(3, 2, 1), _Boom()), tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []


class _Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


def test_export_and_predict_load_without_torch():
    """segtrain-export and segtrain-predict import torch when they work, not when they start: a Ctrl-C while
    they start is the CLI's one line and exit 130 (not an import traceback), and --help answers at once."""
    import subprocess
    import sys

    code = (
        "import sys, segtrain.apps.export, segtrain.apps.predict, segtrain.writeguard\n"
        "heavy = [m for m in ('torch', 'torchvision', 'cv2', 'onnx') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
