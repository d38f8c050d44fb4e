"""Reading images: one entry point, :func:`read_image`, with two contracts, and the headers.

* ``read_image(path, in_channels)``: as training reads a file: ``in_channels`` bands at the file's own depth
  (uint8, uint16 or float32; normalised on the device), TIFF bands with tifffile, EXIF rotation for photos
  (OpenCV); every failure a one-line DataError naming the file.  An array source is checked the same way.
* ``read_image(source, rgb8=True)``: a photo as a viewer shows it: HxWx3 uint8 RGB, upright (EXIF), from a
  path, a PIL image or an array; grayscale, palette, RGBA, CMYK and 16-bit images become 8-bit RGB (PIL).
  Raises OSError / ValueError as PIL does.

:class:`segtrain.predict.Predictor` reads 8-bit photos by the second (the pixels it has always predicted) and
everything deeper, and every image of a network of other than 3 bands, by the first.  :func:`read_header`
tells a file's size, bands and depth without decoding it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from segtrain.errors import DataError

TIFF_EXTS = (".tif", ".tiff")
# Integer and float images: the pipelines and batches carry uint8, uint16 or float32.  uint8 and uint16 keep
# their values (normalised on the device: / 255, / 65535); other types become float32 with their own values.
KEPT_DTYPES = ("uint8", "uint16")


def image_dtype(dtype: Any) -> str:
    """The dtype an image of ``dtype`` is carried as: uint8, uint16, or float32 (every other type)."""
    name = np.dtype(dtype).name
    return name if name in KEPT_DTYPES else "float32"


HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # PIL modes of 16-bit and float images


EXIF_ORIENTATION = 0x0112  # 5-8: stored transposed, shown rotated by 90 degrees (and loaded so by OpenCV)


# ---------------------------------------------------------------------------
# The entry point.


def read_image(source: Any, in_channels: int = 3, *, rgb8: bool = False) -> np.ndarray:
    """An image as an HxWxC array: the one reader of segtrain.

    ``rgb8=False`` (training's contract): C = ``in_channels``, uint8, uint16 or float32 as the file stores it.
    ``source`` is a path (``in_channels=3`` reads JPEG/PNG/BMP as RGB with OpenCV: grayscale becomes 3-channel,
    alpha is dropped, 16-bit PNGs stay 16-bit, EXIF orientation is applied; TIFFs are read band by band with
    tifffile when installed; any other ``in_channels`` needs exactly that many bands, read as stored: gray,
    gray + alpha, RGB or RGBA, a palette PNG's RGB colours), or an HxW / HxWxC array (``in_channels=3``: uint8 or
    uint16, one band repeated and a fourth dropped; else exactly ``in_channels`` bands, as given).  A file that
    cannot be used is a one-line DataError naming it; an array, a ValueError.

    ``rgb8=True`` (a photo as a viewer shows it): HxWx3 uint8 RGB, upright.  ``source`` is a path, a PIL image or
    an array (HxW, HxWx1, HxWx3 or HxWx4; uint8 or uint16).  The EXIF orientation is applied; grayscale,
    palette, RGBA (alpha dropped), CMYK and 16-bit images become 8-bit RGB (16-bit values scaled from the full
    0..65535 range).  Raises OSError/ValueError for a file that cannot be decoded."""
    if rgb8:
        if in_channels != 3:
            raise ValueError(f"rgb8=True reads 3 bands, not in_channels={in_channels}")
        return _read_rgb8(source)
    if isinstance(source, np.ndarray):
        return _array_bands(source, in_channels)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"expected a path or a numpy array, got {type(source).__name__} (rgb8=True takes PIL images)")
    return _read_file(Path(source), in_channels)


# ---------------------------------------------------------------------------
# Training's contract: OpenCV and tifffile, the file's own bands and depth.


def _read_file(path: Path, in_channels: int) -> np.ndarray:
    """A file as training reads it (:func:`read_image`)."""
    tiff = path.suffix.lower() in TIFF_EXTS and (in_channels != 3 or _tifffile() is not None)
    if tiff:
        img = _read_tiff(path)
    elif in_channels == 3:
        img = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH)
        if img is None:
            raise _unreadable(path)
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    else:
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise _unreadable(path)
        if img.ndim == 3:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB if img.shape[2] == 3 else cv2.COLOR_BGRA2RGBA)
            # OpenCV expands gray + alpha and tRNS to RGBA: only a 4-band PNG needs its header read again
            header = _png_header(path) if img.shape[2] == 4 and path.suffix.lower() == ".png" else None
            if header is not None and header[2] != img.shape[2]:
                img = img[..., {1: [0], 2: [0, 3], 3: [0, 1, 2]}[header[2]]]
    img = _as_carried(_check_bands(img if img.ndim == 3 else img[..., None], in_channels, path))
    if img.dtype.kind == "f" and not np.isfinite(img).all():  # would make the loss (and data.mean=auto) NaN
        raise DataError(
            f"image {path} holds NaN or infinite pixels (nodata?): fill them with a value, e.g. "
            "numpy.nan_to_num or gdal_fillnodata.py, before training or predicting"
        )
    return img


def _read_tiff(path: Path) -> np.ndarray:
    tifffile = _tifffile()
    if tifffile is None:
        raise DataError(
            f"image {path} is a TIFF and data.in_channels is not 3: reading its bands needs tifffile "
            "(pip install 'segtrain[tiff]')"
        )
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            return _bands_last(series.asarray(), series.axes, path)
    except FileNotFoundError:
        raise _unreadable(path) from None
    except DataError:
        raise
    except Exception as e:  # tifffile raises many types for corrupt files
        raise _unreadable(path, f": {' '.join(str(e).split())[:120]}") from None


def _bands_last(arr: np.ndarray, axes: str, path: Path) -> np.ndarray:
    """A tifffile series as HxWxC: Y and X found by name, the one other axis (samples, channels, pages) as bands."""
    keep = [i for i, a in enumerate(axes) if a in "YX" or arr.shape[i] > 1]
    arr = arr.reshape([arr.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    if "Y" not in axes or "X" not in axes or len(axes) > 3:
        raise DataError(
            f"image {path} has shape {arr.shape} (axes {axes}); expected a 2-D image with bands (Y, X, bands)"
        )
    rest = [i for i, a in enumerate(axes) if a not in "YX"]
    arr = np.moveaxis(arr, [axes.index("Y"), axes.index("X"), *rest], [0, 1, *range(2, 2 + len(rest))])
    return arr if arr.ndim == 3 else arr[..., None]


def _check_bands(img: np.ndarray, in_channels: int, path: Path) -> np.ndarray:
    bands = img.shape[2]
    if bands == in_channels:
        return img
    if in_channels == 3 and bands == 1:  # grayscale files become 3-channel, as colour photos
        return np.repeat(img, 3, axis=2)
    raise DataError(band_message(path, bands, in_channels))


def band_message(path: Path, bands: int, in_channels: int) -> str:
    return (
        f"image {path} has {bands} band(s) but data.in_channels={in_channels}: set data.in_channels={bands} "
        "(and data.mean/data.std with as many values, or auto), or convert the image"
    )


def _as_carried(img: np.ndarray) -> np.ndarray:
    want = image_dtype(img.dtype)
    return img if img.dtype.name == want else img.astype(want)


def _unreadable(path: Path, detail: str = "") -> DataError:
    what = "is missing" if not Path(path).exists() else "cannot be read as an image (corrupt or unsupported format)"
    return DataError(f"image {path} {what}{detail}")


def _tifffile():
    try:
        import tifffile  # an optional package (segtrain[tiff])

        return tifffile
    except ImportError:
        return None


def _array_bands(a: np.ndarray, in_channels: int) -> np.ndarray:
    """An array as training's contract carries it (:func:`read_image`)."""
    if in_channels == 3:
        _check_pixel_type(a)
        return _array_to_rgb(a, keep_depth=True)
    image = a if a.ndim == 3 else a[..., None]
    if image.shape[2] != in_channels:
        raise ValueError(f"expected {in_channels} bands (data.in_channels), got shape {a.shape}")
    return image


# ---------------------------------------------------------------------------
# The photo contract: PIL, 8-bit RGB, upright.


def _read_rgb8(source: Any) -> np.ndarray:
    """A photo as a viewer shows it (:func:`read_image` with ``rgb8=True``), decoded by PIL."""
    if isinstance(source, np.ndarray):
        _check_pixel_type(source)
        return _array_to_rgb(source)
    if isinstance(source, (str, os.PathLike)):
        with Image.open(source) as im:
            im.load()
            return _read_rgb8(im)
    if not isinstance(source, Image.Image):
        raise TypeError(f"expected a path, a PIL image or a numpy array, got {type(source).__name__}")
    im = ImageOps.exif_transpose(source)
    if im.mode in HIGH_DEPTH_MODES:
        return _array_to_rgb(np.asarray(im).astype(np.float64) * (255.0 / 65535.0))
    return np.array(im.convert("RGB"))


def _array_to_rgb(a: np.ndarray, keep_depth: bool = False) -> np.ndarray:
    if a.ndim == 3 and a.shape[2] in (1, 3, 4):
        a = a[..., :3] if a.shape[2] != 1 else a[..., 0]
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected an HxW or HxWx3 image, got shape {a.shape}")
    if keep_depth and a.dtype == np.uint16:
        return np.ascontiguousarray(a)
    if a.dtype == np.uint16:
        a = a.astype(np.float64) * (255.0 / 65535.0)
    if a.dtype != np.uint8:
        a = np.clip(np.round(a), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(a)


def _check_pixel_type(a: np.ndarray) -> None:
    if a.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"expected uint8 (or uint16) pixels, got {a.dtype}; e.g. pass (x * 255).astype(np.uint8)")


# ---------------------------------------------------------------------------
# Headers: size, bands and depth without decoding the pixels.


def _png_header(path: Path) -> tuple[int, int, int, str] | None:
    """(h, w, bands, dtype) from a PNG's IHDR chunk (bands as OpenCV decodes it: palette -> 3)."""
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    w, h = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    depth, colour = head[24], head[25]
    bands = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}.get(colour)
    return None if bands is None else (h, w, bands, "uint16" if depth == 16 else "uint8")


def _tiff_header(path: Path) -> tuple[int, int, int, str] | None:
    tifffile = _tifffile()
    if tifffile is None:
        return None
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape = [n for n, a in zip(series.shape, series.axes) if a in "YX" or n > 1]
            axes = [a for n, a in zip(series.shape, series.axes) if a in "YX" or n > 1]
            if "Y" not in axes or "X" not in axes or len(axes) > 3:
                raise DataError(
                    f"image {path} has shape {tuple(shape)} (axes {''.join(axes)}); expected a 2-D image with bands"
                )
            bands = next((n for n, a in zip(shape, axes) if a not in "YX"), 1)
            return shape[axes.index("Y")], shape[axes.index("X")], bands, image_dtype(series.dtype)
    except DataError:
        raise
    except Exception as e:
        raise _unreadable(path, f": {' '.join(str(e).split())[:120]}") from None


PIL_DTYPES = {"I;16": "uint16", "I;16B": "uint16", "I;16L": "uint16", "I": "float32", "F": "float32"}


def read_header(path: Path) -> tuple[int, int, int, str]:
    """(height, width, bands, carried dtype) of an image file from its header, without decoding the pixels."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        found = _png_header(path) if suffix == ".png" else _tiff_header(path) if suffix in TIFF_EXTS else None
    except OSError:
        raise _unreadable(path) from None
    if found is not None:
        return found
    try:
        with Image.open(path) as im:
            w, h = im.size
            bands = 3 if im.mode == "P" else len(im.getbands())
            if suffix in TIFF_EXTS:  # without tifffile: PIL sees the first band of planar multi-band files only
                bands = max(bands, int(im.tag_v2.get(277, 1)), int(getattr(im, "n_frames", 1)))
            return h, w, bands, PIL_DTYPES.get(im.mode, "uint8")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
        raise _unreadable(path) from None


def header_bands_fit(bands: int, in_channels: int, path: Path) -> bool:
    """Whether :func:`read_image` accepts a file with ``bands`` (what its header says) for ``in_channels``."""
    if bands == in_channels or (in_channels == 3 and bands == 1):
        return True
    # in_channels=3 reads photos with OpenCV as colour (alpha dropped); TIFF bands are read as they are
    return in_channels == 3 and not (Path(path).suffix.lower() in TIFF_EXTS and _tifffile() is not None)


def exif_orientation(path: Path) -> int:
    """The EXIF orientation tag of an image file (1, the default, when absent or unreadable)."""
    try:
        with Image.open(path) as im:
            return int(im.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - no tag to report
        return 1


def loads_rotated(path: Path, in_channels: int) -> int:
    """The EXIF orientation (5-8) by which :func:`read_image` rotates ``path`` by 90 degrees, else 0: OpenCV
    applies it to the colour photos of ``in_channels=3`` only."""
    orientation = exif_orientation(path) if in_channels == 3 and Path(path).suffix.lower() not in TIFF_EXTS else 1
    return orientation if orientation >= 5 else 0
