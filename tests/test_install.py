"""A regular (non-editable) ``pip install .`` finds its configs from any directory."""

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

from conftest import REPO, run_cli


def test_regular_install_trains_from_another_directory(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    # the new venv sees this environment's torch etc. (a path .pth: the editable install's own .pth files
    # in there are not processed); only segtrain itself is installed into it
    purelib = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(purelib, "_parent_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    src = tmp_path / "src"
    src.mkdir()
    for rel in ("segtrain", "configs", "pyproject.toml", "README.md"):
        s, d = REPO / rel, src / rel
        if s.is_dir():
            shutil.copytree(s, d, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(s, d)
    proc = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", str(src)],
        capture_output=True,
        text=True,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    shutil.rmtree(src)  # nothing may refer back to the source tree
    where = subprocess.run(
        [str(py), "-c", "import segtrain.cli as c; print(c.__file__); print(c.config_dir())"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    ).stdout.split()
    assert str(venv) in where[0] and str(venv) in where[1], where
    work = tmp_path / "elsewhere"
    work.mkdir()
    proc = run_cli(
        ["debug=smoke", "trainer.max_iters=2", "hydra.run.dir=out"], work, exe=[str(venv / "bin" / "segtrain")]
    )
    assert proc.returncode == 0, proc.stderr
    assert (work / "out" / "metrics.json").is_file()


def test_user_config_dir(cli, tmp_path):
    extra = tmp_path / "myconfigs" / "model"
    extra.mkdir(parents=True)
    (extra / "wide_unet.yaml").write_text("name: unet\nnorm: none\n")
    proc, run = cli(
        "--config-dir",
        str(tmp_path / "myconfigs"),
        "model=wide_unet",
        "debug=smoke",
        "trainer.max_iters=1",
        "trainer.num_vis=0",
    )
    assert "model unet" in proc.stdout
    assert (run / ".hydra" / "config.yaml").read_text().count("norm: none") == 1
