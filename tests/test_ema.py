"""Weight EMA (segtrain/ema.py): the update rule, what each checkpoint holds, and a bitwise resume."""

import csv

import pytest
import torch
from torch import nn

from segtrain import checkpoint
from segtrain.build import build_trainer
from segtrain.config import validate
from segtrain.errors import ConfigError, Preempted
from segtrain.evaluation import evaluate_loader
from segtrain.hooks.ema import EMA
from segtrain.models.build import build_model
from segtrain.runtime import autocast
from tests.test_config import composed


def test_update_rule_with_warmup_and_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = EMA(model, decay=0.9, warmup=10)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    for n in range(4):
        with torch.no_grad():
            model[0].weight.add_(torch.randn(2, 3))
        model(torch.randn(5, 3))  # moves the BatchNorm statistics
        d = min(0.9, (1 + n) / (10 + n))
        for k, v in model.state_dict().items():
            expected[k] = d * expected[k] + (1 - d) * v if v.is_floating_point() else v.clone()
        ema.update(model)
    got = ema.module.state_dict()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-7, msg=k)
    assert got["1.num_batches_tracked"] == 4 and ema.num_updates == 4
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training
    assert EMA(model, decay=0.9, warmup=None).current_decay() == 0.9


def test_config_checks():
    with pytest.raises(ConfigError, match=r"trainer.ema_decay must be in \(0, 1\)"):
        validate(composed("trainer.ema_decay=1.0"))
    with pytest.raises(ConfigError, match="trainer.ema_warmup must be >= 1"):
        validate(composed("trainer.ema_decay=0.9", "trainer.ema_warmup=0"))


TINY = ["debug=smoke", "device=cpu", "device.precision=fp32", "data.num_train=8", "data.num_val=4",
        "data.image_size=32", "data.batch_size=2", "model.base_channels=4", "trainer.max_iters=6",
        "trainer.val_interval=1", "trainer.num_vis=0", "trainer.progress=false", "logger=csv",
        "trainer.ema_decay=0.8", "trainer.save_top_k=3"]  # fmt: skip


def fit(run_dir, *overrides):
    cfg = composed(*TINY, *overrides)
    validate(cfg)
    trainer = build_trainer(cfg, run_dir)
    return trainer, trainer.fit()


def test_ema_resume_is_bitwise_and_checkpoints_hold_the_validated_weights(tmp_path):
    """EMA on, top-3: a run stopped mid-epoch (trainer.stop_at) and resumed ends bitwise equal to one that never
    stopped (raw and averaged weights, the monitor's record, the kept files, the CSV rows); every checkpoint's
    ``model`` holds the EMA weights that validation scored."""
    trainer, summary = fit(tmp_path / "straight")
    with pytest.raises(Preempted):
        fit(tmp_path / "part", "trainer.stop_at=3")
    fit(tmp_path / "part", "trainer.resume=auto")

    ckpts = {}
    for run in ("straight", "part"):
        names = sorted(p.name for p in (tmp_path / run / "checkpoints").glob("*.pt"))
        assert len([n for n in names if n.startswith("best-")]) == 3, names  # exactly k, + best.pt and last.pt
        assert {"best.pt", "last.pt"} <= set(names)
        ckpts[run] = names
    assert ckpts["straight"] == ckpts["part"]
    a = checkpoint.load(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = checkpoint.load(tmp_path / "part" / "checkpoints" / "last.pt")
    for key in ("model", "raw_model"):
        different = [k for k in a[key] if not torch.equal(a[key][k], b[key][k])]
        assert not different, (key, different[:3])
    assert a["ema"] == b["ema"] == {"num_updates": 6, "decay": 0.8, "warmup": 10}
    assert a["monitor"] == b["monitor"] and a["history"] == b["history"]
    assert any(not torch.equal(a["model"][k], a["raw_model"][k]) for k in a["model"])  # the average is not the raw
    rows = [list(csv.DictReader((tmp_path / run / "metrics.csv").open())) for run in ("straight", "part")]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]]  # no duplicated or missing rows
    assert [r["val/mIoU"] for r in rows[0]] == [r["val/mIoU"] for r in rows[1]]

    # best.pt's "model" (what segtrain-eval and model.init_from read) scores exactly the best validation
    best = checkpoint.load(tmp_path / "straight" / "checkpoints" / "best.pt")
    assert best["step"] == summary["best_step"]
    model = build_model(trainer.cfg.model, trainer.num_classes).to(memory_format=torch.channels_last)
    model.load_state_dict(best["model"])
    m, _, _ = evaluate_loader(model.eval(), trainer.val_loader, trainer.batch_to_device,
                              lambda: autocast(trainer.device, "fp32"), trainer.cfg, trainer.class_names)  # fmt: skip
    assert m["miou"] == summary["best_value"]
