#!/usr/bin/env python
"""segtrain benchmarks.  Every ratio compares numbers measured in the same run, interleaved (A B A B ...),
because the machine may be shared and noisy.

    python scripts/benchmark.py [--quick] [--out DIR] [SECTION ...] [--size S] [--batch B] [--iters N]
                                [--networks NAME,...] [KEY=VALUE ...]

Sections (all of them when none is named):
    overhead  segtrain's Trainer against a bare PyTorch loop on the same model, precision and batch:
              overhead_ratio   = Trainer compute img/s (the step alone, as metrics.json's
                                 compute_images_per_sec) after the first epoch / bare-loop img/s (1.0: no overhead),
              end_to_end_ratio = Trainer img/s over wall time, waits for the real DataLoader included (as
                                 metrics.json's train_images_per_sec), after the first epoch / bare-loop img/s
                                 (data already in memory); end_to_end_ratio_first_epoch: the same in the first
                                 epoch (the built-in data set is generated then, and loader processes start).
              The bare loop runs --iters steps after each of the Trainer's epochs (interleaved T B T B ... T); each
              ratio is the median, over the bare blocks after the first epoch, of the mean rate of the two epochs
              around the block / the block's rate.  The Trainer trains 10 epochs of 20 steps with --quick (the
              built-in set cut to 320 images), else the config's whole run (the default run: 12 epochs of 100).
    models    each network: train img/s (forward, backward, optimizer step), eval img/s (whole-image inference)
              and peak memory (CUDA: max allocated; CPU: peak resident-set growth).
    peers     the same architecture from torchvision / segmentation_models_pytorch / transformers (SegFormer-B0; when
              installed), trained side by side at the same size, with segtrain's alternative implementations of a
              layer where it has one.
    profile   torch.profiler over a few training steps of each network: the operators with the most self time
              (CUDA kernels on a GPU, CPU time otherwise) and their share of the step.
    compile   torch.compile: compile time of the first step and steady-state img/s against eager.

KEY=VALUE arguments are segtrain overrides (e.g. device=cuda, device.precision=fp32, data.num_workers=8) and
may come anywhere.  --quick: small sizes and few iterations (about 3 minutes on a 2-core CPU, at most 5).  --out DIR writes
benchmark.json and benchmark.md there.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SECTIONS = ("overhead", "models", "peers", "profile", "compile")
NETWORKS = {  # name: model overrides
    "unet": ["model=unet"],
    "unet-r18": ["model=unet", "model.backbone=resnet18"],
    "fcn8s-r18": ["model=fcn", "model.backbone=resnet18"],
    "deconvnet": ["model=deconvnet"],
    "segnet": ["model=deconvnet", "model.variant=segnet"],
    "pspnet-r18": ["model=pspnet", "model.backbone=resnet18"],
    "deeplabv3-r18": ["model=deeplabv3", "model.backbone=resnet18"],
    "deeplabv3plus-r18": ["model=deeplabv3plus", "model.backbone=resnet18"],
    "deeplabv3plus-mnv3": ["model=deeplabv3plus", "model.backbone=mobilenet_v3_large"],
    "segformer-b0": ["model=segformer", "model.variant=b0"],
    "upernet-r18": ["model=upernet", "model.backbone=resnet18"],
}
if importlib.util.find_spec("timm") is not None:  # a plain ViT through its simple feature pyramid
    NETWORKS["upernet-vit-t"] = ["model=upernet", "model.backbone=timm:vit_tiny_patch16_224"]
FULL_NETWORKS = {  # the paper-size networks, for a GPU
    "unet-64": ["model=unet", "model.base_channels=64"],
    "fcn8s-r50": ["model=fcn"],
    "deconvnet-64": ["model=deconvnet", "model.base_channels=64"],
    "pspnet-r50-d8": ["model=pspnet"],
    "deeplabv3-r50-d8": ["model=deeplabv3", "model.output_stride=8"],
    "deeplabv3plus-r50": ["model=deeplabv3plus"],
    "segformer-b2": ["model=segformer", "model.variant=b2"],
    "upernet-r50": ["model=upernet"],
}


# ---------------------------------------------------------------------------------------------------------------
# set-up


def compose(overrides: list[str]):
    """The config of ``segtrain OVERRIDES``, checked as the CLI checks it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from segtrain.config import config_dir, register_configs, validate
    from segtrain.errors import ConfigError

    register_configs()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = hydra_compose("config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(" ".join(str(e).split())[:280]) from None
    validate(cfg)
    return cfg


class Env:
    """Device, precision and the step functions shared by every section."""

    def __init__(self, overrides: list[str]):
        import torch

        from segtrain.runtime import resolve_device

        self.torch = torch
        self.overrides = overrides
        self.cfg = compose(overrides)
        self.device, self.precision = resolve_device(self.cfg.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def autocast(self):
        from segtrain.runtime import autocast

        return autocast(self.device, self.precision)

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def batch(self, n: int, size: int, classes: int):
        torch = self.torch
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 3, size, size, generator=g).to(self.device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, classes, (n, size, size), generator=g).to(self.device)
        return x, y

    def train_rate(self, model, x, y, iters: int, warmup: int = 2) -> float:
        """img/s of forward + loss + backward + SGD step (fp16: with a GradScaler)."""
        torch = self.torch
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        for _ in range(warmup):
            self.step(model, opt, scaler, x, y)
        self.sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            self.step(model, opt, scaler, x, y)
        self.sync()
        return x.shape[0] * iters / (time.perf_counter() - t0)

    def step(self, model, opt, scaler, x, y):
        """One bare training step: forward under autocast, cross-entropy, backward, optimizer step; the loss."""
        import torch.nn.functional as F

        with self.autocast():
            out = model(x)
            loss = F.cross_entropy((out["out"] if isinstance(out, dict) else out).float(), y, ignore_index=255)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss

    def eval_rate(self, model, x, classes: int, iters: int, warmup: int = 1) -> float:
        from segtrain.inference import predict

        model.eval()
        with self.torch.no_grad(), self.autocast():
            for _ in range(warmup):
                predict(model, x, classes)
            self.sync()
            t0 = time.perf_counter()
            for _ in range(iters):
                predict(model, x, classes)
            self.sync()
        return x.shape[0] * iters / (time.perf_counter() - t0)


class PeakMemory:
    """Peak memory during the block: CUDA max allocated, or the growth of this process's resident set on a CPU."""

    def __init__(self, env: Env):
        self.env, self.mib = env, None

    def __enter__(self):
        torch = self.env.torch
        if self.env.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return self
        self.base = self.peak = _rss()
        self.stop = threading.Event()

        def watch():
            while not self.stop.wait(0.005):
                self.peak = max(self.peak, _rss())

        self.thread = threading.Thread(target=watch, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.env.device.type == "cuda":
            self.mib = self.env.torch.cuda.max_memory_allocated() / 2**20
        else:
            self.stop.set()
            self.thread.join()
            self.mib = (self.peak - self.base) / 2**20
        return False


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build(env: Env, overrides: list[str], classes: int):
    from segtrain.models.build import build_model, count_parameters

    cfg = compose(env.overrides + overrides)
    model = build_model(cfg.model, classes).to(env.device, memory_format=env.torch.channels_last)
    return model, count_parameters(model)


# ---------------------------------------------------------------------------------------------------------------
# sections


def _in_memory_batches(trainer) -> tuple:
    """The first 8 training batches (epoch 0's augmentation), uint8 in host memory, for the bare loop."""
    import torch

    ds, bs = trainer.train_loader.dataset, trainer.cfg.data.batch_size
    samples = [ds[(0, i)] for i in range(min(len(ds), bs * 8))]
    return torch.stack([x for x, _ in samples]), torch.stack([y for _, y in samples]).long()


def _bare_loop(env: Env, trainer, batches: tuple, iters: int) -> float:
    """img/s of a bare PyTorch loop on the trainer's model, precision and batch: uint8 ``batches`` already in host
    memory, normalised on the device as the Trainer does, plain cross-entropy and AdamW, no logging."""
    import torch

    (xs, ys), cfg, bs = batches, trainer.cfg, trainer.cfg.data.batch_size
    model, device = trainer.model, trainer.device
    mean = torch.tensor(list(cfg.data.mean), device=device).view(1, -1, 1, 1)
    std = torch.tensor(list(cfg.data.std), device=device).view(1, -1, 1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    scaler = torch.amp.GradScaler(device.type, enabled=trainer.precision == "fp16")
    model.train()
    n, elapsed = 0, 0.0
    for it in range(iters + 1):
        j = (it * bs) % (len(xs) - bs + 1)
        t0 = time.perf_counter()
        x = xs[j : j + bs].to(device, non_blocking=True).float().div_(255).sub_(mean).div_(std)
        x = x.contiguous(memory_format=trainer.memory_format)
        y = ys[j : j + bs].to(device, non_blocking=True)
        env.step(model, opt, scaler, x, y).item()
        if it > 0:  # as in the Trainer, the first step is warm-up
            elapsed += time.perf_counter() - t0
            n += bs
    return n / elapsed


def bench_overhead(env: Env, args) -> dict:
    """The Trainer (real loader, real loop) against a bare loop on the same model, interleaved T B T B ... T: after
    each of the Trainer's epochs but the last (at its validation, when the loader is idle) the bare loop runs
    ``iters`` steps.  Each bare block is compared with the mean of the two epochs around it, which cancels a
    machine that drifts slower or faster during the run; the ratios are the medians over the blocks after the
    first epoch."""
    from segtrain.build import build_trainer
    from segtrain.hooks.throughput import Throughput

    iters = args.iters or (20 if args.quick else 60)  # bare-loop steps after each epoch
    base = ["trainer.progress=false", "trainer.num_vis=0", "trainer.val_interval=null", "data.num_val=8"]
    length = ["trainer.max_iters=null"]  # --quick: 10 short epochs (finer interleaving), else the config's run
    if args.quick:
        short = ["data.num_train=320"] if env.cfg.data.name == "synthetic" else []
        length = short + length + ["trainer.max_epochs=10"]
    cfg = compose(length + env.overrides + base)
    rows: list[dict] = []  # one per epoch: the Trainer's rates in it, and the bare rate right after it
    with tempfile.TemporaryDirectory() as tmp:
        build_trainer(compose(env.overrides + base + ["trainer.max_iters=6"]), Path(tmp) / "warm").fit()  # warm-up
        trainer = build_trainer(cfg.copy(), Path(tmp) / "run")
        speed = next(h for h in trainer.hooks if isinstance(h, Throughput))
        validate, last = trainer.validate, {"images": 0, "wait": 0.0, "compute": 0.0}
        batches = _in_memory_batches(trainer)

        def validate_then_bare():
            m = validate()
            now = speed.state_dict()
            d = {k: now[k] - last[k] for k in now}
            last.update(now)
            rows.append({"epoch": trainer.epoch, "trainer_e2e": d["images"] / (d["wait"] + d["compute"]),
                         "trainer_compute": d["images"] / d["compute"],
                         "data_wait_fraction": d["wait"] / (d["wait"] + d["compute"])})  # fmt: skip
            if trainer.step < trainer.max_iters:
                rows[-1]["bare"] = _bare_loop(env, trainer, batches, iters)
            return m

        trainer.validate = validate_then_bare
        s = trainer.fit()
        assert s["step"] == trainer.max_iters and len(rows) >= 3, (s, len(rows))
    first = rows[0]  # every epoch but the last has its bare block
    pairs = list(zip(rows[1:], rows[2:]))  # (epoch e, epoch e+1) around the bare block after e

    def med(key: str, ratio: bool = False) -> float:
        vals = [(a[key] + b[key]) / 2 / (a["bare"] if ratio else 1.0) for a, b in pairs]
        return statistics.median(vals)

    out = {
        "model": cfg.model.name,
        "batch": cfg.data.batch_size,
        "image_size": cfg.data.image_size,
        "iters": iters,
        "num_workers": trainer.train_loader.num_workers,
        "epochs": len(rows),
        "trainer_images_per_sec": med("trainer_e2e"),
        "trainer_first_epoch_images_per_sec": first["trainer_e2e"],
        "trainer_compute_images_per_sec": med("trainer_compute"),
        "bare_images_per_sec": statistics.median(a["bare"] for a, _ in pairs),
        "data_wait_fraction": med("data_wait_fraction"),
        "overhead_ratio": med("trainer_compute", ratio=True),
        "end_to_end_ratio": med("trainer_e2e", ratio=True),
        "end_to_end_ratio_first_epoch": first["trainer_e2e"] / first["bare"],
        "epochs_measured": rows,
    }
    print(
        f"overhead: trainer {out['trainer_images_per_sec']:.1f} img/s end to end after the first epoch "
        f"({first['trainer_e2e']:.1f} in it; {out['trainer_compute_images_per_sec']:.1f} compute), bare loop "
        f"{out['bare_images_per_sec']:.1f} img/s -> overhead_ratio {out['overhead_ratio']:.3f}, end_to_end_ratio "
        f"{out['end_to_end_ratio']:.3f} (first epoch {out['end_to_end_ratio_first_epoch']:.3f})",
        flush=True,
    )
    return out


def _chosen(nets: dict, args) -> dict:
    """The networks ``--networks`` names (all when it is not given)."""
    return {k: v for k, v in nets.items() if not args.networks or k in args.networks}


def _measure_network(env: Env, name: str, overrides: list[str], size: int, bs: int, iters: int) -> dict:
    model, params = build(env, overrides, 21)
    x, y = env.batch(bs, size, 21)
    with PeakMemory(env) as mem:
        train = env.train_rate(model, x, y, iters)
    evaluate = env.eval_rate(model, x, 21, iters)
    return {"network": name, "params": params, "size": size, "batch": bs, "train_images_per_sec": train,
            "eval_images_per_sec": evaluate, "peak_mib": mem.mib}  # fmt: skip


def _child(overrides: list[str], name: str, net: list[str], size: int, bs: int, iters: int, queue) -> None:
    queue.put(_measure_network(Env(overrides), name, net, size, bs, iters))


def _in_child(env: Env, name: str, net: list[str], size: int, bs: int, iters: int) -> dict:
    """The measurement in a fresh process (spawned: OpenMP does not survive a fork), so that the peak
    resident-set growth counted is this network's alone."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.SimpleQueue()
    child = ctx.Process(target=_child, args=(env.overrides, name, net, size, bs, iters, queue))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"the measurement of {name} failed (exit code {child.exitcode})")
    return queue.get()


def bench_models(env: Env, args) -> list[dict]:
    """On CUDA the networks run one after another (peak memory: max allocated, reset between them); on a
    CPU each runs in a forked child, so that its peak resident-set growth is its own."""
    size = args.size or (96 if args.quick else 512)
    bs = args.batch or (2 if args.quick else 8)
    iters = args.iters or (3 if args.quick else 20)
    nets = _chosen(NETWORKS if args.quick or env.device.type != "cuda" else {**NETWORKS, **FULL_NETWORKS}, args)
    rows = []
    for name, overrides in nets.items():
        if env.device.type == "cuda":
            row = _measure_network(env, name, overrides, size, bs, iters)
        else:
            row = _in_child(env, name, overrides, size, bs, iters)
        rows.append(row)
        print(f"models: {name:20s} {row['params'] / 1e6:6.2f}M  train {row['train_images_per_sec']:7.1f} img/s  "
              f"eval {row['eval_images_per_sec']:7.1f} img/s  peak {row['peak_mib']:7.0f} MiB", flush=True)  # fmt: skip
    return rows


def _upsampled(model):
    """A transformers segmentation model as a plain network: pixels in, logits at the input size out (its own
    logits are at 1/4 of it), as segtrain's networks return them."""
    import torch.nn.functional as F
    from torch import nn

    class Upsampled(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            logits = self.model(pixel_values=x).logits
            return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    return Upsampled()


def _peer(name: str, classes: int):
    import torchvision

    if name.startswith("transformers SegFormer"):
        from transformers import SegformerConfig, SegformerForSemanticSegmentation  # MiT-b0's config by default

        return _upsampled(SegformerForSemanticSegmentation(SegformerConfig(num_labels=classes)))

    if name == "torchvision fcn_resnet50":
        return torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=classes)
    if name == "torchvision deeplabv3_resnet50":
        return torchvision.models.segmentation.deeplabv3_resnet50(
            weights=None, weights_backbone=None, num_classes=classes
        )
    import segmentation_models_pytorch as smp

    if name == "smp Unet resnet34":
        return smp.Unet("resnet34", encoder_weights=None, classes=classes)
    return smp.DeepLabV3Plus("resnet50", encoder_weights=None, classes=classes)


PEERS = [  # (segtrain network, its overrides, the peer with the same architecture)
    ("fcn32s-r50-d8", ["model=fcn", "model.variant=32s", "model.output_stride=8"], "torchvision fcn_resnet50"),
    ("deeplabv3-r50-d8", ["model=deeplabv3", "model.output_stride=8"], "torchvision deeplabv3_resnet50"),
    ("deeplabv3plus-r50", ["model=deeplabv3plus"], "smp DeepLabV3Plus resnet50"),
    ("unet-r34", ["model=unet", "model.backbone=resnet34"], "smp Unet resnet34"),
    ("segformer-b0", ["model=segformer", "model.variant=b0"], "transformers SegFormer-B0"),
]
PEER_PACKAGES = {"smp": "segmentation-models-pytorch", "transformers": "transformers"}


VARIANT_FLAGS = {  # segtrain's other implementations of a layer: (switch in segtrain.models.blocks, value)
    "up-conv as pixel shuffle": ("UPCONV_AS_SHUFFLE", True),
}
VARIANTS = {"unet-r34": ["up-conv as pixel shuffle"]}


def _default_form(name: str, device) -> bool:
    """Whether variant ``name`` is what the default computes on ``device`` (then it is not measured twice)."""
    from segtrain.models import blocks

    attr, value = VARIANT_FLAGS[name]
    return getattr(blocks, attr) == value


@contextlib.contextmanager
def variant(name: str):
    """segtrain's other implementation of a layer (same weights, same function: tests/test_blocks.py), switched on
    for the block, to compare speeds."""
    from segtrain.models import blocks

    if name == "default":
        yield
        return
    attr, value = VARIANT_FLAGS[name]
    old = getattr(blocks, attr)
    setattr(blocks, attr, value)
    try:
        yield
    finally:
        setattr(blocks, attr, old)


def bench_peers(env: Env, args) -> list[dict]:
    size = args.size or (128 if args.quick else 512)
    bs = args.batch or (4 if args.quick else 8)
    iters = args.iters or (3 if args.quick else 20)
    reps = 3  # interleaved rounds; the best of each
    rows = []
    for name, overrides, peer_name in PEERS:
        if args.networks and name not in args.networks:
            continue
        try:
            peer = _peer(peer_name, 21).to(env.device, memory_format=env.torch.channels_last)
        except ImportError:
            package = PEER_PACKAGES.get(peer_name.split()[0], peer_name.split()[0])
            print(f"peers: {peer_name}: not installed (pip install {package})", flush=True)
            peer = None
        ours, params = build(env, overrides, 21)
        x, y = env.batch(bs, size, 21)
        candidates = {"segtrain": ("default", ours)}
        for v in VARIANTS.get(name, []):
            if not _default_form(v, env.device):
                candidates[f"segtrain ({v})"] = (v, ours)
        if peer is not None:
            candidates[peer_name] = ("default", peer)
        rates: dict[str, list[float]] = {k: [] for k in candidates}
        for _ in range(reps):  # interleaved
            for label, (v, model) in candidates.items():
                with variant(v):
                    rates[label].append(env.train_rate(model, x, y, iters))
        best = {k: max(v) for k, v in rates.items()}
        row = {"network": name, "params": params, "size": size, "batch": bs, "images_per_sec": best}
        if peer is not None:
            row["peer"] = peer_name
            row["peer_params"] = sum(p.numel() for p in peer.parameters())
            row["ratio"] = best["segtrain"] / best[peer_name]
        rows.append(row)
        print("peers: " + name + ": " + ", ".join(f"{k} {v:.1f} img/s" for k, v in best.items())
              + (f" -> ratio {row['ratio']:.3f}" if "ratio" in row else ""), flush=True)  # fmt: skip
        del ours, peer, x, y
    return rows


@contextlib.contextmanager
def kineto_quiet():
    """The profiler's C++ side (kineto) writes start/stop chatter to file descriptor 2 ("USDT: ... profiler_start",
    and on a machine without a GPU "gpuGetDeviceCount failed"): hold it back, and pass on every other line."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            for line in held.read().decode(errors="replace").splitlines():
                if not re.match(r"\w+:\d{4}-\d\d-\d\d [\d:]+ \d+:\d+ \w+\.cpp:\d+\]", line):
                    print(line, file=sys.stderr)


def bench_profile(env: Env, args) -> list[dict]:
    """torch.profiler over a few training steps of each network: the operators that take the most time (self
    time on the device: CUDA kernels on a GPU, CPU time otherwise), to see where each family spends its step."""
    from torch.profiler import ProfilerActivity, profile

    torch = env.torch
    size = args.size or (96 if args.quick else 512)
    bs = args.batch or (2 if args.quick else 8)
    iters = args.iters or (2 if args.quick else 5)
    cuda = env.device.type == "cuda"
    nets = _chosen(NETWORKS if args.quick or not cuda else {**NETWORKS, **FULL_NETWORKS}, args)

    def self_time(e) -> float:
        if cuda:
            return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
        return e.self_cpu_time_total

    rows = []
    for name, overrides in nets.items():
        model, _ = build(env, overrides, 21)
        x, y = env.batch(bs, size, 21)
        env.train_rate(model, x, y, 1, warmup=1)
        with (
            kineto_quiet(),
            profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof,
        ):
            env.train_rate(model, x, y, iters, warmup=0)
        events = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]
        total = sum(self_time(e) for e in events) or 1.0
        top = sorted(events, key=self_time, reverse=True)[:6]
        ops = [{"op": e.key, "share": self_time(e) / total, "calls": e.count // iters} for e in top]
        rows.append({"network": name, "size": size, "batch": bs, "device_ms_per_step": total / 1e3 / iters, "top": ops})
        print(f"profile: {name:20s} " + ", ".join(f"{o['op']} {100 * o['share']:.0f}%" for o in ops), flush=True)
        del model, x, y
        if cuda:
            torch.cuda.empty_cache()
    return rows


def bench_compile(env: Env, args) -> dict:
    torch = env.torch
    size = args.size or (64 if args.quick else 256)
    bs = args.batch or 16
    iters = args.iters or (10 if args.quick else 50)
    model, _ = build(env, [], 21)
    x, y = env.batch(bs, size, 21)
    eager = env.train_rate(model, x, y, iters)
    compiled = torch.compile(model)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="segtrain-inductor-"))  # cold cache
    t0 = time.perf_counter()
    env.train_rate(compiled, x, y, 1, warmup=0)
    compile_s = time.perf_counter() - t0
    fast = env.train_rate(compiled, x, y, iters, warmup=1)
    out = {"model": env.cfg.model.name, "size": size, "batch": bs, "eager_images_per_sec": eager,
           "compiled_images_per_sec": fast, "speedup": fast / eager, "compile_seconds": compile_s}  # fmt: skip
    print(f"compile: first step {compile_s:.1f} s; eager {eager:.1f} img/s, compiled {fast:.1f} img/s "
          f"(x{fast / eager:.2f})", flush=True)  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    lines = [f"# segtrain benchmark: {result['device_name']}, torch {result['torch']}, {result['date']}", ""]
    if "overhead" in result:
        o = result["overhead"]
        lines += ["| | img/s |", "|---|---|", f"| Trainer, end to end (after the first epoch) | {o['trainer_images_per_sec']:.1f} |",
                  f"| Trainer, end to end (first epoch: data generated, loader starting) | {o['trainer_first_epoch_images_per_sec']:.1f} |",
                  f"| Trainer, compute only | {o['trainer_compute_images_per_sec']:.1f} |",
                  f"| bare loop | {o['bare_images_per_sec']:.1f} |", "",
                  f"overhead_ratio {o['overhead_ratio']:.3f}, end_to_end_ratio {o['end_to_end_ratio']:.3f} "
                  f"(first epoch {o['end_to_end_ratio_first_epoch']:.3f}; {o['model']}, batch {o['batch']}, "
                  f"{o['num_workers']} loader workers)", ""]  # fmt: skip
    if "models" in result:
        lines += [
            "| network | params | size | batch | train img/s | eval img/s | peak MiB |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in result["models"]:
            lines.append(f"| {r['network']} | {r['params'] / 1e6:.2f}M | {r['size']} | {r['batch']} | "
                         f"{r['train_images_per_sec']:.1f} | {r['eval_images_per_sec']:.1f} | {r['peak_mib']:.0f} |")  # fmt: skip
        lines.append("")
    if "peers" in result:
        lines += ["| network | implementation | parameters | train img/s | ratio to peer |", "|---|---|---|---|---|"]
        for r in result["peers"]:
            peer = r.get("peer")
            for label, v in r["images_per_sec"].items():
                ratio = f"{v / r['images_per_sec'][peer]:.3f}" if peer else "-"
                params = r["peer_params"] if label == peer else r["params"]
                lines.append(f"| {r['network']} ({r['size']}px, batch {r['batch']}) | {label} | {params / 1e6:.2f}M | "
                             f"{v:.1f} | {ratio} |")  # fmt: skip
        lines.append("")
    if "profile" in result:
        lines += ["| network | ms per step (self time, all operators) | operators with the most self time (share of the step) |",
                  "|---|---|---|"]  # fmt: skip
        for r in result["profile"]:
            ops = ", ".join(f"`{o['op']}` {100 * o['share']:.0f}%" for o in r["top"])
            lines.append(
                f"| {r['network']} ({r['size']}px, batch {r['batch']}) | {r['device_ms_per_step']:.1f} | {ops} |"
            )
        lines.append("")
    if "compile" in result:
        c = result["compile"]
        lines += [f"torch.compile ({c['model']}, {c['size']}px, batch {c['batch']}): first step {c['compile_seconds']:.1f} s, "
                  f"eager {c['eager_images_per_sec']:.1f} img/s, compiled {c['compiled_images_per_sec']:.1f} img/s "
                  f"(x{c['speedup']:.2f})", ""]  # fmt: skip
    return "\n".join(lines)


def parse(argv: list[str]):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="small sizes, few iterations (about 3 min on 2 CPU cores, at most 5)"
    )
    p.add_argument("--out", default=None, help="write benchmark.json and benchmark.md into this folder")
    p.add_argument("--size", type=int, default=None, help="input size of the models/peers/compile sections")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument(
        "--networks", default=None, help="comma-separated names: only these in models / peers / profile (default all)"
    )
    args, rest = p.parse_known_args(argv)
    args.networks = args.networks.split(",") if args.networks else None
    args.overrides = [a for a in rest if "=" in a and not a.startswith("-")]
    args.sections = [a for a in rest if "=" not in a and not a.startswith("-")]
    unknown = [a for a in rest if a not in args.overrides and a not in args.sections]
    bad = [s for s in args.sections if s not in SECTIONS]
    if unknown or bad:
        p.error(f"unknown argument(s) {' '.join(unknown + bad)}; sections: {', '.join(SECTIONS)}; overrides: KEY=VALUE")
    args.sections = args.sections or list(SECTIONS)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    env = Env(args.overrides)
    torch = env.torch
    name = (
        torch.cuda.get_device_name(env.device)
        if env.device.type == "cuda"
        else f"{os.cpu_count()}-core {platform.machine()} CPU"
    )
    result = {"device": str(env.device), "device_name": name, "precision": env.precision, "torch": torch.__version__,
              "date": datetime.date.today().isoformat(), "overrides": args.overrides}  # fmt: skip
    print(f"benchmark on {name} ({env.device}, {env.precision}), torch {torch.__version__}", flush=True)
    t0 = time.perf_counter()
    for section in args.sections:  # the files are rewritten after each section: a killed run keeps the done ones
        result[section] = globals()[f"bench_{section}"](env, args)
        result["seconds"] = time.perf_counter() - t0
        write(result, args.out)
    print("\n" + markdown(result))
    if args.out:
        print(f"wrote {Path(args.out) / 'benchmark.json'} and {Path(args.out) / 'benchmark.md'}")


def write(result: dict, out: str | None) -> None:
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "benchmark.json").write_text(json.dumps(result, indent=2) + "\n")
        (Path(out) / "benchmark.md").write_text(markdown(result) + "\n")


def run() -> None:
    """``main`` with segtrain's errors (a bad override, a stop by SIGTERM) as one line and their exit code."""
    from segtrain.errors import SegtrainError

    try:
        main()
    except SegtrainError as e:
        print(f"benchmark.py: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    run()
