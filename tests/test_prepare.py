"""``segtrain-data``: VOC / SBD / Cityscapes preparation on tiny local archives, through the real CLI."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segtrain.apps import data as data_app
from segtrain.data import prepare
from tests.conftest import console_script

scipy_io = pytest.importorskip("scipy.io")

VOC_IDS = ["2007_000001", "2007_000002", "2007_000003", "2007_000004"]  # 4 has a JPEG but no VOC mask
SBD_IDS = {"2007_000001": 11, "2007_000003": 12, "2007_000004": 13}  # id -> class in its SBD mask
H, W = 56, 72


def prepare_exe() -> list[str]:
    return console_script("segtrain-data")


def run_prepare(*args: str, cwd: Path, timeout: int = 60) -> subprocess.CompletedProcess:
    """The installed ``segtrain-data`` in a subprocess (each start costs ~3 s: ``segtrain.data`` imports torch)."""
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("SEGTRAIN_DATA_DEBUG", None)
    return subprocess.run(prepare_exe() + list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def prep(capsys):
    """``segtrain-data ARGS`` in-process through ``main`` (fast); returns a CompletedProcess-like result."""

    def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        capsys.readouterr()
        try:
            rc = data_app.main(list(args))
        except SystemExit as e:  # argparse
            rc = e.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), rc, out, err)

    return _run


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("segtrain-data: error: "), proc.stderr
    assert len(lines[0]) <= 300, f"{len(lines[0])} characters: {lines[0]}"
    assert "Traceback" not in proc.stderr + proc.stdout
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _png_bytes(arr: np.ndarray, palette: bool = False) -> bytes:
    im = Image.fromarray(arr)
    if palette:  # putpalette turns an L image into a P image with the same indices
        pal = np.zeros((256, 3), np.uint8)
        pal[:21] = np.random.default_rng(0).integers(0, 255, (21, 3))
        pal[255] = 224
        im.putpalette(pal.ravel().tolist())
        assert im.mode == "P"
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def voc_mask(i: int) -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[8:40, 10:50] = i + 1  # class 1..3
    m[8, 10:50] = 255  # boundary
    return m


def make_voc_tar(path: Path, extra: tuple[str, bytes] | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    base = "VOCdevkit/VOC2012"
    masks = {}
    with tarfile.open(path, "w") as tf:
        for i, n in enumerate(VOC_IDS):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(buf, format="JPEG")
            _add(tf, f"{base}/JPEGImages/{n}.jpg", buf.getvalue())
            if i < 3:
                masks[n] = voc_mask(i)
                _add(tf, f"{base}/SegmentationClass/{n}.png", _png_bytes(masks[n], palette=True))
        _add(tf, f"{base}/ImageSets/Segmentation/train.txt", f"{VOC_IDS[0]}\n{VOC_IDS[1]}\n".encode())
        _add(tf, f"{base}/ImageSets/Segmentation/val.txt", f"{VOC_IDS[2]}\n".encode())
        if extra is not None:
            _add(tf, *extra)
    return masks


def sbd_mask(cls: int) -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[20:50, 5:60] = cls
    m[30, :] = 255
    return m


def make_sbd_tgz(path: Path, tmp: Path) -> None:
    with tarfile.open(path, "w:gz") as tf:
        for n, cls in SBD_IDS.items():
            mat = tmp / f"{n}.mat"
            seg = sbd_mask(cls)
            # as in SBD: a 1x1 struct GTcls with Boundaries (cell), Segmentation (uint8) and CategoriesPresent
            scipy_io.savemat(
                mat,
                {
                    "GTcls": {
                        "Boundaries": np.empty((1, 0), dtype=object),
                        "Segmentation": seg,
                        "CategoriesPresent": np.array([[cls]], np.uint8),
                    }
                },
            )
            back = scipy_io.loadmat(mat)["GTcls"][0]["Segmentation"][0]
            assert back.dtype == np.uint8 and back.shape == (H, W) and np.array_equal(back, seg)
            tf.add(mat, f"benchmark_RELEASE/dataset/cls/{n}.mat")
        _add(tf, "benchmark_RELEASE/dataset/train.txt", b"2007_000004\n2007_000001\n")
        _add(tf, "benchmark_RELEASE/dataset/val.txt", b"2007_000003\n")


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("archives")
    voc = d / "VOCtrainval_11-May-2012.tar"
    masks = make_voc_tar(voc)
    sbd = d / "benchmark.tgz"
    make_sbd_tgz(sbd, tmp_path_factory.mktemp("mats"))
    return {"voc": voc, "sbd": sbd, "masks": masks}


def test_voc_extract_verify_and_skip(prep, tmp_path, archives):
    voc = archives["voc"]
    root = tmp_path / "data"
    proc = prep("voc", "--root", str(root), "--archive", str(voc), "--md5", md5(voc), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    base = root / "VOCdevkit" / "VOC2012"
    assert sorted(p.stem for p in (base / "JPEGImages").glob("*.jpg")) == VOC_IDS
    assert (base / "ImageSets" / "Segmentation" / "val.txt").read_text().split() == [VOC_IDS[2]]
    # second run: layout present, nothing to download or extract
    proc = prep("voc", "--root", str(root), "--url", "http://127.0.0.1:9/x.tar", cwd=tmp_path)
    assert proc.returncode == 0 and "skipping" in proc.stdout, proc.stderr
    # the official md5 rejects the test archive
    proc = prep("voc", "--root", str(tmp_path / "d2"), "--archive", str(voc), cwd=tmp_path)
    assert_one_line_error(proc, "md5", "6cd6e144f989b92b3379bac3b3de84fd")
    proc = prep("voc", "--root", str(tmp_path / "d3"), "--archive", str(voc), "--no-verify", cwd=tmp_path)
    assert proc.returncode == 0 and (tmp_path / "d3" / "VOCdevkit" / "VOC2012" / "JPEGImages").is_dir(), proc.stderr


def test_voc_corrupt_archive(prep, tmp_path, archives):
    bad = tmp_path / "VOCtrainval_11-May-2012.tar"
    data = archives["voc"].read_bytes()
    bad.write_bytes(data[: len(data) // 3])  # truncated download
    proc = prep(
        "voc", "--root", str(tmp_path / "d"), "--archive", str(bad), "--md5", md5(archives["voc"]), cwd=tmp_path
    )
    assert_one_line_error(proc, "corrupt", "md5")
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"not a tar" * 100)
    proc = prep("voc", "--root", str(tmp_path / "d"), "--archive", str(garbage), "--md5", md5(garbage), cwd=tmp_path)
    assert_one_line_error(proc, "cannot extract")
    proc = prep("voc", "--root", str(tmp_path / "d"), "--archive", str(tmp_path / "nope.tar"), cwd=tmp_path)
    assert_one_line_error(proc, "nope.tar")


@pytest.mark.parametrize("member", ["../evil.txt", "/tmp/segtrain_evil.txt", "VOCdevkit/../../evil.txt"])
def test_path_traversal_refused(prep, tmp_path, member):
    tar = tmp_path / "evil.tar"
    make_voc_tar(tar, extra=(member, b"pwned"))
    root = tmp_path / "a" / "b"
    proc = prep("voc", "--root", str(root), "--archive", str(tar), "--no-verify", cwd=tmp_path)
    assert_one_line_error(proc, "refusing", member)
    assert not (tmp_path / "a" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert not (root / "VOCdevkit").exists()  # checked before anything is written


def test_symlink_escape_refused(prep, tmp_path):
    tar = tmp_path / "evil.tar"
    with tarfile.open(tar, "w") as tf:
        info = tarfile.TarInfo("VOCdevkit/link")
        info.type = tarfile.SYMTYPE
        info.linkname = "../../.."
        tf.addfile(info)
    proc = prep("voc", "--root", str(tmp_path / "r"), "--archive", str(tar), "--no-verify", cwd=tmp_path)
    assert_one_line_error(proc, "refusing", "link")


def test_offline_download_fails_fast(tmp_path):
    url = "http://127.0.0.1:9/x.tar"
    t0 = time.monotonic()
    proc = run_prepare("voc", "--root", str(tmp_path / "d"), "--url", url, cwd=tmp_path, timeout=30)
    assert time.monotonic() - t0 < 15
    assert_one_line_error(proc, url, "--archive /path/to/VOCtrainval_11-May-2012.tar")
    assert not (tmp_path / "d" / "VOCtrainval_11-May-2012.tar").exists()


def test_usage_errors_are_one_line(prep, tmp_path):
    assert_one_line_error(run_prepare(cwd=tmp_path))
    assert_one_line_error(prep("voc"), "--root")
    assert_one_line_error(prep("imagenet", "--root", "x"), "imagenet")
    assert_one_line_error(prep("sbd", "--root", "x", "--workers", "-1"), "--workers")


def test_sbd_needs_voc(prep, tmp_path, archives):
    proc = prep("sbd", "--root", str(tmp_path), "--archive", str(archives["sbd"]), "--no-verify", cwd=tmp_path)
    assert_one_line_error(proc, "segtrain-data voc --root")


def test_sbd_conversion_and_training(prep, tmp_path, archives):
    root = tmp_path / "data"
    voc, sbd = archives["voc"], archives["sbd"]
    proc = prep("voc", "--root", str(root), "--archive", str(voc), "--md5", md5(voc))
    assert proc.returncode == 0, proc.stderr
    bad = prep("sbd", "--root", str(root), "--archive", str(sbd))  # official md5
    assert_one_line_error(bad, "82b4d87ceb2ed10f6038a1cba92111cb")
    proc = run_prepare(
        "sbd", "--root", str(root), "--archive", str(sbd), "--md5", md5(sbd), "--workers", "2", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    base = root / "VOCdevkit" / "VOC2012"
    # (SBD train ∪ SBD val ∪ VOC train) − VOC val, sorted
    aug = (base / "ImageSets" / "Segmentation" / "aug.txt").read_text().split()
    assert aug == ["2007_000001", "2007_000002", "2007_000004"]
    out = base / "SegmentationClassAug"
    assert sorted(p.stem for p in out.glob("*.png")) == VOC_IDS
    for n in VOC_IDS:
        im = Image.open(out / f"{n}.png")
        assert im.mode == "L"
        arr = np.array(im)
        if n in archives["masks"]:  # VOC's own mask wins, stored as indices (not palette colours)
            np.testing.assert_array_equal(arr, archives["masks"][n])
        else:
            np.testing.assert_array_equal(arr, sbd_mask(SBD_IDS[n]))
    assert set(np.unique(np.array(Image.open(out / "2007_000004.png")))) == {0, 13, 255}
    # rerun: already extracted, reconverted from the extracted tree without the archive
    proc = prep("sbd", "--root", str(root), "--workers", "1")
    assert proc.returncode == 0 and "benchmark.tgz" not in proc.stdout, proc.stderr
    # the converted tree trains with data=voc_aug (segtrain's entry point in this process: a start-up saved)
    from conftest import in_process

    args = ["data=voc_aug", f"data.root={root}", "debug=smoke", "data.crop_size=48", "trainer.max_iters=2",
            "model.base_channels=4", "hydra.run.dir=run"]  # fmt: skip
    train = in_process(args, tmp_path, "segtrain")
    assert train.returncode == 0, train


def test_cityscapes_train_ids(prep, tmp_path):
    from segtrain.data.cityscapes import LABEL_TO_TRAIN

    gt = tmp_path / "cs" / "gtFine"
    raw = np.array([[7, 8, 26, 24], [33, 0, 1, 255], [11, 21, 23, 31]], np.uint8).repeat(8, 0).repeat(8, 1)
    paths = []
    for split, city in (("train", "aachen"), ("val", "frankfurt")):
        p = gt / split / city / f"{city}_000000_000019_gtFine_labelIds.png"
        p.parent.mkdir(parents=True)
        Image.fromarray(raw).save(p)
        paths.append(p)
    proc = prep("cityscapes", "--root", str(tmp_path / "cs"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    expected = np.vectorize(lambda v: LABEL_TO_TRAIN.get(int(v), 255))(raw).astype(np.uint8)
    for p in paths:
        out = np.array(Image.open(p.with_name(p.name.replace("labelIds", "labelTrainIds"))))
        np.testing.assert_array_equal(out, expected)
    assert expected[0, 0] == 0 and expected[0, 16] == 13 and expected[8, 0] == 18 and expected[8, 8] == 255
    proc = prep("cityscapes", "--root", str(tmp_path / "empty"), cwd=tmp_path)
    assert_one_line_error(proc, "login", "gtFine_trainvaltest.zip", "leftImg8bit_trainvaltest.zip", "gtFine/")


def test_cut_off_or_deleted_extraction_is_redone(prep, tmp_path, archives):
    """A ``.extracting`` marker (an extraction cut off) makes complete-looking data count as not done, and a
    ``.extracted`` marker does not stand in for data that was deleted since."""
    root = tmp_path / "data"
    root.mkdir()
    voc = root / "VOCtrainval_11-May-2012.tar"  # where a download would have put it
    voc.write_bytes(archives["voc"].read_bytes())
    assert prep("voc", "--root", str(root), "--md5", md5(voc)).returncode == 0
    base = root / "VOCdevkit" / "VOC2012"
    marker = root / ".segtrain-data" / "voc2012.extracting"
    # cut off half way: the folders are there, a file is not, the marker is
    (base / "JPEGImages" / f"{VOC_IDS[3]}.jpg").unlink()
    marker.touch()
    sbd = prep("sbd", "--root", str(root), "--archive", str(archives["sbd"]), "--no-verify")
    assert_one_line_error(sbd, "segtrain-data voc --root")
    proc = prep("voc", "--root", str(root), "--md5", md5(voc))
    assert proc.returncode == 0 and "extracting" in proc.stdout, proc.stdout + proc.stderr
    assert (base / "JPEGImages" / f"{VOC_IDS[3]}.jpg").is_file() and not marker.exists()
    # the data deleted after a finished extraction: extracted again (the marker does not count alone)
    for archive in (["--archive", str(voc)], []):
        shutil.rmtree(root / "VOCdevkit")
        proc = prep("voc", "--root", str(root), *archive, "--md5", md5(voc))
        assert proc.returncode == 0 and "extracting" in proc.stdout, proc.stdout + proc.stderr
        assert sorted(p.stem for p in (base / "JPEGImages").glob("*.jpg")) == VOC_IDS
    proc = prep("voc", "--root", str(root), "--md5", md5(voc))
    assert proc.returncode == 0 and "skipping" in proc.stdout, proc.stdout + proc.stderr


class _ClosedPipe(io.StringIO):
    """stdout piped into ``head -1`` that has exited: every write fails."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_closed_stdout_does_not_stop_the_work(tmp_path, archives, monkeypatch):
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    root = tmp_path / "data"
    voc = archives["voc"]
    assert data_app.main(["voc", "--root", str(root), "--archive", str(voc), "--md5", md5(voc)]) == 0
    assert (root / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{VOC_IDS[0]}.jpg").is_file()
    assert "Error" not in sys.stderr.getvalue()


def test_sigterm_during_download_removes_the_part_file(prep, tmp_path, http_server):
    """SIGTERM ends segtrain-data like Ctrl-C: the partial download is removed, the caller's handler is back."""
    url, routes = http_server
    gate = threading.Event()

    def answer(h):
        h.send_response(200)
        h.send_header("Content-Length", str(4 << 20))
        h.end_headers()
        h.wfile.write(b"t" * 100_000)
        h.wfile.flush()
        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
        gate.wait(2)  # (a SIGTERM that is not acted on: the download completes)
        h.wfile.write(b"t" * ((4 << 20) - 100_000))

    routes["/VOCtrainval_11-May-2012.tar"] = answer

    def callers_handler(signum, frame):
        pass

    before = signal.signal(signal.SIGTERM, callers_handler)
    try:
        proc = prep("voc", "--root", str(tmp_path / "d"), "--url", f"{url}/VOCtrainval_11-May-2012.tar")
        gate.set()
        assert proc.returncode == 143 and signal.getsignal(signal.SIGTERM) is callers_handler, proc.stderr
    finally:
        signal.signal(signal.SIGTERM, before)
    assert_one_line_error(proc, "SIGTERM", "rerun")
    assert os.listdir(tmp_path / "d") == []  # neither the archive nor VOCtrainval_11-May-2012.tar.part


def test_disk_full_is_named_as_such(prep, tmp_path, archives, monkeypatch):
    root = tmp_path / "d"

    def full_disk_download(url, dest, timeout):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(dest) + ".part")

    monkeypatch.setattr(prepare, "download", full_disk_download)
    proc = prep("voc", "--root", str(root), "--url", "http://127.0.0.1:9/VOCtrainval_11-May-2012.tar")
    assert_one_line_error(proc, f"no space left in {root}: free space and rerun")
    write = tarfile.TarFile.makefile

    def full_disk_write(self, tarinfo, targetpath):
        if "JPEGImages" in targetpath:  # some files are written, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), targetpath)
        write(self, tarinfo, targetpath)

    monkeypatch.setattr(tarfile.TarFile, "makefile", full_disk_write)
    voc = archives["voc"]
    proc = prep("voc", "--root", str(root), "--archive", str(voc), "--md5", md5(voc))
    assert_one_line_error(proc, f"no space left in {root}: free space and rerun")
    monkeypatch.setattr(tarfile.TarFile, "makefile", write)  # space freed: the rerun completes the extraction
    proc = prep("voc", "--root", str(root), "--archive", str(voc), "--md5", md5(voc))
    assert proc.returncode == 0 and "extracting" in proc.stdout, proc.stderr
    assert len(list((root / "VOCdevkit" / "VOC2012" / "JPEGImages").glob("*.jpg"))) == len(VOC_IDS)


def test_download_cut_mid_stream_names_the_url(prep, tmp_path, http_server):
    url, routes = http_server

    def cut(h):
        h.send_response(200)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        h.wfile.write(b"10000\r\n" + b"c" * 500)  # a 64 KiB chunk, cut after 500 bytes

    routes["/VOCtrainval_11-May-2012.tar"] = cut
    proc = prep("voc", "--root", str(tmp_path / "d"), "--url", f"{url}/VOCtrainval_11-May-2012.tar")
    line = assert_one_line_error(proc, f"{url}/VOCtrainval_11-May-2012.tar", "IncompleteRead", "--archive")
    assert proc.returncode == 2 and os.listdir(tmp_path / "d") == [], line


def test_stopped_conversion_leaves_no_partial_png(prep, tmp_path, monkeypatch):
    """A conversion stopped while a PNG is being written: the rerun converts that file (none half-written)."""
    gt = tmp_path / "cs" / "gtFine" / "train" / "aachen"
    gt.mkdir(parents=True)
    raw = np.full((32, 48), 26, np.uint8)  # car -> train id 13
    for i in range(2):
        Image.fromarray(raw).save(gt / f"aachen_00000{i}_000019_gtFine_labelIds.png")
    save = Image.Image.save

    def stopped_mid_write(self, fp, format=None, **kw):
        buf = io.BytesIO()
        save(self, buf, format="PNG")
        data = buf.getvalue()[:40]
        if hasattr(fp, "write"):
            fp.write(data)
        else:
            Path(fp).write_bytes(data)
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", stopped_mid_write)
    proc = prep("cityscapes", "--root", str(tmp_path / "cs"), "--workers", "1")
    assert proc.returncode == 130 and "interrupted" in proc.stderr, proc.stderr
    monkeypatch.setattr(Image.Image, "save", save)
    proc = prep("cityscapes", "--root", str(tmp_path / "cs"), "--workers", "1")
    assert proc.returncode == 0 and "writing 2 labelTrainIds PNGs" in proc.stdout, proc.stdout + proc.stderr
    for i in range(2):
        out = np.array(Image.open(gt / f"aachen_00000{i}_000019_gtFine_labelTrainIds.png"))
        assert (out == 13).all()
    assert sorted(p.name for p in gt.iterdir() if "labelTrainIds" in p.name) == [
        f"aachen_00000{i}_000019_gtFine_labelTrainIds.png" for i in range(2)
    ]


def test_symlinked_data_folder_names_the_real_root(prep, tmp_path, archives):
    """ROOT/VOCdevkit -> another disk: refused before anything is written, naming the --root that works."""
    other = tmp_path / "disk2"
    (other / "VOCdevkit").mkdir(parents=True)
    root = tmp_path / "data"
    root.mkdir()
    (root / "VOCdevkit").symlink_to(other / "VOCdevkit")
    voc = archives["voc"]
    proc = prep("voc", "--root", str(root), "--archive", str(voc), "--md5", md5(voc))
    assert_one_line_error(proc, f"{root / 'VOCdevkit'} is a symlink out of --root", f"pass --root {other}")
    assert not (root / ".segtrain-data").exists() and list((other / "VOCdevkit").iterdir()) == []
    proc = prep("voc", "--root", str(other), "--archive", str(voc), "--md5", md5(voc))
    assert proc.returncode == 0 and (root / "VOCdevkit" / "VOC2012" / "JPEGImages").is_dir(), proc.stderr
    # a deeper link whose target has another parent: no --root fits, the message says how to lay it out
    shutil.rmtree(other / "VOCdevkit" / "VOC2012")
    (other / "VOCdevkit" / "VOC2012").symlink_to(tmp_path / "disk3" / "voc12")
    proc = prep("voc", "--root", str(other), "--archive", str(voc), "--md5", md5(voc), "--force")
    assert_one_line_error(proc, "VOCdevkit/VOC2012 is a symlink out of --root", "link it to DIR/VOCdevkit/VOC2012")


def test_force_help_does_not_promise_a_new_download(prep):
    proc = prep("voc", "--help")
    text = " ".join(proc.stdout.split())
    assert proc.returncode == 0 and "--force" in text, proc.stderr
    assert "download/extract again" not in text and "is reused: delete it to download anew" in text, text


def test_root_and_archive_mistakes_are_one_line_before_anything_is_written(prep, tmp_path, archives, monkeypatch):
    """--root naming a file, or a folder below a file: exit 2; --archive naming a folder: exit 2 and no --root is
    created; a --root that cannot be written (permissions, read-only): exit 4 naming the path."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    voc = archives["voc"]
    for command in ("voc", "sbd", "cityscapes"):
        proc = prep(command, "--root", str(a_file))
        assert_one_line_error(proc, f"--root {a_file} is not a folder")
        assert proc.returncode == 2
    proc = prep("voc", "--root", str(a_file / "data"), "--archive", str(voc))
    assert_one_line_error(proc, f"--root {a_file / 'data'} is not a folder ({a_file} is a file)")
    proc = prep("voc", "--root", str(tmp_path / "new"), "--archive", str(tmp_path))
    assert_one_line_error(proc, f"--archive {tmp_path} is a folder")
    assert proc.returncode == 2 and not (tmp_path / "new").exists()
    assert a_file.read_text() == "mine"

    def read_only(self, tarinfo, targetpath):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), targetpath)

    monkeypatch.setattr(tarfile.TarFile, "makefile", read_only)
    root = tmp_path / "ro"
    proc = prep("voc", "--root", str(root), "--archive", str(voc), "--md5", md5(voc))
    assert_one_line_error(proc, f"cannot write {root}", "Permission denied", "pass another --root")
    assert proc.returncode == 4
    if os.geteuid() != 0:  # root writes anywhere: a read-only folder only stops other users
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        proc = prep("voc", "--root", str(locked / "data"), "--archive", str(voc), "--md5", md5(voc))
        assert_one_line_error(proc, f"cannot write {locked / 'data'}", "Permission denied")
        assert proc.returncode == 4
