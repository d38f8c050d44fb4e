"""The side work of a training run, one hook per file (the interface: :mod:`segtrain.hooks.base`)."""

from segtrain.hooks.base import Hook, StepResult, ValidationResult

__all__ = ["Hook", "StepResult", "ValidationResult"]
