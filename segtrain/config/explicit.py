"""The keys a user set: what the plan (:mod:`segtrain.data.plan`) never changes.

``explicit_keys(overrides, config_dirs)`` reads the command line's overrides and the config files of the options it
chose: a dotted key is explicit; ``experiment=X`` / ``debug=X`` make every key their file sets explicit (and every
key of the options they select: a recipe is complete); ``loss=X`` its name and values; a data config of the user's
all its keys, while segtrain's own layouts (``data=voc`` ...) are recipes that the plan keeps while the data fits
them.  Torch-free.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from segtrain.config.schema import SegtrainConfig

# the keys of each group of the schema (the defaults of a recipe's options are part of the recipe)
SCHEMA_GROUPS = {
    group: tuple(node.keys())
    for group, node in OmegaConf.structured(SegtrainConfig).items()
    if OmegaConf.is_dict(node) and not OmegaConf.is_missing(OmegaConf.structured(SegtrainConfig), group)
}

GROUPS = ("model", "data", "optimizer", "scheduler", "loss", "device", "trainer", "logger", "eval")


RECIPE_GROUPS = ("experiment", "debug")  # # @package _global_ files: every key they set is explicit


def _flatten(d: Any, prefix: str = "") -> set[str]:
    if not isinstance(d, dict) or not d:
        return {prefix.rstrip(".")} if prefix else set()
    out: set[str] = set()
    for k, v in d.items():
        if k in ("defaults", "hydra"):
            continue
        out |= _flatten(v, f"{prefix}{k}.")
    return out


def _load_yaml(path: Path) -> dict:

    data = yaml.safe_load(path.read_text()) or {}
    return data if isinstance(data, dict) else {}


def _find(config_dirs: list[Path], group: str, option: str) -> tuple[Path | None, bool]:
    """(the option's yaml, whether it is segtrain's own: in the first of ``config_dirs``)."""
    for k, d in enumerate(config_dirs):
        path = d / group / f"{option}.yaml"
        if path.is_file():
            return path, k == 0
    return None, False


def _option_keys(group: str, option: str, config_dirs: list[Path], complete: bool = False) -> set[str]:
    """The keys a group choice makes explicit (see :func:`explicit_keys`); ``complete``: every key the option's
    file sets, null ones too (the options a recipe selects are part of the recipe)."""
    if option in ("null", "None", ""):
        return set()
    path, shipped = _find(config_dirs, group, option)
    if group in RECIPE_GROUPS:
        if path is None:
            return set()
        data = _load_yaml(path)
        keys = _flatten(data)
        for entry in data.get("defaults") or []:
            if isinstance(entry, dict):
                for k, v in entry.items():
                    sub = str(k).replace("override", "").strip().strip("/")
                    if sub in GROUPS:
                        keys |= _option_keys(sub, str(v), config_dirs, complete=True)
        return keys
    if group == "data":
        if path is None:  # a data config segtrain cannot read here: every data key is the user's
            return {"data"}
        return {"data.name"} if shipped else {"data.name"} | {f"data.{k}" for k in _flatten(_load_yaml(path))}
    keys = {f"{group}.name"} if group in ("model", "loss", "optimizer", "scheduler") else set()
    if complete and group in SCHEMA_GROUPS:  # a recipe's option: every key of its group, the schema's defaults too
        return keys | {f"{group}.{k}" for k in SCHEMA_GROUPS[group]}
    if path is not None and group == "loss":  # a loss option's own values
        keys |= {f"{group}.{k}" for k, v in _load_yaml(path).items() if v is not None}
    return keys


def explicit_keys(task_overrides: Iterable[str], config_dirs: Iterable[str | Path]) -> set[str]:
    """The keys that count as set by the user, for :func:`make_plan`'s ``user_set``.

    ``task_overrides``: the command line's overrides (``HydraConfig.get().overrides.task``); ``config_dirs``:
    segtrain's config dir first (``segtrain.config.config_dir()``), then any of the user's.  A dotted key
    (``data.crop_size=96``) is explicit; ``experiment=X`` / ``debug=X`` make every key their file sets
    explicit, with every key of the options they select (a recipe is complete: its loss has no class weights
    unless it says so); ``loss=X`` makes ``loss.name`` and the values its file sets
    explicit; ``data=X`` of a data config of the user's makes all its keys explicit, while segtrain's own
    layouts (``data=voc`` ...) are recipes that the plan keeps while the data fits them.  An entry may be a
    prefix (``data``: every data key)."""
    dirs = [Path(d) for d in config_dirs]
    keys: set[str] = set()
    for item in task_overrides:
        key, _, value = str(item).partition("=")
        key = key.lstrip("+~").strip()
        if key == "hydra" or key.startswith("hydra.") or key.startswith("hydra/"):
            continue
        if key in GROUPS or key in RECIPE_GROUPS:
            keys |= _option_keys(key, value.strip(), dirs)
        else:
            keys.add(key)
    return keys
