"""The hook interface: the side work of a training run, each piece owning its state (detectron2's ``HookBase``).

The :class:`~segtrain.trainer.Trainer` calls its hooks in the order they were given:

========================================  =================================================================
``before_train(trainer)``                 once, before the first step (after a resume's state is loaded)
``after_step(trainer, step)``             after every optimizer step, before the lr schedule steps
``after_validation(trainer, validation)`` after every validation, before the checkpoints are written
``after_save(trainer, state)``            after ``last.pt`` is written (rank 0 only)
``after_train(trainer, summary)``         after the last step of a run that completed
``close(trainer, status)``                always, last: ``finished``, ``killed`` (stopped) or ``failed``
========================================  =================================================================

and reads ``stop_reason`` (a reason to end training early, such as early stopping), :meth:`Hook.summary`
(values for ``metrics.json``), :meth:`Hook.validation_model` (the weights validation scores, for the EMA)
and, for a hook with a ``name``, :meth:`Hook.state_dict` / :meth:`Hook.load_state_dict`: its state in every
checkpoint, under ``name``, so that a resumed run continues exactly.  A new piece of side work is a new
hook, not an edit of the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from segtrain.trainer import Trainer


# What every validation logs (scalar name -> the metric of segtrain.metrics), besides val_iou/<class>
VALIDATION_SCALARS = {
    "val/mIoU": "miou",
    "val/aAcc": "aacc",
    "val/mAcc": "macc",
    "val/mDice": "mdice",
    "val/loss": "loss",
}


@dataclass
class StepResult:
    """One optimizer step, as the hooks see it."""

    loss: float  # the step's loss, averaged over processes
    images: int  # images the step trained on, in this process
    started: float  # time.perf_counter() when the step began (its batches had arrived)
    waited: float  # seconds spent waiting for its batches


@dataclass
class ValidationResult:
    """One validation: the metrics (``segtrain.metrics``), the values logged as scalars, the confusion matrix
    (CPU), the first images with their masks and predictions (or None), and ``improved``: set by the monitor
    when the run's watched value is the best yet."""

    metrics: dict
    scalars: dict[str, float]
    confusion: torch.Tensor
    vis: tuple | None
    improved: bool = False


class Hook:
    """Side work of a run.  Every method does nothing by default."""

    name: str | None = None  # the key of its state in checkpoints; None: it keeps none
    stop_reason: str | None = None  # set to end training after the current step (e.g. early stopping)

    def before_train(self, trainer: Trainer) -> None: ...

    def after_step(self, trainer: Trainer, step: StepResult) -> None: ...

    def after_validation(self, trainer: Trainer, validation: ValidationResult) -> None: ...

    def after_save(self, trainer: Trainer, state: dict) -> None: ...

    def after_train(self, trainer: Trainer, summary: dict) -> None: ...

    def close(self, trainer: Trainer, status: str) -> None: ...

    def validation_model(self) -> nn.Module | None:
        """The module validation scores instead of the trained one (the weight average), or None."""
        return None

    def summary(self, trainer: Trainer) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict | None) -> None:
        """``state``: what :meth:`state_dict` saved, or None when the checkpoint has none for this hook."""
