"""segtrain-eval takes the scale rule and the computed ``auto`` values from the checkpoint's stored config
(segtrain.evaluate, run in-process through its Hydra entry point)."""

import json
import sys

import pytest
import torch
from fake_datasets import write_voc
from test_config import composed

from segtrain.config import validate


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGTRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # run_hydra_app sets it; monkeypatch restores it
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def segtrain_eval(monkeypatch, tmp_path, name: str, *args: str) -> dict:
    from segtrain.evaluate import main

    out = tmp_path / name
    argv = ["segtrain-eval", *args, f"hydra.run.dir={out}", "trainer.progress=false", "device=cpu"]
    monkeypatch.setattr(sys, "argv", argv)
    main()
    return json.loads((out / "metrics.json").read_text())


def test_eval_validates_at_the_checkpoints_training_scale(tmp_path, monkeypatch):
    from segtrain.trainer import Trainer

    write_voc(tmp_path / "voc", n_train=4, n_val=2)
    cfg = composed(
        "data=voc", f"data.root={tmp_path / 'voc'}", "data.base_size=auto", "data.mean=auto", "data.crop_size=32",
        "data.batch_size=2", "data.num_workers=0", "model.base_channels=4", "trainer.max_iters=2",
        "trainer.val_interval=2", "trainer.progress=false", "device=cpu",
    )  # fmt: skip
    validate(cfg)
    summary = Trainer(cfg, tmp_path / "run").fit()
    ckpt = tmp_path / "run" / "checkpoints" / "best.pt"

    m = segtrain_eval(monkeypatch, tmp_path, "eval", f"ckpt={ckpt}")
    assert m["val_scale"] == [56, 76]  # the median training size, from the checkpoint (no auto left there)
    assert m["miou"] == pytest.approx(summary["best_miou"], abs=1e-6)  # the same scale as validation in training

    m = segtrain_eval(monkeypatch, tmp_path, "eval_val_size", f"ckpt={ckpt}", "data.val_size=40")
    assert m["val_scale"] == 40  # an explicit data.val_size wins
    m = segtrain_eval(monkeypatch, tmp_path, "eval_auto", f"ckpt={ckpt}", "data.mean=auto", "data.base_size=auto")
    assert m["val_scale"] == [56, 76] and m["miou"] == pytest.approx(summary["best_miou"], abs=1e-6)
