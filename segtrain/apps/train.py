"""``segtrain``: train a network.  ``segtrain [group=option ...] [key=value ...]``; ``-m`` for a sweep.

The job checks the config, builds the run (:func:`segtrain.build.build_trainer`) and trains it; it returns the
best ``trainer.monitor`` value, what Hydra's sweepers optimise.  A stopped run's line ends with the command that
continues it.  Errors and exit codes: :mod:`segtrain.apps.runner`.
"""

from __future__ import annotations

import logging
from functools import partial

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from segtrain import distributed
from segtrain.apps.guard import resume_command
from segtrain.apps.runner import run_hydra_app
from segtrain.apps.sweep import mark_status
from segtrain.config import check_keys, config_dir, validate
from segtrain.config.explicit import explicit_keys
from segtrain.errors import Preempted

log = logging.getLogger("segtrain")


def _train(cfg: DictConfig) -> tuple[float, dict]:
    """The best value of ``trainer.monitor`` (what Hydra sweepers optimise), and why training stopped."""
    check_keys(cfg)  # a sweep's job: what the RunDirGuard checked for a single run
    validate(cfg, before_plan=True)  # before torch loads: a sweep's bad job fails in a moment
    from segtrain.build import build_trainer  # torch: not imported before a job runs (`segtrain --help`)

    hc = HydraConfig.get()
    run_dir = cfg.run_dir or hc.runtime.output_dir
    on_abort = partial(mark_status, run_dir, "aborted") if distributed.env_rank() == 0 else None
    trainer = build_trainer(cfg, run_dir, on_abort, explicit=explicit_keys(hc.overrides.task, _config_dirs(hc)))
    try:
        summary = trainer.fit()
    except Preempted as e:  # the command that continues the run
        log.warning("%s; resume with: %s", e, resume_command(trainer.run_dir, limit=None))
        raise Preempted(f"{e}; resume with: {resume_command(trainer.run_dir)}", e.by_signal) from None
    finally:
        distributed.cleanup()
    keys = ("monitor", "monitor_mode", "best_value", "best_step", "best_checkpoint", "stop_reason")
    return summary["best_value"], {k: summary[k] for k in keys}


def _config_dirs(hc) -> list[str]:
    """segtrain's config dir, then the user's (``--config-dir``, ``hydra.searchpath``): where explicit_keys reads the
    options the command line chose."""
    ours = config_dir()
    theirs = [s.path for s in hc.runtime.config_sources if s.schema == "file" and s.path and s.path != ours]
    return [ours, *theirs]


def main() -> None:
    """``segtrain``: train a network."""
    run_hydra_app(_train)


if __name__ == "__main__":
    main()
