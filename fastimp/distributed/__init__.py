"""fastimp under ``torchrun`` (torch.distributed; Slurm for many nodes: ``examples/slurm/``).

- Data-parallel training of one run (``fastimp imp`` under torchrun): every rank takes its share
  of the batch of step s, gradients are all-reduced by DistributedDataParallel, masks are
  computed once, broadcast and verified before every level, rank 0 writes.
- Independent work over ranks: IMP runs (``--parallel runs``), landscape points, Hessian probes
  and SLQ runs, retraining lists: each rank takes a contiguous share and the results are gathered
  in order (:func:`spread`), so the output equals one process's.

Without a process group every function is the one-process answer (rank 0 of 1).
See docs/DISTRIBUTED.md.
"""
from fastimp.distributed.env import (RankStoppedError, abandon, active, agree, all_gather_objects,
                                     backend_for, barrier, device, init, is_main, launched,
                                     local_rank, main_writes, rank, shutdown, world_size)
from fastimp.distributed.masks import (MaskMismatchError, broadcast_masks, masks_checksum,
                                       verify_masks)
from fastimp.distributed.split import gather_parts, shard, spread

__all__ = ["RankStoppedError", "abandon", "active", "agree", "all_gather_objects", "backend_for",
           "barrier", "device", "init", "is_main", "launched", "local_rank", "main_writes", "rank",
           "shutdown", "world_size",
           "MaskMismatchError", "broadcast_masks", "masks_checksum", "verify_masks",
           "gather_parts", "shard", "spread"]
