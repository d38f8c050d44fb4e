"""``segtrain-predict ckpt=PATH input=FILE|DIR|GLOB [output=DIR]``: a trained network on new images.

For every image ``<name>.png`` (class indices, the checkpoint's palette), ``<name>_overlay.jpg``
(``predict.overlay``, ``predict.alpha``) and ``<name>.npy`` (``predict.save_probs``: float16 probabilities)
(:func:`segtrain.predict.predict_files`); a folder is read recursively and its layout kept; an unreadable file
is skipped with one line; ``predict.json`` in the run dir sums it up.  Everything is checked before the model
loads: the input, the output folder and every file it would write (never one it did not write itself, unless
``overwrite=true``; never a checkpoint, an input or a run's file: :mod:`segtrain.writeguard`).
"""

from __future__ import annotations

import glob
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from segtrain.apps.evaluate import merge_config
from segtrain.apps.runner import command
from segtrain.config import validate, validate_predict
from segtrain.console import short_path
from segtrain.errors import ConfigError, DataError, OutputError
from segtrain.files import checkpoint_file, describe, is_checkpoint
from segtrain.signals import Interrupts
from segtrain.utils import write_json
from segtrain.writeguard import OUTPUT_SUFFIXES, check_outputs, earlier_prediction, file_ids

if TYPE_CHECKING:
    import numpy as np

    from segtrain.predict import Predictor

log = logging.getLogger("segtrain")


OTHER_IMAGE_TYPES = tuple(
    ".gif .apng .avif .heic .heif .jfif .jpe .jp2 .j2k .ppm .pgm .pbm .pnm .tga .ico .dib "
    ".pcx .psd .exr .hdr .dds .qoi .sgi .ras .jpg .jpeg .png .bmp .tif .tiff .webp".split()
)  # image files a folder may hold besides predict.extensions


def _extension_set(extensions: list[str]) -> set[str]:
    return {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}


def check_input(spec: str) -> Path:
    """``input`` as a path; a ConfigError for a blank one (it would read the working directory), a DataError
    naming what an existing path is when it is neither a file nor a folder (a FIFO, a device ...)."""

    if not str(spec).strip():
        raise ConfigError(f"input={spec!r} is blank: give an image, a folder or a glob like 'photos/*.jpg'")
    path = Path(os.path.expanduser(spec))
    what = describe(path)
    if what is not None and not path.is_dir():
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


def output_stems(items: list[tuple[Path, Path]]) -> list[Path]:
    """``dir/a.jpg`` -> ``dir/a``; inputs that would share a stem (``a.jpg``, ``a.png``) keep their
    extension (``a.jpg``, ``a.png``) so that no output overwrites another."""
    stems = [rel.with_suffix("") for _, rel in items]
    counts: dict[Path, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    return [rel if counts[s] > 1 else s for s, (_, rel) in zip(stems, items)]


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

    what = "a file" if out_dir.exists() and describe(out_dir) is None else describe(out_dir)
    if what is not None and not out_dir.is_dir():
        raise OutputError(f"{key} is {what}; segtrain-predict writes its masks into a folder: choose another output=")
    above = next((d for d in [out_dir, *out_dir.absolute().parents] if os.path.lexists(d)), Path("/"))
    if not above.is_dir():
        raise OutputError(f"{key}: {above} is a file, not a folder; choose another output=")
    if not os.access(above, os.W_OK | os.X_OK):
        raise OutputError(f"{key}: cannot write in {above} (permission denied); choose another output=")


def _histogram_lines(counts: np.ndarray, names: list[str]) -> str:
    total = max(int(counts.sum()), 1)
    parts = [f"{n} {100 * c / total:.1f}%" for n, c in zip(names, counts)]
    return "class histogram (share of predicted pixels): " + ", ".join(parts)


def _prepare(cfg: DictConfig) -> tuple[Predictor, DictConfig, dict]:
    """The predictor for ``cfg.ckpt`` with the command line's data/eval/device overrides, its merged config
    (with ``predict.*``) and the checkpoint."""
    # torch and the network load only now, after every check (a refused command and --help stay quick)
    from segtrain.checkpoint import load_checkpoint
    from segtrain.predict import Predictor

    path = Path(cfg.ckpt).expanduser()
    state, stored = load_checkpoint(path)
    pcfg = merge_config(cfg, stored, "segtrain-predict")
    validate(pcfg)
    with open_dict(pcfg):
        pcfg.predict = cfg.predict
    return Predictor.from_state(state, pcfg, path), pcfg, state


def run_predict(cfg: DictConfig) -> dict:
    """The ``segtrain-predict`` job: returns its summary (also written to ``predict.json`` in the run dir).
    Everything is checked before the model loads: the input, the output folder, and every file it would
    write (:func:`check_no_overwrite`); SIGTERM stops it as Ctrl-C does (no temporary file left)."""

    with Interrupts("segtrain-predict"):
        return _run_predict(cfg)


def _run_predict(cfg: DictConfig) -> dict:

    validate_predict(cfg)
    check_input(cfg.input)
    run_dir = Path(cfg.run_dir or HydraConfig.get().runtime.output_dir)
    if cfg.output is not None and cfg.output != "" and not str(cfg.output).strip():
        raise ConfigError(f"output={cfg.output!r} is blank: give a folder, or leave output out (the run dir)")
    out_dir = Path(os.path.expanduser(cfg.output)) if cfg.output else run_dir
    key = f"output={cfg.output}" if cfg.output else f"the run dir {run_dir}"
    ckpt = Path(cfg.ckpt).expanduser()
    checkpoint_file(ckpt, "ckpt")
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
        len(items),
        cfg.input,
        cfg.ckpt,
        pcfg.model.name,
        state.get("step"),
        e.mode,
        f" scales {list(e.scales)} flip {e.flip}" if (list(e.scales) != [1.0] or e.flip) else "",
        predictor.device,
        predictor.precision,
    )
    files = [f for f, _ in items]
    t0 = time.perf_counter()
    from segtrain.predict import predict_files  # loaded with the network by _prepare

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
        raise DataError(
            f"no image could be read from input={cfg.input}: {len(skipped_all)} file(s) skipped (first: {path}: {why})"[
                :290
            ]
        )
    log.info(
        "%d image(s) predicted, %d skipped | %.1f images/s (%s, %s) | outputs in %s",
        done,
        len(skipped_all),
        summary["images_per_sec"] or float("nan"),
        predictor.device,
        predictor.precision,
        summary["output"],
    )
    log.info(_histogram_lines(counts, predictor.class_names))
    return summary


def _predict(cfg: DictConfig) -> int:
    return run_predict(cfg)["predicted"]


main = command(_predict, "predict", "segtrain-predict")  # the console script


if __name__ == "__main__":
    main()
