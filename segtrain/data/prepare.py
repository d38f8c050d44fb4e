"""Data sets on disk: download, verify, extract and convert them into the layouts segtrain reads (what the
``segtrain-data`` command, :mod:`segtrain.apps.data`, runs).

* ``segtrain-data voc --root DIR``: PASCAL VOC 2012 trainval (``DIR/VOCdevkit/VOC2012``).
* ``segtrain-data sbd --root DIR``: SBD (``benchmark.tgz``) converted to
  ``VOC2012/SegmentationClassAug/*.png`` + ``ImageSets/Segmentation/aug.txt`` for ``data=voc_aug``
  (like mmseg's ``tools/dataset_converters/voc_aug.py``); needs VOC in ``DIR`` first.
* ``segtrain-data cityscapes --root DIR``: ``*_gtFine_labelTrainIds.png`` next to every
  ``*_gtFine_labelIds.png`` (no download: Cityscapes needs a login).

Archives are md5-verified (``--md5`` overrides the expected sum, ``--no-verify`` skips it) and
extracted safely (absolute paths, ``..`` and links leaving the root are refused).  Every failure is
one line on stderr, ``segtrain-data: error: ...``, with a non-zero exit (progress goes to stdout);
``SEGTRAIN_DATA_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import os
import signal
import sys
import tarfile
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from segtrain.console import first_line, out_of_memory
from segtrain.errors import DataError, OutputError, ResourceError
from segtrain.signals import worker_signals
from segtrain.utils import atomic_write, download

PROG = "segtrain-data"
TIMEOUT_S = 10.0

VOC_URL = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"
VOC_MD5 = "6cd6e144f989b92b3379bac3b3de84fd"
VOC_LAYOUT = "DIR/VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation}"
SBD_URL = "http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz"
SBD_MD5 = "82b4d87ceb2ed10f6038a1cba92111cb"
SBD_LAYOUT = "DIR/benchmark_RELEASE/dataset/{cls/*.mat,train.txt,val.txt}"
CITYSCAPES_LAYOUT = (
    "DIR/gtFine/{train,val,test}/CITY/*_gtFine_labelIds.png (+ DIR/leftImg8bit/SPLIT/CITY/*_leftImg8bit.png)"
)
CITYSCAPES_ZIPS = "gtFine_trainvaltest.zip and leftImg8bit_trainvaltest.zip"
CITYSCAPES_URL = "https://www.cityscapes-dataset.com/downloads/"

MARKER_DIR = ".segtrain-data"
NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # disk full, quota, file size limit
NO_WRITE = {errno.EACCES, errno.EPERM, errno.EROFS}  # permissions, a read-only file system


def no_space(folder: Path | str) -> str:
    return f"no space left in {folder}: free space and rerun"


def cannot_write(path: Path | str, e: OSError) -> str:
    return f"cannot write {path} ({e.strerror or e}): make it writable, or pass another --root"


def output_error(e: BaseException, folder: Path | str) -> OutputError | None:
    """The one-line OutputError (exit 4) for a write into ``folder`` that failed for lack of space or of
    permission; None for any other error."""
    code = getattr(e, "errno", None)
    if code in NO_SPACE:
        return OutputError(no_space(folder))
    if code in NO_WRITE:
        return OutputError(cannot_write(getattr(e, "filename", None) or folder, e))
    return None


def root_folder(args: argparse.Namespace, create: bool = False) -> Path:
    """``--root`` as a folder (created with its parents when ``create``): a file in its way is a one-line
    DataError, a folder that cannot be created an OutputError, before anything is written."""
    root = Path(args.root).expanduser()
    blocker = next((p for p in (root, *root.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        where = "" if blocker == root else f" ({blocker} is a file)"
        raise DataError(f"--root {root} is not a folder{where}: pass a folder (it is created if missing)")
    if create:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise output_error(e, root) or DataError(f"cannot create --root {root}: {e.strerror or e}") from None
    return root


def archive_file(args: argparse.Namespace) -> Path | None:
    """``--archive``, checked to be a readable file before anything is written."""
    if args.archive is None:
        return None
    path = Path(args.archive).expanduser()
    if not path.is_file():
        what = "a folder" if path.is_dir() else "missing" if not path.exists() else "not a regular file"
        raise DataError(f"--archive {path} is {what}: pass the archive file itself")
    if not os.access(path, os.R_OK):
        raise DataError(f"--archive {path} cannot be read (permission denied): make it readable")
    return path


# ----------------------------------------------------------------------------------------------------- download


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_archive(args: argparse.Namespace, root: Path, url: str, md5: str, name: str, what: str) -> Path:
    """The verified archive: ``--archive`` or ``root/name`` if present, else downloaded from ``url``."""
    expected = (args.md5 or md5).lower()
    path = archive_file(args)
    if path is None:
        path = root / name
        if not path.is_file():
            print(f"{PROG}: downloading {url} -> {path}", file=sys.stdout)
            try:
                download(url, path, TIMEOUT_S)
            except (OSError, ValueError) as e:
                if output_error(e, path.parent) is not None:
                    raise output_error(e, path.parent) from e
                reason = first_line(str(getattr(e, "reason", None) or e).replace(url, "URL") or type(e).__name__, 80)
                raise DataError(
                    f"cannot download {what} from {url} ({reason}); fetch it by hand and rerun with "
                    f"--archive /path/to/{name}"
                ) from e
    if args.no_verify:
        print(f"{PROG}: not verifying {path} (--no-verify)", file=sys.stdout)
    else:
        got = md5sum(path)
        if got != expected:
            again = "fetch it again" if args.archive is not None else "delete it and rerun"
            raise DataError(
                f"{path} is corrupt or incomplete (md5 {got}, expected {expected}): {again}, or pass "
                f"--md5/--no-verify if it is another release"
            )
    return path


# ----------------------------------------------------------------------------------------------------- extract


def _unsafe_name(name: str) -> bool:
    p = PurePosixPath(name.replace("\\", "/"))
    return p.is_absolute() or ".." in p.parts or (len(name) > 1 and name[1] == ":")


def _check_member(archive: Path, m: tarfile.TarInfo) -> None:
    if _unsafe_name(m.name):
        raise DataError(f"refusing to extract {archive}: member {m.name!r} has an absolute path or '..'")
    if m.issym() or m.islnk():
        target = PurePosixPath(m.name).parent / m.linkname if m.issym() else PurePosixPath(m.linkname)
        if _unsafe_name(m.linkname) or ".." in PurePosixPath(os.path.normpath(str(target))).parts:
            raise DataError(
                f"refusing to extract {archive}: link {m.name!r} -> {m.linkname!r} points outside the extraction folder"
            )
    if m.isdev() or m.isfifo():
        raise DataError(f"refusing to extract {archive}: member {m.name!r} is a device or FIFO")


def _check_no_symlink_out(dest: Path, members: list[tarfile.TarInfo]) -> None:
    """Refuse, before anything is written, a member whose path under ``dest`` runs through an existing
    symlink that leads out of ``dest`` (``ROOT/VOCdevkit -> /other/disk/VOCdevkit``): the extraction would
    not follow it (tarfile's data filter stops half way), so the fix is to extract where the data lives."""
    real_dest = os.path.realpath(dest)
    seen: set[str] = set()
    for m in members:
        parts = PurePosixPath(m.name).parts
        for i in range(1, len(parts) + 1):
            rel = "/".join(parts[:i])
            if rel in seen:
                continue
            seen.add(rel)
            link = dest / rel
            if not link.is_symlink():
                continue
            real = Path(os.path.realpath(link))
            if os.path.commonpath([real_dest, real]) == real_dest:
                continue
            if real.parts[-i:] == parts[:i]:  # extract where the data lives
                raise DataError(f"{link} is a symlink out of --root: pass --root {Path(*real.parts[:-i])}")
            raise DataError(f"{link} is a symlink out of --root (to {real}): use --root DIR and link it to DIR/{rel}")


def safe_extract(archive: Path, dest: Path, on_start=lambda: None) -> None:
    """Extract a tar(.gz) into ``dest``, refusing absolute paths, ``..``, links leaving ``dest``, devices and
    symlinked folders of ``dest`` that lead out of it; ``on_start()`` runs once these checks pass, just
    before the first file is written."""
    try:
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            for m in members:
                _check_member(archive, m)
            _check_no_symlink_out(dest, members)
            dest.mkdir(parents=True, exist_ok=True)
            on_start()
            if hasattr(tarfile, "data_filter"):
                tf.extractall(dest, members=members, filter="data")
            else:  # pragma: no cover - Python without PEP 706
                tf.extractall(dest, members=members)
    except (tarfile.TarError, EOFError, OSError) as e:
        if output_error(e, dest) is not None:
            raise output_error(e, dest) from e
        if isinstance(e, tarfile.FilterError):
            raise DataError(f"refusing to extract {archive}: {first_line(e, 160)}") from e
        raise DataError(f"cannot extract {archive}: {first_line(e, 100)} (corrupt or not a tar archive?)") from e


def extracted(root: Path, tag: str, data_check) -> bool:
    """The one "done" check: ``data_check()`` finds the data and no extraction of ``tag`` was cut off.

    An extraction runs between ``{tag}.extracting`` (made first) and ``{tag}.extracted`` (made last), so a
    ``.extracting`` marker means the tree may be partial, whatever the data check says; without it, data
    that is there (extracted here, or by hand) counts.  A ``.extracted`` marker alone never counts: the data
    may have been deleted since."""
    return data_check() and not (root / MARKER_DIR / f"{tag}.extracting").exists()


def extract_once(archive: Path, root: Path, data_check, tag: str, force: bool) -> None:
    """Extract ``archive`` into ``root`` unless :func:`extracted` says it is done (``force``: always)."""
    markers = root / MARKER_DIR
    done, running = markers / f"{tag}.extracted", markers / f"{tag}.extracting"
    if not force and extracted(root, tag, data_check):
        print(f"{PROG}: {tag} already extracted in {root}; skipping (--force re-extracts)", file=sys.stdout)
        return

    def start() -> None:  # the archive's members passed the checks: from here on the tree may be partial
        markers.mkdir(parents=True, exist_ok=True)
        done.unlink(missing_ok=True)
        running.touch()

    print(f"{PROG}: extracting {archive} -> {root}", file=sys.stdout)
    safe_extract(archive, root, start)
    running.unlink()
    done.touch()


# ----------------------------------------------------------------------------------------------------- VOC


def voc_base(root: Path) -> Path:
    return root / "VOCdevkit" / "VOC2012"


def voc_complete(root: Path) -> bool:
    base = voc_base(root)
    return all((base / d).is_dir() for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"))


def voc_ready(root: Path) -> bool:
    return extracted(root, "voc2012", lambda: voc_complete(root))


# ----------------------------------------------------------------------------------------------------- SBD


def _read_ids(path: Path, layout: str) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path} is missing (expected layout: {layout})")
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


def _write_png(dst: str, image) -> None:
    """All of ``dst`` or none of it: a conversion stopped half way leaves no partial PNG that a rerun would
    take as done (not fsynced: a lost file after a power cut is only converted again)."""
    atomic_write(dst, lambda f: image.save(f, format="PNG"), durable=False)


def _convert_mat(job: tuple[str, str]) -> str | None:
    """SBD ``cls/ID.mat`` -> index PNG; returns an error message or None."""
    src, dst = job
    try:
        from scipy.io import loadmat  # SBD's .mat files only: scipy loads when one is converted

        seg = loadmat(src)["GTcls"][0]["Segmentation"][0]
        seg = np.asarray(seg)
        if seg.ndim != 2:
            return f"{src}: GTcls.Segmentation has shape {seg.shape}, expected HxW"
        _write_png(dst, Image.fromarray(seg.astype(np.uint8)))
    except Exception as e:  # noqa: BLE001 - reported as one line
        return _conversion_error(src, dst, e)
    return None


def _copy_voc_png(job: tuple[str, str]) -> str | None:
    """VOC palette PNG -> index (grayscale) PNG."""
    src, dst = job
    try:
        with Image.open(src) as im:
            if im.mode not in ("P", "L"):
                return f"{src}: mode {im.mode}, expected a palette (P) or index (L) PNG"
            arr = np.array(im)
        _write_png(dst, Image.fromarray(arr.astype(np.uint8)))
    except Exception as e:  # noqa: BLE001 - reported as one line
        return _conversion_error(src, dst, e)
    return None


def _conversion_error(src: str, dst: str, e: Exception) -> str:
    """The message of a failed conversion; :func:`_run_jobs` raises it as the error its start names."""
    written = output_error(e, Path(dst).parent)
    if written is not None:
        return str(written)
    if out_of_memory(e):
        return f"out of memory converting {src}: rerun with fewer --workers"
    return f"cannot convert {src}: {type(e).__name__}: {first_line(e, 100)}"


def _run_jobs(fn, jobs: list[tuple[str, str]], workers: int) -> None:
    if not jobs:
        return
    workers = min(workers, len(jobs))
    if workers <= 1:
        errors = [r for r in map(fn, jobs) if r]
    else:
        # SIGTERM kills a conversion worker quietly (main's handler, inherited by fork, would raise in it)
        pool = ProcessPoolExecutor(max_workers=workers, initializer=worker_signals, initargs=(signal.SIG_DFL, None))
        try:
            errors = [r for r in pool.map(fn, jobs, chunksize=max(1, len(jobs) // (8 * workers))) if r]
        finally:  # stopped (Ctrl-C, SIGTERM) or failed: the jobs not yet started are dropped, not run
            pool.shutdown(wait=True, cancel_futures=True)
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        kind = {"no space": OutputError, "cannot write": OutputError, "out of memory": ResourceError}
        raise next((k for start, k in kind.items() if errors[0].startswith(start)), DataError)(errors[0] + more)


# ----------------------------------------------------------------------------------------------------- Cityscapes


def _trainid_png(job: tuple[str, str], lut: np.ndarray) -> str | None:
    src, dst = job
    try:
        with Image.open(src) as im:
            arr = np.array(im)
        if arr.ndim != 2:
            return f"{src}: shape {arr.shape}, expected a single-channel labelIds PNG"
        _write_png(dst, Image.fromarray(lut[arr.astype(np.uint8)]))
    except Exception as e:  # noqa: BLE001 - reported as one line
        return _conversion_error(src, dst, e)
    return None


# ----------------------------------------------------------------------------------------------------- inspect


# ----------------------------------------------------------------------------------------------------- CLI


def cmd_voc(args: argparse.Namespace) -> None:
    root = root_folder(args)
    if not args.force and voc_ready(root) and args.archive is None:
        print(f"{PROG}: VOC 2012 already in {voc_base(root)}; skipping (--force re-extracts)", file=sys.stdout)
        return
    archive_file(args)  # before the root is created
    root_folder(args, create=True)
    archive = fetch_archive(args, root, args.url, VOC_MD5, "VOCtrainval_11-May-2012.tar", "PASCAL VOC 2012")
    extract_once(archive, root, lambda: voc_complete(root), "voc2012", args.force)
    if not voc_ready(root):
        raise DataError(f"{archive} did not yield {VOC_LAYOUT} (DIR: {root}); is it VOC 2012 trainval?")
    print(f"{PROG}: VOC 2012 ready: data=voc data.root={root}", file=sys.stdout)


def cmd_sbd(args: argparse.Namespace) -> None:
    root = root_folder(args)
    if not voc_ready(root):
        raise DataError(f"no complete PASCAL VOC 2012 in {root}: run '{PROG} voc --root {root}' first")
    try:
        import scipy.io  # noqa: F401
    except ImportError as e:
        raise DataError("the SBD conversion needs scipy: pip install scipy") from e
    sbd = root / "benchmark_RELEASE" / "dataset"

    def sbd_complete() -> bool:
        return (sbd / "cls").is_dir() and (sbd / "train.txt").is_file() and (sbd / "val.txt").is_file()

    if args.force or args.archive is not None or not extracted(root, "sbd", sbd_complete):
        archive = fetch_archive(args, root, SBD_URL, SBD_MD5, "benchmark.tgz", "SBD")
        extract_once(archive, root, sbd_complete, "sbd", args.force)
    if not extracted(root, "sbd", sbd_complete):
        raise DataError(f"SBD is incomplete in {root} (expected layout: {SBD_LAYOUT})")

    base = voc_base(root)
    sets = base / "ImageSets" / "Segmentation"
    voc_train = _read_ids(sets / "train.txt", VOC_LAYOUT)
    voc_val = _read_ids(sets / "val.txt", VOC_LAYOUT)
    sbd_ids = _read_ids(sbd / "train.txt", SBD_LAYOUT) + _read_ids(sbd / "val.txt", SBD_LAYOUT)
    aug = sorted(set(sbd_ids + voc_train) - set(voc_val))

    out = base / "SegmentationClassAug"
    out.mkdir(parents=True, exist_ok=True)
    mats = sorted((sbd / "cls").glob("*.mat"))
    if not mats:
        raise DataError(f"{sbd / 'cls'} holds no .mat files (expected layout: {SBD_LAYOUT})")
    workers = args.workers or min(8, os.cpu_count() or 1)
    print(f"{PROG}: converting {len(mats)} SBD masks -> {out} ({workers} workers)", file=sys.stdout)
    _run_jobs(_convert_mat, [(str(m), str(out / f"{m.stem}.png")) for m in mats], workers)
    # VOC's own annotations come second, so they win where an image is in both
    voc_pngs = sorted((base / "SegmentationClass").glob("*.png"))
    print(f"{PROG}: copying {len(voc_pngs)} VOC masks as index PNGs -> {out}", file=sys.stdout)
    _run_jobs(_copy_voc_png, [(str(p), str(out / p.name)) for p in voc_pngs], workers)

    no_mask = [n for n in aug if not (out / f"{n}.png").is_file()]
    no_img = [n for n in aug if not (base / "JPEGImages" / f"{n}.jpg").is_file()]
    if no_mask or no_img:
        kind, missing = ("mask", no_mask) if no_mask else ("image", no_img)
        raise DataError(
            f"{len(missing)} id(s) of the aug list have no {kind}, e.g. {missing[0]} "
            f"(SBD and VOC in {root} do not match)"
        )
    atomic_write(sets / "aug.txt", "".join(f"{n}\n" for n in aug))
    print(f"{PROG}: wrote {sets / 'aug.txt'} ({len(aug)} ids); ready: data=voc_aug data.root={root}", file=sys.stdout)


def cmd_cityscapes(args: argparse.Namespace) -> None:
    root = root_folder(args)
    cands = [c for c in (root, root / "cityscapes") if (c / "gtFine").is_dir()]
    if not cands:
        raise DataError(
            f"no gtFine/ folder in {root}: Cityscapes needs a login, so get {CITYSCAPES_ZIPS} from "
            f"{CITYSCAPES_URL} and unzip both there"
        )
    base = cands[0]
    labels = sorted((base / "gtFine").glob("*/*/*_gtFine_labelIds.png"))
    if not labels:
        raise DataError(
            f"{base / 'gtFine'} holds no SPLIT/CITY/*_gtFine_labelIds.png: unzip gtFine_trainvaltest.zip "
            f"({CITYSCAPES_URL}, needs a login) into its parent folder"
        )
    jobs = []
    for p in labels:
        dst = p.with_name(p.name.replace("_gtFine_labelIds.png", "_gtFine_labelTrainIds.png"))
        if args.force or not dst.is_file():
            jobs.append((str(p), str(dst)))
    workers = args.workers or min(8, os.cpu_count() or 1)
    print(
        f"{PROG}: writing {len(jobs)} labelTrainIds PNGs ({len(labels) - len(jobs)} already there) ({workers} workers)",
        file=sys.stdout,
    )
    from segtrain.data.cityscapes import trainid_lut  # the table training uses

    _run_jobs(partial(_trainid_png, lut=trainid_lut(255)), jobs, workers)
    if not (base / "leftImg8bit").is_dir():
        print(
            f"{PROG}: warning: {base / 'leftImg8bit'} is missing; training needs it too: unzip "
            f"leftImg8bit_trainvaltest.zip ({CITYSCAPES_URL}) into {base} (layout: {CITYSCAPES_LAYOUT})",
            file=sys.stdout,
        )
    print(f"{PROG}: Cityscapes labels ready: data=cityscapes data.root={base}", file=sys.stdout)
