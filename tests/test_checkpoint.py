"""segtrain.checkpoint: atomic, rotating saves that leave a loadable last.pt whatever moment a kill comes, and safe
loading (text files named, pickled code refused and never run)."""

import multiprocessing
import os
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import console_script, one_line_error, run_cli
from test_config import composed

from segtrain import checkpoint, rundir
from segtrain.build import build_trainer
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


def _train(cfg, run: Path) -> None:
    """A forked child's run (one thread: OpenMP is not fork-safe with more)."""
    torch.set_num_threads(1)
    build_trainer(cfg, run).fit()


def test_kill_9_never_leaves_a_corrupt_checkpoint(tmp_path):
    """SIGKILL at arbitrary moments of a run that writes last.pt every step: last.pt always loads.  Each run is
    segtrain's trainer in a child forked from this process (torch already imported: no start-up of a command)."""
    args = [
        "debug=smoke",
        "device=cpu",  # a forked child cannot use CUDA once the parent has initialised it
        "trainer.max_iters=100000",
        "trainer.val_interval=1",
        "trainer.progress=false",
        "trainer.num_vis=0",
        "trainer.resume=auto",
    ]
    cfg, run = composed(*args), tmp_path / "run"
    last = run / "checkpoints" / "last.pt"
    steps = []
    for delay in (0.7, 1.3, 0.45):
        proc = multiprocessing.get_context("fork").Process(target=_train, args=(cfg, run), daemon=True)
        seen = last.stat().st_mtime_ns if last.is_file() else None
        proc.start()
        try:
            deadline = time.time() + 120
            while time.time() < deadline and (not last.is_file() or last.stat().st_mtime_ns == seen):
                assert proc.exitcode is None, f"the run ended ({proc.exitcode}) before writing a checkpoint"
                time.sleep(0.05)  # until this process has written its first checkpoint
            time.sleep(delay)  # somewhere in a step, a validation or a checkpoint write
        finally:
            proc.kill()  # SIGKILL
            proc.join()
        assert proc.exitcode == -9
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
    # model.init_from: the same load (segtrain.checkpoint.load, from segtrain.resume.init_from) in this process
    try:
        with pytest.raises(CheckpointError, match="refusing to load"):
            build_trainer(composed("debug=smoke", f"model.init_from={evil}"), tmp_path / "run")
    finally:
        rundir.release(tmp_path / "run")  # the lock build_trainer took
    assert not MARKER.exists(), "the pickle ran code"


# --- what a path given as a checkpoint is (issue 21) ----------------------------------------------------------------


def test_a_path_that_is_not_a_checkpoint_file_says_what_it_is(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"PK")
    (run / "checkpoints" / "best.pt").write_bytes(b"PK")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "link.pt").symlink_to(tmp_path / "gone.pt")
    (tmp_path / "empty").mkdir()
    cases = [
        (
            run,
            "ckpt",
            f"ckpt={run} is a directory, not a checkpoint file; give the file in it: ckpt={run}/checkpoints/best.pt",
        ),
        (
            run,
            "trainer.resume",
            f"trainer.resume={run}/checkpoints/last.pt (or trainer.resume=auto with hydra.run.dir set to it)",
        ),
        (
            tmp_path / "empty",
            "model.init_from",
            "is a directory, not a checkpoint file, and holds none; give a .pt file",
        ),
        ("/dev/null", "ckpt", "ckpt=/dev/null is a character device, not a checkpoint file"),
        (tmp_path / "fifo", "ckpt", "fifo is a FIFO (named pipe), not a checkpoint file"),
        (tmp_path / "link.pt", "ckpt", "link.pt is a broken symbolic link (to "),
        (tmp_path / "none.pt", "trainer.resume", "none.pt: no such file (a .pt checkpoint is expected"),
    ]
    for path, key, message in cases:
        with pytest.raises(CheckpointError) as e:
            checkpoint.checkpoint_file(path, key)
        assert message in str(e.value), str(e.value)
    with pytest.raises(CheckpointError, match="fifo is a FIFO"):  # load() too, never opening (and blocking on) it
        checkpoint.load(tmp_path / "fifo")


def test_files_that_cannot_be_checkpoints_are_told_apart_without_torch(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.zeros(1000)}}, good)
    data = good.read_bytes()
    (tmp_path / "half.pt").write_bytes(data[: len(data) // 2])
    with warnings.catch_warnings():  # torch.jit's deprecation notes
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(torch.nn.Conv2d(3, 2, 1)), tmp_path / "model.pt")  # as segtrain-export writes
    (tmp_path / "model.onnx").write_bytes(b"\x08\x08\x12\x07pytorch\x1a\x052.5.0" + bytes(64))  # an ONNX header
    cases = {
        "half.pt": "half.pt is truncated or not a segtrain checkpoint (a TorchScript/ONNX export?); use a .pt file",
        "model.pt": "model.pt is a TorchScript export (segtrain-export), not a training checkpoint; give the .pt",
        "model.onnx": "model.onnx is an ONNX export (segtrain-export), not a training checkpoint",
    }
    for name, message in cases.items():
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with pytest.raises(CheckpointError) as e:
                checkpoint.load(tmp_path / name)
        assert message in str(e.value) and not seen, (str(e.value), [str(w.message) for w in seen])
    checkpoint.inspect(good)


def test_a_file_torch_cannot_read_is_one_complete_line_and_its_warnings_are_not_shown(tmp_path, monkeypatch):
    good = tmp_path / "good.pt"
    torch.save({"model": {}}, good)

    def fails(*args, **kwargs):
        warnings.warn("torch.load received a zip file that looks like a TorchScript archive", UserWarning, stacklevel=2)
        raise RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory " * 5)

    monkeypatch.setattr(torch, "load", fails)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError) as e:
            checkpoint.load(good)
    assert str(e.value) == (
        f"{good} is truncated or not a segtrain checkpoint (a TorchScript/ONNX export?): torch cannot read it "
        "(RuntimeError); use a .pt file written by segtrain (last.pt, best.pt)"
    )  # complete: torch's own text is its cause, in the log's traceback
    assert "central directory" in str(e.value.__cause__) and not seen
