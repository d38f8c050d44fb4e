"""segtrain.optim: parameter groups (backbone / head learning rates, no decay on norms and biases), the optimizer
and the per-group schedule."""

import pytest
import torch
from omegaconf import OmegaConf

from segtrain.optim import build_optimizer, build_scheduler, lr_factor, param_groups
from tests.test_config import composed


def _opt_cfg(**kw):
    base = {
        "name": "sgd",
        "lr": 0.01,
        "weight_decay": 5e-4,
        "momentum": 0.9,
        "nesterov": False,
        "betas": [0.9, 0.999],
        "head_lr_mult": 1.0,
        "no_decay_norm_bias": False,
    }
    return OmegaConf.create({**base, **kw})


def _pspnet():
    from segtrain.models.build import build_model

    cfg = composed("model=pspnet", "model.backbone=resnet18").model
    return build_model(cfg, 5)


def test_param_groups_head_lr_and_no_decay():
    model = _pspnet()
    groups = param_groups(_opt_cfg(head_lr_mult=10.0, no_decay_norm_bias=True), model)
    by_name = {g["group"]: g for g in groups}
    assert set(by_name) == {"backbone", "backbone/no_decay", "head", "head/no_decay"}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert by_name["backbone"]["lr"] == pytest.approx(0.01) and by_name["head"]["lr"] == pytest.approx(0.1)
    assert by_name["head/no_decay"]["weight_decay"] == 0.0 and by_name["backbone"]["weight_decay"] == 5e-4
    assert all(n.startswith("backbone.") for n in by_name["backbone"]["names"])
    assert not any(n.startswith("backbone.") for n in by_name["head"]["names"])
    assert all(
        n.endswith(".bias") or ".bn" in n or "downsample.1" in n or n.split(".")[-2].isdigit() or "norm" in n
        for n in by_name["backbone/no_decay"]["names"]
    )
    assert not any(n.endswith(".bias") for n in by_name["head"]["names"])
    # every conv weight decays, every BN weight does not
    bn = {id(p) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    nodecay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert bn <= nodecay


def test_param_groups_default_is_one_group():
    model = _pspnet()
    groups = param_groups(_opt_cfg(), model)
    assert len(groups) == 2  # backbone / head, same lr and decay
    assert {g["lr"] for g in groups} == {0.01} and {g["weight_decay"] for g in groups} == {5e-4}


def test_head_lr_mult_ignored_without_backbone():
    from segtrain.models.build import build_model

    model = build_model(composed("model=unet", "model.base_channels=4").model, 3)
    groups = param_groups(_opt_cfg(head_lr_mult=10.0), model)
    assert [g["lr"] for g in groups] == [pytest.approx(0.01)]


def test_nesterov_and_schedule_follow_each_group():
    model = _pspnet()
    opt = build_optimizer(_opt_cfg(head_lr_mult=10.0, nesterov=True), model)
    assert all(g["nesterov"] for g in opt.param_groups)
    sched_cfg = OmegaConf.create({"name": "poly", "power": 0.9, "min_lr": 1e-4, "warmup_iters": 0, "warmup_ratio": 0.1})
    sched = build_scheduler(sched_cfg, opt, 100, 0.01)
    for _ in range(50):
        opt.step()
        sched.step()
    lrs = {g["group"]: g["lr"] for g in opt.param_groups}  # mmseg's PolyLR per group: (base - min) * ... + min
    assert lrs["backbone"] == pytest.approx((0.01 - 1e-4) * 0.5**0.9 + 1e-4)
    assert lrs["head"] == pytest.approx((0.1 - 1e-4) * 0.5**0.9 + 1e-4)
    for _ in range(50):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-4] * len(opt.param_groups))  # one floor


@pytest.mark.parametrize("step", [0, 1, 50, 99, 100])
def test_poly_schedule_matches_formula(step):
    cfg = OmegaConf.create({"name": "poly", "power": 0.9, "min_lr": 1e-4, "warmup_iters": 0, "warmup_ratio": 0.1})
    base, total = 0.01, 100
    expected = (base - 1e-4) * (1 - step / total) ** 0.9 + 1e-4
    assert base * lr_factor(cfg, step, total, base) == pytest.approx(expected)


def test_warmup_and_cosine():
    cfg = OmegaConf.create({"name": "cosine", "power": 0.9, "min_lr": 0.0, "warmup_iters": 10, "warmup_ratio": 0.1})
    assert lr_factor(cfg, 0, 100, 1.0) == pytest.approx(0.1)  # warmup start
    assert lr_factor(cfg, 5, 100, 1.0) == pytest.approx(
        (0.1 + 0.9 * 0.5) * 0.5 * (1 + __import__("math").cos(0.05 * 3.141592653589793))
    )
    assert lr_factor(cfg, 50, 100, 1.0) == pytest.approx(0.5)
    assert lr_factor(cfg, 100, 100, 1.0) == pytest.approx(0.0, abs=1e-12)


def test_logged_lr_is_the_lr_each_step_used(tmp_path):
    """train/lr at step s is the lr step s trained with: the warmup's start at step 1, not the next step's."""
    import csv

    from segtrain.build import build_trainer

    cfg = composed("debug=smoke", "logger=csv", "trainer.max_iters=4", "trainer.log_interval=1", "trainer.progress=false",
                   "scheduler.warmup_iters=3", "scheduler.warmup_ratio=0.1", "optimizer.lr=0.01")  # fmt: skip
    build_trainer(cfg, tmp_path).fit()
    logged = [float(r["train/lr"]) for r in csv.DictReader((tmp_path / "metrics.csv").open()) if r.get("train/lr")]
    used = [0.01 * lr_factor(cfg.scheduler, s, 4, 0.01) for s in range(4)]
    assert logged == pytest.approx(used) and logged[0] == pytest.approx(0.001)
