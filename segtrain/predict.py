"""A trained network on new images: :class:`Predictor` (Python) and ``segtrain-predict`` (the command).

``Predictor`` prepares an image exactly as validation does (the checkpoint's ``data.val_size`` keep-ratio
rescale, ``data.mean``/``data.std`` on the device), predicts with the checkpoint's ``eval`` settings
(whole image, sliding window, multi-scale + flip; :mod:`segtrain.inference`) under the device's autocast,
and resizes the scores back to the image's own size::

    from segtrain import Predictor
    p = Predictor.from_checkpoint("best.pt", device="auto")
    mask = p(image)                 # HxWx3 uint8 array, PIL image or path -> HxW int64 class indices
    probs = p.probabilities(image)  # C x H x W float32

``segtrain-predict ckpt=PATH input=FILE|DIR|GLOB [output=DIR]`` is a thin shell around it: for every
image ``<name>.png`` (class indices, the checkpoint's palette), ``<name>_overlay.jpg`` (``predict.overlay``,
``predict.alpha``) and ``<name>.npy`` (``predict.save_probs``: float16 probabilities); a folder is read
recursively and its layout kept; images of one size are predicted in batches; an unreadable file is
skipped with one line; ``predict.json`` in the run dir sums it up.
"""

from __future__ import annotations

import glob
import io
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

from segtrain.cli import command
from segtrain.errors import ConfigError, DataError, OutputError

if TYPE_CHECKING:  # torch loads when the command works, not when it starts (--help, a Ctrl-C at once)
    import torch

log = logging.getLogger("segtrain")


def read_image(source: Any) -> np.ndarray:
    """An image as HxWx3 uint8 RGB, upright as a viewer shows it.

    ``source``: a path, a PIL image, or an array (HxW, HxWx1, HxWx3 or HxWx4; uint8 or uint16).  The
    EXIF orientation is applied; grayscale, palette, RGBA (alpha dropped), CMYK and 16-bit images become
    8-bit RGB (16-bit values are scaled from the full 0..65535 range).  Raises OSError/ValueError for a
    file that cannot be decoded.
    """
    from PIL import Image, ImageOps

    if isinstance(source, np.ndarray):
        if source.dtype not in (np.uint8, np.uint16):
            raise ValueError(
                f"expected uint8 (or uint16) pixels, got {source.dtype}; e.g. pass (x * 255).astype(np.uint8)"
            )
        return _array_to_rgb(source)
    if isinstance(source, (str, os.PathLike)):
        with Image.open(source) as im:
            im.load()
            return read_image(im)
    if not isinstance(source, Image.Image):
        raise TypeError(f"expected a path, a PIL image or a numpy array, got {type(source).__name__}")
    im = ImageOps.exif_transpose(source)
    if im.mode in HIGH_DEPTH_MODES:
        return _array_to_rgb(np.asarray(im).astype(np.float64) * (255.0 / 65535.0))
    return np.array(im.convert("RGB"))


HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # PIL modes of 16-bit and float images


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


def display_rgb(image: np.ndarray) -> np.ndarray:
    """An 8-bit RGB view of any image (the first three bands, or one band repeated), each band stretched from
    its 1st to 99th percentile: for overlays of multi-band or 16-bit images."""
    bands = image if image.ndim == 3 else image[..., None]
    bands = bands[..., :3] if bands.shape[2] >= 3 else np.repeat(bands[..., :1], 3, axis=2)
    bands = bands.astype(np.float32)
    lo, hi = np.percentile(bands, 1, axis=(0, 1)), np.percentile(bands, 99, axis=(0, 1))
    return np.clip((bands - lo) / np.maximum(hi - lo, 1e-6) * 255, 0, 255).round().astype(np.uint8)


def palette_of(cfg: DictConfig, meta: Mapping) -> np.ndarray:
    """The class colours: ``data.palette`` (an override, or the training config's), else the palette the
    checkpoint stores (the data set's own, e.g. the built-in set's or ``classes.yaml``'s), else the VOC map."""
    from segtrain.config import mask_classes
    from segtrain.data.palette import default_palette, palette_array

    k = mask_classes(cfg.data.num_classes)
    for value, key in ((cfg.data.palette, "data.palette"), (meta.get("palette"), "the checkpoint's palette")):
        pal = palette_array(value, key)
        if pal is not None and len(pal) >= k:
            return pal[:k]
    return default_palette(k)


class Predictor:
    """A trained network with its validation preprocessing and eval settings: image in, class map out.

    Build it with :meth:`from_checkpoint`.  ``model`` is the ``torch.nn.Module`` in eval mode on
    ``device``; ``class_names``, ``palette`` (K x 3 uint8) and ``cfg`` (the checkpoint's config with the
    overrides applied) describe it.
    """

    def __init__(self, model: torch.nn.Module, cfg: DictConfig, class_names: list[str], palette: np.ndarray):
        from segtrain.config import mask_classes
        from segtrain.data.transforms import standard_val
        from segtrain.evaluation import eval_settings
        from segtrain.runtime import BatchToDevice, resolve_device

        self.cfg, self.class_names, self.palette = cfg, list(class_names), np.asarray(palette, np.uint8)
        self.num_classes = cfg.data.num_classes  # network outputs: 1 for one sigmoid logit
        self.mask_classes = mask_classes(self.num_classes)  # classes in the masks: 2 for one sigmoid logit
        self.in_channels = cfg.data.in_channels
        self.device, self.precision = resolve_device(cfg.device)
        import torch

        memory_format = torch.channels_last if cfg.device.channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=memory_format).eval()
        self.settings = eval_settings(cfg)
        self.transform = standard_val(cfg.data)  # None: the image as it is
        self.to_device = BatchToDevice(self.device, cfg.data.mean, cfg.data.std, memory_format)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        device: str = "auto",
        precision: str = "auto",
        overrides: Mapping[str, Any] | None = None,
    ) -> Predictor:
        """Rebuild the checkpoint's network (its weights loaded with ``weights_only=True``).

        ``device``: auto | cpu | cuda; ``precision``: auto (fp16 on CUDA, bf16 on a CPU with bf16
        instructions, else fp32) | fp32 | fp16 | bf16.  ``overrides``: dotted ``data.*`` / ``eval.*`` keys
        of the stored config, e.g. ``{"eval.mode": "slide", "eval.crop_size": 512, "data.val_size": 512}``.
        """
        from omegaconf.errors import OmegaConfBaseException

        from segtrain.config import validate
        from segtrain.evaluate import load_checkpoint

        state, cfg = load_checkpoint(path)
        settings = {"device.type": device, "device.precision": precision, **(overrides or {})}
        for key, value in settings.items():
            if not key.startswith(("data.", "eval.", "device.")):
                raise ConfigError(f"Predictor override {key}: only data.*, eval.* and device.* keys can change")
            try:
                OmegaConf.update(cfg, key, value, merge=False)
            except OmegaConfBaseException as e:
                raise ConfigError(f"Predictor override {key}={value!r}: {str(e).splitlines()[0]}") from None
        cfg.model.pretrained, cfg.model.init_from = False, None  # the checkpoint holds every weight
        validate(cfg)
        return cls.from_state(state, cfg, path)

    @classmethod
    def from_state(cls, state: dict, cfg: DictConfig, path: str | os.PathLike = "checkpoint") -> Predictor:
        """From a loaded checkpoint and its (merged, validated) config."""
        from segtrain.evaluate import checkpoint_model
        from segtrain.evaluation import class_names

        meta = state.get("meta", {})
        names = class_names(None, cfg.data.num_classes, cfg.data.class_names or meta.get("class_names"))
        return cls(checkpoint_model(state, cfg, path), cfg, names, palette_of(cfg, meta))

    # ------------------------------------------------------------------------------------------------

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """An HxWxC image (:meth:`read`) as validation feeds it to the network: [C, h, w]."""
        import torch

        if self.transform is not None:
            image = self.transform(image=image)["image"]
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))

    def too_small(self, h: int, w: int) -> str | None:
        """Why an ``h x w`` image cannot be predicted (a side below the network's smallest input once
        ``data.val_size`` and ``eval.scales`` have rescaled it), or None when it can."""
        from segtrain.config import min_input_size
        from segtrain.data.transforms import _target_size, val_scale

        need = min_input_size(self.cfg.model)
        size = val_scale(self.cfg.data)
        ph, pw = (h, w) if size is None else _target_size(h, w, size)
        side = min(max(1, round(v * s)) for v in (ph, pw) for s in self.settings["scales"])  # as inference scales
        if side >= need:
            return None
        seen = f" (predicted at {side} px)" if side != min(h, w) else ""
        return f"{w}x{h} px{seen}, smaller than the {need} px model={self.cfg.model.name} needs"

    def scores(self, images: list[np.ndarray]) -> torch.Tensor:
        """Float32 scores [N, K, H, W] on ``device`` for same-size HxWxC images (:meth:`read`; logits, or
        log-probabilities with several TTA views), at the images' own size.  Images of different pixel types
        (8-bit, 16-bit, float: each normalised from its own range) go through the network in separate batches."""
        sizes = {im.shape[:2] for im in images}
        if len(sizes) != 1:
            raise ValueError(f"scores() needs images of one size, got {sorted(sizes)}")
        for im in images:
            if im.ndim != 3 or im.shape[2] != self.in_channels:
                raise ValueError(f"expected HxWx{self.in_channels} images (data.in_channels), got shape {im.shape}")
        why = self.too_small(*images[0].shape[:2])
        if why is not None:
            raise ValueError(f"cannot predict this image: {why}")
        import torch

        groups: dict[str, list[int]] = {}
        for k, im in enumerate(images):
            groups.setdefault(im.dtype.str, []).append(k)
        if len(groups) == 1:
            return self._scores(images)
        out: list[torch.Tensor] = [torch.empty(0)] * len(images)
        for idx in groups.values():
            for k, row in zip(idx, self._scores([images[k] for k in idx])):
                out[k] = row
        return torch.stack(out)

    def _scores(self, images: list[np.ndarray]) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        from segtrain.inference import predict
        from segtrain.runtime import autocast

        x = self.to_device.images(torch.stack([self.prepare(im) for im in images]))
        with torch.no_grad(), autocast(self.device, self.precision):
            out = predict(self.model, x, self.num_classes, **self.settings)
        size = images[0].shape[:2]
        if tuple(out.shape[-2:]) != size:  # data.val_size rescaled the image: back to its own size
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        return out

    def read(self, source: Any) -> np.ndarray:
        """``source`` as the network's input image, as training read it: HxWx3 RGB for 3-band networks (8-bit
        files by :func:`read_image`, upright; 16-bit and float files by the training reader
        :func:`segtrain.data.disk.read_image` at their depth; uint16 arrays keep theirs);
        for ``data.in_channels`` other than 3, a file read as training read it (TIFF bands, 16 bit) or an HxWxC
        array with that many bands."""
        from segtrain.data.disk import TIFF_EXTS, read_header
        from segtrain.data.disk import read_image as read_bands

        if self.in_channels == 3:
            if isinstance(source, np.ndarray) and source.dtype == np.uint16:
                return _array_to_rgb(source, keep_depth=True)  # 16 bit kept: normalised from 0..65535 as in training
            path = Path(source) if isinstance(source, (str, os.PathLike)) else None
            deep = path is not None and path.suffix.lower() in (".png", *TIFF_EXTS)  # JPEG, BMP ...: 8-bit only
            if deep and read_header(path)[3] != "uint8":
                return read_bands(path, 3)  # a 16-bit or float file (the header says): not 8 bits
            return read_image(source)
        if isinstance(source, np.ndarray):
            image = source if source.ndim == 3 else source[..., None]
            if image.shape[2] != self.in_channels:
                raise ValueError(f"expected {self.in_channels} bands (data.in_channels), got shape {source.shape}")
            return image
        return read_bands(Path(source), self.in_channels)

    def labels(self, scores: torch.Tensor) -> torch.Tensor:
        """[K, H, W] scores -> [H, W] class indices (one sigmoid logit: ``sigmoid > eval.threshold``)."""
        from segtrain.inference import labels

        return labels(scores[None], self.cfg.eval.threshold)[0]

    def probs(self, scores: torch.Tensor) -> torch.Tensor:
        """[K, H, W] scores -> [C, H, W] class probabilities (one sigmoid logit: background, foreground)."""
        import torch

        if scores.shape[0] == 1:
            fg = scores.float().sigmoid()
            return torch.cat([1 - fg, fg])
        return scores.float().softmax(0)

    def __call__(self, image: Any) -> np.ndarray:
        """HxW int64 class indices at the image's own (upright) size."""
        return self.labels(self.scores([self.read(image)])[0]).cpu().numpy()

    def probabilities(self, image: Any) -> np.ndarray:
        """C x H x W float32 class probabilities at the image's own (upright) size."""
        return self.probs(self.scores([self.read(image)])[0]).cpu().numpy()

    def colorize(self, mask: np.ndarray) -> np.ndarray:
        """HxW class indices -> HxWx3 uint8 colours of ``palette``."""
        return self.palette[np.clip(mask, 0, len(self.palette) - 1)]


# ----------------------------------------------------------------------------------------------------
# segtrain-predict


OTHER_IMAGE_TYPES = tuple(
    ".gif .apng .avif .heic .heif .jfif .jpe .jp2 .j2k .ppm .pgm .pbm .pnm .tga .ico .dib "
    ".pcx .psd .exr .hdr .dds .qoi .sgi .ras .jpg .jpeg .png .bmp .tif .tiff .webp".split()
)  # image files a folder may hold besides predict.extensions


def _extension_set(extensions: list[str]) -> set[str]:
    return {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}


def check_input(spec: str) -> Path:
    """``input`` as a path; a ConfigError for a blank one (it would read the working directory), a DataError
    naming what an existing path is when it is neither a file nor a folder (a FIFO, a device ...)."""
    from segtrain.writeguard import describe, is_checkpoint

    if not str(spec).strip():
        raise ConfigError(f"input={spec!r} is blank: give an image, a folder or a glob like 'photos/*.jpg'")
    path = Path(os.path.expanduser(spec))
    what = describe(path)
    if what is not None and what != "a folder":
        raise DataError(f"input={spec} is {what}, not an image file or a folder of images")
    if what is None and path.is_file() and is_checkpoint(path):
        raise DataError(f"input={spec} is a checkpoint, not an image: give it as ckpt=, and images as input=")
    return path


def list_inputs(
    spec: str, extensions: list[str], exclude: Path | None = None, left_out: dict[Path, str] | None = None
) -> list[tuple[Path, Path]]:
    """The image files of ``input`` as (file, path relative to the input's root): one file (any
    extension), a folder (recursively) or a glob pattern (``**`` recurses); folders and globs keep files
    with one of ``extensions``; when ``exclude`` (the output folder) lies inside the folder or the glob's root,
    the files under it (earlier outputs) are left out, and when it is that root, the earlier predictions in
    it (:func:`earlier_prediction`).  ``left_out``: filled with the images of other types that the folder or
    glob holds (``.gif`` ...), each with the reason."""
    exts = _extension_set(extensions)
    path = check_input(spec)
    if path.is_file():
        return [(path, Path(path.name))]
    if path.is_dir():
        root, files = path, (f for f in path.rglob("*") if f.is_file())
    elif glob.has_magic(spec):
        parts = Path(os.path.expanduser(spec)).parts
        fixed = [p for p in parts[: next(i for i, p in enumerate(parts) if glob.has_magic(p))]]
        root = Path(*fixed) if fixed else Path(".")
        files = (Path(f) for f in glob.glob(os.path.expanduser(spec), recursive=True) if Path(f).is_file())
    else:
        raise DataError(f"input={spec}: no such file or folder (give an image, a folder or a glob like 'dir/*.jpg')")
    excluded, same = (exclude.resolve(), False) if exclude is not None else (None, False)
    if excluded is not None and root.resolve() not in excluded.parents:
        same, excluded = root.resolve() == excluded, None  # only an output folder in the input holds earlier outputs
    out = []
    for f in sorted(files):
        suffix = f.suffix.lower()
        if excluded is not None and excluded in f.resolve().parents:
            continue
        if suffix not in exts:
            if left_out is not None and suffix in OTHER_IMAGE_TYPES:
                left_out[f] = (
                    f"a {suffix} image, a type predict.extensions leaves out (add {suffix} to it to predict it)"
                )
            continue
        if same and earlier_prediction(f):
            continue
        out.append((f, f.relative_to(root)))
    return out


PREDICTION_MARK = "segtrain-predict"  # the PNG masks' Software text and the overlays' JPEG comment


def earlier_prediction(path: Path) -> bool:
    """Whether ``path`` is a mask, overlay or probabilities file that segtrain-predict wrote (its mark; a
    ``.npy`` by its mask's)."""
    from PIL import Image

    path = Path(path)
    if path.suffix.lower() == ".npy":
        path = path.with_suffix(".png")
    if path.suffix.lower() not in (".png", ".jpg"):
        return False
    try:
        with Image.open(path) as im:
            mark = im.info.get("Software") if im.format == "PNG" else im.info.get("comment")
    except Exception:  # noqa: BLE001 - unreadable: not ours
        return False
    mark = mark.decode("latin-1") if isinstance(mark, bytes) else str(mark or "")
    return mark.startswith(PREDICTION_MARK)


def output_stems(items: list[tuple[Path, Path]]) -> list[Path]:
    """``dir/a.jpg`` -> ``dir/a``; inputs that would share a stem (``a.jpg``, ``a.png``) keep their
    extension (``a.jpg``, ``a.png``) so that no output overwrites another."""
    stems = [rel.with_suffix("") for _, rel in items]
    counts: dict[Path, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    return [rel if counts[s] > 1 else s for s, (_, rel) in zip(stems, items)]


OUTPUT_SUFFIXES = {"mask": ".png", "overlay": "_overlay.jpg", "probs": ".npy"}  # appended to an image's stem


def output_paths(stem: Path, p: DictConfig) -> list[Path]:
    """The files written for one image (``predict`` config ``p``): the mask, the overlay, the probabilities."""
    kinds = ["mask"] + ["overlay"] * p.overlay + ["probs"] * p.save_probs
    return [stem.with_name(stem.name + OUTPUT_SUFFIXES[k]) for k in kinds]


def check_no_overwrite(
    items: list[tuple[Path, Path]],
    stems: list[Path],
    out_dir: Path,
    p: DictConfig,
    overwrite: bool = False,
    ckpt: Path | None = None,
    output: str | None = None,
) -> None:
    """An OutputError (exit 4) before anything is predicted when an output file (mask, overlay, probabilities)
    may not be written (:mod:`segtrain.writeguard`): it would replace an input image, the checkpoint, a
    checkpoint or a run dir's file (never), or a file this command did not write, e.g. an earlier prediction
    (only with ``overwrite``)."""
    from segtrain.console import short_path
    from segtrain.writeguard import check_outputs, file_ids

    inputs = {k: f"the input image {f}" for k, f in file_ids(f for f, _ in items).items()}
    if ckpt is not None:
        inputs.update({k: f"the checkpoint ckpt={ckpt}" for k in file_ids([ckpt])})
    paths = [path for stem in stems for path in output_paths(out_dir / stem, p)]
    refused = check_outputs(
        paths, inputs, overwrite, lambda f: "an earlier prediction" if earlier_prediction(f) else None
    )
    if not refused:
        return
    key = f"output={output if output is not None else out_dir}"
    first = refused[0]
    if first.hard:
        msg = f"{key}: {short_path(first.path, 100)} {first.what}"
        raise OutputError(f"{msg[:200]}; never replaced, not even with overwrite=true: choose another output=")
    what = f"{short_path(first.path, 80)} {first.what}"[:120]
    raise OutputError(
        f"{key} already holds {len(refused)} file(s) this command would replace ({what}); set overwrite=true to "
        "replace them, or choose another output="
    )


def check_out_dir(out_dir: Path, key: str) -> None:
    """An OutputError (exit 4) before the model loads when ``out_dir`` cannot be a folder this process writes in."""
    from segtrain.writeguard import describe

    what = "a file" if out_dir.exists() and describe(out_dir) is None else describe(out_dir)
    if what is not None and what != "a folder":
        raise OutputError(f"{key} is {what}; segtrain-predict writes its masks into a folder: choose another output=")
    above = next((d for d in [out_dir, *out_dir.absolute().parents] if os.path.lexists(d)), Path("/"))
    if not above.is_dir():
        raise OutputError(f"{key}: {above} is a file, not a folder; choose another output=")
    if not os.access(above, os.W_OK | os.X_OK):
        raise OutputError(f"{key}: cannot write in {above} (permission denied); choose another output=")


def _reason(e: BaseException) -> str:
    """Why a file was skipped, in a few words."""
    text = " ".join(str(e).split()) or type(e).__name__
    return f"not a readable image ({text[:160]})"


class _Images:
    """Decodes image files (in DataLoader workers): (index, HxWx3 uint8 RGB or the reason it failed)."""

    def __init__(self, files: list[Path], read):
        self.files, self.read = files, read

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | str]:
        try:
            return i, self.read(self.files[i])
        except Exception as e:  # noqa: BLE001 - any decoding failure skips the file with its reason
            return i, _reason(e)


def size_batches(files: list[Path], batch_size: int, in_channels: int = 3) -> tuple[list[list[int]], dict[int, str]]:
    """Indices of ``files`` grouped into batches of one upright size and pixel type (headers), and the files
    whose header cannot be read (index -> reason)."""
    from segtrain.data.disk import loads_rotated, read_header

    groups: dict[tuple, list[int]] = {}
    bad: dict[int, str] = {}
    for i, f in enumerate(files):
        try:
            h, w, _, dtype = read_header(Path(f))
            key = ((w, h) if loads_rotated(Path(f), in_channels) else (h, w), dtype)
            groups.setdefault(key, []).append(i)
        except Exception as e:  # noqa: BLE001
            bad[i] = _reason(e)
    batches = [idx[j : j + batch_size] for idx in groups.values() for j in range(0, len(idx), batch_size)]
    return batches, bad


MULTI_FRAME_TYPES = (".gif", ".png", ".apng", ".webp", ".mpo")  # animated: PIL reads their first frame
# (a multi-page TIFF is refused by the training reader, with its shape, and skipped)


def frame_count(path: Path) -> int:
    """The frames of an animated GIF, PNG or WebP (1 for a still image or another type)."""
    from PIL import Image

    if Path(path).suffix.lower() not in MULTI_FRAME_TYPES:
        return 1
    try:
        with Image.open(path) as im:
            return int(getattr(im, "n_frames", 1))
    except Exception:  # noqa: BLE001 - unreadable: reported when it is read
        return 1


def _save(path: Path, write) -> None:
    from segtrain.utils import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write, durable=False)


def write_outputs(stem: Path, image: np.ndarray, scores: torch.Tensor, predictor: Predictor, cfg: DictConfig):
    """``stem.png`` (class indices with the palette), ``stem_overlay.jpg`` and ``stem.npy``; the class map."""
    import torch
    from PIL import Image

    from segtrain.outputs import overlay

    pred = predictor.labels(scores).cpu().numpy()
    if predictor.mask_classes <= 256:
        im = Image.fromarray(pred.astype(np.uint8))
        pal = np.zeros((256, 3), np.uint8)
        pal[: len(predictor.palette)] = predictor.palette
        im.putpalette(pal.ravel().tolist())
    else:
        im = Image.fromarray(pred.astype(np.uint16))
    from PIL.PngImagePlugin import PngInfo

    from segtrain import __version__

    mark = f"{PREDICTION_MARK} {__version__}"  # earlier predictions are told apart from images by it
    info = PngInfo()
    info.add_text("Software", mark)
    _save(stem.with_name(stem.name + OUTPUT_SUFFIXES["mask"]), lambda f: im.save(f, format="PNG", pnginfo=info))
    p = cfg.predict
    if p.overlay:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:  # bands: an 8-bit view of the first
            image = display_rgb(image)
        blend = overlay(
            torch.from_numpy(image).permute(2, 0, 1)[None], torch.from_numpy(pred)[None], predictor.palette, -1, p.alpha
        )
        jpg = Image.fromarray(blend[0].permute(1, 2, 0).numpy())
        _save(
            stem.with_name(stem.name + OUTPUT_SUFFIXES["overlay"]),
            lambda f: jpg.save(f, format="JPEG", quality=90, comment=mark.encode()),
        )
    if p.save_probs:
        probs = predictor.probs(scores).to(torch.float16).cpu().numpy()
        buf = io.BytesIO()
        np.save(buf, probs)
        _save(stem.with_name(stem.name + OUTPUT_SUFFIXES["probs"]), buf.getvalue())
    return pred


def _histogram_lines(counts: np.ndarray, names: list[str]) -> str:
    total = max(int(counts.sum()), 1)
    parts = [f"{n} {100 * c / total:.1f}%" for n, c in zip(names, counts)]
    return "class histogram (share of predicted pixels): " + ", ".join(parts)


def _prepare(cfg: DictConfig) -> tuple[Predictor, DictConfig, dict]:
    """The predictor for ``cfg.ckpt`` with the command line's data/eval/device overrides, its merged config
    (with ``predict.*``) and the checkpoint."""
    from segtrain.config import validate
    from segtrain.evaluate import load_checkpoint, merge_config

    path = Path(cfg.ckpt).expanduser()
    state, stored = load_checkpoint(path)
    pcfg = merge_config(cfg, stored, "segtrain-predict")
    validate(pcfg)
    with open_dict(pcfg):
        pcfg.predict = cfg.predict
    return Predictor.from_state(state, pcfg, path), pcfg, state


def predict_files(predictor: Predictor, files: list[Path], stems: list[Path], out_dir: Path, cfg: DictConfig):
    """Predict ``files`` in batches of one size (decoded in ``data.num_workers`` loader workers) and write
    their outputs to ``out_dir / stems[i]``: (pixels per class, images done, {index: why skipped},
    {index: note}); an animated image is predicted on its first frame, with a note."""
    import torch
    from tqdm import tqdm

    from segtrain.data import num_workers
    from segtrain.outputs import bars_wanted

    batches, skipped = size_batches(files, cfg.predict.batch_size, predictor.in_channels)
    for i, reason in skipped.items():
        log.warning("skipped %s: %s", files[i], reason)
    notes = {
        i: f"{n} frames (an animated image): the first is predicted"
        for i, f in enumerate(files)
        if i not in skipped and (n := frame_count(f)) > 1
    }
    for i, note in notes.items():
        log.warning("%s: %s", files[i], note)
    workers = num_workers(cfg.data.num_workers)  # auto: the CPUs this process may use
    loader = torch.utils.data.DataLoader(
        _Images(files, predictor.read), batch_sampler=batches, num_workers=workers, collate_fn=list,
        worker_init_fn=_quiet_worker if workers > 0 else None,
    )  # fmt: skip
    counts, done = np.zeros(predictor.mask_classes, np.int64), 0
    bar = tqdm(
        total=len(files) - len(skipped), desc="predict", unit="img", disable=not bars_wanted(cfg.trainer.progress)
    )
    for batch in loader:
        for i, image in batch:
            why = image if isinstance(image, str) else predictor.too_small(*image.shape[:2])
            if why is not None:
                skipped[i] = why
                log.warning("skipped %s: %s", files[i], why)
        good = [(i, im) for i, im in batch if i not in skipped]
        # one forward pass per size and pixel type (headers can lie; 8- and 16-bit images are not stacked)
        for kind in dict.fromkeys((im.shape, im.dtype.str) for _, im in good):
            group = [(i, im) for i, im in good if (im.shape, im.dtype.str) == kind]
            for (i, image), scores in zip(group, _scores(predictor, [im for _, im in group], cfg)):
                try:
                    pred = write_outputs(out_dir / stems[i], image, scores, predictor, cfg)
                except OSError as e:
                    raise OutputError(
                        f"cannot write the outputs of {files[i]} to output={out_dir}: {e.strerror or e}; free space "
                        "or choose another output="
                    ) from None
                counts += np.bincount(pred.ravel(), minlength=predictor.mask_classes)[: predictor.mask_classes]
                done += 1
        bar.update(len(batch))
    bar.close()
    return counts, done, skipped, notes


def _scores(predictor: Predictor, images: list[np.ndarray], cfg: DictConfig) -> torch.Tensor:
    """:meth:`Predictor.scores`; out of memory is a ResourceError (exit 5) with the keys that help."""
    import torch

    from segtrain.errors import ResourceError

    try:
        return predictor.scores(images)
    except (torch.cuda.OutOfMemoryError, MemoryError, RuntimeError) as e:
        text = str(e).lower()
        if isinstance(e, RuntimeError) and not any(m in text for m in ("out of memory", "allocate memory")):
            raise
        h, w = images[0].shape[:2]
        raise ResourceError(
            f"out of memory predicting {len(images)} image(s) of {w}x{h} px at once on {predictor.device}: lower "
            f"predict.batch_size (now {cfg.predict.batch_size}), or predict in windows (eval.mode=slide) or at a "
            "smaller size (data.val_size)"
        ) from None


def run_predict(cfg: DictConfig) -> dict:
    """The ``segtrain-predict`` job: returns its summary (also written to ``predict.json`` in the run dir).
    Everything is checked before the model loads: the input, the output folder, and every file it would
    write (:func:`check_no_overwrite`); SIGTERM stops it as Ctrl-C does (no temporary file left)."""
    from segtrain.writeguard import Interrupts

    with Interrupts("segtrain-predict"):
        return _run_predict(cfg)


def _run_predict(cfg: DictConfig) -> dict:
    from hydra.core.hydra_config import HydraConfig

    from segtrain.config import validate_predict
    from segtrain.outputs import write_json
    from segtrain.writeguard import check_ckpt_path, check_outputs

    validate_predict(cfg)
    check_input(cfg.input)
    run_dir = Path(cfg.run_dir or HydraConfig.get().runtime.output_dir)
    if cfg.output is not None and cfg.output != "" and not str(cfg.output).strip():
        raise ConfigError(f"output={cfg.output!r} is blank: give a folder, or leave output out (the run dir)")
    out_dir = Path(os.path.expanduser(cfg.output)) if cfg.output else run_dir
    key = f"output={cfg.output}" if cfg.output else f"the run dir {run_dir}"
    ckpt = Path(cfg.ckpt).expanduser()
    check_ckpt_path(ckpt, f"ckpt={cfg.ckpt}")
    left_out: dict[Path, str] = {}
    items = list_inputs(cfg.input, list(cfg.predict.extensions), exclude=out_dir, left_out=left_out)
    if not items:
        exts = " ".join(cfg.predict.extensions)
        other = f"; {len(left_out)} image(s) of other types, e.g. {next(iter(left_out.values()))}" if left_out else ""
        raise DataError(
            f"input={cfg.input} holds no image files (extensions: {exts}); see predict.extensions{other}"[:290]
        )
    check_out_dir(out_dir, key)
    stems = output_stems(items)
    check_no_overwrite(items, stems, out_dir, cfg.predict, cfg.overwrite, ckpt, cfg.output or str(out_dir))
    for r in check_outputs([run_dir / "predict.json"], {}, cfg.overwrite):
        if r.hard:
            raise OutputError(f"the run dir {run_dir}: its predict.json {r.what}; give this run its own hydra.run.dir")
        raise OutputError(
            f"the run dir {run_dir} already holds predict.json of an earlier run; set overwrite=true "
            "to replace it, or give this run its own hydra.run.dir"
        )
    for f, reason in left_out.items():
        log.warning("skipped %s: %s", f, reason)
    predictor, pcfg, state = _prepare(cfg)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{key} cannot be created: {e.strerror or e}; choose another output=") from None
    e = pcfg.eval
    log.info(
        "predicting %d file(s) from %s with %s (%s, step %s) | eval %s%s | %s %s",
        len(items), cfg.input, cfg.ckpt, pcfg.model.name, state.get("step"), e.mode,
        f" scales {list(e.scales)} flip {e.flip}" if (list(e.scales) != [1.0] or e.flip) else "",
        predictor.device, predictor.precision,
    )  # fmt: skip
    files = [f for f, _ in items]
    t0 = time.perf_counter()
    counts, done, skipped, notes = predict_files(predictor, files, stems, out_dir, pcfg)
    seconds = time.perf_counter() - t0
    skipped_all = {str(files[i]): skipped[i] for i in sorted(skipped)} | {str(f): r for f, r in left_out.items()}
    summary = {
        "checkpoint": str(ckpt.resolve()),
        "input": cfg.input,
        "output": str(out_dir.resolve()),
        "predicted": done,
        "skipped": skipped_all,
        "notes": {str(files[i]): notes[i] for i in sorted(notes)},
        "seconds": seconds,
        "images_per_sec": done / seconds if seconds > 0 else None,
        "device": str(predictor.device),
        "precision": predictor.precision,
        "eval": OmegaConf.to_container(pcfg.eval),
        "val_size": OmegaConf.to_container(pcfg.data)["val_size"],
        "class_names": predictor.class_names,
        "class_pixels": dict(zip(predictor.class_names, counts.tolist())),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "predict.json", summary)
    if done == 0:
        path, why = next(iter(summary["skipped"].items()))
        raise DataError(f"no image could be read from input={cfg.input}: {len(skipped_all)} file(s) skipped "
                        f"(first: {path}: {why})"[:290])  # fmt: skip
    log.info(
        "%d image(s) predicted, %d skipped | %.1f images/s (%s, %s) | outputs in %s",
        done, len(skipped_all), summary["images_per_sec"] or float("nan"), predictor.device, predictor.precision,
        summary["output"],
    )  # fmt: skip
    log.info(_histogram_lines(counts, predictor.class_names))
    return summary


def _quiet_worker(worker_id: int) -> None:
    import signal

    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the main process stops the loader
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the main process's handler (which unwinds its job)
    torch.set_num_threads(1)


def _predict(cfg: DictConfig) -> int:
    return run_predict(cfg)["predicted"]


main = command(_predict, "predict", "segtrain-predict")  # the console script

if __name__ == "__main__":
    main()
