"""A regular (non-editable) ``pip install .`` finds its configs from any directory."""

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, in_process, run_cli


def test_regular_install_trains_from_another_directory(tmp_path):
    """Built and installed with this environment's pip and hatchling (no network: no build isolation) into a
    fresh venv that sees this environment's packages but not the checkout, then run from elsewhere."""
    pytest.importorskip("hatchling", reason="the build backend (in the dev extra): pip would download it")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    # the new venv sees this environment's torch etc. (a path .pth: the editable install's own .pth files
    # in there are not processed) and PYTHONPATH's package folders, but not the checkout; only segtrain itself
    # is installed into it
    purelib = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO]
    Path(purelib, "_parent_env.pth").write_text("\n".join([*site.getsitepackages(), *extra]) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    src = tmp_path / "src"
    src.mkdir()
    for rel in ("segtrain", "configs", "pyproject.toml", "README.md"):
        s, d = REPO / rel, src / rel
        if s.is_dir():
            shutil.copytree(s, d, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(s, d)
    pip = [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-build-isolation"]
    proc = subprocess.run(
        [*pip, str(src)], capture_output=True, text=True, env={**env, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    )
    assert proc.returncode == 0, proc.stderr
    shutil.rmtree(src)  # nothing may refer back to the source tree
    where = subprocess.run(
        [str(py), "-c", "import segtrain.config as c; print(c.__file__); print(c.config_dir())"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        check=True,
    ).stdout.split()
    assert str(venv) in where[0] and str(venv) in where[1], where
    work = tmp_path / "elsewhere"
    work.mkdir()
    proc = run_cli(
        ["debug=smoke", "trainer.max_iters=2", "hydra.run.dir=out"],
        work,
        exe=[str(venv / "bin" / "segtrain")],
        env={"PYTHONPATH": os.pathsep.join(extra)},
    )
    assert proc.returncode == 0, proc.stderr
    assert (work / "out" / "metrics.json").is_file()


def test_user_config_dir(tmp_path):
    """``segtrain --config-dir DIR`` (its entry point in this process: test_cli.in_process) finds an option of its own
    there."""
    extra = tmp_path / "myconfigs" / "model"
    extra.mkdir(parents=True)
    (extra / "wide_unet.yaml").write_text("name: unet\nnorm: none\n")
    proc = in_process(
        ["--config-dir", str(tmp_path / "myconfigs"), "model=wide_unet", "debug=smoke", "trainer.max_iters=1",
         "trainer.num_vis=0", "hydra.run.dir=run"],
        tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "model unet" in proc.stdout
    assert (tmp_path / "run" / ".hydra" / "config.yaml").read_text().count("norm: none") == 1
