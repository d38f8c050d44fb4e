#!/usr/bin/env python
"""The networks side by side at equal training time: each trains for the same wall-clock budget on the same data,
then is scored on the validation set.

    python scripts/compare_networks.py [--budget SECONDS] [--digits ROOT] [--networks a,b,...] [--out DIR] [KEY=VALUE ...]

Data sets: ``synthetic`` (segtrain's built-in default data, 64 px, 6 classes) and, with ``--digits ROOT``, the
handwritten-digits VOC set that ``scripts/make_digits_voc.py ROOT`` writes (11 classes, 64 px crops).  Each
network trains from scratch (no pretrained weights: the comparison is of architectures, offline) with the data
set's segtrain settings (augmentation, batch, loss ``ce``, AdamW lr 1e-3 with its parameter groups), the lr
decaying as poly (power 0.9) over the *time* budget rather than over iterations, so every network gets a full
schedule in the same seconds.  KEY=VALUE arguments are segtrain overrides for every run (e.g. device=cuda).

Every sample is loaded once before the clocks start (the built-in set draws its images on first use), and
the networks share the data set objects.  It prints, per data set and network, the validation mIoU after
the budget, the training images per second (over the budget: forward, backward, step and loader), the
steps taken and the parameter count, and writes compare.json / compare.md with ``--out``.  Numbers from a
shared CPU are noisy: compare within one run; on a CPU that other jobs share, ``OMP_NUM_THREADS=1`` avoids
OpenMP threads spinning against each other (on the 2-core test machine at a load of 7, a U-Net step took
0.33 s with one thread and 1-6 s with two).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NETWORKS = {  # name: overrides (CPU-sized: ResNet-18 encoders, UPerNet's head at 128 channels instead of 512)
    "unet": ["model=unet"],
    "deeplabv3plus-r18": ["model=deeplabv3plus", "model.backbone=resnet18"],
    "segformer-b0": ["model=segformer", "model.variant=b0"],
    "upernet-r18": ["model=upernet", "model.backbone=resnet18", "model.head_channels=128"],
}
DIGITS = [
    "data=voc",
    "data.num_classes=11",
    "data.class_names=[background,0,1,2,3,4,5,6,7,8,9]",
    "data.base_size=null",
    "data.crop_size=64",
    "data.scale_range=[0.75,1.25]",
    "data.batch_size=16",
]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from segtrain.config import config_dir, register_configs, validate

    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = hydra_compose("config", overrides=overrides)
    validate(cfg)
    return cfg


def warm_datasets(cfg) -> tuple:
    """The data set's (train, val) splits, every sample loaded once before any timing: the built-in set draws its
    images on first use and keeps them, so no network pays for drawing them in its budget."""
    from segtrain.data.build import build_datasets

    train_set, val_set, _ = build_datasets(cfg.data, cfg.seed)
    for ds in (train_set, val_set):
        for i in range(len(ds)):
            ds.load(i)
    return train_set, val_set


def train_for(cfg, budget: float, datasets: tuple) -> dict:
    """Train ``cfg``'s network for ``budget`` seconds (poly lr over the elapsed time) on ``datasets`` (train, val),
    then validate it."""
    import torch

    from segtrain.data.build import build_loader
    from segtrain.evaluation import class_names, evaluate_loader
    from segtrain.losses.functions import build_loss
    from segtrain.models.build import build_model, count_parameters
    from segtrain.optim import build_optimizer
    from segtrain.runtime import BatchToDevice, autocast, resolve_device, seed_everything

    seed_everything(cfg.seed)
    device, precision = resolve_device(cfg.device)
    train_set, val_set = datasets
    train_loader = build_loader(train_set, cfg.data, True, cfg.seed)
    val_loader = build_loader(val_set, cfg.data, False, cfg.seed)
    fmt = torch.channels_last if cfg.device.channels_last else torch.contiguous_format
    model = build_model(cfg.model, cfg.data.num_classes, cfg.data.in_channels).to(device, memory_format=fmt)
    to_device = BatchToDevice(device, cfg.data.mean, cfg.data.std, fmt)
    criterion = build_loss(cfg.loss, cfg.data.num_classes, cfg.data.ignore_index).to(device)
    optimizer = build_optimizer(cfg.optimizer, model)
    bases = [g["lr"] for g in optimizer.param_groups]
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    steps, images, epoch, start = 0, 0, 0, time.perf_counter()
    model.train()
    while time.perf_counter() - start < budget:
        train_loader.sampler.set_epoch(epoch)
        for x, y in train_loader:
            elapsed = time.perf_counter() - start
            if elapsed >= budget:
                break
            for group, base in zip(optimizer.param_groups, bases):
                group["lr"] = base * (1 - elapsed / budget) ** 0.9
            x, y = to_device(x, y)
            with autocast(device, precision):
                loss = criterion(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            steps, images = steps + 1, images + x.shape[0]
        epoch += 1
    seconds = time.perf_counter() - start
    model.eval()
    names = class_names(train_set, cfg.data.num_classes)
    with torch.no_grad():
        metrics, _, _ = evaluate_loader(model, val_loader, to_device, lambda: autocast(device, precision), cfg, names)
    return {
        "miou": metrics["miou"],
        "aacc": metrics["aacc"],
        "train_images_per_sec": images / seconds,
        "steps": steps,
        "epochs": epoch,
        "seconds": seconds,
        "params": count_parameters(model),
        "precision": precision,
        "device": str(device),
    }


def markdown(result: dict) -> str:
    lines = [
        f"# Networks at equal training time ({result['budget']:g} s each): {result['device_name']}, torch "
        f"{result['torch']}, {result['date']}",
        "",
    ]
    for data, rows in result["runs"].items():
        lines += [f"## {data}", "", "| network | params | val mIoU | train img/s | steps |", "|---|---|---|---|---|"]
        for name, r in rows.items():
            lines.append(
                f"| {name} | {r['params'] / 1e6:.2f}M | {100 * r['miou']:.1f} | "
                f"{r['train_images_per_sec']:.1f} | {r['steps']} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=30.0, help="training seconds per network and data set")
    p.add_argument("--digits", default=None, help="ROOT written by scripts/make_digits_voc.py (else synthetic only)")
    p.add_argument("--networks", default=",".join(NETWORKS), help=f"comma-separated, of: {', '.join(NETWORKS)}")
    p.add_argument("--out", default=None, help="write compare.json and compare.md into this folder")
    args, overrides = p.parse_known_args(argv)
    import torch

    datasets = {"synthetic": []}
    if args.digits:
        datasets["digits"] = [*DIGITS, f"data.root={args.digits}"]
    unknown = [n for n in args.networks.split(",") if n not in NETWORKS]
    if unknown:
        p.error(f"unknown network(s) {', '.join(unknown)}; choose from {', '.join(NETWORKS)}")
    result = {
        "budget": args.budget,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "device_name": f"{os.cpu_count()}-core {platform.machine()} CPU",
        "overrides": overrides,
        "runs": {},
    }
    for data, data_overrides in datasets.items():
        result["runs"][data], splits = {}, None
        for name in args.networks.split(","):
            cfg = compose([*data_overrides, *NETWORKS[name], "trainer.progress=false", *overrides])
            splits = splits or warm_datasets(cfg)  # one data set for all networks (the same data config)
            row = train_for(cfg, args.budget, splits)
            result["runs"][data][name] = row
            if row["device"].startswith("cuda"):
                result["device_name"] = torch.cuda.get_device_name()
            print(
                f"{data:9s} {name:18s} {row['params'] / 1e6:6.2f}M  mIoU {100 * row['miou']:5.1f}  "
                f"{row['train_images_per_sec']:6.1f} img/s  {row['steps']} steps",
                flush=True,
            )
            if args.out:
                Path(args.out).mkdir(parents=True, exist_ok=True)
                (Path(args.out) / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
                (Path(args.out) / "compare.md").write_text(markdown(result) + "\n")
    print("\n" + markdown(result))
    return result


if __name__ == "__main__":
    main()
