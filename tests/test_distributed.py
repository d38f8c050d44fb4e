"""DDP through torchrun with gloo on the CPU (2 processes)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_config import composed

from segtrain.build import build_trainer
from segtrain.config import config_dir
from segtrain.config.explicit import explicit_keys
from tests.conftest import cli_env, run_cli

TORCHRUN = Path(sys.executable).parent / "torchrun"
COMMON = [
    "debug=smoke",
    "device=cpu",
    "device.precision=fp32",
    "model.norm=none",
    "optimizer=sgd",
    "data.augment=false",
    "trainer.max_iters=3",
    "trainer.val_interval=3",
    "trainer.progress=false",
    "trainer.deterministic=true",
    "trainer.ema_decay=0.5",  # the EMA of the unwrapped module on every rank: "model" is the average
]


def torchrun(args, cwd, nproc=2):
    cmd = [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", "-m", "segtrain", *args]
    return subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=cli_env({"OMP_NUM_THREADS": "1"})
    )


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to this Python")
def test_two_process_gloo_matches_one_process(tmp_path):
    proc = torchrun([*COMMON, "data.batch_size=2", "hydra.run.dir=ddp"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "world size 2 (backend gloo" in proc.stdout
    runs = [p for p in tmp_path.rglob("metrics.json")]
    assert runs == [tmp_path / "ddp" / "metrics.json"]  # one run dir, written by rank 0 only
    m = json.loads(runs[0].read_text())
    assert m["world_size"] == 2 and m["step"] == 3

    # the one-process reference in this process, built as the command line builds it (planned from the keys set)
    single = [*COMMON, "data.batch_size=4"]
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        build_trainer(composed(*single), tmp_path / "single", explicit=explicit_keys(single, [config_dir()])).fit()
    finally:
        torch.use_deterministic_algorithms(deterministic)  # trainer.deterministic: not for the next tests
    ddp = torch.load(tmp_path / "ddp" / "checkpoints" / "last.pt", weights_only=True)
    one = torch.load(tmp_path / "single" / "checkpoints" / "last.pt", weights_only=True)
    for key in ("model", "raw_model"):  # the EMA weights and the raw ones
        a, b = ddp[key], one[key]
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{key}: {k}")
    assert ddp["ema"]["num_updates"] == 3
    s = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert m["best_miou"] == pytest.approx(s["best_miou"], abs=1e-4)  # validation shards cover each image once
    assert m["history"][-1]["loss"] == pytest.approx(s["history"][-1]["loss"], rel=1e-4)


def test_slurm_tasks_map_onto_torch_distributed(tmp_path):
    """Under hydra/launcher=slurm_ddp each SLURM task finds its rank via submitit's environment."""
    pytest.importorskip("submitit")
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),  # submitit may live beside a checkout on PYTHONPATH
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": "123",
        "SLURM_NTASKS": "8",
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "gpu[01-02]",
    }
    code = (
        "from segtrain import distributed as d; import os, json; "
        "print(json.dumps([d.launched()] + [os.environ.get(k) for k in ('RANK','WORLD_SIZE','LOCAL_RANK','MASTER_ADDR')]))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == [True, "5", "8", "1", "gpu01"]


def test_slurm_launcher_config_composes(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    proc = run_cli(["hydra/launcher=slurm_ddp", "--cfg", "hydra"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "SlurmLauncher" in proc.stdout and "tasks_per_node: 4" in proc.stdout and "gpus_per_node: 4" in proc.stdout
