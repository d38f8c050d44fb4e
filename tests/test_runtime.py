"""segtrain.runtime: BatchToDevice (images of any type normalised on the device by data.mean / data.std),
Throughput, StopSignals (first signal noted, second aborts), DivergenceGuard (a non-finite loss stops the run
with its checkpoints kept; fp16 overflow steps skipped) and the out-of-memory advice."""

import json
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import one_line_error

from segtrain.config import IMAGENET_MEAN, IMAGENET_STD
from segtrain.errors import ConfigError
from segtrain.hooks.throughput import Throughput
from segtrain.runtime import BatchToDevice

CPU = torch.device("cpu")


def test_uint8_is_the_imagenet_normalisation_bit_for_bit():
    images = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    x, y = BatchToDevice(CPU, IMAGENET_MEAN, IMAGENET_STD)(images, torch.zeros(2, 5, 7, dtype=torch.uint8))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.equal(x, images.float() * (1.0 / (255.0 * std)) + (-mean / std))  # the formula before 16-bit
    assert x.dtype == torch.float32 and y.dtype == torch.int64


@pytest.mark.parametrize("dtype, top", [(torch.uint16, 65535.0), (torch.float32, 1.0)])
def test_16_bit_and_float_images_in_fractions_of_their_range(dtype, top):
    mean, std = [0.1, 0.2, 0.3, 0.4], [0.05, 0.1, 0.2, 0.4]
    fractions = torch.rand(2, 4, 6, 6, dtype=torch.float64)
    images = (fractions * top).round().to(dtype) if dtype == torch.uint16 else fractions.float()
    x = BatchToDevice(CPU, mean, std).images(images)
    expect = (images.double() / top - torch.tensor(mean).view(1, 4, 1, 1).double()) / torch.tensor(std).view(1, 4, 1, 1)
    torch.testing.assert_close(x.double(), expect, rtol=1e-5, atol=1e-5)


def test_band_count_mismatch_is_a_config_error():
    with pytest.raises(ConfigError, match="the images have 4 band\\(s\\) but data.mean / data.std have 3 values"):
        BatchToDevice(CPU, IMAGENET_MEAN, IMAGENET_STD).images(torch.zeros(1, 4, 2, 2, dtype=torch.uint8))


def test_throughput_rates_count_loader_waits_in_the_wall_time():
    speed = Throughput()
    speed.add(images=8, wait=9.0, compute=9.0)  # this process's first step (warm-up; after a resume too): not counted
    assert speed.rates()["train_images_per_sec"] is None
    speed.add(images=30, wait=1.0, compute=2.0)
    r = speed.rates()
    assert r == {
        "train_images_per_sec": 10.0,
        "compute_images_per_sec": 15.0,
        "data_wait_fraction": pytest.approx(1 / 3),
    }


def test_loader_warning_judges_each_window_after_the_warm_up_once(caplog):
    speed = Throughput()
    speed.add(1, wait=0.0, compute=0.0)  # the first step: not counted
    speed.add(16, wait=5.0, compute=1.0)  # the first window: the built-in set generated, workers starting
    speed.warn_if_loader_bound(0)
    speed.add(16, wait=0.05, compute=1.0)  # 5%: fine
    speed.warn_if_loader_bound(0)
    assert "bottleneck" not in caplog.text
    speed.add(16, wait=0.5, compute=1.0)  # 33% of this window (the run's total is lower than the first's)
    speed.warn_if_loader_bound(2)
    speed.add(16, wait=0.5, compute=1.0)
    speed.warn_if_loader_bound(2)
    assert caplog.text.count("the data loader is the bottleneck: 33% of the training time") == 1
    assert "raise data.num_workers (now 2)" in caplog.text


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_first_signal_is_noted_second_aborts(name):
    code = f"""
import os, signal, sys, time
from segtrain.signals import StopSignals
with StopSignals() as s:
    os.kill(os.getpid(), signal.{name})
    time.sleep(0.2)
    print("received", s.received, flush=True)
    os.kill(os.getpid(), signal.{name})  # the second one: default action, the process dies now
    time.sleep(5)
    print("still alive", flush=True)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert f"received {name}" in proc.stdout and "still alive" not in proc.stdout
    assert proc.returncode == -getattr(signal, name)
    assert "stopping after this step" in proc.stderr


def test_nan_in_fp32_stops_with_one_line_and_keeps_checkpoints(cli, tiny_run):
    run = cli.cwd / "r"
    shutil.copytree(tiny_run, run)  # a finished debug=smoke run: model.base_channels=4, 2 iterations
    before = (run / "checkpoints" / "last.pt").read_bytes()
    proc, _ = cli(
        "debug=smoke",
        "model.base_channels=4",
        "data.std=[1e-45,1e-45,1e-45]",  # inputs become inf/NaN (a resume keeps the checkpoint's lr)
        "device.precision=fp32",
        "trainer.max_iters=8",
        "trainer.progress=false",
        "trainer.resume=auto",
        run_dir="r",
        check=False,
    )  # the same run dir, continued: its checkpoints must survive the divergence
    line = one_line_error(proc, "non-finite", "optimizer.lr", "device.precision")
    assert proc.returncode == 3 and "at step 3" in line
    assert (run / "checkpoints" / "last.pt").read_bytes() == before


def test_fp16_overflow_steps_are_skipped_counted_and_logged(tmp_path, monkeypatch, caplog, recwarn):
    """fp16 autocast + GradScaler on the CPU: two steps with overflowing gradients are skipped, not fatal."""
    from segtrain.build import build_trainer
    from tests.test_config import composed

    trainer = build_trainer(
        composed("debug=smoke", "device=cpu", "device.precision=fp16", "trainer.max_iters=4", "trainer.progress=false"),
        tmp_path / "run",
    )
    criterion, calls = trainer.criterion, []

    def blow_up(out, y):
        loss = criterion(out, y)
        if not torch.is_grad_enabled():  # the dry validation pass before the first step
            return loss
        calls.append(1)
        return loss * 1e8 if len(calls) <= 2 else loss  # the first two steps overflow fp16 gradients

    monkeypatch.setattr(trainer, "criterion", blow_up)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with caplog.at_level("WARNING", logger="segtrain"):
        summary = trainer.fit()
    assert summary["skipped_steps"] == 2 and summary["step"] == 4
    assert "scaler skipped the step" in caplog.text
    assert not [
        w for w in recwarn if "lr_scheduler.step()" in str(w.message)
    ]  # said once, by segtrain    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values() if v.is_floating_point())
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["skipped_steps"] == 2


def test_out_of_memory_becomes_advice_and_keeps_last_pt(tmp_path, monkeypatch):
    """Out of GPU memory at step 2 (after the validation of step 1 wrote last.pt): one line of advice (exit 5);
    last.pt of step 1 is kept as it was."""
    from segtrain.build import build_trainer
    from segtrain.errors import ResourceError
    from tests.test_config import composed

    over = ["trainer.progress=false", "model.base_channels=4", "trainer.max_iters=2", "trainer.val_interval=1"]
    trainer = build_trainer(composed("debug=smoke", "trainer.num_vis=0", *over), tmp_path / "run")
    real_step = trainer.train_step

    def oom_at_step_2(micro):
        if trainer.step == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(micro)

    monkeypatch.setattr(trainer, "train_step", oom_at_step_2)
    with pytest.raises(ResourceError) as e:
        trainer.fit()
    msg = str(e.value)
    assert e.value.exit_code == 5 and msg.startswith("out of GPU memory at step 2 (data.batch_size=4,")
    assert "data.batch_size=2 trainer.accumulate=2" in msg and "precision" in msg
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)["step"] == 1


@pytest.mark.parametrize(
    "prog, kind, knobs",
    [
        ("segtrain", "CPU", ["out of memory (RAM) (data.batch_size=16", "trainer.accumulate=2", "data.num_workers"]),
        ("segtrain-eval", "GPU", ["out of GPU memory", "data.val_batch_size=1", "eval.mode=slide", "data.val_size"]),
        ("segtrain-predict", "GPU", ["predict.batch_size=4 (now 8)", "eval.mode=slide", "data.val_size"]),
        ("segtrain-info", "CPU", ["info.batch_size=4 (now 8)", "info.size (now [9000, 9000])", "info.latency=false"]),
    ],
)
def test_out_of_memory_advice_names_the_knobs_of_each_command(prog, kind, knobs):
    from omegaconf import OmegaConf

    from segtrain.console import oom_message
    from tests.test_config import composed

    cfg = composed("data.batch_size=16")
    OmegaConf.set_struct(cfg, False)
    cfg.info, cfg.predict = {"size": [9000, 9000], "batch_size": 8}, {"batch_size": 8}
    msg = oom_message(cfg, None, "", prog, kind)
    assert all(k in msg for k in knobs) and len(msg) < 250 and "\n" not in msg, msg


def test_backend_flags_do_not_leak_from_one_sweep_job_into_the_next():
    from segtrain.runtime import configure_backends

    before = torch.are_deterministic_algorithms_enabled()
    try:
        configure_backends(torch.device("cpu"), True, True)
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
        configure_backends(torch.device("cpu"), False, True)  # the next job of a sweep, in the same process
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before)
