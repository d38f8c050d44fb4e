"""The one training loop, for every network, data set and recipe.

Read it top to bottom: ``__init__`` builds everything from the config, ``fit`` runs the iterations,
``train_step`` is one optimizer step, ``validate`` scores the validation set and saves.  The rest lives
elsewhere: device and precision in ``runtime``, the evaluation loop in ``evaluation``, resume policy in
``resume``, files in ``checkpoint`` and ``outputs``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn
from tqdm import tqdm

from segtrain import __version__, checkpoint, distributed, ema, loggers, monitor, resume, rundir, runtime
from segtrain.config import check_run_length, to_yaml
from segtrain.data import build_datasets, build_loader
from segtrain.errors import OutputError, Preempted, ResourceError
from segtrain.evaluation import class_names, evaluate_loader, palette_of
from segtrain.losses import build_loss
from segtrain.models import build_model, count_parameters
from segtrain.optim import build_optimizer, build_scheduler
from segtrain.outputs import bars_wanted, log_run_end, log_run_start, run_hparams, validation_pictures, write_json
from segtrain.preflight import dry_validation
from segtrain.recipe import optimizer_for_batch
from segtrain.runtime import BatchToDevice, DivergenceGuard, StopSignals, Throughput, autocast, unwrap
from segtrain.sweep import mark_status

log = logging.getLogger("segtrain")


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: str | Path):
        self.cfg, d, t = cfg, cfg.data, cfg.trainer
        # --- device, precision, processes, determinism --------------------------------------------
        self.device, self.precision = runtime.resolve_device(cfg.device)
        self.dist = distributed.setup(self.device.type)
        self.is_main, self.world_size = self.dist.is_main, self.dist.world_size
        if self.dist.enabled:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", self.dist.local_rank)
            run_dir = distributed.broadcast_object(str(run_dir), self.dist)  # rank 0's run dir
            if not self.is_main:
                log.setLevel(logging.WARNING)
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        if self.is_main:  # this run's dir: locked, never overwritten in silence (a no-op after the CLI's claim)
            rundir.claim(self.run_dir, t.resume, t.overwrite)
        runtime.seed_everything(cfg.seed)
        runtime.configure_backends(self.device, t.deterministic, cfg.device.cudnn_benchmark)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.guard = DivergenceGuard(self.scaler, self.precision)

        # --- data -------------------------------------------------------------------------------------
        self.train_set, self.val_set = build_datasets(d, cfg.seed)
        self.num_classes = d.num_classes
        self.class_names = class_names(self.train_set, self.num_classes)
        self.palette = palette_of(self.train_set, d.num_classes)
        rank, world = self.dist.rank, self.world_size
        self.train_loader = build_loader(self.train_set, d, True, cfg.seed, rank, world)
        self.val_loader = build_loader(self.val_set, d, False, cfg.seed, rank, world)
        self.iters_per_epoch = len(self.train_loader) // t.accumulate  # optimizer steps per epoch
        self.max_iters = t.max_iters if t.max_iters is not None else t.max_epochs * self.iters_per_epoch
        check_run_length(cfg, self.max_iters, len(self.train_set), self.iters_per_epoch, world)

        # --- model, loss, optimizer, schedule -----------------------------------------------------
        mf = self.memory_format = torch.channels_last if cfg.device.channels_last else torch.contiguous_format
        self.model = build_model(cfg.model, self.num_classes, d.in_channels).to(self.device, memory_format=mf)
        self.num_params = count_parameters(self.model)
        self.batch_to_device = BatchToDevice(self.device, d.mean, d.std, self.memory_format)
        self.criterion = build_loss(cfg.loss, self.num_classes, d.ignore_index, self.train_set).to(self.device)
        opt_cfg = optimizer_for_batch(cfg, self.world_size, self.is_main)  # recipe.total_batch, optimizer.lr_scaling
        self.optimizer = build_optimizer(opt_cfg, self.model)
        self.scheduler = build_scheduler(cfg.scheduler, self.optimizer, self.max_iters, opt_cfg.lr)

        # --- state, possibly restored ---------------------------------------------------------------
        self.step, self.epoch, self.epoch_step = 0, 0, 0
        self.best_miou, self.last_metrics, self.history, self.speed = float("nan"), None, [], Throughput()
        if self.is_main:
            rundir.check_writable(self.ckpt_dir, self.num_params)
            checkpoint.remove_stale_temporaries(self.ckpt_dir)
        if cfg.model.init_from:
            resume.init_from(self.model, cfg.model.init_from, cfg.model.name)
        self.ema = ema.EMA(self.model, t.ema_decay, t.ema_warmup) if t.ema_decay else None
        self.monitor = monitor.Monitor(t, self.ckpt_dir, self.class_names)  # best.pt, top-k, early stopping
        self.resumed_from = resume.restore(self)  # trainer.resume: the checkpoint's path, after loading it
        self.model, self.sync_bn = distributed.wrap(self.model, self.device, self.dist, cfg.device.sync_bn)
        self.net = torch.compile(self.model) if cfg.device.compile else self.model  # what the loop calls
        self.loggers = loggers.Loggers(cfg, self.run_dir, self.is_main, self.step)  # rank 0 only
        self.loggers.config(cfg, run_hparams(cfg, self.max_iters, self.precision))
        self.signals = StopSignals(partial(mark_status, self.run_dir, "aborted") if self.is_main else None)

    def fit(self) -> dict:
        """Train to ``max_iters``; SIGINT/SIGTERM stop after the current step with a resumable last.pt."""
        with self.signals:
            try:
                with checkpoint.steps_kept_on_failure(self):  # e.g. a bad file or a failed validation: last.pt first
                    dry_validation(self)  # a run that would crash at its first validation fails now
                    return self._fit()
            except torch.cuda.OutOfMemoryError:
                where = "in validation" if not self.model.training else f"at step {self.step + 1}"
                raise ResourceError(runtime.oom_message(self.cfg, self.precision, where)) from None
            finally:
                self.loggers.close()  # a failure (no-op after a normal end or a preemption)
                distributed.cleanup()
                rundir.release(self.run_dir)

    def _fit(self) -> dict:
        t = self.cfg.trainer
        log_run_start(self)
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        bars = bars_wanted(t.progress and self.is_main)
        bar = tqdm(total=self.max_iters, initial=self.step, desc="train", dynamic_ncols=True, disable=not bars)
        loss_avg, t_start, k = None, time.perf_counter(), t.accumulate
        if resume.validation_owed(self) and self.validate() is None:  # cut short by a signal before the resume
            self._preempt(self.signals.received)
        self.model.train()
        while self.step < self.max_iters and not self.monitor.stop_reason:
            self.train_loader.sampler.set_epoch(self.epoch, start=self.epoch_step * k * self.train_loader.batch_size)
            micro: list = []
            t_wait = time.perf_counter()
            for batch in self.train_loader:
                micro.append(batch)
                if len(micro) < k:
                    continue
                t0 = time.perf_counter()
                loss, n_images, stop = self.train_step(micro)
                micro = []
                self.step, self.epoch_step = self.step + 1, self.epoch_step + 1
                loss_avg = loss if loss_avg is None else 0.9 * loss_avg + 0.1 * loss
                self._log_step(bar, loss, loss_avg)  # the lr this step used
                self.scheduler.step()
                self.speed.add(n_images * self.world_size, t0 - t_wait, time.perf_counter() - t0)  # logging too
                epoch_done = self.epoch_step >= self.iters_per_epoch
                if epoch_done:
                    self.epoch, self.epoch_step = self.epoch + 1, 0
                due = (self.step % t.val_interval == 0) if t.val_interval else epoch_done
                cut = (due or self.step >= self.max_iters) and self.validate() is None  # a signal in validation
                stop = stop or cut or (t.stop_at is not None and self.step >= t.stop_at)
                if stop and (self.step < self.max_iters or cut):
                    bar.close()
                    self._preempt(self.signals.received or "trainer.stop_at")
                if epoch_done or self.step >= self.max_iters or self.monitor.stop_reason:
                    break
                t_wait = time.perf_counter()
            else:  # the loader ran out early (can only happen with an unusual sampler length)
                self.epoch, self.epoch_step = self.epoch + 1, 0
        bar.close()
        summary = self.summary(time.perf_counter() - t_start)
        log_run_end(self, summary)
        final = ("best_miou", "last_miou", "monitor", "best_value", "best_step", "best_checkpoint", "stop_reason")
        self.loggers.finish(run_hparams(self.cfg, self.max_iters, self.precision), {k: summary[k] for k in final})
        return summary

    def _log_step(self, bar: tqdm, loss: float, loss_avg: float) -> None:
        """The progress bar, TensorBoard scalars every ``log_interval`` steps, and a log line then without a bar."""
        group = self.optimizer.param_groups[0]
        lr = group["lr"] / group.get("lr_mult", 1.0)
        rates = self.speed.rates()
        ips = rates["train_images_per_sec"] or float("nan")
        bar.update(1)
        bar.set_postfix(loss=f"{loss_avg:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.1f}", epoch=self.epoch, refresh=False)
        if self.step % self.cfg.trainer.log_interval == 0 or self.step == 1:
            self.loggers.scalars({"train/loss": loss, "train/lr": lr, "train/img_per_s": ips, "train/epoch": self.epoch,
                             "train/data_wait_fraction": rates["data_wait_fraction"]}, self.step)  # fmt: skip
            if bar.disable and self.is_main:
                log.info("step %d/%d: loss %.4f, lr %.2e, %.1f img/s, epoch %d", self.step, self.max_iters, loss_avg,
                         lr, ips, self.epoch)  # fmt: skip

    def train_step(self, micro: list) -> tuple[float, int, bool]:
        """One optimizer step over ``trainer.accumulate`` micro-batches: (loss, images, stop requested)."""
        total, n_images = 0.0, 0
        for i, (images, masks) in enumerate(micro):
            x, y = self.batch_to_device(images, masks)
            sync = i == len(micro) - 1 or not self.dist.enabled  # DDP: all-reduce gradients on the last one only
            with contextlib.nullcontext() if sync else self.model.no_sync():
                with autocast(self.device, self.precision):
                    loss = self.criterion(self.net(x), y) / len(micro)
                if i == 0:  # after the forward (as torchvision's reference): the backward reuses the freed memory
                    self.optimizer.zero_grad(set_to_none=True)  # of the old gradients (a CPU step 3-5% faster)
                self.scaler.scale(loss).backward()
            total = total + loss.detach()
            n_images += x.shape[0]
        if self.cfg.trainer.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.trainer.grad_clip)
        scale_before = self.guard.scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # one collective (DDP): the mean loss, and whether any process got a stop signal
        loss_val, stop = distributed.mean_and_any(
            float(total), self.signals.received is not None, self.dist, self.device
        )
        self.guard.check(loss_val, scale_before, self.step + 1)
        if self.ema is not None:
            self.ema.update(self.model)
        return loss_val, n_images, stop

    def validate(self) -> dict | None:
        """Score the validation set, log it, and save last.pt (best.pt, top-k: when ``trainer.monitor`` improved);
        None when a stop signal came during it (single process: at the next batch; under DDP all ranks finish it)."""
        self.model.eval()
        # eager, no DDP hooks: compiled graphs would recompile
        net = self.ema.module if self.ema else unwrap(self.model)
        stop = None if self.dist.enabled else (lambda: self.signals.received is not None)
        m, cm, vis = evaluate_loader(
            net, self.val_loader, self.batch_to_device, lambda: autocast(self.device, self.precision), self.cfg,
            self.class_names, criterion=self.criterion, num_vis=self.cfg.trainer.num_vis, should_stop=stop,
            progress=bars_wanted(self.cfg.trainer.progress and self.is_main),
        )  # fmt: skip
        self.model.train()
        if m is None:  # stopped
            return None
        self.last_metrics = m
        if not (m["miou"] <= self.best_miou):  # also True when best is NaN (first validation)
            self.best_miou = m["miou"]
        keys = ("miou", "aacc", "macc", "mdice", "loss", "fg_iou")  # fg_iou: one sigmoid logit only
        self.history.append({"step": self.step, "epoch": self.epoch, **{k: m[k] for k in keys if k in m}})
        scalars = {"val/mIoU": m["miou"], "val/aAcc": m["aacc"], "val/mAcc": m["macc"], "val/mDice": m["mdice"],
                   "val/loss": m["loss"], **{f"val_iou/{n}": v for n, v in zip(self.class_names, m["iou"])}}  # fmt: skip
        improved = self.monitor.update(scalars, self.step)
        self.loggers.scalars(scalars, self.step)
        validation_pictures(self.loggers, self.run_dir if self.is_main else None, cm.mat.cpu(), m, vis, self.class_names,
                            self.palette, self.cfg.data.ignore_index, self.step)  # fmt: skip
        if self.is_main:
            tqdm.write(f"step {self.step}: val mIoU {m['miou']:.4f}  aAcc {m['aacc']:.4f}  loss {m['loss']:.4f}"
                       + (f"  fg IoU {m['fg_iou']:.4f}" if "fg_iou" in m else "") + ("  (best)" if improved else ""))  # fmt: skip
            self.save()
            self.speed.warn_if_loader_bound(self.train_loader.num_workers)
        return m

    def save(self) -> None:
        """last.pt (the previous one kept as last-1.pt ...), best.pt / best-*.pt (the monitor's), metrics.json."""
        state = self.state_dict()
        target = self.ckpt_dir / "last.pt"
        try:
            checkpoint.save_rotating(state, target, self.cfg.trainer.keep_last)
            target = self.ckpt_dir / "best.pt"
            self.monitor.save(state)
            write_json(self.run_dir / "metrics.json", self.summary(None))
        except OSError as e:
            raise OutputError(f"cannot write {target}: {e.strerror or e}; the previous checkpoint is kept; free "
                              "space or make the run dir writable, then resume with trainer.resume=auto") from None  # fmt: skip

    def _preempt(self, reason: str) -> None:
        """Write last.pt and stop with Preempted (exit code 75), printing the command that resumes."""
        if self.is_main:
            self.save()
        self.loggers.close("killed")
        if self.dist.enabled:
            torch.distributed.barrier()  # no process exits (and gets the others killed) before last.pt is written
        last = self.ckpt_dir / "last.pt"
        log.warning("stopped by %s at step %d of %d; wrote %s; resume with: %s", reason, self.step, self.max_iters,
                    last, rundir.resume_command(self.run_dir, limit=None))  # fmt: skip
        raise Preempted(f"stopped by {reason} at step {self.step}/{self.max_iters}; {last} written; resume with: "
                        f"{rundir.resume_command(self.run_dir)}", by_signal=reason.startswith("SIG"))  # fmt: skip

    def summary(self, wall_time: float | None) -> dict:
        m, c = self.last_metrics or {}, self.cfg
        out = {"best_miou": self.best_miou, "last_miou": m.get("miou", float("nan")), "aacc": m.get("aacc"),
               "macc": m.get("macc"), "mdice": m.get("mdice"), "per_class_iou": m.get("per_class_iou", {}),
               **{k: m[k] for k in ["fg_iou"] if k in m}, "num_params": self.num_params, **self.speed.rates(),
               "step": self.step, "epoch": self.epoch, "max_iters": self.max_iters,
               "skipped_steps": self.guard.skipped_steps, "model": c.model.name, "data": c.data.name,
               "device": str(self.device), "precision": self.precision, "world_size": self.world_size,
               "resumed_from": self.resumed_from, "history": self.history, "ema_decay": c.trainer.ema_decay,
               **self.monitor.summary(self.step, self.max_iters)}  # fmt: skip
        return out if wall_time is None else {**out, "wall_time_sec": wall_time}

    def state_dict(self) -> dict:
        meta = {"model": self.cfg.model.name, "num_classes": self.num_classes, "class_names": self.class_names,
                "segtrain_version": __version__, "palette": self.palette.tolist()}  # fmt: skip
        raw = unwrap(self.model).state_dict()  # with EMA: "model" holds the averaged (validated) weights
        extra = {"raw_model": raw, "ema": self.ema.state_dict()} if self.ema else {}
        return {"model": self.ema.module.state_dict() if self.ema else raw, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "step": self.step,
                "epoch": self.epoch, "epoch_step": self.epoch_step, "best_miou": self.best_miou,
                "history": self.history, "speed": self.speed.state_dict(),
                "skipped_steps": self.guard.skipped_steps, "rng": checkpoint.rng_state(),
                "config": to_yaml(self.cfg), "meta": meta, "monitor": self.monitor.state_dict(), **extra}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        """Everything :meth:`state_dict` saved, so that the run continues bitwise as if never stopped."""
        unwrap(self.model).load_state_dict(state["raw_model"] if "raw_model" in state else state["model"])
        if self.ema is not None:
            self.ema.load(state, self.model)
        self.monitor.load_state_dict(state.get("monitor"))  # absent before segtrain 0.2
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.guard.load_state_dict(state)  # the GradScaler's state and the skipped-step count
        self.step, self.epoch, self.epoch_step = state["step"], state["epoch"], state["epoch_step"]
        self.best_miou, self.history = state["best_miou"], list(state["history"])
        if "speed" in state:  # absent in checkpoints of segtrain 0.1.0
            self.speed.load_state_dict(state["speed"])
        checkpoint.set_rng_state(state["rng"])
