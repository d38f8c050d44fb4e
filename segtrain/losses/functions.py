"""Losses.  ``build_loss(cfg.loss, num_classes, ignore_index)`` returns a
:class:`SegLoss` that takes the network output (logits, or ``{"out", "aux"}``)
and the target, and returns the weighted total.

Every term maps ``logits [N, K, H, W]`` and ``target [N, H, W]`` (int64) to a
scalar, computed in float32.  Pixels equal to ``ignore_index`` contribute
nothing; a batch with no labelled pixel gives a finite 0 that still has a
gradient graph (backward works and yields zero gradients).  Below ``p`` is
``softmax(logits)``, ``t`` a pixel's target, ``w`` the class weights
(``loss.class_weights``; all 1 when unset), ``V`` the labelled pixels.

``ce``
    ``sum_{i in V} w_t_i * l_i / sum_{i in V} w_t_i`` with
    ``l_i = -(1 - e) log p_i,t - (e / K) sum_c (w_c / w_t) log p_i,c`` (``e`` =
    ``loss.label_smoothing``): exactly ``F.cross_entropy`` with ``weight``,
    ``ignore_index`` and ``label_smoothing``.
``ohem``
    Online hard example mining (as mmsegmentation's ``OHEMPixelSampler`` with a
    threshold): the ``ce`` per-pixel loss, averaged (class-weighted, as ``ce``)
    over the kept pixels ``{i in V : p_i,t < thr}`` where
    ``thr = max(ohem_thresh, q)`` and ``q`` is the ``(ohem_min_kept + 1)``-th
    lowest ``p_i,t`` of the batch (the largest one when fewer pixels are
    labelled), so at least the ``ohem_min_kept`` hardest pixels are kept.
    ``ohem_min_kept`` counts pixels per batch (mmseg: per image);
    ``ohem_thresh=1`` keeps every labelled pixel (plain ``ce``).
``dice``
    Soft multi-class Dice over the whole batch:
    ``D_c = (2 sum_V p_c y_c + s) / (sum_V p_c + sum_V y_c + s)`` with ``y`` the
    one-hot target and ``s`` = ``loss.dice_smooth``;
    ``loss = 1 - sum_c w_c D_c / sum_c w_c``.  A class with
    ``sum_V p_c + sum_V y_c = 0`` (absent from target and prediction) has
    ``D_c = 1``, also with ``s = 0``.
``focal``
    Focal loss (Lin et al., 2017) on the softmax:
    ``sum_{i in V} w_t_i * (-a (1 - p_i,t)^g log p_i,t) / sum_{i in V} w_t_i``
    (``g`` = ``loss.focal_gamma``, ``a`` = ``loss.focal_alpha`` or 1): the
    class-weighted mean over labelled pixels, normalised like ``ce`` so that
    ``g = 0`` gives ``ce`` (without label smoothing) exactly.

``bce``
    One sigmoid logit per pixel (``data.num_classes=1``; masks hold 0 background, 1 foreground):
    ``sum_{i in V} w_t_i * BCE(sigmoid(z_i), t_i) / sum_{i in V} w_t_i``, ``w`` the two class weights
    (background, foreground) when set; exactly ``F.binary_cross_entropy_with_logits`` averaged over ``V``.
    With one logit ``dice`` is the soft Dice of the foreground:
    ``1 - (2 sum_V p y + s) / (sum_V p + sum_V y + s)`` with ``p = sigmoid(z)`` (smp's binary mode); the class
    weights do not enter it (one class's Dice has nothing to weigh): in ``bce+dice`` they weigh the ``bce``.

``loss.name`` is one term or a sum such as ``ce+dice`` (one logit: ``bce+dice``):
``sum_term loss.weights[term] * term`` (weight 1 for each term not listed).
With an auxiliary head the total is ``L(out) + aux_weight * L(aux)`` for the
same combined ``L``.

``loss.class_weights: auto`` uses median-frequency balancing (Eigen & Fergus,
2015) on the training masks: see :func:`median_frequency_weights`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from segtrain.errors import ConfigError, DataError
from segtrain.losses import TERMS, parse_terms

log = logging.getLogger("segtrain")


def _zero_safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` where ``den > 0``, else ``num`` (0 when nothing was summed); no NaN in value or gradient."""
    return num / torch.where(den > 0, den, torch.ones_like(den))


def _pixel_weights(target: torch.Tensor, valid: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Per-pixel ``w_t`` (0 at ignored pixels), float32."""
    if weight is None:
        return valid.float()
    return weight.float()[torch.where(valid, target, 0)] * valid


class CrossEntropy(nn.Module):
    """Pixel-wise cross entropy with ignore_index, class weights and label smoothing."""

    def __init__(self, ignore_index: int = 255, weight: torch.Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.ignore_index, self.label_smoothing = ignore_index, label_smoothing
        self.register_buffer("weight", weight, persistent=False)

    def pixel_losses(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``[N, H, W]`` per-pixel losses (already multiplied by ``w_t``; 0 at ignored pixels)."""
        return F.cross_entropy(
            logits.float(),
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            reduction="none",
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = target != self.ignore_index
        return _zero_safe_div(self.pixel_losses(logits, target).sum(), _pixel_weights(target, valid, self.weight).sum())


class OhemCrossEntropy(CrossEntropy):
    """Cross entropy averaged over the hard pixels only (see the module docstring)."""

    def __init__(
        self,
        ignore_index: int = 255,
        weight: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
        thresh: float = 0.7,
        min_kept: int = 100000,
    ):
        super().__init__(ignore_index, weight, label_smoothing)
        self.thresh, self.min_kept = float(thresh), int(min_kept)

    @torch.no_grad()
    def kept(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``[N, H, W]`` bool mask of the pixels that enter the loss."""
        valid = target != self.ignore_index
        if self.thresh >= 1.0:
            return valid
        prob = F.softmax(logits.float(), dim=1).gather(1, torch.where(valid, target, 0).unsqueeze(1)).squeeze(1)
        valid_prob = prob[valid]
        if valid_prob.numel() == 0:
            return valid
        threshold = torch.clamp_min(valid_prob.sort().values[min(self.min_kept, valid_prob.numel() - 1)], self.thresh)
        return valid & (prob < threshold)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        kept = self.kept(logits, target)
        losses = self.pixel_losses(logits, target) * kept
        return _zero_safe_div(losses.sum(), _pixel_weights(target, kept, self.weight).sum())


class DiceLoss(nn.Module):
    """``1 - (class-weighted) mean soft Dice`` over the batch (see the module docstring)."""

    def __init__(self, ignore_index: int = 255, weight: torch.Tensor | None = None, smooth: float = 1.0):
        super().__init__()
        self.ignore_index, self.smooth = ignore_index, float(smooth)
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        num_classes = logits.shape[1]
        valid = target != self.ignore_index
        if num_classes == 1:  # one sigmoid logit: the foreground's Dice
            p = torch.sigmoid(logits[:, 0].float()) * valid
            y = (target == 1) & valid
            inter, den = (p * y).sum(), p.sum() + y.sum() + self.smooth
            return 1 - torch.where(den > 0, _zero_safe_div(2 * inter + self.smooth, den), torch.ones_like(den))
        logp = F.log_softmax(logits.float(), dim=1)
        # per-class sums without a [N, K, H, W] one-hot: p_t scattered onto its class (on CUDA, index_add's
        # atomics add in any order: bitwise repeatable only under trainer.deterministic)
        p_t = torch.exp(-F.nll_loss(logp, target, ignore_index=self.ignore_index, reduction="none")) * valid
        t = torch.where(valid, target, 0).flatten()
        inter = logp.new_zeros(num_classes).index_add_(0, t, p_t.flatten())
        target_sum = logp.new_zeros(num_classes).index_add_(0, t, valid.flatten().float())
        prob_sum = torch.einsum("nkhw,nhw->k", logp.exp(), valid.to(logp.dtype))
        den = prob_sum + target_sum + self.smooth
        dice = torch.where(den > 0, _zero_safe_div(2 * inter + self.smooth, den), torch.ones_like(den))
        if self.weight is None:
            return 1 - dice.mean()
        w = self.weight.float()
        return 1 - _zero_safe_div((w * dice).sum(), w.sum())


class FocalLoss(nn.Module):
    """``-a (1 - p_t)^g log p_t``, class-weighted mean over labelled pixels (see the module docstring)."""

    def __init__(
        self,
        ignore_index: int = 255,
        weight: torch.Tensor | None = None,
        gamma: float = 2.0,
        alpha: float | None = None,
    ):
        super().__init__()
        self.ignore_index, self.gamma, self.alpha = ignore_index, float(gamma), alpha
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = target != self.ignore_index
        losses = F.cross_entropy(logits.float(), target, ignore_index=self.ignore_index, reduction="none")  # -log p_t
        if self.gamma != 0:
            # 1 - p_t via expm1 (accurate near p_t = 1); the floor keeps the gradient of x**g finite for g < 1
            losses = losses * (-torch.expm1(-losses)).clamp_min(1e-12) ** self.gamma
        if self.alpha is not None:
            losses = losses * self.alpha
        pw = _pixel_weights(target, valid, self.weight)
        return _zero_safe_div((losses * pw).sum(), pw.sum())


class BinaryCrossEntropy(nn.Module):
    """One sigmoid logit per pixel against a 0/1 mask, class-weighted mean over labelled pixels."""

    def __init__(self, ignore_index: int = 255, weight: torch.Tensor | None = None):
        super().__init__()
        self.ignore_index = ignore_index
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] != 1:
            raise ValueError(f"bce takes one logit per pixel (data.num_classes=1), got {logits.shape[1]} channels")
        valid = target != self.ignore_index
        losses = F.binary_cross_entropy_with_logits(logits[:, 0].float(), (target == 1).float(), reduction="none")
        pw = _pixel_weights(target.clamp(0, 1), valid, self.weight)
        return _zero_safe_div((losses * pw).sum(), pw.sum())


class WeightedSum(nn.Module):
    """``sum_k weights[k] * terms[k](logits, target)``."""

    def __init__(self, terms: dict[str, nn.Module], weights: dict[str, float]):
        super().__init__()
        self.terms = nn.ModuleDict(terms)
        self.weights = {k: float(weights.get(k, 1.0)) for k in terms}

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = None
        for name, term in self.terms.items():
            value = self.weights[name] * term(logits, target)
            total = value if total is None else total + value
        return total


class SegLoss(nn.Module):
    """``criterion(out) + aux_weight * criterion(aux)``."""

    def __init__(self, criterion: nn.Module, aux_weight: float = 0.4):
        super().__init__()
        self.criterion, self.aux_weight = criterion, aux_weight

    def forward(self, output, target: torch.Tensor) -> torch.Tensor:
        if isinstance(output, dict):
            loss = self.criterion(output["out"], target)
            if "aux" in output and self.aux_weight > 0:
                loss = loss + self.aux_weight * self.criterion(output["aux"], target)
            return loss
        return self.criterion(output, target)


# ---------------------------------------------------------------------------
# Median-frequency class weights.


def _mask_reader(dataset: Any) -> Callable[[int], Any]:
    """A function index -> HxW mask, without augmentation (and without decoding the image when possible)."""
    if hasattr(dataset, "read_mask"):
        return dataset.read_mask
    return lambda i: dataset.load(i)[1]


def class_frequencies(
    dataset: Any, num_classes: int, ignore_index: int, workers: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Count labels over the un-augmented masks of ``dataset``.

    Returns ``(pixel_counts, image_pixel_totals)``, both int64 ``[num_classes]``:
    ``pixel_counts[c]`` is the number of pixels of class ``c``;
    ``image_pixel_totals[c]`` the number of labelled pixels (classes ``0..K-1``,
    not ``ignore_index``) of the images in which ``c`` appears.  Values outside
    ``0..K-1`` are not counted.  Masks come from ``dataset.read_mask(i)`` when the
    data set has it (:class:`segtrain.data.disk.DiskDataset`: no image decode),
    else ``dataset.load(i)[1]``; ``data.label_map`` is already applied by both.
    ``workers``: threads (default ``min(8, cpu_count)``).
    """
    read = _mask_reader(dataset)

    def one(i: int) -> np.ndarray:
        mask = np.asarray(read(i)).ravel()
        keep = (mask >= 0) & (mask < num_classes)
        if 0 <= ignore_index < num_classes:
            keep &= mask != ignore_index
        return np.bincount(mask[keep].astype(np.int64), minlength=num_classes)

    counts = np.zeros(num_classes, np.int64)
    totals = np.zeros(num_classes, np.int64)
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for bc in pool.map(one, range(len(dataset))):
            counts += bc
            totals += np.where(bc > 0, bc.sum(), 0)
    return counts, totals


def median_frequency_weights(counts: Any, totals: Any) -> torch.Tensor:
    """Median-frequency balancing (Eigen & Fergus, 2015): ``w_c = median(f) / f_c`` with
    ``f_c = counts[c] / totals[c]`` (see :func:`class_frequencies`), the median taken over
    the classes that appear.

    A class that never appears (``counts[c] == 0``) gets weight **1.0**: its
    frequency is undefined, its weight never multiplies a training pixel
    (``ce``/``ohem``/``focal``), and 1.0 -- the weight of a class of median
    frequency -- keeps it as an ordinary class in ``dice``'s class average and in
    the validation loss instead of silently dropping it (weight 0) or letting an
    arbitrary large value dominate.  :func:`build_loss` logs a warning naming
    such classes.  Returns float32 ``[K]``; raises ``DataError`` when no class
    appears at all.
    """
    counts = torch.as_tensor(np.asarray(counts), dtype=torch.float64)
    totals = torch.as_tensor(np.asarray(totals), dtype=torch.float64)
    present = counts > 0
    if not bool(present.any()):
        raise DataError("loss.class_weights=auto: the training masks have no labelled pixel")
    freq = torch.where(present, counts / totals.clamp_min(1), torch.ones_like(counts))
    median = torch.quantile(freq[present], 0.5)  # the mean of the two middle values for an even count (np.median)
    weights = torch.where(present, median / freq, torch.ones_like(freq))
    return weights.float()


def auto_class_weights(train_set: Any, num_classes: int, ignore_index: int) -> list[float]:
    """``loss.class_weights=auto``: median-frequency weights from the un-augmented training masks (logged)."""
    counts, totals = class_frequencies(train_set, num_classes, ignore_index)
    weights = median_frequency_weights(counts, totals)
    absent = [c for c in range(num_classes) if counts[c] == 0 and c != ignore_index]
    if absent:
        log.warning("loss.class_weights=auto: classes %s never appear in the training masks; weight 1.0", absent)
    log.info(
        "loss.class_weights=auto (median frequency): %s",
        " ".join(f"{c}:{w:.4g}" for c, w in enumerate(weights.tolist())),
    )
    return weights.tolist()


# ---------------------------------------------------------------------------


def _class_weights(cfg: DictConfig) -> torch.Tensor | None:
    """``loss.class_weights`` (validated by segtrain.config) as a tensor."""
    cw = cfg.class_weights
    if cw is None:
        return None
    if cw == "auto":
        raise ConfigError(
            "loss.class_weights=auto is computed from the training masks: resolve it first "
            "(segtrain.build.build_run does; or auto_class_weights(train_set, ...))"
        )
    return torch.tensor([float(w) for w in cw], dtype=torch.float32)


def build_loss(cfg: DictConfig, num_classes: int, ignore_index: int) -> SegLoss:
    """The criterion of ``cfg`` (the ``loss`` config, ``class_weights`` as numbers: :func:`auto_class_weights`
    computes them for ``auto``).  ``num_classes=1``: one sigmoid logit (``bce``, ``dice``); class weights then
    have two values (background, foreground)."""
    terms = parse_terms(cfg.name)
    weights = dict(cfg.weights or {})
    extra = [k for k in weights if k not in terms]
    if extra:
        raise ConfigError(
            f"loss.weights has {', '.join(map(repr, extra))}, not a term of loss.name={cfg.name!r}; "
            f"valid terms: {', '.join(TERMS)}"
        )
    weight = _class_weights(cfg)

    def make(term: str) -> nn.Module:
        w = None if weight is None else weight.clone()
        if term == "bce":
            return BinaryCrossEntropy(ignore_index, w)
        if term == "ce":
            return CrossEntropy(ignore_index, w, cfg.label_smoothing)
        if term == "ohem":
            return OhemCrossEntropy(ignore_index, w, cfg.label_smoothing, cfg.ohem_thresh, cfg.ohem_min_kept)
        if term == "dice":
            return DiceLoss(ignore_index, w, cfg.dice_smooth)
        return FocalLoss(ignore_index, w, cfg.focal_gamma, cfg.focal_alpha)

    if len(terms) == 1 and float(weights.get(terms[0], 1.0)) == 1.0:
        criterion = make(terms[0])
    else:
        criterion = WeightedSum({t: make(t) for t in terms}, weights)
    return SegLoss(criterion, cfg.aux_weight)
