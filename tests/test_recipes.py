"""Issue 5: experiment configs, optimizer parameter groups, gradient accumulation, segtrain-eval."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from segtrain.config import validate
from segtrain.optim import build_optimizer, build_scheduler, param_groups
from tests.conftest import run_cli
from tests.fake_datasets import write_folder
from tests.test_config import composed

EXPERIMENTS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs" / "experiment").glob("*.yaml"))
VOC = {
    "voc_fcn_r50": "fcn",
    "voc_pspnet_r50": "pspnet",
    "voc_deeplabv3_r50": "deeplabv3",
    "voc_deeplabv3plus_r50": "deeplabv3plus",
}
CITY = {"cityscapes_pspnet_r50": "pspnet", "cityscapes_deeplabv3plus_r50": "deeplabv3plus"}


def test_all_experiments_are_listed():
    assert set(VOC) | set(CITY) | {"medical_unet_ce_dice"} == set(EXPERIMENTS)


@pytest.mark.parametrize("name", sorted(VOC) + sorted(CITY))
def test_published_recipes_compose(name):
    cfg = composed(f"experiment={name}")
    validate(cfg)
    voc = name in VOC
    assert cfg.model.name == (VOC | CITY)[name]
    assert cfg.model.backbone == "resnet50" and cfg.model.output_stride == 8 and cfg.model.aux
    assert cfg.model.pretrained
    assert cfg.data.name == ("voc_aug" if voc else "cityscapes")
    assert cfg.optimizer.name == "sgd" and cfg.optimizer.lr == 0.01 and cfg.optimizer.momentum == 0.9
    assert cfg.optimizer.weight_decay == 0.0005
    assert cfg.scheduler.name == "poly" and cfg.scheduler.power == 0.9 and cfg.scheduler.min_lr == 1e-4
    assert cfg.loss.name == "ce" and cfg.loss.aux_weight == 0.4
    assert cfg.trainer.max_iters == (20000 if voc else 40000)
    assert list(cfg.data.crop_size) == [512, 1024] if not voc else cfg.data.crop_size == 512
    assert cfg.data.batch_size == (16 if voc else 8)
    assert cfg.eval.mode == ("whole" if voc else "slide")
    if not voc:
        assert list(cfg.eval.crop_size) == [512, 1024]


def test_medical_recipe_composes():
    cfg = composed("experiment=medical_unet_ce_dice")
    validate(cfg)
    assert cfg.model.name == "unet" and cfg.data.name == "folder" and cfg.data.num_classes == 2
    assert cfg.loss.name == "ce+dice" and dict(cfg.loss.weights) == {"ce": 1.0, "dice": 3.0}
    assert cfg.eval.mode == "slide" and cfg.eval.crop_size == 256


def test_cfg_job_prints_the_pspnet_recipe(tmp_path):
    proc = run_cli(["experiment=voc_pspnet_r50", "--cfg", "job"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["optimizer"]["lr"] == 0.01 and cfg["optimizer"]["momentum"] == 0.9
    assert cfg["optimizer"]["weight_decay"] == 0.0005 and cfg["scheduler"]["power"] == 0.9
    assert cfg["trainer"]["max_iters"] == 20000 and cfg["loss"]["aux_weight"] == 0.4


def test_medical_recipe_trains_on_a_folder_dataset(cli, tmp_path):
    root = tmp_path / "scans"
    write_folder(root, masks="binary", n=6, num_classes=2, classes_yaml=False)
    proc, run = cli(
        "experiment=medical_unet_ce_dice",
        f"data.root={root}",
        "data.label_map={255:1}",
        "model.base_channels=4",
        "data.crop_size=48",
        "data.batch_size=2",
        "data.num_workers=0",
        "trainer.max_iters=3",
        "trainer.val_interval=3",
        "eval.crop_size=48",
        "eval.stride=32",
        "trainer.progress=false",
        "model.norm=bn",
    )
    m = json.loads((run / "metrics.json").read_text())
    assert m["step"] == 3 and m["best_miou"] is not None


# ---------------------------------------------------------------------------
# Parameter groups and schedules.


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
    from segtrain.models import build_model

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
    from segtrain.models import build_model

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
    factor = (1 - 1e-4 / 0.01) * 0.5**0.9 + 1e-4 / 0.01
    lrs = {g["group"]: g["lr"] for g in opt.param_groups}
    assert lrs["backbone"] == pytest.approx(0.01 * factor)
    assert lrs["head"] == pytest.approx(0.1 * factor)


# ---------------------------------------------------------------------------
# Gradient accumulation: 2 x batch 2 == 1 x batch 4 (no BN, fp32).


def test_accumulate_matches_a_bigger_batch(cli):
    common = [
        "debug=smoke",
        "model.norm=none",
        "device=cpu",
        "device.precision=fp32",
        "trainer.max_iters=1",
        "trainer.progress=false",
        "data.augment=false",
        "optimizer=sgd",
        "trainer.deterministic=true",
    ]
    _, big = cli(*common, "data.batch_size=4", run_dir="big")
    _, acc = cli(*common, "data.batch_size=2", "trainer.accumulate=2", run_dir="acc")
    _, small = cli(*common, "data.batch_size=2", run_dir="small")
    load = lambda d: torch.load(d / "checkpoints" / "last.pt", weights_only=True)["model"]  # noqa: E731
    a, b, c = load(big), load(acc), load(small)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(a[k], c[k]) for k in a)  # the test can fail: batch 2 alone differs


# ---------------------------------------------------------------------------
# segtrain-eval.


def _eval_exe() -> list[str]:
    exe = Path(sys.executable).parent / "segtrain-eval"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "segtrain.evaluate"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    proc = run_cli(["debug=smoke", "trainer.max_iters=8", "trainer.progress=false", "hydra.run.dir=run"], root)
    assert proc.returncode == 0, proc.stderr
    return root / "run" / "checkpoints" / "best.pt"


def _evaluate(ckpt: Path, tmp_path: Path, name: str, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    proc = run_cli(
        [f"ckpt={ckpt}", f"hydra.run.dir={name}", "trainer.progress=false", *args], tmp_path, exe=_eval_exe()
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / name
    assert (out / "confusion_matrix.png").stat().st_size > 500
    import cv2

    assert cv2.imread(str(out / "confusion_matrix.png")) is not None
    return proc, json.loads((out / "metrics.json").read_text())


def test_eval_modes(trained, tmp_path):
    proc, whole = _evaluate(trained, tmp_path, "whole")
    assert "mean" in proc.stdout and "IoU" in proc.stdout  # the per-class table
    assert {"miou", "aacc", "macc", "per_class_iou"} <= set(whole)
    assert whole["eval"]["mode"] == "whole" and whole["num_images"] == 8
    trained_metrics = json.loads((trained.parents[1] / "metrics.json").read_text())
    assert whole["miou"] == pytest.approx(trained_metrics["best_miou"], abs=1e-3)

    _, covering = _evaluate(trained, tmp_path, "cover", "eval.mode=slide", "eval.crop_size=64")
    assert covering["miou"] == pytest.approx(whole["miou"], abs=1e-9)
    assert covering["confusion_matrix"] == whole["confusion_matrix"]

    _, small = _evaluate(trained, tmp_path, "small", "eval.mode=slide", "eval.crop_size=32", "eval.stride=16")
    assert small["eval"]["crop_size"] == 32 and 0 <= small["miou"] <= 1

    _, tta = _evaluate(trained, tmp_path, "tta", "eval.scales=[0.75,1.0,1.25]", "eval.flip=true")
    assert tta["eval"]["flip"] and tta["eval"]["scales"] == [0.75, 1.0, 1.25] and 0 <= tta["miou"] <= 1
    assert sum(map(sum, tta["confusion_matrix"])) == sum(map(sum, whole["confusion_matrix"]))


def test_eval_errors_are_one_line(trained, tmp_path):
    missing = run_cli(["ckpt=/nonexistent/best.pt"], tmp_path, exe=_eval_exe())
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert "checkpoint not found" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
    no_ckpt = run_cli([], tmp_path, exe=_eval_exe())
    assert no_ckpt.returncode != 0 and "ckpt" in no_ckpt.stderr and "Traceback" not in no_ckpt.stderr
    model = run_cli([f"ckpt={trained}", "model.base_channels=4"], tmp_path, exe=_eval_exe())
    assert model.returncode != 0 and "from the checkpoint" in model.stderr
