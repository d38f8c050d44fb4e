#!/usr/bin/env python
"""Loader throughput: img/s of the training loader with the full VOC recipe at a 512 crop, by worker count.

    python scripts/bench_loader.py [--images 64] [--workers 0,1,2] [--batches 30] [--target IMG_PER_S]

Writes a VOC-layout tree of real files (JPEG photos-sized 500x375 drawn by the synthetic generator, palette
PNG masks with 255 borders) to a temp dir, then times ``segtrain.data.build_loader`` over it: random resize
0.5-2.0 around 512x2048, crop 512 with cat_max_ratio 0.75, pad, flip, photometric distortion, uint8 collate.
The first batches (worker start-up) are excluded.  All numbers come from the same run.

``--target``: the rate a model trains at on your GPU (e.g. 263 img/s for DeepLabv3+ R50 at 512 px, batch 8,
fp16 on an H200 with torch 2.11, 2026-11-27, from ``scripts/benchmark.py models``); the report ends with the smallest worker count tried that
feeds it, or says that none did (and what one worker gives, for a rough count to try).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from PIL import Image  # noqa: E402

from segtrain.config import DataConfig  # noqa: E402
from segtrain.data.build import build_datasets, build_loader  # noqa: E402
from segtrain.data.palette import default_palette  # noqa: E402
from segtrain.data.synthetic import SyntheticShapes  # noqa: E402


def write_tree(root: Path, n: int) -> None:
    base = root / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / d).mkdir(parents=True, exist_ok=True)
    gen = SyntheticShapes(n, (375, 500), 8, cache=False)
    pal = default_palette(256).flatten().tolist()
    names = []
    for i in range(n):
        img, mask = gen.load(i)
        edges = cv2.morphologyEx(mask, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
        mask = np.where(edges, 255, mask).astype(np.uint8)
        name = f"2007_{i:06d}"
        cv2.imwrite(str(base / "JPEGImages" / f"{name}.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        png = Image.fromarray(mask, mode="P")
        png.putpalette(pal)
        png.save(base / "SegmentationClass" / f"{name}.png")
        names.append(name)
    for split in ("train", "val"):
        (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--target", type=float, default=None, help="img/s the loader must exceed (a model's GPU rate)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_tree(Path(tmp), args.images)
        cfg = OmegaConf.merge(
            OmegaConf.structured(DataConfig(name="voc")),
            OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "data" / "voc.yaml"),
        )
        cfg.root, cfg.batch_size, cfg.check_labels = tmp, args.batch_size, False
        train, _, _ = build_datasets(cfg, seed=0)
        print(
            f"VOC recipe, crop {cfg.crop_size}, batch {cfg.batch_size}, {args.images} JPEGs of 500x375, "
            f"{os.cpu_count()} CPUs"
        )
        print("| workers | img/s |\n|---|---|")
        rates = {}
        for w in (int(x) for x in args.workers.split(",")):
            cfg.num_workers = w
            loader = build_loader(train, cfg, train=True, seed=0)
            n, seen, t0, epoch = 0, 0, None, 0
            while t0 is None or n < args.batches:
                loader.sampler.set_epoch(epoch)
                for _batch in loader:
                    seen += 1
                    if t0 is None and seen == 2:  # the first batches include the workers' start-up
                        t0, n = time.perf_counter(), 0
                    n += 1
                    if t0 is not None and n >= args.batches:
                        break
                epoch += 1
            ips = n * cfg.batch_size / (time.perf_counter() - t0)
            print(f"| {w} | {ips:.1f} |", flush=True)
            rates[w] = ips
            del loader
        if args.target:
            enough = [w for w, r in sorted(rates.items()) if r > args.target]
            if enough:
                print(f"{enough[0]} worker(s) feed {args.target:g} img/s ({rates[enough[0]]:.1f} img/s)")
            else:
                one = rates.get(1)
                hint = f"; one worker gives {one:.1f} img/s, so try about {args.target / one:.0f}" if one else ""
                print(f"none of {sorted(rates)} worker(s) feeds {args.target:g} img/s{hint}")


if __name__ == "__main__":
    main()
