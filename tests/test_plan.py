"""The training plan (segtrain.data.plan): each rule's choice and reason on real data sets unlike segtrain's
recipes, explicit settings winning, and the recipes (VOC-sized photos, the built-in data set, the published
experiments) resolving exactly as without a plan."""

import copy
import logging
import math

import numpy as np
import pytest
import torch
from fake_datasets import write_cityscapes, write_folder, write_voc
from fake_own_data import write_binary_95_5, write_nuclei16, write_photos, write_voc_photos
from omegaconf import OmegaConf
from test_config import composed

from segtrain.config import IMAGENET_MEAN, IMAGENET_STD, config_dir
from segtrain.config.explicit import explicit_keys
from segtrain.data.fingerprint import fingerprint
from segtrain.data.plan import (
    Plan,
    autocast_step,
    describe_device,
    make_plan,
    network_cost,
    signal_problems,
    training_memory,
)

pytest.importorskip("tifffile")
pytestmark = pytest.mark.usefixtures("own_cache")
CPU = {"type": "cpu", "precision": "fp32", "memory_bytes": None}


def planned(*overrides, device=None, fp=None):
    """(plan, composed config, fingerprint) for ``segtrain OVERRIDES``."""
    cfg = composed(*overrides)
    fp = fp or fingerprint(cfg.data)
    keys = explicit_keys(overrides, [config_dir()])
    return make_plan(fp, cfg.data, cfg.loss, cfg.model, keys, device or CPU, cfg_trainer=cfg.trainer), cfg, fp


def container(cfg):
    return OmegaConf.to_container(cfg, resolve=False)


# --- normalisation and the signal guard -------------------------------------------------------------------


def test_16bit_images_using_a_small_range_get_their_own_statistics(tmp_path):
    write_nuclei16(tmp_path, n_train=4, n_val=1)
    plan, cfg, fp = planned("data=folder", f"data.root={tmp_path}")  # in_channels=3: the band repeated
    px = fp["splits"]["train"]["pixels"]
    mean, std = plan.settings["data.mean"], plan.settings["data.std"]
    assert mean.source == "plan" and mean.value == px["mean"] and std.value == px["std"] and len(mean.value) == 3
    mn = (px["mean"][0] - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    assert mn == pytest.approx(-2.12, abs=0.01)
    assert "3-band uint16 images" in mean.reason and f"ImageNet's would leave band 0 at {mn:.2f}" in mean.reason
    new = plan.apply(cfg)
    assert list(new.data.mean) == px["mean"] and list(cfg.data.mean) == list(IMAGENET_MEAN)  # input unchanged
    assert not plan.warnings


def test_signal_guard_warns_when_imagenet_statistics_are_explicit(tmp_path):
    write_nuclei16(tmp_path, n_train=4, n_val=1)
    imagenet = ["data.mean=[0.485,0.456,0.406]", "data.std=[0.229,0.224,0.225]"]
    plan, cfg, fp = planned("data=folder", f"data.root={tmp_path}", *imagenet)
    assert plan.settings["data.mean"].source == "user" and list(plan.settings["data.mean"].value) == list(IMAGENET_MEAN)
    assert "data.mean" not in plan.values() and len(plan.warnings) == 3
    assert all("after normalisation (a tiny variation)" in w and "set data.mean=auto" in w for w in plan.warnings)
    plan, _, _ = planned("data=folder", f"data.root={tmp_path}", "data.mean=auto", fp=fp)
    assert plan.settings["data.mean"].value == "auto" and not plan.warnings
    assert plan.settings["data.mean"].line().startswith("data.mean=auto (yours; the plan would use [")


def test_signal_problems_tiny_and_below_the_autocast_precision():
    assert autocast_step(2.12, "bf16") == 2**-6 and autocast_step(2.12, "fp16") == 2**-9
    # the measured case: 16-bit TIFFs using 8 bits under ImageNet statistics: -2.12 +- 0.016
    m, s = 0.485 - 2.12 * 0.229, 0.016 * 0.229
    assert signal_problems([m], [s], [0.485], [0.229], "bf16") == [
        "band 0 at -2.12 ± 0.016 after normalisation (a tiny variation)"
    ]
    # a band that varies (std 0.15 after normalisation) far from zero (100): bf16's step there is 0.5
    m, s = 100 * 0.2 + 0.5, 0.15 * 0.2
    assert signal_problems([m], [s], [0.5], [0.2], "bf16") == [
        "band 0 at 100.00 ± 0.15 after normalisation, below bf16's resolution (0.5 there)"
    ]
    assert signal_problems([m], [s], [0.5], [0.2], "fp32") == []
    assert signal_problems([0.4], [0.2], [0.485], [0.229], "bf16") == []  # a photo
    assert signal_problems([0.4], [0.0], [0.485], [0.229], "bf16") == []  # constant: nothing to normalise


def test_float_multiband_and_8bit_photos(tmp_path):
    from fake_datasets import write_tiff_folder

    write_tiff_folder(tmp_path / "f", n=6, bands=4, dtype=np.float32)
    plan, _, fp = planned("data=folder", f"data.root={tmp_path / 'f'}", "data.in_channels=4")
    assert plan.settings["data.mean"].value == fp["splits"]["train"]["pixels"]["mean"]
    assert (
        "the data's own per-band statistics: 4-band float32 images, not 3-band 8-bit photos"
        in plan.settings["data.mean"].reason
    )
    write_folder(tmp_path / "p", n=6)  # 8-bit RGB noise photos: every band spans ~99% of 0..255
    plan, _, _ = planned("data=folder", f"data.root={tmp_path / 'p'}")
    assert plan.settings["data.mean"].value == list(IMAGENET_MEAN) and "ImageNet's" in plan.settings["data.mean"].reason


def test_narrow_8bit_photos_use_their_own_statistics(tmp_path):
    from PIL import Image

    write_photos(tmp_path, [(40, 50)] * 6)
    for p in sorted((tmp_path / "train" / "images").glob("*.png")):
        dark = (np.asarray(Image.open(p)) // 8).astype(np.uint8)  # values 5..26: a tenth of 0..255
        Image.fromarray(dark).save(p)
    plan, _, fp = planned("data=folder", f"data.root={tmp_path}", "data.num_classes=3")
    px = fp["splits"]["train"]["pixels"]
    assert max(px["range_used"]) < 0.25 and plan.settings["data.mean"].value == px["mean"]


# --- scale, crop, batch, iterations -----------------------------------------------------------------------


def test_photos_of_very_different_sizes(tmp_path):
    sizes = [(60, 80), (480, 640), (120, 160), (240, 320), (120, 150), (60, 80)]
    write_photos(tmp_path, sizes, n_val=2)
    plan, cfg, _ = planned("data=folder", f"data.root={tmp_path}", "data.num_classes=3")
    train = np.array(sizes[:4], float)
    short, long = int(round(np.median(train.min(1)))), int(round(np.median(train.max(1))))
    h, w = (int(round(v)) for v in np.median(train, axis=0))
    base = plan.settings["data.base_size"]
    assert base.value == [short, long] and f"median image {h}x{w}, short sides 60-480 px" in base.reason
    from segtrain.data.transforms import scale_factor

    f = scale_factor(h, w, [short, long])
    crop = [min(512, int(h * f) // 8 * 8), min(512, int(w * f) // 8 * 8)]
    assert (
        plan.settings["data.crop_size"].value == crop
        and "whole, sides rounded down to a multiple of 8" in plan.settings["data.crop_size"].reason
    )
    assert plan.settings["data.val_size"].value is None
    batch = plan.settings["data.batch_size"]  # 8 x (512*512 // crop area) -> 16, at most half of 4 images -> 2
    assert batch.value == 2 and "at most 16; halved to at most half of the 4 training images" in batch.reason
    new = plan.apply(cfg)
    assert list(new.data.base_size) == [short, long] and list(new.data.crop_size) == crop and new.data.batch_size == 2
    assert cfg.data.base_size == "auto" and cfg.data.crop_size == 512


def test_batch_fits_the_accelerator_memory(tmp_path):
    write_photos(tmp_path, [(300, 400)] * 20, n_val=4)
    gpu = {"type": "cuda", "precision": "fp16", "memory_bytes": 2**30, "bytes_per_pixel": 2000.0, "param_bytes": 10**7}
    plan, _, fp = planned("data=folder", f"data.root={tmp_path}", "data.num_classes=3", device=gpu)
    crop = tuple(plan.settings["data.crop_size"].value)
    b = plan.settings["data.batch_size"].value
    assert crop == (296, 400) and b == 2
    assert training_memory(b, crop, gpu) <= 0.8 * 2**30 < training_memory(2 * b, crop, gpu)
    assert "to fit 80% of 1.0 GiB" in plan.settings["data.batch_size"].reason
    plan, _, _ = planned("data=folder", f"data.root={tmp_path}", "data.num_classes=3", fp=fp)  # the CPU: no limit
    assert plan.settings["data.batch_size"].value == 8  # 16, at most half of the 16 training images


def _with_images(fp, n):
    fp = copy.deepcopy(fp)
    fp["splits"]["train"]["images"] = n
    return fp


def test_iterations_floor_ceiling_and_validations(tmp_path):
    write_photos(tmp_path, [(64, 64)] * 6)  # crop 64 -> batch 16 (before the data set's size caps it)
    base = ("data=folder", f"data.root={tmp_path}", "data.num_classes=3")
    _, _, fp = planned(*base)
    plan, cfg, _ = planned(*base, fp=_with_images(fp, 1600))  # 100 iterations x 12 epochs: as configured
    assert plan.settings["data.batch_size"].value == 16 and plan.settings["trainer.max_iters"].value is None
    assert "trainer.val_interval" not in plan.settings and plan.apply(cfg).trainer.max_iters is None
    plan, cfg, _ = planned(*base, fp=_with_images(fp, 50))  # 25 per epoch x 12 = 300 -> 1000
    s = plan.settings["trainer.max_iters"]
    assert (
        plan.settings["data.batch_size"].value == 16
        and s.value == 1000
        and "would be 36: raised to the floor of 1000" in s.reason
    )
    assert plan.settings["trainer.val_interval"].value == 83
    plan, _, _ = planned(*base, fp=_with_images(fp, 100000))
    assert plan.settings["trainer.max_iters"].value == 40000 and plan.settings["trainer.val_interval"].value == 3333
    plan, _, _ = planned(*base, "trainer.max_epochs=3", fp=_with_images(fp, 50))
    assert plan.settings["trainer.max_iters"].source == "user" and "trainer.val_interval" not in plan.settings


# --- classes and loss ---------------------------------------------------------------------------------------


def test_binary_95_5_masks_saved_as_0_255(tmp_path):
    from segtrain.data.build import build_datasets

    masks = write_binary_95_5(tmp_path, n_train=6, n_val=2)
    plan, cfg, fp = planned("data=folder", f"data.root={tmp_path}")
    assert plan.settings["data.label_map"].value == {255: 1} and plan.settings["data.num_classes"].value == 2
    train = np.stack([masks[f"b{i:02d}"] for i in range(6)]) // 255
    counts = np.bincount(train.ravel(), minlength=2)
    ratio = counts[0] / counts[1]
    assert counts[1] / counts.sum() == pytest.approx(0.05) and ratio == pytest.approx(19.0)
    loss = plan.settings["loss.name"]
    assert loss.value == "ce+dice" and loss.source == "plan"
    assert (
        f"(0: 95% of the labelled pixels) has {ratio:.1f}x the pixels of the rarest (1: 5%), more than 10x"
        in loss.reason
    )
    assert (
        plan.settings["loss.class_weights"].value is None and "Dice term" in plan.settings["loss.class_weights"].reason
    )
    new = plan.apply(cfg)
    build_datasets(copy.deepcopy(new.data), seed=0)  # the label check passes with the planned label_map
    assert new.data.label_map == {255: 1} and cfg.data.label_map is None and new.loss.name == "ce+dice"
    # one sigmoid logit: bce+dice, no disagreement about the number of classes
    plan, cfg, _ = planned("data=folder", f"data.root={tmp_path}", "data.num_classes=1", fp=fp)
    assert plan.settings["loss.name"].value == "bce+dice" and plan.settings["loss.class_weights"].value is None
    assert plan.settings["data.num_classes"].value == 1 and not plan.disagreements()
    assert plan.apply(cfg).loss.name == "bce+dice" and cfg.loss.name == "ce"
    # a loss chosen without Dice stays, and the plan says what it would do
    plan, _, _ = planned("data=folder", f"data.root={tmp_path}", "loss=focal", fp=fp)
    assert plan.settings["loss.name"].line().startswith("loss.name=focal (yours; the plan would use focal+dice:")
    assert (
        plan.settings["loss.class_weights"].value is None
        and "use loss=ce_dice" in plan.settings["loss.class_weights"].reason
    )
    # balanced classes keep plain cross entropy
    write_folder(tmp_path / "even", n=6)
    plan, _, _ = planned("data=folder", f"data.root={tmp_path / 'even'}")
    assert plan.settings["loss.name"].value == "ce" and "within 10x" in plan.settings["loss.name"].reason


def test_number_of_classes_from_masks_or_classes_yaml(tmp_path):
    write_folder(tmp_path / "a", n=6, num_classes=3, classes_yaml=False)
    write_folder(tmp_path / "b", masks="rgb", n=6, num_classes=3)
    plan, _, _ = planned("data=folder", f"data.root={tmp_path / 'a'}")
    assert (
        plan.settings["data.num_classes"].value == 3
        and "the masks hold values [0, 1, 2]" in plan.settings["data.num_classes"].reason
    )
    plan, _, _ = planned("data=folder", f"data.root={tmp_path / 'b'}")
    assert plan.settings["data.num_classes"].value == 3 and "classes.yaml" in plan.settings["data.num_classes"].reason


# --- explicit settings, recipes ------------------------------------------------------------------------------


def test_explicit_settings_win_and_the_plan_says_what_it_would_do(tmp_path, caplog):
    write_photos(tmp_path, [(100, 120)] * 8)
    over = ("data=folder", f"data.root={tmp_path}", "data.num_classes=3", "data.crop_size=64", "data.batch_size=3")
    plan, cfg, _ = planned(*over)
    crop = plan.settings["data.crop_size"]
    assert crop.source == "user" and crop.value == 64 and crop.planned == [96, 120]
    assert crop.line().startswith("data.crop_size=64 (yours; the plan would use [96, 120]: the median training image")
    assert {s.key for s in plan.disagreements()} == {"data.crop_size", "data.batch_size"}
    new = plan.apply(cfg)
    assert new.data.crop_size == 64 and new.data.batch_size == 3 and new is not cfg
    assert Plan.from_json(plan.to_json()) == plan
    with caplog.at_level(logging.INFO, logger="segtrain"):
        plan.log()
    assert "plan: data.crop_size=64 (yours; the plan would use [96, 120]" in caplog.text


def test_explicit_keys():
    keys = explicit_keys(
        ["data=voc", "data.root=/d", "+data.label_map={255:1}", "loss=bce_dice", "hydra.run.dir=x"], [config_dir()]
    )
    assert {"data.name", "data.root", "data.label_map", "loss.name", "loss.weights"} <= keys
    assert (
        "loss.class_weights" not in keys
        and "data.base_size" not in keys
        and not any(k.startswith("hydra") for k in keys)
    )
    keys = explicit_keys(["experiment=voc_pspnet_r50"], [config_dir()])
    assert {"data.crop_size", "data.batch_size", "trainer.max_iters", "loss.class_weights", "model.name"} <= keys
    assert "data.mean" not in keys and "data.num_classes" not in keys
    assert explicit_keys(["data=my_own"], [config_dir()]) == {"data"}  # a data config segtrain cannot read


def test_voc_sized_photos_keep_the_voc_recipe(tmp_path):
    write_voc_photos(tmp_path / "voc", n_train=5, n_val=1)  # 3 landscape, 2 portrait
    plan, cfg, _ = planned("data=voc", f"data.root={tmp_path / 'voc'}")
    for key in ("data.base_size", "data.crop_size", "data.val_size", "data.batch_size", "loss.class_weights"):
        assert plan.settings[key].source == "layout", key
    assert (
        "rescales the median training image (375x500 px) 1.37x, within 0.5-2x" in plan.settings["data.base_size"].reason
    )
    new = plan.apply(cfg)
    changed = {k for k in plan.values() if not OmegaConf.select(cfg, k) == OmegaConf.select(new, k)}
    assert changed <= {"trainer.max_iters", "trainer.val_interval"}  # 5 images: 12 epochs are below the floor
    assert container(new.data) == container(cfg.data) and container(new.loss) == container(cfg.loss)
    # small pictures in the VOC layout: VOC's scale would enlarge them ~8x, so the plan adapts it
    write_voc(tmp_path / "small", n_train=4, n_val=2)
    plan, cfg, _ = planned("data=voc", f"data.root={tmp_path / 'small'}")
    s = plan.settings["data.base_size"]
    assert s.source == "plan" and s.value == [56, 76] and "outside 0.5-2x" in s.reason
    assert plan.apply(cfg).data.base_size == [56, 76]


def test_the_default_run_resolves_as_today():
    plan, cfg, _ = planned()
    assert container(plan.apply(cfg)) == container(cfg)
    assert plan.settings["trainer.max_iters"].reason.startswith("12 epochs (trainer.max_epochs) of 100 iterations")


@pytest.mark.parametrize(
    "experiment",
    [
        "voc_fcn_r50",
        "voc_pspnet_r50",
        "voc_deeplabv3_r50",
        "voc_deeplabv3plus_r50",
        "cityscapes_pspnet_r50",
        "cityscapes_deeplabv3plus_r50",
    ],
)
def test_published_recipes_resolve_as_today(tmp_path_factory, experiment):
    root = tmp_path_factory.getbasetemp() / f"recipe-{experiment.split('_')[0]}"
    if not root.exists():
        if experiment.startswith("voc"):
            write_voc_photos(root, n_train=3, n_val=1)
            aug = root / "VOCdevkit" / "VOC2012"
            (aug / "SegmentationClassAug").symlink_to(aug / "SegmentationClass")
            (aug / "ImageSets" / "Segmentation" / "aug.txt").write_text(
                (aug / "ImageSets/Segmentation/train.txt").read_text()
            )
        else:
            write_cityscapes(root)
    plan, cfg, _ = planned(f"experiment={experiment}", f"data.root={root}")
    assert container(plan.apply(cfg)) == container(cfg)


# --- the device --------------------------------------------------------------------------------------------------


def test_network_cost_and_the_cpu_device():
    small = network_cost(composed("model.base_channels=4").model, 3, 2, size=64)
    wide = network_cost(composed("model.base_channels=8").model, 3, 2, size=64)
    assert 0 < small["bytes_per_pixel"] and 1.6 < wide["bytes_per_pixel"] / small["bytes_per_pixel"] < 2.4
    assert 3 < wide["param_bytes"] / small["param_bytes"] < 4.5  # convolutions grow with the width squared
    info = describe_device(composed("device=cpu").device, composed().model)
    assert info["type"] == "cpu" and info["memory_bytes"] is None and "bytes_per_pixel" not in info
    assert info["precision"] in ("fp32", "bf16") and math.isfinite(autocast_step(1.0, info["precision"]))


def test_a_recipe_without_its_base_size_fits_while_its_crop_does(tmp_path):
    write_voc(tmp_path, n_train=4, n_val=2)  # 48-90 px pictures
    plan, _, fp = planned("data=voc", f"data.root={tmp_path}", "data.base_size=null")
    s = plan.settings["data.crop_size"]
    assert (
        s.source == "plan" and s.value == [56, 72] and "crop_size=512 is more than twice the median image" in s.reason
    )
    plan, _, _ = planned("data=voc", f"data.root={tmp_path}", "data.base_size=null", "data.crop_size=64", fp=fp)
    assert plan.settings["data.batch_size"].source == "layout" and plan.settings["data.batch_size"].value == 8


def test_the_applied_plan_is_what_validation_loaders_and_losses_take(tmp_path):
    """What the plan writes is what today's validation, data sets, loader, batch normalisation and loss accept:
    label_map, ce+dice, per-band numbers, an [h, w] crop, a batch for 6 images."""
    from segtrain.config import validate
    from segtrain.data.build import build_datasets, build_loader
    from segtrain.losses.functions import build_loss
    from segtrain.runtime import BatchToDevice

    write_binary_95_5(tmp_path / "d", n_train=6, n_val=2)
    plan, cfg, _ = planned("data=folder", f"data.root={tmp_path / 'd'}", "data.num_workers=0", "device=cpu")
    new = plan.apply(cfg)
    assert new.loss.name == "ce+dice" and new.data.label_map == {255: 1} and new.data.batch_size == 2
    validate(new)
    train, _, _ = build_datasets(new.data, seed=0)
    images, masks = next(iter(build_loader(train, new.data, True, seed=0)))
    assert images.shape == (2, 3, 40, 40) and set(masks.unique().tolist()) <= {0, 1, 255}
    x, y = BatchToDevice(torch.device("cpu"), new.data.mean, new.data.std)(images, masks)
    logits = torch.zeros(2, 2, 40, 40, requires_grad=True)
    loss = build_loss(new.loss, 2, new.data.ignore_index)(logits, y)
    loss.backward()
    assert torch.isfinite(loss) and abs(float(x.mean())) < 3


def test_tiny_objects_on_big_images(tmp_path):
    from fake_own_data import write_tiny_objects

    write_tiny_objects(tmp_path, n=5, size=200)
    plan, _, fp = planned("data=folder", f"data.root={tmp_path}", "data.val_fraction=0.2")
    v = fp["splits"]["train"]["masks"]["values"]
    assert v["1"]["area_p10"] <= 9 and v["1"]["pixels"] / (v["0"]["pixels"] + v["1"]["pixels"]) < 0.002
    assert plan.settings["data.crop_size"].value == 200 and plan.settings["data.base_size"].value == [200, 200]
    assert plan.settings["loss.name"].value == "ce+dice" and "more than 10x" in plan.settings["loss.name"].reason


def test_the_guard_overrides_the_photo_rule(tmp_path):
    """The guard is a rule of its own: photos that ImageNet's statistics would flatten (here a fingerprint
    edited to a standard deviation of 0.01) get their own statistics, whatever the photo rule says."""
    write_folder(tmp_path, n=6)
    _, _, fp = planned("data=folder", f"data.root={tmp_path}")
    flat = copy.deepcopy(fp)
    flat["splits"]["train"]["pixels"]["std"] = [0.01, 0.01, 0.01]
    plan, _, _ = planned("data=folder", f"data.root={tmp_path}", fp=flat)
    s = plan.settings["data.std"]
    assert (
        s.value == [0.01, 0.01, 0.01]
        and "ImageNet's would leave band 0 at" in s.reason
        and "(a tiny variation)" in s.reason
    )
