import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from segtrain.config import config_dir, register_configs, validate
from segtrain.errors import ConfigError
from segtrain.utils import as_hw


def composed(*overrides, app: str = "config", hydra: bool = False):
    """The composed config of ``configs/APP.yaml`` (config: segtrain's; eval, predict, export, info) with
    ``overrides`` (``hydra``: with the hydra node, as a Hydra callback gets it)."""
    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(app, overrides=list(overrides), return_hydra_config=hydra)


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
        # hostile values (issue 21): refused before the first step, naming the key
        (["optimizer.lr=inf"], "optimizer.lr=inf: every number in the config must be finite"),
        (["data.mean=[nan,0.5,0.5]"], "data.mean has nan (item 0): every number in the config must be finite"),
        (["data.label_map={255:-inf}"], "data.label_map.255=-inf: every number"),
        (["optimizer.lr=1e308"], "optimizer.lr=1e+308 is far above any learning rate that trains"),
        (["loss.name=ce+dice", "loss.weights={ce:-1,dice:1}"], "loss.weights={ce: -1, dice: 1} has a negative weight"),
        (["loss.weights={ce:0}"], "weighs every term of loss.name=ce 0, so the loss is 0"),
        (["loss.weights={dice:3}"], "loss.weights has 'dice', not a term of loss.name='ce'"),
        (["loss.weights={ce:abc}"], "loss.weights must be a weight per term such as {ce: 1.0, dice: 3.0}"),
        (["loss.class_weights=[0,0,0,0,0,0]"], "weighs every class 0, so the loss is 0 at every step"),
        (["eval.threshold=0.3"], "eval.threshold=0.3 applies to one sigmoid logit (data.num_classes=1) only"),
        (["data.val_fraction=1.5"], "data.val_fraction must be in (0, 1]"),
        (["data.val_split=nonexistent"], "data=synthetic has the splits train and val only"),
        (["model.name=segnetz"], "unknown model.name 'segnetz'; choose one of: deconvnet"),
        (["optimizer.name=lion"], "unknown optimizer.name 'lion'; choose one of: adamw, sgd"),
        (["loss.name=ce+lovasz"], "unknown loss term 'lovasz'"),
        (["eval.scales=[0.01]"], "gives 0 px, fewer than the 16 px model=unet needs (its encoder halves the input 4 "),
        (["eval.scales=[0.01]"], "use data.image_size >= 1600 px, or no eval.scales below 0.25"),
        (["optimizer.head_lr_mult=1e5"], "optimizer.lr=0.001 x optimizer.head_lr_mult=100000.0 gives the decoder"),
        (["loss=focal", "loss.focal_alpha=2"], "loss.focal_alpha must be in [0, 1]"),
        (["trainer.num_vis=-1"], "trainer.num_vis must be >= 0"),
        (["data.num_workers=100000"], "data.num_workers must be auto or an integer in [0, 256]"),
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
        ["data.num_classes=1", "loss=bce_dice", "eval.threshold=0.3"],  # one sigmoid logit: the threshold applies
        ["loss.name=ce+dice", "loss.weights={ce:0,dice:3}"],  # one term off is fine
        ["optimizer.lr=10"],
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


# --- keys and numbers anywhere, in every command's schema (issue 21) ----------------------------------------------


@pytest.mark.parametrize(
    "app, overrides, message",
    [
        ("config", ["+new_key=1"], "unknown key new_key (`--cfg job` prints every key)"),
        ("config", ["+trainer.foo=1"], "unknown key trainer.foo ("),
        ("config", ["+trainer.max_iter=5"], "unknown key trainer.max_iter; did you mean trainer.max_iters?"),
        ("config", ["+logger.tensorboard.dirr=x"], "did you mean logger.tensorboard.dir?"),
        ("config", ["+data.train_pipeline.p=1", "data.train_pipeline={}"], None),  # an open node: any key
        ("eval", ["ckpt=x", "+eval.scale=[1.0]"], "unknown key eval.scale; did you mean eval.scales?"),
        ("predict", ["ckpt=x", "input=y", "+predict.batchsize=2"], "did you mean predict.batch_size?"),
        ("export", ["ckpt=x", "+tolerence=0.1"], "unknown key tolerence; did you mean tolerance?"),
        ("info", ["+info.iter=3"], "did you mean info.iters?"),
        # a number that is not finite, in any command's keys (list items and dict entries too)
        ("eval", ["ckpt=x", "eval.scales=[1.0,inf]"], "eval.scales has inf (item 1): every number in the config"),
        ("predict", ["ckpt=x", "input=y", "predict.alpha=nan"], "predict.alpha=nan: every number"),
        ("export", ["ckpt=x", "tolerance=-inf"], "tolerance=-inf: every number"),
        ("info", ["info.size=[nan,64]"], "info.size has nan (item 0)"),
        (
            "config",
            ["data.palette=[[0,0,nan]]"],
            "data.palette[0] has nan (item 2): every number in the config must be finite; set data.palette to",
        ),
    ],
)
def test_every_command_refuses_unknown_keys_and_non_finite_numbers(app, overrides, message):
    from segtrain.config import check_command_line

    cfg = composed(*overrides, app=app)
    if message is None:
        check_command_line(cfg)
        return
    with pytest.raises(ConfigError) as e:
        check_command_line(cfg)
    assert message in str(e.value) and "+" not in str(e.value), str(e.value)  # never Hydra's "+KEY" advice


def test_open_nodes_take_what_they_hold():
    """Keys that hold free-form values keep working: albumentations dicts, label maps, per-term loss weights."""
    from segtrain.config import check_command_line

    cfg = composed(
        "data=folder",
        "data.root=/data",
        "data.train_pipeline=[{_target_: albumentations.HorizontalFlip, p: 0.5}]",
        "data.label_map={255:1}",
        "data.num_classes=2",
        "data.palette=[[0,0,0],[255,0,0]]",
        "loss.name=ce+dice",
        "loss.weights={ce:1,dice:3}",  # into a null node: merged (a typed dict node would refuse)
    )
    check_command_line(cfg)
    validate(cfg)
    assert cfg.loss.weights == {"ce": 1, "dice": 3} and cfg.data.label_map == {255: 1}
    cfg = composed("loss=ce_dice", "loss.weights={dice:3}")  # into the option's dict: one weight changed
    validate(cfg)
    assert cfg.loss.weights == {"ce": 1.0, "dice": 3}


def test_deletions_and_repeated_keys_on_the_command_line():
    from segtrain.config import check_overrides

    for item in ("~trainer", "~model", "~model.backbone"):
        with pytest.raises(ConfigError, match=f"{item} would delete") as e:
            check_overrides(["debug=smoke", item])
        assert "every part of the config is needed" in str(e.value)
    warnings = check_overrides(["trainer.max_iters=2", "+trainer.max_iters=3", "seed=1", "seed=1"])
    assert warnings == [
        "trainer.max_iters is given twice (trainer.max_iters=2, then trainer.max_iters=3): the last one is used"
    ]


@pytest.mark.parametrize("key", ["hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir"])
def test_empty_run_dirs_are_refused(key):
    from segtrain.config import check_command_line

    with pytest.raises(ConfigError, match=f"{key} is empty, so the files would go into"):
        check_command_line(composed(f"{key}=", hydra=True))
    with pytest.raises(ConfigError, match=f"{key} is empty"):
        check_command_line(composed(f"{key}='  '", hydra=True))


def test_nearest_keys():
    from segtrain.config import EvalAppConfig, SegtrainConfig, nearest_keys

    for typo, near in [
        ("trainer.max_iter", ["trainer.max_iters"]),
        ("optimiser.lr", ["optimizer.lr"]),  # the group misspelled
        ("lr", ["optimizer.lr"]),  # no group
        ("crop_size", ["data.crop_size", "eval.crop_size"]),
        ("trainer.lr", ["optimizer.lr"]),  # the wrong group
        ("optimizer.a", []),  # nothing near: no guess
        ("trainer.foo", []),
    ]:
        assert nearest_keys(typo, SegtrainConfig) == near, typo
    assert nearest_keys("chkpt", EvalAppConfig) == ["ckpt"]


def test_override_quotes_what_hydra_would_misread():
    """config.override gives back the exact string through Hydra's parser, and through the shell with
    shlex.quote: a real segtrain command (--cfg job, no training) receives the values as they were."""
    from segtrain.config import override

    values = {
        "data.root": "/data/données x",
        "run_dir": "runs/my run=1",
        "trainer.resume": "a,b",
        "model.init_from": "it's",
        "logger.wandb.project": 'q"x',
        "logger.wandb.entity": "C:\\dir\\",
        "logger.wandb.name": "x#y",
        "logger.wandb.group": "null",
        "data.val_split": "123",
        "data.train_split": "/p/${x}",
    }
    assert override("data.root", values["data.root"]) == 'data.root="/data/données x"'
    assert override("k", "plain/path") == "k=plain/path"
    args = ["logger=wandb", *(override(k, v) for k, v in values.items()), "--cfg", "job"]
    cmd = f"{shlex.quote(sys.executable)} -m segtrain {' '.join(shlex.quote(a) for a in args)}"
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = OmegaConf.create(proc.stdout)
    assert {k: OmegaConf.select(got, k) for k in values} == values


def test_default_options_only_select():
    """Each default is stated once, in the schema: the default option of every group (config.yaml's defaults
    list) selects itself and sets no value of its own."""
    import yaml

    root = Path(config_dir())
    defaults = yaml.safe_load((root / "config.yaml").read_text())["defaults"]
    chosen = [(group, option) for d in defaults if isinstance(d, dict) for group, option in d.items()]
    chosen = [(g, o) for g, o in chosen if o is not None and not g.startswith(("override", "experiment", "debug"))]
    assert len(chosen) >= 8, chosen
    selectors = {"name", "type"}
    for group, option in chosen:
        values = yaml.safe_load((root / group / f"{option}.yaml").read_text()) or {}
        stated = {k: v for k, v in values.items() if k not in selectors and v not in ({}, None)}
        assert not stated, f"{group}/{option}.yaml states {stated}: give defaults in segtrain/config/schema.py"
