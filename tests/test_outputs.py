"""The pictures: confusion matrix, per-class IoU bars, prediction grid with error maps (segtrain/outputs.py)."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from segtrain.outputs import confusion_matrix_image, error_map, per_class_iou_image, prediction_grid


def test_training_run_dir_holds_the_pictures(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for name in ("confusion_matrix.png", "per_class_iou.png", "predictions.png"):
        path = tiny_run / name
        with Image.open(path) as im:
            assert im.format == "PNG" and im.mode == "RGB", name
            im.verify()  # a complete, valid PNG
        with Image.open(path) as im:
            assert np.asarray(im).std() > 10, f"{name} is blank"
    with Image.open(tiny_run / "predictions.png") as im:
        w, h = im.size
    # debug=smoke: 2 validation images of 64x64, four columns (input, ground truth, prediction, errors)
    assert (w, h) == (4 * 64 + 5 * 2, 2 * 64 + 3 * 2)
    acc = EventAccumulator(str(tiny_run / "tb"), size_guidance={"images": 0})
    acc.Reload()
    assert {"val/confusion_matrix", "val/per_class_iou", "val/input_gt_pred"} <= set(acc.Tags()["images"])


def _bar_length(img: np.ndarray, row: int, colour) -> int:
    return int((np.abs(img[row].astype(int) - np.array(colour)).sum(1) == 0).sum())


def test_per_class_iou_bars_are_proportional_and_absent_classes_have_none():
    palette = np.array([[200, 0, 0], [0, 150, 0], [0, 0, 220]], np.uint8)
    img = per_class_iou_image([1.0, 0.25, math.nan], ["a", "bb", "ccc"], palette)
    assert img.dtype == np.uint8 and img.ndim == 3
    top, row = 30, 18  # the layout: title band, then one 18-px row per class
    full = _bar_length(img, top + row // 2, palette[0])
    quarter = _bar_length(img, top + row + row // 2, palette[1])
    assert full == pytest.approx(300 - 1, abs=2)  # the plot is 300 px wide (1 px of outline)
    assert quarter == pytest.approx(full / 4, abs=3)
    assert _bar_length(img, top + 2 * row + row // 2, palette[2]) == 0  # NaN: no bar


def test_confusion_matrix_image_is_row_normalised():
    cm = np.array([[90, 10], [0, 5]])  # row sums 100 and 5
    img = confusion_matrix_image(cm, ["bg", "fg"])
    left, top, cell = 2 * 8 + 16, 40, 36
    corner = img[top + 2, left + 2]  # cell (0, 0): 90% -> bright
    diag = img[top + cell + 2, left + cell + 2]  # cell (1, 1): 100% of its row -> the brightest
    off = img[top + cell + 2, left + 2]  # cell (1, 0): 0%
    assert diag.sum() > corner.sum() > off.sum()


def test_error_map_and_grid():
    images = torch.full((1, 3, 4, 4), 100, dtype=torch.uint8)
    masks = torch.tensor([[[0, 0, 1, 255]] * 4])
    pred = torch.tensor([[[0, 1, 1, 0]] * 4])
    err = error_map(images, masks, pred, 255)
    assert err[0, :, 0, 0].tolist() == [50, 50, 50]  # right: dim grey
    assert err[0, :, 0, 1].tolist() == [255, 0, 0]  # wrong: red
    assert err[0, :, 0, 2].tolist() == [50, 50, 50]
    assert err[0, :, 0, 3].tolist() == [255, 255, 255]  # ignored: white
    grid = prediction_grid(images, masks, pred, np.array([[0, 0, 0], [255, 0, 0]], np.uint8), 255)
    assert grid.shape == (3, 4 + 2 * 2, 4 * 4 + 5 * 2)  # one row, four columns


def test_display_shows_8_bit_as_it_is_and_stretches_the_rest_per_band():
    from segtrain.outputs import display_images, display_rgb

    gray8 = np.arange(20, dtype=np.uint8).reshape(4, 5)
    assert (display_rgb(gray8) == gray8[..., None]).all() and display_rgb(gray8).shape == (4, 5, 3)
    rgbn8 = np.random.default_rng(0).integers(0, 256, (4, 5, 4), dtype=np.uint8)
    assert (display_rgb(rgbn8) == rgbn8[..., :3]).all()  # the first three bands
    bands = np.stack([np.linspace(0, 1000, 100), np.linspace(5e4, 6e4, 100), np.zeros(100)], -1).reshape(10, 10, 3)
    shown = display_rgb(bands.astype(np.uint16))
    for b in range(2):  # each band stretched on its own: its 2nd percentile black, its 98th white
        lo, hi = np.percentile(bands[..., b], (2, 98))
        assert shown[..., b][bands[..., b] <= lo].max() == 0 and shown[..., b][bands[..., b] >= hi].min() == 255
    assert (shown[..., 2] == 0).all()  # a constant band: black, no division by zero
    batch = torch.from_numpy(np.stack([bands, bands[::-1]]).astype(np.float32)).permute(0, 3, 1, 2)
    for image, picture in zip(batch, display_images(batch)):
        assert torch.equal(picture, torch.from_numpy(display_rgb(image.permute(1, 2, 0).numpy())).permute(2, 0, 1))


def test_overlay_blends_every_class_whitens_ignored_and_outlines_on_request():
    from segtrain.outputs import overlay

    image = np.full((8, 8, 3), 100, np.uint8)
    mask = np.zeros((8, 8), np.int64)
    mask[2:6, 2:6], mask[0, 0], mask[7, 7] = 1, 255, 9  # a class, an ignored pixel, a value without a colour
    palette = np.array([[0, 0, 0], [200, 0, 0]], np.uint8)
    out = overlay(image, mask, palette, 255, alpha=0.5)
    assert tuple(out[1, 1]) == (50, 50, 50)  # black (the background) darkens
    assert tuple(out[3, 3]) == (150, 50, 50) and tuple(out[0, 0]) == tuple(out[7, 7]) == (177, 177, 177)
    lined = overlay(image, mask, palette, 255, alpha=0.5, outline=True)
    assert tuple(lined[2, 2]) == (200, 0, 0) and tuple(lined[3, 3]) == (150, 50, 50)  # the edge, the inside
    assert (lined[mask == 0] == out[mask == 0]).all()  # no outline for a black class
