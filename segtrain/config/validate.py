"""Validation of a composed config, in one place and one style: each check raises a one-line
:class:`~segtrain.errors.ConfigError` that names the key and how to fix it.

* :func:`check_command_line`: what the command line asks for (deletions, quoting, keys the schema does not
  know, non-finite numbers, run dirs), before anything is written;
* :func:`validate`: every value and cross-key rule of a training config (``lr > 0``, class weights against
  ``num_classes``, crops against the network's smallest input ...); :func:`validate_app`,
  :func:`validate_predict`, :func:`validate_export`: each command's own keys;
* checks that need what is known later: :func:`check_run_length` (the data set's size) and
  :func:`check_monitor` (its class names); the checks that need the images themselves run in the preflight hook.

The facts they check against live with their domain: the networks in :mod:`segtrain.models`, the data layouts
and label semantics in :mod:`segtrain.data`, the loss terms in :mod:`segtrain.losses`, what a validation logs
in :mod:`segtrain.hooks.base`.  Imports no torch: the command line runs it before anything heavy loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.util
import math
import os
import re
import typing
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, ListConfig, OmegaConf

from segtrain.config.schema import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LR_SCALINGS,
    OPTIMIZERS,
    SCHEDULERS,
)
from segtrain.data import LAYOUTS, mask_classes
from segtrain.errors import ConfigError, missing_extra
from segtrain.hooks.base import VALIDATION_SCALARS
from segtrain.losses import SIGMOID_TERMS, parse_terms
from segtrain.models import NETWORKS, UNSET, min_input_size
from segtrain.utils import as_hw, as_size

# ---------------------------------------------------------------------------
# Validation of values a type cannot express.


def _check(ok: bool, msg: str) -> None:
    """ConfigError ``msg`` (one line naming the key) unless ``ok``."""
    if not ok:
        raise ConfigError(msg)


# ---------------------------------------------------------------------------
# Keys and numbers, anywhere in the config.


@functools.cache
def _fields(schema: type) -> dict[str, type | None]:
    """A schema dataclass's field names, each with the dataclass of its node (None for a value)."""
    hints = typing.get_type_hints(schema)
    return {
        f.name: next(
            (t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if dataclasses.is_dataclass(t)), None
        )
        for f in dataclasses.fields(schema)
    }


@functools.cache
def schema_keys(schema: type, prefix: str = "") -> tuple[str, ...]:
    """Every dotted key of ``schema`` (groups such as ``trainer`` too, and the keys of optional nodes such
    as ``logger.wandb``)."""
    keys: list[str] = []
    for name, sub in _fields(schema).items():
        keys.append(prefix + name)
        if sub is not None:
            keys += schema_keys(sub, f"{prefix}{name}.")
    return tuple(keys)


def _node_at(schema: type | None, key: str) -> type | None:
    """The dataclass of the node at dotted ``key`` of ``schema`` (None for a value)."""
    for part in key.split("."):
        schema = _fields(schema).get(part) if schema is not None else None
    return schema


def nearest_keys(key: str, schema: type) -> list[str]:
    """The schema's keys nearest to a misspelled ``key``: a close name in the same group (``trainer.max_iter``
    -> ``trainer.max_iters``), else the group misspelled (``optimiser.lr``), else the name in another group or
    without one (``lr`` -> ``optimizer.lr``)."""
    keys = [k for k in schema_keys(schema) if _node_at(schema, k) is None]  # values, not groups
    parent, _, leaf = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == parent}
    found = [siblings[m] for m in difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)]
    leaves = difflib.get_close_matches(leaf, {k.rpartition(".")[2] for k in keys}, n=1, cutoff=0.85)
    in_any_group = [k for k in keys if leaves and k.rpartition(".")[2] == leaves[0]][:3]
    if not found and not parent:  # a name without its group: every group that has it
        found = in_any_group
    if not found and parent not in schema_keys(schema):
        found = difflib.get_close_matches(key, keys, n=1, cutoff=0.75)
    return found or in_any_group


def unknown_key(key: str, schema: type) -> str:
    """The one line for a key ``schema`` does not have: the nearest real ones (never Hydra's ``+KEY`` advice:
    an added key would only be ignored)."""
    near = nearest_keys(key, schema)
    guess = f"; did you mean {' or '.join(near)}?" if near else ""
    return f"unknown key {key}{guess} (`--cfg job` prints every key)"


def check_keys(cfg: DictConfig) -> None:
    """ConfigError for a key the schema does not have, however it was given (Hydra's ``+KEY=VALUE`` adds one
    even to a typed config), or a schema key that is gone (``~KEY``).  Nodes typed ``Any`` or ``dict``
    (``data.train_pipeline``, ``data.label_map``, ``loss.weights`` ...) hold what they are given; ``hydra``
    is Hydra's."""
    schema = OmegaConf.get_type(cfg)
    if isinstance(schema, type) and dataclasses.is_dataclass(schema):
        _check_node_keys(cfg, schema, schema, "")


def _check_node_keys(node: DictConfig, schema: type, root: type, prefix: str) -> None:
    fields, keys = _fields(schema), set(node.keys())  # keys(), not `in`: a missing value (???) is no key for `in`
    for key in keys:
        if key not in fields and not (prefix == "" and key == "hydra"):
            raise ConfigError(unknown_key(f"{prefix}{key}", root))
    for name, sub in fields.items():
        if name not in keys:
            raise ConfigError(deletion_error(f"~{prefix}{name}"))
        child = node._get_node(name)
        if sub is not None and isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            _check_node_keys(child, sub, root, f"{prefix}{name}.")


def check_finite(cfg: DictConfig) -> None:
    """ConfigError naming the first number that is nan or +-inf, wherever it is (list items and dict entries
    included, ``hydra`` aside): no setting takes one, and torch would only fail later (``optimizer.lr=inf``:
    a nan loss after a step; ``data.mean=[nan, ...]``: nan images)."""
    items = cfg.items_ex(resolve=False) if isinstance(cfg, DictConfig) else []
    for key, value in items:
        if key != "hydra":
            _check_finite(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value, str(key))


def _check_finite(value: Any, key: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        item = re.fullmatch(r"(.*)\[(\d+)\]", key)  # data.mean[0], data.palette[1][2]
        where = f"{item.group(1)} has {value} (item {item.group(2)})" if item else f"{key}={value}"
        raise ConfigError(
            f"{where}: every number in the config must be finite; set {key.split('[')[0]} to finite values"
        )
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, f"{key}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_finite(v, f"{key}[{i}]")


def deletion_error(item: str) -> str:
    """The one line for ``~KEY`` / ``~GROUP`` on the command line: every part of the config is needed."""
    key = item.lstrip("~").split("=", 1)[0]
    if "." in key:
        fix = f"set {key}=VALUE instead (null where the key allows it)"
    else:
        fix = f"choose another option with {key}=NAME, or change its keys with {key}.KEY=VALUE"
    return f"{item} would delete {key}, but every part of the config is needed: drop {item} and {fix}"


def check_overrides(overrides: list[str]) -> list[str]:
    """The command line's overrides (Hydra's ``overrides.task``): ConfigError for a deletion (``~KEY``,
    ``~GROUP``: every part of the config is needed); warnings for a key given twice (the last one wins)."""
    seen: dict[str, str] = {}
    warnings = []
    for item in overrides:
        key, _, value = item.partition("=")
        if key.startswith("~"):
            raise ConfigError(deletion_error(item))
        key = key.lstrip("+")
        if key in seen and seen[key] != value:
            warnings.append(f"{key} is given twice ({key}={seen[key]}, then {key}={value}): the last one is used")
        seen[key] = value
    return warnings


def check_hydra_dirs(cfg: DictConfig) -> None:
    """``hydra.run.dir`` / ``hydra.sweep.dir`` / ``hydra.sweep.subdir`` given empty (or blank): the run's files
    would go into the working directory (or every job into one dir)."""
    for key in ("hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir"):
        node = OmegaConf.select(cfg, key.rsplit(".", 1)[0])
        if node is None:
            continue
        raw = OmegaConf.to_container(node, resolve=False).get(key.rsplit(".", 1)[1])
        if raw is None or not str(raw).strip():
            fix = {"hydra.run.dir": "a dir, e.g. outputs/exp1", "hydra.sweep.dir": "a dir, e.g. multirun/exp1"}.get(
                key, "a subdir per job, e.g. ${hydra.job.num}"
            )
            raise ConfigError(
                f"{key} is empty, so the files would go into {'one dir' if 'subdir' in key else 'the working dir'}; "
                f"give {key} {fix} (or leave it out for the default)"
            )


def _parses_as(text: str) -> Any:

    try:
        return OverridesParser.create().parse_override(text).value()
    except Exception:  # noqa: BLE001 - any parse failure means: quote it
        return None


def override(key: str, value: str) -> str:
    """``key=value`` as a Hydra override that gives back the string ``value`` exactly: as it is where Hydra's
    grammar reads it so, else in double quotes (with Hydra's escapes).  Not shell-quoted (see shlex.quote)."""
    if "${" not in value and _parses_as(f"{key}={value}") == value:  # ${...}: OmegaConf would interpolate it
        return f"{key}={value}"
    escaped = re.sub(r'(\\*)"', lambda m: m.group(1) * 2 + '\\"', value)  # backslashes before a quote doubled
    escaped = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped).replace("${", "\\${")
    return f'{key}="{escaped}"'


def check_command_line(cfg: DictConfig) -> list[str]:
    """The checks of any command's composed config that need neither its data nor a checkpoint: the
    overrides, keys, numbers and run dirs (the RunDirGuard runs them before the run dir is touched;
    :func:`validate` checks the numbers too).  Returns warnings to print."""
    warnings = []
    if OmegaConf.select(cfg, "hydra.overrides.task") is not None:
        warnings = check_overrides(list(cfg.hydra.overrides.task))
        check_hydra_dirs(cfg)
    check_keys(cfg)
    check_finite(cfg)
    return warnings


MAX_LR = 10.0  # optimizer.lr above this only overflows (a typo such as 1e3 for 1e-3)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_names(cfg: DictConfig) -> None:
    """``model.name``, ``data.name``, ``optimizer.name``, ``scheduler.name`` and the terms and weights of
    ``loss.name`` (checked again where they are built; here before the run dir is touched)."""
    for key, value, names in (
        ("model.name", cfg.model.name, tuple(NETWORKS)),
        ("data.name", cfg.data.name, LAYOUTS),
        ("optimizer.name", cfg.optimizer.name, OPTIMIZERS),
        ("scheduler.name", cfg.scheduler.name, SCHEDULERS),
    ):
        _check(value in names, f"unknown {key} {value!r}; choose one of: {', '.join(sorted(names))}")
    name = cfg.loss.name
    terms = parse_terms(name)
    weights = cfg.loss.weights
    _check(
        weights is None or (isinstance(weights, (dict, DictConfig)) and all(_number(w) for w in weights.values())),
        f"loss.weights must be a weight per term such as {{ce: 1.0, dice: 3.0}}, got {_shown(weights)}",
    )
    weights = dict(weights or {})
    extra = [k for k in weights if k not in terms]
    _check(
        not extra,
        f"loss.weights has {', '.join(map(repr, extra))}, not a term of loss.name={name!r}; give weights for "
        f"{', '.join(terms)} only",
    )
    shown = "{" + ", ".join(f"{k}: {v:g}" for k, v in weights.items()) + "}"
    _check(
        all(w >= 0 for w in weights.values()),
        f"loss.weights={shown} has a negative weight, which training would maximise; use weights >= 0",
    )
    _check(
        sum(weights.get(t, 1.0) for t in terms) > 0,
        f"loss.weights={shown} weighs every term of loss.name={name} 0, so the loss is 0 and nothing trains; give "
        "one term a weight > 0",
    )


def _validate_class_weights(cfg: DictConfig) -> None:
    """``loss.class_weights``: auto, or one non-negative weight per class."""
    d, lo = cfg.data, cfg.loss
    if isinstance(lo.class_weights, str):
        _check(lo.class_weights == "auto", f"loss.class_weights must be a list or 'auto', got {lo.class_weights!r}")
    elif lo.class_weights is not None:
        _check(
            isinstance(lo.class_weights, (list, ListConfig)),
            f"loss.class_weights must be a list or 'auto', got {lo.class_weights!r}",
        )
        _check(
            len(lo.class_weights) == mask_classes(d.num_classes),
            f"loss.class_weights has {len(lo.class_weights)} values but data.num_classes={d.num_classes}"
            + (" (one sigmoid logit: 2 weights, background and foreground)" if d.num_classes == 1 else ""),
        )
        weights = list(lo.class_weights)
        numbers = all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights)
        _check(numbers and all(w >= 0 for w in weights), f"loss.class_weights must be numbers >= 0, got {weights}")
        _check(
            sum(weights) > 0,
            f"loss.class_weights={weights} weighs every class 0, so the loss is 0 at every step; give the classes "
            "weights > 0 (1: as unweighted)",
        )


def validate(cfg: DictConfig, before_plan: bool = False) -> None:
    """Raise ConfigError (one line, naming the key) for an impossible value.  ``before_plan``: the config before the
    plan fills what the user left unset (:func:`segtrain.build.plan_run`): the checks of what the plan may fill
    (the classes of ``data.class_names`` against ``data.num_classes``, ``data.mean`` / ``std`` per band, the loss of
    one sigmoid logit) wait for the planned config, which is checked whole."""

    check_finite(cfg)
    d, o, s, t, lo = cfg.data, cfg.optimizer, cfg.scheduler, cfg.trainer, cfg.loss
    _check(o.lr > 0, f"optimizer.lr must be > 0, got {o.lr}")
    _check(
        o.lr <= MAX_LR,
        f"optimizer.lr={o.lr} is far above any learning rate that trains (SGD ~0.01, AdamW ~1e-4), so the loss "
        f"would only overflow; use optimizer.lr <= {MAX_LR:g}",
    )
    _check(o.weight_decay >= 0, f"optimizer.weight_decay must be >= 0, got {o.weight_decay}")
    _check(0 <= o.momentum < 1, f"optimizer.momentum must be in [0, 1), got {o.momentum}")
    _check(
        d.num_classes >= 1,
        f"data.num_classes must be >= 2 (softmax), or 1 (one sigmoid logit with loss.name=bce+dice), got {d.num_classes}",
    )
    _check(d.batch_size >= 1, f"data.batch_size must be >= 1, got {d.batch_size}")
    _check(
        d.val_batch_size is None or d.val_batch_size >= 1,
        f"data.val_batch_size must be >= 1, got {d.val_batch_size}",
    )
    _check(
        d.num_workers == "auto"
        or (isinstance(d.num_workers, int) and not isinstance(d.num_workers, bool) and 0 <= d.num_workers <= 256),
        f"data.num_workers must be auto or an integer in [0, 256] (loader processes), got {d.num_workers!r}",
    )
    _check(
        0 <= d.ignore_index < 256,
        f"data.ignore_index must be in [0, 255] (masks are 8-bit; padding and unlabelled pixels get it), "
        f"got {d.ignore_index}; use 255",
    )
    _check(
        not (0 <= d.ignore_index < mask_classes(d.num_classes)),
        f"data.ignore_index={d.ignore_index} is a class id (num_classes={d.num_classes}); use 255",
    )
    if d.name == "synthetic":
        for key, split in (("data.train_split", "train"), ("data.val_split", "val")):
            _check(
                d[key.split(".")[1]] == split,
                f"{key}={d[key.split('.')[1]]}: data=synthetic has the splits train and val only; drop {key}",
            )
        _check(d.num_train >= 1, f"data.num_train must be >= 1, got {d.num_train}")
        _check(d.num_val >= 1, f"data.num_val must be >= 1, got {d.num_val}")
        as_hw(d.image_size, "data.image_size")
    if d.crop_size is not None:
        as_hw(d.crop_size, "data.crop_size")
    if d.base_size != "auto":
        as_size(d.base_size, "data.base_size")
    as_size(d.val_size, "data.val_size")
    _check(
        len(d.scale_range) == 2 and 0 < d.scale_range[0] <= d.scale_range[1],
        f"data.scale_range must be [low, high] with 0 < low <= high, got {list(d.scale_range)}",
    )
    _check(0 < d.cat_max_ratio <= 1, f"data.cat_max_ratio must be in (0, 1], got {d.cat_max_ratio}")
    if d.class_names is not None and not before_plan:
        k = mask_classes(d.num_classes)
        _check(
            len(d.class_names) == k,
            f"data.class_names has {len(d.class_names)} names but data.num_classes={d.num_classes}"
            + (" (one sigmoid logit: 2 names, background and foreground)" if d.num_classes == 1 else ""),
        )
    _check(
        0 < d.val_fraction <= 1,
        f"data.val_fraction must be in (0, 1] (the share of the images held out for validation), got {d.val_fraction}",
    )
    _validate_images(d, before_plan)
    _check_names(cfg)
    if not before_plan:
        _validate_binary(cfg)

    _check(s.power > 0, f"scheduler.power must be > 0, got {s.power}")
    _check(s.min_lr >= 0, f"scheduler.min_lr must be >= 0, got {s.min_lr}")
    _check(s.warmup_iters >= 0, f"scheduler.warmup_iters must be >= 0, got {s.warmup_iters}")
    _check(0 < s.warmup_ratio <= 1, f"scheduler.warmup_ratio must be in (0, 1], got {s.warmup_ratio}")

    _validate_class_weights(cfg)
    _check(lo.aux_weight >= 0, f"loss.aux_weight must be >= 0, got {lo.aux_weight}")
    _check(0 <= lo.label_smoothing < 1, f"loss.label_smoothing must be in [0, 1), got {lo.label_smoothing}")
    _check(0 < lo.ohem_thresh <= 1, f"loss.ohem_thresh must be in (0, 1], got {lo.ohem_thresh}")
    _check(lo.ohem_min_kept >= 0, f"loss.ohem_min_kept must be >= 0, got {lo.ohem_min_kept}")
    _check(lo.focal_gamma >= 0, f"loss.focal_gamma must be >= 0, got {lo.focal_gamma}")
    _check(lo.dice_smooth >= 0, f"loss.dice_smooth must be >= 0, got {lo.dice_smooth}")
    _check(o.head_lr_mult > 0, f"optimizer.head_lr_mult must be > 0, got {o.head_lr_mult}")
    _check(
        o.lr * o.head_lr_mult <= MAX_LR,
        f"optimizer.lr={o.lr} x optimizer.head_lr_mult={o.head_lr_mult} gives the decoder an lr far above any that "
        f"trains; keep their product <= {MAX_LR:g}",
    )
    _check(
        lo.focal_alpha is None or 0 <= lo.focal_alpha <= 1,
        f"loss.focal_alpha must be in [0, 1] (or null: off), got {lo.focal_alpha}",
    )
    _check(t.num_vis >= 0, f"trainer.num_vis must be >= 0 (0: no image grid), got {t.num_vis}")
    _check(t.accumulate >= 1, f"trainer.accumulate must be >= 1, got {t.accumulate}")
    _check(t.keep_last >= 0, f"trainer.keep_last must be >= 0, got {t.keep_last}")
    _check(t.stop_at is None or t.stop_at >= 1, f"trainer.stop_at must be >= 1, got {t.stop_at}")
    _validate_monitor_ema(t, cfg.logger)
    e = cfg.eval
    _check(e.mode in ("whole", "slide"), f"eval.mode must be 'whole' or 'slide', got {e.mode!r}")
    _check(len(e.scales) >= 1 and all(v > 0 for v in e.scales), f"eval.scales must be positive, got {list(e.scales)}")
    _check(0 < e.threshold < 1, f"eval.threshold must be in (0, 1), got {e.threshold}")
    _check(
        e.threshold == 0.5 or d.num_classes == 1,
        f"eval.threshold={e.threshold} applies to one sigmoid logit (data.num_classes=1) only; with data.num_classes="
        f"{d.num_classes} each pixel takes its most probable class: drop eval.threshold",
    )
    if e.mode == "slide":
        _check(
            e.crop_size is not None or d.crop_size is not None,
            "eval.mode=slide needs eval.crop_size (or data.crop_size)",
        )
    if e.crop_size is not None:
        as_hw(e.crop_size, "eval.crop_size")
    if e.stride is not None:
        as_hw(e.stride, "eval.stride")

    _check(
        t.max_iters is not None or t.max_epochs is not None,
        "set trainer.max_epochs or trainer.max_iters",
    )
    _check(t.max_iters is None or t.max_iters >= 1, f"trainer.max_iters must be >= 1, got {t.max_iters}")
    _check(
        t.max_epochs is None or t.max_epochs >= 1,
        f"trainer.max_epochs must be >= 1, got {t.max_epochs}",
    )
    _check(
        t.val_interval is None or t.val_interval >= 1,
        f"trainer.val_interval must be >= 1 (or null for every epoch), got {t.val_interval}",
    )
    _check(t.log_interval >= 1, f"trainer.log_interval must be >= 1, got {t.log_interval}")
    _check(t.grad_clip is None or t.grad_clip > 0, f"trainer.grad_clip must be > 0, got {t.grad_clip}")
    check_model(cfg.model)
    _check_seeds_and_optimizer(cfg)
    check_recipe(cfg)
    _check_slide(cfg)
    _check_input_sizes(cfg)
    if t.max_iters is not None:
        check_run_length(cfg, t.max_iters)


def _check_seeds_and_optimizer(cfg: DictConfig) -> None:
    for key, seed in (("seed", cfg.seed), ("data.seed", cfg.data.seed)):
        _check(0 <= seed < 2**32, f"{key} must be in [0, 4294967295] (numpy's seed range), got {seed}")
    o, s, t = cfg.optimizer, cfg.scheduler, cfg.trainer
    betas = list(o.betas)
    _check(
        len(betas) == 2 and all(0 <= b < 1 for b in betas),
        f"optimizer.betas must be [beta1, beta2], each in [0, 1), got {betas}",
    )
    _check(
        s.name == "constant" or s.min_lr <= o.lr,
        f"scheduler.min_lr={s.min_lr} is above optimizer.lr={o.lr}, so the lr would never decay; set "
        f"scheduler.min_lr below optimizer.lr (e.g. scheduler.min_lr=0)",
    )
    _check(
        not (t.overwrite and t.resume == "auto"),
        "trainer.overwrite=true (start over) and trainer.resume=auto (continue) contradict each other; drop one",
    )


def check_run_length(
    cfg: DictConfig, max_iters: int, num_train: int | None = None, iters_per_epoch: int | None = None, world: int = 1
) -> None:
    """Checks against the run's length in iterations (known once the data set is, with trainer.max_epochs)."""
    if iters_per_epoch == 0:
        ranks = f" x {world} processes" if world > 1 else ""
        raise ConfigError(
            f"the training set has {num_train} images, fewer than one optimizer step takes: data.batch_size="
            f"{cfg.data.batch_size} x trainer.accumulate={cfg.trainer.accumulate}{ranks}; lower them"
        )
    w = cfg.scheduler.warmup_iters
    if w and w >= max_iters:
        raise ConfigError(
            f"scheduler.warmup_iters={w} is not below the run's {max_iters} iterations, so the lr would never "
            f"reach optimizer.lr; lower scheduler.warmup_iters or train longer"
        )


def _slide_crop(cfg: DictConfig) -> tuple[str, tuple[int, int]] | None:
    """(key, crop) of the sliding window in eval.mode=slide, else None."""
    e = cfg.eval
    if e.mode != "slide":
        return None
    key = "eval.crop_size" if e.crop_size is not None else "data.crop_size"
    value = e.crop_size if e.crop_size is not None else cfg.data.crop_size
    return (key, as_hw(value, key)) if value is not None else None


def _check_slide(cfg: DictConfig) -> None:
    window = _slide_crop(cfg)
    if window is None or cfg.eval.stride is None:
        return
    key, crop = window
    stride = as_hw(cfg.eval.stride, "eval.stride")
    _check(
        stride[0] <= crop[0] and stride[1] <= crop[1],
        f"eval.stride={_shown(cfg.eval.stride)} is larger than the window {key}={_shown(OmegaConf.select(cfg, key))}, "
        f"so pixels between windows would never be predicted; set eval.stride <= {min(crop)} (or leave it unset: "
        "2/3 of the crop)",
    )


def _shown(value: Any) -> str:
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    return str(list(value)) if isinstance(value, (list, ListConfig)) else str(value)


def smallest_eval_scale(cfg: DictConfig) -> float:
    """The smallest view evaluation makes: 1, or the least of ``eval.scales`` below it (multi-scale)."""
    return min([1.0, *(float(v) for v in cfg.eval.scales)])


def _check_input_sizes(cfg: DictConfig) -> None:
    """Crops and validation sizes against the smallest input the network accepts."""
    need, d = min_input_size(cfg.model), cfg.data
    if need <= 1:
        return
    network = f"model={cfg.model.name}" + ("" if cfg.model.backbone is None else f" ({cfg.model.backbone})")

    def at_least(key: str, value: Any, side: float, how: str = "", scale: float = 1.0) -> None:
        fix = f"use {key} >= {math.ceil(need / scale)} px"
        if scale < 1 and need <= side / scale:  # the size itself is enough: the scale is what is too small
            fix += f", or no eval.scales below {math.ceil(100 * need * scale / side) / 100:g}"
        _check(
            side >= need,
            f"{key}={_shown(value)}{how} gives {int(side)} px, fewer than the {need} px {network} needs "
            f"(its encoder halves the input {need.bit_length() - 1} times); {fix}",
        )

    if d.crop_size is not None:
        at_least("data.crop_size", d.crop_size, min(as_hw(d.crop_size, "data.crop_size")))
    window = _slide_crop(cfg)
    if window is not None:
        at_least(window[0], OmegaConf.select(cfg, window[0]), min(window[1]))
    low = smallest_eval_scale(cfg)
    how = f" at eval.scales {low:g}" if low < 1 else ""
    # the size validation rescales to, as transforms.val_scale picks it (base_size=auto: checked once resolved)
    rescale = None
    if d.val_size is not None:
        rescale = "data.val_size", d.val_size
    elif d.base_size not in (None, "auto") and d.train_pipeline is None and d.name != "synthetic":
        rescale = "data.base_size", d.base_size
    if rescale is not None:
        val = as_size(rescale[1], rescale[0])
        at_least(rescale[0], rescale[1], (val if isinstance(val, int) else min(val)) * low, how, low)
    elif d.name == "synthetic":
        at_least("data.image_size", d.image_size, min(as_hw(d.image_size, "data.image_size")) * low, how, low)


def _validate_monitor_ema(t: DictConfig, lg: DictConfig) -> None:
    """trainer.monitor / early stopping / top-k / EMA, and the logger settings."""
    if not (t.monitor in tuple(VALIDATION_SCALARS) or t.monitor.startswith("val_iou/")):
        raise ConfigError(
            f"trainer.monitor must be {', '.join(tuple(VALIDATION_SCALARS))} or val_iou/<class>, got {t.monitor!r}"
        )
    if t.monitor_mode not in ("auto", "max", "min"):
        raise ConfigError(f"trainer.monitor_mode must be auto, max or min, got {t.monitor_mode!r}")
    if t.early_stop_patience is not None and t.early_stop_patience < 1:
        raise ConfigError(f"trainer.early_stop_patience must be >= 1 (or null: off), got {t.early_stop_patience}")
    if t.early_stop_min_delta < 0:
        raise ConfigError(f"trainer.early_stop_min_delta must be >= 0, got {t.early_stop_min_delta}")
    if t.save_top_k < -1:
        raise ConfigError(f"trainer.save_top_k must be >= 0 (or -1: every validation), got {t.save_top_k}")
    if t.ema_decay is not None and not 0 < t.ema_decay < 1:
        raise ConfigError(f"trainer.ema_decay must be in (0, 1) (e.g. 0.999), or null: off; got {t.ema_decay}")
    if t.ema_warmup is not None and t.ema_warmup < 1:
        raise ConfigError(f"trainer.ema_warmup must be >= 1 (or null: no warm-up), got {t.ema_warmup}")
    if lg.wandb is not None and lg.wandb.mode not in ("offline", "online", "disabled"):
        raise ConfigError(f"logger.wandb.mode must be offline, online or disabled, got {lg.wandb.mode!r}")
    for backend in ("wandb", "mlflow"):  # before anything starts (W&B would otherwise have begun a run)
        if lg[backend] is not None and importlib.util.find_spec(backend) is None:
            raise ConfigError(
                missing_extra(f"logger={backend}", backend, backend, f"or drop {backend} from logger=...")
            )


def require(cfg: DictConfig, usage: str, *keys: str) -> None:
    """ConfigError naming the mandatory keys (``???``) that the command line left unset."""
    missing = [k for k in keys if OmegaConf.is_missing(cfg, k)]
    if missing:
        raise ConfigError(f"missing {', '.join(f'{k}=' for k in missing)}: usage: {usage}")


def validate_app(cfg: DictConfig, name: str, prog: str) -> None:
    """The keys of ``segtrain-eval`` / ``-predict`` / ``-export`` / ``-info`` (primary config ``name``) that
    need no checkpoint, checked before the run dir is touched; the rest once the checkpoint's config is
    merged (:func:`validate`)."""
    if name == "predict":
        validate_predict(cfg)
    elif name == "export":
        validate_export(cfg)
    elif name == "info":
        for key, low in (("batch_size", 1), ("warmup", 0), ("iters", 1)):
            _check(cfg.info[key] >= low, f"info.{key} must be >= {low}, got {cfg.info[key]}")
    if name in ("eval", "predict", "export"):
        _check(
            not OmegaConf.is_missing(cfg, "ckpt") and bool(str(cfg.ckpt).strip()),
            f"no checkpoint given: add ckpt=PATH, e.g. ckpt=outputs/DATE/TIME/checkpoints/best.pt ({prog} --help)",
        )
    # what the checkpoint decides (segtrain.apps.evaluate.merge_config, segtrain.apps.info): refused before the run dir too
    fixed = {
        "eval": ("model", "optimizer", "scheduler", "loss"),
        "predict": ("model", "optimizer", "scheduler", "loss"),
    }
    if name == "info" and cfg.get("ckpt"):
        fixed["info"] = ("model", "data")
    given = [o.split("=", 1)[0].lstrip("+~") for o in OmegaConf.select(cfg, "hydra.overrides.task", default=[]) or []]
    for key in given:
        _check(
            key.split(".", 1)[0] not in fixed.get(name, ()),
            f"{prog} takes {key.split('.', 1)[0]} from the checkpoint; drop the override {key}",
        )


def validate_predict(cfg: DictConfig) -> None:
    """``segtrain-predict``'s own keys (the rest is checked by :func:`validate` on the merged config)."""
    require(cfg, "segtrain-predict ckpt=PATH input=FILE|DIR|GLOB [output=DIR]", "ckpt", "input")
    p = cfg.predict
    if p.batch_size < 1:
        raise ConfigError(f"predict.batch_size must be >= 1, got {p.batch_size}")
    if not 0 <= p.alpha <= 1:
        raise ConfigError(f"predict.alpha must be in [0, 1], got {p.alpha}")
    if not p.extensions:
        raise ConfigError("predict.extensions must list at least one file extension, e.g. [.jpg, .png]")


def validate_export(cfg: DictConfig) -> None:
    """``segtrain-export``'s keys."""
    require(cfg, "segtrain-export ckpt=PATH [format=onnx|torchscript] [output=FILE|FOLDER/]", "ckpt")
    check_finite(cfg)
    if cfg.opset < 18:  # torch.export-based ONNX export writes opset 18 or newer
        raise ConfigError(f"opset must be >= 18 (the exporter writes opset 18 or newer), got {cfg.opset}")
    if cfg.tolerance <= 0:
        raise ConfigError(f"tolerance must be > 0, got {cfg.tolerance}")
    if not cfg.check_sizes:
        raise ConfigError("check_sizes must list at least one [h, w] size, e.g. [[97, 131], [75, 109]]")
    for size in cfg.check_sizes:
        h, w = as_hw(size, "check_sizes")
        if min(h, w) < 32:
            raise ConfigError(
                f"check_sizes: {h}x{w} px is below the exported graph's 32x32 minimum; use sizes of at least 32 px"
            )


def _validate_images(d: DictConfig, before_plan: bool = False) -> None:
    """``data.in_channels``, ``data.mean`` / ``data.std`` (a list per band, or auto) and ``base_size=auto``."""
    c = d.in_channels
    _check(c >= 1, f"data.in_channels must be >= 1, got {c}")
    if d.name == "synthetic":
        _check(c == 3, f"data=synthetic draws RGB images: data.in_channels must be 3, got {c}")
        _check(d.base_size != "auto", "data.base_size=auto needs images on disk; data=synthetic sets data.image_size")
    auto = d.mean == "auto" or d.std == "auto"  # either computes both
    for key, default in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
        value = d[key]
        if isinstance(value, str):
            _check(value == "auto", f"data.{key} must be a list of {c} values or auto, got {value!r}")
            continue
        ok = isinstance(value, (list, ListConfig)) and all(isinstance(v, (int, float)) for v in value)
        _check(ok, f"data.{key} must be a list of {c} values or auto, got {value!r}")
        if auto:
            _check(
                tuple(float(v) for v in value) == default,
                f"data.mean=auto / data.std=auto compute both from the training images: drop data.{key}="
                f"{list(value)}, or give data.mean and data.std both as lists",
            )
            continue
        _check(
            before_plan or len(value) == c,
            f"data.{key} has {len(value)} values but data.in_channels={c}: give {c} values, or data.mean=auto "
            "(mean and std computed from the training images)",
        )
        if key == "std":
            _check(all(v > 0 for v in value), f"data.std must be > 0, got {list(value)}")


def _validate_binary(cfg: DictConfig) -> None:
    """One sigmoid logit (``data.num_classes=1``) goes with ``bce`` / ``dice`` terms, and ``bce`` with it."""
    terms = [t.strip() for t in str(cfg.loss.name).split("+")]
    k = cfg.data.num_classes
    if k == 1:
        bad = [t for t in terms if t not in SIGMOID_TERMS]
        _check(
            not bad,
            f"loss.name={cfg.loss.name} has {bad[0] if bad else ''} (a softmax term) but data.num_classes=1 trains "
            "one sigmoid logit: use loss.name=bce+dice (or bce, dice), or data.num_classes=2 for a softmax",
        )
    else:
        _check(
            "bce" not in terms,
            f"loss.name={cfg.loss.name} needs data.num_classes=1 (one sigmoid logit); with data.num_classes={k} "
            "use ce (softmax)",
        )


def check_monitor(monitor: str, class_names: list[str]) -> None:
    """``trainer.monitor`` against the values a validation of this data set logs (its classes known)."""
    keys = [*VALIDATION_SCALARS, *(f"val_iou/{n}" for n in class_names)]
    more = " ..." if len(class_names) > 8 else ""
    _check(
        monitor in keys,
        f"trainer.monitor={monitor} is not a validation value; choose one of: {', '.join(VALIDATION_SCALARS)}, "
        f"val_iou/<class> (classes: {', '.join(class_names[:8])}{more})",
    )


def check_model(m: DictConfig) -> None:
    """The ``model`` config's values, and no key set that the network does not read (``segtrain.models.NETWORKS``:
    a key left unread would be silently ignored).  Called again by ``build_model``."""
    _check(m.name in NETWORKS, f"unknown model.name {m.name!r}; choose one of: {', '.join(sorted(NETWORKS))}")
    _check(
        m.output_stride in (None, 8, 16, 32),
        f"model.output_stride must be 8, 16 or 32, got {m.output_stride}",
    )
    _check(0 <= m.dropout < 1, f"model.dropout must be in [0, 1), got {m.dropout}")
    _check(m.base_channels >= 1, f"model.base_channels must be >= 1, got {m.base_channels}")
    _check(m.head_channels is None or m.head_channels >= 1, f"model.head_channels must be >= 1, got {m.head_channels}")
    _check(m.norm in ("bn", "none"), f"model.norm must be 'bn' or 'none', got {m.norm!r}")
    _check(
        isinstance(m.pretrained, (bool, str)) and m.pretrained != "",
        f"model.pretrained must be true, false or the PATH of a weights file, got {m.pretrained!r}",
    )
    _check(
        not isinstance(m.pretrained, str) or os.path.exists(os.path.expanduser(m.pretrained)),
        f"model.pretrained={m.pretrained}: no such file or folder; give true, false or the PATH of a weights file",
    )
    reads = set(NETWORKS[m.name])
    if m.name == "unet" and m.backbone is None:  # the from-scratch U-Net: no encoder to set up
        _check(not m.pretrained, "model.pretrained needs an ImageNet encoder: set model.backbone (e.g. resnet18)")
        reads -= {"output_stride", "freeze_backbone"}
    for key, unset in UNSET.items():
        value = m[key]
        shown = str(value).lower() if isinstance(value, bool) else value
        _check(key in reads or value == unset, f"model.{key}={shown} is not used by model={m.name}; remove it")


def check_recipe(cfg: DictConfig) -> None:
    """``optimizer.lr_scaling`` and ``recipe.*``: ConfigError (one line) for an impossible value."""
    scaling, r = cfg.optimizer.lr_scaling, cfg.recipe
    if scaling not in LR_SCALINGS:
        raise ConfigError(f"optimizer.lr_scaling must be one of {', '.join(LR_SCALINGS)}, got {scaling!r}")
    if r.total_batch is not None and r.total_batch < 1:
        raise ConfigError(f"recipe.total_batch must be >= 1, got {r.total_batch}")
    if scaling != "none" and r.total_batch is None:
        raise ConfigError(
            f"optimizer.lr_scaling={scaling} scales the lr by the total batch over recipe.total_batch, which is unset: "
            "set recipe.total_batch=N (the batch optimizer.lr was tuned for), or use a recipe (experiment=...)"
        )
