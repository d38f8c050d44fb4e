"""trainer.monitor / monitor_mode, early stopping, top-k checkpoints (segtrain/monitor.py)."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import in_process
from omegaconf import OmegaConf

from segtrain.config import TrainerConfig, validate
from segtrain.errors import ConfigError
from segtrain.hooks.monitor import Monitor
from tests.test_config import composed

NAMES = ["background", "circle"]


def monitor(tmp_path, **kw) -> Monitor:
    return Monitor(OmegaConf.merge(OmegaConf.structured(TrainerConfig), kw), tmp_path, NAMES)


def feed(m: Monitor, values, key="val/mIoU", start=1):
    """Validations at steps start, start+1, ...; returns the step at which the monitor asked to stop."""
    for i, v in enumerate(values):
        m.update({key: v}, start + i)
        if m.stop_reason:
            return start + i
    return None


def test_early_stopping_counts_validations_without_improvement(tmp_path):
    m = monitor(tmp_path, early_stop_patience=2)
    # best 0.5 at step 2; steps 3 (equal) and 4 (lower) do not improve: stop at the second of them
    assert feed(m, [0.3, 0.5, 0.5, 0.4, 0.9]) == 4
    assert m.best == 0.5 and m.best_step == 2 and m.bad == 2
    assert "val/mIoU did not improve" in m.stop_reason and "best 0.5000 at step 2" in m.stop_reason
    # an improvement resets the count
    assert feed(monitor(tmp_path, early_stop_patience=2), [0.3, 0.2, 0.4, 0.3, 0.5, 0.45, 0.44]) == 7


def test_min_delta_and_min_mode(tmp_path):
    m = monitor(tmp_path, monitor="val/loss", early_stop_patience=2, early_stop_min_delta=0.1)
    assert m.mode == "min"  # auto: a loss is minimised
    # 1.0 -> 0.95 is better (best.pt) but not by more than 0.1 (counts as bad); 0.85 is by 0.15
    improved = [m.update({"val/loss": v}, s) for s, v in enumerate([1.0, 0.95, 0.85, 0.84, 0.83], 1)]
    assert improved == [True, True, True, True, True]
    assert m.stop_reason is not None and m.best == 0.83 and m.reference == 0.85
    m = monitor(tmp_path, monitor="val/loss", monitor_mode="max")
    assert m.mode == "max" and m.update({"val/loss": 2.0}, 1) and not m.update({"val/loss": 1.0}, 2)


def test_nan_never_improves(tmp_path):
    m = monitor(tmp_path, monitor="val_iou/circle", early_stop_patience=3)
    assert not m.update({"val_iou/circle": math.nan}, 1) and m.bad == 1 and math.isnan(m.best)
    assert m.update({"val_iou/circle": 0.1}, 2) and m.bad == 0


def test_resumed_state_stops_at_the_same_validation(tmp_path):
    values = [0.3, 0.5, 0.45, 0.5, 0.49, 0.6, 0.1]
    straight = monitor(tmp_path, early_stop_patience=3)
    stop = feed(straight, values)
    first = monitor(tmp_path, early_stop_patience=3)
    feed(first, values[:4])
    state = torch.load(_saved(first.state_dict(), tmp_path), weights_only=True)  # as a checkpoint holds it
    resumed = monitor(tmp_path, early_stop_patience=3)
    resumed.load_state_dict(state)
    assert resumed.bad == 2  # the count goes on where it was
    assert feed(resumed, values[4:], start=5) == stop == 5
    assert resumed.state_dict() == straight.state_dict()
    # a raised patience lets an early-stopped run continue
    more = monitor(tmp_path, early_stop_patience=5)
    more.load_state_dict(straight.state_dict())
    assert more.stop_reason is None and more.bad == 3
    # a lowered one stops the resumed run at once, as a run with it would have stopped
    less = monitor(tmp_path, early_stop_patience=2)
    less.load_state_dict(first.state_dict())  # bad == 2
    assert less.stop_reason and "for 2 validation(s)" in less.stop_reason


def _saved(obj, tmp_path):
    path = tmp_path / "state.pt"
    torch.save(obj, path)
    return path


def test_top_k_bookkeeping_and_files(tmp_path):
    m = monitor(tmp_path, save_top_k=2)
    for step, v in enumerate([0.2, 0.5, 0.3, 0.4, 0.1, 0.6], 1):
        m.update({"val/mIoU": v}, step)
        m.save({"step": step})
    files = sorted(p.name for p in tmp_path.glob("best*.pt"))
    assert files == ["best-2-0.5000.pt", "best-6-0.6000.pt", "best.pt"]
    assert [e["step"] for e in m.kept] == [6, 2]
    assert torch.load(tmp_path / "best.pt", weights_only=True)["step"] == 6
    assert (tmp_path / "best.pt").stat().st_ino == (tmp_path / "best-6-0.6000.pt").stat().st_ino  # a hard link
    assert m.summary(SimpleNamespace(step=6, max_iters=10))["top_k_checkpoints"] == [
        str(tmp_path / "best-6-0.6000.pt"),
        str(tmp_path / "best-2-0.5000.pt"),
    ]


def test_nan_takes_no_top_k_place_and_sorts_last(tmp_path):
    key = "val_iou/circle"
    m = monitor(tmp_path, monitor=key, save_top_k=2)
    for step, v in enumerate([math.nan, 0.5, 0.6], 1):
        m.update({key: v}, step)
        m.save({"step": step})
    assert [e["step"] for e in m.kept] == [3, 2]  # the 2nd best is kept, not the NaN
    assert sorted(p.name for p in tmp_path.glob("best*.pt")) == ["best-2-0.5000.pt", "best-3-0.6000.pt", "best.pt"]
    every = monitor(tmp_path / "all", monitor=key, save_top_k=-1)
    for step, v in enumerate([0.2, math.nan, 0.5, 0.1, math.nan], 1):
        every.update({key: v}, step)
    assert [e["step"] for e in every.kept] == [3, 1, 4, 2, 5]  # best first, NaNs last in step order


def test_auto_mode_is_min_for_val_loss_only(tmp_path):
    assert monitor(tmp_path, monitor="val/loss").mode == "min"
    assert Monitor(OmegaConf.structured(TrainerConfig(monitor="val_iou/gloss")), tmp_path, ["gloss"]).mode == "max"


def test_top_k_off_writes_best_only_and_minus_one_keeps_all(tmp_path):
    m = monitor(tmp_path / "a")
    (tmp_path / "a").mkdir()
    for step, v in enumerate([0.2, 0.5, 0.3], 1):
        m.update({"val/mIoU": v}, step)
        m.save({"step": step})
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["best.pt"]
    assert torch.load(tmp_path / "a" / "best.pt", weights_only=True)["step"] == 2
    m = monitor(tmp_path, save_top_k=-1)
    for step, v in enumerate([0.2, 0.5, 0.3], 1):
        m.update({"val/mIoU": v}, step)
        m.save({"step": step})
    assert len(list(tmp_path.glob("best-*.pt"))) == 3


def test_unknown_monitor_key_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer.monitor=val_iou/dog is not a validation value.*circle"):
        monitor(tmp_path, monitor="val_iou/dog")
    with pytest.raises(ConfigError, match="trainer.monitor must be"):
        validate(composed("trainer.monitor=loss"))
    with pytest.raises(ConfigError, match="trainer.monitor_mode"):
        validate(composed("trainer.monitor_mode=up"))
    with pytest.raises(ConfigError, match="trainer.save_top_k"):
        validate(composed("trainer.save_top_k=-2"))
    with pytest.raises(ConfigError, match=r"trainer.early_stop_patience must be >= 1"):
        validate(composed("trainer.early_stop_patience=0"))


def test_early_stop_cli_says_why_and_csv_has_every_row(tmp_path):
    """A plateau (nothing beats the first validation by more than 0.5) stops at the third validation;
    metrics.csv (logger=csv) holds the training rows and one row per validation.  (segtrain's entry point in this
    process: test_cli.in_process.)"""
    proc = in_process(["debug=smoke", "logger=csv", "trainer.early_stop_patience=2", "trainer.early_stop_min_delta=0.5",
                       "trainer.val_interval=2", "trainer.max_iters=20", "trainer.num_vis=0", "data.num_val=4",
                       "hydra.run.dir=run"], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "run"
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "done" and status["stop_reason"].startswith("early stopping: val/mIoU did not improve")
    assert "trainer.early_stop_patience=2" in status["stop_reason"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["stop_reason"] == status["stop_reason"] and metrics["step"] == 6
    assert [h["step"] for h in metrics["history"]] == [2, 4, 6]
    assert status["result"] == metrics["best_value"] == max(h["miou"] for h in metrics["history"])
    assert "early stopping: val/mIoU" in (run / "cli.log").read_text()
    assert not (run / "tb").exists()  # logger=csv replaces the default tensorboard
    import csv

    rows = list(csv.DictReader((run / "metrics.csv").open()))
    train = [int(r["step"]) for r in rows if r["train/loss"]]
    val = [int(r["step"]) for r in rows if r["val/mIoU"]]
    assert train == [1, 2, 3, 4, 5, 6] and val == [2, 4, 6]
    assert {"val/loss", "val_iou/circle", "train/lr"} <= set(rows[0])
