"""segtrain-eval (segtrain.evaluate): whole / sliding-window / multi-scale+flip evaluation of a checkpoint and its
one-line errors (as a subprocess), and the scale rule and the computed ``auto`` values taken from the checkpoint's
stored config (in-process through its Hydra entry point)."""

import json
import logging
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import console_script, in_process, run_cli
from fake_datasets import write_voc
from test_config import composed

from segtrain.config import validate


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGTRAIN_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    torch.set_num_threads(threads)
    for handler in set(root.handlers) - set(handlers):  # Hydra's job logging (eval.log in the run dir): a later
        handler.close()  # test in this process must not find it (tests/test_console.py names the log file)
    root.handlers[:], root.level = handlers, level


def segtrain_eval(tmp_path, name: str, *args: str) -> dict:
    """``segtrain-eval ARGS`` in this process: its metrics.json."""
    out = tmp_path / name
    argv = [*args, f"hydra.run.dir={out}", "trainer.progress=false", "device=cpu"]
    proc = in_process(argv, tmp_path, "segtrain-eval")
    assert proc.returncode == 0, proc
    return json.loads((out / "metrics.json").read_text())


def test_eval_validates_at_the_checkpoints_training_scale(tmp_path):
    from segtrain.build import build_trainer

    write_voc(tmp_path / "voc", n_train=4, n_val=2)
    cfg = composed(
        "data=voc", f"data.root={tmp_path / 'voc'}", "data.base_size=auto", "data.mean=auto", "data.crop_size=32",
        "data.batch_size=2", "data.num_workers=0", "model.base_channels=4", "trainer.max_iters=2",
        "trainer.val_interval=2", "trainer.progress=false", "device=cpu",
    )  # fmt: skip
    validate(cfg)
    summary = build_trainer(cfg, tmp_path / "run").fit()
    ckpt = tmp_path / "run" / "checkpoints" / "best.pt"

    m = segtrain_eval(tmp_path, "eval", f"ckpt={ckpt}")
    assert m["val_scale"] == [56, 76]  # the median training size, from the checkpoint (no auto left there)
    assert m["miou"] == pytest.approx(summary["best_miou"], abs=1e-6)  # the same scale as validation in training

    m = segtrain_eval(tmp_path, "eval_val_size", f"ckpt={ckpt}", "data.val_size=40")
    assert m["val_scale"] == 40  # an explicit data.val_size wins
    m = segtrain_eval(tmp_path, "eval_auto", f"ckpt={ckpt}", "data.mean=auto", "data.base_size=auto")
    assert m["val_scale"] == [56, 76] and m["miou"] == pytest.approx(summary["best_miou"], abs=1e-6)


# ---------------------------------------------------------------------------
# segtrain-eval on the checkpoint of a tiny training run: as a subprocess (the command a user types), and in this
# process through the same entry point (the other modes; each process start costs seconds).


def _eval_exe() -> list[str]:
    return console_script("segtrain-eval")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The best checkpoint of a tiny ``debug=smoke`` run (a U-Net, base_channels 4, 2 steps), trained in this
    process; cuDNN's autotuner off: on CUDA, validation and segtrain-eval then run the same kernels (the same last
    bits)."""
    from segtrain.build import build_trainer

    run = tmp_path_factory.mktemp("train") / "run"
    args = ("debug=smoke", "trainer.max_iters=2", "trainer.progress=false", "trainer.num_vis=0",
            "model.base_channels=4", "device.cudnn_benchmark=false")  # fmt: skip
    build_trainer(composed(*args), run).fit()
    return run / "checkpoints" / "best.pt"


def _evaluate(
    ckpt: Path, tmp_path: Path, name: str, *args: str, in_this_process: bool = False
) -> tuple[subprocess.CompletedProcess, dict]:
    """``segtrain-eval ckpt=CKPT ARGS``: as a subprocess, or in this process (:func:`conftest.in_process`)."""
    argv = [f"ckpt={ckpt}", f"hydra.run.dir={name}", "trainer.progress=false", *args]
    if not in_this_process:
        proc = run_cli(argv, tmp_path, exe=_eval_exe())
    else:
        proc = in_process(argv, tmp_path, "segtrain-eval")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / name
    assert (out / "confusion_matrix.png").stat().st_size > 500
    import cv2

    assert cv2.imread(str(out / "confusion_matrix.png")) is not None
    return proc, json.loads((out / "metrics.json").read_text())


def test_eval_modes(trained, tmp_path):
    """Whole, covering slide, small slide in this process (the same threads as the training run: bit-equal
    comparisons); the multi-scale + flip run through the command a user types."""
    proc, whole = _evaluate(trained, tmp_path, "whole", in_this_process=True)
    assert "mean" in proc.stdout and "IoU" in proc.stdout  # the per-class table
    assert {"miou", "aacc", "macc", "per_class_iou"} <= set(whole)
    assert whole["eval"]["mode"] == "whole" and whole["num_images"] == 8
    trained_metrics = json.loads((trained.parents[1] / "metrics.json").read_text())
    assert whole["miou"] == pytest.approx(trained_metrics["best_miou"], abs=1e-3)

    _, covering = _evaluate(trained, tmp_path, "cover", "eval.mode=slide", "eval.crop_size=64", in_this_process=True)
    assert covering["miou"] == pytest.approx(whole["miou"], abs=1e-9)
    assert covering["confusion_matrix"] == whole["confusion_matrix"]

    _, small = _evaluate(trained, tmp_path, "small", "eval.mode=slide", "eval.crop_size=32", "eval.stride=16",
                         in_this_process=True)  # fmt: skip
    assert small["eval"]["crop_size"] == 32 and 0 <= small["miou"] <= 1

    proc, tta = _evaluate(trained, tmp_path, "tta", "eval.scales=[0.75,1.0,1.25]", "eval.flip=true")
    assert "mean" in proc.stdout and "IoU" in proc.stdout
    assert tta["eval"]["flip"] and tta["eval"]["scales"] == [0.75, 1.0, 1.25] and 0 <= tta["miou"] <= 1
    assert sum(map(sum, tta["confusion_matrix"])) == sum(map(sum, whole["confusion_matrix"]))


def test_eval_errors_are_one_line(trained, tmp_path):
    missing = run_cli(["ckpt=/nonexistent/best.pt"], tmp_path, exe=_eval_exe())
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert "ckpt=/nonexistent/best.pt: no such file" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
    no_ckpt = run_cli([], tmp_path, exe=_eval_exe())
    assert no_ckpt.returncode != 0 and "ckpt" in no_ckpt.stderr and "Traceback" not in no_ckpt.stderr
    model = run_cli([f"ckpt={trained}", "model.base_channels=4"], tmp_path, exe=_eval_exe())
    assert model.returncode != 0 and "from the checkpoint" in model.stderr


def test_a_split_that_is_not_there_is_refused_not_replaced(tmp_path):
    """data.val_split naming no split: refused with the splits there, never the hold-out in its place."""
    from fake_datasets import data_cfg, write_folder

    from segtrain.data.folder import splits
    from segtrain.errors import DataError

    flat, lists = tmp_path / "flat", tmp_path / "lists"
    write_folder(flat, n=4)
    write_folder(lists, layout="lists", n=4)
    with pytest.raises(DataError, match="data.val_split=nonexistent: .* has no split nonexistent .* nor any other"):
        splits(flat, data_cfg("folder", flat, val_split="nonexistent"), train=False)
    with pytest.raises(DataError, match="data.train_split=all: "):
        splits(flat, data_cfg("folder", flat, train_split="all"))
    with pytest.raises(DataError, match=r"nonexistent.txt is missing; the split lists there: train, val \(expected"):
        splits(lists, data_cfg("folder", lists, val_split="nonexistent"), train=False)
    assert len(splits(flat, data_cfg("folder", flat), train=False)[1][0]) == 1  # the default names: the hold-out
