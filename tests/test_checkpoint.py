"""segtrain.checkpoint: atomic, rotating saves that leave a loadable last.pt whatever moment a kill comes, and safe
loading (text files named, pickled code refused and never run)."""

import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import console_script, one_line_error, run_cli, start_cli

from segtrain import checkpoint
from segtrain.errors import CheckpointError


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
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    steps = []
    for delay in (0.7, 1.3, 0.45):
        proc = start_cli(args, tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seen = last.stat().st_mtime_ns if last.is_file() else None
        deadline = time.time() + 120
        while time.time() < deadline and (not last.is_file() or last.stat().st_mtime_ns == seen):
            time.sleep(0.05)  # until this process has written its first checkpoint
        time.sleep(delay)  # somewhere in a step, a validation or a checkpoint write
        proc.kill()
        proc.wait()
        steps.append(checkpoint.load(last)["step"])  # never torn
    assert steps == sorted(steps) and steps[-1] > steps[0]  # each start resumed where the last one died


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
    proc = run_cli([f"ckpt={evil}"], tmp_path, exe=console_script("segtrain-eval"))
    one_line_error(proc, "refusing to load", "it would call posix.system", prog="segtrain-eval")
    proc = run_cli(["debug=smoke", f"model.init_from={evil}"], tmp_path)
    one_line_error(proc, "refusing to load")
    assert not MARKER.exists(), "the pickle ran code"
