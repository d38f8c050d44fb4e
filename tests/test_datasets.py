"""On-disk data sets (VOC, Cityscapes, ADE20K, folder), the standard pipelines and the label check,
on miniature real trees written by ``fake_datasets``."""

from pathlib import Path

import numpy as np
import pytest
from conftest import in_process
from fake_datasets import FOLDER_PALETTE, data_cfg, write_ade, write_cityscapes, write_folder, write_png, write_voc
from PIL import Image
from test_evaluate import segtrain_eval

from segtrain.data import transforms as T
from segtrain.data.base import seed_pipeline
from segtrain.data.build import build_datasets
from segtrain.data.checks import cache_dir
from segtrain.errors import ConfigError, DataError

pytestmark = pytest.mark.usefixtures("own_cache")


def load_every_image(cfg) -> None:
    """Build the data sets of ``cfg`` and read every image and mask (what the label check may have skipped)."""
    train, val, _ = build_datasets(cfg, seed=0)
    for ds in (train, val):
        for i in range(len(ds)):
            ds.load(i)


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


# --- layouts ---------------------------------------------------------------------------------------


def test_voc_loads_palette_indices_and_grayscale_jpeg(tmp_path):
    expected = write_voc(tmp_path)
    train, val, _ = build_datasets(data_cfg("voc", tmp_path), seed=0)
    assert len(train) == 4 and len(val) == 2 and len(train.class_names) == 21 and train.palette.shape == (21, 3)
    assert train.palette[1].tolist() == [128, 0, 0] and train.class_names[15] == "person"
    for i in range(len(train)):
        image, mask = train.load(i)
        name = Path(train.describe(i)).stem
        assert image.dtype == np.uint8 and image.shape == (*expected[name].shape, 3)  # grayscale JPEG -> 3 channels
        np.testing.assert_array_equal(mask, expected[name])
    assert 255 in np.unique(train.load(0)[1])
    # validation keeps the whole (odd-sized) image, rescaled to data.base_size [512, 2048] (the training scale)
    img, mask = val[0]
    h, w = expected[Path(val.describe(0)).stem].shape
    assert tuple(img.shape) == (3, 512, round(w * 512 / h)) and tuple(mask.shape) == (h, w)


@pytest.mark.parametrize("sub", ["", "VOCdevkit", "VOCdevkit/VOC2012"])
def test_voc_root_variants(tmp_path, sub):
    write_voc(tmp_path)
    train, _, _ = build_datasets(data_cfg("voc", tmp_path / sub), seed=0)
    assert len(train) == 4


def test_voc_trainval_split(tmp_path):
    write_voc(tmp_path)
    train, _, _ = build_datasets(data_cfg("voc", tmp_path, train_split="trainval"), seed=0)
    assert len(train) == 6


def test_voc_aug(tmp_path):
    expected = write_voc(tmp_path, aug=True)
    train, val, _ = build_datasets(data_cfg("voc_aug", tmp_path), seed=0)
    assert len(train) == 4 and len(val) == 2 and "SegmentationClassAug" in str(train.masks[0])
    np.testing.assert_array_equal(train.load(1)[1], expected[Path(train.describe(1)).stem])
    write_voc(tmp_path / "plain")
    with pytest.raises(DataError, match="SegmentationClassAug is missing"):
        build_datasets(data_cfg("voc_aug", tmp_path / "plain"), seed=0)


def test_cityscapes_trainid_mapping(tmp_path):
    expected = write_cityscapes(tmp_path)
    train, val, _ = build_datasets(data_cfg("cityscapes", tmp_path), seed=0)
    assert len(train) == 4 and len(val) == 1 and len(train.class_names) == 19 and train.class_names[13] == "car"
    _, mask = train.load(0)
    raw = expected[Path(train.describe(0)).name.replace("_leftImg8bit.png", "")]
    for label_id, train_id in ((7, 0), (26, 13), (24, 11), (0, 255), (33, 18)):
        assert (mask[raw == label_id] == train_id).all()


def test_ade20k_reduce_zero_label(tmp_path):
    expected = write_ade(tmp_path)
    train, val, _ = build_datasets(data_cfg("ade20k", tmp_path), seed=0)
    assert len(train) == 3 and len(val) == 2 and len(train.class_names) == 150 and train.class_names[0] == "wall"
    _, mask = train.load(1)
    raw = expected[Path(train.describe(1)).stem]
    for raw_v, v in ((0, 255), (1, 0), (150, 149), (13, 12)):
        assert (mask[raw == raw_v] == v).all()


@pytest.mark.parametrize("layout,n_train,n_val", [("flat", 5, 1), ("lists", 4, 2), ("dirs", 4, 2)])
def test_folder_layouts_and_rgb_masks(tmp_path, layout, n_train, n_val):
    expected = write_folder(tmp_path, masks="rgb", layout=layout)
    train, val, _ = build_datasets(data_cfg("folder", tmp_path, num_classes=3), seed=0)
    assert (len(train), len(val)) == (n_train, n_val)
    assert train.class_names == ["background", "red", "green"] and train.palette.tolist() == FOLDER_PALETTE.tolist()
    for ds in (train, val):
        for i in range(len(ds)):
            image, mask = ds.load(i)
            np.testing.assert_array_equal(mask, expected[Path(ds.describe(i)).stem])


def test_folder_holdout_is_seeded(tmp_path):
    write_folder(tmp_path, n=10)
    a = build_datasets(data_cfg("folder", tmp_path, num_classes=3), seed=0)[1]
    b = build_datasets(data_cfg("folder", tmp_path, num_classes=3), seed=5)[1]  # training seed: same split
    c = build_datasets(data_cfg("folder", tmp_path, num_classes=3, seed=1, val_fraction=0.3), seed=0)[1]
    assert a.images == b.images and len(a) == 1 and len(c) == 3


def test_folder_unknown_colour_names_file_and_colour(tmp_path):
    write_folder(tmp_path, masks="rgb")
    bad = tmp_path / "masks" / "img_03.png"
    rgb = np.array(Image.open(bad).convert("RGB"))
    rgb[0, 0] = (1, 2, 3)
    write_png(bad, rgb)
    with pytest.raises(DataError) as e:
        build_datasets(data_cfg("folder", tmp_path, num_classes=3), seed=0)
    msg = one_line_error(e)
    assert "img_03.png" in msg and "(1, 2, 3)" in msg


def test_folder_classes_yaml_count_must_match(tmp_path):
    write_folder(tmp_path)
    with pytest.raises(DataError, match=r"set data.num_classes=3"):
        build_datasets(data_cfg("folder", tmp_path, num_classes=4), seed=0)


def test_folder_binary_masks_hint_then_label_map(tmp_path):
    expected = write_folder(tmp_path, masks="binary", classes_yaml=False)
    with pytest.raises(DataError) as e:
        build_datasets(data_cfg("folder", tmp_path, num_classes=2), seed=0)
    assert "data.label_map={255:1}" in one_line_error(e) and "masks look binary" in str(e.value)
    train, _, _ = build_datasets(data_cfg("folder", tmp_path, num_classes=2, label_map={255: 1}), seed=0)
    _, mask = train.load(0)
    np.testing.assert_array_equal(mask, expected[Path(train.describe(0)).stem])


# --- label check and errors ---------------------------------------------------------------------


def test_value_beyond_num_classes_names_file(tmp_path):
    write_voc(tmp_path, bad_value=40)
    with pytest.raises(DataError) as e:
        build_datasets(data_cfg("voc", tmp_path), seed=0)
    msg = one_line_error(e)
    assert "2007_000001.png" in msg and "[40]" in msg and "data.num_classes=41" in msg
    build_datasets(data_cfg("voc", tmp_path, check_labels=False), seed=0)  # switched off: no error
    build_datasets(data_cfg("voc", tmp_path, label_map={40: 255}), seed=0)


def test_label_check_is_cached(tmp_path):
    write_voc(tmp_path)
    build_datasets(data_cfg("voc", tmp_path), seed=0)
    files = list(cache_dir().glob("*.json"))
    assert len(files) == 1
    build_datasets(data_cfg("voc", tmp_path), seed=0)
    assert list(cache_dir().glob("*.json")) == files
    build_datasets(data_cfg("voc", tmp_path, num_classes=22, class_names=None), seed=0)  # a new key
    assert len(list(cache_dir().glob("*.json"))) == 2


def test_missing_split_file(tmp_path):
    write_voc(tmp_path)
    (tmp_path / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").unlink()
    with pytest.raises(DataError) as e:
        build_datasets(data_cfg("voc", tmp_path), seed=0)
    assert "val.txt is missing" in one_line_error(e) and "expected layout" in str(e.value)


@pytest.mark.parametrize("name", ["voc", "cityscapes", "ade20k", "folder"])
def test_empty_missing_and_null_root(tmp_path, name):
    (tmp_path / "empty").mkdir()
    for root, text in (
        (tmp_path / "empty", "expected layout"),
        (tmp_path / "nope", "does not exist"),
        (None, "needs data.root"),
    ):
        with pytest.raises(DataError) as e:
            build_datasets(data_cfg(name, root), seed=0)
        assert text in one_line_error(e)


def test_size_mismatch(tmp_path):
    write_ade(tmp_path)
    ann = tmp_path / "ADEChallengeData2016/annotations/validation/ADE_valid_00000001.png"
    write_png(ann, np.ones((10, 12), np.uint8))
    with pytest.raises(DataError) as e:
        build_datasets(data_cfg("ade20k", tmp_path), seed=0)
    msg = one_line_error(e)
    assert "ADE_valid_00000001" in msg and "same size" in msg


def test_truncated_jpeg(tmp_path):
    write_voc(tmp_path)
    jpg = tmp_path / "VOCdevkit/VOC2012/JPEGImages/2007_000002.jpg"
    jpg.write_bytes(jpg.read_bytes()[:300])
    with pytest.raises(DataError) as e:
        build_datasets(data_cfg("voc", tmp_path), seed=0)
    assert "2007_000002.jpg" in one_line_error(e)


def test_unreadable_image_at_load(tmp_path):
    write_voc(tmp_path)
    train, _, _ = build_datasets(data_cfg("voc", tmp_path, check_labels=False), seed=0)
    (tmp_path / "VOCdevkit/VOC2012/JPEGImages/2007_000002.jpg").write_bytes(b"not a jpeg")  # broken after the start
    with pytest.raises(DataError, match="2007_000002.jpg cannot be read"):
        train.load(2)
    # the header scan runs without the label check
    with pytest.raises(DataError, match="2007_000002.jpg cannot be read"):
        build_datasets(data_cfg("voc", tmp_path, check_labels=False), seed=0)


def test_crop_size_needed_for_batches(tmp_path):
    write_voc(tmp_path)
    with pytest.raises(ConfigError, match="data.crop_size"):
        build_datasets(data_cfg("voc", tmp_path, crop_size=None), seed=0)


# --- pipelines --------------------------------------------------------------------------------------


def test_standard_train_pipeline_crops_pads_and_is_seeded():
    cfg = data_cfg("voc", None, crop_size=[40, 48], base_size=[30, 60], scale_range=[0.5, 1.0])
    pipe = T.standard_train(cfg)
    img = np.full((61, 83, 3), 200, np.uint8)
    mask = np.zeros((61, 83), np.uint8)
    mask[:, 40:] = 3
    outs = []
    for s in (1, 1, 2):
        seed_pipeline(pipe, s)
        outs.append(pipe(image=img, mask=mask))
    for o in outs:
        assert o["image"].shape == (40, 48, 3) and o["mask"].shape == (40, 48) and o["image"].dtype == np.uint8
        assert (o["mask"] == 255).any()  # smaller than the crop after the rescale: padded with ignore_index
    np.testing.assert_array_equal(outs[0]["image"], outs[1]["image"])


def test_cat_max_ratio_redraws_crop():
    mask = np.zeros((100, 100), np.uint8)
    mask[:, 50:] = 1
    image = np.zeros((100, 100, 3), np.uint8)

    def mixed(ratio: float) -> int:
        crop, hits = T.CatMaxRatioCrop(40, 40, cat_max_ratio=ratio), 0
        for s in range(40):
            crop.set_random_seed(s)
            out = crop(image=image, mask=mask)["mask"]
            hits += out.shape == (40, 40) and max((out == 1).mean(), (out == 0).mean()) < 0.75
        return hits

    # one draw gives a crop where neither class fills 75% ~1 time in 3; up to 10 re-draws make it ~always
    assert mixed(1.0) < 22 and mixed(0.75) >= 34


def test_val_pipeline_and_custom_pipeline():
    assert T.standard_val(data_cfg("voc", None, base_size=None)) is None
    out = T.standard_val(data_cfg("voc", None, val_size=32))(
        image=np.zeros((61, 83, 3), np.uint8), mask=np.zeros((61, 83), np.uint8)
    )
    assert out["image"].shape[0] == 32 and out["mask"].shape == (61, 83)  # scored at the original size
    cfg = data_cfg("voc", None, train_pipeline=[{"_target_": "albumentations.CenterCrop", "height": 16, "width": 16}])
    out = T.standard_train(cfg)(image=np.zeros((61, 83, 3), np.uint8), mask=np.zeros((61, 83), np.uint8))
    assert out["image"].shape == (16, 16, 3)
    with pytest.raises(ConfigError, match="Normalize"):
        T.standard_train(data_cfg("voc", None, train_pipeline=[{"_target_": "albumentations.Normalize"}]))
    nested = {"_target_": "albumentations.OneOf", "transforms": [{"_target_": "albumentations.Normalize"}]}
    with pytest.raises(ConfigError, match=r"data.train_pipeline\[0\] holds Normalize: remove it"):
        T.standard_train(data_cfg("voc", None, train_pipeline=[nested]))
    with pytest.raises(ConfigError, match="holds ToTensorV2"):
        T.standard_train(data_cfg("voc", None, train_pipeline=[{"_target_": "albumentations.pytorch.ToTensorV2"}]))


# --- the CLI ------------------------------------------------------------------------------------------

FAST = [
    "debug=smoke",
    "data.crop_size=32",
    "data.base_size=48",
    "trainer.max_iters=2",
    "model.base_channels=4",
    "trainer.num_vis=0",
    "trainer.progress=false",
    "device=cpu",
    "data.batch_size=2",
]


def segtrain_in_process(cwd: Path, *args: str, run_dir: str = "run"):
    """``segtrain ARGS hydra.run.dir=RUN_DIR`` in this process (the command's own entry point, without a process
    start-up of seconds): (CompletedProcess, run dir)."""
    proc = in_process([*args, f"hydra.run.dir={run_dir}"], cwd, "segtrain")
    assert proc.returncode == 0, f"segtrain {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc, cwd / run_dir


@pytest.mark.parametrize(
    "name,writer,extra",
    [
        ("voc", write_voc, []),
        ("cityscapes", write_cityscapes, []),
        ("ade20k", write_ade, []),
        ("folder", write_folder, ["data.num_classes=3"]),
    ],
)
def test_cli_trains_on_each_tree(tmp_path, name, writer, extra):
    """``segtrain data=NAME data.root=ROOT``, through the command's entry point in this process (the command as a
    subprocess: tests/conftest.py's finished_run, and test_cli_bad_masks_one_line_error_then_label_map_trains)."""
    root = tmp_path / "data"
    writer(root)
    proc, run = segtrain_in_process(tmp_path, f"data={name}", f"data.root={root}", *FAST, *extra)
    assert (run / "metrics.json").is_file(), proc.stdout


def test_val_size_scores_at_the_original_mask_size(tmp_path):
    """data.val_size rescales validation images only; the predictions are resized back to each mask (mmseg)."""
    root = tmp_path / "data"
    expected = write_voc(root)
    fast = [a for a in FAST if not a.startswith("trainer.num_vis")]
    _, run = segtrain_in_process(
        tmp_path, "data=voc", f"data.root={root}", *fast, "data.val_size=24", "trainer.num_vis=2"
    )
    assert (run / "metrics.json").is_file()
    m = segtrain_eval(tmp_path, "ev", f"ckpt={run / 'checkpoints' / 'last.pt'}")
    val = sorted(expected)[-2:]  # write_voc: the last n_val=2 ids are the val split
    labelled = sum(int((expected[n] != 255).sum()) for n in val)
    assert sum(map(sum, m["confusion_matrix"])) == labelled


def test_cli_bad_masks_one_line_error_then_label_map_trains(cli):
    root = cli.cwd / "data"
    write_folder(root, masks="binary", classes_yaml=False)
    env = {"SEGTRAIN_CACHE": str(cli.cwd / "cache")}
    # the plan maps 255 to 1 in masks that hold only 0 and 255 (data.label_map left unset); set to null, the label
    # check names the fix
    proc, _ = cli("data=folder", f"data.root={root}", *FAST, "data.label_map=null", check=False, env=env)
    assert proc.returncode != 0
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("segtrain: error:"), proc.stderr
    assert (
        "Traceback" not in proc.stderr
        and "masks" in err[0]
        and "img_0" in err[0]
        and "data.label_map={255:1}" in err[0]
    )
    # planned, it trains (in this process, through the command's entry point: a process start-up saved); an explicit
    # data.label_map={255:1} trains as well (tests/test_recipes.py's medical recipe)
    proc, run = segtrain_in_process(cli.cwd, "data=folder", f"data.root={root}", *FAST, run_dir="planned")
    assert (run / "metrics.json").is_file() and "plan: data.label_map={255: 1}" in proc.stdout + proc.stderr
    # segtrain-eval on a separate test folder of the same kind: the checkpoint's label_map carries over, and
    # data.val_fraction=1 scores every image (docs/recipes.md); in this process too (the command as a subprocess:
    # tests/test_evaluate.py)
    test = cli.cwd / "test"
    write_folder(test, masks="binary", classes_yaml=False, n=3)
    args = [f"ckpt={run / 'checkpoints' / 'last.pt'}", "data=folder", f"data.root={test}", "data.val_fraction=1"]
    assert segtrain_eval(cli.cwd, "ev", *args)["num_images"] == 3


# --- the messages of issue 16 ---------------------------------------------------------------------


def test_split_list_with_a_byte_order_mark_loads(tmp_path):
    write_folder(tmp_path, layout="lists")
    for name in ("train.txt", "val.txt"):  # as Windows Notepad saves UTF-8 (with CRLF line ends)
        text = (tmp_path / name).read_text().replace("\n", "\r\n")
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
    train, val, _ = build_datasets(data_cfg("folder", tmp_path, num_classes=3), seed=0)
    assert len(train) == 4 and len(val) == 2 and Path(train.describe(0)).stem == "img_00"


def _rotate_exif(path: Path, orientation: int = 6) -> None:
    im = Image.open(path)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(path, exif=exif.tobytes(), quality=95)


@pytest.mark.parametrize("check_labels", [True, False])
def test_exif_rotated_image_is_named_as_such(tmp_path, check_labels):
    write_folder(tmp_path)
    _rotate_exif(tmp_path / "images" / "img_00.jpg")  # 83x61 as stored, its mask too; shown as 61x83
    cfg = data_cfg("folder", tmp_path, num_classes=3, check_labels=check_labels)
    with pytest.raises(DataError) as e:
        load_every_image(cfg)
    msg = one_line_error(e)
    assert "img_00.jpg has EXIF orientation 6" in msg and "61x83" in msg and "83x61" in msg, msg
    assert "remove the orientation tag" in msg


@pytest.mark.parametrize("check_labels", [True, False])
def test_exif_tag_is_ignored_for_other_band_counts(tmp_path, check_labels):
    """in_channels != 3 reads images as stored (no rotation), as their masks: the check must agree."""
    write_folder(tmp_path)
    for p in (tmp_path / "images").iterdir():  # every image as 1-band grayscale JPEG, one with an EXIF tag
        Image.open(p).convert("L").save(p.with_suffix(".jpg"), quality=95)
        if p.suffix != ".jpg":
            p.unlink()
    _rotate_exif(tmp_path / "images" / "img_00.jpg")
    cfg = data_cfg("folder", tmp_path, num_classes=3, in_channels=1, mean=[0.5], std=[0.25], check_labels=check_labels)
    load_every_image(cfg)


def test_bad_ignore_color_is_one_line(tmp_path):
    write_folder(tmp_path, masks="rgb")
    (tmp_path / "classes.yaml").write_text(
        "names: [a, b, c]\npalette: [[0,0,0],[255,0,0],[0,255,0]]\nignore_color: [255, 255, white]\n"
    )
    with pytest.raises(DataError) as e:
        build_datasets(data_cfg("folder", tmp_path, num_classes=3), seed=0)
    assert "ignore_color must be one [r, g, b] colour with integers in [0, 255]" in one_line_error(e)


def test_eval_split_alone_and_a_whole_folder(tmp_path):
    """segtrain-eval builds the validation split only: ROOT/val without ROOT/train, or every image of a flat
    folder with data.val_fraction=1 (which training refuses)."""
    write_folder(tmp_path / "dirs", layout="dirs")
    import shutil

    shutil.rmtree(tmp_path / "dirs" / "train")
    train, val, _ = build_datasets(data_cfg("folder", tmp_path / "dirs", num_classes=3, base_size=64), 0, train=False)
    assert train is None and len(val) == 2 and val.transform is not None
    write_folder(tmp_path / "flat")
    cfg = data_cfg("folder", tmp_path / "flat", num_classes=3, val_fraction=1.0, base_size=64)
    _, val, _ = build_datasets(cfg, seed=0, train=False)
    assert len(val) == 6
    val.load(5)
    with pytest.raises(DataError, match="data.val_fraction=1 puts every image in validation"):
        build_datasets(cfg, seed=0)
    with pytest.raises(ConfigError, match="data.mean=auto is computed from the training images"):
        build_datasets(
            data_cfg("folder", tmp_path / "flat", num_classes=3, base_size=64, mean="auto", std="auto"), 0, train=False
        )


@pytest.mark.parametrize("check_labels", [True, False])
def test_jpeg_masks_get_save_as_png(tmp_path, check_labels):
    write_folder(tmp_path, classes_yaml=False, num_classes=2)
    for png in (tmp_path / "masks").glob("*.png"):  # 0/1 bands saved lossy, as 0/255 JPEGs: edge values appear
        mask = np.asarray(Image.open(png)) * 255
        png.unlink()
        Image.fromarray(mask).save(png.with_suffix(".jpg"), quality=75)
    cfg = data_cfg("folder", tmp_path, num_classes=2, label_map={255: 1}, check_labels=check_labels)
    with pytest.raises(DataError) as e:
        load_every_image(cfg)
    msg = one_line_error(e)
    assert "masks are JPEG files" in msg and "save masks as PNG" in msg and ".jpg" in msg, msg
    assert "data.num_classes=" not in msg


def test_label_map_error_reports_the_value_in_the_file(tmp_path):
    write_voc(tmp_path)  # palette PNGs with 255 borders
    with pytest.raises(DataError) as e:
        build_datasets(data_cfg("voc", tmp_path, label_map={255: 30}), seed=0)
    msg = one_line_error(e)
    assert "has values [255] that data.label_map turns into [30]" in msg, msg
    assert "map them to a class in [0, 21) or to data.ignore_index=255" in msg


def test_bad_mask_value_without_the_label_check_names_the_file(tmp_path):
    write_voc(tmp_path, bad_value=40)
    train, _, _ = build_datasets(data_cfg("voc", tmp_path, check_labels=False), seed=0)
    train.load(0)  # good masks load
    with pytest.raises(DataError) as e:
        train.load(1)
    msg = one_line_error(e)
    assert "2007_000001.png has values [40]" in msg and "data.num_classes=41" in msg, msg
    assert "data.check_labels=false" in msg
