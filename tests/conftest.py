import os
import subprocess
import sys
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
