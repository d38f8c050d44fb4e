"""Images of any bands and bit depth (segtrain.data.disk readers), the header scan and the ``auto`` values
(segtrain.data.stats), on real TIFF / PNG files; and a 4-band 16-bit TIFF folder set trained end to end."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_datasets import data_cfg, write_png, write_tiff_folder, write_voc
from omegaconf import OmegaConf

from segtrain.data import disk as D
from segtrain.data import images
from segtrain.data.build import build_datasets
from segtrain.data.stats import cache_dir, channel_stats
from segtrain.errors import DataError

tifffile = pytest.importorskip("tifffile")


pytestmark = pytest.mark.usefixtures("one_thread", "own_cache")


def folder_cfg(root, name: str = "folder", **over):
    return data_cfg(name, root, batch_size=4, num_workers=0, **over)


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and len(msg) < 300, msg
    return msg


# --- readers -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("planar", [False, True])
def test_multiband_tiff_reads_every_band(tmp_path, planar):
    write_tiff_folder(tmp_path, n=1, bands=4, planar=planar)
    path = tmp_path / "images" / "tile_00.tif"
    img = images.read_image(path, 4)
    raw = tifffile.imread(path)
    assert img.dtype == np.uint16 and img.shape == (40, 48, 4)
    np.testing.assert_array_equal(img, np.moveaxis(raw, 0, 2) if planar else raw)
    assert images.read_header(path) == (40, 48, 4, "uint16")


def test_16bit_png_float_tiff_and_int16(tmp_path):
    gray16 = (np.arange(30 * 20).reshape(30, 20) * 100).astype(np.uint16)
    write_png(tmp_path / "g16.png", gray16)
    assert images.read_header(tmp_path / "g16.png") == (30, 20, 1, "uint16")
    np.testing.assert_array_equal(images.read_image(tmp_path / "g16.png", 1)[..., 0], gray16)
    rgb3 = images.read_image(tmp_path / "g16.png", 3)  # in_channels=3: one band repeated, 16 bits kept
    assert rgb3.dtype == np.uint16 and rgb3.shape == (30, 20, 3) and (rgb3[..., 2] == gray16).all()
    f = np.random.default_rng(0).normal(size=(13, 16, 24)).astype(np.float64)
    tifffile.imwrite(tmp_path / "s2.tif", f, photometric="minisblack")
    img = images.read_image(tmp_path / "s2.tif", 13)
    assert img.dtype == np.float32 and img.shape == (16, 24, 13)
    assert np.allclose(img[..., 5], f[5], atol=1e-6)
    tifffile.imwrite(tmp_path / "dem.tif", np.full((8, 9), -300, np.int16))
    assert images.read_header(tmp_path / "dem.tif") == (8, 9, 1, "float32")
    assert images.read_image(tmp_path / "dem.tif", 1).min() == -300.0


def test_gray_alpha_and_palette_png_bands_match_their_header(tmp_path):
    """OpenCV expands gray + alpha (and tRNS) to 4 bands: the reader gives the bands the header reports."""
    from PIL import Image

    la = np.dstack([np.arange(12 * 10, dtype=np.uint8).reshape(12, 10), np.full((12, 10), 200, np.uint8)])
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert images.read_header(tmp_path / "la.png")[2] == 2
    np.testing.assert_array_equal(images.read_image(tmp_path / "la.png", 2), la)
    pal = Image.fromarray(np.arange(6 * 5, dtype=np.uint8).reshape(6, 5) % 3, "P")
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    pal.info["transparency"] = 0
    pal.save(tmp_path / "p.png", transparency=0)
    assert images.read_header(tmp_path / "p.png")[2] == 3
    rgb = images.read_image(tmp_path / "p.png", 4 - 1)
    assert rgb.shape == (6, 5, 3) and rgb[0, 0].tolist() == [255, 0, 0]


def test_nan_pixels_are_named(tmp_path):
    f = np.ones((2, 8, 9), np.float32)
    f[1, 3, 4] = np.nan
    tifffile.imwrite(tmp_path / "nodata.tif", f, photometric="minisblack")
    with pytest.raises(DataError) as e:
        images.read_image(tmp_path / "nodata.tif", 2)
    assert "nodata.tif holds NaN or infinite pixels" in one_line(e)


def test_band_mismatch_is_one_line_naming_the_file(tmp_path):
    write_tiff_folder(tmp_path, n=6, bands=4)
    with pytest.raises(DataError) as e:
        images.read_image(tmp_path / "images" / "tile_02.tif", 3)
    assert "tile_02.tif has 4 band(s) but data.in_channels=3" in one_line(e)
    # caught before training by the header scan, which names a file and the fix
    with pytest.raises(DataError) as e:
        build_datasets(folder_cfg(tmp_path, in_channels=3), seed=0)
    msg = one_line(e)
    assert "has 4 band(s) but data.in_channels=3: set data.in_channels=4" in msg and ".tif" in msg
    with pytest.raises(DataError, match="has 4 band\\(s\\) but data.in_channels=5"):
        build_datasets(folder_cfg(tmp_path, in_channels=5, mean="auto"), seed=0)


def test_mixed_bit_depths_are_one_line(tmp_path):
    write_tiff_folder(tmp_path, n=4, bands=1)
    tifffile.imwrite(tmp_path / "images" / "tile_01.tif", np.zeros((40, 48), np.uint8))
    with pytest.raises(DataError) as e:
        build_datasets(folder_cfg(tmp_path, in_channels=1, mean="auto"), seed=0)
    assert "images mix bit depths" in one_line(e) and "uint8" in str(e.value) and "uint16" in str(e.value)


# --- auto values ---------------------------------------------------------------------------------------


def test_base_size_auto_reads_headers_only(tmp_path, monkeypatch):
    write_voc(tmp_path, n_train=5, n_val=2)  # train sizes (h, w): 61x83, 50x70, 64x48, 72x90, 61x83

    def no_decoding(*a, **k):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(D, "read_image", no_decoding)
    monkeypatch.setattr(images.cv2, "imread", no_decoding)
    cfg = folder_cfg(tmp_path, "voc", base_size="auto", check_labels=False)
    train, val, cfg = build_datasets(cfg, seed=0)
    assert list(cfg.base_size) == [61, 83]  # the median short side (61) and long side (83)
    assert train.transform.transforms[0].size == (61, 83) and val.transform.transforms[0].size == (61, 83)
    assert len(list(cache_dir().glob("headers-*.json"))) == 1


def test_mean_std_auto_matches_numpy_and_is_cached(tmp_path, monkeypatch):
    expected = write_tiff_folder(tmp_path, n=6, bands=4)
    cfg = folder_cfg(tmp_path, in_channels=4, mean="auto")
    train, _, cfg = build_datasets(cfg, seed=0)
    pixels = np.concatenate([expected[Path(p).stem][0].reshape(-1, 4) for p in train.images]) / 65535.0
    np.testing.assert_allclose(cfg.mean, pixels.mean(0), rtol=1e-9)
    np.testing.assert_allclose(cfg.std, pixels.std(0), rtol=1e-7)
    assert cfg.mean[3] > cfg.mean[0] + 0.01  # the square's band differs: the numbers are per band
    stored = json.loads(next(cache_dir().glob("stats-*.json")).read_text())
    assert stored["mean"] == list(cfg.mean)
    monkeypatch.setattr(type(train), "read_image", lambda *a: pytest.fail("the cached statistics were recomputed"))
    assert channel_stats(train, 4) == (list(cfg.mean), list(cfg.std))


# --- a 4-band 16-bit TIFF folder set, end to end --------------------------------------------------------


def test_four_band_16bit_tiff_folder_trains_and_validates(tmp_path):
    from test_config import composed

    from segtrain.build import build_trainer
    from segtrain.config import validate

    write_tiff_folder(tmp_path / "tiles", n=10, bands=4)
    cfg = composed(
        "data=folder", f"data.root={tmp_path / 'tiles'}", "data.in_channels=4", "data.mean=auto",
        "data.crop_size=32", "data.batch_size=4", "data.num_workers=0", "model.base_channels=4",
        "trainer.max_iters=4", "trainer.val_interval=4", "trainer.progress=false", "device=cpu",
    )  # fmt: skip
    validate(cfg)
    trainer = build_trainer(cfg, tmp_path / "run")
    assert (
        trainer.model.inc[0][0].in_channels == 4 and len(trainer.cfg.data.mean) == 4 and len(trainer.cfg.data.std) == 4
    )
    images, _ = next(iter(trainer.train_loader))
    assert images.dtype == torch.uint16 and images.shape[1] == 4  # 16-bit batches, normalised on the device
    x = trainer.batch_to_device.images(images)
    assert abs(float(x.mean())) < 1.5 and 0.3 < float(x.std()) < 3  # normalised, not raw 0..65535
    summary = trainer.fit()
    assert summary["step"] == 4 and 0 <= summary["best_miou"] <= 1
    stored = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["config"]
    assert "auto" not in str(OmegaConf.create(stored).data.mean)  # the checkpoint holds the numbers

    # the Predictor reads a 4-band 16-bit TIFF as training did and returns a mask of its size
    from segtrain.predict import Predictor

    p = Predictor.from_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", device="cpu")
    tile = sorted((tmp_path / "tiles" / "images").glob("*.tif"))[0]
    mask = p(tile)
    assert mask.shape == tifffile.imread(tile).shape[-2:] or mask.shape == tifffile.imread(tile).shape[:2]
    assert p(p.read(tile)).tolist() == mask.tolist()
    with pytest.raises(ValueError, match="4 bands"):
        p(np.zeros((8, 8, 3), np.uint16))


def test_a_cache_that_cannot_be_written_is_said_once_and_never_stops_the_run(tmp_path, monkeypatch, caplog):
    """SEGTRAIN_CACHE naming a file: the label check, the header scan and mean/std=auto run uncached, one
    warning says so (no "cached in" after it); a cache file holding valid JSON of the wrong shape is ignored."""
    import logging

    write_tiff_folder(tmp_path / "tiles", n=6, bands=4)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("SEGTRAIN_CACHE", str(blocker))
    caplog.set_level(logging.INFO)
    cfg = folder_cfg(tmp_path / "tiles", in_channels=4, mean="auto", base_size="auto")
    build_datasets(cfg, seed=0)
    text = caplog.text
    assert text.count("not cached: cannot write") == 1 and str(blocker) in text, text
    assert "cached in" not in text and "not cached)" in text  # the mean/std line says so too
    assert len(cfg.mean) == 4 and blocker.read_text() == "not a folder"

    monkeypatch.setenv("SEGTRAIN_CACHE", str(tmp_path / "cache"))  # a writable cache holding bad records
    cfg = folder_cfg(tmp_path / "tiles", in_channels=4, mean="auto", base_size="auto")
    build_datasets(cfg, seed=0)
    for path in [*cache_dir().glob("*.json"), *(cache_dir().parent / "labelcheck").glob("*.json")]:
        path.write_text("[]")  # valid JSON, not a record
    again = folder_cfg(tmp_path / "tiles", in_channels=4, mean="auto", base_size="auto")
    build_datasets(again, seed=0)
    assert list(again.mean) == list(cfg.mean) and list(again.base_size) == list(cfg.base_size)
