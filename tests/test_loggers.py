"""The logger group (segtrain/loggers.py): each backend writes what it promises."""

import csv
import json
import struct
import sys

import pytest
import torch

from segtrain.build import build_trainer
from segtrain.config import validate
from segtrain.errors import ConfigError
from segtrain.loggers import Backend, Loggers
from tests.test_config import composed

TINY = ["debug=smoke", "device=cpu", "data.num_train=8", "data.num_val=4", "data.image_size=32", "data.batch_size=4",
        "model.base_channels=4", "trainer.max_iters=2", "trainer.val_interval=1", "trainer.num_vis=1",
        "trainer.progress=false"]  # fmt: skip


def wandb_records(run_dir):
    """The records of a W&B offline run file (LevelDB-log framing: 7-byte header, 32 KiB blocks of chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, block, buf = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def test_all_backends_in_one_run(tmp_path):
    """logger=[tensorboard,csv,wandb,mlflow]: every backend gets the config, the scalars, the final metrics and the
    best checkpoint path."""
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    cfg = composed(*TINY, "logger=[tensorboard,csv,wandb,mlflow]")
    validate(cfg)
    summary = build_trainer(cfg, tmp_path).fit()
    best_ckpt = str(tmp_path / "checkpoints" / "best.pt")
    assert summary["best_checkpoint"] == best_ckpt

    # TensorBoard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("val/mIoU")] == [1, 2] and "hparams/best_value" in acc.Tags()["scalars"]
    assert {"config/text_summary", "best_checkpoint/text_summary"} <= set(acc.Tags()["tensors"])

    # CSV
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [(r["step"], bool(r["train/loss"]), bool(r["val/mIoU"])) for r in rows] == [
        ("1", True, False), ("1", False, True), ("2", True, False), ("2", False, True)]  # fmt: skip

    # W&B, offline: config, history rows, summary
    records = list(wandb_records(tmp_path))
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == "segtrain" and run.display_name == tmp_path.name
    config = {u.key: json.loads(u.value_json) for r in records if r.HasField("config") for u in r.config.update}
    assert config["model"]["name"] == "unet" and config["trainer"]["max_iters"] == 2
    history = [
        {i.key or "/".join(i.nested_key): i.value_json for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    val = [h for h in history if "val/mIoU" in h]
    assert [int(h["_step"]) for h in val] == [1, 2] and any("train/loss" in h for h in history)
    assert any(k.startswith("val/input_gt_pred") for h in val for k in h)  # the image grid
    final = {u.key: json.loads(u.value_json) for r in records if r.HasField("summary") for u in r.summary.update}
    assert final["best_checkpoint"] == best_ckpt and final["best_value"] == pytest.approx(summary["best_value"])

    # MLflow file store: params, metrics per step, the config artifact, final metrics and tags
    (run_dir,) = [p.parent for p in (tmp_path / "mlruns").glob("*/*/meta.yaml") if p.parent.name != "mlruns"]
    assert (run_dir / "params" / "model.name").read_text() == "unet"
    assert (run_dir / "params" / "trainer.max_iters").read_text() == "2"
    lines = (run_dir / "metrics" / "val" / "mIoU").read_text().split("\n")
    assert [int(ln.split()[2]) for ln in lines if ln] == [1, 2]
    assert float((run_dir / "metrics" / "final" / "best_value").read_text().split()[1]) == pytest.approx(
        summary["best_value"]
    )
    assert (run_dir / "tags" / "best_checkpoint").read_text() == best_ckpt
    assert "name: unet" in (run_dir / "artifacts" / "config.yaml").read_text()
    assert "status: 3" in (run_dir / "meta.yaml").read_text()  # RunStatus.FINISHED
    ids = json.loads((tmp_path / "loggers.json").read_text())
    assert ids["mlflow"] == run_dir.name and run.run_id == ids["wandb"]


def test_csv_header_grows_and_resume_drops_later_rows(tmp_path):
    cfg = composed("logger=csv")
    lg = Loggers(cfg, tmp_path)
    lg.scalars({"train/loss": 1.0}, 1)
    lg.scalars({"train/loss": 0.5, "skip": float("nan")}, 2)
    lg.scalars({"val/mIoU": 0.25}, 2)
    lg.scalars({"train/loss": 0.4}, 3)
    lg.close()
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert list(rows[0]) == ["step", "time", "train/loss", "val/mIoU"]
    assert [(r["step"], r["train/loss"], r["val/mIoU"]) for r in rows] == [
        ("1", "1.0", ""), ("2", "0.5", ""), ("2", "", "0.25"), ("3", "0.4", "")]  # fmt: skip
    Loggers(cfg, tmp_path, start_step=2).close()  # resumed at step 2: step 3 is gone
    assert [r["step"] for r in csv.DictReader((tmp_path / "metrics.csv").open())] == ["1", "2", "2"]
    Loggers(cfg, tmp_path).close()  # a new run in the same dir starts over
    assert list(csv.DictReader((tmp_path / "metrics.csv").open())) == []


def test_tensorboard_resume_keeps_the_resumed_steps_events(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.summary.writer import event_file_writer

    # TensorBoard reads a dir's event files in name order: TIME.HOST.PID.N, N counting the writers of the process.
    # The two writers below start in one second and one process, as a resumed run never does; a count from 0 keeps
    # their names in the order they were made (after other writers in this process, ...9 then ...10 would not be).
    monkeypatch.setattr(event_file_writer, "_global_uid", event_file_writer.AtomicCounter(0))
    cfg = composed("logger=tensorboard")
    first = Loggers(cfg, tmp_path)
    for step, values in [
        (1, {"train/loss": 1.0}),
        (2, {"train/loss": 0.5}),
        (2, {"val/mIoU": 0.3}),
        (3, {"train/loss": 0.4}),
    ]:
        first.scalars(values, step)
    first.close("failed")  # crashed after step 3; last.pt is at step 2
    again = Loggers(cfg, tmp_path, start_step=2)
    again.scalars({"train/loss": 0.45}, 3)
    again.close("finished")
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, round(e.value, 4)) for e in acc.Scalars("train/loss")] == [(1, 1.0), (2, 0.5), (3, 0.45)]
    assert [e.step for e in acc.Scalars("val/mIoU")] == [2]


def test_mlflow_plain_path_tracking_uri(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # as in a fresh process
    store = tmp_path / "store"
    lg = Loggers(composed("logger=mlflow", f"logger.mlflow.tracking_uri={store}"), tmp_path / "run")
    lg.scalars({"train/loss": 1.0}, 1)
    lg.close("finished")
    assert [b.name for b in lg.backends] == ["mlflow"] and list(store.glob("*/*/metrics/train/loss"))


def test_mlflow_resume_continues_the_run(tmp_path):
    pytest.importorskip("mlflow")
    first = Loggers(composed("logger=mlflow"), tmp_path)
    first.config(composed("logger=mlflow", "trainer.stop_at=1"), {})
    first.scalars({"train/loss": 1.0}, 1)
    first.close("killed")
    again = Loggers(composed("logger=mlflow"), tmp_path, start_step=1)
    again.config(composed("logger=mlflow", "trainer.resume=auto"), {})  # changed params: MLflow refuses changes
    again.scalars({"train/loss": 0.5}, 2)
    again.close("finished")
    assert [b.name for b in again.backends] == ["mlflow"]  # not switched off by an error
    (run_id,) = {b.run_id for b in (*first.backends, *again.backends)}
    (run,) = tmp_path.glob(f"mlruns/*/{run_id}")
    assert [ln.split()[1:] for ln in (run / "metrics/train/loss").read_text().split("\n") if ln] == [
        ["1.0", "1"], ["0.5", "2"]]  # fmt: skip
    assert (run / "params/trainer.stop_at").read_text() == "1" and (run / "artifacts/config-resumed-1.yaml").is_file()
    assert "status: 3" in (run / "meta.yaml").read_text()  # FINISHED


@pytest.mark.parametrize("backend, module", [("wandb", "wandb"), ("mlflow", "mlflow")])
def test_missing_package_is_one_line_naming_the_extra(tmp_path, monkeypatch, backend, module):
    monkeypatch.setitem(sys.modules, module, None)  # import -> ImportError
    with pytest.raises(ConfigError, match=rf"logger={backend} needs the {module} package.*segtrain\[{backend}\]") as e:
        Loggers(composed(f"logger=[csv,{backend}]"), tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=rf"logger={backend} needs the {module} package"):
        validate(composed(f"logger=[csv,{backend}]"))  # found before the run starts anything


def test_a_backend_that_fails_to_start_closes_the_ones_started(tmp_path, monkeypatch):
    import segtrain.loggers as loggers

    closed = []

    class Started(Backend):
        name = "started"

        def __init__(self, cfg, run_dir, start_step):
            pass

        def close(self, status):
            closed.append(status)

    class Fails(Backend):
        def __init__(self, cfg, run_dir, start_step):
            raise ConfigError("cannot start")

    monkeypatch.setattr(loggers, "BACKENDS", {"tensorboard": Started, "csv": Fails})
    with pytest.raises(ConfigError, match="cannot start"):
        Loggers(composed("logger=[tensorboard,csv]"), tmp_path)
    assert closed == ["failed"]


def test_a_failing_backend_is_switched_off_with_a_warning(tmp_path, caplog):
    class Broken(Backend):
        name = "broken"
        closed = []

        def scalars(self, values, step):
            raise OSError("disk full")

        def close(self, status):
            self.closed.append(status)

    lg = Loggers(composed("logger=csv"), tmp_path)
    lg.backends.append(Broken())
    lg.scalars({"a": 1.0}, 1)
    lg.scalars({"a": 2.0}, 2)
    assert [b.name for b in lg.backends] == ["csv"]
    assert "logger broken failed (OSError: disk full)" in caplog.text
    assert Broken.closed == ["failed"]  # closed once, when switched off (its files flushed, its run failed)
    assert len(list(csv.DictReader((tmp_path / "metrics.csv").open()))) == 2
    lg.image("x", torch.zeros(3, 4, 4, dtype=torch.uint8), 2)
    lg.close()


def test_no_logger_and_other_ranks_write_nothing(tmp_path):
    assert Loggers(composed("logger=[]"), tmp_path).backends == []
    assert Loggers(composed("logger=[tensorboard,csv]"), tmp_path / "r1", enabled=False).backends == []
    assert not (tmp_path / "r1").exists()


def test_run_names_in_a_sweep(tmp_path, monkeypatch):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from segtrain.loggers import run_names

    assert run_names(tmp_path) == (tmp_path.name, None)
    hc = OmegaConf.create({"mode": RunMode.MULTIRUN, "job": {"num": 3, "override_dirname": "optimizer.lr=0.1"},
                           "sweep": {"dir": "multirun/2026-11-27/10-00-00"}})  # fmt: skip
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: hc))
    assert run_names(tmp_path) == ("3_optimizer.lr=0.1", "10-00-00")


def test_tensorboard_on_a_full_disk_is_switched_off_quietly_naming_its_file(tmp_path, monkeypatch, capfd, caplog):
    """TensorBoard's writer thread hits a full disk: no traceback on the console (the thread's goes into the
    log), the logger is switched off at its next call with a warning naming its event file, the others go on."""
    import errno
    import logging
    import threading
    import time

    from tensorboard.summary.writer import record_writer

    from segtrain import console

    monkeypatch.setattr(threading, "excepthook", threading.excepthook)  # put back after the test
    console.quiet_background_threads()
    handler = logging.FileHandler(tmp_path / "run.log")  # the run's log file (Hydra's, under the CLI)
    logging.getLogger().addHandler(handler)
    real_write = record_writer.RecordWriter.write

    def write(self, data):  # in the writer thread: the disk is full once images come
        if len(data) > 500:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, data)

    monkeypatch.setattr(record_writer.RecordWriter, "write", write)
    try:
        lg = Loggers(composed("logger=[tensorboard,csv]"), tmp_path)
        lg.scalars({"a": 1.0}, 1)
        lg.image("val/x", torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8), 1)
        for step in range(2, 200):  # until the thread's failure reaches a call
            lg.scalars({"a": float(step)}, step)
            if [b.name for b in lg.backends] == ["csv"]:
                break
            time.sleep(0.02)
        lg.close()
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    assert [b.name for b in lg.backends] == ["csv"]
    assert "Exception in thread" not in capfd.readouterr().err
    event_file = next((tmp_path / "tb").glob("events.out.tfevents.*"))
    warning = f"logger tensorboard failed (OSError: [Errno 28] No space left on device (writing {event_file}))"
    assert warning in caplog.text
    log = (tmp_path / "run.log").read_text()
    assert "background thread" in log and "Traceback" in log and warning in log
    assert len(list(csv.DictReader((tmp_path / "metrics.csv").open()))) >= 2  # csv went on
