"""segtrain-predict and Predictor: every input kind, layouts, outputs, and agreement with segtrain-eval."""

import json

import cv2
import numpy as np
import pytest
import torch
from conftest import console_script, in_process, one_line_error, run_cli
from fake_datasets import write_png
from omegaconf import OmegaConf
from PIL import Image

from segtrain.apps.predict import check_no_overwrite, list_inputs, output_stems
from segtrain.data.images import read_image
from segtrain.errors import OutputError
from segtrain.predict import Predictor, write_outputs


@pytest.fixture(scope="module")
def ckpt(tiny_run):
    return tiny_run / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def predictor(ckpt):
    return Predictor.from_checkpoint(ckpt, device="cpu", precision="fp32")


def _pixels(h, w, seed=0, channels=3, dtype=np.uint8, high=256):
    shape = (h, w) if channels == 1 else (h, w, channels)
    return np.random.default_rng(seed).integers(0, high, size=shape).astype(dtype)


def write_inputs(folder):
    """The must-show folder, plus a CMYK JPEG and a palette PNG in a subfolder and a non-image file.
    Returns {relative stem: expected upright (h, w)}."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_pixels(97, 131)).save(folder / "photo.jpg", quality=95)
    Image.fromarray(_pixels(50, 70, 1, channels=1)).save(folder / "gray.png")
    Image.fromarray(_pixels(40, 60, 2, channels=4)).save(folder / "rgba.png")
    Image.fromarray(_pixels(45, 66, 3, channels=1, dtype=np.uint16, high=65536)).save(folder / "depth16.png")
    rotated = Image.fromarray(_pixels(30, 80, 4))  # stored 30x80, EXIF orientation 6: shown 80 high, 30 wide
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.save(folder / "rotated.jpg", exif=exif)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG" * 20)
    whole = (folder / "photo.jpg").read_bytes()
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])  # its header reads, its pixels do not
    Image.fromarray(_pixels(33, 44, 5)).convert("CMYK").save(folder / "sub" / "cmyk.jpg")
    Image.fromarray(_pixels(36, 52, 6, channels=1)).convert("P").save(folder / "sub" / "indexed.png")
    (folder / "sub" / "notes.txt").write_text("not an image")
    return {
        "photo": (97, 131),
        "gray": (50, 70),
        "rgba": (40, 60),
        "depth16": (45, 66),
        "rotated": (80, 30),
        "sub/cmyk": (33, 44),
        "sub/indexed": (36, 52),
    }


def test_predict_folder_of_every_kind(ckpt, tmp_path):
    expected = write_inputs(tmp_path / "in")
    exe = console_script("segtrain-predict")
    proc = run_cli([f"ckpt={ckpt}", "input=in", "output=out", "hydra.run.dir=run"], tmp_path, exe=exe)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert "skipped in/broken.jpg" in out and "skipped in/sub/truncated.jpg" in out  # the corrupt files, named
    assert "notes.txt" not in out  # not an image extension: not even tried
    for stem, (h, w) in expected.items():
        with Image.open(tmp_path / "out" / f"{stem}.png") as im:
            assert im.mode == "P" and im.size == (w, h), stem  # the image's own upright size
            pal = np.asarray(im.getpalette()[:18]).reshape(6, 3)
            assert np.asarray(im).max() < 6
        with Image.open(tmp_path / "out" / f"{stem}_overlay.jpg") as im:
            assert im.size == (w, h)
    assert not (tmp_path / "out" / "broken.png").exists()
    from segtrain.data.synthetic import PALETTE

    assert (pal == PALETTE[:6]).all()  # the checkpoint's palette
    summary = json.loads((tmp_path / "run" / "predict.json").read_text())
    assert summary["predicted"] == len(expected)
    assert list(summary["skipped"]) == ["in/broken.jpg", "in/sub/truncated.jpg"]
    assert sum(summary["class_pixels"].values()) == sum(h * w for h, w in expected.values())
    assert "images/s" in out and "class histogram" in out and str(tmp_path / "out") in out


def predict_in_process(cwd, *args):
    """``segtrain-predict ARGS hydra.run.dir=run`` through the command's entry point in this process (a process
    start-up saved; the command as a subprocess: test_predict_folder_of_every_kind): a CompletedProcess."""
    return in_process([*args, "hydra.run.dir=run"], cwd, "segtrain-predict")


def with_stored(ckpt, dest, **data):
    """A copy of ``ckpt`` at ``dest`` whose stored config has these ``data.*`` values (as if trained with them)."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    cfg = OmegaConf.create(state["config"])
    cfg.data.merge_with(data)
    state["config"] = OmegaConf.to_yaml(cfg)
    torch.save(state, dest)
    return dest


def test_predict_checkpoint_trained_with_auto_workers(ckpt, tmp_path):
    """data.num_workers=auto (the training default) is resolved to a number of loader workers."""
    auto = with_stored(ckpt, tmp_path / "auto.pt", num_workers="auto")
    Image.fromarray(_pixels(40, 52)).save(tmp_path / "a.png")
    proc = predict_in_process(tmp_path, f"ckpt={auto}", "input=a.png", "output=out")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "out" / "a.png").is_file()


def test_predict_skips_images_too_small_for_the_network(ckpt, tmp_path):
    """An 8x8 icon among photos (the U-Net needs 16 px): skipped with its reason, the others predicted."""
    (tmp_path / "in").mkdir()
    Image.fromarray(_pixels(40, 52)).save(tmp_path / "in" / "photo.png")
    Image.fromarray(_pixels(8, 8, 1)).save(tmp_path / "in" / "icon.png")
    proc = predict_in_process(tmp_path, f"ckpt={ckpt}", "input=in", "output=out")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "skipped in/icon.png: 8x8 px, smaller than the 16 px model=unet needs" in proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "run" / "predict.json").read_text())
    assert summary["predicted"] == 1 and list(summary["skipped"]) == ["in/icon.png"]
    assert (tmp_path / "out" / "photo.png").is_file() and not (tmp_path / "out" / "icon.png").exists()


def test_predictor_too_small(ckpt, predictor):
    """The smallest side the network sees, after data.val_size and eval.scales, decides."""
    with pytest.raises(ValueError, match="8x8 px, smaller than the 16 px"):
        predictor(_pixels(8, 8))
    assert predictor.too_small(16, 40) is None and "15x40 px" in predictor.too_small(40, 15)
    upscaled = Predictor.from_checkpoint(ckpt, device="cpu", overrides={"data.val_size": 32})
    assert upscaled(_pixels(8, 8)).shape == (8, 8) and upscaled.too_small(8, 8) is None
    halved = Predictor.from_checkpoint(ckpt, device="cpu", overrides={"eval.scales": [0.5, 1.0]})
    assert "(predicted at 12 px)" in halved.too_small(24, 40) and halved.too_small(32, 40) is None


def test_predict_nothing_readable_fails(ckpt, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    proc = predict_in_process(tmp_path, f"ckpt={ckpt}", "input=in")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("segtrain-predict: error: no image could be read") and "broken.png" in lines[-1]
    assert "Traceback" not in proc.stderr


def test_read_image_kinds(tmp_path):
    expected = write_inputs(tmp_path)
    gray = read_image(tmp_path / "gray.png", rgb8=True)
    assert gray.shape == (50, 70, 3) and gray.dtype == np.uint8 and (gray[..., 0] == gray[..., 2]).all()
    raw16 = np.asarray(Image.open(tmp_path / "depth16.png")).astype(np.float64)
    eight = read_image(tmp_path / "depth16.png", rgb8=True)
    assert np.abs(eight[..., 0] - raw16 * 255 / 65535).max() <= 0.5  # full range
    assert read_image(tmp_path / "rotated.jpg", rgb8=True).shape[:2] == expected["rotated"]
    rgba = np.asarray(Image.open(tmp_path / "rgba.png"))
    assert (read_image(tmp_path / "rgba.png", rgb8=True) == rgba[..., :3]).all()  # alpha dropped
    assert read_image(tmp_path / "sub" / "cmyk.jpg", rgb8=True).shape == (33, 44, 3)
    assert read_image(np.zeros((5, 6), np.uint16), rgb8=True).shape == (5, 6, 3)
    with pytest.raises(ValueError, match="uint8"):
        read_image(np.zeros((5, 6, 3), np.float32), rgb8=True)
    for bad in ("broken.jpg", "sub/truncated.jpg"):
        with pytest.raises(OSError):
            read_image(tmp_path / bad, rgb8=True)


def test_list_inputs_layouts(tmp_path):
    write_inputs(tmp_path / "in")
    Image.fromarray(_pixels(8, 8)).save(tmp_path / "in" / "photo.png")  # same stem as photo.jpg
    exts = [".jpg", ".png"]
    items = list_inputs(str(tmp_path / "in"), exts)
    rels = sorted(str(r) for _, r in items)
    assert "sub/cmyk.jpg" in rels and "sub/notes.txt" not in rels
    stems = {str(s) for s in output_stems(items)}
    assert {"photo.jpg", "photo.png", "gray", "sub/indexed"} <= stems  # colliding stems keep their extension
    globbed = list_inputs(str(tmp_path / "in" / "**" / "*.png"), exts)
    assert sorted(str(r) for _, r in globbed) == ["depth16.png", "gray.png", "photo.png", "rgba.png", "sub/indexed.png"]
    single = list_inputs(str(tmp_path / "in" / "sub" / "notes.txt"), exts)  # one file: taken as given
    assert [str(r) for _, r in single] == ["notes.txt"]
    nested = list_inputs(str(tmp_path / "in"), exts, exclude=tmp_path / "in" / "sub")  # output inside input
    assert not any(str(r).startswith("sub/") for _, r in nested)


def test_predict_refuses_to_overwrite_an_input(ckpt, tmp_path):
    """input=photos/cat.png output=photos: its mask would be photos/cat.png; refused before anything is written."""
    (tmp_path / "photos").mkdir()
    Image.fromarray(_pixels(40, 52)).save(tmp_path / "photos" / "cat.png")
    before = (tmp_path / "photos" / "cat.png").read_bytes()
    proc = predict_in_process(tmp_path, f"ckpt={ckpt}", "input=photos/cat.png", "output=photos")
    assert proc.returncode == 4
    one_line_error(proc, "photos/cat.png", "output=", prog="segtrain-predict")
    assert (tmp_path / "photos" / "cat.png").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "photos").iterdir()) == ["cat.png"]


def test_output_folder_checks(tmp_path):
    """Earlier outputs are left out only when the output folder lies inside the input; every output file (mask,
    overlay, probabilities) is checked against the inputs."""
    write_inputs(tmp_path / "photos")
    exts = [".jpg", ".png"]
    above = list_inputs(str(tmp_path / "photos"), exts, exclude=tmp_path)  # input=photos output=.
    assert len(above) == 9 and len(list_inputs(str(tmp_path / "photos" / "*.png"), exts, exclude=tmp_path)) == 3
    assert list_inputs(str(tmp_path / "photos" / "gray.png"), exts, exclude=tmp_path / "photos")  # one file
    predict = OmegaConf.create({"overlay": False, "save_probs": False})
    check_no_overwrite(above, output_stems(above), tmp_path, predict)  # ./photo.png ...: no input replaced
    with pytest.raises(OutputError, match="depth16.png"):  # its own mask (the first PNG)
        check_no_overwrite(above, output_stems(above), tmp_path / "photos", predict)
    Image.fromarray(_pixels(8, 8)).save(tmp_path / "a.jpg")
    Image.fromarray(_pixels(8, 8)).save(tmp_path / "a_overlay.jpg")
    pair = list_inputs(str(tmp_path / "a*.jpg"), exts)
    check_no_overwrite(pair, output_stems(pair), tmp_path, predict)
    with pytest.raises(OutputError, match="a_overlay.jpg"):  # a.jpg's overlay
        check_no_overwrite(pair, output_stems(pair), tmp_path, OmegaConf.create({"overlay": True, "save_probs": False}))


def test_predictor_api(predictor, tmp_path):
    image = _pixels(37, 53, 9)
    assert not predictor.model.training
    mask = predictor(image)
    assert mask.shape == (37, 53) and mask.dtype == np.int64
    assert (predictor(Image.fromarray(image)) == mask).all()
    Image.fromarray(image).save(tmp_path / "x.png")
    assert (predictor(tmp_path / "x.png") == mask).all()
    probs = predictor.probabilities(image)
    assert probs.shape == (6, 37, 53) and np.allclose(probs.sum(0), 1, atol=1e-5)
    assert (probs.argmax(0) == mask).all()
    assert predictor.class_names[:2] == ["background", "circle"]


def test_predictor_overrides_are_checked(ckpt):
    from segtrain.errors import ConfigError

    with pytest.raises(ConfigError, match="model.name"):
        Predictor.from_checkpoint(ckpt, overrides={"model.name": "fcn"})
    with pytest.raises(ConfigError, match="eval.mode"):
        Predictor.from_checkpoint(ckpt, overrides={"eval.mode": "sideways"})
    p = Predictor.from_checkpoint(ckpt, device="cpu", overrides={"eval.scales": [0.5, 1.0], "eval.flip": True})
    assert p.settings["scales"] == [0.5, 1.0] and p.settings["flip"] is True
    assert p(_pixels(31, 45)).shape == (31, 45)


def test_write_outputs_probabilities_without_overlay(predictor, tmp_path):
    image = _pixels(21, 34, 3)
    scores = predictor.scores([image])[0]
    cfg = OmegaConf.create({"predict": {"overlay": False, "save_probs": True, "alpha": 0.5}})
    pred = write_outputs(tmp_path / "a" / "b", image, scores, predictor, cfg)
    probs = np.load(tmp_path / "a" / "b.npy")
    assert probs.dtype == np.float16 and probs.shape == (6, 21, 34)
    assert np.allclose(probs.astype(np.float32).sum(0), 1, atol=1e-2) and (probs.argmax(0) == pred).all()
    assert (tmp_path / "a" / "b.png").is_file() and not (tmp_path / "a" / "b_overlay.jpg").exists()


@pytest.mark.parametrize("depth", ["rgb8", "gray16", "rgb16"])
def test_predictor_equals_segtrain_eval(ckpt, tmp_path, depth):
    """The same pictures through segtrain-eval's loop (data set, val_size rescale, TTA, scores resized back to
    the mask) and through Predictor: identical class maps, and the same scores (the loss on them).  16-bit
    grayscale PNGs (as in medical imaging) and 16-bit RGB PNGs are read at their full depth by both."""
    import torch.nn.functional as F

    from segtrain.data.build import build_datasets, build_loader
    from segtrain.evaluation import evaluate_loader
    from segtrain.metrics import ConfusionMatrix
    from segtrain.runtime import autocast

    sizes = [(61, 83), (50, 70), (72, 90)]
    for split in ("train", "val"):
        for i, (h, w) in enumerate(sizes):
            channels = 1 if depth == "gray16" else 3
            pixels = _pixels(h, w, 20 + i) if depth == "rgb8" else _pixels(h, w, 20 + i, channels, np.uint16, 65536)
            if depth == "rgb16":  # PIL writes no 16-bit RGB PNG
                (tmp_path / split / "images").mkdir(parents=True, exist_ok=True)
                assert cv2.imwrite(str(tmp_path / split / "images" / f"im{i}.png"), pixels[..., ::-1])
            else:
                write_png(tmp_path / split / "images" / f"im{i}.png", pixels)
            write_png(tmp_path / split / "masks" / f"im{i}.png", _pixels(h, w, 30 + i, channels=1, high=6))
    overrides = {
        "data.name": "folder",
        "data.root": str(tmp_path),
        "data.val_size": 48,  # validation rescales to a 48-px short side; scores go back to the mask's size
        "data.batch_size": 1,
        "data.num_workers": 0,
        "eval.scales": [0.75, 1.0],
        "eval.flip": True,
    }
    p = Predictor.from_checkpoint(ckpt, device="cpu", precision="fp32", overrides=overrides)
    _, val, _ = build_datasets(p.cfg.data, 0)
    loader = build_loader(val, p.cfg.data, False, 0)
    loss = torch.nn.CrossEntropyLoss(ignore_index=255)
    metrics, cm, vis = evaluate_loader(
        p.model, loader, p.to_device, lambda: autocast(p.device, p.precision), p.cfg, p.class_names, loss, num_vis=1
    )
    mine, losses, preds = ConfusionMatrix(6, 255, torch.device("cpu")), [], []
    for i in range(len(sizes)):
        image = p.read(tmp_path / "val" / "images" / f"im{i}.png")
        assert image.dtype == (np.uint8 if depth == "rgb8" else np.uint16)
        mask = torch.from_numpy(np.asarray(Image.open(tmp_path / "val" / "masks" / f"im{i}.png")).astype(np.int64))
        scores = p.scores([image]).cpu()
        preds.append(p(image))
        losses.append(float(F.cross_entropy(scores, mask[None], ignore_index=255)))
        mine.update(torch.from_numpy(preds[-1])[None], mask[None])
    assert (vis[2][0].numpy() == preds[0]).all()  # the first image, pixel for pixel
    assert torch.equal(mine.mat.cpu(), cm.mat.cpu())  # every image: the same (truth, prediction) counts
    assert np.mean(losses) == pytest.approx(metrics["loss"], rel=1e-6)  # the same scores
    plain = Predictor.from_checkpoint(ckpt, device="cpu", precision="fp32")  # without val_size and TTA
    image = p.read(tmp_path / "val" / "images" / "im0.png")
    assert not torch.allclose(plain.scores([image]), p.scores([image]), atol=1e-3)  # the settings matter
    assert (p(tmp_path / "val" / "images" / "im0.png") == p(image)).all()  # a path or the array it holds
    if depth != "rgb8":  # what 8 bits would have lost is visible in the scores
        eight = read_image(tmp_path / "val" / "images" / "im0.png", rgb8=True)
        assert eight.dtype == np.uint8 and not torch.equal(p.scores([eight]), p.scores([image]))


def test_predictor_reads_16_bit_and_float_rgb_tiffs(predictor, tmp_path):
    """RGB TIFFs as training reads them: 16-bit at full depth, float32 as stored (PIL opens neither)."""
    import tifffile

    pixels = _pixels(33, 47, 7, dtype=np.uint16, high=65536)
    for name, data in (("16.tif", pixels), ("float.tif", pixels.astype(np.float32) / 65535)):
        tifffile.imwrite(tmp_path / name, data)
        image = predictor.read(tmp_path / name)
        assert image.dtype == data.dtype and (image == data).all()
        assert predictor(tmp_path / name).shape == (33, 47)


def test_predict_config_checks():
    from segtrain.config import PredictAppConfig, validate_predict
    from segtrain.errors import ConfigError

    base = OmegaConf.structured(PredictAppConfig)
    with pytest.raises(ConfigError, match="missing input="):
        validate_predict(OmegaConf.merge(base, {"ckpt": "a.pt"}))
    for key, value, match in (("alpha", 1.5, "predict.alpha"), ("batch_size", 0, "predict.batch_size")):
        cfg = OmegaConf.merge(base, {"ckpt": "a.pt", "input": "x", "predict": {key: value}})
        with pytest.raises(ConfigError, match=match):
            validate_predict(cfg)


# ----------------------------------------------------------------------------------------------------
# Hostile inputs and outputs (issue 21): run in-process, through the command's own job function.


@pytest.fixture(scope="module")
def predict_config():
    """segtrain-predict's config composed as the command composes it, with its ``hydra`` node (one Hydra
    composition per module: each costs a second); CPU, fp32, no loader workers."""
    from hydra import compose, initialize_config_dir

    from segtrain.config import config_dir, register_configs

    register_configs()
    args = ["device=cpu", "device.precision=fp32", "data.num_workers=0", "trainer.progress=false", "ckpt=x", "input=x"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("predict", overrides=args, return_hydra_config=True)


def predict_job(composed, cwd, *overrides):
    """``segtrain-predict OVERRIDES`` (top-level and predict.* keys) in this process, run in ``cwd`` with the
    Hydra config of ``composed`` set meanwhile: its summary, or the SegtrainError it raises."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from segtrain.apps.predict import run_predict

    cfg = composed.copy()
    with open_dict(cfg):
        del cfg["hydra"]
    for item in overrides:  # as Hydra parses them: 'key=' is an empty string, quotes keep blanks
        key, value = item.split("=", 1)
        text = value[1:-1] if value[:1] == value[-1:] == "'" and len(value) > 1 else None
        if text is None and value:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        else:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{key}=x"]))
            OmegaConf.update(cfg, key, text or "")
    hydra, before = HydraConfig.instance(), HydraConfig.instance().cfg
    hydra.set_config(composed)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(cwd)
            return run_predict(cfg)
    finally:
        hydra.cfg = before  # the other tests see no Hydra run


def _tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_predict_never_replaces_what_it_did_not_write(ckpt, predict_config, tmp_path):
    """Re-running into its own input folder: the earlier masks and overlays are recognised (not taken as new
    images) and replaced only with overwrite=true; a file of the user's in output= likewise; an input, a
    checkpoint (also through a link) or a run dir's files never; all refused before the model loads."""
    import os

    from segtrain.errors import OutputError

    (tmp_path / "jp").mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.fromarray(_pixels(40, 52, len(name))).save(tmp_path / "jp" / name)
    job = [f"ckpt={ckpt}", "input=jp", "output=jp"]
    assert predict_job(predict_config, tmp_path, *job, "run_dir=r1")["predicted"] == 2
    outputs = {"a.png", "a_overlay.jpg", "b.png", "b_overlay.jpg"}
    assert {p.name for p in (tmp_path / "jp").iterdir()} == {"a.jpg", "b.jpg", *outputs}
    before = _tree(tmp_path / "jp")
    with pytest.raises(
        OutputError, match=r"output=jp already holds 4 file\(s\) .*\(jp/a.png is an earlier prediction\); set"
    ):
        predict_job(predict_config, tmp_path, *job, "run_dir=r2")
    assert _tree(tmp_path / "jp") == before and not (tmp_path / "r2").exists()
    summary = predict_job(predict_config, tmp_path, *job, "run_dir=r3", "overwrite=true")
    assert summary["predicted"] == 2 and summary["skipped"] == {}  # its masks were not read as new images
    with pytest.raises(OutputError, match="the run dir r3 already holds predict.json of an earlier run"):
        predict_job(predict_config, tmp_path, f"ckpt={ckpt}", "input=jp/a.jpg", "output=other", "run_dir=r3")

    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "a.png").write_bytes(b"the user's own file")
    with pytest.raises(OutputError, match="masks/a.png is a file this command did not write"):
        predict_job(predict_config, tmp_path, f"ckpt={ckpt}", "input=jp/a.jpg", "output=masks", "run_dir=r4")
    os.symlink(ckpt, tmp_path / "masks" / "b.png")  # a link to the checkpoint: never, not even with overwrite
    refusals = {
        "masks/b.png is the checkpoint ckpt=": ["input=jp/b.jpg", "output=masks", "overwrite=true"],
        f"{ckpt.parent}/last.png is in checkpoints/ of the training run": [
            f"input={tmp_path}/jp/*st.png",
            f"output={ckpt.parent}",
        ],
        "never replaced, not even with overwrite=true": ["input=jp/a.png", "output=jp", "overwrite=true"],
    }
    Image.fromarray(_pixels(40, 52)).save(tmp_path / "jp" / "last.png")
    for match, args in refusals.items():
        with pytest.raises(OutputError, match=match):
            predict_job(predict_config, tmp_path, f"ckpt={ckpt}", *args, "run_dir=r5")
    assert (tmp_path / "masks" / "a.png").read_bytes() == b"the user's own file" and not (tmp_path / "r5").exists()
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["best.pt", "last.pt"]


def test_mixed_pixel_types_predict_as_separate_images(ckpt, predictor, predict_config, tmp_path):
    """An 8-bit and a 16-bit PNG of one size in a folder (and in one Predictor.scores call): each is predicted
    as it is predicted alone, never stacked into one batch ('Promotion for uint16')."""
    (tmp_path / "in").mkdir()
    eight, deep = _pixels(40, 52, 1), _pixels(40, 52, 2, dtype=np.uint16, high=65536)
    Image.fromarray(eight).save(tmp_path / "in" / "a8.png")
    assert cv2.imwrite(str(tmp_path / "in" / "b16.png"), deep[..., ::-1])
    alone = [predictor.scores([predictor.read(tmp_path / "in" / n)])[0] for n in ("a8.png", "b16.png")]
    both = predictor.scores([predictor.read(tmp_path / "in" / "a8.png"), predictor.read(tmp_path / "in" / "b16.png")])
    assert torch.allclose(both, torch.stack(alone), atol=1e-5)
    with pytest.raises(ValueError, match="expected HxWx3 images"):
        predictor.scores([eight[..., :1]])
    summary = predict_job(
        predict_config, tmp_path, f"ckpt={ckpt}", "input=in", "output=out", "run_dir=run", "predict.batch_size=8"
    )
    assert summary["predicted"] == 2 and summary["skipped"] == {}
    for name, scores in zip(("a8", "b16"), alone):
        assert (np.asarray(Image.open(tmp_path / "out" / f"{name}.png")) == predictor.labels(scores).numpy()).all()


def test_predict_paths_that_are_not_what_they_seem(ckpt, predict_config, tmp_path):
    """A blank input (it would read the working directory), a device, a FIFO, a folder as ckpt=, a file as
    output=: each says what the path is and what was expected, before the model loads."""
    import os

    from segtrain.errors import CheckpointError, ConfigError, DataError

    os.mkfifo(tmp_path / "pipe.png")
    Image.fromarray(_pixels(40, 52)).save(tmp_path / "a.jpg")
    cases = [
        (ConfigError, "input='' is blank", ["input="]),
        (ConfigError, "input='  ' is blank", ["input='  '"]),
        (DataError, "input=/dev/null is a character device, not an image file or a folder", ["input=/dev/null"]),
        (DataError, "input=pipe.png is a FIFO \\(named pipe\\)", ["input=pipe.png"]),
        (
            CheckpointError,
            f"ckpt={ckpt.parent.parent} is a directory, not a checkpoint file; give the file in it: ckpt=.*best.pt",
            [f"ckpt={ckpt.parent.parent}"],
        ),
        (OutputError, "output=a.jpg is a file; segtrain-predict writes its masks into a folder", ["output=a.jpg"]),
        (ConfigError, "output=' ' is blank", ["output=' '"]),
        (DataError, "input=.*last.pt is a checkpoint, not an image: give it as ckpt=", [f"input={ckpt}"]),
    ]
    for error, match, args in cases:
        with pytest.raises(error, match=match):
            predict_job(predict_config, tmp_path, f"ckpt={ckpt}", "input=a.jpg", "run_dir=run", *args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jpg", "pipe.png"]


def test_predict_animated_and_other_image_types(ckpt, predict_config, tmp_path):
    """A GIF in a folder is listed as skipped with the key that adds it; an animated GIF given by name is
    predicted on its first frame, with a warning line and a note in predict.json."""
    from segtrain.errors import DataError

    (tmp_path / "in").mkdir()
    Image.fromarray(_pixels(40, 52)).save(tmp_path / "in" / "a.jpg")
    frames = [Image.fromarray(_pixels(40, 52, k)) for k in range(3)]
    frames[0].save(tmp_path / "in" / "anim.gif", save_all=True, append_images=frames[1:])
    summary = predict_job(predict_config, tmp_path, f"ckpt={ckpt}", "input=in", "output=out", "run_dir=r1")
    reason = "a .gif image, a type predict.extensions leaves out (add .gif to it to predict it)"
    assert summary["predicted"] == 1 and summary["skipped"] == {"in/anim.gif": reason}
    assert json.loads((tmp_path / "r1" / "predict.json").read_text())["skipped"] == summary["skipped"]
    summary = predict_job(predict_config, tmp_path, f"ckpt={ckpt}", "input=in/anim.gif", "output=out", "run_dir=r2")
    assert summary["notes"] == {"in/anim.gif": "3 frames (an animated image): the first is predicted"}
    with Image.open(tmp_path / "out" / "anim.png") as im:
        assert im.size == (52, 40)
    with pytest.raises(DataError, match=r"holds no image files .* 1 image\(s\) of other types, e.g. a .gif image"):
        predict_job(predict_config, tmp_path, f"ckpt={ckpt}", "input=in/*.gif", "output=out", "run_dir=r3")


def test_run_dir_messages_name_the_command(tiny_run, tmp_path, monkeypatch):
    """hydra.run.dir= a training run's dir (or a folder inside its checkpoints/), or an earlier run's without
    overwrite=true: one line that names what the command would write there; nothing is created."""
    from omegaconf import OmegaConf

    from segtrain.apps.guard import Refused, RunDirGuard

    monkeypatch.setattr(RunDirGuard, "check_config", lambda self, config, values=True: None)  # the run dir alone

    def refused(name, folder, **keys):
        config = OmegaConf.create({"hydra": {"job": {"name": name}, "run": {"dir": str(folder)}}, **keys})
        with pytest.raises(Refused) as e:
            RunDirGuard(train=False).on_run_start(config)
        assert e.value.error.exit_code == 4 and len(str(e.value)) <= 300
        return str(e.value)

    assert "segtrain-predict would write predict.json (and, without output=, the masks)" in refused("predict", tiny_run)
    assert "segtrain-export would write its log (and, without output=, the exported model)" in refused(
        "export", tiny_run, overwrite=False
    )
    assert "segtrain-info would write info.json there" in refused("info", tiny_run)
    assert "metrics.json this would replace" in refused("eval", tiny_run)
    assert "is in checkpoints/ of the run" in refused("predict", tiny_run / "checkpoints" / "x", overwrite=True)
    (tmp_path / "earlier" / ".hydra").mkdir(parents=True)
    assert "holds an earlier run (.hydra/)" in refused("predict", tmp_path / "earlier", overwrite=False)
    RunDirGuard(train=False).on_run_start(
        OmegaConf.create(
            {"hydra": {"job": {"name": "predict"}, "run": {"dir": str(tmp_path / "earlier")}}, "overwrite": True}
        )
    )
    assert not (tiny_run / "checkpoints" / "x").exists()


def test_predict_out_of_memory_is_advice(predictor, monkeypatch):
    """Too many images at once (a huge predict.batch_size): exit 5 with the keys that help, not a traceback."""
    from segtrain.errors import ResourceError
    from segtrain.predict import _scores

    def oom(images):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(predictor, "scores", oom)
    cfg = OmegaConf.create({"predict": {"batch_size": 4096}})
    with pytest.raises(ResourceError, match=r"4096 image\(s\) of 52x40 px at once on cpu: lower predict.batch_size"):
        _scores(predictor, [_pixels(40, 52)] * 4096, cfg)
    monkeypatch.setattr(predictor, "scores", lambda images: torch.ones(1).view(2))  # another error stays itself
    with pytest.raises(RuntimeError, match="shape"):
        _scores(predictor, [_pixels(40, 52)], cfg)
