"""Hostile surroundings, across every command: closed or broken standard streams, a full disk, out of memory,
and the promise that a command writes nothing outside its run dir and its declared ``output=`` (and never
replaces a file it did not create).

Each test starts its commands at once (one process per command) and then checks each of them, so that the
file stays fast on two cores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_env, console_script
from fake_datasets import write_cityscapes, write_png

NON_ASCII = "rün_日本"
ENV = {"segtrain-eval": {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0"}}  # ASCII, not UTF-8: the locale decides

# stream setups: sh redirections applied by `exec` (a closed descriptor is what `CMD 2>&-` gives), or a file
CLOSE = {"stdin": "0<&-", "stdout": ">&-", "stderr": "2>&-"}
FULL, EARLY_CLOSED_PIPE, EOF, CAPTURE = "/dev/full", "pipe closed early", "/dev/null", "capture"


def _snapshot(*roots: Path) -> dict[str, tuple]:
    """Every file and folder under ``roots``: (inode, size, mtime) of a file, None for a folder."""
    out: dict[str, tuple | None] = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in dirs:
                out[os.path.join(folder, name)] = None
            for name in files:
                st = os.lstat(os.path.join(folder, name))
                out[os.path.join(folder, name)] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def _changes(before: dict, after: dict, allowed: list[Path]) -> list[str]:
    """What changed against the rules: a file that existed before changed or went; a new file outside the
    ``allowed`` folders; a new folder that is neither in one nor on the way to one."""
    roots = [str(a) for a in allowed]
    bad = [f"changed or removed: {p}" for p, v in before.items() if after.get(p, "gone") != v]
    for p in sorted(set(after) - set(before)):
        inside = any(p == r or p.startswith(r + os.sep) for r in roots)
        on_the_way = after[p] is None and any(r.startswith(p + os.sep) for r in roots)
        if not (inside or on_the_way):
            bad.append(f"new: {p}")
    return bad


def _start(argv: list[str], cwd: Path, env: dict, streams: dict, capture: Path) -> tuple[subprocess.Popen, list]:
    """Start ``argv`` with each of stdin/stdout/stderr closed, at /dev/full, a pipe closed at once, EOF or
    captured to the file ``capture``; returns the process and the files it was given."""
    redirections, kw, opened = [], {}, []
    for name, how in streams.items():
        if how == "closed":
            redirections.append(CLOSE[name])
        elif how == EARLY_CLOSED_PIPE:
            kw[name] = subprocess.PIPE
        elif how == CAPTURE:
            f = open(capture, "w+")  # noqa: SIM115 - closed by the caller
            opened.append(f)
            kw[name] = f
        else:
            f = open(how, "r" if name == "stdin" else "w")  # noqa: SIM115 - closed by the caller
            opened.append(f)
            kw[name] = f
    argv = ["sh", "-c", f'exec "$@" {" ".join(redirections)}', "sh", *argv] if redirections else argv
    proc = subprocess.Popen(argv, cwd=cwd, env=env, **kw)
    for name in ("stdout", "stderr"):  # the reader goes away before the first byte
        if streams.get(name) == EARLY_CLOSED_PIPE:
            getattr(proc, name).close()
    return proc, opened


def _commands(ckpt: Path, photos: Path) -> dict:
    """name: (argv, streams, allowed changes under its cwd, what its work leaves there)."""
    return {
        "segtrain": (
            [
                "segtrain",
                "debug=smoke",
                "trainer.max_iters=1",
                "trainer.num_vis=0",
                "model.base_channels=4",
                "hydra.run.dir=run",
            ],
            {"stdin": "closed", "stderr": "closed", "stdout": EARLY_CLOSED_PIPE},
            ["run"],
            ["run/checkpoints/last.pt", "run/metrics.json"],
        ),
        "segtrain-eval": (  # in a non-UTF-8 locale (ENV), into a non-ASCII run dir (quoted for Hydra's grammar)
            ["segtrain-eval", f"ckpt={ckpt}", f"hydra.run.dir='{NON_ASCII}'"],
            {"stdin": EOF, "stdout": CAPTURE, "stderr": "closed"},
            [NON_ASCII],
            [f"{NON_ASCII}/metrics.json"],
        ),
        "segtrain-predict": (
            ["segtrain-predict", f"ckpt={ckpt}", f"input={photos}", "output=masks", "hydra.run.dir=run"],
            {"stdin": "closed", "stdout": FULL, "stderr": "closed"},
            ["run", "masks"],
            ["masks/a.png", "masks/b.png", "run/predict.json"],
        ),
        "segtrain-export": (
            ["segtrain-export", f"ckpt={ckpt}", "format=torchscript", "output=exported/model.pt", "hydra.run.dir=run"],
            {"stdin": "closed", "stdout": EARLY_CLOSED_PIPE, "stderr": CAPTURE},
            ["run", "exported"],
            ["exported/model.pt"],
        ),
        "segtrain-info": (  # the default run dir, outputs/info/DATE/TIME
            ["segtrain-info", "info.size=32", "info.iters=1", "info.warmup=0", "info.batch_size=2"],
            {"stdin": "closed", "stdout": FULL, "stderr": FULL},
            ["outputs/info"],
            ["outputs/info/*/*/info.json"],
        ),
        "segtrain-data": (  # its output: labelTrainIds PNGs beside the labelIds ones in --root
            ["segtrain-data", "cityscapes", "--root", "cityscapes", "--workers", "1"],
            {"stdin": "closed", "stdout": "closed", "stderr": EARLY_CLOSED_PIPE},
            ["cityscapes/gtFine"],
            ["cityscapes/gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png"],
        ),
    }


@pytest.fixture(scope="module")
def hostile_runs(request, tmp_path_factory):
    """Every command once, all at the same time, each with hostile standard streams and in its own sandbox
    (cwd, HOME, SEGTRAIN_CACHE, TMPDIR), reading the shared inputs (the checkpoint's run, the photos).
    Returns {command: its return code, sandbox, snapshots before and after, allowed changes ...}.
    Once per test session: under pytest-xdist the first worker to need it runs it and leaves its record in the
    session's temp dir, which the other workers read (they wait for it while it runs)."""
    if not hasattr(request.config, "workerinput"):  # not a pytest-xdist worker
        return _hostile_runs(tmp_path_factory, request.getfixturevalue("finished_run"))
    import fcntl
    import pickle

    record = tmp_path_factory.getbasetemp().parent / "hostile_runs.pickle"  # the session's dir, above each worker's
    with open(record.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if record.is_file():
            return pickle.loads(record.read_bytes())
        runs = _hostile_runs(tmp_path_factory, request.getfixturevalue("finished_run"))
        record.write_bytes(pickle.dumps(runs))
        return runs


def _hostile_runs(tmp_path_factory, finished_run) -> dict:
    box = tmp_path_factory.mktemp("hostile")
    photos = box / "photos"
    for i, name in enumerate(("a", "b")):
        write_png(photos / f"{name}.png", np.random.default_rng(i).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    commands = _commands(finished_run[1] / "checkpoints" / "last.pt", photos)
    for name in commands:
        for sub in ("cwd", "home", "cache", "tmp"):
            (box / name / sub).mkdir(parents=True)
    write_cityscapes(box / "segtrain-data" / "cwd" / "cityscapes")
    (box / "segtrain-predict" / "cwd" / "masks").mkdir()
    (box / "segtrain-predict" / "cwd" / "masks" / "keep.txt").write_text("not segtrain's")  # in the output folder
    shared = [finished_run[0], photos]
    runs, running = {"shared": {"before": _snapshot(*shared)}}, []
    for name, (argv, streams, allowed, made) in commands.items():
        root = box / name
        sandbox = {"HOME": root / "home", "SEGTRAIN_CACHE": root / "cache", "TMPDIR": root / "tmp"}
        env = cli_env({**{k: str(v) for k, v in sandbox.items()}, "OMP_NUM_THREADS": "1", **ENV.get(name, {})})
        runs[name] = {
            "root": root,
            "before": _snapshot(root),
            "streams": streams,
            "made": made,
            "captured": "",
            "allowed": [root / "cwd" / a for a in allowed] + [root / "cache", root / "tmp"],
        }
        if len(running) == PARALLEL:  # a few at a time: each holds about 1 GB
            _finish(runs, *running.pop(0))
        capture = box / f"{name}.txt"  # outside its sandbox
        running.append((name, *_start(console_script(argv[0]) + argv[1:], root / "cwd", env, streams, capture)))
    for started in running:
        _finish(runs, *started)
    runs["shared"]["after"] = _snapshot(*shared)
    return runs


PARALLEL = 3


def _finish(runs: dict, name: str, proc: subprocess.Popen, opened: list) -> None:
    runs[name]["rc"] = proc.wait(timeout=600)
    for f in opened:
        if f.name.endswith(".txt"):
            f.seek(0)
            runs[name]["captured"] = f.read()
        f.close()
    runs[name]["after"] = _snapshot(runs[name]["root"])


COMMANDS = ["segtrain", "segtrain-eval", "segtrain-predict", "segtrain-export", "segtrain-info", "segtrain-data"]


@pytest.mark.parametrize("command", COMMANDS)
def test_hostile_streams_never_stop_the_work(hostile_runs, command):
    """stdin closed or at EOF, stdout/stderr closed (``2>&-``), at /dev/full or a pipe whose reader is gone:
    the command does its work and exits 0."""
    run = hostile_runs[command]
    assert run["rc"] == 0, (command, run["streams"], run.get("captured"))
    cwd = run["root"] / "cwd"
    for pattern in run["made"]:
        assert list(cwd.glob(pattern)), f"{command} ({run['streams']}) did not write {pattern}"
    captured = run.get("captured") or ""
    assert "Traceback" not in captured and "Exception" not in captured, captured


@pytest.mark.parametrize(
    "command, log, reason",
    [
        ("segtrain", "run/cli.log", "stdout failed (Broken pipe)"),
        ("segtrain-predict", "run/predict.log", "stdout failed (No space left on device)"),
        ("segtrain-info", "outputs/info/*/*/info.log", "stdout failed (No space left on device)"),
    ],
)
def test_a_failing_console_is_noted_once_and_the_log_goes_on(hostile_runs, command, log, reason):
    """The first failed console write is noted once in the log file, which holds the whole run; without a
    terminal there are no progress bars: training logs a plain line per trainer.log_interval steps."""
    run = hostile_runs[command]
    (path,) = (run["root"] / "cwd").glob(log)
    text = path.read_text()
    assert text.count(reason) == 1 and f"{reason}: console output stops here, this log goes on" in text, text
    if command == "segtrain":
        assert "step 1/1: loss" in text and "best val mIoU" in text
    captured = hostile_runs["segtrain-export"]["captured"]  # a stderr that is a file: no bar redraws
    assert "\r" not in captured and "\x1b[" not in captured


@pytest.mark.parametrize("command", COMMANDS)
def test_no_command_writes_outside_its_run_dir_and_output(hostile_runs, command):
    """Only the run dir, the declared output (and the cache) change; no file that was there before (the
    checkpoint's run, the input images, a file already in the output folder, HOME, TMPDIR) changes."""
    run = hostile_runs[command]
    assert run["rc"] == 0
    assert _changes(run["before"], run["after"], run["allowed"]) == []
    shared = hostile_runs["shared"]
    assert _changes(shared["before"], shared["after"], []) == []
    assert (run["root"] / "home").is_dir() and not any((run["root"] / "home").iterdir())
    left = [p for p in (run["root"] / "tmp").rglob("*") if not p.is_dir()]  # (torch makes empty cache folders)
    assert left == [], left


FILE_SIZE_LIMIT = (
    "import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192)); os.execvp(sys.argv[1], sys.argv[1:])"
)


def test_full_disk_and_out_of_memory_are_one_line_each(tmp_path, finished_run):
    """A disk that fills during training (a file size limit of 8 KiB: writes fail with EFBIG as they would with
    ENOSPC): TensorBoard's writer thread fails into the log, not onto the console, the logger is switched off
    naming its file, and the one error line names the full path that could not be written (exit 4).
    An allocation no machine can make (segtrain-info, a batch of 10^7 images of 2048 x 2048 px): one line naming the
    setting that shrinks the job (exit 5)."""
    from conftest import one_line_error

    train = ["debug=smoke", "trainer.max_iters=1", "trainer.num_vis=0", "model.base_channels=4", "hydra.run.dir=run"]
    full = subprocess.Popen(
        [sys.executable, "-c", FILE_SIZE_LIMIT, *console_script("segtrain"), *train],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ckpt = finished_run[1] / "checkpoints" / "last.pt"
    big = ["info.size=[2048,2048]", "info.batch_size=10000000", "hydra.run.dir=x"]  # segtrain-export caps check_sizes
    oom = subprocess.run(
        console_script("segtrain-info") + [f"ckpt={ckpt}", *big],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    out, err = full.communicate(timeout=600)

    proc = subprocess.CompletedProcess(full.args, full.returncode, out, err)
    line = one_line_error(proc, f"cannot write {tmp_path / 'run'}{os.sep}")
    assert full.returncode == 4 and "Exception in thread" not in out + err, line
    log = (tmp_path / "run" / "cli.log").read_text()
    assert "background thread" in log and "File too large" in log  # the thread's traceback, in the log only
    assert f"logger tensorboard failed (OSError: [Errno 27] File too large (writing {tmp_path / 'run' / 'tb'}" in log

    line = one_line_error(oom, "2048x2048", "info.batch_size", prog="segtrain-info")
    assert oom.returncode == 5 and not (tmp_path / "x" / "info.json").exists(), line


@pytest.mark.parametrize(
    "prog, error, knob",
    [
        (
            "segtrain",
            RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9e12 bytes"),
            "data.batch_size=8 trainer.accumulate=2",
        ),
        (
            "segtrain-eval",
            RuntimeError("validation failed on a.png (9000x9000 px): CUDA out of memory."),
            "eval.mode=slide",
        ),
        ("segtrain-predict", MemoryError(), "predict.batch_size=4 (now 8)"),
        (
            "segtrain-info",
            RuntimeError("[enforce fail at alloc_cpu.cpp:127] can't allocate memory"),
            "info.batch_size=4",
        ),
    ],
)
def test_out_of_memory_anywhere_is_exit_5_naming_the_commands_knobs(prog, error, knob):
    """The CLI's error path recognises an out-of-memory error of any command by type or message (CPU allocator,
    CUDA, numpy) and asks for that command's knobs."""
    from omegaconf import OmegaConf

    from segtrain.apps.runner import _classify

    cfg = OmegaConf.create(
        {
            "data": {"batch_size": 16, "crop_size": 512},
            "trainer": {"accumulate": 1},
            "model": {"name": "unet"},
            "predict": {"batch_size": 8},
            "info": {"batch_size": 8},
        }
    )
    msg, code = _classify(error, cfg, prog)
    assert code == 5 and msg.startswith("out of ") and knob in msg and len(msg) < 280, msg


def test_a_non_utf8_locale_keeps_non_ascii_paths(hostile_runs):
    """LC_ALL=C without UTF-8 mode (ASCII streams and files) and a run dir named rün_日本: the log file has the
    lines naming it (they used to be dropped), and the console output goes on."""
    run = hostile_runs["segtrain-eval"]
    run_dir = run["root"] / "cwd" / NON_ASCII
    log = (run_dir / "eval.log").read_text(encoding="utf-8")
    assert f"{run_dir} " in log or log.rstrip().endswith(str(run_dir)), log
    assert "mean" in run["captured"] and NON_ASCII in run["captured"], run["captured"]
