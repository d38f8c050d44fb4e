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
    """The installed ``segtrain`` console script next to this Python."""
    exe = Path(sys.executable).parent / "segtrain"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "segtrain"]


def run_cli(args: list[str], cwd: Path, timeout: int = 300, exe: list[str] | None = None, env: dict | None = None):
    full_env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        (exe or segtrain_exe()) + list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )


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
    module = {"segtrain-predict": "segtrain.predict", "segtrain-export": "segtrain.export"}[name]
    return [str(exe)] if exe.exists() else [sys.executable, "-m", module]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """ONE tiny training run (U-Net, base_channels 4, 2 iterations on the built-in data set, in-process),
    shared by the tests that need a checkpoint or a run dir: returns the run dir."""
    from test_config import composed

    from segtrain.trainer import Trainer

    run = tmp_path_factory.mktemp("tiny_run")
    cfg = composed("debug=smoke", "trainer.max_iters=2", "trainer.progress=false", "model.base_channels=4")
    Trainer(cfg, run).fit()
    return run


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """A finished ``debug=smoke trainer.max_iters=1`` run: (its root dir, the run dir ``root/run``), shared by
    the tests that only read it or that must find it unchanged (copy it with ``shutil.copytree`` to change it)."""
    root = tmp_path_factory.mktemp("finished")
    proc = run_cli(["debug=smoke", "trainer.max_iters=1", "trainer.num_vis=0", "hydra.run.dir=run"], root)
    assert proc.returncode == 0, proc.stderr
    return root, root / "run"
