"""segtrain.resume: a run stopped mid-epoch resumes bitwise, trainer.resume=auto falls back to last-1.pt when
last.pt is torn, a checkpoint of another config is refused with its differences listed, and model.init_from loads
the tensors that fit."""

import json
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import cli_env, one_line_error, segtrain_exe
from test_config import composed

from segtrain import checkpoint, rundir
from segtrain.build import build_trainer
from segtrain.config import config_dir
from segtrain.config.explicit import explicit_keys
from segtrain.errors import CheckpointError


def model_tensors(run: Path, name: str = "last.pt") -> dict:
    return torch.load(run / "checkpoints" / name, weights_only=True)["model"]


DETERMINISTIC = [
    "debug=smoke",
    "model=fcn",
    "model.backbone=resnet18",
    "model.variant=32s",
    "device=cpu",
    "trainer.deterministic=true",
    "trainer.max_iters=12",
    "data.num_workers=2",
    "trainer.num_vis=0",
    "trainer.progress=false",
]


def test_resume_mid_epoch_is_bitwise_identical(cli):
    # The uninterrupted reference run in this process, built as the command line builds it (the config that the
    # same overrides compose, planned from the keys they set): the stopped and resumed run is the commands'.
    straight, deterministic = cli.cwd / "straight", torch.are_deterministic_algorithms_enabled()
    try:
        build_trainer(composed(*DETERMINISTIC), straight, explicit=explicit_keys(DETERMINISTIC, [config_dir()])).fit()
    finally:
        torch.use_deterministic_algorithms(deterministic)  # trainer.deterministic: not for the next tests
    name = "part é=1, x"  # a run dir that the shell and Hydra must both have quoted
    proc, _ = cli(*DETERMINISTIC, "trainer.stop_at=5", run_dir=f'"{name}"', check=False)
    part = cli.cwd / name
    assert proc.returncode == 75, proc.stderr
    assert "resume with:" in proc.stderr and "trainer.resume=auto" in proc.stderr
    assert checkpoint.load(part / "checkpoints" / "last.pt")["step"] == 5  # mid-epoch: 4 iterations per epoch
    # resumed by the printed command, through bash (a long command is printed as "the same command plus ...")
    printed = proc.stderr.rsplit("resume with: ", 1)[1].strip()
    same = " ".join(shlex.quote(a) for a in segtrain_exe() + DETERMINISTIC)
    command = printed.replace("the same command plus", same) if printed.startswith("the same") else printed
    if not printed.startswith("the same"):
        command = command.replace("segtrain", " ".join(shlex.quote(a) for a in segtrain_exe()), 1)
    proc = subprocess.run(["bash", "-c", command], cwd=cli.cwd, capture_output=True, text=True, env=cli_env())
    assert proc.returncode == 0 and "resumed from" in proc.stdout, proc.stderr
    a, b = model_tensors(straight), model_tensors(part)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    ma = json.loads((straight / "metrics.json").read_text())
    mb = json.loads((part / "metrics.json").read_text())
    assert ma["best_miou"] == mb["best_miou"] and [h["miou"] for h in ma["history"]] == [
        h["miou"] for h in mb["history"]
    ]


def test_keep_last_and_fallback_when_last_is_corrupt(tmp_path, caplog):
    """segtrain.checkpoint's rotation and segtrain.resume's fallback, in this process (the command line's
    trainer.resume=auto: test_resume_mid_epoch_is_bitwise_identical, tests/test_cli.py)."""
    run = tmp_path / "run"
    args = ["debug=smoke", "trainer.val_interval=4", "trainer.keep_last=2", "trainer.num_vis=0",
            "trainer.progress=false"]  # fmt: skip
    build_trainer(composed(*args, "trainer.max_iters=8"), run).fit()
    ck = run / "checkpoints"
    assert (ck / "last-1.pt").is_file() and not (ck / "last-2.pt").exists()
    assert checkpoint.load(ck / "last-1.pt")["step"] == 4 and checkpoint.load(ck / "last.pt")["step"] == 8
    data = (ck / "last.pt").read_bytes()
    (ck / "last.pt").write_bytes(data[: len(data) // 3])  # a torn file (e.g. copied off a dying node)
    (ck / ".last.pt.abc.tmp").write_bytes(b"partial")  # what kill -9 during a write leaves
    with caplog.at_level("INFO", logger="segtrain"):
        build_trainer(composed(*args, "trainer.max_iters=10", "trainer.resume=auto"), run).fit()
    assert "trying" in caplog.text and f"resumed from {ck / 'last-1.pt'} at step 4" in caplog.text
    assert checkpoint.load(ck / "last.pt")["step"] == 10
    assert not (ck / ".last.pt.abc.tmp").exists()


def test_foreign_checkpoint_lists_differences(cli, finished_run):
    run = finished_run[1]  # a debug=smoke run (unet, base_channels 8, 6 classes), only read
    proc, _ = cli(
        "debug=smoke",
        "model.base_channels=4",
        "data.num_classes=3",
        f"trainer.resume={run / 'checkpoints' / 'last.pt'}",
        check=False,
    )
    one_line_error(proc, "cannot resume", "num_classes 6 (here 3)", "model.base_channels 8 (here 4)", "shape")


def test_init_from_loads_what_fits(cli, finished_run, caplog):
    run = finished_run[1]  # a debug=smoke run (unet, 6 classes), only read
    best = run / "checkpoints" / "best.pt"
    # segtrain.resume.init_from in this process; its refusal below goes through the command line
    cfg = composed("debug=smoke", "trainer.max_iters=2", "data.num_classes=3", "trainer.num_vis=0",
                   "trainer.progress=false", f"model.init_from={best}")  # fmt: skip
    with caplog.at_level("INFO", logger="segtrain"):
        build_trainer(cfg, cli.cwd / "dst").fit()
    log = caplog.text
    assert "model.init_from=" in log and "shape differs: classifier.weight" in log
    ours = model_tensors(run)
    theirs = model_tensors(cli.cwd / "dst", "last.pt")
    assert theirs["classifier.weight"].shape[0] == 3 and ours["classifier.weight"].shape[0] == 6
    proc, _ = cli("debug=smoke", "model=fcn", "model.backbone=resnet18", f"model.init_from={best}", check=False)
    one_line_error(proc, "no tensor matches")


def test_resume_into_fp16_from_a_run_without_a_grad_scaler(tmp_path):
    """A checkpoint of a bf16/fp32 run (its GradScaler off: an empty state) resumes under fp16 (as on a GPU,
    precision=auto) with a fresh scaler, not PyTorch's 'source state dict is empty'."""
    from segtrain.config import validate

    args = ["debug=smoke", "device=cpu", "trainer.num_vis=0", "trainer.progress=false", "data.num_train=8"]
    cfg = composed(*args, "device.precision=bf16", "trainer.max_iters=2")
    validate(cfg)
    build_trainer(cfg, tmp_path).fit()
    assert checkpoint.load(tmp_path / "checkpoints" / "last.pt")["scaler"] == {}
    cfg = composed(*args, "device.precision=fp16", "trainer.max_iters=3", "trainer.resume=auto")
    validate(cfg)
    build_trainer(cfg, tmp_path).fit()
    last = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert last["step"] == 3 and last["scaler"]["scale"] > 0


def test_resume_with_another_optimizer_is_one_line(cli, tiny_run):
    """Its state (momenta, parameter groups) cannot carry over: refused before training, with the way out."""
    run = cli.cwd / "r"
    shutil.copytree(tiny_run, run)  # a finished debug=smoke run: model.base_channels=4, 2 iterations
    common = ["debug=smoke", "model.base_channels=4", "trainer.max_iters=4", "trainer.progress=false",
              "trainer.resume=auto"]  # fmt: skip
    proc, _ = cli(*common, "optimizer=sgd", run_dir="r", check=False)  # another optimizer: the command's line
    line = one_line_error(proc, "cannot resume from", "parameter group", "model.init_from=")
    assert proc.returncode == 2, line
    # other parameter groups: the same check (segtrain.resume.resume_state) in this process
    try:
        with pytest.raises(CheckpointError) as e:
            build_trainer(composed(*common, "optimizer.no_decay_norm_bias=true"), run)
    finally:
        rundir.release(run)  # the lock build_trainer took
    for needle in ("cannot resume from", "parameter group", "model.init_from="):
        assert needle in str(e.value), str(e.value)
    assert e.value.exit_code == 2
    assert checkpoint.load(run / "checkpoints" / "last.pt")["step"] == 2  # untouched
