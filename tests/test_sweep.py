"""Sweeps: per-job status.json, the sweep summary (segtrain/sweep.py), Optuna search, the joblib launcher."""

import csv
import json
import time

import pytest
import yaml
from conftest import in_process

from segtrain.apps import sweep

FAST = ["debug=smoke", "trainer.max_iters=2", "trainer.num_vis=0"]


def read_summary(sweep_dir):
    with (sweep_dir / "summary.csv").open() as f:
        return list(csv.DictReader(f))


def make_job(root, name, status, best=None, error=None, overrides=("a=1",), wall=1.0):
    d = root / name
    d.mkdir(parents=True)
    sweep.write_status(d, status, error, list(overrides), wall)
    if best is not None:
        (d / "metrics.json").write_text(json.dumps({"best_miou": best, "step": 4, "max_iters": 8}))
    return d


def test_collect_and_write_summary_sort_best_first_failed_last(tmp_path):
    make_job(tmp_path, "0", "done", 0.5, overrides=["optimizer.lr=0.1", "model=unet"])
    make_job(tmp_path, "1", "failed", error="optimizer.lr must be > 0, got -1.0", wall=0.1)
    make_job(tmp_path, "2", "done", 0.7)
    make_job(tmp_path, "10", "done", 0.5)
    make_job(tmp_path, "3", "done")  # done but no metrics.json: after the scored jobs
    (tmp_path / "not_a_job").mkdir()
    rows = sweep.collect(tmp_path)
    assert [r["job"] for r in rows] == ["2", "0", "10", "3", "1"]
    assert rows[1]["overrides"] == "optimizer.lr=0.1 model=unet" and rows[1]["steps"] == "4/8"
    assert rows[-1]["status"] == "failed" and rows[-1]["best_miou"] is None

    sweep.write_summary(tmp_path, rows)
    table = read_summary(tmp_path)
    assert list(table[0]) == list(sweep.COLUMNS)
    assert [r["job"] for r in table] == ["2", "0", "10", "3", "1"]
    assert float(table[0]["best_miou"]) == 0.7 and table[3]["best_miou"] == ""
    assert table[4]["error"] == "optimizer.lr must be > 0, got -1.0"
    md = (tmp_path / "summary.md").read_text().splitlines()
    assert md[0].startswith("| job | status | best_miou") and len(md) == 2 + 5
    assert md[2].startswith("| 2 | done | 0.7000 | 4/8 |")

    assert sweep.failed_jobs(tmp_path) == [("1", "optimizer.lr must be > 0, got -1.0")]
    assert sweep.failed_jobs(tmp_path, since=time.time() + 60) == []  # an earlier sweep's failures do not count


def test_single_run_writes_status(tmp_path):
    # segtrain's entry point in this process (test_cli.in_process): the job's record, not the command, is tested
    proc = in_process(["data=folder", f"data.root={tmp_path / 'nowhere'}", *FAST, "hydra.run.dir=run"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "failed" and "data.root=" in status["error"] and "data=folder" in status["overrides"]
    proc = in_process(["optimizer.lr=-1", *FAST, "hydra.run.dir=typo"], tmp_path)  # a config mistake: no dir at all
    assert proc.returncode == 2 and not (tmp_path / "typo").exists(), proc.stderr


def test_basic_sweep_goes_on_after_a_failed_job_and_summarises(cli):
    proc, _ = cli("-m", "optimizer.lr=0.01,-1,0.001", *FAST, f"hydra.sweep.dir={cli.cwd / 'sw'}", check=False)
    sw = cli.cwd / "sw"
    assert proc.returncode == 1, proc.stderr
    assert (sw / "0" / "metrics.json").is_file() and (sw / "2" / "metrics.json").is_file()
    assert "1 job(s) of the sweep failed: [1] optimizer.lr must be > 0" in proc.stderr
    rows = read_summary(sw)
    assert [r["status"] for r in rows] == ["done", "done", "failed"]
    assert rows[2]["job"] == "1" and "optimizer.lr" in rows[2]["error"] and "optimizer.lr=-1" in rows[2]["overrides"]
    assert all(r["steps"] == "2/2" for r in rows[:2]) and float(rows[0]["best_miou"]) >= float(rows[1]["best_miou"])
    assert (sw / "summary.md").is_file() and "| job | status |" in proc.stdout
    assert json.loads((sw / "0" / "status.json").read_text())["status"] == "done"
    assert list((sw / "0" / "tb").glob("events.out.tfevents.*"))  # tensorboard --logdir SWEEP_DIR sees every job
    lrs = [yaml.safe_load((sw / job / ".hydra" / "config.yaml").read_text())["optimizer"]["lr"] for job in "02"]
    assert lrs == [0.01, 0.001]  # each job its own value


def test_a_sweep_into_a_used_sweep_dir_is_refused_untouched_then_overwrite_keeps_the_old_runs(cli):
    """Hydra rewrites a job's .hydra/ and log before the job starts: the sweep dir is checked before that."""
    sw = cli.cwd / "sw"
    args = ["-m", "optimizer.lr=0.01,0.02", *FAST, f"hydra.sweep.dir={sw}"]
    proc = in_process(args, cli.cwd)  # the used sweep dir: made by segtrain's entry point in this process
    assert proc.returncode == 0, proc.stderr
    before = {p.relative_to(sw).as_posix(): p.read_bytes() for p in sorted(sw.rglob("*")) if p.is_file()}
    proc, _ = cli(*args, check=False)
    assert proc.returncode == 4 and "already holds runs (job dir(s) 0, 1)" in proc.stderr, proc.stderr
    assert "hydra.sweep.dir" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    after = {p.relative_to(sw).as_posix(): p.read_bytes() for p in sorted(sw.rglob("*")) if p.is_file()}
    assert after == before  # byte for byte: .hydra/, status.json, the logs, checkpoints
    proc, _ = cli(*args, "trainer.overwrite=true")
    (previous,) = (sw / "0").glob("previous-*")
    kept = {p.relative_to(previous).as_posix(): p.read_bytes() for p in previous.rglob("*") if p.is_file()}
    assert kept == {k[2:]: v for k, v in before.items() if k.startswith("0/")}  # the old job 0, whole
    assert [r["job"] for r in read_summary(sw)] in (["0", "1"], ["1", "0"])  # previous-* runs are not jobs
    proc = in_process([*args, "trainer.resume=auto"], cli.cwd)  # continues each job (finished: nothing left to train)
    assert proc.returncode == 0, proc.stderr


def test_a_signal_stops_the_whole_sweep_with_75(cli):
    import signal
    import subprocess

    from conftest import segtrain_exe
    from test_rundir import _read_until

    sw = cli.cwd / "sw"
    args = ["-m", "optimizer.lr=0.01,0.02", "debug=smoke", "device=cpu", "trainer.max_iters=100000",
            "trainer.val_interval=100000", "trainer.progress=false", "data.image_size=96", f"hydra.sweep.dir={sw}"]  # fmt: skip
    from conftest import cli_env

    proc = subprocess.Popen(segtrain_exe() + args, cwd=cli.cwd, env=cli_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        _read_until(proc.stdout, "step 1/")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 75, err
    assert "stopped" in err and "trainer.resume=auto" in err, err  # one line, shortened to fit
    log = (sw / "0" / "cli.log").read_text()
    assert "stopped by SIGTERM" in log and f"trainer.resume=auto hydra.sweep.dir={sw}" in log
    assert json.loads((sw / "0" / "status.json").read_text())["status"] == "stopped"
    assert not (sw / "1").exists()  # the next job never started
    assert [r["status"] for r in read_summary(sw)] == ["stopped"]


def test_joblib_sweep_derives_failures_from_status_files(cli):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    pytest.importorskip("joblib")  # the plugin package imports without it
    proc, _ = cli(
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "optimizer.lr=0.01,-1",
        *FAST,
        f"hydra.sweep.dir={cli.cwd / 'sw'}",
        check=False,
        env={"OMP_NUM_THREADS": "1"},
    )
    sw = cli.cwd / "sw"
    assert proc.returncode == 1, proc.stderr
    assert (sw / "0" / "metrics.json").is_file()
    # the jobs ran in loky worker processes: the parent learns of the failure from 1/status.json
    assert "1 job(s) of the sweep failed: [1] optimizer.lr must be > 0" in proc.stderr, proc.stderr
    rows = read_summary(sw)
    assert [(r["job"], r["status"]) for r in rows] == [("0", "done"), ("1", "failed")]


def test_optuna_search_runs_trials_and_summarises(cli):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    # model=unet / data.crop_size=48: fixed values leave the search space (and keep the test fast)
    proc, _ = cli(
        "-m",
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=3",
        "model=unet",
        "data.crop_size=48",
        *FAST,
        f"hydra.sweep.dir={cli.cwd / 'opt'}",
    )
    sw = cli.cwd / "opt"
    rows = read_summary(sw)
    assert len(rows) == 3 and all(r["status"] == "done" for r in rows), rows
    lrs = {r["overrides"].split()[0] for r in rows}
    assert len(lrs) == 3 and all(lr.startswith("optimizer.lr=") for lr in lrs)
    assert all("model=unet" in r["overrides"] and "data.batch_size=" in r["overrides"] for r in rows)
    assert (sw / "optimization_results.yaml").is_file()


def test_optuna_failed_trials_are_recorded_and_the_study_goes_on(tmp_path):
    # A failed job returns None (a FAILED trial); NaN would make the sweeper abort at the first failure.
    # (segtrain's entry point in this process: test_optuna_search_runs_trials_and_summarises runs the command)
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = in_process(
        ["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2", "model=unet", "optimizer.lr=choice(-1,-2)", *FAST,
         f"hydra.sweep.dir={tmp_path / 'opt'}"],
        tmp_path,
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "2 job(s) of the sweep failed: [0] optimizer.lr must be > 0" in proc.stderr, proc.stderr
    rows = read_summary(tmp_path / "opt")  # written although Optuna ends with "No trials are completed yet"
    assert [r["status"] for r in rows] == ["failed", "failed"] and all("optimizer.lr" in r["error"] for r in rows)
