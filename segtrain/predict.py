"""A trained network on new images: :class:`Predictor`, and :func:`predict_files` (what ``segtrain-predict`` runs).

``Predictor`` prepares an image exactly as validation does (the checkpoint's ``data.val_size`` keep-ratio
rescale, ``data.mean``/``data.std`` on the device), predicts with the checkpoint's ``eval`` settings
(whole image, sliding window, multi-scale + flip; :mod:`segtrain.inference`) under the device's autocast,
and resizes the scores back to the image's own size::

    from segtrain import Predictor
    p = Predictor.from_checkpoint("best.pt", device="auto")
    mask = p(image)                 # HxWx3 uint8 array, PIL image or path -> HxW int64 class indices
    probs = p.probabilities(image)  # C x H x W float32

:func:`predict_files` writes for every image ``<name>.png`` (class indices, the checkpoint's palette),
``<name>_overlay.jpg`` (``predict.overlay``, ``predict.alpha``) and ``<name>.npy`` (``predict.save_probs``:
float16 probabilities); images of one size and pixel type are predicted in batches; an unreadable file is
skipped with one line.  The command around it is :mod:`segtrain.apps.predict`.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch.nn import functional as F
from tqdm import tqdm

from segtrain.checkpoint import load_checkpoint
from segtrain.config import validate
from segtrain.console import first_line
from segtrain.data import mask_classes
from segtrain.data.build import num_workers, worker_init
from segtrain.data.images import TIFF_EXTS, loads_rotated, read_header, read_image
from segtrain.data.palette import palette_of
from segtrain.data.transforms import rescaled_size, standard_val, val_scale
from segtrain.errors import ConfigError, OutputError, ResourceError
from segtrain.evaluation import class_names, eval_settings
from segtrain.inference import labels, predict
from segtrain.models import min_input_size
from segtrain.models.build import checkpoint_model
from segtrain.outputs import bars_wanted, display_rgb, overlay
from segtrain.runtime import BatchToDevice, autocast, resolve_device
from segtrain.utils import atomic_write
from segtrain.version import __version__
from segtrain.writeguard import OUTPUT_SUFFIXES, PREDICTION_MARK

log = logging.getLogger("segtrain")


def _deeper_than_8_bits(source: Any) -> bool:
    """A uint16 array, or a PNG or TIFF file whose header says 16 bits or float (JPEG, BMP ...: 8 bits only)."""
    if isinstance(source, np.ndarray):
        return source.dtype == np.uint16
    path = Path(source) if isinstance(source, (str, os.PathLike)) else None
    return path is not None and path.suffix.lower() in (".png", *TIFF_EXTS) and read_header(path)[3] != "uint8"


def checkpoint_palette(cfg: DictConfig, meta: Mapping) -> np.ndarray:
    """The class colours of a checkpoint's network: ``data.palette`` (an override, or the training config's), else
    the palette the checkpoint stores (the data set's own), else the VOC map."""
    k = mask_classes(cfg.data.num_classes)
    return palette_of(k, (cfg.data.palette, "data.palette"), (meta.get("palette"), "the checkpoint's palette"))


class Predictor:
    """A trained network with its validation preprocessing and eval settings: image in, class map out.

    Build it with :meth:`from_checkpoint`.  ``model`` is the ``torch.nn.Module`` in eval mode on
    ``device``; ``class_names``, ``palette`` (K x 3 uint8) and ``cfg`` (the checkpoint's config with the
    overrides applied) describe it.
    """

    def __init__(self, model: torch.nn.Module, cfg: DictConfig, class_names: list[str], palette: np.ndarray):

        self.cfg, self.class_names, self.palette = cfg, list(class_names), np.asarray(palette, np.uint8)
        self.num_classes = cfg.data.num_classes  # network outputs: 1 for one sigmoid logit
        self.mask_classes = mask_classes(self.num_classes)  # classes in the masks: 2 for one sigmoid logit
        self.in_channels = cfg.data.in_channels
        self.device, self.precision = resolve_device(cfg.device)

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

        state, cfg = load_checkpoint(path)
        settings = {"device.type": device, "device.precision": precision, **(overrides or {})}
        for key, value in settings.items():
            if not key.startswith(("data.", "eval.", "device.")):
                raise ConfigError(f"Predictor override {key}: only data.*, eval.* and device.* keys can change")
            try:
                OmegaConf.update(cfg, key, value, merge=False)
            except OmegaConfBaseException as e:
                raise ConfigError(f"Predictor override {key}={value!r}: {first_line(e, None)}") from None
        cfg.model.pretrained, cfg.model.init_from = False, None  # the checkpoint holds every weight
        validate(cfg)
        return cls.from_state(state, cfg, path)

    @classmethod
    def from_state(cls, state: dict, cfg: DictConfig, path: str | os.PathLike = "checkpoint") -> Predictor:
        """From a loaded checkpoint and its (merged, validated) config."""

        meta = state.get("meta", {})
        names = class_names(None, cfg.data.num_classes, cfg.data.class_names or meta.get("class_names"))
        return cls(checkpoint_model(state, cfg, path), cfg, names, checkpoint_palette(cfg, meta))

    # ------------------------------------------------------------------------------------------------

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """An HxWxC image (:meth:`read`) as validation feeds it to the network: [C, h, w]."""

        if self.transform is not None:
            image = self.transform(image=image)["image"]
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))

    def too_small(self, h: int, w: int) -> str | None:
        """Why an ``h x w`` image cannot be predicted (a side below the network's smallest input once
        ``data.val_size`` and ``eval.scales`` have rescaled it), or None when it can."""

        need = min_input_size(self.cfg.model)
        size = val_scale(self.cfg.data)
        ph, pw = (h, w) if size is None else rescaled_size(h, w, size)
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

        x = self.to_device.images(torch.stack([self.prepare(im) for im in images]))
        with torch.no_grad(), autocast(self.device, self.precision):
            out = predict(self.model, x, self.num_classes, **self.settings)
        size = images[0].shape[:2]
        if tuple(out.shape[-2:]) != size:  # data.val_size rescaled the image: back to its own size
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        return out

    def read(self, source: Any) -> np.ndarray:
        """``source`` (a path, a PIL image or an array) as the network's input image, by
        :func:`segtrain.data.images.read_image`: for a 3-band network, an 8-bit photo as an upright 8-bit RGB
        photo (``rgb8=True``); a uint16 array, and a PNG or TIFF whose header says 16 bits or float, at its own
        depth, as training read it; for any other ``data.in_channels``, a file as training read it (TIFF bands,
        16 bit) or an HxWxC array with that many bands."""

        if self.in_channels == 3 and not _deeper_than_8_bits(source):
            return read_image(source, rgb8=True)
        return read_image(source, self.in_channels)

    def labels(self, scores: torch.Tensor) -> torch.Tensor:
        """[K, H, W] scores -> [H, W] class indices (one sigmoid logit: ``sigmoid > eval.threshold``)."""

        return labels(scores[None], self.cfg.eval.threshold)[0]

    def probs(self, scores: torch.Tensor) -> torch.Tensor:
        """[K, H, W] scores -> [C, H, W] class probabilities (one sigmoid logit: background, foreground)."""

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


# (a multi-page TIFF is refused by the training reader, with its shape, and skipped)


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


def frame_count(path: Path) -> int:
    """The frames of an animated GIF, PNG or WebP (1 for a still image or another type)."""

    if Path(path).suffix.lower() not in MULTI_FRAME_TYPES:
        return 1
    try:
        with Image.open(path) as im:
            return int(getattr(im, "n_frames", 1))
    except Exception:  # noqa: BLE001 - unreadable: reported when it is read
        return 1


def _save(path: Path, write) -> None:

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write, durable=False)


def write_outputs(stem: Path, image: np.ndarray, scores: torch.Tensor, predictor: Predictor, cfg: DictConfig):
    """``stem.png`` (class indices with the palette), ``stem_overlay.jpg`` and ``stem.npy``; the class map."""

    pred = predictor.labels(scores).cpu().numpy()
    if predictor.mask_classes <= 256:
        im = Image.fromarray(pred.astype(np.uint8))
        pal = np.zeros((256, 3), np.uint8)
        pal[: len(predictor.palette)] = predictor.palette
        im.putpalette(pal.ravel().tolist())
    else:
        im = Image.fromarray(pred.astype(np.uint16))

    mark = f"{PREDICTION_MARK} {__version__}"  # earlier predictions are told apart from images by it
    info = PngInfo()
    info.add_text("Software", mark)
    _save(stem.with_name(stem.name + OUTPUT_SUFFIXES["mask"]), lambda f: im.save(f, format="PNG", pnginfo=info))
    p = cfg.predict
    if p.overlay:
        image = display_rgb(image)  # 16 bits, float, other bands: an 8-bit RGB view
        jpg = Image.fromarray(overlay(image, pred, predictor.palette, -1, p.alpha))
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


def predict_files(predictor: Predictor, files: list[Path], stems: list[Path], out_dir: Path, cfg: DictConfig):
    """Predict ``files`` in batches of one size (decoded in ``data.num_workers`` loader workers) and write
    their outputs to ``out_dir / stems[i]``: (pixels per class, images done, {index: why skipped},
    {index: note}); an animated image is predicted on its first frame, with a note."""

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
        _Images(files, predictor.read),
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=list,
        worker_init_fn=partial(worker_init, stop_on_sigterm=True) if workers > 0 else None,
    )
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
