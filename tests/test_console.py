"""Console output never stops a run (closed pipe, full disk; every command under hostile streams, end to end:
tests/test_hostile.py), and every error line is one line of at most 300 characters with the full message in
the log file."""

import logging
import os
import subprocess

import pytest
from conftest import cli_env, segtrain_exe

from segtrain import console


def _bash(cmd: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", cmd], cwd=cwd, capture_output=True, text=True, timeout=300, env=cli_env())


def test_help_into_a_closed_pipe_ends_quietly(tmp_path):
    exe = " ".join(segtrain_exe())
    proc = _bash(f"{exe} --help | head -1; echo rc=${{PIPESTATUS[0]}}", tmp_path)
    assert proc.stdout.startswith("segtrain:") and "rc=0" in proc.stdout
    assert proc.stderr == "", proc.stderr


def test_quiet_stream_swallows_write_errors(tmp_path):
    read_end, write_end = os.pipe()
    os.close(read_end)
    stream = console.QuietStream(os.fdopen(write_end, "w"), "stdout")
    stream.write("x" * 100_000)
    stream.flush()  # EPIPE, swallowed
    assert isinstance(stream.failed, BrokenPipeError)
    stream.write("more")
    stream.flush()
    assert not stream.isatty()
    full = console.QuietStream(open("/dev/full", "w"), "stdout")
    full.write("y")
    full.flush()
    assert full.failed is not None and full.failed.errno == 28  # ENOSPC


@pytest.fixture
def file_log(tmp_path):
    handler = logging.FileHandler(tmp_path / "cli.log")
    logging.getLogger().addHandler(handler)
    yield tmp_path / "cli.log"
    logging.getLogger().removeHandler(handler)
    handler.close()


def test_error_line_is_short_and_the_log_has_everything(file_log):
    path = "/data/" + "/".join(f"level{i}" for i in range(30)) + "/masks/img_00.png"
    msg = f"label check failed: {path} has values [7]; set data.num_classes=8 " + "and more detail " * 30
    line = console.error_line("segtrain: error: ", msg, ValueError("inner"))
    assert len(line) <= console.MAX_LINE and "\n" not in line
    assert "…/masks/img_00.png" in line and "full message in" in line and "cli.log" in line
    logged = file_log.read_text()
    assert path in logged and "ValueError: inner" in logged  # the full message and the traceback
    assert console.error_line("p: ", "short") == "p: short"


def test_error_line_keeps_urls_keys_and_the_fix_at_its_end():
    url = "https://download.pytorch.org/models/resnet50-0676ba61.pth"
    msg = (f"data.root=/mnt/storage/datasets/pascal/VOCdevkit/VOC2012 is fine but {url} could not be fetched "
           + "(a long reason) " * 15 + "; set model.pretrained=false")  # fmt: skip
    line = console.error_line("segtrain: error: ", msg)
    assert len(line) <= console.MAX_LINE and url in line and "data.root=…/VOCdevkit/VOC2012" in line
    assert line.endswith("set model.pretrained=false") and " … " in line  # the middle goes, not the fix


class _Terminal:
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("env, wanted", [({}, True), ({"TERM": "dumb"}, False), ({"NO_COLOR": "1"}, False)])
def test_bars_only_on_a_terminal_that_can_redraw(monkeypatch, env, wanted):
    from segtrain.outputs import bars_wanted

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr("sys.stderr", _Terminal())
    assert bars_wanted(True) is wanted and bars_wanted(False) is False
    monkeypatch.setattr("sys.stderr", console.QuietStream(open(os.devnull, "w"), "stderr"))  # not a terminal
    assert bars_wanted(True) is False
    monkeypatch.setattr("sys.stderr", None)  # `2>&-` (Python sets no sys.stderr), in the library
    assert bars_wanted(True) is False


def test_quiet_stream_escapes_what_its_encoding_cannot_write(tmp_path):
    """LC_ALL=C or PYTHONIOENCODING=ascii and a non-ASCII run dir: the line is written escaped, and console
    output goes on (a UnicodeEncodeError used to end it)."""
    raw = open(tmp_path / "out.txt", "w", encoding="ascii")  # noqa: SIM115 - closed below
    stream = console.QuietStream(raw, "stdout")
    stream.write("outputs in /data/rün_日本\n")
    stream.write("next line\n")
    stream.flush()
    raw.close()
    assert stream.failed is None
    assert (tmp_path / "out.txt").read_text() == "outputs in /data/r\\xfcn_\\u65e5\\u672c\nnext line\n"


def test_out_of_memory_is_recognised_by_type_and_message():
    import numpy as np

    oom = console.out_of_memory
    assert oom(RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")) == "CPU"
    assert oom(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")) == "GPU"
    assert oom(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)")) == "GPU"
    assert oom(RuntimeError("DataLoader worker (pid 42) is killed by signal: Killed. ")) == "CPU"
    with pytest.raises(MemoryError) as numpy_error:
        np.empty((2**62,), np.uint8)  # numpy's _ArrayMemoryError: a MemoryError
    assert oom(numpy_error.value) == "CPU"
    try:
        raise ValueError("validation failed on x.png") from MemoryError()
    except ValueError as wrapped:
        assert oom(wrapped) == "CPU"  # found in the cause
    assert oom(OSError(12, "Cannot allocate memory")) == "CPU"  # fork() of a loader worker
    assert oom(RuntimeError("Given input size: (16x1x1). Output size is too small")) is None
    assert oom(OSError(28, "No space left on device")) is None


def test_background_thread_errors_go_to_the_log(file_log, monkeypatch, capsys):
    """A logger's writer thread failing on a full disk: its traceback goes into the log file, nothing onto the
    console (the logger reports it); any other error in a thread: one warning line, the traceback in the log."""
    import errno
    import threading

    monkeypatch.setattr(threading, "excepthook", threading.excepthook)  # put back after the test
    console.quiet_background_threads()

    def full_disk():
        raise OSError(errno.ENOSPC, "No space left on device")

    def bug():
        raise KeyError("a bug")

    for target, name in ((full_disk, "EventWriter"), (bug, "Buggy")):
        thread = threading.Thread(target=target, name=name)
        thread.start()
        thread.join()
    err = capsys.readouterr().err
    assert "EventWriter" not in err and "Traceback" not in err
    (line,) = err.splitlines()
    assert line.startswith("segtrain: warning: background thread Buggy failed (KeyError: 'a bug'); the traceback")
    assert line.endswith("cli.log") and len(line) <= console.MAX_LINE
    log = file_log.read_text()
    assert "background thread EventWriter failed (OSError: [Errno 28] No space left on device)" in log
    assert log.count("Traceback") == 2 and "KeyError: 'a bug'" in log


def test_first_line_is_the_one_way_to_quote_an_error():
    """Colour codes out, blank lines skipped, the type name for an empty message, a cut marked, or none."""
    assert console.first_line(RuntimeError("\n  \x1b[1mfirst\x1b[0m  \nsecond")) == "first"
    assert console.first_line(RuntimeError("a\n\nb"), lines=2) == "a b"
    assert console.first_line(RuntimeError()) == "RuntimeError"
    assert console.first_line(ValueError("x" * 300), 120) == "x" * 119 + "…"
    assert console.first_line(ValueError("x" * 300), None) == "x" * 300
    assert console.first_line("text of an error\nmore", 80) == "text of an error"
