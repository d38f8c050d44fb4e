"""The data card of the run: ``plan.json`` (every setting the plan derived from the data, with its reason) and
``data_card.png`` (class frequencies, image sizes, samples with their masks) in the run dir, written before the
first step; the plan is also kept in every checkpoint (``plan``).  Like a logger, the card never stops a run: a
file that cannot be written is one warning naming it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from segtrain.data.card import card_samples, write_card
from segtrain.data.plan import Plan
from segtrain.hooks.base import Hook
from segtrain.utils import atomic_write

log = logging.getLogger("segtrain")


class DataCard(Hook):
    name = "plan"

    def __init__(self, run_dir: Path, fingerprint: dict, plan: Plan, dataset: Any):
        self.run_dir, self.fingerprint, self.plan, self.dataset = Path(run_dir), fingerprint, plan, dataset

    def before_train(self, trainer) -> None:
        if not trainer.is_main:
            return
        d = trainer.cfg.data
        title = f"data card: data={d.name}" + (f" ({d.root})" if d.root else "")
        path = self.run_dir / "plan.json"
        try:
            atomic_write(path, self.plan.to_json() + "\n", durable=False)
            path = self.run_dir / "data_card.png"
            write_card(self.fingerprint, self.plan, card_samples(self.dataset), path, title)
        except OSError as e:
            log.warning("cannot write %s (%s); training goes on without it", path, e.strerror or e)

    def state_dict(self) -> dict:
        return self.plan.to_dict()

    def load_state_dict(self, state: dict | None) -> None:
        """Nothing to restore: a resumed run plans again (from the cached fingerprint: the same values while the
        files are the same; the resume check compares the configs)."""
