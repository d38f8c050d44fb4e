import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from segtrain.cli import config_dir
from segtrain.config import as_hw, register_configs, validate
from segtrain.errors import ConfigError


def composed(*overrides):
    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def validation_error(*overrides) -> str:
    """The message of the ConfigError that config.validate raises for the composed ``overrides``."""
    with pytest.raises(ConfigError) as e:
        validate(composed(*overrides))
    return str(e.value)


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
        ("loss.class_weights=[1.0,2.0]", "loss.class_weights has 2 values but data.num_classes=6"),
        ("data.scale_range=[2.0,1.0]", "data.scale_range"),
        ("data.base_size=0", "data.base_size"),
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


def _differences(ours, schema, prefix=""):
    """Keys whose value in the composed default config differs from the schema's default."""
    out = []
    for key in schema:
        if OmegaConf.is_missing(schema, key):
            continue
        a, b = ours[key], schema[key]
        if b is None and OmegaConf.is_dict(a) and OmegaConf.get_type(a) is not dict:
            b = OmegaConf.structured(OmegaConf.get_type(a))  # an optional node a default option switches on
        if OmegaConf.is_dict(b):
            out += _differences(a, b, f"{prefix}{key}.")
            continue
        a = OmegaConf.to_container(a) if OmegaConf.is_config(a) else a
        b = OmegaConf.to_container(b) if OmegaConf.is_config(b) else b
        if a != b:
            out.append(f"{prefix}{key}: yaml {a!r} != schema {b!r}")
    return out


def test_schema_defaults_equal_the_default_yaml():
    """One source of defaults: the default run (config.yaml's default options) equals the schema's defaults."""
    from segtrain.config import SegtrainConfig

    assert _differences(composed(), OmegaConf.structured(SegtrainConfig)) == []


def test_schema_default_check_can_fail():
    from segtrain.config import SegtrainConfig

    diffs = _differences(composed("trainer.max_epochs=3"), OmegaConf.structured(SegtrainConfig))
    assert diffs == ["trainer.max_epochs: yaml 3 != schema 12"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["eval.mode=slide", "eval.crop_size=32", "eval.stride=100"], "eval.stride=100 is larger than the window"),
        (["eval.mode=slide", "data.crop_size=48", "eval.stride=[16,64]"], "window data.crop_size=48"),
        (["seed=-1"], "seed must be in [0, 4294967295]"),
        (["seed=99999999999999999999"], "seed must be in [0, 4294967295]"),
        (["data.seed=-3"], "data.seed must be in"),
        (["optimizer.betas=[0.9]"], "optimizer.betas must be [beta1, beta2]"),
        (["optimizer.betas=[0.9,1.5]"], "optimizer.betas must be [beta1, beta2], each in [0, 1), got [0.9, 1.5]"),
        (["data.crop_size=8"], "data.crop_size=8 gives 8 px, fewer than the 16 px model=unet needs"),
        (["data.image_size=[10,12]"], "data.image_size=[10, 12] gives 10 px"),
        (["eval.scales=[0.1,1.0]"], "data.image_size=64 at eval.scales 0.1 gives 6 px"),
        (
            ["data=voc", "data.val_size=16", "eval.scales=[0.5,1.0]"],
            "gives 8 px, fewer than the 16 px model=unet needs (its encoder halves the input 4 times); use "
            "data.val_size >= 32 px, or no eval.scales below 1",
        ),
        (["model=deconvnet", "data.val_size=20"], "data.val_size=20 gives 20 px, fewer than the 32 px"),
        (["model.backbone=vgg16", "data.image_size=24"], "data.image_size=24 gives 24 px, fewer than the 32 px"),
        (["eval.mode=slide", "eval.crop_size=12"], "eval.crop_size=12 gives 12 px"),
        (["data=voc", "data.base_size=8"], "data.base_size=8 gives 8 px"),
        (
            ["data.ignore_index=-100"],
            "data.ignore_index must be in [0, 255] (masks are 8-bit",
        ),  # validation rescales to base_size
        (["loss.class_weights=[a,b,c,d,e,f]"], "loss.class_weights must be numbers >= 0, got ['a', 'b'"),
        (["logger=wandb", "logger.wandb.mode=foo"], "logger.wandb.mode must be offline, online or disabled"),
        (["trainer.early_stop_min_delta=-1"], "trainer.early_stop_min_delta must be >= 0"),
        (["scheduler.warmup_iters=100", "trainer.max_iters=50"], "scheduler.warmup_iters=100 is not below"),
        (["scheduler.min_lr=0.01"], "scheduler.min_lr=0.01 is above optimizer.lr=0.001"),
        (["trainer.overwrite=true", "trainer.resume=auto"], "contradict each other"),
        # own data: binary, bands, statistics, sizes
        (["data.num_classes=1"], "loss.name=ce has ce (a softmax term) but data.num_classes=1"),
        (["data.num_classes=1", "loss.name=bce+focal"], "has focal"),
        (["loss=bce_dice"], "loss.name=bce+dice needs data.num_classes=1"),
        (["data.num_classes=0"], "data.num_classes must be >= 2 (softmax), or 1"),
        (["data.num_classes=1", "loss=bce", "data.class_names=[fg]"], "2 names, background and foreground"),
        (["data.num_classes=1", "loss=bce", "loss.class_weights=[1.0]"], "2 weights"),
        (["data.num_classes=1", "loss=bce", "data.ignore_index=1"], "data.ignore_index=1 is a class id"),
        (["eval.threshold=1.0"], "eval.threshold must be in (0, 1)"),
        (["data=folder", "data.in_channels=4"], "data.mean has 3 values but data.in_channels=4"),
        (["data=folder", "data.in_channels=4", "data.mean=[0.1,0.1,0.1,0.1]"], "data.std has 3 values"),
        (["data=folder", "data.mean=auto", "data.std=[1.0,1.0,1.0]"], "drop data.std=[1.0, 1.0, 1.0]"),
        (["data=folder", "data.mean=mean"], "data.mean must be a list of 3 values or auto"),
        (["data.in_channels=4", "data.mean=auto"], "data=synthetic draws RGB images"),
        (["data.base_size=auto"], "data.base_size=auto needs images on disk"),
        (["data=folder", "data.in_channels=0"], "data.in_channels must be >= 1"),
    ],
)
def test_cross_key_checks_name_the_key(overrides, message):
    error = validation_error(*overrides)
    assert message in error and len(error) < 280 and "\n" not in error


@pytest.mark.parametrize(
    "overrides",
    [
        ["eval.mode=slide", "eval.crop_size=32", "eval.stride=32"],
        ["model=unet", "model.backbone=resnet18", "data.crop_size=8"],  # encoder networks take any size
        ["scheduler.min_lr=0.001"],  # equal to optimizer.lr: a constant schedule
        ["seed=4294967295", "optimizer.betas=[0.0,0.99]"],
        ["eval.scales=[0.25,1.0]"],  # 64 px x 0.25 = 16 px: just enough for the U-Net
    ],
)
def test_cross_key_checks_pass_valid_values(overrides):
    validate(composed(*overrides))


def test_run_length_checks_once_the_data_set_is_known():
    from segtrain.config import check_run_length

    cfg = composed("scheduler.warmup_iters=40")
    check_run_length(cfg, 41)
    with pytest.raises(ConfigError, match="warmup_iters=40 is not below the run's 40 iterations"):
        check_run_length(cfg, 40)  # trainer.max_epochs: the length is known only with the data set
    with pytest.raises(ConfigError, match="fewer than one optimizer step takes: data.batch_size=16 x trainer.acc"):
        check_run_length(cfg, 0, num_train=3, iters_per_epoch=0)
    with pytest.raises(ConfigError, match=r"trainer.accumulate=1 x 2 processes; lower them"):
        check_run_length(cfg, 0, num_train=20, iters_per_epoch=0, world=2)


def test_own_data_keys_that_validate():
    for overrides in (
        ["data.num_classes=1", "loss=bce_dice", "data.class_names=[sky,cloud]", "loss.class_weights=[1.0,3.0]"],
        ["data=folder", "data.in_channels=4", "data.mean=auto"],
        ["data=folder", "data.in_channels=1", "data.mean=[0.5]", "data.std=[0.25]"],
        ["data=folder", "data.std=auto"],
        ["data=voc", "data.base_size=auto"],
    ):
        validate(composed(*overrides))
