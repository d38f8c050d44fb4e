"""The experiment configs (configs/experiment/*.yaml): the published recipes compose, print and train."""

import json
from pathlib import Path

import pytest
import yaml

from segtrain.config import validate
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
ADE = {"ade20k_segformer_b0": "segformer", "ade20k_upernet_r50": "upernet"}
PUBLISHED_MIOU = {
    "voc_fcn_r50": 67.08,
    "voc_pspnet_r50": 76.78,
    "voc_deeplabv3_r50": 76.17,
    "voc_deeplabv3plus_r50": 75.93,
    "cityscapes_pspnet_r50": 77.85,
    "cityscapes_deeplabv3plus_r50": 79.61,
    "ade20k_segformer_b0": 37.41,
    "ade20k_upernet_r50": 42.05,
}


def test_all_experiments_are_listed():
    assert set(VOC) | set(CITY) | set(ADE) | {"medical_unet_ce_dice"} == set(EXPERIMENTS)


@pytest.mark.parametrize("name", sorted(PUBLISHED_MIOU))
def test_published_recipes_record_their_total_batch_and_miou(name):
    """The batch a number was published with is the recipe's one-GPU batch, and docs/recipes.md shows the number."""
    cfg = composed(f"experiment={name}")
    assert cfg.recipe.total_batch == cfg.data.batch_size * cfg.trainer.accumulate
    assert cfg.recipe.miou == PUBLISHED_MIOU[name] and cfg.recipe.source.startswith("mmsegmentation configs/")
    docs = (Path(__file__).resolve().parents[1] / "docs" / "recipes.md").read_text()
    assert f"`{name}`" in docs and f"{cfg.recipe.miou:.2f}" in docs


def test_ade20k_recipes_compose():
    """mmsegmentation's SegFormer-B0 (AdamW 6e-5, head lr x10, warmup 1500, poly power 1) and UPerNet-R50 (SGD 0.01)
    ADE20K recipes: 160k iterations, crop 512, batch 16."""
    seg, uper = composed("experiment=ade20k_segformer_b0"), composed("experiment=ade20k_upernet_r50")
    for cfg in (seg, uper):
        validate(cfg)
        assert cfg.data.name == "ade20k" and cfg.data.num_classes == 150 and cfg.data.crop_size == 512
        assert cfg.trainer.max_iters == 160000 and cfg.data.batch_size == 16 and cfg.model.pretrained is True
    assert seg.model.name == "segformer" and seg.model.variant == "b0"
    o, s = seg.optimizer, seg.scheduler
    assert (o.name, o.lr, o.weight_decay, o.head_lr_mult, list(o.betas)) == ("adamw", 6e-5, 0.01, 10.0, [0.9, 0.999])
    assert (s.name, s.power, s.min_lr, s.warmup_iters, s.warmup_ratio) == ("poly", 1.0, 0.0, 1500, 1e-6)
    assert uper.model.name == "upernet" and uper.model.backbone == "resnet50" and uper.model.aux
    assert uper.model.output_stride == 32 and uper.model.head_channels == 512 and uper.loss.aux_weight == 0.4
    o, s = uper.optimizer, uper.scheduler
    assert (o.name, o.lr, o.momentum, o.weight_decay) == ("sgd", 0.01, 0.9, 0.0005)
    assert (s.name, s.power, s.min_lr, s.warmup_iters) == ("poly", 0.9, 1e-4, 0)


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


def test_medical_recipe_trains_on_a_folder_dataset(tmp_path):
    """``segtrain experiment=medical_unet_ce_dice data.root=...`` through the command's entry point, in this process
    (a process start-up costs seconds; the recipe printed by the command as a subprocess: the test above)."""
    from conftest import in_process

    root = tmp_path / "scans"
    write_folder(root, masks="binary", n=6, num_classes=2, classes_yaml=False)
    args = [
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
        "hydra.run.dir=run",
    ]
    proc = in_process(args, tmp_path, "segtrain", env={"SEGTRAIN_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["step"] == 3 and m["best_miou"] is not None
