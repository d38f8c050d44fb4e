"""``segtrain-eval ckpt=PATH``: evaluate a checkpoint on its validation set (or another one).

A Hydra app like ``segtrain`` (same override syntax; outputs in its own run dir,
``hydra.run.dir`` honoured).  The model, data and eval settings are those stored in
the checkpoint; ``data.KEY=...`` / ``data=NAME`` and ``eval.KEY=...`` on the command
line replace them, and ``device.*`` applies to this machine.  Images are predicted at the
checkpoint's validation scale (``data.transforms.val_scale``: ``data.val_size``, else
``data.base_size``), and normalised with its ``data.mean`` / ``data.std`` (``auto`` on the command
line keeps the numbers training computed).  It prints the
per-class table and writes ``metrics.json`` (``miou``, ``aacc``, ``macc``, ``mdice``,
``per_class_iou``, the confusion matrix and the settings used) and
``confusion_matrix.png`` (row-normalised) into the run dir.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from segtrain.apps.runner import command
from segtrain.config import check_keys, validate
from segtrain.errors import ConfigError
from segtrain.utils import write_json

log = logging.getLogger("segtrain")


def _overridden_keys() -> list[str]:
    """The keys given on the command line (``data.root=x`` -> ``data.root``)."""
    return [item.split("=", 1)[0].lstrip("+~") for item in HydraConfig.get().overrides.task]


def merge_config(cfg: DictConfig, stored: DictConfig, prog: str = "segtrain-eval") -> DictConfig:
    """The checkpoint's config with this command line's data/eval/device/trainer choices applied."""
    out = stored.copy()
    keys = _overridden_keys()
    with open_dict(out):
        out.device = cfg.device  # this machine
        choice = HydraConfig.get().runtime.choices.get("data")
        if choice not in (None, "null", stored.data.get("name")):  # the same kind keeps label_map, classes, sizes
            out.data = cfg.data  # data=NAME: a different data set, seen as the network was trained to see images
            for key in ("in_channels", "mean", "std"):
                if f"data.{key}" not in keys and key in stored.data:
                    out.data[key] = stored.data[key]
        for key in keys:
            top = key.split(".", 1)[0]
            if key == "seed" or (top in ("data", "eval", "trainer") and "." in key):
                OmegaConf.update(out, key, OmegaConf.select(cfg, key), merge=False)
            elif top in ("model", "optimizer", "scheduler", "loss"):
                raise ConfigError(f"{prog} takes {top} from the checkpoint; drop the override {key}")
        out.model.pretrained = False  # the checkpoint holds every weight
        out.model.init_from = None
        for key in ("base_size", "mean", "std"):  # auto: the numbers training computed from its images
            if out.data.get(key) == "auto" and stored.data.get(key) not in (None, "auto"):
                out.data[key] = stored.data[key]
    return out


def evaluate_checkpoint(cfg: DictConfig) -> dict:
    if OmegaConf.is_missing(cfg, "ckpt") or not str(cfg.ckpt).strip():
        raise ConfigError("no checkpoint given: add ckpt=PATH, e.g. ckpt=outputs/DATE/TIME/checkpoints/best.pt")
    check_keys(cfg)  # a sweep's job (a single run: checked by the RunDirGuard)
    # torch and the library load when the job runs, not for `segtrain-eval --help`
    import torch

    from segtrain.checkpoint import load_checkpoint
    from segtrain.data.build import build_datasets, build_loader
    from segtrain.data.transforms import val_scale
    from segtrain.evaluation import class_names as names_of
    from segtrain.evaluation import evaluate_loader
    from segtrain.models.build import checkpoint_model
    from segtrain.outputs import bars_wanted, confusion_matrix_png, format_table
    from segtrain.runtime import BatchToDevice, autocast, configure_backends, resolve_device

    run_dir = Path(cfg.run_dir or HydraConfig.get().runtime.output_dir)
    path = Path(cfg.ckpt).expanduser()
    state, stored = load_checkpoint(path)
    ecfg = merge_config(cfg, stored)
    validate(ecfg)
    meta = state.get("meta", {})
    num_classes = ecfg.data.num_classes

    device, precision = resolve_device(ecfg.device)
    configure_backends(device, ecfg.trainer.deterministic, ecfg.device.cudnn_benchmark)  # as validation ran
    _, val_set, _ = build_datasets(ecfg.data, ecfg.seed, train=False)  # the training split is not read
    loader = build_loader(val_set, ecfg.data, False, ecfg.seed)
    model = checkpoint_model(state, ecfg, path)
    memory_format = torch.channels_last if ecfg.device.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format).eval()
    class_names = names_of(val_set, num_classes, meta.get("class_names"))

    e = ecfg.eval
    scale = val_scale(ecfg.data)
    log.info(
        "evaluating %s (%s, step %s) on data %s split %s: %d images at %s | eval %s%s%s | %s %s",
        path,
        ecfg.model.name,
        state.get("step"),
        ecfg.data.name,
        ecfg.data.get("val_split"),
        len(val_set),
        "their own size" if scale is None else f"scale {list(scale) if isinstance(scale, tuple) else scale}",
        e.mode,
        f" crop {e.crop_size} stride {e.stride}" if e.mode == "slide" else "",
        f" scales {list(e.scales)} flip {e.flip}" if (list(e.scales) != [1.0] or e.flip) else "",
        device,
        precision,
    )
    t0 = time.perf_counter()
    metrics, cm, _ = evaluate_loader(
        model,
        loader,
        BatchToDevice(device, ecfg.data.mean, ecfg.data.std, memory_format),
        lambda: autocast(device, precision),
        ecfg,
        class_names,
        progress=bars_wanted(ecfg.trainer.progress),
    )
    elapsed = time.perf_counter() - t0
    print(format_table(metrics, class_names), flush=True)
    keys = ("miou", "fg_iou", "aacc", "macc", "mdice", "per_class_iou", "iou", "acc", "dice")
    out = {k: metrics[k] for k in keys if k in metrics}
    out.update(
        {
            "checkpoint": str(path.resolve()),
            "step": state.get("step"),
            "model": ecfg.model.name,
            "data": ecfg.data.name,
            "root": ecfg.data.get("root"),
            "split": ecfg.data.get("val_split"),
            "num_images": len(val_set),
            "val_scale": list(scale) if isinstance(scale, tuple) else scale,
            "eval": OmegaConf.to_container(ecfg.eval),
            "device": str(device),
            "precision": precision,
            "seconds": elapsed,
            "class_names": class_names,
            "confusion_matrix": cm.mat.cpu().tolist(),
        }
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "metrics.json", out)
    confusion_matrix_png(cm.mat.cpu(), class_names, run_dir / "confusion_matrix.png")
    log.info(
        "mIoU %.4f%s  aAcc %.4f  mAcc %.4f | %.1f s | %s",
        metrics["miou"],
        f"  fg IoU {metrics['fg_iou']:.4f}" if "fg_iou" in metrics else "",
        metrics["aacc"],
        metrics["macc"],
        elapsed,
        run_dir,
    )
    return out


def _eval(cfg: DictConfig) -> float:
    return evaluate_checkpoint(cfg)["miou"]


main = command(_eval, "eval", "segtrain-eval")  # the console script

if __name__ == "__main__":
    main()
