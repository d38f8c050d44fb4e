"""The loss terms ``loss.name`` can combine (``ce+dice`` ...): their names, and which are defined on one sigmoid
logit (``data.num_classes=1``).  The terms themselves, their sums and ``build_loss``: :mod:`segtrain.losses.functions`.
Imports no torch: the config is checked against these names before anything heavy loads."""

from __future__ import annotations

from segtrain.errors import ConfigError

TERMS = ("ce", "ohem", "dice", "focal", "bce")
SIGMOID_TERMS = ("bce", "dice")  # the terms defined on one sigmoid logit (data.num_classes=1)


def parse_terms(name: str) -> list[str]:
    """``"ce+dice"`` -> ``["ce", "dice"]``; ConfigError for an unknown or repeated term."""
    terms = [t.strip() for t in str(name).split("+")]
    bad = [t for t in terms if t not in TERMS]
    if bad:
        raise ConfigError(
            f"unknown loss term {bad[0]!r} in loss.name={name!r}; valid terms: {', '.join(TERMS)} "
            f"(or a sum such as ce+dice)"
        )
    if len(set(terms)) != len(terms):
        raise ConfigError(f"loss.name={name!r} repeats a term; use loss.weights to weight it")
    return terms
