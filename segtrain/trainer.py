"""The one training loop.

Read it top to bottom: ``Trainer.__init__`` builds everything from the config
(device and precision, data, model, loss, optimizer, schedule, resume state),
``Trainer.fit`` runs the iterations and validations, ``Trainer.evaluate`` fills
a confusion matrix.  Every network, data set and recipe goes through here.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shlex
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from segtrain import checkpoint, distributed
from segtrain.config import as_hw, to_yaml
from segtrain.data import build_datasets, build_loader
from segtrain.errors import CheckpointError, ConfigError, NonFiniteLossError, OutputError, Preempted, ResourceError
from segtrain.logger import TensorBoard, default_palette, format_table, overlay, write_json
from segtrain.losses import build_loss
from segtrain.metrics import ConfusionMatrix
from segtrain.models import build_model, count_parameters
from segtrain.optim import build_optimizer, build_scheduler

log = logging.getLogger("segtrain")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 instructions (AVX512-BF16 or AMX), where bf16 autocast is fast."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        fn = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        return bool(fn and fn())


def resolve_device(cfg: DictConfig) -> tuple[torch.device, str]:
    """(device, precision) from ``cfg.device``, with the auto rules applied."""
    kind = str(cfg.type.value if hasattr(cfg.type, "value") else cfg.type)
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available here; use device=auto or device=cpu")
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(kind)
    precision = str(cfg.precision.value if hasattr(cfg.precision, "value") else cfg.precision)
    if precision == "auto":
        if device.type == "cuda":
            precision = "fp16"
        else:
            precision = "bf16" if cpu_has_native_bf16() else "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("device.precision=bf16 but this GPU has no bf16 support; use device.precision=fp16")
    return device, precision


def autocast(device: torch.device, precision: str):
    """The autocast context for ``precision`` (fp32: disabled)."""
    return torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "fp32")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile / DDP wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: str | Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        # --- device, precision, processes, determinism -----------------------------------------
        self.device, self.precision = resolve_device(cfg.device)
        self.dist = distributed.setup(self.device.type)
        self.rank, self.world_size, self.is_main = self.dist.rank, self.dist.world_size, self.dist.is_main
        if self.dist.enabled:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", self.dist.local_rank)
            self.run_dir = Path(distributed.broadcast_object(str(self.run_dir), self.dist))  # rank 0's run dir
            self.ckpt_dir = self.run_dir / "checkpoints"
            if not self.is_main:
                log.setLevel(logging.WARNING)
        seed_everything(cfg.seed)
        if cfg.trainer.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = cfg.device.cudnn_benchmark
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

        # --- data ---------------------------------------------------------------------------
        d = cfg.data
        self.train_set, self.val_set = build_datasets(d, cfg.seed)
        self.num_classes = d.num_classes
        self.class_names = list(self.train_set.class_names or [str(i) for i in range(self.num_classes)])
        if len(self.class_names) != self.num_classes:
            self.class_names = [str(i) for i in range(self.num_classes)]
        self.palette = (
            self.train_set.palette if self.train_set.palette is not None else default_palette(self.num_classes)
        )
        self.train_loader = build_loader(self.train_set, d, True, cfg.seed, self.rank, self.world_size)
        self.val_loader = build_loader(self.val_set, d, False, cfg.seed, self.rank, self.world_size)
        t = cfg.trainer
        self.iters_per_epoch = len(self.train_loader) // t.accumulate  # optimizer steps per epoch
        if self.iters_per_epoch == 0:
            raise ConfigError(
                f"the training set has {len(self.train_set)} images, fewer than data.batch_size="
                f"{d.batch_size} x trainer.accumulate={t.accumulate}"
            )
        self.max_iters = t.max_iters if t.max_iters is not None else t.max_epochs * self.iters_per_epoch

        # --- model, loss, optimizer, schedule -------------------------------------------------
        self.model = build_model(cfg.model, self.num_classes).to(self.device)
        self.num_params = count_parameters(self.model)
        self.memory_format = torch.channels_last if cfg.device.channels_last else torch.contiguous_format
        self.model = self.model.to(memory_format=self.memory_format)
        self.batch_to_device = BatchToDevice(self.device, d.mean, d.std, self.memory_format)
        self.criterion = build_loss(cfg.loss, self.num_classes, d.ignore_index, self.train_set).to(self.device)
        self.optimizer = build_optimizer(cfg.optimizer, self.model)
        self.scheduler = build_scheduler(cfg.scheduler, self.optimizer, self.max_iters, cfg.optimizer.lr)

        # --- state (possibly restored) ----------------------------------------------------------
        self.step, self.epoch, self.epoch_step = 0, 0, 0
        self.best_miou, self.last_metrics, self.history = float("nan"), None, []
        self.train_time, self.train_images, self.skipped_steps = 0.0, 0, 0
        self._peer_stop, self._skips_in_row = False, 0
        if self.is_main:
            check_writable(self.ckpt_dir, self.num_params)
            checkpoint.remove_stale_temporaries(self.ckpt_dir)
        if cfg.model.init_from:
            self._init_from(cfg.model.init_from)
        self.resumed_from = self._maybe_resume(t.resume)
        self.sync_bn = False
        if self.dist.enabled:
            self.sync_bn = cfg.device.sync_bn and self.device.type == "cuda"  # SyncBatchNorm needs CUDA
            if self.sync_bn:
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.forward = torch.compile(self.model) if cfg.device.compile else self.model
        self.tb = TensorBoard(self.run_dir / "tb") if self.is_main else TensorBoard(None)

    # ------------------------------------------------------------------------------------------
    def autocast(self):
        return autocast(self.device, self.precision)

    # ------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to ``max_iters``; SIGINT/SIGTERM stop after the current step with a resumable last.pt."""
        with StopSignals() as self.signals:
            try:
                return self._fit()
            except torch.cuda.OutOfMemoryError:
                raise ResourceError(self._oom_message()) from None
            finally:
                distributed.cleanup()

    def _oom_message(self) -> str:
        d, t = self.cfg.data, self.cfg.trainer
        where = "in validation" if getattr(self, "_in_validation", False) else f"at step {self.step + 1}"
        fix = (
            "eval.mode=slide with a smaller eval.crop_size, or data.val_size"
            if "validation" in where
            else f"data.batch_size={max(1, d.batch_size // 2)} trainer.accumulate={2 * t.accumulate} (same effective "
            "batch), device.precision=fp16, or a smaller data.crop_size"
        )
        return (
            f"out of GPU memory {where} (data.batch_size={d.batch_size}, crop {d.crop_size}, precision "
            f"{self.precision}, model {self.cfg.model.name}): try {fix}"
        )

    def _fit(self) -> dict:
        cfg, t = self.cfg, self.cfg.trainer
        log.info(
            "model %s: %s parameters | device %s, precision %s, channels_last %s, compile %s",
            cfg.model.name,
            f"{self.num_params:,}",
            self.device,
            self.precision,
            cfg.device.channels_last,
            cfg.device.compile,
        )
        log.info(
            "data %s: %d train / %d val images, batch %d x %d process(es) x accumulate %d = %d, %d iterations "
            "(%.1f epochs) | run dir %s",
            cfg.data.name,
            len(self.train_set),
            len(self.val_set),
            cfg.data.batch_size,
            self.world_size,
            t.accumulate,
            cfg.data.batch_size * self.world_size * t.accumulate,
            self.max_iters,
            self.max_iters / self.iters_per_epoch,
            self.run_dir,
        )
        log.info(
            "world size %d%s",
            self.world_size,
            f" (backend {self.dist.backend}, SyncBN {self.sync_bn})" if self.dist.enabled else "",
        )
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        bar = tqdm(
            total=self.max_iters,
            initial=self.step,
            desc="train",
            dynamic_ncols=True,
            disable=not (t.progress and self.is_main),
            leave=True,
        )
        loss_avg, t_start = None, time.perf_counter()
        self.model.train()
        k = t.accumulate
        while self.step < self.max_iters:
            self.train_loader.sampler.set_epoch(self.epoch, start=self.epoch_step * k * self.train_loader.batch_size)
            micro: list = []
            for batch in self.train_loader:
                micro.append(batch)
                if len(micro) < k:
                    continue
                t0 = time.perf_counter()
                loss_val, n_images = self.train_step(micro)
                micro = []
                self.scheduler.step()
                self.step += 1
                self.epoch_step += 1
                if self.step > 1:  # the first step includes warm-up (allocator, compile, cudnn autotune)
                    if self.device.type == "cuda":
                        torch.cuda.synchronize()
                    self.train_time += time.perf_counter() - t0
                    self.train_images += n_images * self.world_size
                if math.isfinite(loss_val):
                    loss_avg = loss_val if loss_avg is None else 0.9 * loss_avg + 0.1 * loss_val
                lr = self.optimizer.param_groups[0]["lr"] / self.optimizer.param_groups[0].get("lr_mult", 1.0)
                ips = self.train_images / self.train_time if self.train_time > 0 else float("nan")
                bar.update(1)
                bar.set_postfix(
                    loss=f"{loss_avg:.4f}" if loss_avg is not None else "nan",
                    lr=f"{lr:.2e}",
                    img_s=f"{ips:.1f}",
                    epoch=self.epoch,
                    refresh=False,
                )
                if self.step % t.log_interval == 0 or self.step == 1:
                    self.tb.scalars(
                        {"train/loss": loss_val, "train/lr": lr, "train/img_per_s": ips, "train/epoch": self.epoch},
                        self.step,
                    )
                epoch_done = self.epoch_step >= self.iters_per_epoch
                if epoch_done:
                    self.epoch, self.epoch_step = self.epoch + 1, 0
                due = (self.step % t.val_interval == 0) if t.val_interval else epoch_done
                if due or self.step >= self.max_iters:
                    self.validate()
                    self.model.train()
                stop = self._peer_stop or (t.stop_at is not None and self.step >= t.stop_at)
                if stop and self.step < self.max_iters:
                    bar.close()
                    self._preempt(self.signals.received or "trainer.stop_at")
                if epoch_done or self.step >= self.max_iters:
                    break
            else:  # the loader ran out early (can only happen with an unusual sampler length)
                self.epoch, self.epoch_step = self.epoch + 1, 0
        bar.close()
        summary = self.summary(time.perf_counter() - t_start)
        if self.last_metrics is not None:
            log.info("final validation (step %d):\n%s", self.step, format_table(self.last_metrics, self.class_names))
        log.info(
            "best val mIoU %.4f | %.1f train img/s | outputs in %s",
            summary["best_miou"],
            summary["train_images_per_sec"] or float("nan"),
            self.run_dir,
        )
        self.tb.hparams(
            self.hparams(), {"hparams/best_miou": summary["best_miou"], "hparams/last_miou": summary["last_miou"]}
        )
        self.tb.close()
        return summary

    def train_step(self, micro: list) -> tuple[float, int]:
        """One optimizer step over ``trainer.accumulate`` micro-batches: (loss, images)."""
        t = self.cfg.trainer
        self.optimizer.zero_grad(set_to_none=True)
        total, n_images = 0.0, 0
        for i, (images, masks) in enumerate(micro):
            x, y = self.batch_to_device(images, masks)
            sync = i == len(micro) - 1 or not self.dist.enabled  # DDP: all-reduce gradients on the last one only
            with contextlib.nullcontext() if sync else self.model.no_sync():
                with self.autocast():
                    loss = self.criterion(self.forward(x), y) / len(micro)
                self.scaler.scale(loss).backward()
            total = total + loss.detach()
            n_images += x.shape[0]
        if t.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        loss_val = float(total)
        self._peer_stop = self.signals.received is not None
        if self.dist.enabled:  # one collective: the mean loss, and whether any process got a stop signal
            buf = torch.tensor([loss_val, float(self._peer_stop)], device=self.device, dtype=torch.float64)
            distributed.all_reduce(buf)
            loss_val, self._peer_stop = float(buf[0]) / self.world_size, bool(buf[1] > 0)
        # fp16: the GradScaler skips a step whose gradients hold inf/NaN and lowers its scale
        skipped = scale_before is not None and self.scaler.get_scale() < scale_before
        if skipped:
            self.skipped_steps += 1
            self._skips_in_row += 1
            log.warning(
                "step %d: fp16 gradients overflowed, the scaler skipped the step (%d so far, scale now %g)",
                self.step + 1,
                self.skipped_steps,
                self.scaler.get_scale(),
            )
        else:
            self._skips_in_row = 0
        if (not math.isfinite(loss_val) and not skipped) or self._skips_in_row >= MAX_SKIPS_IN_ROW:
            what = (
                f"loss is {loss_val} (non-finite)"
                if not skipped
                else f"{MAX_SKIPS_IN_ROW} fp16 steps in a row overflowed"
            )
            raise NonFiniteLossError(
                f"{what} at step {self.step + 1}: lower optimizer.lr, set trainer.grad_clip, or try another "
                f"device.precision (now {self.precision}); checkpoints were not overwritten"
            )
        return loss_val, n_images

    # ------------------------------------------------------------------------------------------
    def save(self, best: bool = False) -> None:
        """last.pt (the previous one kept as last-1.pt ...), best.pt when ``best``, and metrics.json."""
        state = self.state_dict()
        target = self.ckpt_dir / "last.pt"
        try:
            checkpoint.save_rotating(state, target, self.cfg.trainer.keep_last)
            if best:
                target = self.ckpt_dir / "best.pt"
                checkpoint.save_atomic(state, target)
            write_json(self.run_dir / "metrics.json", self.summary(None))
        except OSError as e:
            raise OutputError(
                f"cannot write {target}: {e.strerror or e}; the previous checkpoint is kept; free space "
                "or make the run dir writable, then resume with trainer.resume=auto"
            ) from None

    def _preempt(self, reason: str) -> None:
        """Write last.pt and stop with Preempted (exit code 75), printing the command that resumes."""
        if self.is_main:
            self.save()
        self.tb.close()
        if self.dist.enabled:
            torch.distributed.barrier()  # no process exits (and gets the others killed) before last.pt is written
        cmd = resume_command(self.run_dir)
        log.warning(
            "stopped by %s at step %d of %d; wrote %s", reason, self.step, self.max_iters, self.ckpt_dir / "last.pt"
        )
        raise Preempted(
            f"stopped by {reason} at step {self.step}/{self.max_iters}; {self.ckpt_dir / 'last.pt'} "
            f"written; resume with: {cmd}"
        )

    def validate(self) -> dict:
        self._in_validation = True
        m = self.evaluate()
        self._in_validation = False
        self.last_metrics = m
        improved = not (m["miou"] <= self.best_miou)  # also True when best is NaN (first validation)
        if improved:
            self.best_miou = m["miou"]
        self.history.append(
            {
                "step": self.step,
                "epoch": self.epoch,
                "miou": m["miou"],
                "aacc": m["aacc"],
                "macc": m["macc"],
                "mdice": m["mdice"],
                "loss": m["loss"],
            }
        )
        scalars = {
            "val/mIoU": m["miou"],
            "val/aAcc": m["aacc"],
            "val/mAcc": m["macc"],
            "val/mDice": m["mdice"],
            "val/loss": m["loss"],
        }
        scalars.update({f"val_iou/{n}": v for n, v in zip(self.class_names, m["iou"])})
        self.tb.scalars(scalars, self.step)
        if self.is_main:
            tqdm.write(
                f"step {self.step}: val mIoU {m['miou']:.4f}  aAcc {m['aacc']:.4f}  loss {m['loss']:.4f}"
                + ("  (best)" if improved else "")
            )
            self.save(best=improved)
        return m

    def evaluate(self) -> dict:
        """Evaluate the validation set with ``cfg.eval`` (whole / slide / TTA): metrics dict plus ``loss``."""
        self.model.eval()
        forward = unwrap(self.model) if self.dist.enabled else self.forward  # no DDP hooks in evaluation
        m, _, vis = evaluate_loader(
            forward,
            self.val_loader,
            self.batch_to_device,
            self.autocast,
            self.cfg,
            self.class_names,
            criterion=self.criterion,
            progress=self.cfg.trainer.progress and self.is_main,
        )
        if vis is not None:
            self.log_images(*vis)
        return m

    def log_images(self, images: torch.Tensor, masks: torch.Tensor, pred: torch.Tensor) -> None:
        """A grid: one row per image with input, ground-truth overlay and prediction overlay."""
        from torchvision.utils import make_grid

        ignore = self.cfg.data.ignore_index
        rows = torch.stack(
            [images, overlay(images, masks, self.palette, ignore), overlay(images, pred, self.palette, ignore)], 1
        )
        grid = make_grid(rows.flatten(0, 1), nrow=3, padding=2, pad_value=255)
        self.tb.image("val/input_gt_pred", grid, self.step)

    # ------------------------------------------------------------------------------------------
    def summary(self, wall_time: float | None) -> dict:
        m = self.last_metrics or {}
        out = {
            "best_miou": self.best_miou,
            "last_miou": m.get("miou", float("nan")),
            "aacc": m.get("aacc"),
            "macc": m.get("macc"),
            "mdice": m.get("mdice"),
            "per_class_iou": m.get("per_class_iou", {}),
            "num_params": self.num_params,
            "train_images_per_sec": self.train_images / self.train_time if self.train_time > 0 else None,
            "step": self.step,
            "epoch": self.epoch,
            "max_iters": self.max_iters,
            "skipped_steps": self.skipped_steps,
            "model": self.cfg.model.name,
            "data": self.cfg.data.name,
            "device": str(self.device),
            "precision": self.precision,
            "world_size": self.world_size,
            "resumed_from": self.resumed_from,
            "history": self.history,
        }
        if wall_time is not None:
            out["wall_time_sec"] = wall_time
        return out

    def hparams(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "model": c.model.name,
            "backbone": str(c.model.backbone),
            "data": c.data.name,
            "optimizer": c.optimizer.name,
            "lr": c.optimizer.lr,
            "weight_decay": c.optimizer.weight_decay,
            "scheduler": c.scheduler.name,
            "batch_size": c.data.batch_size,
            "crop_size": str(c.data.crop_size),
            "max_iters": self.max_iters,
            "precision": self.precision,
            "seed": c.seed,
        }

    def state_dict(self) -> dict:
        return {
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "epoch_step": self.epoch_step,
            "best_miou": self.best_miou,
            "history": self.history,
            "train_time": self.train_time,
            "train_images": self.train_images,
            "skipped_steps": self.skipped_steps,
            "rng": checkpoint.rng_state(),
            "config": to_yaml(self.cfg),
            "meta": {
                "model": self.cfg.model.name,
                "num_classes": self.num_classes,
                "class_names": self.class_names,
                "segtrain_version": _version(),
            },
        }

    def _maybe_resume(self, resume: str | None) -> str | None:
        if not resume:
            return None
        if resume == "auto":
            last = self.ckpt_dir / "last.pt"
            candidates = [checkpoint.numbered(last, i) for i in range(self.cfg.trainer.keep_last + 1)]
            candidates = [p for p in candidates if p.is_file()]
            if not candidates:
                log.info("trainer.resume=auto: no %s yet, starting from scratch", last)
                return None
            for i, path in enumerate(candidates):
                try:
                    state = checkpoint.load(path)
                    break
                except CheckpointError as e:
                    if i == len(candidates) - 1:
                        raise
                    log.warning("trainer.resume=auto: %s; trying %s", e, candidates[i + 1])
        else:
            path = Path(resume).expanduser()
            if not path.is_file():
                raise CheckpointError(f"trainer.resume={resume}: no such file")
            state = checkpoint.load(path)
        stored = stored_config(state)
        diffs = self._differences(state, stored)
        if diffs:
            raise CheckpointError(f"cannot resume from {path}: it differs from this config: {'; '.join(diffs)}")
        self._warn_changed(stored)
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.epoch_step = state["step"], state["epoch"], state["epoch_step"]
        self.best_miou, self.history = state["best_miou"], list(state.get("history", []))
        self.train_time, self.train_images = state.get("train_time", 0.0), state.get("train_images", 0)
        self.skipped_steps = state.get("skipped_steps", 0)
        checkpoint.set_rng_state(state["rng"])
        log.info("resumed from %s at step %d of %d (epoch %d)", path, self.step, self.max_iters, self.epoch)
        return str(path)

    def _warn_changed(self, stored: DictConfig) -> None:
        """Say which training settings differ from the checkpoint's: its optimizer and schedule state win."""
        changed = []
        for group in ("optimizer", "scheduler", "loss", "data", "trainer"):
            ours, theirs = self.cfg.get(group), stored.get(group)
            if ours is None or theirs is None:
                continue
            for key, value in OmegaConf.to_container(ours, resolve=True).items():
                if key in (
                    "resume",
                    "stop_at",
                    "progress",
                    "debug_errors",
                    "num_workers",
                    "root",
                    "max_iters",
                    "max_epochs",
                    "val_interval",
                    "log_interval",
                ):
                    continue
                old = theirs.get(key) if key in theirs else None
                if key in theirs and str(old) != str(value):
                    changed.append(f"{group}.{key} {old} -> {value}")
        if changed:
            log.warning(
                "resuming with settings that differ from the checkpoint's: %s (the optimizer and "
                "schedule state come from the checkpoint)",
                ", ".join(changed[:8]),
            )

    def _differences(self, state: dict, stored: DictConfig) -> list[str]:
        """What makes ``state`` unusable for this model: config keys, class count, tensor names/shapes."""
        meta, diffs = state.get("meta", {}), []
        if meta.get("model") != self.cfg.model.name:
            diffs.append(f"model {meta.get('model')} (here {self.cfg.model.name})")
        if meta.get("num_classes") != self.num_classes:
            diffs.append(f"num_classes {meta.get('num_classes')} (here {self.num_classes})")
        model = stored.get("model") or {}
        for key in ("backbone", "variant", "output_stride", "aux", "base_channels", "norm"):
            if key in model and model[key] != self.cfg.model.get(key):
                diffs.append(f"model.{key} {model[key]} (here {self.cfg.model.get(key)})")
        ours = unwrap(self.model).state_dict()
        theirs = state["model"]
        missing = [k for k in ours if k not in theirs]
        extra = [k for k in theirs if k not in ours]
        shapes = [
            f"{k} {list(theirs[k].shape)} (here {list(v.shape)})"
            for k, v in ours.items()
            if k in theirs and hasattr(theirs[k], "shape") and theirs[k].shape != v.shape
        ]
        for label, items in (("missing tensors", missing), ("unexpected tensors", extra), ("shape", shapes)):
            if items:
                diffs.append(
                    f"{label}: {', '.join(items[:3])}" + (f" (+{len(items) - 3} more)" if len(items) > 3 else "")
                )
        return diffs

    def _init_from(self, path_str: str) -> None:
        """model.init_from: load every tensor whose name and shape match; report what was skipped."""
        path = Path(path_str).expanduser()
        if not path.is_file():
            raise CheckpointError(f"model.init_from={path_str}: no such file")
        obj = checkpoint.load(path, require_model=False)  # also a plain state dict
        theirs = obj.get("model", obj.get("state_dict", obj)) if isinstance(obj, dict) else None
        if not isinstance(theirs, dict):
            raise CheckpointError(f"model.init_from={path_str} holds no state dict")
        theirs = {k.removeprefix("module."): v for k, v in theirs.items() if isinstance(v, torch.Tensor)}
        ours = unwrap(self.model).state_dict()
        load = {k: v for k, v in theirs.items() if k in ours and v.shape == ours[k].shape}
        if not load:
            raise CheckpointError(
                f"model.init_from={path_str}: no tensor matches model={self.cfg.model.name} by name "
                f"and shape (e.g. {next(iter(theirs), 'none')}); is it a checkpoint of this network?"
            )
        unwrap(self.model).load_state_dict(load, strict=False)
        shape = [k for k in theirs if k in ours and k not in load]
        absent = [k for k in ours if k not in theirs]
        unused = [k for k in theirs if k not in ours]
        log.info(
            "model.init_from=%s: loaded %d of %d tensors; kept fresh: %d (shape differs: %s; not in the file: "
            "%d); unused from the file: %d",
            path,
            len(load),
            len(ours),
            len(ours) - len(load),
            ", ".join(shape[:4]) or "none",
            len(absent),
            len(unused),
        )


PREEMPT_SIGNALS = ("SIGINT", "SIGTERM")
MAX_SKIPS_IN_ROW = 25  # fp16 steps skipped in a row before the run is stopped as diverged


class StopSignals:
    """Within the block, the first SIGINT/SIGTERM sets ``received`` (the loop stops after its step);
    a second one aborts at once.  A no-op outside the main thread."""

    def __init__(self):
        self.received: str | None = None
        self._old: dict = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received is not None:  # the second signal: abort now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = name
        sys.stderr.write(
            f"\nsegtrain: {name}: stopping after this step and writing last.pt (send it again to abort at once)\n"
        )

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for name in PREEMPT_SIGNALS:
                sig = getattr(signal, name)
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def resume_command(run_dir: Path) -> str:
    """The command line of this run, with trainer.resume=auto and its run dir."""
    drop = ("trainer.resume=", "hydra.run.dir=", "trainer.stop_at=", "run_dir=")
    args = [a for a in sys.argv[1:] if not a.startswith(drop)]
    prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "segtrain"
    prog = "segtrain" if prog in ("__main__.py", "") else prog
    return " ".join(shlex.quote(a) for a in [prog, *args, "trainer.resume=auto", f"hydra.run.dir={run_dir}"])


def stored_config(state: dict) -> DictConfig:
    """The config a checkpoint was trained with (empty when absent or unparsable: weights still count)."""
    try:
        return OmegaConf.create(state.get("config") or {})
    except Exception:
        return OmegaConf.create({})


def check_writable(folder: Path, num_params: int) -> None:
    """Fail before training when ``folder`` cannot take a checkpoint (permissions, or too little free space)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}.tmp"
        with open(probe, "wb") as f:
            f.write(b"0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise OutputError(
            f"cannot write to the run dir {folder}: {e.strerror or e}; choose a writable one with hydra.run.dir=PATH"
        ) from None
    need = num_params * 4 * 3 * 3  # weights + optimizer state, for last.pt, last-1.pt and best.pt
    free = shutil.disk_usage(folder).free
    if free < need:
        raise OutputError(
            f"only {free / 2**20:.0f} MiB free in {folder}, checkpoints need about "
            f"{need / 2**20:.0f} MiB; free space or choose another hydra.run.dir"
        )


class BatchToDevice:
    """uint8 images -> normalised float on the device (in ``memory_format``); masks -> int64."""

    def __init__(self, device: torch.device, mean, std, memory_format=torch.contiguous_format):
        self.device, self.memory_format = device, memory_format
        mean = torch.tensor(list(mean), device=device).view(1, 3, 1, 1)
        std = torch.tensor(list(std), device=device).view(1, 3, 1, 1)
        self.scale, self.shift = 1.0 / (255.0 * std), -mean / std

    def __call__(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:
            x = x.float() * self.scale + self.shift
        x = x.contiguous(memory_format=self.memory_format)
        return x, masks.to(self.device, non_blocking=True).long()


def eval_settings(cfg: DictConfig) -> dict[str, Any]:
    """``cfg.eval`` as keyword arguments of :func:`segtrain.inference.predict`."""
    e = cfg.eval
    crop = stride = None
    if e.mode == "slide":
        crop = as_hw(e.crop_size if e.crop_size is not None else cfg.data.crop_size, "eval.crop_size")
        stride = as_hw(e.stride, "eval.stride") if e.stride is not None else None
    return {"mode": e.mode, "crop_size": crop, "stride": stride, "scales": [float(v) for v in e.scales], "flip": e.flip}


@torch.no_grad()
def evaluate_loader(
    forward,
    loader,
    batch_to_device,
    autocast,
    cfg: DictConfig,
    class_names: list[str],
    criterion: nn.Module | None = None,
    progress: bool = False,
):
    """Predict every batch of ``loader`` with ``cfg.eval`` and fill a confusion matrix.

    Returns (metrics, confusion matrix, first images for visualisation or None).  ``forward`` must be
    in eval mode.  ``metrics["loss"]`` is the criterion on the (possibly TTA-averaged) scores.
    """
    from segtrain.inference import predict

    settings = eval_settings(cfg)
    num_classes = cfg.data.num_classes
    device = batch_to_device.device
    cm = ConfusionMatrix(num_classes, cfg.data.ignore_index, device, class_names)
    loss_sum, n_batches, vis = torch.zeros((), device=device), 0, None
    for images, masks in tqdm(loader, desc="val", leave=False, dynamic_ncols=True, disable=not progress):
        x, y = batch_to_device(images, masks)
        with autocast():
            scores = predict(forward, x, num_classes, **settings)
        if scores.shape[-2:] != y.shape[-2:]:  # data.val_size rescaled the image: score at the mask's size
            scores = F.interpolate(scores, size=y.shape[-2:], mode="bilinear", align_corners=False)
        if criterion is not None:
            loss_sum += criterion(scores, y).detach()
        n_batches += 1
        pred = scores.argmax(1)
        cm.update(pred, y)
        k = cfg.trainer.num_vis
        if vis is None and k > 0 and images.dtype == torch.uint8:
            shown = images[:k]
            if shown.shape[-2:] != masks.shape[-2:]:
                shown = F.interpolate(shown.float(), size=masks.shape[-2:], mode="bilinear").round().to(torch.uint8)
            vis = (shown, masks[:k], pred[:k].cpu())
    cm.all_reduce()
    totals = distributed.all_reduce(
        torch.stack([loss_sum.double(), torch.tensor(float(n_batches), device=device, dtype=torch.float64)])
    )
    m = cm.compute()
    m["loss"] = float(totals[0] / totals[1].clamp(min=1)) if criterion is not None else float("nan")
    return m, cm, vis


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _version() -> str:
    from segtrain import __version__

    return __version__


__all__ = ["Trainer", "BatchToDevice", "evaluate_loader", "resolve_device"]
