#!/usr/bin/env python
"""Measure segtrain on data sets unlike its recipes: the plain command against the best settings found by hand.

    python scripts/own_data.py /tmp/own --max-iters 250                 # every set, both commands
    python scripts/own_data.py /tmp/own --sets nuclei16,digits --max-iters 500 --common device=cuda
    python scripts/own_data.py /tmp/own --runs plain --max-iters 250    # after a change to the defaults

It writes the data sets under OUT/data/ (once; reused when present), trains each with the ``segtrain`` CLI
(``hydra.run.dir=OUT/runs/SET-RUN``), reads each run's ``metrics.json`` and writes ``OUT/results.json`` and a
Markdown table (``OUT/results.md``): the best validation mIoU (and foreground IoU for binary sets) and the
validation history.  A run that fails records its one-line error instead.

The data sets (``--size small`` keeps them small enough for a CPU):

* ``nuclei16``: fluorescence-like nuclei (blurred bright ellipses) in 1-band 16-bit TIFFs that use only the
  bottom 8 bits (values 0..255 of 0..65535); 0/1 masks.  ImageNet statistics leave the input at -2.12 with a
  spread of ~0.002.
* ``digits``: handwriting in the VOC layout (``scripts/make_digits_voc.py``: 64-96 x 72-120 px pictures;
  needs scikit-learn); VOC's recipe scale enlarges them ~6x.
* ``tiny``: 8-bit photos of 384 px with 3-6 px spots (tiny objects on big images), 0/1 masks.
* ``imbalanced``: 8-bit grayscale pictures with a 95/5 background/foreground split, masks saved as 0/255.
* ``multiband``: 5-band float32 TIFFs (reflectance-like values around 0.1-0.4) with field-like regions.
* ``sizes``: 8-bit photos from 64 to 640 px whose objects scale with the picture (cameras of different
  resolutions).

``plain`` is the command a user types first (the layout, the root, and what the layout cannot do without);
``best`` adds the settings found by hand.  ``--common`` overrides apply to every run (budget, network width,
device); ``--max-iters`` sets ``trainer.max_iters`` and validates 4 times.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _split_dirs(root: Path, i: int, n_train: int) -> Path:
    return root / ("train" if i < n_train else "val")


def _blobs(rng, h: int, w: int, n: int, radius: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A 0/1 mask of ``n`` random ellipses and a float intensity image of them (blurred, varied brightness)."""
    mask = np.zeros((h, w), np.uint8)
    signal = np.zeros((h, w), np.float32)
    for _ in range(n):
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        ay, ax = int(rng.integers(*radius)), int(rng.integers(*radius))
        one = np.zeros((h, w), np.uint8)
        cv2.ellipse(one, (cx, cy), (ax, ay), float(rng.uniform(0, 180)), 0, 360, 1, -1)
        mask |= one
        signal = np.maximum(signal, one * float(rng.uniform(0.4, 1.0)))
    return mask, signal


def make_nuclei16(root: Path, n_train: int, n_val: int, size: int, seed: int = 0) -> None:
    import tifffile

    rng = np.random.default_rng(seed)
    for i in range(n_train + n_val):
        mask, signal = _blobs(rng, size, size, int(rng.integers(4, 12)) * size // 128, (5, 13))
        img = 15 + 170 * cv2.GaussianBlur(signal, (0, 0), 1.5) + rng.normal(0, 6, (size, size))
        sub = _split_dirs(root, i, n_train)
        (sub / "images").mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(sub / "images" / f"n{i:04d}.tif", np.clip(img, 0, 255).astype(np.uint16))
        _png(sub / "masks" / f"n{i:04d}.png", mask)


def make_tiny(root: Path, n_train: int, n_val: int, size: int, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n_train + n_val):
        base = rng.uniform(60, 200, 3)
        small = rng.normal(0, 30, (6, 6, 3)).astype(np.float32)
        img = base + cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC) + rng.normal(0, 12, (size, size, 3))
        mask = np.zeros((size, size), np.uint8)
        for _ in range(int(rng.integers(3, 9))):
            r = int(rng.integers(2, 4))
            y, x = int(rng.integers(r, size - r)), int(rng.integers(r, size - r))
            cv2.circle(mask, (x, y), r, 1, -1)
        img[mask == 1] = img[mask == 1] * 0.55 + rng.uniform(0, 80, 3)
        sub = _split_dirs(root, i, n_train)
        _png(sub / "images" / f"t{i:04d}.png", np.clip(img, 0, 255).astype(np.uint8))
        _png(sub / "masks" / f"t{i:04d}.png", mask)


def make_imbalanced(root: Path, n_train: int, n_val: int, size: int, seed: int = 2) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n_train + n_val):
        mask = np.zeros((size, size), np.uint8)
        while mask.mean() < 0.05:  # about 5% foreground: thin cracks
            p = rng.integers(0, size, 2)
            for _ in range(int(rng.integers(8, 20))):
                q = np.clip(p + rng.integers(-size // 8, size // 8 + 1, 2), 0, size - 1)
                cv2.line(mask, (int(p[0]), int(p[1])), (int(q[0]), int(q[1])), 1, int(rng.integers(1, 4)))
                p = q
        img = rng.normal(150, 20, (size, size)) - 45 * cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 0.8)
        sub = _split_dirs(root, i, n_train)
        _png(sub / "images" / f"c{i:04d}.png", np.clip(img, 0, 255).astype(np.uint8))
        _png(sub / "masks" / f"c{i:04d}.png", mask * 255)


def make_multiband(root: Path, n_train: int, n_val: int, size: int, seed: int = 3) -> None:
    import tifffile

    rng = np.random.default_rng(seed)
    signatures = np.array(
        [[0.05, 0.08, 0.06, 0.30, 0.20], [0.10, 0.12, 0.15, 0.20, 0.28], [0.04, 0.05, 0.04, 0.02, 0.01]]
    )
    for i in range(n_train + n_val):
        field = cv2.resize(rng.random((5, 5)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
        water = cv2.resize(rng.random((4, 4)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
        mask = np.where(water > 0.75, 2, np.where(field > 0.5, 1, 0)).astype(np.uint8)
        img = signatures[mask] + rng.normal(0, 0.02, (size, size, 5))
        sub = _split_dirs(root, i, n_train)
        (sub / "images").mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(
            sub / "images" / f"m{i:04d}.tif", img.astype(np.float32), photometric="minisblack", planarconfig="contig"
        )
        _png(sub / "masks" / f"m{i:04d}.png", mask)


def make_sizes(root: Path, n_train: int, n_val: int, size: int, seed: int = 4) -> None:
    """Pictures whose short side is size/4, size/2 or size, with a circle (class 1) and a square (class 2)
    scaled with the picture."""
    rng = np.random.default_rng(seed)
    for i in range(n_train + n_val):
        h = int(size * float(rng.choice([0.25, 0.5, 1.0])))
        w = int(h * 1.25)
        img = rng.normal(0, 20, (h, w, 3)) + rng.uniform(80, 180, 3)
        mask = np.zeros((h, w), np.uint8)
        r = int(rng.uniform(0.1, 0.2) * h)
        cv2.circle(mask, (int(rng.integers(r, w // 2 - r)), int(rng.integers(r, h - r))), r, 1, -1)
        x, y = int(rng.integers(w // 2 + r, w - r)), int(rng.integers(r, h - r))
        cv2.rectangle(mask, (x - r, y - r), (x + r, y + r), 2, -1)
        img[mask == 1] = img[mask == 1] * 0.4 + np.array([200, 40, 40]) * 0.6
        img[mask == 2] = img[mask == 2] * 0.4 + np.array([40, 60, 200]) * 0.6
        sub = _split_dirs(root, i, n_train)
        _png(sub / "images" / f"s{i:04d}.png", np.clip(img, 0, 255).astype(np.uint8))
        _png(sub / "masks" / f"s{i:04d}.png", mask)


def make_digits(root: Path, n_train: int, n_val: int, size: int, seed: int = 0) -> None:
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "make_digits_voc.py"),
        str(root),
        "--train",
        str(n_train),
        "--val",
        str(n_val),
    ]
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})


# name: builder, (train, val, size) for --size small and full, the plain command, the settings found by hand
SETS = {
    "nuclei16": {
        "make": make_nuclei16,
        "small": (60, 20, 128),
        "full": (400, 100, 256),
        "plain": ["data=folder"],
        "best": ["data.mean=auto", "data.base_size=null", "data.crop_size=128", "data.batch_size=8"],
    },
    "digits": {
        "make": make_digits,
        "small": (300, 60, 0),
        "full": (2000, 200, 0),
        "plain": ["data=voc"],
        "best": ["data.base_size=auto", "data.crop_size=96", "data.batch_size=16"],
    },
    "tiny": {
        "make": make_tiny,
        "small": (60, 20, 384),
        "full": (400, 100, 512),
        "plain": ["data=folder"],
        "best": ["data.base_size=null", "data.crop_size=192", "data.scale_range=[1.0,1.5]", "loss=ce_dice"],
    },
    "imbalanced": {
        "make": make_imbalanced,
        "small": (60, 20, 128),
        "full": (400, 100, 256),
        "plain": ["data=folder"],
        "best": ["data.label_map={255:1}", "data.crop_size=128", "data.base_size=null", "loss=ce_dice"],
    },
    "multiband": {
        "make": make_multiband,
        "small": (60, 20, 96),
        "full": (400, 100, 256),
        "plain": ["data=folder", "data.in_channels=5"],
        "best": ["data.mean=auto", "data.crop_size=96", "data.base_size=null", "data.num_classes=3"],
    },
    "sizes": {
        "make": make_sizes,
        "small": (60, 20, 160),
        "full": (400, 100, 512),
        "plain": ["data=folder", "data.num_classes=3"],
        "best": ["data.base_size=auto", "data.crop_size=128", "data.batch_size=8"],
    },
}
NEEDS = {"nuclei16": "tifffile", "multiband": "tifffile", "digits": "sklearn"}


def build(name: str, out: Path, size: str) -> Path | None:
    spec = SETS[name]
    root = out / "data" / name
    if (root / ".done").exists():
        return root
    try:
        __import__(NEEDS.get(name, "numpy"))
    except ImportError:
        print(f"skip {name}: needs {NEEDS[name]} (pip install {'scikit-learn' if name == 'digits' else NEEDS[name]})")
        return None
    n_train, n_val, side = spec[size]
    spec["make"](root, n_train, n_val, side)
    (root / ".done").touch()
    return root


def run(name: str, variant: str, root: Path, out: Path, max_iters: int, common: list[str]) -> dict:
    spec = SETS[name]
    overrides = [*spec["plain"], f"data.root={root}", *(spec["best"] if variant == "best" else [])]
    run_dir = out / "runs" / f"{name}-{variant}"
    budget = [f"trainer.max_iters={max_iters}", f"trainer.val_interval={max(1, max_iters // 4)}"]
    cmd = [
        sys.executable,
        "-m",
        "segtrain",
        *overrides,
        *budget,
        *common,
        f"hydra.run.dir={run_dir}",
        "trainer.overwrite=true",
    ]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    record = {
        "set": name,
        "run": variant,
        "overrides": overrides,
        "command": " ".join(cmd[2:]),
        "seconds": round(time.time() - t0),
    }
    metrics = run_dir / "metrics.json"
    if proc.returncode != 0 or not metrics.is_file():
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        record["error"] = lines[-1] if lines else f"exit code {proc.returncode}"
        return record
    m = json.loads(metrics.read_text())
    hist = m.get("history", [])
    record.update(best_miou=m.get("best_miou"), steps=m.get("step"))
    record["history"] = [{k: h.get(k) for k in ("step", "miou", "fg_iou") if k in h} for h in hist]
    record["per_class_iou"] = m.get("per_class_iou")  # of the last validation
    record["per_class_iou_at_best"] = _per_class_at_best(run_dir / "metrics.csv")
    return record


def _per_class_at_best(path: Path) -> dict | None:
    """Per-class IoU of the validation with the best mIoU, from the CSV logger's file (None without it)."""
    import csv

    if not path.is_file():
        return None
    rows = [r for r in csv.DictReader(path.open()) if r.get("val/mIoU")]
    if not rows:
        return None
    best = max(rows, key=lambda r: float(r["val/mIoU"]))
    return {k.split("/", 1)[1]: float(v) for k, v in best.items() if k.startswith("val_iou/") and v}


def table(results: list[dict]) -> str:
    rows = [
        "| set | run | best mIoU | its per-class IoU | history (step: mIoU) | s | error |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        hist = ", ".join(f"{h['step']}: {h['miou']:.3f}" for h in r.get("history", []))
        best = "" if r.get("best_miou") is None else f"{r['best_miou']:.3f}"
        per_class = ", ".join(f"{k} {v:.3f}" for k, v in (r.get("per_class_iou_at_best") or {}).items())
        error = r.get("error", "")[:160]
        rows.append(f"| {r['set']} | {r['run']} | {best} | {per_class} | {hist} | {r['seconds']} | {error} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--sets", default=",".join(SETS), help=f"comma-separated, of: {', '.join(SETS)}")
    p.add_argument("--runs", default="plain,best", help="plain, best or both")
    p.add_argument("--max-iters", type=int, default=250)
    p.add_argument("--size", choices=["small", "full"], default="small")
    p.add_argument(
        "--common",
        nargs="*",
        default=["data.num_workers=0", "trainer.progress=false", "logger=csv"],
        help="overrides for every run (default: no loader processes, no bars, CSV logger)",
    )
    args = p.parse_args()
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else []
    for name in [s for s in args.sets.split(",") if s]:
        if name not in SETS:
            sys.exit(f"unknown set {name!r}; choose from {', '.join(SETS)}")
        root = build(name, args.out, args.size)
        if root is None:
            continue
        for variant in [v for v in args.runs.split(",") if v]:
            record = run(name, variant, root, args.out, args.max_iters, args.common)
            record["max_iters"] = args.max_iters
            results = [
                r for r in results if (r["set"], r["run"], r.get("max_iters")) != (name, variant, args.max_iters)
            ]
            results.append(record)
            results_path.parent.mkdir(parents=True, exist_ok=True)
            results_path.write_text(json.dumps(results, indent=1))
            print(json.dumps({k: v for k, v in record.items() if k != "history"}), flush=True)
    (args.out / "results.md").write_text(table(results) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
