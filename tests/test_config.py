import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from segtrain.cli import config_dir
from segtrain.config import as_hw, register_configs, validate
from segtrain.errors import ConfigError
from segtrain.optim import lr_factor


def composed(*overrides):
    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_default_config_composes_and_validates():
    cfg = composed()
    validate(cfg)
    assert cfg.model.name == "unet" and cfg.data.name == "synthetic"
    assert cfg.data.ignore_index == 255 and cfg.device.type.value == "auto"
    assert {"backbone", "pretrained", "output_stride", "aux"} <= set(cfg.model)


def test_smoke_composes():
    cfg = composed("debug=smoke", "trainer.max_iters=12")
    assert cfg.data.num_workers == 0 and cfg.trainer.max_iters == 12


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.lr=0", "optimizer.lr"),
        ("optimizer.weight_decay=-1", "optimizer.weight_decay"),
        ("data.ignore_index=3", "data.ignore_index"),
        ("data.crop_size=-4", "data.crop_size"),
        ("trainer.val_interval=0", "trainer.val_interval"),
        ("trainer.grad_clip=0", "trainer.grad_clip"),
        ("model.output_stride=12", "model.output_stride"),
        ("scheduler.warmup_iters=-1", "scheduler.warmup_iters"),
        ("data.class_names=[a,b]", "data.class_names"),
    ],
)
def test_validation_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        validate(composed(override))


def test_as_hw():
    assert as_hw(5, "k") == (5, 5)
    assert as_hw([3, 7], "k") == (3, 7)
    assert as_hw(OmegaConf.create([9]), "k") == (9, 9)
    with pytest.raises(ConfigError, match="k must"):
        as_hw([1, 2, 3], "k")


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
