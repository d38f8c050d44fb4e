"""segtrain.trainer: every network trains through the loop, gradient accumulation equals a bigger batch,
SIGTERM (also during a validation) writes a resumable last.pt, and a failed save keeps the previous checkpoint."""

import json
import math
import signal
import subprocess
import time

import pytest
import torch
from conftest import start_cli
from test_config import composed

from segtrain import checkpoint
from segtrain.build import build_trainer
from segtrain.config import validate
from segtrain.errors import Preempted

# The overrides of each network family and variant; each run is the CLI's (config.validate, then
# build_trainer(cfg, run_dir).fit()) in this process: ~5 s of imports less per network than a subprocess.
# tests/test_cli.py trains one of them through the console script.
MODELS = [
    ["model=fcn", "model.backbone=resnet18"],
    ["model=fcn", "model.variant=8s", "model.backbone=resnet18"],
    ["model=deconvnet"],
    ["model=deconvnet", "model.variant=segnet"],
    ["model=unet"],
    ["model=unet", "model.backbone=resnet18"],
    ["model=pspnet", "model.backbone=resnet18"],
    ["model=deeplabv3", "model.backbone=resnet18"],
    ["model=deeplabv3plus", "model.backbone=resnet18"],
    ["model=pspnet", "model.backbone=mobilenet_v3_large"],
    ["model=deeplabv3plus", "model.backbone=mobilenet_v3_large"],
    ["model=pspnet", "model.backbone=resnet18", "data.image_size=[97,131]"],
]


@pytest.mark.parametrize("overrides", MODELS, ids=lambda o: "-".join(x.split("=")[1] for x in o))
def test_every_model_trains(tmp_path, overrides):
    # 8 training images: 2 epochs of 2 steps (the checkpoints written at each validation cost as much as the steps)
    cfg = composed("debug=smoke", "trainer.num_vis=1", "data.num_train=8", *overrides)
    validate(cfg)
    run = tmp_path / "run"
    summary = build_trainer(cfg, run).fit()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 4 and metrics["num_params"] > 0 and 0 <= metrics["best_miou"] <= 1
    assert summary["step"] == 4 and summary["model"] == cfg.model.name
    # fp16 (CUDA) may skip its first steps while the GradScaler finds its scale; bf16/fp32 never skip
    assert summary["skipped_steps"] == 0 or (torch.cuda.is_available() and summary["skipped_steps"] < 4)
    assert [h["step"] for h in metrics["history"]] == [2, 4]  # debug=smoke: a validation per epoch (2 steps here)
    assert all(math.isfinite(h["loss"]) and 0 <= h["miou"] <= 1 for h in metrics["history"])
    assert checkpoint.load(run / "checkpoints" / "last.pt")["step"] == 4
    assert (run / "checkpoints" / "best.pt").is_file()
    assert list((run / "tb").iterdir())  # the TensorBoard events


def test_accumulate_matches_a_bigger_batch(tmp_path):
    """The trainer's accumulation, in this process (one build_trainer(cfg).fit() per run)."""
    common = [
        "debug=smoke",
        "model.norm=none",
        "device=cpu",
        "device.precision=fp32",
        "trainer.max_iters=1",
        "trainer.progress=false",
        "trainer.num_vis=0",
        "data.augment=false",
        "optimizer=sgd",
        "trainer.deterministic=true",
    ]
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        for name, batch in (("big", ["data.batch_size=4"]), ("acc", ["data.batch_size=2", "trainer.accumulate=2"]),
                            ("small", ["data.batch_size=2"])):  # fmt: skip
            build_trainer(composed(*common, *batch), tmp_path / name).fit()
    finally:
        torch.use_deterministic_algorithms(deterministic)  # trainer.deterministic: not for the next tests
    load = lambda d: torch.load(tmp_path / d / "checkpoints" / "last.pt", weights_only=True)["model"]  # noqa: E731
    a, b, c = load("big"), load("acc"), load("small")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(a[k], c[k]) for k in a)  # the test can fail: batch 2 alone differs


def test_sigterm_writes_last_and_resume_continues(tmp_path, caplog):
    args = [
        "debug=smoke",
        "trainer.max_iters=100000",
        "trainer.val_interval=100000",
        "data.num_workers=2",
        "trainer.progress=false",
    ]
    proc = start_cli([*args, "hydra.run.dir=run"], tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    for line in proc.stdout:
        if line.startswith("step 2/") or time.time() > deadline:  # training runs, its loader workers too
            break
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert time.time() - t0 < 60
    assert proc.returncode == 75, out + err
    assert "segtrain: stopped: stopped by SIGTERM" in err and "trainer.resume=auto" in err and "Traceback" not in err
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    step = checkpoint.load(last)["step"]
    assert step >= 2
    # the resume, in this process (the command line's resume=auto: tests/test_resume.py, tests/test_cli.py)
    cfg = composed(*args, "trainer.resume=auto", f"trainer.stop_at={step + 2}")
    with caplog.at_level("INFO", logger="segtrain"), pytest.raises(Preempted, match="stopped by trainer.stop_at"):
        build_trainer(cfg, tmp_path / "run").fit()
    assert f"resumed from {last} at step {step}" in caplog.text
    assert checkpoint.load(last)["step"] == step + 2


def test_sigterm_during_validation_stops_at_the_next_batch(tmp_path):
    """A long validation (2000 images) is cut at the next batch: last.pt holds the 2 steps done, exit 75,
    and the status says stopped (not a whole validation plus one more training step later)."""
    args = ["debug=smoke", "data.num_val=2000", "data.val_batch_size=1", "trainer.val_interval=2",
            "trainer.max_iters=100", "trainer.progress=false", "trainer.num_vis=0", "hydra.run.dir=run"]  # fmt: skip
    proc = start_cli(args, tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step 2/"):  # logged after step 2; its validation starts now
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert "stopped by SIGTERM at step 2/100" in err and "Traceback" not in err
    assert "val mIoU" not in out  # the validation was cut, not finished
    state = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["step"] == 2 and state["history"] == []
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "stopped"
    # the resumed run owes step 2's validation and runs it first (here it is also the final one)
    cfg = composed("debug=smoke", "data.num_val=8", "data.val_batch_size=1", "trainer.val_interval=2",
                   "trainer.max_iters=2", "trainer.progress=false", "trainer.num_vis=0", "trainer.resume=auto")  # fmt: skip
    summary = build_trainer(cfg, tmp_path / "run").fit()
    assert [h["step"] for h in summary["history"]] == [2] and (tmp_path / "run" / "checkpoints" / "best.pt").is_file()


def test_save_failure_keeps_previous_checkpoint(tmp_path, monkeypatch):
    from segtrain.errors import OutputError

    cfg = composed("debug=smoke", "trainer.max_iters=2", "trainer.progress=false")
    trainer = build_trainer(cfg, tmp_path / "run")
    trainer.fit()
    good = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")["step"]

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_atomic", full)
    with pytest.raises(OutputError, match="No space left on device.*previous checkpoint is kept"):
        trainer.save()
    assert checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == good


class _InMemory(torch.utils.data.Dataset):
    """Images and masks in tensors, indexed by the (epoch, index) keys of segtrain's EpochSampler."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (n, 3, 24, 24), dtype=torch.uint8, generator=g)
        self.masks = (self.images[:, 0] > 127).long()  # learnable: the class is the red channel's half

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        return self.images[key[1]], self.masks[key[1]]


def _objects_trainer(run_dir, *overrides):
    """A Trainer from objects made here: no data set, no files, no builder."""
    from segtrain.data.base import EpochSampler
    from segtrain.hooks.monitor import Monitor
    from segtrain.trainer import Trainer

    cfg = composed(
        "data.num_classes=2",
        "device=cpu",
        "device.precision=fp32",
        "trainer.max_iters=6",
        "trainer.val_interval=2",
        "trainer.progress=false",
        "trainer.num_vis=0",
        *overrides,
    )
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 2, 1))
    train, val = _InMemory(16, 0), _InMemory(4, 1)
    loaders = [
        torch.utils.data.DataLoader(ds, batch_size=4, sampler=EpochSampler(len(ds), shuffle=shuffle, seed=0))
        for ds, shuffle in ((train, True), (val, False))
    ]
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1 - i / 6)
    monitor = Monitor(cfg.trainer, run_dir / "checkpoints", ["0", "1"])
    return Trainer(
        cfg, model, optimizer, scheduler, torch.nn.CrossEntropyLoss(), *loaders, run_dir=run_dir, hooks=[monitor]
    )


def test_a_trainer_from_objects_trains_checkpoints_and_resumes_bitwise(tmp_path):
    straight = _objects_trainer(tmp_path / "straight")
    summary = straight.fit()
    assert summary["step"] == 6 and [h["step"] for h in summary["history"]] == [2, 4, 6]
    assert (
        summary["best_miou"] > 0.55 and summary["best_step"] is not None
    )  # it learns (chance: ~0.33); the monitor ran
    assert {"last.pt", "best.pt"} <= {p.name for p in (tmp_path / "straight" / "checkpoints").iterdir()}

    with pytest.raises(Preempted, match="stopped by trainer.stop_at at step 3/6"):
        _objects_trainer(tmp_path / "part", "trainer.stop_at=3").fit()
    resumed = _objects_trainer(tmp_path / "part")  # fresh objects, then the checkpoint's state
    resumed.load_state_dict(checkpoint.load(tmp_path / "part" / "checkpoints" / "last.pt"), "last.pt")
    assert resumed.step == 3
    again = resumed.fit()
    assert again["history"] == summary["history"]
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert again["monitor"] == summary["monitor"] and again["best_value"] == summary["best_value"]
