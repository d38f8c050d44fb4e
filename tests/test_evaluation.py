"""Binary masks with one sigmoid logit: training learns, validation thresholds at eval.threshold and reports the
foreground IoU beside the two-row table (segtrain.evaluation, with the trainer and the bce+dice loss)."""

import json

import numpy as np
import pytest
import torch
from fake_datasets import write_squares
from test_config import composed

from segtrain.config import validate
from segtrain.evaluation import class_names, evaluate_loader
from segtrain.runtime import BatchToDevice

pytestmark = pytest.mark.usefixtures("one_thread", "own_cache")


def test_sigmoid_training_learns_a_square(tmp_path):
    from segtrain.build import build_trainer

    write_squares(tmp_path / "squares", n=40, size=32)
    cfg = composed(
        "data=folder", f"data.root={tmp_path / 'squares'}", "data.num_classes=1", "loss=bce_dice",
        "data.in_channels=1", "data.mean=auto", "data.crop_size=32", "data.batch_size=8", "data.num_workers=0",
        "data.val_fraction=0.2", "model.base_channels=8", "optimizer.lr=0.01", "trainer.max_iters=40",
        "trainer.val_interval=40", "trainer.progress=false", "device=cpu",
    )  # fmt: skip
    validate(cfg)
    trainer = build_trainer(cfg, tmp_path / "run")
    assert trainer.model.classifier.out_channels == 1 and trainer.class_names == ["background", "foreground"]
    summary = trainer.fit()
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(m["per_class_iou"]) == {"background", "foreground"} and m["fg_iou"] == summary["fg_iou"]
    assert m["fg_iou"] == m["per_class_iou"]["foreground"] and m["history"][-1]["fg_iou"] == m["fg_iou"]
    # chance (all foreground) is ~0.12 here; 40 steps find the squares
    assert m["fg_iou"] > 0.5, m

    # the Predictor follows: one logit -> a 0/1 mask, two probability planes (background, foreground)
    from segtrain.predict import Predictor

    p = Predictor.from_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", device="cpu")
    image = trainer.val_loader.dataset.read_image(0)
    mask, probs = p(image), p.probabilities(image)
    assert mask.shape == image.shape[:2] and set(np.unique(mask)) <= {0, 1} and mask.any()
    assert probs.shape == (2, *image.shape[:2]) and np.allclose(probs.sum(0), 1, atol=1e-5)
    assert np.array_equal(mask, (probs[1] > 0.5).astype(mask.dtype))

    # eval.threshold moves the mask: a high threshold keeps fewer foreground pixels
    trainer.model.eval()
    counts = []
    for threshold in (0.05, 0.95):
        cfg.eval.threshold = threshold
        _, cm, _ = evaluate_loader(
            trainer.model, trainer.val_loader, trainer.batch_to_device, torch.no_grad, cfg, trainer.class_names
        )
        counts.append(int(cm.mat[:, 1].sum()))
    assert counts[0] > counts[1]


def test_binary_class_names_and_one_channel_scores():
    class Empty:
        class_names: list = []

    assert class_names(Empty(), 1) == ["background", "foreground"]
    assert class_names(Empty(), 1, ["sky", "cloud"]) == ["sky", "cloud"]
    assert class_names(Empty(), 3) == ["0", "1", "2"]

    cfg = composed("data.num_classes=1", "loss=bce_dice")
    batches = [(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), torch.tensor([[[0, 1, 1, 255]] * 4]))]
    model = torch.nn.Conv2d(3, 1, 1)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.constant_(model.bias, 3.0)  # sigmoid 0.95 everywhere: all foreground
    m, cm, _ = evaluate_loader(model, batches, BatchToDevice(torch.device("cpu"), cfg.data.mean, cfg.data.std),
                               torch.no_grad, cfg, ["background", "foreground"])  # fmt: skip
    assert cm.mat.tolist() == [[0, 4], [0, 8]] and m["fg_iou"] == pytest.approx(8 / 12)
    cfg.eval.threshold = 0.96
    m, cm, _ = evaluate_loader(model, batches, BatchToDevice(torch.device("cpu"), cfg.data.mean, cfg.data.std),
                               torch.no_grad, cfg, ["background", "foreground"])  # fmt: skip
    assert cm.mat.tolist() == [[4, 0], [8, 0]] and m["fg_iou"] == 0


def test_val_loss_is_the_same_whatever_the_batch_size():
    """The loss is weighted by images: a short last batch (or a smaller DDP shard) does not count more."""
    cfg = composed("data.num_classes=3")
    torch.manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    masks = torch.randint(0, 3, (3, 8, 8))
    model = torch.nn.Conv2d(3, 3, 1)
    criterion = torch.nn.CrossEntropyLoss(ignore_index=255)
    to_device = BatchToDevice(torch.device("cpu"), cfg.data.mean, cfg.data.std)
    losses = []
    for b in (1, 2, 3):
        batches = [(images[i : i + b], masks[i : i + b]) for i in range(0, 3, b)]
        m, _, _ = evaluate_loader(model, batches, to_device, torch.no_grad, cfg, ["a", "b", "c"], criterion=criterion)
        losses.append(m["loss"])
    with torch.no_grad():
        whole = criterion(model(to_device(images, masks)[0]), masks).item()
    assert losses == pytest.approx([whole] * 3, rel=1e-6)
