"""``segtrain-info``: parameters, FLOPs and inference latency of a network (:mod:`segtrain.info`).

    segtrain-info ckpt=PATH                          # the network stored in a checkpoint (its weights loaded)
    segtrain-info model=deeplabv3plus model.backbone=resnet50 data=voc info.size=512
    segtrain-info model=pspnet model.backbone=resnet50 device=cuda info.batch_size=16

``model=`` / ``data=`` (for ``num_classes`` and the input size) / ``device=`` / ``info.*``; with ``ckpt=PATH`` the
model and data config come from the checkpoint.  The data set itself is never read.  It prints a table and writes
``info.json`` into its run dir (``outputs/info/DATE/TIME``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from segtrain.apps.runner import command
from segtrain.utils import write_json

log = logging.getLogger("segtrain")


def _info(cfg: DictConfig) -> float:
    # torch and the network load when the job runs, not for `segtrain-info --help`
    from segtrain.info import format_info, model_info

    info = model_info(cfg)
    run_dir = Path(cfg.run_dir or HydraConfig.get().runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "info.json", info)
    print(format_info(info), flush=True)
    log.info("wrote %s", run_dir / "info.json")
    return info["gflops"]


main = command(_info, "info", "segtrain-info")  # the console script


if __name__ == "__main__":
    main()
