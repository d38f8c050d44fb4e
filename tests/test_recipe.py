"""recipe.total_batch and optimizer.lr_scaling (segtrain/recipe.py); the new networks in smoke runs of the Trainer."""

from __future__ import annotations

import logging
import math
import re

import pytest
import torch

from segtrain.config import validate
from segtrain.errors import ConfigError
from segtrain.recipe import optimizer_for_batch
from tests.safetensors_writer import save_safetensors
from tests.test_config import composed

SMOKE = "debug=smoke device=cpu trainer.max_iters=2 data.num_val=4 trainer.num_vis=0 trainer.progress=false logger=[]"
SMOKE = SMOKE.split()


@pytest.mark.parametrize("scaling, factor", [("none", 1.0), ("linear", 0.5), ("sqrt", math.sqrt(0.5))])
def test_lr_scaling_and_the_total_batch_note(caplog, scaling, factor):
    batch = ["data.batch_size=4", "trainer.accumulate=2", f"optimizer.lr_scaling={scaling}"]
    cfg = composed("experiment=ade20k_segformer_b0", *batch)
    validate(cfg)
    with caplog.at_level(logging.INFO, logger="segtrain"):
        opt = optimizer_for_batch(cfg, 1)
    assert opt.lr == pytest.approx(6e-5 * factor) and cfg.optimizer.lr == 6e-5  # the config is not changed
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert (
        "total batch 8 (1 process(es) x data.batch_size 4 x trainer.accumulate 2) is not the recipe's 16" in warnings[0]
    )
    assert "expect to miss its published 37.41 % mIoU" in warnings[0] and "mmsegmentation#1569" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="segtrain"):
        assert optimizer_for_batch(cfg, 2).lr == pytest.approx(6e-5)  # two processes: the published 16
    assert not caplog.records


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["optimizer.lr_scaling=linear"], "recipe.total_batch, which is unset"),
        (["optimizer.lr_scaling=square", "recipe.total_batch=8"], "must be one of none, linear, sqrt"),
        (["recipe.total_batch=0"], "recipe.total_batch must be >= 1"),
    ],
)
def test_recipe_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate(composed(*overrides))


def test_segformer_trains_from_a_safetensors_file_with_a_frozen_encoder(tmp_path, caplog):
    """``segtrain debug=smoke model=segformer model.pretrained=FILE model.freeze_backbone=true`` (in-process, 2
    steps): the encoder ends as it was loaded, the decoder trained, the log says how many parameters train."""
    from segtrain.build import build_trainer
    from segtrain.models.segformer import SegFormer

    torch.manual_seed(3)
    source = SegFormer(6, "b0").state_dict()
    save_safetensors(source, tmp_path / "b0.safetensors")
    cfg = composed(
        *SMOKE, "model=segformer", f"model.pretrained={tmp_path / 'b0.safetensors'}", "model.freeze_backbone=true"
    )
    validate(cfg)
    with caplog.at_level(logging.INFO, logger="segtrain"):
        summary = build_trainer(cfg, tmp_path / "run").fit()
    assert summary["step"] == 2 and 0 <= summary["best_miou"] <= 1
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["model"]
    for k, v in source.items():
        if k.startswith("backbone."):
            assert torch.equal(state[k], v), k
    assert not torch.equal(state["head.classifier.weight"], source["head.classifier.weight"])
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("model segformer:"))
    assert re.search(r"3,715,686 parameters \([\d,]+ train; the frozen encoder's 3,319,392 do not\)", line), line


def test_upernet_trains_with_a_scaled_lr(tmp_path, caplog):
    """``segtrain debug=smoke model=upernet ...`` with a recipe batch of 8 and 4 images: lr x sqrt(1/2), said at start."""
    from segtrain.build import build_trainer

    network = ["model=upernet", "model.backbone=resnet18", "model.head_channels=16"]
    cfg = composed(*SMOKE, *network, "recipe.total_batch=8", "optimizer.lr_scaling=sqrt")
    validate(cfg)
    with caplog.at_level(logging.INFO, logger="segtrain"):
        trainer = build_trainer(cfg, tmp_path / "run")
        assert trainer.optimizer.param_groups[0]["initial_lr"] == pytest.approx(cfg.optimizer.lr * math.sqrt(0.5))
        summary = trainer.fit()
    assert summary["step"] == 2 and 0 <= summary["best_miou"] <= 1
    messages = [r.getMessage() for r in caplog.records]
    assert any("is not the recipe's 8" in m and "optimizer.lr_scaling=sqrt adapts the lr" in m for m in messages)
    assert any(m.startswith("optimizer.lr_scaling=sqrt: lr 0.001 x sqrt(4 / 8) = 0.000707") for m in messages)
