"""Data parallelism on torch.distributed (DDP), launched by torchrun.

`torchrun --nproc_per_node=N -m lmtk train ...` sets RANK/WORLD_SIZE; lmtk then joins the
process group (NCCL on CUDA, gloo on CPU). Rank 0 alone writes the run directory and logs.
No communication code of our own beyond a few all-reduces of scalars."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def broadcast(self, obj):
        """rank 0's value of a picklable object, on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.enabled:
            tdist.all_reduce(t, op={"sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX}[op])
        return t


def init(device_kind: str) -> Dist:
    """Join the process group when launched by torchrun; a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not tdist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if device_kind == "cuda":
            torch.cuda.set_device(local)
        tdist.init_process_group(backend)
    return Dist(rank, world, local)


def shutdown() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()
