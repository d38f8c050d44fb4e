"""``segtrain-data inspect data=NAME data.root=PATH [overrides]``: the data card of a data set.

The overrides compose the same config as ``segtrain`` (``data=folder data.root=... data.in_channels=4``,
``device.precision=bf16`` ...).  It prints the fingerprint (:mod:`segtrain.data.fingerprint`) and the plan
(:mod:`segtrain.data.plan`) in a few lines, and writes the data card (:func:`segtrain.data.card.write_card`)
to ``--out`` (default ``data_card.png``).  Errors are one line (``segtrain-data: error: ...``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import DictConfig

from segtrain.errors import ConfigError


def compose_config(overrides: list[str]) -> DictConfig:
    """The ``segtrain`` config for ``overrides`` (Hydra's compose API: no run dir, no logging set-up)."""
    from hydra import compose, initialize_config_dir

    from segtrain.cli import config_dir
    from segtrain.config import register_configs

    register_configs()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return compose("config", overrides=list(overrides))
    except Exception as e:  # Hydra / OmegaConf: a misspelled key, an unknown option, a bad value
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        msg = lines[0] if lines else type(e).__name__
        raise ConfigError(f"{msg} (`segtrain --cfg job` prints every key, `segtrain --help` every option)") from None


def inspect(
    overrides: list[str], out: str | Path = "data_card.png", max_images: int | None = None, as_json: bool = False
) -> dict:
    """Compose the config, fingerprint the data, plan, print, write the card; returns {fingerprint, plan, card}."""
    from segtrain.cli import config_dir
    from segtrain.data.card import card_samples, write_card
    from segtrain.data.fingerprint import MAX_IMAGES, compute_fingerprint, datasets_for, declared_classes, describe
    from segtrain.data.plan import describe_device, explicit_keys, make_plan

    if not any(o.split("=", 1)[0] == "data" for o in overrides):
        raise ConfigError("name the data set: segtrain-data inspect data=NAME data.root=PATH [data.KEY=VALUE ...]")
    cfg = compose_config(overrides)
    d = cfg.data
    train, val = datasets_for(d, cfg.seed)
    fp = compute_fingerprint(
        train,
        val,
        name=str(d.name),
        in_channels=int(d.in_channels),
        ignore_index=int(d.ignore_index),
        max_images=max_images or MAX_IMAGES,
        declared=declared_classes(d) if d.name == "folder" else None,
    )
    device = describe_device(cfg.device, cfg.model, int(d.in_channels), int(d.num_classes))
    plan = make_plan(
        fp, d, cfg.loss, cfg.model, explicit_keys(overrides, [config_dir()]), device, cfg_trainer=cfg.trainer
    )
    root = d.get("root")
    title = f"data card: data={d.name}" + (f" data.root={root}" if root else "")
    path = write_card(fp, plan, card_samples(train if train is not None else val), out, title)
    if as_json:
        print(json.dumps({"fingerprint": fp, "plan": plan.to_dict(), "card": str(path)}))
    else:
        for line in describe(fp) + plan.lines():
            print(line)
        print(f"data card: {path}")
    sys.stdout.flush()
    return {"fingerprint": fp, "plan": plan, "card": path}
