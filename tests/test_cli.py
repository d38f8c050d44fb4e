"""End-to-end CLI tests: ``segtrain ...`` as a subprocess, as a user runs it; the many one-line error cases run
the same entry point in this process (:func:`in_process`), one case of each kind as a subprocess."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import yaml
from conftest import console_script, in_process, one_line_error, run_cli

# The error cases below that run as a process of their own, the command as typed: one of each kind of mistake per
# test (an option Hydra cannot find, a value of the wrong type, a value config.validate refuses, a checkpoint path,
# an error inside the job, segtrain-eval, -m, non-ASCII text on the console); the others run in_process.
TYPED = {
    ("model=nonexistent",), ("optimizer.lr=abc",), ("optimizer.lr=-1",),  # test_bad_input_is_one_line
    ("trainer.resume={truncated}",), ("data=voc", "data.root=/nonexistent/voc"),  # test_more_bad_inputs_are_one_line
    ("eval.mode=slide", "eval.crop_size=32", "eval.stride=100"),  # test_config_mistakes_fail_before_anything_runs
    ("trainer.max_iter=5",), ("data.root=/data/données",), ("ckpt=x.pt", "model=fcn"),  # ..._naming_the_key
    ("optimizer.lr=inf",), ("-m", "hydra.sweep.dir="), ("ckpt=/dev/null",),  # ..._before_any_file_is_written
}  # fmt: skip


def segtrain(args: list[str], cwd, prog: str = "segtrain", typed: bool = False) -> subprocess.CompletedProcess:
    """``PROG ARGS`` in ``cwd``: a process of its own when ``typed``, else :func:`in_process`."""
    return run_cli(args, cwd, exe=console_script(prog)) if typed else in_process(args, cwd, prog)


def scalar_tags(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_smoke_run_writes_everything(cli):
    proc, run = cli("debug=smoke")
    metrics = json.loads((run / "metrics.json").read_text())
    for key in (
        "best_miou",
        "last_miou",
        "per_class_iou",
        "num_params",
        "train_images_per_sec",
        "aacc",
        "macc",
        "mdice",
    ):
        assert key in metrics, key
    assert 0.0 <= metrics["best_miou"] <= 1.0 and 0.0 <= metrics["last_miou"] <= 1.0
    assert set(metrics["per_class_iou"]) == {"background", "circle", "square", "triangle", "ring", "cross"}
    assert metrics["num_params"] > 0 and metrics["train_images_per_sec"] > 0
    assert metrics["step"] == 8 and metrics["epoch"] == 2  # 16 images / batch 4 x 2 epochs
    assert (run / "checkpoints" / "last.pt").is_file() and (run / "checkpoints" / "best.pt").is_file()
    acc = scalar_tags(run / "tb")
    tags = acc.Tags()
    assert {"train/loss", "train/lr", "val/mIoU", "val/aAcc", "val_iou/circle"} <= set(tags["scalars"])
    assert "val/input_gt_pred" in tags["images"]
    assert [e.step for e in acc.Scalars("val/mIoU")] == [4, 8]
    # the per-class table is printed at the end
    assert "mean" in proc.stdout and "circle" in proc.stdout and "best val mIoU" in proc.stdout


def test_max_iters_wins_over_epochs(tmp_path):
    args = ["debug=smoke", "trainer.max_iters=12", "trainer.val_interval=5", "trainer.num_vis=0", "hydra.run.dir=run"]
    proc = in_process(args, tmp_path)  # the trainer's rule: test_smoke_run_writes_everything runs the command
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["step"] == 12
    assert [h["step"] for h in metrics["history"]] == [5, 10, 12]


def test_checkpoint_round_trip(finished_run):
    """The checkpoint of conftest's finished ``segtrain debug=smoke trainer.max_iters=1 ...`` run (only read)."""
    state = torch.load(finished_run[1] / "checkpoints" / "last.pt", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "scaler", "step", "epoch", "rng", "config"):
        assert key in state
    cfg = yaml.safe_load(state["config"])
    assert cfg["model"]["name"] == "unet" and cfg["trainer"]["max_iters"] == 1  # as given on the command line
    from omegaconf import OmegaConf

    from segtrain.models.build import build_model

    model = build_model(OmegaConf.create(cfg["model"]), cfg["data"]["num_classes"])
    model.load_state_dict(state["model"])
    model.eval()
    assert model(torch.zeros(1, 3, 50, 70)).shape == (1, 6, 50, 70)


def test_resume_auto_continues(cli, finished_run):
    import shutil

    shutil.copytree(finished_run[1], cli.cwd / "r")  # a finished `debug=smoke trainer.max_iters=1` run
    proc, run = cli("debug=smoke", "trainer.max_iters=4", "trainer.num_vis=0", "trainer.resume=auto", run_dir="r")
    assert "resumed from" in proc.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 4 and metrics["history"][0]["step"] == 1


# (the two jobs of a multirun, each with its value: tests/test_sweep.py::test_basic_sweep_goes_on_after_a_failed_job...)


def test_help_lists_groups(tmp_path):
    out = run_cli(["--help"], tmp_path).stdout
    for group in ("model", "data", "optimizer", "scheduler", "loss", "device", "trainer", "debug"):
        assert f"{group}:" in out, group
    for option in ("unet", "synthetic", "adamw", "sgd", "poly", "cosine", "ce", "auto", "cuda", "smoke"):
        assert option in out, option


@pytest.mark.parametrize(
    "args, expect",
    [
        (["model=nonexistent"], "model/nonexistent"),
        (["optimizer.lrr=0.1"], "optimizer.lrr"),
        (["optimizer.lr=abc"], "optimizer.lr"),
        (["optimizer.lr=-1"], "optimizer.lr must be > 0"),
        (["data.num_classes=0"], "data.num_classes must be >= 2"),
        (["data.batch_size=0"], "data.batch_size must be >= 1"),
        (["trainer.max_epochs=0"], "trainer.max_epochs must be >= 1"),
        (["device.precision=fp64"], "fp64"),
        (["device=cuda"], "no CUDA device"),
        (["data.image_size=[1,2,3]"], "data.image_size"),
        (["loss.class_weights=[1,2]"], "loss.class_weights has 2 values"),
        (["trainer.resume=/nonexistent/last.pt"], "no such file"),
        (
            ["logger.wandb.project=x"],
            "logger.wandb.project is a key of the wandb logger, which is off: add logger=wandb",
        ),
    ],
)
def test_bad_input_is_one_line(tmp_path, args, expect):
    if args == ["device=cuda"] and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = segtrain([*args, "debug=smoke"], tmp_path, typed=tuple(args) in TYPED)
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in err and "Traceback" not in proc.stdout
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("segtrain: error:") and expect in lines[0], err


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, finished_run):
    """A good checkpoint (conftest's finished run, only read), a truncated copy, a file of foreign tensors, the
    halves of a checkpoint, a TorchScript and an ONNX export (its header), a FIFO and the run dir."""

    root = tmp_path_factory.mktemp("ckpts")
    good = finished_run[1] / "checkpoints" / "last.pt"
    truncated = root / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:1000])
    half = root / "half.pt"
    half.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    foreign = root / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with warnings.catch_warnings():  # torch.jit's deprecation notes
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(torch.nn.Conv2d(3, 2, 1)), root / "model.pt")
    (root / "model.onnx").write_bytes(b"\x08\x08\x12\x07pytorch\x1a\x052.5.0" + bytes(64))
    os.mkfifo(root / "fifo")
    paths = {"truncated": truncated, "foreign": foreign, "good": good, "half": half, "run": finished_run[1]}
    return paths | {"torchscript": root / "model.pt", "onnx": root / "model.onnx", "fifo": root / "fifo"}


@pytest.mark.parametrize(
    "args, expect",
    [
        (["trainer.resume={truncated}"], "truncated"),
        (["trainer.resume={foreign}"], "not a segtrain checkpoint"),
        (["model.init_from=/nonexistent.pt"], "no such file"),
        (["data=voc", "data.root=/nonexistent/voc"], "/nonexistent/voc"),
        (["data=folder"], "data.root"),
        (["data.crop_size=0"], "data.crop_size must be positive"),
        (["model=fcn", "model.backbone=vgg16", "model.output_stride=8"], "vgg16"),
        (["model=pspnet", "model.backbone=resnet999"], "resnet999"),
        (["model.output_stride=4"], "model.output_stride must be 8, 16 or 32"),
        (["trainer.max_iters=0"], "trainer.max_iters must be >= 1"),
        (["trainer.accumulate=0"], "trainer.accumulate must be >= 1"),
        (["eval.mode=bogus"], "eval.mode"),
        (["loss=nonexistent"], "loss/nonexistent"),
        (["loss.name=ce+lovasz"], "lovasz"),
        (["loss.class_weights=sometimes"], "loss.class_weights"),
        (["optimizer.lr=0"], "optimizer.lr must be > 0"),
        (["trainer.keep_last=-1"], "trainer.keep_last"),
    ],
)
def test_more_bad_inputs_are_one_line(tmp_path, ckpts, args, expect):
    typed = tuple(args) in TYPED
    args = [a.format(**ckpts) for a in args]
    proc = segtrain([*args, "debug=smoke"], tmp_path, typed=typed)
    one_line_error(proc, expect)


def test_debug_errors_shows_traceback(tmp_path):
    proc = run_cli(["optimizer.lr=-1", "debug=smoke", "trainer.debug_errors=true"], tmp_path)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
    # any spelling the schema takes (or the key set in a YAML) shows it for an error inside the run too
    proc = run_cli(["debug=smoke", "data=folder", "data.root=nowhere", "trainer.debug_errors=yes"], tmp_path)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "DataError" in proc.stderr


def test_a_backbone_network_trains_through_the_cli(cli):
    """The console script end to end on a non-default network (tests/test_trainer.py::test_every_model_trains
    runs every network in-process)."""
    _, run = cli(
        "debug=smoke", "trainer.max_iters=2", "trainer.num_vis=1", "model=deeplabv3plus", "model.backbone=resnet18"
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 2 and metrics["num_params"] > 0 and 0 <= metrics["best_miou"] <= 1
    assert metrics["model"] == "deeplabv3plus"


def _one_line(proc, code: int, prefix: str = "segtrain: error: ") -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and len(lines[0]) <= 300 and lines[0].startswith(prefix), proc.stderr
    return lines[0]


@pytest.mark.parametrize(
    "args, expect",
    [
        (["eval.mode=slide", "eval.crop_size=32", "eval.stride=100"], "eval.stride=100 is larger than the window"),
        (["seed=-1"], "seed must be in [0, 4294967295]"),
        (["seed=99999999999999999999"], "seed must be in [0, 4294967295]"),
        (["optimizer.betas=[0.9]"], "optimizer.betas must be [beta1, beta2]"),
        (["optimizer.betas=[0.9,1.5]"], "optimizer.betas must be [beta1, beta2]"),
    ],
)
def test_config_mistakes_fail_before_anything_runs(finished_run, args, expect):
    """Caught by config.validate before Hydra touches the run dir (torch is not even loaded): an earlier
    run's dir stays byte for byte as it was."""
    root, run = finished_run
    before = _snapshot(run)
    proc = segtrain(
        ["debug=smoke", *args, "trainer.resume=auto", "hydra.run.dir=run"], root, typed=tuple(args) in TYPED
    )
    assert expect in _one_line(proc, 2)
    assert _snapshot(root / "run") == before  # a new dir is not even created (tests/test_sweep.py)


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _eval_cli(args, cwd, typed=False):
    return segtrain(args, cwd, "segtrain-eval", typed)


def test_segtrain_eval_errors_carry_its_name(tmp_path, finished_run):
    assert "no checkpoint given: add ckpt=PATH" in _one_line(_eval_cli([], tmp_path), 2, "segtrain-eval: error: ")
    (tmp_path / "notes.txt").write_text("best run: lr 0.01\n")
    line = _one_line(_eval_cli(["ckpt=notes.txt"], tmp_path), 2, "segtrain-eval: error: ")
    assert "notes.txt is a text file, not a checkpoint" in line and "unsafe" not in line
    root, run = finished_run  # its results into a training run's dir: refused, the run's metrics.json kept
    before = _snapshot(run)
    proc = _eval_cli(["ckpt=run/checkpoints/last.pt", "hydra.run.dir=run"], root, typed=True)
    assert "holds a training run" in _one_line(proc, 4, "segtrain-eval: error: ")
    assert _snapshot(root / "run") == before


def test_torch_compile_failure_is_one_line_with_the_compiler_output_in_the_log(tmp_path, monkeypatch):
    """A real dynamo BackendCompilerFailed (a backend that fails with 100 KB of output, as a missing C++
    compiler does) through the real CLI (its entry point, in this process)."""
    import functools

    def failing(gm, example_inputs):
        raise RuntimeError("C++ compile error\n" + "error: in generated kernel\n" * 4000)

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=failing))
    try:
        proc = in_process(["debug=smoke", "trainer.max_iters=1", "device.compile=true", "hydra.run.dir=run"], tmp_path)
    finally:
        torch._dynamo.reset()  # what dynamo holds of the failed compilation: not another test's
    line = _one_line(proc, 2)
    assert "torch.compile failed (BackendCompilerFailed" in line and "C++ compile error" in line
    assert "set device.compile=false" in line and "cli.log" in line
    log = (tmp_path / "run" / "cli.log").read_text()
    assert log.count("error: in generated kernel") >= 4000 and "Traceback" in log


def test_cli_and_schema_load_without_torch():
    """`segtrain --help` stays fast: the entry points and the typed schema import Hydra and OmegaConf only (and the
    RunDirGuard, checkpoint paths included, checks before torch loads)."""
    import subprocess

    code = (
        "import sys, segtrain.apps.train, segtrain.apps.evaluate, segtrain.apps.guard, segtrain.config, segtrain.files\n"
        "heavy = [m for m in ('torch', 'numpy', 'albumentations', 'cv2', 'torchvision') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# --- hostile input (issue 21) ---------------------------------------------------------------------------------------


def _nothing_written(cwd) -> None:
    assert not list(cwd.iterdir()), list(cwd.iterdir())  # no run dir, no outputs/DATE/TIME, no log


@pytest.mark.parametrize(
    "prog, args, expect",
    [
        ("segtrain", ["trainer.max_iter=5"], "unknown key trainer.max_iter; did you mean trainer.max_iters?"),
        ("segtrain", ["+trainer.foo=1"], "unknown key trainer.foo ("),
        ("segtrain", ["+new_key=1"], "unknown key new_key ("),
        ("segtrain", ["~trainer"], "~trainer would delete trainer, but every part of the config is needed"),
        ("segtrain", ["~model.backbone"], "~model.backbone would delete model.backbone"),  # null: Hydra's error
        ("segtrain", ["~trainer.max_epochs"], "~trainer.max_epochs would delete trainer.max_epochs"),  # OmegaConf's
        ("segtrain", ["data.root=/data/données"], """needs quotes: 'data.root="/data/données"'"""),
        ("segtrain", ["hydra.run.dir=runs/my run=1"], """'hydra.run.dir="runs/my run=1"'"""),
        ("segtrain", ["hydra.run.dir=runs/my", "run=1"], """quote the whole value: 'hydra.run.dir="runs/my run=1"'"""),
        ("segtrain", ["data.root=/a,b"], """(a sweep): add -m to run one job per value, or quote it to keep it one"""),
        (
            "segtrain",
            ["trainer.max_iters=1e9"],
            "must be an integer, got 1e9 (read as float); write trainer.max_iters=",
        ),
        ("segtrain", ["model.pretrained=maybe"], "model.pretrained=maybe: no such file or folder; give true, false"),
        ("segtrain", ["optimizer.betas=0.9"], "optimizer.betas must be a list such as [a, b], got 0.9"),
        ("segtrain", ["--config-name", "nope"], "no primary config 'nope' (--config-name)"),
        ("segtrain", ["--config-dir", "nowhere"], "give --config-dir (-cd) an existing dir of YAML configs"),
        ("segtrain-eval", ["ckpt=x.pt", "model=fcn"], "segtrain-eval takes the model from the checkpoint"),
        ("segtrain-eval", ["ckpt=x.pt", "trainer=default"], "no config group trainer (its groups: data, device)"),
        ("segtrain-eval", ["ckpt=x.pt", "+eval.scale=[1.0]"], "unknown key eval.scale; did you mean eval.scales?"),
    ],
)
def test_command_line_mistakes_are_one_line_naming_the_key(tmp_path, prog, args, expect):
    """Hydra's own messages replaced: the key, the nearest real one or the quoting that works, never '+KEY'."""
    line = one_line_error(segtrain(args, tmp_path, prog, typed=tuple(args) in TYPED), expect, prog=prog)
    assert "+" not in line, line
    _nothing_written(tmp_path)


@pytest.mark.parametrize(
    "prog, args, expect",
    [
        ("segtrain", ["optimizer.lr=inf"], "optimizer.lr=inf: every number in the config must be finite"),
        ("segtrain", ["data.mean=[nan,0.5,0.5]"], "data.mean has nan (item 0)"),
        ("segtrain", ["data.val_fraction=1.5"], "data.val_fraction must be in (0, 1]"),
        ("segtrain", ["loss.name=ce+dice", "loss.weights={ce:-1,dice:1}"], "has a negative weight"),
        ("segtrain", ["model.name=segnetz"], "unknown model.name 'segnetz'"),
        ("segtrain", ["+trainer.foo=1"], "unknown key trainer.foo"),
        ("segtrain", ["hydra.run.dir="], "hydra.run.dir is empty, so the files would go into the working dir"),
        ("segtrain", ["-m", "hydra.sweep.dir="], "hydra.sweep.dir is empty"),
        ("segtrain", ["trainer.resume=."], "trainer.resume=. is a directory, not a checkpoint file"),
        ("segtrain-eval", ["ckpt=x.pt", "eval.scales=[1.0,inf]"], "eval.scales has inf (item 1)"),
        ("segtrain-eval", ["ckpt=/dev/null"], "ckpt=/dev/null is a character device, not a checkpoint file"),
    ],
)
def test_bad_values_are_refused_before_any_file_is_written(tmp_path, prog, args, expect):
    """With the default run dir (outputs/DATE/TIME): a bad value, key or path leaves the working dir as it was.
    (segtrain-predict, -export and -info run the same checks: tests/test_config.py, and the cases below.)"""
    one_line_error(segtrain(args, tmp_path, prog, typed=tuple(args) in TYPED), expect, prog=prog)
    _nothing_written(tmp_path)


@pytest.mark.parametrize(
    "prog, args, expect",
    [
        (
            "segtrain-eval",
            ["ckpt={half}"],
            "half.pt is truncated or not a segtrain checkpoint (a TorchScript/ONNX export?)",
        ),
        ("segtrain-predict", ["ckpt={torchscript}", "input=y"], "model.pt is a TorchScript export (segtrain-export)"),
        (
            "segtrain-export",
            ["ckpt={onnx}"],
            "model.onnx is an ONNX export (segtrain-export), not a training checkpoint",
        ),
        ("segtrain-info", ["ckpt={fifo}"], "fifo is a FIFO (named pipe), not a checkpoint file"),
        (
            "segtrain",
            ["model.init_from={run}"],
            "is a directory, not a checkpoint file; give the file in it: model.init_from=",
        ),
        (
            "segtrain",
            ["trainer.resume={run}"],
            "checkpoints/last.pt (or trainer.resume=auto with hydra.run.dir set to it)",
        ),
        ("segtrain", ["trainer.resume={torchscript}"], "model.pt is a TorchScript export"),
    ],
)
def test_what_is_not_a_checkpoint_is_named_by_every_command(tmp_path, ckpts, prog, args, expect):
    """One line and nothing before it (no torch warnings), before the run dir: the same helper for every command."""
    args = [a.format(**ckpts) for a in args]
    one_line_error(run_cli(args, tmp_path, exe=console_script(prog)), expect, prog=prog)
    _nothing_written(tmp_path)
