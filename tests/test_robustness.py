"""Issue 6: exact resume, preemption, NaN guards, safe checkpoint loading, environment faults, bad inputs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from segtrain import checkpoint
from segtrain.errors import CheckpointError
from tests.conftest import run_cli, segtrain_exe


def one_line_error(proc, *needles, prog="segtrain"):
    assert proc.returncode != 0, proc.stdout
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text, text
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error:") and len(lines[0]) <= 300, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def model_tensors(run: Path, name: str = "last.pt") -> dict:
    return torch.load(run / "checkpoints" / name, weights_only=True)["model"]


# ---------------------------------------------------------------------------
# Exact resume.

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
    _, straight = cli(*DETERMINISTIC, run_dir="straight")
    proc, part = cli(*DETERMINISTIC, "trainer.stop_at=5", run_dir="part", check=False)
    assert proc.returncode == 75, proc.stderr
    assert "resume with:" in proc.stderr and "trainer.resume=auto" in proc.stderr
    assert checkpoint.load(part / "checkpoints" / "last.pt")["step"] == 5  # mid-epoch: 4 iterations per epoch
    proc, part = cli(*DETERMINISTIC, "trainer.resume=auto", run_dir="part")
    assert "resumed from" in proc.stdout
    a, b = model_tensors(straight), model_tensors(part)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    ma = json.loads((straight / "metrics.json").read_text())
    mb = json.loads((part / "metrics.json").read_text())
    assert ma["best_miou"] == mb["best_miou"] and [h["miou"] for h in ma["history"]] == [
        h["miou"] for h in mb["history"]
    ]


# ---------------------------------------------------------------------------
# Preemption.


def test_sigterm_writes_last_and_resume_continues(tmp_path):
    args = [
        "debug=smoke",
        "trainer.max_iters=100000",
        "trainer.val_interval=100000",
        "data.num_workers=2",
        "trainer.progress=false",
        "hydra.run.dir=run",
    ]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.Popen(
        segtrain_exe() + args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    tb = tmp_path / "run" / "tb"
    deadline = time.time() + 120
    while time.time() < deadline and not (tb.is_dir() and any(tb.iterdir())):  # training has started
        time.sleep(0.5)
    time.sleep(3)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert time.time() - t0 < 60
    assert proc.returncode == 75, out + err
    assert "segtrain: stopped: stopped by SIGTERM" in err and "trainer.resume=auto" in err and "Traceback" not in err
    state = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")
    step = state["step"]
    assert step >= 1
    again = run_cli([*args, "trainer.resume=auto", f"trainer.stop_at={step + 2}"], tmp_path)
    assert again.returncode == 75, again.stderr
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / 'last.pt'} at step {step}" in again.stdout
    assert checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == step + 2


def test_sigterm_during_validation_stops_at_the_next_batch(tmp_path):
    """A long validation (2000 images) is cut at the next batch: last.pt holds the 2 steps done, exit 75,
    and the status says stopped (not a whole validation plus one more training step later)."""
    args = ["debug=smoke", "data.num_val=2000", "data.val_batch_size=1", "trainer.val_interval=2",
            "trainer.max_iters=100", "trainer.progress=false", "trainer.num_vis=0", "hydra.run.dir=run"]  # fmt: skip
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.Popen(
        segtrain_exe() + args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    for line in proc.stdout:
        if line.startswith("step 2/"):  # logged after step 2; its validation starts now
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert "stopped by SIGTERM at step 2/100" in err and "Traceback" not in err
    assert "val mIoU" not in out  # the validation was cut, not finished
    state = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["step"] == 2 and state["history"] == []
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "stopped"


def test_keep_last_and_fallback_when_last_is_corrupt(cli):
    _, run = cli("debug=smoke", "trainer.max_iters=8", "trainer.val_interval=4", "trainer.keep_last=2")
    ck = run / "checkpoints"
    assert (ck / "last-1.pt").is_file() and not (ck / "last-2.pt").exists()
    assert checkpoint.load(ck / "last-1.pt")["step"] == 4 and checkpoint.load(ck / "last.pt")["step"] == 8
    data = (ck / "last.pt").read_bytes()
    (ck / "last.pt").write_bytes(data[: len(data) // 3])  # a torn file (e.g. copied off a dying node)
    (ck / ".last.pt.abc.tmp").write_bytes(b"partial")  # what kill -9 during a write leaves
    proc, run = cli(
        "debug=smoke", "trainer.max_iters=10", "trainer.val_interval=4", "trainer.resume=auto", "trainer.keep_last=2"
    )
    assert "trying" in proc.stdout + proc.stderr and "at step 4" in proc.stdout
    assert checkpoint.load(ck / "last.pt")["step"] == 10
    assert not (ck / ".last.pt.abc.tmp").exists()


def test_save_rotating_never_leaves_the_target_missing(tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    checkpoint.save_rotating({"model": {"w": torch.zeros(2)}, "step": 1}, target, keep=1)

    def crash(*a, **k):
        raise KeyboardInterrupt  # a kill in the middle of torch.save

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_rotating({"model": {"w": torch.ones(2)}, "step": 2}, target, keep=1)
    assert checkpoint.load(target)["step"] == 1  # the old checkpoint is intact
    assert not list(tmp_path.glob(".*.tmp"))


# ---------------------------------------------------------------------------
# Non-finite values.


def test_nan_in_fp32_stops_with_one_line_and_keeps_checkpoints(cli):
    _, run = cli("debug=smoke", "trainer.max_iters=4", run_dir="r")
    before = (run / "checkpoints" / "last.pt").read_bytes()
    proc, _ = cli(
        "debug=smoke",
        "data.std=[1e-45,1e-45,1e-45]",  # inputs become inf/NaN (a resume keeps the checkpoint's lr)
        "device.precision=fp32",
        "trainer.max_iters=8",
        "trainer.progress=false",
        "trainer.resume=auto",
        run_dir="r",
        check=False,
    )  # the same run dir, continued: its checkpoints must survive the divergence
    line = one_line_error(proc, "non-finite", "optimizer.lr", "device.precision")
    assert proc.returncode == 3 and "at step 5" in line
    assert (run / "checkpoints" / "last.pt").read_bytes() == before


# ---------------------------------------------------------------------------
# Safe loading.


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp") / f"segtrain-pwned-{os.getpid()}"


def test_text_file_given_as_checkpoint_is_named(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("lr 0.01 worked best\n")
    with pytest.raises(CheckpointError, match=r"notes.txt is a text file, not a checkpoint \(it starts with 'lr 0.01"):
        checkpoint.load(notes)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty file"):
        checkpoint.load(tmp_path / "empty.pt")
    (tmp_path / "noise.pt").write_bytes(bytes(range(256)))
    with pytest.raises(CheckpointError, match="noise.pt is not a PyTorch file"):
        checkpoint.load(tmp_path / "noise.pt")


def test_pickled_code_is_refused_and_not_run(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": Evil()}, evil)
    MARKER.unlink(missing_ok=True)
    proc = run_cli(["debug=smoke", f"trainer.resume={evil}"], tmp_path)
    one_line_error(proc, "refusing to load", "evil.pt")
    exe = [str(Path(sys.executable).parent / "segtrain-eval")]
    proc = run_cli([f"ckpt={evil}"], tmp_path, exe=exe)
    one_line_error(proc, "refusing to load", "it would call posix.system", prog="segtrain-eval")
    proc = run_cli(["debug=smoke", f"model.init_from={evil}"], tmp_path)
    one_line_error(proc, "refusing to load")
    assert not MARKER.exists(), "the pickle ran code"


def test_foreign_checkpoint_lists_differences(cli):
    _, run = cli("debug=smoke", "trainer.max_iters=2", run_dir="unet")
    proc, _ = cli(
        "debug=smoke",
        "model.base_channels=4",
        "data.num_classes=3",
        f"trainer.resume={run / 'checkpoints' / 'last.pt'}",
        check=False,
    )
    one_line_error(proc, "cannot resume", "num_classes 6 (here 3)", "model.base_channels 8 (here 4)", "shape")


def test_init_from_loads_what_fits(cli):
    _, run = cli("debug=smoke", "trainer.max_iters=2", run_dir="src")
    proc, _ = cli(
        "debug=smoke",
        "trainer.max_iters=2",
        "data.num_classes=3",
        f"model.init_from={run / 'checkpoints' / 'best.pt'}",
        run_dir="dst",
    )
    log = proc.stdout
    assert "model.init_from=" in log and "shape differs: classifier.weight" in log
    ours = model_tensors(run)
    theirs = model_tensors(cli.cwd / "dst", "last.pt")
    assert theirs["classifier.weight"].shape[0] == 3 and ours["classifier.weight"].shape[0] == 6
    proc, _ = cli(
        "debug=smoke",
        "model=fcn",
        "model.backbone=resnet18",
        f"model.init_from={run / 'checkpoints' / 'best.pt'}",
        check=False,
    )
    one_line_error(proc, "no tensor matches")


# ---------------------------------------------------------------------------
# Environment faults.


def test_unwritable_run_dir_is_caught_before_training(tmp_path):
    proc = run_cli(["debug=smoke", "hydra.run.dir=/proc/segtrain-run"], tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "/proc/segtrain-run" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_full_disk_is_caught_before_training(monkeypatch, tmp_path):
    import shutil

    from segtrain.errors import OutputError
    from segtrain.rundir import check_writable

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(OutputError, match="MiB free"):
        check_writable(tmp_path / "ck", 1_000_000)


def test_save_failure_keeps_previous_checkpoint(cli, tmp_path, monkeypatch):
    from segtrain.errors import OutputError
    from segtrain.trainer import Trainer
    from tests.test_config import composed

    cfg = composed("debug=smoke", "trainer.max_iters=2", "trainer.progress=false")
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.fit()
    good = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")["step"]

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_atomic", full)
    with pytest.raises(OutputError, match="No space left on device.*previous checkpoint is kept"):
        trainer.save()
    assert checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == good


def test_out_of_memory_becomes_advice(tmp_path, monkeypatch):
    from segtrain.errors import ResourceError
    from segtrain.trainer import Trainer
    from tests.test_config import composed

    trainer = Trainer(composed("debug=smoke", "trainer.progress=false"), tmp_path / "run")

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer, "train_step", oom)
    with pytest.raises(ResourceError) as e:
        trainer.fit()
    msg = str(e.value)
    assert "data.batch_size=4" in msg and "trainer.accumulate=2" in msg and "precision" in msg


# ---------------------------------------------------------------------------
# Bad inputs that need files (the plain ones are in test_cli.py).


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    proc = run_cli(["debug=smoke", "trainer.max_iters=1", "hydra.run.dir=run"], root)
    assert proc.returncode == 0, proc.stderr
    good = root / "run" / "checkpoints" / "last.pt"
    truncated = root / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:1000])
    foreign = root / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    return {"truncated": truncated, "foreign": foreign, "good": good}


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
    args = [a.format(**ckpts) for a in args]
    proc = run_cli([*args, "debug=smoke"], tmp_path)
    one_line_error(proc, expect)


def test_fp16_overflow_steps_are_skipped_counted_and_logged(tmp_path, monkeypatch, caplog):
    """fp16 autocast + GradScaler on the CPU: two steps with overflowing gradients are skipped, not fatal."""
    from segtrain.trainer import Trainer
    from tests.test_config import composed

    trainer = Trainer(
        composed("debug=smoke", "device=cpu", "device.precision=fp16", "trainer.max_iters=4", "trainer.progress=false"),
        tmp_path / "run",
    )
    criterion, calls = trainer.criterion, []

    def blow_up(out, y):
        loss = criterion(out, y)
        if not torch.is_grad_enabled():  # the dry validation pass before the first step
            return loss
        calls.append(1)
        return loss * 1e8 if len(calls) <= 2 else loss  # the first two steps overflow fp16 gradients

    monkeypatch.setattr(trainer, "criterion", blow_up)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with caplog.at_level("WARNING", logger="segtrain"):
        summary = trainer.fit()
    assert summary["skipped_steps"] == 2 and summary["step"] == 4
    assert "scaler skipped the step" in caplog.text
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values() if v.is_floating_point())
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["skipped_steps"] == 2


def test_kill_9_never_leaves_a_corrupt_checkpoint(tmp_path):
    """SIGKILL at arbitrary moments of a run that writes last.pt every step: last.pt always loads."""
    args = [
        "debug=smoke",
        "trainer.max_iters=100000",
        "trainer.val_interval=1",
        "trainer.progress=false",
        "trainer.num_vis=0",
        "hydra.run.dir=run",
        "trainer.resume=auto",
    ]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    steps = []
    for delay in (0.7, 1.3, 0.45):
        proc = subprocess.Popen(
            segtrain_exe() + args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
        )
        seen = last.stat().st_mtime_ns if last.is_file() else None
        deadline = time.time() + 120
        while time.time() < deadline and (not last.is_file() or last.stat().st_mtime_ns == seen):
            time.sleep(0.05)  # until this process has written its first checkpoint
        time.sleep(delay)  # somewhere in a step, a validation or a checkpoint write
        proc.kill()
        proc.wait()
        steps.append(checkpoint.load(last)["step"])  # never torn
    assert steps == sorted(steps) and steps[-1] > steps[0]  # each start resumed where the last one died


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_first_signal_is_noted_second_aborts(name):
    code = f"""
import os, signal, sys, time
from segtrain.runtime import StopSignals
with StopSignals() as s:
    os.kill(os.getpid(), signal.{name})
    time.sleep(0.2)
    print("received", s.received, flush=True)
    os.kill(os.getpid(), signal.{name})  # the second one: default action, the process dies now
    time.sleep(5)
    print("still alive", flush=True)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert f"received {name}" in proc.stdout and "still alive" not in proc.stdout
    assert proc.returncode == -getattr(signal, name)
    assert "stopping after this step" in proc.stderr
