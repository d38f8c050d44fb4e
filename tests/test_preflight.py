"""Checks at start: a run that would crash at its first validation fails before the first training step,
and a validation that fails anyway leaves last.pt of the steps done."""

import numpy as np
import pytest
from fake_datasets import write_folder, write_png
from PIL import Image
from test_config import composed

from segtrain import checkpoint
from segtrain.build import build_trainer
from segtrain.errors import ConfigError, DataError

pytestmark = pytest.mark.usefixtures("own_cache")


def folder_data(tmp_path, small: str | None = "img_05", **over) -> list[str]:
    """A folder data set (train: img_00..03, val: img_04, img_05), ``small`` made 12x10 px."""
    root = tmp_path / "data"
    write_folder(root, layout="lists")
    if small:
        for old in (root / "images").glob(f"{small}.*"):
            old.unlink()
        Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(root / "images" / f"{small}.png")
        write_png(root / "masks" / f"{small}.png", np.zeros((10, 12), np.uint8))
    args = {
        "data": "folder",
        "data.root": str(root),
        "data.num_classes": 3,
        "data.crop_size": 32,
        "data.base_size": "null",  # validate at the images' own size (base_size=auto would rescale them)
        "data.batch_size": 2,
        "data.num_workers": 0,
        "model.base_channels": 4,
        "trainer.max_iters": 2,
        "trainer.progress": "false",
        "trainer.num_vis": 0,
        "device": "cpu",
        **over,
    }
    return [f"{k}={v}" for k, v in args.items()]


@pytest.mark.parametrize("small, check", [("img_05", "true"), ("img_04", "false")])
def test_small_validation_image_is_named_before_training(tmp_path, small, check):
    """Found by the label check's sizes (any val image), or else by the dry pass (the first val image)."""
    trainer = build_trainer(composed(*folder_data(tmp_path, small, **{"data.check_labels": check})), tmp_path / "run")
    with pytest.raises(DataError) as e:
        trainer.fit()
    msg = str(e.value)
    assert "validation image" in msg and f"{small}.png is 12x10 px" in msg and "16 px model=unet" in msg, msg
    assert "data.val_size=16" in msg and trainer.step == 0
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_failed_validation_names_the_image_and_keeps_the_steps(tmp_path):
    """Without the label check the sizes are unknown: the dry pass sees img_04 (fine), the first validation
    fails at img_05, and last.pt of the two steps done is written first."""
    args = folder_data(tmp_path, **{"data.check_labels": "false", "trainer.val_interval": 2})
    trainer = build_trainer(composed(*args), tmp_path / "run")
    with pytest.raises(DataError) as e:
        trainer.fit()
    assert "validation image" in str(e.value) and "img_05.png is 12x10 px" in str(e.value)
    assert checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 2


def test_small_validation_image_is_fine_when_validation_rescales(tmp_path):
    """data=folder's default base_size=auto rescales validation images to the training scale."""
    args = folder_data(tmp_path, **{"data.base_size": "auto", "data.val_batch_size": 1})
    build_trainer(composed(*args), tmp_path / "run").fit()
    assert checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 2


def test_unbatchable_validation_images_fail_before_training(tmp_path):
    args = folder_data(tmp_path, small=None, **{"data.val_batch_size": 2})
    with pytest.raises(ConfigError, match="validation images differ in size.*data.val_batch_size=1"):
        build_trainer(composed(*args), tmp_path / "run").fit()
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_dry_validation_runs_the_real_eval_path(tmp_path, monkeypatch):
    from segtrain.hooks import preflight

    seen = []
    real = preflight.evaluate_loader

    def spy(model, batches, *a, **k):
        seen.append((model.training, [tuple(b[0].shape) for b in batches], k.get("criterion") is not None))
        return real(model, batches, *a, **k)

    monkeypatch.setattr(preflight, "evaluate_loader", spy)
    trainer = build_trainer(composed("debug=smoke", "trainer.max_iters=1", "trainer.progress=false"), tmp_path / "run")
    trainer.fit()
    assert seen == [(False, [(1, 3, 64, 64)], True)]  # eval mode, one image, with the loss
    assert trainer.model.training
