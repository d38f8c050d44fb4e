"""The data set fingerprint (segtrain.data.fingerprint), the data card (segtrain.data.card) and
``segtrain-data inspect``, on real files of every layout, checked against numpy (and scipy's labelling)
on the same arrays."""

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import console_script, one_line_error, run_cli
from fake_datasets import (
    FOLDER_PALETTE,
    data_cfg,
    write_ade,
    write_cityscapes,
    write_folder,
    write_tiff_folder,
    write_voc,
)
from fake_own_data import write_binary_95_5, write_nuclei16, write_photos, write_tiny_objects
from PIL import Image
from scipy import ndimage

from segtrain.data import disk as D
from segtrain.data import images
from segtrain.data.card import CARD_HEIGHT, CARD_WIDTH, card_samples, write_card
from segtrain.data.fingerprint import (
    cache_dir,
    compute_fingerprint,
    datasets_for,
    describe,
    fingerprint,
    sample_indices,
)
from segtrain.outputs import display_rgb

tifffile = pytest.importorskip("tifffile")
pytestmark = pytest.mark.usefixtures("own_cache")


def cfg(name, root, **over):
    return data_cfg(name, root, num_workers=0, **over)


def objects(masks, value):
    """Areas of the 8-connected components of ``value`` in ``masks`` (scipy, not OpenCV)."""
    areas = []
    for m in masks:
        lab, n = ndimage.label(m == value, structure=np.ones((3, 3)))
        areas += np.bincount(lab.ravel())[1:].tolist()
    return np.array(areas)


def value_counts(masks):
    return np.bincount(np.concatenate([m.ravel() for m in masks]), minlength=256)


# --- numbers against numpy -----------------------------------------------------------------------------


def test_16bit_tiffs_using_the_bottom_8_bits(tmp_path):
    arrays = write_nuclei16(tmp_path, n_train=6, n_val=2)
    fp = fingerprint(cfg("folder", tmp_path, in_channels=1))
    tr = fp["splits"]["train"]
    imgs = [arrays[f"n{i:02d}"][0] for i in range(6)]
    masks = [arrays[f"n{i:02d}"][1] for i in range(6)]
    px = np.concatenate([a.ravel() for a in imgs]).astype(np.float64)
    p = tr["pixels"]
    assert (p["dtype"], p["bands"], p["images"], p["pixels"]) == ("uint16", 1, 6, px.size)
    assert p["min"] == [px.min()] and p["max"] == [px.max()] and px.max() < 256 and p["bits_used"] == 8
    assert p["exact_percentiles"]
    np.testing.assert_allclose(p["p0.5"], [np.percentile(px, 0.5)])
    np.testing.assert_allclose(p["p99.5"], [np.percentile(px, 99.5)])
    np.testing.assert_allclose(p["mean"], [px.mean() / 65535], rtol=1e-9)
    np.testing.assert_allclose(p["std"], [px.std() / 65535], rtol=1e-7)
    assert p["range_used"][0] == pytest.approx((np.percentile(px, 99.5) - np.percentile(px, 0.5)) / 65535)
    assert p["range_used"][0] < 0.004  # a small part of the type's range
    hw = np.array([a.shape for a in imgs])
    assert tr["sizes"]["median_hw"] == [int(round(v)) for v in np.median(hw, axis=0)]
    assert tr["sizes"]["h"]["min"] == hw[:, 0].min() and tr["sizes"]["w"]["max"] == hw[:, 1].max()
    assert tr["file_bands"] == [1] and tr["file_dtypes"] == ["uint16"]
    counts = value_counts(masks)
    values = tr["masks"]["values"]
    assert set(values) == {"0", "1"} and values["1"]["pixels"] == counts[1] and values["0"]["pixels"] == counts[0]
    assert values["1"]["images"] == 6 and tr["masks"]["images"] == 6 and tr["masks"]["ignore_fraction"] == 0
    areas = objects(masks, 1)
    assert values["1"]["objects"] == len(areas) and values["1"]["area_min"] == areas.min()
    assert values["1"]["area_median"] == np.median(areas) and values["1"]["area_p10"] == pytest.approx(
        np.percentile(areas, 10)
    )
    assert fp["splits"]["val"]["images"] == 2 and fp["version"] == 1


def test_pixels_of_a_seeded_sample_masks_all(tmp_path):
    arrays = write_nuclei16(tmp_path, n_train=8, n_val=1)
    fp = fingerprint(cfg("folder", tmp_path, in_channels=1), max_images=3)
    tr = fp["splits"]["train"]
    chosen = sample_indices(8, 3)
    assert len(chosen) == 3 and chosen == sample_indices(8, 3) and chosen == sorted(chosen)
    px = np.concatenate([arrays[f"n{i:02d}"][0].ravel() for i in chosen]).astype(np.float64)
    assert tr["pixels"]["images"] == 3 and tr["masks"]["images"] == 8 and tr["sizes"]["images"] == 8
    np.testing.assert_allclose(tr["pixels"]["mean"], [px.mean() / 65535], rtol=1e-9)
    np.testing.assert_allclose(tr["pixels"]["p99.5"], [np.percentile(px, 99.5)])
    assert "at most 3 images" in fp["sample_rule"]


def test_multiband_float_images(tmp_path):
    write_tiff_folder(tmp_path, n=6, bands=4, dtype=np.float32)
    c = cfg("folder", tmp_path, in_channels=4)
    train, _ = datasets_for(c)
    fp = fingerprint(c)
    p = fp["splits"]["train"]["pixels"]
    px = np.concatenate([tifffile.imread(f).reshape(-1, 4) for f in train.images]).astype(np.float64)
    assert (p["dtype"], p["bands"], p["type_max"], p["range_used"], p["bits_used"]) == ("float32", 4, 1.0, None, None)
    np.testing.assert_allclose(p["mean"], px.mean(0), rtol=1e-6)
    np.testing.assert_allclose(p["std"], px.std(0), rtol=1e-5)
    np.testing.assert_allclose(p["min"], px.min(0), rtol=1e-6)
    # images of fewer than 16,384 pixels enter the percentiles whole
    np.testing.assert_allclose(p["p0.5"], np.percentile(px, 0.5, axis=0), rtol=1e-6)
    np.testing.assert_allclose(p["p99.5"], np.percentile(px, 99.5, axis=0), rtol=1e-6)


def test_tiny_objects_on_big_images(tmp_path):
    arrays = write_tiny_objects(tmp_path, n=5, size=200)
    c = cfg("folder", tmp_path, num_classes=2, val_fraction=0.2)
    train, _ = datasets_for(c)
    v = fingerprint(c)["splits"]["train"]["masks"]["values"]["1"]
    masks = [arrays[Path(p).stem][1] for p in train.images]
    areas = objects(masks, 1)
    assert sorted(set(areas.tolist())) <= [4, 9, 16, 25] and v["objects"] == len(areas)
    assert v["area_min"] == areas.min() and v["area_median"] == np.median(areas)
    assert v["area_p10"] == pytest.approx(np.percentile(areas, 10)) and v["pixels"] == areas.sum()


@pytest.mark.parametrize("layout", ["voc", "cityscapes", "ade20k", "colour"])
def test_layouts_read_masks_as_training_does(tmp_path, layout):
    """Mask values after each layout's own mapping: VOC palette PNGs with 255 borders, Cityscapes labelIds ->
    trainIds, ADE20K reduce-zero, RGB colour masks through classes.yaml's palette."""
    from segtrain.data.ade20k import reduce_zero_lut
    from segtrain.data.cityscapes import trainid_lut

    if layout == "voc":
        write_voc(tmp_path)
        c, lut = cfg("voc", tmp_path), None
    elif layout == "cityscapes":
        write_cityscapes(tmp_path)
        c, lut = cfg("cityscapes", tmp_path), trainid_lut(255)
    elif layout == "ade20k":
        write_ade(tmp_path)
        c, lut = cfg("ade20k", tmp_path), reduce_zero_lut(255)
    else:
        write_folder(tmp_path, masks="rgb", layout="lists")
        c, lut = cfg("folder", tmp_path), None  # data.num_classes=2, but classes.yaml lists 3
    train, _ = datasets_for(c)
    fp = fingerprint(c)
    masks = []
    for p in train.masks:
        raw = np.array(Image.open(p))
        if raw.ndim == 3:  # colour: the palette's index of each pixel
            raw = np.argmax((raw[:, :, None, :] == FOLDER_PALETTE[None, None]).all(-1), axis=-1).astype(np.uint8)
        masks.append(raw if lut is None else lut[raw])
    counts = value_counts(masks)
    m = fp["splits"]["train"]["masks"]
    assert {int(k): e["pixels"] for k, e in m["values"].items()} == {v: int(n) for v, n in enumerate(counts) if n}
    assert m["ignore_fraction"] == pytest.approx(counts[255] / counts.sum())
    assert fp["class_names"] == train.class_names and fp["layout"] == c.name
    if layout == "colour":
        assert fp["declared_classes"] == 3 and len(fp["palette"]) == 3
    if layout == "cityscapes":
        assert m["ignore_fraction"] > 0.1 and set(m["values"]) == {"0", "11", "13", "18", "255"}


def test_train_and_val_differences(tmp_path):
    write_photos(tmp_path, [(40, 50)] * 4 + [(80, 100)] * 2, n_val=2)
    Image.fromarray(np.full((80, 100), 3, np.uint8)).save(tmp_path / "val" / "masks" / "p05.png")
    fp = fingerprint(cfg("folder", tmp_path, num_classes=4))
    text = " | ".join(fp["differences"])
    assert "median validation image (80x100) is 2.00x the median training image (40x50)" in text
    assert "[3] appear in validation masks only" in text


def test_cached_and_an_unwritable_cache_is_a_warning(tmp_path, monkeypatch, caplog):
    write_nuclei16(tmp_path / "d", n_train=3, n_val=1)
    c = cfg("folder", tmp_path / "d", in_channels=1)
    first = fingerprint(c)
    assert len(list(cache_dir().glob("*.json"))) == 1 and first["key"]
    monkeypatch.setattr(D.DiskDataset, "read_image", lambda *a: pytest.fail("the cached fingerprint was recomputed"))
    assert fingerprint(c) == first
    monkeypatch.undo()
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("SEGTRAIN_CACHE", str(tmp_path / "file" / "cache"))  # below a file: cannot be made
    with caplog.at_level(logging.WARNING, logger="segtrain"):
        again = fingerprint(c)
    assert again["splits"] == first["splits"] and "cannot write cache" in caplog.text


def test_generated_data_is_sampled_and_not_cached():
    from test_config import composed

    c = composed("data.num_train=12", "data.num_val=4").data
    train, val = datasets_for(c)
    fp = compute_fingerprint(train, val, name="synthetic", max_images=5)
    tr = fp["splits"]["train"]
    assert fp["key"] is None and tr["pixels"]["images"] == 5 and tr["masks"]["images"] == 5 and tr["images"] == 12
    assert tr["sizes"]["median_hw"] == [64, 64] and tr["pixels"]["dtype"] == "uint8" and not list(cache_dir().glob("*"))


# --- the card --------------------------------------------------------------------------------------------


def test_write_card_is_a_png_of_the_card_size(tmp_path):
    arrays = write_nuclei16(tmp_path / "d", n_train=4, n_val=1)
    c = cfg("folder", tmp_path / "d", in_channels=1)
    train, _ = datasets_for(c)
    fp = fingerprint(c)
    samples = card_samples(train)
    assert len(samples) == 4 and samples[0][0].dtype == np.uint16
    path = write_card(fp, None, samples, tmp_path / "card.png", title="nuclei")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = cv2.imread(str(path))
    assert img.shape == (CARD_HEIGHT, CARD_WIDTH, 3) and len(np.unique(img.reshape(-1, 3), axis=0)) > 50
    shown = display_rgb(arrays["n00"][0])  # 16-bit, one band: stretched from its 2nd to 98th percentile
    assert shown.dtype == np.uint8 and shown.shape == (*arrays["n00"][0].shape, 3) and shown.max() == 255


def test_describe_says_what_the_data_holds(tmp_path):
    write_binary_95_5(tmp_path, n_train=4, n_val=2)
    lines = describe(fingerprint(cfg("folder", tmp_path)))
    text = "\n".join(lines)
    assert lines[0].startswith("data=folder: 4 train / 2 val images; files: 1 band(s), uint8")
    assert "ignored: 5% of the pixels (value 255)" in text and "median 40x40 px" in text


# --- segtrain-data inspect --------------------------------------------------------------------------------


def inspect(capsys, *args) -> tuple[int, str]:
    from segtrain.apps.data import main

    code = main(["inspect", *map(str, args)])
    return code, capsys.readouterr().out


@pytest.mark.parametrize("layout", ["folder16", "voc", "cityscapes", "ade20k", "colour"])
def test_inspect_every_layout(tmp_path, capsys, layout):
    root, extra = tmp_path / "data", []
    if layout == "folder16":
        write_nuclei16(root, n_train=4, n_val=2)
        name, extra, counts = "folder", ["data.in_channels=1"], (4, 2)
    elif layout == "voc":
        write_voc(root)
        name, counts = "voc", (4, 2)
    elif layout == "cityscapes":
        write_cityscapes(root)
        name, counts = "cityscapes", (4, 1)
    elif layout == "ade20k":
        write_ade(root)
        name, counts = "ade20k", (3, 2)
    else:
        write_folder(root, masks="rgb", layout="dirs")
        name, counts = "folder", (4, 2)
    card = tmp_path / "out" / "card.png"
    code, out = inspect(capsys, f"data={name}", f"data.root={root}", *extra, "--out", card)
    assert code == 0, out
    assert cv2.imread(str(card)).shape == (CARD_HEIGHT, CARD_WIDTH, 3)
    assert f"data={name}: {counts[0]} train / {counts[1]} val images" in out and f"data card: {card}" in out
    train, _ = datasets_for(cfg(name, root, **dict(e.split("=") for e in [x.replace("data.", "") for x in extra])))
    hw = np.array([images.read_header(p)[:2] for p in train.images])
    h, w = (int(round(v)) for v in np.median(hw, axis=0))
    assert f"median {h}x{w} px" in out and "plan: data.mean=" in out and "plan: data.crop_size=" in out
    if layout == "colour":
        assert "plan: data.num_classes=3 (the 3 classes classes.yaml" in out


def test_inspect_json_and_errors(tmp_path, capsys):
    write_nuclei16(tmp_path / "d", n_train=3, n_val=1)
    code, out = inspect(capsys, "data=folder", f"data.root={tmp_path / 'd'}", "--json", "--out", tmp_path / "c.png")
    doc = json.loads(out)
    assert code == 0 and doc["fingerprint"]["splits"]["train"]["images"] == 3 and "data.mean" in doc["plan"]["settings"]
    proc = run_cli(
        ["inspect", "data=folder", f"data.root={tmp_path / 'nowhere'}"], tmp_path, exe=console_script("segtrain-data")
    )
    one_line_error(proc, "does not exist", prog="segtrain-data")
