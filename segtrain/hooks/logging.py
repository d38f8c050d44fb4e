"""The run's records: the experiment loggers (:class:`LoggerHook`), the pictures of each validation
(:class:`ValidationPictures`) and the console (:class:`Progress`: the opening lines, the progress bar or a plain
line every ``trainer.log_interval`` steps, a line per validation, the closing table)."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf
from tqdm import tqdm

from segtrain.hooks.base import Hook, StepResult, ValidationResult
from segtrain.hooks.throughput import Throughput
from segtrain.loggers import Loggers
from segtrain.outputs import bars_wanted, format_table, run_hparams, validation_pictures

log = logging.getLogger("segtrain")

FINAL = ("best_miou", "last_miou", "monitor", "best_value", "best_step", "best_checkpoint", "stop_reason")


def _step_logged(trainer) -> bool:
    return trainer.step % trainer.cfg.trainer.log_interval == 0 or trainer.step == 1


class LoggerHook(Hook):
    """The ``logger`` group's backends (:class:`segtrain.loggers.Loggers`; rank 0 only), started before the first
    step (a resumed run continues its W&B / MLflow run and trims its CSV to the resumed step): the config, the
    training scalars every ``trainer.log_interval`` steps, every validation's values, the final metrics."""

    def __init__(self, run_dir: Path, speed: Throughput):
        self.run_dir, self.speed = run_dir, speed
        self.loggers: Loggers | None = None

    def before_train(self, trainer) -> None:
        self.loggers = Loggers(trainer.cfg, self.run_dir, trainer.is_main, trainer.step)
        self.loggers.config(trainer.cfg, run_hparams(trainer.cfg, trainer.max_iters, trainer.precision))

    def after_step(self, trainer, step: StepResult) -> None:
        if _step_logged(trainer):
            rates = self.speed.rates()
            values = {
                "train/loss": step.loss,
                "train/lr": trainer.lr(),
                "train/img_per_s": rates["train_images_per_sec"] or float("nan"),
                "train/epoch": trainer.epoch,
                "train/data_wait_fraction": rates["data_wait_fraction"],
            }
            self.loggers.scalars(values, trainer.step)

    def after_validation(self, trainer, validation: ValidationResult) -> None:
        self.loggers.scalars(validation.scalars, trainer.step)

    def after_train(self, trainer, summary: dict) -> None:
        hparams = run_hparams(trainer.cfg, trainer.max_iters, trainer.precision)
        self.loggers.finish(hparams, {k: summary[k] for k in FINAL if k in summary})

    def close(self, trainer, status: str) -> None:
        if self.loggers is not None:
            self.loggers.close(status)


class ValidationPictures(Hook):
    """The confusion matrix, the per-class IoU bars and the prediction grid of every validation: PNGs in the run
    dir (rank 0) and images in the loggers."""

    def __init__(self, run_dir: Path, logging_hook: LoggerHook, palette):
        self.run_dir, self.logging, self.palette = run_dir, logging_hook, palette

    def after_validation(self, trainer, v: ValidationResult) -> None:
        validation_pictures(
            self.logging.loggers,
            self.run_dir if trainer.is_main else None,
            v.confusion,
            v.metrics,
            v.vis,
            trainer.class_names,
            self.palette,
            trainer.cfg.data.ignore_index,
            trainer.step,
        )


class Progress(Hook):
    """The console: what the run is, then a tqdm bar (on a terminal; else a log line every
    ``trainer.log_interval`` steps) with the smoothed loss, lr, img/s and epoch, a line per validation, and
    the last validation's per-class table at the end."""

    def __init__(self, speed: Throughput):
        self.speed, self.bar, self.loss_avg = speed, None, None

    def before_train(self, trainer) -> None:
        cfg, d, t = trainer.cfg, trainer.cfg.data, trainer.cfg.trainer
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        frozen = trainer.num_params - trainable
        frozen_note = f" ({trainable:,} train; the frozen encoder's {frozen:,} do not)" if frozen else ""
        log.info(
            "model %s: %s parameters%s | device %s, precision %s, channels_last %s, compile %s",
            cfg.model.name,
            f"{trainer.num_params:,}",
            frozen_note,
            trainer.device,
            trainer.precision,
            cfg.device.channels_last,
            cfg.device.compile,
        )
        batch = d.batch_size * trainer.world_size * t.accumulate
        log.info(
            "data %s: %d train / %d val images, batch %d x %d process(es) x accumulate %d = %d, %d iterations "
            "(%.1f epochs) | run dir %s",
            d.name,
            len(trainer.train_loader.dataset),
            len(trainer.val_loader.dataset),
            d.batch_size,
            trainer.world_size,
            t.accumulate,
            batch,
            trainer.max_iters,
            trainer.max_iters / trainer.iters_per_epoch,
            trainer.run_dir,
        )
        if trainer.dist.enabled:
            log.info("world size %d (backend %s, SyncBN %s)", trainer.world_size, trainer.dist.backend, trainer.sync_bn)
        log.info("loggers: %s", ", ".join(k for k, v in OmegaConf.to_container(cfg.logger).items() if v) or "none")
        bars = bars_wanted(t.progress and trainer.is_main)
        self.bar = tqdm(
            total=trainer.max_iters, initial=trainer.step, desc="train", dynamic_ncols=True, disable=not bars
        )

    def after_step(self, trainer, step: StepResult) -> None:
        self.loss_avg = step.loss if self.loss_avg is None else 0.9 * self.loss_avg + 0.1 * step.loss
        lr, ips = trainer.lr(), self.speed.rates()["train_images_per_sec"] or float("nan")
        self.bar.update(1)
        self.bar.set_postfix(
            loss=f"{self.loss_avg:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.1f}", epoch=trainer.epoch, refresh=False
        )
        if _step_logged(trainer) and self.bar.disable and trainer.is_main:
            log.info(
                "step %d/%d: loss %.4f, lr %.2e, %.1f img/s, epoch %d",
                trainer.step,
                trainer.max_iters,
                self.loss_avg,
                lr,
                ips,
                trainer.epoch,
            )

    def after_validation(self, trainer, v: ValidationResult) -> None:
        if trainer.is_main:
            m = v.metrics
            fg = f"  fg IoU {m['fg_iou']:.4f}" if "fg_iou" in m else ""
            best = "  (best)" if v.improved else ""
            tqdm.write(
                f"step {trainer.step}: val mIoU {m['miou']:.4f}  aAcc {m['aacc']:.4f}  loss {m['loss']:.4f}{fg}{best}"
            )

    def after_train(self, trainer, summary: dict) -> None:
        self.bar.close()
        if trainer.last_metrics is not None:
            log.info(
                "final validation (step %d):\n%s", trainer.step, format_table(trainer.last_metrics, trainer.class_names)
            )
        ips = summary.get("train_images_per_sec") or float("nan")
        log.info("best val mIoU %.4f | %.1f train img/s | outputs in %s", summary["best_miou"], ips, trainer.run_dir)

    def close(self, trainer, status: str) -> None:
        if self.bar is not None:
            self.bar.close()
