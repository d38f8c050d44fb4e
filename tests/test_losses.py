"""Loss terms, sums, aux weighting and median-frequency class weights (segtrain/losses.py)."""

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import in_process
from fake_datasets import write_png
from omegaconf import OmegaConf

from segtrain.config import LossConfig
from segtrain.data.disk import DiskDataset
from segtrain.errors import ConfigError
from segtrain.losses.functions import (
    CrossEntropy,
    DiceLoss,
    FocalLoss,
    OhemCrossEntropy,
    SegLoss,
    auto_class_weights,
    build_loss,
    class_frequencies,
    median_frequency_weights,
)

IGNORE = 255


def loss_cfg(**kw):
    return OmegaConf.structured(LossConfig(**kw))


def batch(k=3, n=2, size=32, seed=0, ignore_frac=0.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, size, size, generator=g) * 2
    target = torch.randint(0, k, (n, size, size), generator=g)
    if ignore_frac:
        target[torch.rand(n, size, size, generator=g) < ignore_frac] = IGNORE
    return logits.requires_grad_(), target


def true_class_prob(logits, target):
    t = torch.where(target == IGNORE, 0, target)
    return F.softmax(logits.float(), 1).gather(1, t.unsqueeze(1)).squeeze(1)


# --- ce ---------------------------------------------------------------------------------


def test_ce_matches_torch_with_weights_and_smoothing():
    logits, target = batch(ignore_frac=0.2)
    w = torch.tensor([0.5, 2.0, 1.0])
    got = CrossEntropy(IGNORE, w, 0.1)(logits, target)
    want = F.cross_entropy(logits, target, weight=w, ignore_index=IGNORE, label_smoothing=0.1)
    torch.testing.assert_close(got, want)


# --- ohem -------------------------------------------------------------------------------


def test_ohem_thresh_one_min_kept_zero_is_ce():
    logits, target = batch(ignore_frac=0.1)
    w = torch.tensor([1.0, 3.0, 0.5])
    got = OhemCrossEntropy(IGNORE, w, 0.05, thresh=1.0, min_kept=0)(logits, target)
    want = F.cross_entropy(logits, target, weight=w, ignore_index=IGNORE, label_smoothing=0.05)
    torch.testing.assert_close(got, want)


def easy_batch():
    """Every pixel confidently right (p_t > 0.9), with distinct margins."""
    n, k, s = 1, 3, 8
    target = torch.arange(s * s).reshape(1, s, s) % k
    margin = 3.0 + torch.arange(s * s, dtype=torch.float32).reshape(1, s, s) * 0.05
    logits = torch.zeros(n, k, s, s)
    logits.scatter_(1, target.unsqueeze(1), margin.unsqueeze(1))
    return logits.requires_grad_(), target


def test_ohem_keeps_exactly_min_kept_hardest_when_all_easy():
    logits, target = easy_batch()
    p = true_class_prob(logits, target).flatten()
    assert p.min() > 0.7  # all easy: the threshold alone would keep nothing
    min_kept = 10
    ohem = OhemCrossEntropy(IGNORE, thresh=0.7, min_kept=min_kept)
    kept = ohem.kept(logits, target).flatten()
    hardest = p.argsort()[:min_kept]
    assert kept.sum() == min_kept and kept[hardest].all()
    want = (-p[hardest].log()).mean()  # hand computation: mean NLL of the min_kept lowest true-class probabilities
    torch.testing.assert_close(ohem(logits, target), want)


def test_ohem_threshold_wins_when_enough_hard_pixels():
    logits, target = batch(seed=1)
    p = true_class_prob(logits, target)
    ohem = OhemCrossEntropy(IGNORE, thresh=0.6, min_kept=5)
    hard = p < 0.6
    assert hard.sum() > 5
    assert torch.equal(ohem.kept(logits, target), hard)
    torch.testing.assert_close(ohem(logits, target), (-p[hard].log()).mean())


def test_ohem_with_class_weights_and_smoothing_is_weighted_ce_over_the_kept_pixels():
    logits, target = batch(seed=3, ignore_frac=0.2)
    w, eps = torch.tensor([0.5, 2.0, 1.0, 3.0])[: logits.shape[1]], 0.1
    ohem = OhemCrossEntropy(IGNORE, weight=w, label_smoothing=eps, thresh=0.6, min_kept=5)
    kept = ohem.kept(logits, target)
    assert 5 <= kept.sum() < (target != IGNORE).sum()  # the threshold path, not every pixel
    want = F.cross_entropy(
        logits, torch.where(kept, target, IGNORE), weight=w, ignore_index=IGNORE, label_smoothing=eps
    )
    torch.testing.assert_close(ohem(logits, target), want)
    # min_kept beyond the labelled pixels: all but the easiest one (the sorted index is clamped)
    every = OhemCrossEntropy(IGNORE, thresh=0.01, min_kept=10**6).kept(logits, target)
    assert every.sum() == (target != IGNORE).sum() - 1


def test_ohem_skips_ignored_pixels():
    logits, target = batch(seed=2, ignore_frac=0.3)
    ignored = target == IGNORE
    ohem = OhemCrossEntropy(IGNORE, thresh=0.7, min_kept=50)
    kept = ohem.kept(logits, target)
    assert not (kept & ignored).any() and kept.sum() >= 50
    # anything at the ignored pixels (here: very wrong logits) leaves the loss unchanged
    other = logits.detach().clone()
    other[ignored.unsqueeze(1).expand_as(other)] = 0.0
    other[:, 0][ignored] = -50.0
    torch.testing.assert_close(ohem(logits, target), ohem(other, target))
    p = true_class_prob(logits, target)
    torch.testing.assert_close(ohem(logits, target), (-p[kept].log()).mean())


# --- dice -------------------------------------------------------------------------------


def test_dice_perfect_and_inverse():
    _, target = batch(k=3)
    onehot = F.one_hot(target, 3).permute(0, 3, 1, 2).float()
    perfect, inverse = 20 * (2 * onehot - 1), -20 * (2 * onehot - 1)
    dice = DiceLoss(IGNORE, smooth=1.0)
    assert dice(perfect, target).item() < 1e-3
    assert dice(inverse, target).item() > 0.99


def test_dice_matches_one_hot_formula_with_ignore_and_weights():
    logits, target = batch(k=4, ignore_frac=0.25, seed=3)
    w = torch.tensor([1.0, 2.0, 0.5, 1.0])
    valid = (target != IGNORE).unsqueeze(1).float()
    p = F.softmax(logits, 1) * valid
    y = F.one_hot(torch.where(target == IGNORE, 0, target), 4).permute(0, 3, 1, 2).float() * valid
    d = (2 * (p * y).sum((0, 2, 3)) + 0.5) / (p.sum((0, 2, 3)) + y.sum((0, 2, 3)) + 0.5)
    torch.testing.assert_close(DiceLoss(IGNORE, w, 0.5)(logits, target), 1 - (w * d).sum() / w.sum())


def test_dice_absent_class_no_nan_with_zero_smooth():
    _, target = batch(k=2)  # only classes 0, 1 in the target
    onehot = F.one_hot(target, 4).permute(0, 3, 1, 2).float()
    logits = (200 * (2 * onehot - 1)).requires_grad_()  # classes 2, 3: probability exactly 0 in float32
    loss = DiceLoss(IGNORE, smooth=0.0)(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() < 1e-4 and torch.isfinite(logits.grad).all()


# --- focal ------------------------------------------------------------------------------


def test_focal_gamma_zero_is_ce():
    logits, target = batch(ignore_frac=0.2, seed=4)
    w = torch.tensor([2.0, 1.0, 0.25])
    torch.testing.assert_close(
        FocalLoss(IGNORE, gamma=0.0)(logits, target), F.cross_entropy(logits, target, ignore_index=IGNORE)
    )
    torch.testing.assert_close(
        FocalLoss(IGNORE, w, gamma=0.0)(logits, target), F.cross_entropy(logits, target, weight=w, ignore_index=IGNORE)
    )


def test_focal_formula():
    logits, target = batch(ignore_frac=0.2, seed=5)
    p = true_class_prob(logits, target)
    valid = target != IGNORE
    want = (-0.25 * (1 - p[valid]) ** 2 * p[valid].log()).mean()
    torch.testing.assert_close(FocalLoss(IGNORE, gamma=2.0, alpha=0.25)(logits, target), want)


# --- all-ignore batches -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["ce", "ohem", "dice", "focal", "ce+dice", "ohem+dice+focal"])
@pytest.mark.parametrize("weighted", [False, True])
def test_all_ignore_batch_is_finite_zero_with_graph(name, weighted):
    cfg = loss_cfg(name=name, class_weights=[1.0, 2.0, 0.5] if weighted else None, ohem_min_kept=10)
    crit = build_loss(cfg, 3, IGNORE)
    logits = torch.randn(2, 3, 32, 32, requires_grad=True)
    target = torch.full((2, 32, 32), IGNORE)
    loss = crit({"out": logits, "aux": logits * 2}, target)
    assert torch.isfinite(loss) and loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name", ["ce", "ohem", "dice", "focal"])
def test_terms_backward_finite_and_bf16_input(name):
    logits, target = batch(ignore_frac=0.1, seed=6)
    loss = build_loss(loss_cfg(name=name, focal_gamma=0.5), 3, IGNORE)(logits.bfloat16(), target)
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


# --- sums and aux -----------------------------------------------------------------------


def test_weighted_sum_equals_hand_sum():
    logits, target = batch(ignore_frac=0.1, seed=7)
    cfg = loss_cfg(name="ce+dice", weights={"ce": 0.5, "dice": 3.0}, label_smoothing=0.1, dice_smooth=2.0)
    got = build_loss(cfg, 3, IGNORE)(logits, target)
    want = 0.5 * CrossEntropy(IGNORE, None, 0.1)(logits, target) + 3.0 * DiceLoss(IGNORE, None, 2.0)(logits, target)
    torch.testing.assert_close(got, want)
    # an unlisted term defaults to weight 1
    got = build_loss(loss_cfg(name="ohem+focal", weights={"focal": 2.0}, ohem_min_kept=20), 3, IGNORE)(logits, target)
    want = OhemCrossEntropy(IGNORE, min_kept=20)(logits, target) + 2.0 * FocalLoss(IGNORE)(logits, target)
    torch.testing.assert_close(got, want)


def test_aux_weighting():
    out, target = batch(seed=8)
    aux, _ = batch(seed=9)
    crit = build_loss(loss_cfg(name="ce+dice", aux_weight=0.3), 3, IGNORE)
    assert isinstance(crit, SegLoss)
    base = build_loss(loss_cfg(name="ce+dice"), 3, IGNORE).criterion
    torch.testing.assert_close(crit({"out": out, "aux": aux}, target), base(out, target) + 0.3 * base(aux, target))
    torch.testing.assert_close(crit({"out": out}, target), base(out, target))
    torch.testing.assert_close(crit(out, target), base(out, target))
    no_aux = build_loss(loss_cfg(name="ce", aux_weight=0.0), 3, IGNORE)
    torch.testing.assert_close(no_aux({"out": out, "aux": aux}, target), F.cross_entropy(out, target))


def test_single_ce_is_still_cross_entropy():
    crit = build_loss(loss_cfg(name="ce"), 3, IGNORE)
    assert isinstance(crit.criterion, CrossEntropy)


@pytest.mark.parametrize(
    "kw, expect",
    [
        (dict(name="tversky"), "'tversky'"),
        (dict(name="ce+lovasz"), "'lovasz'"),
        (dict(name="ce", weights={"dice": 1.0}), "'dice'"),
    ],
)
def test_unknown_term_is_config_error(kw, expect):
    with pytest.raises(ConfigError) as e:
        build_loss(loss_cfg(**kw), 3, IGNORE)
    msg = str(e.value)
    assert "\n" not in msg and expect in msg and "ce, ohem, dice, focal" in msg


def test_class_weights_auto_needs_the_training_set():
    with pytest.raises(ConfigError, match="auto"):
        build_loss(loss_cfg(name="ce", class_weights="auto"), 3, IGNORE)


# --- median-frequency class weights -----------------------------------------------------

MASKS = [
    np.array([[0, 0], [1, 255]], np.uint8),  # 3 labelled: 0 x2, 1 x1
    np.array([[0, 2], [2, 2]], np.uint8),  # 4 labelled: 0 x1, 2 x3
    np.array([[1, 1], [1, 1]], np.uint8),  # 4 labelled: 1 x4
]
# counts 3, 5, 3, 0; totals (labelled pixels of the images containing c): 3+4, 3+4, 4, 0
# freq 3/7, 5/7, 3/4; median 5/7 -> weights 5/3, 1, 20/21; class 3 never appears -> 1.0
WANT_COUNTS, WANT_TOTALS = [3, 5, 3, 0], [7, 7, 4, 0]
WANT_WEIGHTS = [5 / 3, 1.0, 20 / 21, 1.0]


class FakeSet:
    """Only ``load`` (like SegDataset); ``__getitem__`` would augment and must not be used."""

    def __init__(self, masks):
        self.masks = masks

    def __len__(self):
        return len(self.masks)

    def load(self, i):
        return np.zeros((*self.masks[i].shape, 3), np.uint8), self.masks[i]

    def __getitem__(self, i):
        raise AssertionError("class_frequencies must not use the augmented __getitem__")


def test_median_frequency_weights_by_hand(caplog):
    counts, totals = class_frequencies(FakeSet(MASKS), 4, IGNORE, workers=2)
    assert counts.tolist() == WANT_COUNTS and totals.tolist() == WANT_TOTALS
    torch.testing.assert_close(median_frequency_weights(counts, totals), torch.tensor(WANT_WEIGHTS))
    with caplog.at_level(logging.INFO, logger="segtrain"):
        weights = auto_class_weights(FakeSet(MASKS), 4, IGNORE)
    crit = build_loss(loss_cfg(name="ce+dice", class_weights=weights), 4, IGNORE)
    for term in crit.criterion.terms.values():
        torch.testing.assert_close(term.weight, torch.tensor(WANT_WEIGHTS))
    assert "never appear" in caplog.text and "[3]" in caplog.text and "0:1.667" in caplog.text


def test_median_frequency_even_count_uses_middle_mean():
    w = median_frequency_weights(np.array([1, 2, 3, 4]), np.array([10, 10, 10, 10]))
    torch.testing.assert_close(w, torch.tensor([2.5, 1.25, 2.5 / 3, 0.625]))


def test_class_frequencies_reads_disk_masks_without_images(tmp_path):
    masks = []
    for i, m in enumerate(MASKS):
        masks.append(tmp_path / f"m{i}.png")
        write_png(masks[-1], m)
    images = [tmp_path / f"missing{i}.jpg" for i in range(len(MASKS))]  # never decoded
    ds = DiskDataset(images, masks, ["a", "b", "c", "d"], np.zeros((4, 3), np.uint8))
    counts, totals = class_frequencies(ds, 4, IGNORE)
    assert counts.tolist() == WANT_COUNTS and totals.tolist() == WANT_TOTALS
    # the data set's lookup table (data.label_map) is honoured: 2 -> 255 (ignored)
    lut = np.arange(256, dtype=np.uint8)
    lut[2] = 255
    ds = DiskDataset(images, masks, ["a", "b", "c", "d"], np.zeros((4, 3), np.uint8), lut=lut)
    counts, totals = class_frequencies(ds, 4, IGNORE)
    assert counts.tolist() == [3, 5, 0, 0] and totals.tolist() == [4, 7, 0, 0]


# --- end to end -------------------------------------------------------------------------


# segtrain's entry point in this process (test_cli.in_process: the command's code, without its start-up)


def test_cli_ce_dice_smoke(tmp_path):
    args = ["debug=smoke", "loss=ce_dice", "trainer.num_vis=0", "trainer.max_epochs=1", "hydra.run.dir=run"]
    proc = in_process(args, tmp_path)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["step"] == 4 and 0.0 <= metrics["last_miou"] <= 1.0


def test_cli_unknown_term_is_one_line(tmp_path):
    proc = in_process(["debug=smoke", "loss.name=ce+lovasz", "hydra.run.dir=run"], tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("segtrain: error:") and "ce, ohem, dice, focal" in lines[0]


def test_cli_ohem_auto_class_weights(tmp_path):
    args = ["debug=smoke", "loss=ohem", "loss.class_weights=auto", "loss.ohem_min_kept=1000", "trainer.num_vis=0",
            "trainer.max_epochs=1", "hydra.run.dir=run"]  # fmt: skip
    proc = in_process(args, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run" / "metrics.json").is_file()
    assert "median frequency" in proc.stdout + proc.stderr


# --- one sigmoid logit (data.num_classes=1) -----------------------------------------------------


def test_bce_is_torch_bce_over_labelled_pixels_with_class_weights():
    logits, target = batch(k=1, ignore_frac=0.2)
    target = torch.where(target == IGNORE, target, torch.randint(0, 2, target.shape, generator=torch.Generator()))
    valid = target != IGNORE
    z, y = logits[:, 0][valid], target[valid].float()
    crit = build_loss(loss_cfg(name="bce"), 1, IGNORE)
    torch.testing.assert_close(crit(logits, target), F.binary_cross_entropy_with_logits(z, y))
    weighted = build_loss(loss_cfg(name="bce", class_weights=[0.5, 2.0]), 1, IGNORE)
    w = torch.where(y == 1, 2.0, 0.5)
    expect = (F.binary_cross_entropy_with_logits(z, y, reduction="none") * w).sum() / w.sum()
    torch.testing.assert_close(weighted(logits, target), expect)
    with pytest.raises(ValueError, match="one logit"):
        crit(torch.randn(1, 2, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))


def test_binary_dice_is_the_foreground_soft_dice_and_sums_with_bce():
    logits, target = batch(k=1, ignore_frac=0.2)
    target = torch.where(target == IGNORE, target, (torch.rand(target.shape) < 0.3).long())
    valid = target != IGNORE
    p, y = torch.sigmoid(logits[:, 0])[valid], (target[valid] == 1).float()
    expect = 1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)
    torch.testing.assert_close(build_loss(loss_cfg(name="dice"), 1, IGNORE)(logits, target), expect)
    total = build_loss(loss_cfg(name="bce+dice", weights={"dice": 3.0}), 1, IGNORE)(logits, target)
    torch.testing.assert_close(total, F.binary_cross_entropy_with_logits(logits[:, 0][valid], y) + 3 * expect)
    total.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[:, 0][~valid].abs().max() == 0


def test_binary_class_weights_auto_count_two_classes(tmp_path):
    for i in range(2):
        mask = np.zeros((8, 8), np.uint8)
        mask[: 2 + 2 * i] = 1
        write_png(tmp_path / f"m{i}.png", mask)
    ds = DiskDataset([tmp_path / "m0.png", tmp_path / "m1.png"], [tmp_path / "m0.png", tmp_path / "m1.png"], [], None)
    crit = build_loss(loss_cfg(name="bce", class_weights=auto_class_weights(ds, 2, IGNORE)), 1, IGNORE)
    w = crit.criterion.weight
    assert w.shape == (2,) and w[1] > 1 > w[0]  # the rarer foreground weighs more
