"""A run dir belongs to one run: no silent overwrite, ``trainer.overwrite`` keeps the old files under
``previous-*/``, a lock per dir (stale locks taken over), unique default dirs, and one-line exit-4 errors for
dirs that cannot be used."""

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import run_cli, start_cli

from segtrain import rundir
from segtrain.apps import guard as guards
from segtrain.errors import OutputError

SMOKE1 = ["debug=smoke", "trainer.max_iters=1", "trainer.num_vis=0", "trainer.progress=false"]


def one_line(proc, code: int, *needles: str) -> str:
    """The single stderr line of a failed command (<= 300 characters, no traceback), holding ``needles``."""
    assert proc.returncode == code, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and len(lines[0]) <= 300, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) and its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------
# Through the CLI.


def test_second_run_is_refused_and_overwrite_keeps_the_old_files(cli, finished_run):
    run = cli.cwd / "D"
    shutil.copytree(finished_run[1], run)  # a finished debug=smoke run
    before = snapshot(run)
    assert "checkpoints/last.pt" in before and "metrics.json" in before and ".hydra/config.yaml" in before
    proc, _ = cli(*SMOKE1, run_dir="D", check=False)
    one_line(proc, 4, "already holds a run", "trainer.resume=auto", "trainer.overwrite=true", "hydra.run.dir")
    assert snapshot(run) == before  # byte for byte: checkpoints, metrics, TensorBoard, the log, .hydra, status
    proc, _ = cli(*SMOKE1, "trainer.overwrite=true", run_dir="D")
    previous = list(run.glob("previous-*"))
    assert len(previous) == 1 and snapshot(previous[0]) == before  # moved whole, nothing deleted
    assert "moved the earlier run's files" in (run / "cli.log").read_text()
    assert (run / "checkpoints" / "last.pt").is_file() and not (run / rundir.LOCK_NAME).exists()


def test_runs_started_together_get_their_own_dirs(tmp_path):
    """The default run dir is ``${unique_dir:outputs/DATE/TIME}``: here the base name is the date alone, so
    both runs ask for the same dir, as two runs started in the same second do."""
    args = [*SMOKE1, 'hydra.run.dir="${unique_dir:outputs/${now:%Y-%m-%d}}"']
    procs = [start_cli(args, tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    dirs = sorted((tmp_path / "outputs").iterdir())
    assert [d.name for d in dirs] == [time.strftime("%Y-%m-%d"), time.strftime("%Y-%m-%d") + "_2"]
    for d in dirs:  # each run wrote only into its own dir
        assert (d / "checkpoints" / "last.pt").is_file() and (d / ".hydra" / "config.yaml").is_file()
        assert str(d) in (d / "cli.log").read_text() and not (d / "checkpoints" / "last-1.pt").exists()


def test_default_dirs_are_unique():
    text = (Path(__file__).resolve().parents[1] / "configs" / "config.yaml").read_text()
    assert "dir: ${unique_dir:outputs/${now:%Y-%m-%d}/${now:%H-%M-%S}}" in text
    assert "dir: ${unique_dir:multirun/${now:%Y-%m-%d}/${now:%H-%M-%S}}" in text


def unwritable_dir(tmp_path: Path) -> str:
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return str(folder)
    probe = Path("/sys/kernel/segtrain-probe")
    try:
        probe.write_text("x")
    except OSError:
        return "/sys/kernel"  # an existing dir even root cannot write
    probe.unlink()
    pytest.skip("no unwritable directory available")


@pytest.mark.parametrize("kind", ["file", "under_a_file", "long_name", "unwritable"])
def test_unusable_run_dir_is_one_line_exit_4(tmp_path, kind):
    (tmp_path / "afile").write_text("keep me")
    target = {
        "file": "afile",
        "under_a_file": "afile/run",
        "long_name": "r" * 300,
        "unwritable": unwritable_dir(tmp_path) if kind == "unwritable" else "",
    }[kind]
    proc = run_cli(["debug=smoke", f"hydra.run.dir={target}"], tmp_path)
    line = one_line(proc, 4, "change hydra.run.dir")
    assert {"file": "it is a file", "under_a_file": "afile is a file", "long_name": "300 characters"}.get(
        kind, "cannot write"
    ) in line
    assert (tmp_path / "afile").read_text() == "keep me"


def _read_until(stream, needle: str, timeout: float = 180) -> str:
    deadline, seen = time.time() + timeout, []
    while time.time() < deadline:
        line = stream.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"{needle!r} not seen in:\n{''.join(seen)[-3000:]}")


def test_lock_refuses_a_second_process_and_a_stale_lock_is_taken_over(tmp_path):
    args = [
        "debug=smoke",
        "device=cpu",  # a step of some 100 ms: the second Ctrl-C comes before the first one's step ends
        "data.image_size=160",
        "trainer.max_iters=100000",
        "trainer.val_interval=100000",
        "trainer.progress=false",
        "hydra.run.dir=D",
    ]
    a = start_cli(args, tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _read_until(a.stdout, "step 1/")
        lock = json.loads((tmp_path / "D" / rundir.LOCK_NAME).read_text())
        assert lock["pid"] == a.pid and lock["host"] == socket.gethostname()
        b = run_cli(args, tmp_path)  # the same dir, while the first run trains
        one_line(b, 4, f"in use by pid {a.pid}", "hydra.run.dir")
        # a double Ctrl-C aborts at once: status.json says so, the lock stays behind (the process is gone)
        a.send_signal(signal.SIGINT)
        _read_until(a.stderr, "stopping after this step")
        a.send_signal(signal.SIGINT)
        a.wait(timeout=60)
    finally:
        a.kill()
        a.wait()
    assert a.returncode == -signal.SIGINT
    status = json.loads((tmp_path / "D" / "status.json").read_text())
    assert status["status"] == "aborted" and "SIGINT" in status["error"]
    assert (tmp_path / "D" / rundir.LOCK_NAME).is_file()
    c = run_cli([*SMOKE1, "hydra.run.dir=D"], tmp_path)
    assert c.returncode == 0, c.stderr
    assert f"took over the lock of pid {a.pid}" in (tmp_path / "D" / "cli.log").read_text()
    assert json.loads((tmp_path / "D" / "status.json").read_text())["status"] == "done"
    assert not (tmp_path / "D" / rundir.LOCK_NAME).exists()


# ---------------------------------------------------------------------------
# In-process.


def test_unique_dir_creates_a_fresh_dir_once_per_name(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "_unique", {})
    base = str(tmp_path / "out" / "12-00-00")
    first = rundir.unique_dir(base)
    assert first == base and Path(base).is_dir()
    assert rundir.unique_dir(base) == first  # every lookup in one run: the same dir
    monkeypatch.setattr(rundir, "_unique", {})  # another process asking for the same name
    assert rundir.unique_dir(base) == base + "_2" and Path(base + "_2").is_dir()


def write_lock(folder: Path, **info) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / rundir.LOCK_NAME).write_text(json.dumps(info))


def test_lock_of_a_live_process_refuses_naming_pid_and_host(tmp_path):
    start = rundir._process_start(1)
    write_lock(tmp_path / "a", pid=1, host=socket.gethostname(), started="then", proc_start=start)
    with pytest.raises(OutputError, match=r"in use by pid 1 \(started then\)"):
        rundir.claim(tmp_path / "a")
    write_lock(tmp_path / "b", pid=12345, host="other-node", started="then")
    with pytest.raises(OutputError, match="in use by pid 12345 on host other-node"):
        rundir.claim(tmp_path / "b")


def test_stale_lock_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen(["true"])
    dead.wait()
    write_lock(tmp_path, pid=dead.pid, host=socket.gethostname(), started="then")
    with caplog.at_level("WARNING", logger="segtrain"):
        rundir.claim(tmp_path)
    try:
        assert f"took over the lock of pid {dead.pid}" in caplog.text
        assert json.loads((tmp_path / rundir.LOCK_NAME).read_text())["pid"] == os.getpid()
        rundir.claim(tmp_path)  # this process holds it already: a no-op
    finally:
        rundir.release(tmp_path)
    assert not (tmp_path / rundir.LOCK_NAME).exists()


def test_a_reused_pid_does_not_keep_a_lock(tmp_path):
    """The lock records the process start time: pid 1 started long before this lock was written."""
    write_lock(tmp_path, pid=1, host=socket.gethostname(), started="then", proc_start="-1")
    rundir.claim(tmp_path)
    rundir.release(tmp_path)


def test_overwrite_moves_everything_but_keeps_what_this_run_wrote(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"old")
    (tmp_path / "metrics.json").write_text("{}")
    (tmp_path / "cli.log").write_text("this run's log")
    with pytest.raises(OutputError, match="already holds a run"):
        rundir.claim(tmp_path)
    assert not (tmp_path / rundir.LOCK_NAME).exists()  # released on refusal
    rundir.claim(tmp_path, overwrite=True, keep={"cli.log"})
    rundir.release(tmp_path)
    (previous,) = tmp_path.glob("previous-*")
    assert (previous / "checkpoints" / "last.pt").read_bytes() == b"old" and (previous / "metrics.json").is_file()
    assert (tmp_path / "cli.log").read_text() == "this run's log" and not (tmp_path / "checkpoints").exists()


def test_resume_into_the_dir_is_allowed(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"old")
    rundir.claim(tmp_path, resume="auto")
    rundir.release(tmp_path)
    rundir.claim(tmp_path, resume=str(tmp_path / "checkpoints" / "last.pt"))
    rundir.release(tmp_path)
    with pytest.raises(OutputError, match="already holds a run"):
        rundir.claim(tmp_path, resume="/elsewhere/last.pt")  # continues another run: this dir's files stay
    (tmp_path / "checkpoints" / "last.pt").rename(tmp_path / "checkpoints" / "best.pt")
    with pytest.raises(OutputError, match="holds a run .* but no last\\*.pt to continue; start over with"):
        rundir.claim(tmp_path, resume="auto")  # nothing to continue: best.pt would be trained over
    assert (tmp_path / "checkpoints" / "best.pt").read_bytes() == b"old"


def test_resume_command_stays_short():
    cmd = guards.resume_command(Path("/runs/x"), limit=None)
    assert cmd.endswith("trainer.resume=auto hydra.run.dir=/runs/x")
    assert guards.resume_command(Path("/runs/x"), limit=10) == (
        "the same command plus trainer.resume=auto hydra.run.dir=/runs/x"
    )


def test_resume_command_of_a_sweep_and_of_torchrun(monkeypatch):
    monkeypatch.setattr("sys.argv", ["segtrain", "-m", "optimizer.lr=0.1,0.01", "hydra.sweep.dir=/old"])
    assert guards.resume_command(Path("/sw/1"), limit=None) == (
        "segtrain -m optimizer.lr=0.1,0.01 trainer.resume=auto hydra.sweep.dir=/sw"  # the sweep, every job
    )
    monkeypatch.setattr("sys.argv", ["/venv/lib/segtrain/__main__.py", "model=pspnet"])
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert guards.resume_command(Path("/r"), limit=None) == (
        "torchrun --nproc_per_node=4 -m segtrain model=pspnet trainer.resume=auto hydra.run.dir=/r"
    )
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two nodes: the command differs per node
    assert guards.resume_command(Path("/r"), limit=None) == (
        "the same torchrun command on every node plus trainer.resume=auto hydra.run.dir=/r"
    )


def test_unwritable_run_dir_is_caught_before_training(tmp_path):
    proc = run_cli(["debug=smoke", "hydra.run.dir=/proc/segtrain-run"], tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "/proc/segtrain-run" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_full_disk_is_caught_before_training(monkeypatch, tmp_path):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(OutputError, match="MiB free"):
        rundir.check_writable(tmp_path / "ck", 1_000_000)


def test_a_refused_run_leaves_no_empty_default_dir(tmp_path):
    proc = run_cli(["optimizer.lr=-1"], tmp_path)  # the default hydra.run.dir: outputs/DATE/TIME
    assert proc.returncode == 2 and not (tmp_path / "outputs").exists()


def test_unusable_sweep_dir_names_hydra_sweep_dir(tmp_path):
    (tmp_path / "afile").write_text("keep me")
    proc = run_cli(["-m", "debug=smoke", "optimizer.lr=0.1,0.2", "hydra.sweep.dir=afile"], tmp_path)
    one_line(proc, 4, "afile", "change hydra.sweep.dir")
    assert (tmp_path / "afile").read_text() == "keep me"


def test_resume_command_of_a_run_dir_with_spaces_equals_and_accents_works_in_bash(tmp_path, monkeypatch):
    """The printed command, pasted into bash, gives Hydra the same run dir and overrides (``--cfg hydra`` shows
    them without running anything; tests/test_resume.py resumes through such a command for real)."""
    import shlex
    import sys

    import yaml

    run = tmp_path / "r un=1" / "données, 'x'"
    given = ["debug=smoke", 'data.root="/d/my data=2"', 'data.class_names=[a,"b c"]', "hydra.run.dir=old"]
    monkeypatch.setattr("sys.argv", ["segtrain", *given])
    cmd = guards.resume_command(run, limit=None)
    assert cmd.startswith("segtrain debug=smoke ") and "hydra.run.dir=old" not in cmd
    cmd = cmd.replace("segtrain", f"{shlex.quote(sys.executable)} -m segtrain", 1)
    proc = subprocess.run(["bash", "-c", f"{cmd} --cfg hydra"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    hydra = yaml.safe_load(proc.stdout)["hydra"]
    assert hydra["run"]["dir"] == str(run)
    assert hydra["overrides"]["task"] == [
        "debug=smoke",
        'data.root="/d/my data=2"',
        'data.class_names=[a,"b c"]',
        "trainer.resume=auto",
    ]


def test_guard_checks_every_command_before_the_run_dir_and_warns_after(tmp_path, monkeypatch, capsys):
    """RunDirGuard.check_config, as Hydra calls it: a mistake raises (nothing printed before it); a key given
    twice is a warning, printed once the checks passed."""
    from test_config import composed

    from segtrain.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    guard = guards.RunDirGuard()
    with pytest.raises(ConfigError, match="optimizer.lr must be > 0"):
        guard.check_config(composed("trainer.max_iters=2", "trainer.max_iters=3", "optimizer.lr=-1", hydra=True))
    assert capsys.readouterr().err == ""
    guard.check_config(composed("trainer.max_iters=2", "trainer.max_iters=3", hydra=True))
    assert "warning: trainer.max_iters is given twice (trainer.max_iters=2, then trainer.max_iters=3)" in (
        capsys.readouterr().err
    )
    eval_guard = guards.RunDirGuard(train=False)
    with pytest.raises(ConfigError, match="no checkpoint given: add ckpt=PATH"):
        eval_guard.check_config(composed("ckpt=", app="eval", hydra=True))
    with pytest.raises(ConfigError, match="predict.batch_size must be >= 1"):
        eval_guard.check_config(composed("ckpt=x", "input=y", "predict.batch_size=0", app="predict", hydra=True))
    with pytest.raises(ConfigError, match="opset must be >= 18"):
        eval_guard.check_config(composed("ckpt=x", "opset=17", app="export", hydra=True))
    with pytest.raises(ConfigError, match="info.iters must be >= 1"):
        eval_guard.check_config(composed("info.iters=0", app="info", hydra=True))
    with pytest.raises(ConfigError, match="takes model from the checkpoint; drop the override model.name"):
        eval_guard.check_config(composed("ckpt=x", "+model.name=fcn", app="eval", hydra=True))
    with pytest.raises(ConfigError, match="takes data from the checkpoint; drop the override data.num_classes"):
        eval_guard.check_config(composed("ckpt=x", "data.num_classes=3", app="info", hydra=True))
    assert not list(tmp_path.iterdir())


def test_a_file_error_line_names_the_path_and_the_fix_that_helps(monkeypatch):
    """One line for a file the job could not write and for a run dir Hydra could not use: free space only when
    the disk or quota is full; the run or sweep dir key of the command line."""
    import errno
    import sys

    from segtrain.apps.runner import _file_error

    full = OSError(errno.ENOSPC, "No space left on device", "run/checkpoints/last.pt")
    denied = OSError(errno.EACCES, "Permission denied", "/locked/run")
    monkeypatch.setattr(sys, "argv", ["segtrain", "debug=smoke"])
    assert _file_error(full, in_job=True) == (
        "cannot write run/checkpoints/last.pt: No space left on device; free space, or change hydra.run.dir"
    )
    assert _file_error(denied, in_job=False) == "cannot use /locked/run: Permission denied; change hydra.run.dir"
    monkeypatch.setattr(sys, "argv", ["segtrain", "-m", "optimizer.lr=0.1,0.2"])
    assert _file_error(OSError(errno.EROFS, "Read-only file system"), in_job=False) == (
        "cannot use the run dir: Read-only file system; change hydra.sweep.dir"
    )
