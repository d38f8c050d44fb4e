"""The one training loop, for every network, data set and recipe.

A :class:`Trainer` receives the run's objects, built elsewhere (:func:`segtrain.build.build_trainer` builds them
from a config): the network, its optimizer and learning-rate schedule, the loss, the two loaders and the hooks
(:mod:`segtrain.hooks`) that do the side work: logging, checkpoints by a monitored value, weight averaging, the
divergence guard, speed, pictures.  Read it top to bottom: :meth:`Trainer.fit` runs epochs until the run is
done, :meth:`Trainer.train_step` is one optimizer step, :meth:`Trainer.validate` scores the validation set,
:meth:`Trainer.save` writes the checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from segtrain import checkpoint, console, distributed
from segtrain.config import to_yaml
from segtrain.console import oom_message
from segtrain.data.palette import default_palette
from segtrain.distributed import DistInfo
from segtrain.errors import NonFiniteLossError, OutputError, Preempted, ResourceError
from segtrain.evaluation import class_names as default_class_names
from segtrain.evaluation import evaluate_loader
from segtrain.hooks.base import VALIDATION_SCALARS, Hook, StepResult, ValidationResult
from segtrain.models.build import count_parameters
from segtrain.outputs import bars_wanted
from segtrain.runtime import BatchToDevice, autocast
from segtrain.signals import StopSignals
from segtrain.utils import write_json
from segtrain.version import __version__

log = logging.getLogger("segtrain")

VALIDATION_KEYS = ("miou", "aacc", "macc", "mdice", "loss", "fg_iou")  # a validation's record (fg_iou: one logit)


class StopTraining(Exception):
    """A stop signal (or ``trainer.stop_at``) ends training here; :meth:`Trainer.fit` saves and raises Preempted."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Trainer:
    """``cfg`` is the run's resolved config (what checkpoints store): the loop reads ``trainer.*`` (accumulate,
    clipping, validation interval, stop_at, keep_last), ``device.*`` (channels_last, compile, sync_bn), the
    ``eval`` settings and ``data`` (mean/std, classes).  ``max_iters``: the run's length (None:
    ``trainer.max_iters``, else ``trainer.max_epochs`` epochs of ``train_loader``)."""

    def __init__(
        self,
        cfg: DictConfig,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        criterion: nn.Module,
        train_loader,
        val_loader,
        *,
        run_dir: str | Path,
        device: torch.device | str = "cpu",
        precision: str = "fp32",
        hooks: Sequence[Hook] = (),
        dist: DistInfo | None = None,
        class_names: list[str] | None = None,
        palette: np.ndarray | None = None,
        max_iters: int | None = None,
        on_abort: Callable[[str], None] | None = None,
    ):
        self.cfg, self.model, self.optimizer, self.scheduler = cfg, model, optimizer, scheduler
        self.criterion, self.train_loader, self.val_loader = criterion, train_loader, val_loader
        self.hooks = list(hooks)
        self.device, self.precision = torch.device(device), precision
        self.dist = dist or DistInfo()
        self.is_main, self.world_size = self.dist.is_main, self.dist.world_size
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.num_classes = cfg.data.num_classes  # network outputs (1: one sigmoid logit)
        self.class_names = class_names or default_class_names(None, self.num_classes)
        self.palette = palette if palette is not None else default_palette(len(self.class_names))
        t = cfg.trainer
        self.iters_per_epoch = len(train_loader) // t.accumulate  # optimizer steps per epoch
        self.max_iters = max_iters or (t.max_iters if t.max_iters is not None else t.max_epochs * self.iters_per_epoch)
        self.memory_format = torch.channels_last if cfg.device.channels_last else torch.contiguous_format
        self.batch_to_device = BatchToDevice(self.device, cfg.data.mean, cfg.data.std, self.memory_format)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        self.num_params = count_parameters(model)
        self.signals = StopSignals(on_abort)
        self.step, self.epoch, self.epoch_step = 0, 0, 0
        self.best_miou, self.last_metrics, self.history = float("nan"), None, []
        self.resumed_from: str | None = None
        self.ddp, self.net, self.sync_bn = model, model, False  # set by fit(): the DDP wrapper, what the loop calls

    # --- the loop --------------------------------------------------------------------------------------

    def fit(self) -> dict:
        """Train to ``max_iters`` and return the summary (also in ``metrics.json``).  A stop signal (SIGINT,
        SIGTERM, SIGUSR2) or ``trainer.stop_at`` ends the current step, writes ``last.pt`` and raises
        :class:`Preempted`; any other failure writes ``last.pt`` first when steps since the last one would be lost."""
        self.ddp, self.sync_bn = distributed.wrap(self.model, self.device, self.dist, self.cfg.device.sync_bn)
        self.net = torch.compile(self.ddp) if self.cfg.device.compile else self.ddp
        status, saved_step = "failed", self.step
        with self.signals:
            try:
                summary = self._fit()
                status = "finished"
                return summary
            except StopTraining as stop:
                status = "killed"
                self._stopped(stop.reason)
            except (NonFiniteLossError, OutputError):  # the weights are bad, or saving is what failed
                raise
            except Exception as e:  # a bad file, a failed validation, out of memory ...: last.pt of the steps first
                self._save_unsaved_steps(saved_step)
                kind = console.out_of_memory(e)  # GPU or CPU memory: advice on what shrinks the job
                if kind is None:
                    raise
                where = "in validation" if not self.model.training else f"at step {self.step + 1}"
                raise ResourceError(oom_message(self.cfg, self.precision, where, kind=kind)) from e
            finally:
                self._call("close", status)

    def _fit(self) -> dict:
        self._call("before_train")  # checks, the run's opening lines, the loggers
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        if self._validation_owed():
            self.validate()
        self.model.train()
        while not self._done():
            self._train_epoch()
        summary = self.summary(time.perf_counter() - started)
        self._call("after_train", summary)
        return summary

    def _train_epoch(self) -> None:
        """The rest of the current epoch, or less when the run is done sooner."""
        k, loader = self.cfg.trainer.accumulate, self.train_loader
        loader.sampler.set_epoch(self.epoch, start=self.epoch_step * k * loader.batch_size)
        micro: list = []
        waiting_since = time.perf_counter()
        for batch in loader:
            micro.append(batch)
            if len(micro) < k:
                continue
            started = time.perf_counter()
            loss, images, signalled = self.train_step(micro)
            micro = []
            self.step += 1
            self.epoch_step += 1
            self._call("after_step", StepResult(loss, images, started, started - waiting_since))
            self.scheduler.step()
            epoch_done = self.epoch_step >= self.iters_per_epoch
            if epoch_done:
                self.epoch, self.epoch_step = self.epoch + 1, 0
            if self._validation_due(epoch_done):
                self.validate()
            self._check_stop(signalled)
            if epoch_done or self._done():
                return
            waiting_since = time.perf_counter()
        self.epoch, self.epoch_step = self.epoch + 1, 0  # the loader ran out early (an unusual sampler length)

    # --- when to validate and when to stop: here only --------------------------------------------------

    def _validation_due(self, epoch_done: bool) -> bool:
        interval = self.cfg.trainer.val_interval
        due = self.step % interval == 0 if interval else epoch_done
        return due or self.step >= self.max_iters

    def _validation_owed(self) -> bool:
        """A resumed run whose step was due a validation that a signal cut short (its last.pt was written
        mid-validation) validates first, so that no validation (the final one above all) is lost."""
        if not self.resumed_from or self.step == 0 or (self.history and self.history[-1]["step"] == self.step):
            return False
        return self._validation_due(epoch_done=self.epoch_step == 0)

    def _done(self) -> bool:
        """The run's length is reached, or a hook ended it (early stopping)."""
        return self.step >= self.max_iters or any(h.stop_reason for h in self.hooks)

    def _check_stop(self, signalled: bool) -> None:
        """Raise StopTraining after a stop signal (on any process) or at ``trainer.stop_at``, unless the run is over."""
        stop_at = self.cfg.trainer.stop_at
        reason = self.signals.received or ("a signal to another process" if signalled else None)
        if reason is None and stop_at is not None and self.step >= stop_at:
            reason = "trainer.stop_at"
        if reason is not None and self.step < self.max_iters:
            raise StopTraining(reason)

    # --- one step, one validation ------------------------------------------------------------------------

    def train_step(self, micro: list) -> tuple[float, int, bool]:
        """One optimizer step over ``trainer.accumulate`` micro-batches: (loss, images, a stop signal arrived)."""
        total, n_images = 0.0, 0
        for i, (images, masks) in enumerate(micro):
            x, y = self.batch_to_device(images, masks)
            sync = i == len(micro) - 1 or not self.dist.enabled  # DDP: all-reduce gradients on the last one only
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
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
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # one collective (DDP): the mean loss, and whether any process got a stop signal
        received = self.signals.received is not None
        loss_value, signalled = distributed.mean_and_any(float(total), received, self.dist, self.device)
        return loss_value, n_images, signalled

    def validate(self) -> dict:
        """Score the validation set, let the hooks record it, then save: last.pt, and what the hooks keep (best.pt,
        top-k).  A stop signal during it raises StopTraining (one process: at the next batch; under DDP every
        process finishes it)."""
        self.model.eval()
        stop = None if self.dist.enabled else (lambda: self.signals.received is not None)
        m, cm, vis = evaluate_loader(
            self._validation_model(),  # eager, without DDP hooks: compiled graphs would recompile
            self.val_loader,
            self.batch_to_device,
            lambda: autocast(self.device, self.precision),
            self.cfg,
            self.class_names,
            criterion=self.criterion,
            num_vis=self.cfg.trainer.num_vis,
            should_stop=stop,
            progress=bars_wanted(self.cfg.trainer.progress and self.is_main),
        )
        self.model.train()
        if m is None:
            raise StopTraining(self.signals.received or "a stop signal")
        self.last_metrics = m
        if not m["miou"] <= self.best_miou:  # also true when best is NaN (the first validation)
            self.best_miou = m["miou"]
        self.history.append({"step": self.step, "epoch": self.epoch, **{k: m[k] for k in VALIDATION_KEYS if k in m}})
        scalars = {key: m[metric] for key, metric in VALIDATION_SCALARS.items()}
        scalars.update({f"val_iou/{name}": v for name, v in zip(self.class_names, m["iou"])})
        self._call("after_validation", ValidationResult(m, scalars, cm.mat.cpu(), vis))
        if self.is_main:
            self.save()
        return m

    # --- checkpoints ---------------------------------------------------------------------------------------

    def save(self) -> None:
        """last.pt (the previous one kept as last-1.pt ...), the hooks' files (best.pt, top-k), metrics.json."""
        state = self.state_dict()
        target = self.ckpt_dir / "last.pt"
        try:
            checkpoint.save_rotating(state, target, self.cfg.trainer.keep_last)
            target = self.ckpt_dir / "best.pt"
            self._call("after_save", state)
            target = self.run_dir / "metrics.json"
            write_json(target, self.summary())
        except OSError as e:
            raise OutputError(
                f"cannot write {target}: {e.strerror or e}; the previous checkpoint is kept; free space or make the "
                "run dir writable, then resume with trainer.resume=auto"
            ) from None

    def _save_unsaved_steps(self, saved_step: int) -> None:
        """On a failure (a bad file, a failed validation, out of memory ...): last.pt first when training steps
        since the last one (at the latest validation, or the resumed checkpoint) would be lost.  A failure of this
        save is only logged: the original error is the one to report."""
        last_saved = max(saved_step, self.history[-1]["step"] if self.history else 0)
        if not self.is_main or self.step <= last_saved:
            return
        try:
            self.save()
            log.warning("the run failed; last.pt of the steps done was written first")
        except Exception as e:  # noqa: BLE001
            log.warning("the run failed, and writing last.pt failed too: %s", e)

    def _stopped(self, reason: str) -> None:
        """Write last.pt, then raise Preempted (exit code 75)."""
        if self.is_main:
            self.save()
        if self.dist.enabled:
            torch.distributed.barrier()  # no process exits (and gets the others killed) before last.pt is written
        last = self.ckpt_dir / "last.pt"
        raise Preempted(
            f"stopped by {reason} at step {self.step}/{self.max_iters}; {last} written",
            by_signal=reason.startswith("SIG") or reason.startswith("a signal"),
        )

    def state_dict(self) -> dict:
        """Everything a resume needs to continue bitwise, and what eval, predict and export read: ``model`` (the
        weights validation scores), ``config`` (the resolved config as YAML) and ``meta``."""
        validated = self._validation_model()
        state = {
            "model": validated.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "epoch_step": self.epoch_step,
            "best_miou": self.best_miou,
            "history": self.history,
            "rng": checkpoint.rng_state(),
            "config": to_yaml(self.cfg),
            "meta": {
                "model": self.cfg.model.name,
                "num_classes": self.num_classes,
                "class_names": self.class_names,
                "segtrain_version": __version__,
                "palette": np.asarray(self.palette).tolist(),
            },
        }
        if validated is not self.model:
            state["raw_model"] = self.model.state_dict()  # the weights training goes on from
        for hook in self.hooks:
            if hook.name:
                state[hook.name] = hook.state_dict()
        return state

    def load_state_dict(self, state: dict, path: str | Path | None = None) -> None:
        """Everything :meth:`state_dict` saved, so that the run continues bitwise as if never stopped."""
        self.model.load_state_dict(state.get("raw_model", state["model"]))
        validated = self._validation_model()
        if validated is not self.model:  # the average: the checkpoint's, or the weights (a run without one)
            validated.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # a run without fp16 saved none: a resumed fp16 run starts with a fresh scale
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.epoch_step = state["step"], state["epoch"], state["epoch_step"]
        self.best_miou, self.history = state["best_miou"], list(state["history"])
        for hook in self.hooks:
            if hook.name:
                hook.load_state_dict(state.get(hook.name))
        checkpoint.set_rng_state(state["rng"])
        if path is not None:
            self.resumed_from = str(path)
            log.info("resumed from %s at step %d of %d (epoch %d)", path, self.step, self.max_iters, self.epoch)

    # --- what the hooks read ---------------------------------------------------------------------------------

    def lr(self) -> float:
        """The base learning rate of the current step (the first parameter group's, without its multiplier)."""
        group = self.optimizer.param_groups[0]
        return group["lr"] / group.get("lr_mult", 1.0)

    def summary(self, wall_time: float | None = None) -> dict:
        """``metrics.json``: the latest validation, the run's settings and progress, and each hook's values."""
        m, c = self.last_metrics or {}, self.cfg
        out = {
            "best_miou": self.best_miou,
            "last_miou": m.get("miou", math.nan),
            "aacc": m.get("aacc"),
            "macc": m.get("macc"),
            "mdice": m.get("mdice"),
            "per_class_iou": m.get("per_class_iou", {}),
            **({"fg_iou": m["fg_iou"]} if "fg_iou" in m else {}),
            "num_params": self.num_params,
            "step": self.step,
            "epoch": self.epoch,
            "max_iters": self.max_iters,
            "model": c.model.name,
            "data": c.data.name,
            "device": str(self.device),
            "precision": self.precision,
            "world_size": self.world_size,
            "resumed_from": self.resumed_from,
            "history": self.history,
            "ema_decay": c.trainer.ema_decay,
        }
        for hook in self.hooks:
            out.update(hook.summary(self))
        return out if wall_time is None else {**out, "wall_time_sec": wall_time}

    def _validation_model(self) -> nn.Module:
        """The module validation scores: a hook's (the weight average), else the trained one."""
        for hook in self.hooks:
            model = hook.validation_model()
            if model is not None:
                return model
        return self.model

    def _call(self, event: str, *args) -> None:
        for hook in self.hooks:
            getattr(hook, event)(self, *args)
