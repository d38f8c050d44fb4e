"""torch.distributed (DDP) through torchrun: ``torchrun --nproc_per_node=N -m segtrain ...``.

torchrun sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; :func:`setup` joins the process group
(NCCL on CUDA, gloo on CPU) and returns this process's place in it.  Rank 0 owns the Hydra run dir,
the logs, TensorBoard and the checkpoints; the other ranks run in a throw-away Hydra dir
(:func:`scratch_run_dir`) and learn rank 0's run dir by broadcast.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads lazily: the CLI asks scratch_run_dir() before anything needs torch
    import torch  # the command line asks this module before torch loads


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _export_slurm_env() -> None:
    """Under Hydra's submitit launcher (hydra/launcher=slurm_ddp) each SLURM task runs the trainer with
    SLURM_* variables only: let submitit translate them into torch.distributed's RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR and MASTER_PORT."""
    if "WORLD_SIZE" in os.environ or os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    from submitit.helpers import TorchDistributedEnvironment  # an optional package (segtrain[slurm])

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def launched() -> bool:
    """True under torchrun, or a SLURM job of several tasks started by submitit."""
    _export_slurm_env()
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def scratch_run_dir() -> str | None:
    """For ranks > 0: a temporary Hydra run dir, so only rank 0 creates the real one."""
    if launched() and env_rank() > 0:
        return tempfile.mkdtemp(prefix=f"segtrain-rank{env_rank()}-")
    return None


def setup(device_type: str) -> DistInfo:
    """Join the process group when launched by torchrun; a single process otherwise."""
    if not launched():
        return DistInfo()
    import torch  # the command line asks this module before torch loads
    import torch.distributed as dist  # the command line asks this module before torch loads

    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), dist.get_backend())


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    import torch.distributed as dist  # the command line asks this module before torch loads

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    """In-place sum (or ``op``) over ranks; a no-op in a single process."""
    import torch.distributed as dist  # the command line asks this module before torch loads

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def cleanup() -> None:
    import torch.distributed as dist  # the command line asks this module before torch loads

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def mean_and_any(value: float, flag: bool, info: DistInfo, device: torch.device) -> tuple[float, bool]:
    """The mean of ``value`` over ranks and whether any rank's ``flag`` is set, in one collective."""
    if not info.enabled:
        return value, flag
    import torch  # the command line asks this module before torch loads

    buf = torch.tensor([value, float(flag)], device=device, dtype=torch.float64)
    all_reduce(buf)
    return float(buf[0]) / info.world_size, bool(buf[1] > 0)


def wrap(model: torch.nn.Module, device: torch.device, info: DistInfo, sync_bn: bool) -> tuple[torch.nn.Module, bool]:
    """(DistributedDataParallel around ``model`` when several processes train, else ``model``; whether its
    BatchNorm became SyncBatchNorm: ``device.sync_bn`` under DDP on CUDA, which SyncBatchNorm needs)."""
    import torch  # the command line asks this module before torch loads

    if not info.enabled:
        return model, False
    sync_bn = sync_bn and device.type == "cuda"
    if sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids), sync_bn
