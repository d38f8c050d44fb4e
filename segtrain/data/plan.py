"""The plan: every data-dependent setting the user left unset, derived from the fingerprint by stated rules.

``make_plan(fingerprint, cfg.data, cfg.loss, cfg.model, user_set, device_info, cfg_trainer=cfg.trainer)``
returns a :class:`Plan`: one :class:`Setting` per key (the value the run uses, what the rule gives, where
the value comes from and why), and warnings.  ``Plan.apply(cfg)`` returns a new config with the planned
values; it never changes its input.  The rules (one sentence each; docs/own-data.md, "The plan"):

* **Explicit settings win**: a key in ``user_set`` (the command line, an ``experiment=``/``debug=`` recipe, a
  data config of your own) is used as given; the plan records what it would have chosen, and why.
* **Layout recipes**: a built-in layout's recipe (``configs/data/{voc,voc_aug,cityscapes,ade20k}.yaml``:
  scale, crop, validation scale, batch; no class weights) is kept whole while its ``base_size`` rescales
  the median training image by 0.5x-2x (the pictures it was made for); ``data=synthetic`` keeps its own.
* ``data.num_classes`` (``data=folder``): the classes ``classes.yaml`` / ``data.class_names`` lists, else the
  largest mask value + 1; masks holding only 0 and 255 get ``data.label_map={255: 1}`` (two classes).
* ``loss.name``: ``bce+dice`` for one sigmoid logit (``data.num_classes=1``); a soft Dice term added
  (``ce`` -> ``ce+dice``, nnU-Net's loss) when the most frequent class has more than 10 times the pixels of
  the rarest one present in the training masks.
* ``data.base_size``: the training images' median short and long side (every image fitted into that box).
* ``data.crop_size``: the median training image at the training scale, each side rounded down to a multiple
  of 8, at least 32 and at most 512 (nnU-Net: the patch is the median image).
* ``data.val_size``: null (validate at ``base_size``, the centre of the training scale) while
  ``data.scale_range`` is centred on 1, else the centre's short side.
* ``data.batch_size``: the layout's batch times the 512x512 crops one crop's area fits (at most 16), halved
  while it exceeds half the training images or its estimated training memory exceeds 80% of the
  accelerator's memory.
* ``trainer.max_iters``: ``trainer.max_epochs`` (12) epochs, raised to 1,000 or lowered to 40,000 iterations
  when outside that range (then ``trainer.val_interval`` keeps 12 validations per run).
* ``data.mean`` / ``data.std``: ImageNet's for 3-band 8-bit images whose every band spans at least a quarter
  of 0..255 (p0.5..p99.5; photos, what pretrained networks expect), else the data's own per-band statistics.
* **Signal guard**: a band whose normalised standard deviation is under 0.1, or under 4 steps of the autocast
  type (bf16: 2^-7 relative) at its normalised value, gets the data's own statistics when normalisation is
  unset, and a warning naming ``data.mean=auto`` when it was set.
* ``loss.class_weights``: none (measured: median-frequency weights lowered the rare class's IoU of a 95/5 set
  where the Dice term raised it); with a loss you chose without Dice on classes imbalanced over 10x, the reason
  says so.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from segtrain.config import IMAGENET_MEAN, IMAGENET_STD
from segtrain.data import mask_classes
from segtrain.data.transforms import scale_factor
from segtrain.models.build import build_model
from segtrain.runtime import resolve_device
from segtrain.utils import as_hw, as_size

log = logging.getLogger("segtrain")

PLAN_VERSION = 1
RECIPE_LAYOUTS = ("voc", "voc_aug", "cityscapes", "ade20k")  # configs/data/NAME.yaml hold a published recipe
RECIPE_FIT = (0.5, 2.0)  # a recipe is kept while its base_size rescales the median training image by this much
CROP_MAX, CROP_MIN, CROP_STEP = 512, 32, 8
REFERENCE_CROP_AREA = 512 * 512  # the layouts' batch is for 512x512 crops
MAX_BATCH = 16
MEMORY_SHARE = 0.8  # of the accelerator's memory the estimated training memory may take
MIN_ITERS, MAX_ITERS = 1000, 40000
EPOCHS = 12  # the schema's trainer.max_epochs
PHOTO_RANGE = 0.25  # 8-bit RGB bands spanning at least this share of 0..255 (p0.5..p99.5) are photos
TINY_SIGNAL = 0.1  # a normalised band with a smaller standard deviation hardly varies
PRECISION_STEPS = 4  # ... nor does one that spans fewer steps of the autocast type than this
MANTISSA_BITS = {"bf16": 7, "fp16": 10, "fp32": 23}
IMBALANCE = 10.0  # most / rarest class pixels above which the loss gets a Dice term
HALF_PRECISION_FACTOR = 0.6  # autocast keeps most saved activations in 16 bits
BACKWARD_FACTOR = 1.5  # gradients of the activations and workspaces on top of the saved activations


@dataclass
class Setting:
    """One planned key: ``value`` is what the run uses, ``planned`` what the rule gives, ``source`` where the
    value comes from (``plan``; ``user``: explicit; ``layout``: the layout's recipe kept), ``reason`` why."""

    key: str
    value: Any
    planned: Any
    source: str
    reason: str

    def line(self) -> str:
        if self.source == "user" and not _same(self.value, self.planned):
            return f"{self.key}={shown(self.value)} (yours; the plan would use {shown(self.planned)}: {self.reason})"
        who = {"user": "yours, as planned: ", "layout": "the layout's: "}.get(self.source, "")
        return f"{self.key}={shown(self.value)} ({who}{self.reason})"


@dataclass
class Plan:
    """The planned settings (by key) and the warnings; see the module doc."""

    settings: dict[str, Setting] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    fingerprint_key: str | None = None
    version: int = PLAN_VERSION

    def values(self) -> dict[str, Any]:
        """{key: value} of the settings the plan fills (source ``plan``): what :meth:`apply` writes."""
        return {k: s.value for k, s in self.settings.items() if s.source == "plan"}

    def disagreements(self) -> list[Setting]:
        """The explicit settings that differ from what the plan would choose."""
        return [s for s in self.settings.values() if s.source == "user" and not _same(s.value, s.planned)]

    def apply(self, cfg: DictConfig) -> DictConfig:
        """A new config: ``cfg`` with :meth:`values` written in (``cfg`` itself is not changed)."""
        out = copy.deepcopy(cfg)
        for key, value in self.values().items():
            if OmegaConf.select(out, key.rsplit(".", 1)[0]) is not None:
                OmegaConf.update(out, key, value, merge=False)
        return out

    def lines(self) -> list[str]:
        """One line per setting (``plan: KEY=VALUE (reason)``), then the warnings."""
        return [f"plan: {s.line()}" for s in self.settings.values()] + [f"plan warning: {w}" for w in self.warnings]

    def log(self, logger: logging.Logger = log) -> None:
        for s in self.settings.values():
            logger.info("plan: %s", s.line())
        for w in self.warnings:
            logger.warning("%s", w)

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "fingerprint_key": self.fingerprint_key,
            "settings": {k: asdict(s) for k, s in self.settings.items()},
            "warnings": list(self.warnings),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        d = json.loads(text)
        settings = {k: Setting(**s) for k, s in d["settings"].items()}
        return cls(settings, list(d["warnings"]), d.get("fingerprint_key"), d.get("version", PLAN_VERSION))


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _same(a: Any, b: Any) -> bool:
    a, b = _plain(a), _plain(b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-12)
    if isinstance(a, dict) and isinstance(b, dict):
        return {str(k): v for k, v in a.items()} == {str(k): v for k, v in b.items()}
    return a == b


def percent(share: float) -> str:
    """``share`` (0..1) in percent: whole numbers from 10 %, two significant digits below."""
    return f"{100 * share:.0f}%" if share >= 0.1 else f"{100 * share:.2g}%"


def shown(value: Any) -> str:
    """A value as a command-line override would give it (floats to 4 significant digits)."""
    value = _plain(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(shown(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {shown(v)}" for k, v in value.items()) + "}"
    return "null" if value is None else str(value)


# ---------------------------------------------------------------------------
# Which keys are explicit.


def _explicit(user_set: set[str], *keys: str) -> bool:
    return any(k == u or k.startswith(u + ".") or u.startswith(k + ".") for k in keys for u in user_set)


# ---------------------------------------------------------------------------
# The signal guard.


def autocast_step(value: float, precision: str) -> float:
    """The spacing of the autocast type's numbers at ``value`` (bf16: 2^-7 relative, fp16: 2^-10)."""
    bits = MANTISSA_BITS.get(precision, 23)
    if value <= 0:
        return 0.0
    return 2.0 ** (math.floor(math.log2(value)) - bits)


def signal_problems(
    mean_data: list[float], std_data: list[float], mean_used: list[float], std_used: list[float], precision: str
) -> list[str]:
    """What normalising by ``mean_used`` / ``std_used`` leaves of each band of statistics ``mean_data`` /
    ``std_data`` (all in data.mean's units), when it hardly varies (normalised standard deviation under
    0.1) or varies by fewer than 4 steps of the ``precision`` type at its value; bands that are constant in
    the data are not reported (no normalisation can help them)."""
    out = []
    for b, (m, s, mu, su) in enumerate(zip(mean_data, std_data, mean_used, std_used)):
        if not s > 0 or not su > 0:
            continue
        mn, sn = (m - mu) / su, s / su
        step = autocast_step(abs(mn) + sn, precision)
        if sn < TINY_SIGNAL:
            out.append(f"band {b} at {mn:.2f} ± {sn:.2g} after normalisation (a tiny variation)")
        elif precision != "fp32" and sn < PRECISION_STEPS * step:
            out.append(
                f"band {b} at {mn:.2f} ± {sn:.2g} after normalisation, below {precision}'s resolution ({step:.2g} there)"
            )
    return out


# ---------------------------------------------------------------------------
# The device and the network's memory.


def network_cost(cfg_model: DictConfig, in_channels: int = 3, num_classes: int = 2, size: int = 128) -> dict:
    """``bytes_per_pixel``: the bytes of the tensors autograd saves in one training forward pass, per input
    pixel and image (fp32; measured on the CPU at ``size`` x ``size``, two images, parameters excluded);
    ``param_bytes``: the fp32 parameters."""

    cfg = OmegaConf.create(OmegaConf.to_container(cfg_model, resolve=True))
    cfg.pretrained, cfg.init_from = False, None
    model = build_model(cfg, num_classes, in_channels).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.zeros(2, in_channels, size, size))
    return {
        "bytes_per_pixel": sum(seen.values()) / (2 * size * size),
        "param_bytes": sum(p.numel() * 4 for p in model.parameters()),
    }


def describe_device(
    cfg_device: DictConfig, cfg_model: DictConfig | None = None, in_channels: int = 3, num_classes: int = 2
) -> dict:
    """What :func:`make_plan` needs of the machine: ``type``, ``precision`` (autocast: fp16, bf16, fp32),
    ``name``, ``memory_bytes`` (the accelerator's; None on the CPU) and, on an accelerator with
    ``cfg_model``, the network's :func:`network_cost`."""

    device, precision = resolve_device(cfg_device)
    info: dict[str, Any] = {"type": device.type, "precision": precision, "name": str(device), "memory_bytes": None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_bytes=int(props.total_memory))
        if cfg_model is not None:
            info.update(network_cost(cfg_model, in_channels, mask_classes(num_classes)))
    return info


def training_memory(batch: int, crop_hw: tuple[int, int], device_info: dict) -> float | None:
    """Estimated bytes a training step takes: ``batch`` x crop pixels x the network's bytes per pixel (x 0.6 in
    fp16/bf16, x 1.5 for the backward pass) + 4 x the parameters (weights, gradients, two optimizer moments);
    None without a measured network."""
    bpp = device_info.get("bytes_per_pixel")
    if not bpp:
        return None
    factor = HALF_PRECISION_FACTOR if device_info.get("precision") in ("fp16", "bf16") else 1.0
    return batch * crop_hw[0] * crop_hw[1] * bpp * factor * BACKWARD_FACTOR + 4 * device_info.get("param_bytes", 0)


# ---------------------------------------------------------------------------
# The rules.


def _scale_factor(h: float, w: float, size: Any) -> float:

    return scale_factor(h, w, size)


def _hw_value(hw: tuple[int, int]) -> int | list[int]:
    return hw[0] if hw[0] == hw[1] else [int(hw[0]), int(hw[1])]


class _Planner:
    """Applies the rules in order; each rule reads the settings decided before it."""

    def __init__(self, fp: dict, cfg: DictConfig, user_set: set[str], device: dict):
        self.fp, self.cfg, self.user_set, self.device = fp, cfg, set(user_set), dict(device or {})
        self.plan = Plan(fingerprint_key=fp.get("key"))
        d = cfg.data
        self.layout = str(d.name)
        splits = fp["splits"]
        self.train = splits.get("train") or splits["val"]
        self.n_train = int(self.train["images"])
        sizes = self.train.get("sizes")
        self.median_hw = tuple(sizes["median_hw"]) if sizes else None
        self.short_long = tuple(sizes["median_short_long"]) if sizes else None
        self.generated = self.layout == "synthetic"
        self.recipe_fits, self.recipe_note = self._recipe()
        self.remap: dict[int, int] = {}  # a planned data.label_map, to read the fingerprint's mask values by

    # -- bookkeeping -----------------------------------------------------------------------------

    def current(self, key: str) -> Any:
        return _plain(OmegaConf.select(self.cfg, key))

    def explicit(self, *keys: str) -> bool:
        return _explicit(self.user_set, *keys)

    def decide(self, key: str, planned: Any, reason: str, pair: tuple[str, ...] = (), layout: bool = False) -> Any:
        """Record ``key``: the user's value if explicit (or ``pair`` is), the layout's if ``layout``, else ``planned``."""
        planned = _plain(planned)
        if self.explicit(key, *pair):
            value, source = self.current(key), "user"
        elif layout:
            value, source = self.current(key), "layout"
        else:
            value, source = planned, "plan"
        self.plan.settings[key] = Setting(key, value, planned, source, reason)
        return value

    # -- the layout's recipe ------------------------------------------------------------------------

    def _recipe(self) -> tuple[bool, str]:
        if self.generated:
            return True, "data=synthetic draws its pictures at data.image_size: its config is kept"
        if self.layout not in RECIPE_LAYOUTS or self.median_hw is None:
            return False, ""
        base, crop = self.current("data.base_size"), self.current("data.crop_size")
        h, w = self.median_hw
        if base in (None, "auto"):  # yours: the recipe fits while its crop is at most twice the median image
            ch, cw = as_hw(crop, "data.crop_size") if crop is not None else (0, 0)
            fits = ch <= 2 * h and cw <= 2 * w
            how = "at most" if fits else "more than"
            return (
                fits,
                f"the {self.layout} recipe's data.crop_size={shown(crop)} is {how} twice the median image ({h}x{w} px)",
            )
        factor = _scale_factor(h, w, as_size(base, "data.base_size"))
        lo, hi = RECIPE_FIT
        fits = lo <= factor <= hi
        how = "within" if fits else "outside"
        note = (
            f"the {self.layout} recipe's data.base_size={shown(base)} rescales the median training image ({h}x{w} "
            f"px) {factor:.2f}x, {how} {lo:g}-{hi:g}x"
        )
        return fits, note

    # -- classes and loss -------------------------------------------------------------------------

    def values(self) -> dict[int, dict]:
        """The training masks' values (after a planned ``data.label_map``): pixels, images, objects."""
        out: dict[int, dict] = {}
        for v, e in self.train["masks"]["values"].items():
            c = self.remap.get(int(v), int(v))
            out[c] = e if c not in out else {"pixels": out[c]["pixels"] + e["pixels"]}
        return out

    def classes(self) -> int:
        d = self.cfg.data
        if self.layout != "folder":
            return int(d.num_classes)
        ignore = int(d.ignore_index)
        present = set(self.values())
        for split in self.fp["splits"].values():
            present |= {int(v) for v in split["masks"]["values"]}
        if present == {0, 255} and ignore == 255:
            why = "every mask holds only 0 and 255: 255 is the foreground, class 1"
            if self.decide("data.label_map", {255: 1}, why) == {255: 1}:
                self.remap = {255: 1}
        present = {self.remap.get(v, v) for v in present}
        declared = self.fp.get("declared_classes")
        labels = sorted(v for v in present if v != ignore)
        if declared:
            planned, why = declared, f"the {declared} classes classes.yaml (or data.class_names) lists"
        else:
            planned = max(2, (labels[-1] + 1) if labels else 2)
            why = f"the masks hold values {labels[:12]}{' ...' if len(labels) > 12 else ''} (ignore {ignore} aside)"
        if self.current("data.num_classes") == 1 and planned == 2:  # one sigmoid logit is the other way for two
            planned, why = 1, why + "; data.num_classes=1: one sigmoid logit for the two"
        return int(self.decide("data.num_classes", planned, why))

    def imbalance(self, k: int) -> tuple[float, str] | None:
        """(pixels of the most frequent / of the rarest class present in the training masks, that in words);
        None when fewer than two classes appear."""
        vals, ignore = self.values(), int(self.cfg.data.ignore_index)
        counts = {c: vals[c]["pixels"] for c in range(mask_classes(k)) if c in vals and c != ignore}
        if len(counts) < 2:
            return None
        top, rare = max(counts, key=counts.get), min(counts, key=counts.get)
        total = sum(counts.values())
        ratio = counts[top] / counts[rare]
        what = (
            f"the most frequent class ({top}: {percent(counts[top] / total)} of the labelled pixels) has {ratio:.1f}x "
            f"the pixels of the rarest ({rare}: {percent(counts[rare] / total)})"
        )
        return ratio, what

    def loss(self, k: int) -> str:
        name = str(self.current("loss.name"))
        if k == 1:
            reason = "data.num_classes=1 trains one sigmoid logit: binary cross entropy + the foreground's soft Dice"
            return str(self.decide("loss.name", "bce+dice", reason))
        found = None if self.recipe_fits else self.imbalance(k)
        if found is None:
            return name
        ratio, what = found
        terms = [t.strip() for t in name.split("+")]
        if ratio > IMBALANCE and "dice" not in terms:
            planned = "+".join([*terms, "dice"]) if set(terms) <= {"ce", "ohem", "focal"} else name
            why = f"{what}, more than {IMBALANCE:g}x: a soft Dice term (nnU-Net's ce+dice) weighs the classes equally"
        else:
            planned, why = name, f"{what}" + (f", within {IMBALANCE:g}x" if ratio <= IMBALANCE else "")
        return str(self.decide("loss.name", planned, why))

    def class_weights(self, k: int, loss_name: str) -> None:
        terms = [t.strip() for t in loss_name.split("+")]
        key = "loss.class_weights"
        if self.recipe_fits:
            self.decide(key, None, f"none: {self.recipe_note}", layout=True)
        elif k == 1 or "dice" in terms:
            self.decide(key, None, f"none: loss.name={loss_name} has a Dice term, which weighs the classes equally")
        else:
            found = self.imbalance(k)
            if found is not None and found[0] > IMBALANCE:
                why = (
                    f"none: {found[1]}, but median-frequency weights lowered the rare class's IoU where a Dice term "
                    "raised it (docs/own-data.md#the-plan): use loss=ce_dice"
                )
            else:
                why = "none: " + (found[1] + f", within {IMBALANCE:g}x" if found else "fewer than two classes appear")
            self.decide(key, None, why)

    # -- scale, crop, batch, iterations ------------------------------------------------------------------

    def scale(self) -> Any:
        if self.generated or self.median_hw is None:
            return None
        (h, w), (short, long) = self.median_hw, self.short_long
        s = self.train["sizes"]["short"]
        reason = f"the training images' median short and long sides (median image {h}x{w}, short sides {s['min']:g}-{s['max']:g} px)"
        if self.recipe_fits:
            return self.decide("data.base_size", [short, long], self.recipe_note, layout=True)
        if self.recipe_note:
            reason += f"; {self.recipe_note}"
        return self.decide("data.base_size", [short, long], reason)

    def train_scale(self, base: Any) -> tuple[float, float]:
        """(the centre of the training scale, base_size's factor) for the median image; the centre is base_size's
        factor x the centre of data.scale_range."""
        h, w = self.median_hw
        size = None if base in (None, "auto") else as_size(base, "data.base_size")
        if base == "auto":
            size = list(self.short_long)
        lo, hi = (float(v) for v in self.current("data.scale_range"))
        if not self.cfg.data.augment:
            lo = hi = 1.0
        return _scale_factor(h, w, size) * math.sqrt(lo * hi), _scale_factor(h, w, size)

    def crop(self, base: Any) -> tuple[int, int] | None:
        if self.generated or self.median_hw is None:
            self.decide("data.crop_size", None, self.recipe_note, layout=True)
            crop = self.current("data.crop_size")
            return None if crop is None else as_hw(crop, "data.crop_size")
        h, w = self.median_hw
        centre, _ = self.train_scale(base)
        th, tw = h * centre, w * centre

        def side(v: float) -> int:
            return int(min(CROP_MAX, max(CROP_MIN, v // CROP_STEP * CROP_STEP)))

        planned = _hw_value((side(th), side(tw)))
        reason = (
            f"the median training image at the training scale ({round(th)}x{round(tw)} px) whole, sides rounded "
            f"down to a multiple of {CROP_STEP}, {CROP_MIN}-{CROP_MAX} px"
        )
        if self.recipe_note:  # kept, or why not
            reason = self.recipe_note if self.recipe_fits else f"{reason}; {self.recipe_note}"
        crop = self.decide("data.crop_size", planned, reason, layout=self.recipe_fits)
        return None if crop is None else as_hw(crop, "data.crop_size")

    def val_size(self, base: Any) -> None:
        if self.generated or self.median_hw is None:
            return
        lo, hi = (float(v) for v in self.current("data.scale_range"))
        centred = abs(math.log(lo * hi)) < 1e-9 or not self.cfg.data.augment
        if centred:
            planned, reason = None, "validate at data.base_size, the centre of the training scale"
        else:
            centre, _ = self.train_scale(base)
            planned = round(min(self.median_hw) * centre)
            reason = f"the training scale's centre (data.scale_range [{lo:g}, {hi:g}] is not centred on 1)"
        if self.recipe_fits:
            reason = self.recipe_note
        self.decide("data.val_size", planned, reason, layout=self.recipe_fits)

    def batch(self, crop: tuple[int, int] | None) -> int:
        key, b0 = "data.batch_size", int(self.current("data.batch_size"))
        if self.recipe_fits or crop is None:
            self._memory_warning(b0, crop)
            return int(self.decide(key, b0, self.recipe_note or "no crop: the images' own sizes", layout=True))
        area = crop[0] * crop[1]
        batch = min(MAX_BATCH, b0 * max(1, REFERENCE_CROP_AREA // area))
        why = [
            f"{b0} (the layout's) x {max(1, REFERENCE_CROP_AREA // area)} (512x512 / crop area), at most {MAX_BATCH}"
        ]
        cap = max(1, self.n_train // 2)
        if batch > cap:
            while batch > cap:
                batch //= 2
            why.append(f"halved to at most half of the {self.n_train} training images")
        budget = self.device.get("memory_bytes")
        need = training_memory(batch, crop, self.device)
        if budget and need is not None and need > MEMORY_SHARE * budget:
            while batch > 1 and training_memory(batch, crop, self.device) > MEMORY_SHARE * budget:
                batch //= 2
            why.append(
                f"halved to fit {MEMORY_SHARE:.0%} of {budget / 2**30:.1f} GiB (est. {training_memory(batch, crop, self.device) / 2**30:.1f} GiB)"
            )
        return int(self.decide(key, max(1, batch), "; ".join(why)))

    def _memory_warning(self, batch: int, crop: tuple[int, int] | None) -> None:
        budget = self.device.get("memory_bytes")
        need = None if crop is None else training_memory(batch, crop, self.device)
        if budget and need is not None and need > MEMORY_SHARE * budget:
            self.plan.warnings.append(
                f"data.batch_size={batch} with crops of {crop[0]}x{crop[1]} may need ~{need / 2**30:.1f} GiB, more than "
                f"{MEMORY_SHARE:.0%} of this device's {budget / 2**30:.1f} GiB: lower data.batch_size or use trainer.accumulate"
            )

    def iterations(self, batch: int) -> None:
        t = self.cfg.get("trainer")
        accumulate = int(t.accumulate) if t is not None and "accumulate" in t else 1
        epochs = int(t.max_epochs) if t is not None and t.get("max_epochs") else EPOCHS
        n = self.n_train
        per_epoch = (n // batch if n >= 2 * batch else -(-n // batch)) // accumulate
        total = epochs * per_epoch
        pair = ("trainer.max_epochs",)
        if MIN_ITERS <= total <= MAX_ITERS:
            why = f"{epochs} epochs (trainer.max_epochs) of {per_epoch} iterations = {total}, within {MIN_ITERS}-{MAX_ITERS}"
            self.decide("trainer.max_iters", None, why, pair=pair)
            return
        planned = min(MAX_ITERS, max(MIN_ITERS, total))
        bound = "raised to the floor" if total < MIN_ITERS else "lowered to the ceiling"
        why = f"{epochs} epochs of {per_epoch} iterations would be {total}: {bound} of {planned}"
        if self.decide("trainer.max_iters", planned, why, pair=pair) == planned and not self.explicit(
            "trainer.max_epochs"
        ):
            interval = max(1, planned // epochs)
            self.decide("trainer.val_interval", interval, f"{epochs} validations in {planned} iterations")

    # -- normalisation -----------------------------------------------------------------------------------

    def normalisation(self) -> None:
        px = self.train.get("pixels")
        if px is None:
            return
        own_mean = [float(v) for v in px["mean"]]
        own_std = [float(s) if s > 0 else 1.0 for s in px["std"]]
        photo = px["bands"] == 3 and px["dtype"] == "uint8" and min(px["range_used"]) >= PHOTO_RANGE
        used = ", ".join(percent(r) for r in px["range_used"]) if px["range_used"] else None
        desc = f"{px['bands']}-band {px['dtype']} images" + (f" (bands span {used} of their range)" if used else "")
        precision = self.device.get("precision", "fp32")
        if photo:
            planned = (list(IMAGENET_MEAN), list(IMAGENET_STD))
            reason = f"ImageNet's: {desc}, photos as pretrained networks expect"
            problems = signal_problems(px["mean"], px["std"], *planned, precision)
            if problems:
                planned = (own_mean, own_std)
                reason = f"the data's own: {desc}; ImageNet's would leave {problems[0]}"
        else:
            planned = (own_mean, own_std)
            imagenet = signal_problems(px["mean"], px["std"], IMAGENET_MEAN, IMAGENET_STD, precision)
            reason = f"the data's own per-band statistics: {desc}, not 3-band 8-bit photos" + (
                f"; ImageNet's would leave {imagenet[0]}" if imagenet and px["bands"] == 3 else ""
            )
        pair = ("data.mean", "data.std")
        mean = self.decide("data.mean", planned[0], reason, pair=pair)
        std = self.decide("data.std", planned[1], reason, pair=pair)
        if mean == "auto" or std == "auto":
            return
        if len(mean) == len(px["mean"]) and len(std) == len(px["std"]):
            for p in signal_problems(px["mean"], px["std"], mean, std, precision):
                self.plan.warnings.append(
                    f"signal: {p} with data.mean={shown(mean)} data.std={shown(std)}: set data.mean=auto (the data's "
                    "own statistics)"
                )


def make_plan(
    fingerprint: dict,
    cfg_data: DictConfig,
    cfg_loss: DictConfig,
    cfg_model: DictConfig,
    user_set: set[str],
    device_info: dict | None,
    *,
    cfg_trainer: DictConfig | None = None,
) -> Plan:
    """The plan for a data set of ``fingerprint`` (see the module doc).  ``user_set``: the explicit keys
    (:func:`explicit_keys`); ``device_info``: :func:`describe_device` (``{"precision": "fp32"}`` will do
    without an accelerator).  The configs are read, never changed."""
    parts = {"data": cfg_data, "loss": cfg_loss, "model": cfg_model}
    if cfg_trainer is not None:
        parts["trainer"] = cfg_trainer
    cfg = OmegaConf.create({k: _plain(v) for k, v in parts.items()})
    p = _Planner(fingerprint, cfg, user_set, device_info or {})
    k = p.classes()
    loss_name = p.loss(k)
    base = p.scale()
    crop = p.crop(base)
    p.val_size(base)
    batch = p.batch(crop)
    p.iterations(batch)
    p.normalisation()
    p.class_weights(k, loss_name)
    for text in fingerprint.get("differences", []):
        p.plan.warnings.append(f"train and val differ: {text}")
    return p.plan
