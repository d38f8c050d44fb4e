#!/usr/bin/env python
"""Benchmarks, each reporting numbers measured in the same run (the machine may be shared and noisy).

python scripts/benchmark.py overhead [--iters 60]
    segtrain's training loop vs a bare PyTorch loop (same model, data, precision, batch):
    img/s of each and their ratio.  Both get warm-up iterations first.

python scripts/benchmark.py models [--iters 400] [--models unet,fcn,...] [--image-size 64]
    each network trained with the same budget (iterations, batch, optimizer) on the built-in
    data set through the real CLI; prints a markdown table of val mIoU, train img/s, params.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

MODELS = {
    "unet": ["model=unet"],
    "unet-r18": ["model=unet", "model.backbone=resnet18"],
    "fcn8s-r18": ["model=fcn", "model.backbone=resnet18", "model.variant=8s"],
    "deconvnet": ["model=deconvnet"],
    "segnet": ["model=deconvnet", "model.variant=segnet"],
    "pspnet-r18": ["model=pspnet", "model.backbone=resnet18"],
    "deeplabv3-r18": ["model=deeplabv3", "model.backbone=resnet18"],
    "deeplabv3plus-r18": ["model=deeplabv3plus", "model.backbone=resnet18"],
    "deeplabv3plus-mnv3": ["model=deeplabv3plus", "model.backbone=mobilenet_v3_large"],
}


def segtrain_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "segtrain"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "segtrain"]


def bench_models(args) -> None:
    names = args.models.split(",") if args.models else list(MODELS)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            run = Path(tmp) / name
            cmd = (
                segtrain_cmd()
                + MODELS[name]
                + [
                    f"trainer.max_iters={args.iters}",
                    f"trainer.val_interval={args.iters}",
                    "trainer.progress=false",
                    f"data.image_size={args.image_size}",
                    f"hydra.run.dir={run}",
                    *args.extra,
                ]
            )
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                print(f"{name}: FAILED\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            m = json.loads((run / "metrics.json").read_text())
            rows.append((name, m["best_miou"], m["train_images_per_sec"], m["num_params"], wall))
            print(f"{name}: mIoU {m['best_miou']:.4f}, {m['train_images_per_sec']:.1f} img/s, {wall:.0f} s", flush=True)
    print(f"\n{args.iters} iterations, batch 16, {args.image_size}px, defaults otherwise ({' '.join(args.extra)})\n")
    print("| network | val mIoU | train img/s | parameters | wall s |")
    print("|---|---|---|---|---|")
    for name, miou, ips, params, wall in rows:
        print(f"| {name} | {miou:.3f} | {ips:.1f} | {params:,} | {wall:.0f} |")


def bench_overhead(args) -> None:
    import torch
    import torch.nn.functional as F
    from hydra import compose, initialize_config_dir

    from segtrain.cli import config_dir
    from segtrain.config import register_configs
    from segtrain.runtime import autocast
    from segtrain.trainer import Trainer

    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                f"trainer.max_iters={args.iters}",
                f"trainer.val_interval={10**9}",
                "trainer.progress=false",
                "trainer.num_vis=0",
                "data.num_val=16",
                "data.num_train=128",
                *args.extra,
            ],
        )

    with tempfile.TemporaryDirectory() as tmp:
        # segtrain: the real Trainer (its img/s excludes validation and the first step)
        Trainer(cfg.copy(), Path(tmp) / "warm").fit() if args.warmup else None
        trainer = Trainer(cfg, Path(tmp) / "run")
        seg_ips = trainer.fit()["train_images_per_sec"]

        # bare loop: the same model, data in memory, precision and batch; no loader, no logging
        model, device = trainer.model, trainer.device
        ds = trainer.train_set
        bs = cfg.data.batch_size
        xs = torch.stack([ds[(0, i)][0] for i in range(min(len(ds), bs * 8))])
        ys = torch.stack([ds[(0, i)][1] for i in range(min(len(ds), bs * 8))]).long()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model.train()
        n, t = 0, 0.0
        for it in range(args.iters):
            j = (it * bs) % (len(xs) - bs + 1)
            t0 = time.perf_counter()
            x = (xs[j : j + bs].to(device).float() / 255).contiguous(memory_format=trainer.memory_format)
            y = ys[j : j + bs].to(device)
            with autocast(trainer.device, trainer.precision):
                loss = F.cross_entropy(model(x).float(), y, ignore_index=255)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss.item()
            if it > 0:
                t += time.perf_counter() - t0
                n += bs
        bare_ips = n / t
    print(f"precision {trainer.precision}, batch {bs}, {args.iters} iterations, model {cfg.model.name}")
    print(f"segtrain loop: {seg_ips:.1f} img/s")
    print(f"bare loop:     {bare_ips:.1f} img/s")
    print(f"ratio segtrain / bare: {seg_ips / bare_ips:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["overhead", "models"])
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--models", default=None, help=f"comma-separated, from: {','.join(MODELS)}")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    p.add_argument("extra", nargs="*", help="more segtrain overrides, e.g. device.precision=fp32")
    args = p.parse_args()
    if args.what == "overhead":
        args.iters = args.iters or 60
        bench_overhead(args)
    else:
        args.iters = args.iters or 400
        bench_models(args)


if __name__ == "__main__":
    main()
