import io
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # parallel test processes (pytest -n N): one compute thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # (the segtrain subprocesses inherit it)
    import torch

    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


def segtrain_exe() -> list[str]:
    """The installed ``segtrain`` console script next to this Python, else ``python -m segtrain``."""
    return console_script("segtrain")


def cli_env(extra: dict | None = None) -> dict:
    """This environment for a command under test: offline, no albumentations update check, and no
    HYDRA_FULL_ERROR (so that errors are the one-line ones a user sees), plus ``extra``."""
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1", **(extra or {})}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def run_cli(args: list[str], cwd: Path, timeout: int = 300, exe: list[str] | None = None, env: dict | None = None):
    return subprocess.run(
        (exe or segtrain_exe()) + list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout, env=cli_env(env)
    )


def start_cli(args: list[str], cwd: Path, **popen_kw) -> subprocess.Popen:
    """``segtrain ARGS`` started in the background (to signal or kill it), in :func:`cli_env`."""
    return subprocess.Popen(segtrain_exe() + list(args), cwd=cwd, env=cli_env(), **popen_kw)


@pytest.fixture
def cli(tmp_path):
    """Run ``segtrain ARGS`` in a temp dir; returns (CompletedProcess, run_dir)."""

    def _run(*args, run_dir: str = "run", check: bool = True, **kw):
        args = [*args, f"hydra.run.dir={run_dir}"] if not any(a == "-m" for a in args) else list(args)
        proc = run_cli(args, tmp_path, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"segtrain {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc, tmp_path / run_dir

    _run.cwd = tmp_path
    return _run


def console_script(name: str) -> list[str]:
    """An installed console script next to this Python, else ``python -m MODULE`` (same code)."""
    exe = Path(sys.executable).parent / name
    module = "segtrain" if name == "segtrain" else "segtrain.apps." + {"eval": "evaluate"}.get(name[9:], name[9:])
    return [str(exe)] if exe.exists() else [sys.executable, "-m", module]


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module: small CPU kernels gain little from a second thread, and OpenMP
    threads stall badly (5x slower here) when another process shares the cores. Use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """``$SEGTRAIN_CACHE`` (label-check and image-statistics caches) in the test's own temp dir."""
    monkeypatch.setenv("SEGTRAIN_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """ONE tiny training run (U-Net, base_channels 4, 2 iterations on the built-in data set, in-process),
    shared by the tests that need a checkpoint or a run dir: returns the run dir."""
    from test_config import composed

    from segtrain.build import build_trainer

    run = tmp_path_factory.mktemp("tiny_run")
    cfg = composed("debug=smoke", "trainer.max_iters=2", "trainer.progress=false", "model.base_channels=4")
    build_trainer(cfg, run).fit()
    return run


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """A finished ``debug=smoke trainer.max_iters=1`` run: (its root dir, the run dir ``root/run``), shared by
    the tests that only read it or that must find it unchanged (copy it with ``shutil.copytree`` to change it)."""
    root = tmp_path_factory.mktemp("finished")
    proc = run_cli(["debug=smoke", "trainer.max_iters=1", "trainer.num_vis=0", "hydra.run.dir=run"], root)
    assert proc.returncode == 0, proc.stderr
    return root, root / "run"


def one_line_error(proc, *needles, prog="segtrain"):
    """The single ``PROG: error:`` stderr line (<= 300 characters, no traceback) of a failed command,
    holding each of ``needles``."""
    assert proc.returncode != 0, proc.stdout
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text, text
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error:") and len(lines[0]) <= 300, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def http_server():
    """A local HTTP/1.1 server in a thread: set ``routes["/path"] = fn(handler)`` to answer GET /path (``fn``
    writes the reply itself, well-formed or not); yields ``(base_url, routes)``."""
    import http.server
    import threading

    routes: dict = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            self.close_connection = True
            if self.path not in routes:
                self.send_error(404)
                return
            try:
                routes[self.path](self)
            except OSError:  # the client went away
                pass

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", routes
    server.shutdown()
    server.server_close()


# Python's own warning filters (a fresh interpreter's, as the commands start with), last applied first
PYTHON_WARNING_FILTERS = [("ignore", ResourceWarning, ""), ("ignore", ImportWarning, ""),
                          ("ignore", PendingDeprecationWarning, ""), ("ignore", DeprecationWarning, ""),
                          ("default", DeprecationWarning, "__main__")]  # fmt: skip
APP_MODULES = {"segtrain": "train", "segtrain-eval": "evaluate"}  # segtrain-NAME: segtrain.apps.NAME


def in_process(args: list[str], cwd, prog: str = "segtrain", env: dict | None = None) -> subprocess.CompletedProcess:
    """``PROG ARGS`` in ``cwd`` through the command's own entry point (``segtrain.apps.*.main``), in this process:
    the same code as the console script (Hydra's composition, the run-dir guard, the job, the one-line error and
    the exit code) without the seconds of interpreter, torch and Hydra start-up of a subprocess.  It gets what
    :func:`conftest.run_cli` gives a subprocess (argv, cwd, the environment without HYDRA_FULL_ERROR, fresh
    standard streams, Python's default warning filters, warnings printed on stderr) and returns its exit code,
    stdout and stderr; whatever the command changes in the process (streams, hooks, logging, the environment,
    Hydra's and segtrain's per-process state, signal handlers, run-dir locks) is put back."""
    import importlib
    import logging
    import threading

    from hydra.core.hydra_config import HydraConfig

    from segtrain import rundir

    main = importlib.import_module("segtrain.apps." + APP_MODULES.get(prog, prog.removeprefix("segtrain-"))).main
    out, err = (io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True) for _ in range(2))
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    saved_sys = {name: getattr(sys, name) for name in ("argv", "stdin", "stdout", "stderr", "unraisablehook")}
    saved_hooks = threading.excepthook, logging.raiseExceptions
    signals = [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP]
    saved_signals = {s: signal.getsignal(s) for s in signals}
    root = logging.getLogger()
    saved_logging = list(root.handlers), root.level
    saved_state = dict(rundir._unique), dict(rundir._made), set(rundir._locks), HydraConfig.instance().cfg
    _fresh_process_state()
    os.environ.clear()
    os.environ.update(cli_env(env))
    os.chdir(cwd)
    sys.argv, sys.stdout, sys.stderr = [str(prog), *args], out, err
    code = 0
    try:
        with warnings.catch_warnings():
            warnings.resetwarnings()
            for action, category, module in PYTHON_WARNING_FILTERS:
                warnings.filterwarnings(action, category=category, module=module)
            warnings.showwarning = _warning_on_stderr
            main()
    except SystemExit as e:
        if isinstance(e.code, str):  # as the interpreter does with it
            print(e.code, file=err)
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        for name, value in saved_sys.items():
            setattr(sys, name, value)
        threading.excepthook, logging.raiseExceptions = saved_hooks
        for s, handler in saved_signals.items():
            signal.signal(s, handler)
        for handler in set(root.handlers) - set(saved_logging[0]):  # Hydra's job log in the run dir
            handler.close()
        root.handlers[:] = saved_logging[0]
        root.setLevel(saved_logging[1])
        for key in set(rundir._locks) - saved_state[2]:  # the run dir of a run that ended in here
            rundir.release(key)
        _fresh_process_state()
        rundir._unique.update(saved_state[0])
        rundir._made.update(saved_state[1])
        HydraConfig.instance().cfg = saved_state[3]
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess(
        [prog, *args], code, out.buffer.getvalue().decode(), err.buffer.getvalue().decode()
    )


def _warning_on_stderr(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _fresh_process_state() -> None:
    """segtrain's per-process memory of the commands run in it: the default run dirs it made (another test's
    outputs/DATE/TIME of the same second is not this one's), the sweep it ran and its failed jobs."""
    from segtrain import rundir
    from segtrain.apps import runner, sweep

    rundir._unique.clear()
    rundir._made.clear()
    sweep._current.clear()
    runner._Failures.jobs.clear()
    runner._DEBUG_ERRORS.clear()
