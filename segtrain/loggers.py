"""Experiment loggers: the ``logger`` config group.

The trainer talks to one :class:`Loggers` object, which fans every call out to the backends that
``cfg.logger`` switches on (``logger=csv``, ``logger=[tensorboard,csv]``, ``logger=[]`` for none):

    backend       writes (under the run dir)                            needs
    tensorboard   tb/: scalars, image grids, the config as text,        (always installed)
                  hparams + final metrics (HPARAMS tab)
    csv           metrics.csv: one row per log step and per validation  (nothing)
    wandb         wandb/: a W&B run (offline by default: ``wandb sync``  pip install 'segtrain[wandb]'
                  uploads it), config, scalars, images, summary
    mlflow        mlruns/: a local MLflow file store (or any              pip install 'segtrain[mlflow]'
                  ``logger.mlflow.tracking_uri``): params, the config
                  as config.yaml, metrics, images, final metrics, tags

The interface (:class:`Backend`): ``config`` once at the start, ``scalars`` and ``image`` during
training, ``finish`` with the final metrics (best value, best checkpoint path, why training stopped),
and ``close`` with the run's outcome (``finished``, ``killed`` for a preemption, ``failed``).  Only rank 0
logs.  A backend that fails while logging is switched off with one warning: a logger never stops training.
Run names: ``<job number>_<overrides>`` in a sweep (W&B group / MLflow tag: the sweep dir), else the
overrides or the run dir's name.  A resumed run (``trainer.resume``) continues the same W&B / MLflow run
(their ids are kept in ``<run dir>/loggers.json``) and the CSV drops rows after the resumed step.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from segtrain.errors import ConfigError, missing_extra
from segtrain.utils import atomic_write

log = logging.getLogger("segtrain")

IDS_FILE = "loggers.json"  # run ids of the W&B / MLflow runs, so that a resume continues them


def _finite(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def _import(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise ConfigError(
            missing_extra(f"logger={module}", module, module, f"or drop {module} from logger=...")
        ) from None


def run_names(run_dir: Path) -> tuple[str, str | None]:
    """(run name, group): in a Hydra sweep ``<job number>_<overrides>`` and the sweep dir's name, otherwise
    the overrides (or the run dir's name) and no group."""
    try:
        hc = HydraConfig.get()
        overrides = hc.job.override_dirname or ""
        if hc.mode == RunMode.MULTIRUN:
            name = f"{hc.job.num}_{overrides}" if overrides else str(hc.job.num)
            return name[:120], Path(str(hc.sweep.dir)).name
    except Exception:  # noqa: BLE001 - no Hydra app (the trainer used as a library, or a partial Hydra config)
        return run_dir.name, None
    return (overrides or run_dir.name)[:120], None


class Backend:
    """What every logger implements; the defaults do nothing."""

    name = "backend"

    def config(self, config: dict, hparams: dict) -> None:
        """Once at the start: the resolved config (nested) and the run's headline hparams (flat)."""

    def scalars(self, values: dict[str, float], step: int) -> None: ...

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        """``image``: a CHW uint8 tensor."""

    def finish(self, hparams: dict, final: dict) -> None:
        """At the end of a completed run: the final metrics, the best checkpoint path, the stop reason."""

    def close(self, status: str) -> None:
        """``status``: finished | killed | failed."""

    def where(self) -> str | None:
        """The file or folder it writes (named when a write fails: a full disk)."""
        return None


class TensorBoardLogger(Backend):
    """The writer (and TensorBoard's import, a second or more on a small CPU) comes at the first write, so
    that training does not wait for it to start; the config text is written then."""

    name = "tensorboard"

    def __init__(self, cfg: DictConfig, run_dir: Path, start_step: int):
        self.log_dir, self.start_step, self._writer, self._config = run_dir / cfg.dir, start_step, None, None

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # TensorBoard's import takes a second: at the first write

            # purge_step: events after the resumed step (written before a crash) are dropped on resume; those
            # at it (its training and validation values, logged before its checkpoint) stay, as in metrics.csv
            self._writer = SummaryWriter(str(self.log_dir), purge_step=self.start_step + 1 if self.start_step else None)
            if self._config is not None:
                self._writer.add_text("config", self._config, 0)
        return self._writer

    def where(self) -> str | None:
        file_writer = getattr(self._writer, "file_writer", None)  # its event file, once the writer started
        return str(getattr(getattr(file_writer, "event_writer", None), "_file_name", None) or self.log_dir)

    def config(self, config: dict, hparams: dict) -> None:
        self._config = "```\n" + OmegaConf.to_yaml(OmegaConf.create(config)) + "```"

    def scalars(self, values: dict[str, float], step: int) -> None:
        for k, v in _finite(values).items():
            self.writer.add_scalar(k, v, step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        self.writer.add_image(tag, image, step)

    def finish(self, hparams: dict, final: dict) -> None:
        """hparams with the final metrics in this run's own event file (TensorBoard's HPARAMS tab)."""
        from torch.utils.tensorboard.summary import hparams as hp_summary  # with the writer (above)

        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        metrics = {f"hparams/{k}": v for k, v in _finite(final).items()}
        fw = self.writer._get_file_writer()
        for s in hp_summary(clean, metrics):
            fw.add_summary(s)
        for k, v in metrics.items():
            self.writer.add_scalar(k, v)
        for key in ("best_checkpoint", "stop_reason"):
            if final.get(key):
                self.writer.add_text(key, str(final[key]))

    def close(self, status: str) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()


class CSVLogger(Backend):
    """``metrics.csv``: a ``step`` and a ``time`` column, then one column per key in the order first seen.
    A new key (the first validation's) rewrites the file once with the wider header; empty cells are blank."""

    name = "csv"

    def __init__(self, cfg: DictConfig, run_dir: Path, start_step: int):
        self.path = run_dir / cfg.filename
        self.columns, rows = ["step", "time"], []
        if self.path.is_file():  # a resumed run: keep the rows up to the resumed step; a new run starts over
            with self.path.open(newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or self.columns)
                rows = [
                    r for r in reader if start_step and r.get("step", "").isdigit() and int(r["step"]) <= start_step
                ]
        self._rewrite(rows)

    def where(self) -> str | None:
        return str(self.path)

    def _rewrite(self, rows: list[dict]) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.columns, restval="", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        atomic_write(self.path, buf.getvalue(), durable=False)

    def scalars(self, values: dict[str, float], step: int) -> None:
        row = {"step": step, "time": round(time.time(), 3), **_finite(values)}
        new = [k for k in row if k not in self.columns]
        if new:
            with self.path.open(newline="") as f:
                rows = list(csv.DictReader(f))
            self.columns += new
            self._rewrite(rows)
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns, restval="", lineterminator="\n").writerow(row)


def _read_ids(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def _ids(run_dir: Path, start_step: int) -> dict:
    """The W&B / MLflow run ids of this run dir when resuming (a new run starts new ones)."""
    return _read_ids(run_dir / IDS_FILE) if start_step else {}


def _save_id(run_dir: Path, backend: str, value: str) -> None:
    ids = _read_ids(run_dir / IDS_FILE)
    ids[backend] = value
    atomic_write(run_dir / IDS_FILE, json.dumps(ids, indent=2) + "\n", durable=False)


class WandbLogger(Backend):
    name = "wandb"

    def __init__(self, cfg: DictConfig, run_dir: Path, start_step: int):
        self.wandb = _import("wandb")
        name, group = run_names(run_dir)
        previous = _ids(run_dir, start_step).get("wandb")
        self.run = self.wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name or name,
            group=cfg.group or group,
            tags=list(cfg.tags) or None,
            mode=cfg.mode,
            dir=str(run_dir),
            id=previous,
            resume="allow" if previous else None,
        )
        _save_id(run_dir, "wandb", self.run.id)

    def config(self, config: dict, hparams: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(_finite(values), step=step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        self.run.log({tag: self.wandb.Image(image.permute(1, 2, 0).cpu().numpy())}, step=step)

    def finish(self, hparams: dict, final: dict) -> None:
        self.run.summary.update({k: v for k, v in final.items() if v is not None})

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "finished" else 1)


class MLflowLogger(Backend):
    name = "mlflow"

    def __init__(self, cfg: DictConfig, run_dir: Path, start_step: int):
        uri = cfg.tracking_uri or (run_dir / "mlruns").absolute().as_uri()
        if "://" not in uri and not uri.startswith(("file:", "databricks")):  # a path, as `mlflow ui` takes it
            uri = Path(uri).expanduser().absolute().as_uri()
        if uri.startswith("file:"):  # MLflow 3 keeps its file store behind this opt-in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        _import("mlflow")
        from mlflow.tracking import MlflowClient  # an optional package (segtrain[mlflow])

        self.client = MlflowClient(tracking_uri=uri)
        previous = _ids(run_dir, start_step).get("mlflow")
        self.start_step = start_step if previous else 0
        if previous:
            self.run_id = previous
            self.client.update_run(previous, status="RUNNING")
        else:
            exp = self.client.get_experiment_by_name(cfg.experiment)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(cfg.experiment)
            name, group = run_names(run_dir)
            tags = {"run_dir": str(run_dir.absolute()), **({"sweep": group} if group else {})}
            self.run_id = self.client.create_run(exp_id, run_name=cfg.run_name or name, tags=tags).info.run_id
            _save_id(run_dir, "mlflow", self.run_id)
        log.info("mlflow: run %s in %s", self.run_id, uri)

    def config(self, config: dict, hparams: dict) -> None:
        from mlflow.entities import Param  # an optional package (segtrain[mlflow])

        logged = self.client.get_run(self.run_id).data.params if self.start_step else {}  # params cannot change
        params = [Param(k, str(v)[:6000]) for k, v in _flatten(config).items() if k not in logged]
        for i in range(0, len(params), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        name = f"config-resumed-{self.start_step}.yaml" if self.start_step else "config.yaml"
        self.client.log_text(self.run_id, OmegaConf.to_yaml(OmegaConf.create(config)), name)

    def scalars(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric  # an optional package (segtrain[mlflow])

        now = int(time.time() * 1000)
        metrics = [Metric(_mlflow_key(k), v, now, step) for k, v in _finite(values).items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        self.client.log_image(self.run_id, image.permute(1, 2, 0).cpu().numpy(), key=_mlflow_key(tag), step=step)

    def finish(self, hparams: dict, final: dict) -> None:
        from mlflow.entities import Metric, RunTag  # an optional package (segtrain[mlflow])

        now = int(time.time() * 1000)
        metrics = [Metric(f"final/{_mlflow_key(k)}", v, now, 0) for k, v in _finite(final).items()]
        tags = [RunTag(k, str(v)) for k, v in final.items() if isinstance(v, str)]
        self.client.log_batch(self.run_id, metrics=metrics, tags=tags)

    def close(self, status: str) -> None:
        self.client.set_terminated(
            self.run_id, status={"finished": "FINISHED", "killed": "KILLED"}.get(status, "FAILED")
        )


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _mlflow_key(key: str) -> str:
    """MLflow keys allow letters, digits, ``_ - . space /``: anything else (class names) becomes ``_``."""
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in key)


BACKENDS: dict[str, type[Backend]] = {
    "tensorboard": TensorBoardLogger,
    "csv": CSVLogger,
    "wandb": WandbLogger,
    "mlflow": MLflowLogger,
}


class Loggers:
    """The backends ``cfg.logger`` switches on (none on ranks other than 0), called as one logger."""

    def __init__(self, cfg: DictConfig, run_dir: str | Path, enabled: bool = True, start_step: int = 0):
        self.backends: list[Backend] = []
        self.closed = False
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            for name, make in BACKENDS.items():
                if cfg.logger[name] is not None:
                    self.backends.append(make(cfg.logger[name], run_dir, start_step))
        except BaseException:  # the ones already started end too (a W&B or MLflow run would stay "running")
            self.close("failed")
            raise

    def __str__(self) -> str:
        return ", ".join(b.name for b in self.backends) or "none"

    def _call(self, method: str, *args) -> None:
        for b in list(self.backends):
            try:
                getattr(b, method)(*args)
            except Exception as e:  # noqa: BLE001 - a logger never stops training
                what = " ".join(str(e).split())[:200]
                if isinstance(e, OSError) and not e.filename and b.where():  # a full disk: say where
                    what += f" (writing {b.where()})"
                log.warning(
                    "logger %s failed (%s: %s); it is switched off for the rest of the run",
                    b.name,
                    type(e).__name__,
                    what,
                )
                self.backends.remove(b)
                if method != "close":  # its files flushed, its W&B / MLflow run marked failed
                    with contextlib.suppress(Exception):
                        b.close("failed")

    def config(self, cfg: DictConfig, hparams: dict) -> None:
        self._call("config", OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), hparams)

    def scalars(self, values: dict[str, float], step: int) -> None:
        self._call("scalars", values, step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        self._call("image", tag, image, step)

    def finish(self, hparams: dict, final: dict) -> None:
        self._call("finish", hparams, final)
        self.close("finished")

    def close(self, status: str = "failed") -> None:
        """Close every backend once (later calls do nothing): ``finished``, ``killed`` or ``failed``."""
        if not self.closed:
            self.closed = True
            self._call("close", status)
