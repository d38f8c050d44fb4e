"""The scale rule (validation at the training scale), the scale report and its warnings, and the standard
pipelines on images of any bands and bit depth (segtrain.data.transforms)."""

import logging

import albumentations as A
import numpy as np
import pytest
from fake_datasets import data_cfg, write_folder, write_voc

from segtrain.data import transforms as T
from segtrain.data.build import build_datasets
from segtrain.errors import ConfigError

pytestmark = pytest.mark.usefixtures("own_cache")


def rescale_of(pipeline) -> object:
    return None if pipeline is None else pipeline.transforms[0].size


# --- the rule -------------------------------------------------------------------------------------------


def test_val_scale_rule():
    assert T.val_scale(data_cfg("voc")) == (512, 2048)  # val_size null: the training scale, base_size
    assert T.val_scale(data_cfg("cityscapes")) == (1024, 2048)
    assert T.val_scale(data_cfg("voc", val_size=400)) == 400  # an explicit val_size wins
    assert T.val_scale(data_cfg("voc", base_size=None)) is None  # own size for both
    assert T.val_scale(data_cfg("voc", train_pipeline=[{"_target_": "albumentations.HorizontalFlip"}])) is None
    assert T.val_scale(data_cfg("synthetic", base_size=64)) is None  # synthetic ignores base_size
    with pytest.raises(ConfigError, match="base_size=auto"):
        T.val_scale(data_cfg("folder"))  # auto must be resolved from the images first


def test_voc_validates_at_the_training_scale_and_warns_on_small_images(tmp_path, caplog):
    write_voc(tmp_path)  # 48-90 px pictures
    caplog.set_level(logging.INFO, logger="segtrain")
    train, val, _ = build_datasets(data_cfg("voc", tmp_path, crop_size=128), seed=0)
    assert rescale_of(val.transform) == (512, 2048) == train.transform.transforms[0].size
    img, mask = val[0]
    assert img.shape[1] == 512 and mask.shape == val.load(0)[1].shape  # scored at the original mask size
    text = caplog.text
    assert "scale: the median training image (62x76 px" in text and "validated at 8.26x" in text
    assert "validation sees" not in text  # no mismatch: both at base_size
    assert "enlarges the median training image (62x76 px) 8.3x" in text and "data.base_size=auto" in text
    # the fix the warning names: base_size=auto; then a 128 crop is larger than the images
    caplog.clear()
    cfg = data_cfg("voc", tmp_path, crop_size=128, base_size="auto")
    _, val, cfg = build_datasets(cfg, seed=0)
    assert list(cfg.base_size) == [56, 76] and rescale_of(val.transform) == (56, 76)  # median short, long sides
    assert "enlarges" not in caplog.text and "try data.crop_size=32" in caplog.text


def test_mismatched_val_size_warns_with_the_override(tmp_path, caplog):
    write_voc(tmp_path)
    with caplog.at_level(logging.WARNING, logger="segtrain"):
        build_datasets(data_cfg("voc", tmp_path, base_size=None, val_size=200), seed=0)
    warnings = [r.getMessage() for r in caplog.records if "validation sees" in r.getMessage()]
    assert len(warnings) == 1 and "set data.val_size=null to validate at the training scale" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="segtrain"):  # scale_range centred on 0.71: the centre is named
        build_datasets(data_cfg("voc", tmp_path, base_size=None, scale_range=[0.5, 1.0]), seed=0)
    assert "set data.val_size=44 to validate" in caplog.text  # the median image's short side 62 px x 0.71


def test_folder_defaults_to_the_median_size(tmp_path):
    write_folder(tmp_path, n=6, layout="lists")  # train: 61x83, 50x70, 64x48, 72x90
    cfg = data_cfg("folder", tmp_path, num_classes=3)
    assert cfg.base_size == "auto"
    train, val, resolved = build_datasets(cfg, seed=0)
    assert cfg.base_size == "auto" and list(resolved.base_size) == [56, 76]  # resolved in a new config
    assert train.transform.transforms[0].size == (56, 76) and rescale_of(val.transform) == (56, 76)
    cfg = data_cfg("folder", tmp_path, base_size=None, num_classes=3)
    _, val, _ = build_datasets(cfg, seed=0)
    assert val.transform is None  # own size for both


# --- pipelines on any bands and bit depths ----------------------------------------------------------------


@pytest.mark.parametrize("dtype, bands", [(np.uint16, 1), (np.float32, 13), (np.uint8, 4)])
def test_standard_pipeline_on_c_band_images(dtype, bands):
    cfg = data_cfg("voc", base_size=[48, 64], crop_size=40)
    pipe = T.standard_train(cfg, colour=False)
    assert not any(isinstance(t, A.ColorJitter) for t in pipe.transforms)
    image = (np.random.default_rng(0).random((50, 70, bands)) * 1000).astype(dtype)
    out = pipe(image=image, mask=np.zeros((50, 70), np.uint8))
    assert out["image"].dtype == dtype and out["image"].shape[:2] == (40, 40) and out["mask"].shape == (40, 40)
    assert any(isinstance(t, A.ColorJitter) for t in T.standard_train(cfg, colour=True).transforms)


def test_photometric_only_for_3_band_8_bit(tmp_path):
    from fake_datasets import write_tiff_folder

    pytest.importorskip("tifffile")
    write_tiff_folder(tmp_path / "t", n=4, bands=3)
    train, _, _ = build_datasets(data_cfg("folder", tmp_path / "t", mean="auto"), seed=0)  # 3-band uint16
    assert not any(isinstance(t, A.ColorJitter) for t in train.transform.transforms)
    image, _ = train[(0, 0)]
    assert image.dtype.is_floating_point is False and str(image.dtype) == "torch.uint16" and image.shape[0] == 3
    write_folder(tmp_path / "rgb", n=4)
    train, _, _ = build_datasets(data_cfg("folder", tmp_path / "rgb", num_classes=3), seed=0)
    assert any(isinstance(t, A.ColorJitter) for t in train.transform.transforms)


def test_a_pipeline_that_does_not_fit_the_images_is_one_line_naming_the_file(tmp_path):
    from fake_datasets import data_cfg, write_folder

    from segtrain.data.build import build_datasets
    from segtrain.errors import DataError

    write_folder(tmp_path)  # images of about 60-90 px
    crop = [{"_target_": "albumentations.RandomCrop", "height": 256, "width": 256}]
    train, _, _ = build_datasets(data_cfg("folder", tmp_path, num_classes=3, train_pipeline=crop), seed=0)
    with pytest.raises(DataError, match=r"the pipeline failed on .*img_0.*CropSizeError.*PadIfNeeded") as e:
        train[0]
    assert "\n" not in str(e.value)
