"""Data parallelism on torch.distributed, launched by torchrun: DDP, or FSDP2 (fully_shard).

`torchrun --nproc_per_node=N -m lmtk train ...` sets RANK/WORLD_SIZE; lmtk then joins the
process group (NCCL on CUDA, gloo on CPU). Rank 0 alone writes the run directory and logs.
No communication code of our own beyond a few all-reduces of scalars.

launcher.strategy=fsdp shards parameters, gradients and optimizer state over the ranks
(fully_shard on each block, then the root). Checkpoints stay in the single-process format:
full weights and an index-keyed optimizer state, gathered to rank 0, so every strategy
resumes every checkpoint and `lmtk generate` needs no torch.distributed."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    strategy: str = "ddp"  # ddp | fsdp (launcher.strategy)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def fsdp(self) -> bool:
        return self.enabled and self.strategy == "fsdp"

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


def init(device_kind: str, strategy: str = "ddp") -> Dist:
    """Join the process group when launched by torchrun; a no-op otherwise (one process
    trains unsharded whatever the strategy)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(strategy=strategy)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not tdist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if device_kind == "cuda":
            torch.cuda.set_device(local)
        tdist.init_process_group(backend)
    return Dist(rank, world, local, strategy)


def shutdown() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


# ---- FSDP2 ----------------------------------------------------------------------------------

_FULL = dict(full_state_dict=True, cpu_offload=True)


@contextlib.contextmanager
def session(cfg, refuse_fsdp: str | None = None):
    """What a command that trains (train, finetune, distill) does around its work: the device and
    precision, the process group under launcher.nproc / torchrun (each rank on its own GPU), the
    batch settings checked against the ranks (a note when each rank's micro-batch was lowered),
    and at the end a barrier (a rank tearing gloo down while rank 0 still works can abort it)
    and the group's shutdown. Yields (device, dtype, Dist). `refuse_fsdp`: the one-line error for
    launcher.strategy=fsdp in a command that does not shard."""
    from lmtk import device as devices
    from lmtk.errors import UserError
    from lmtk.log import console
    from lmtk.train.pretrain import check_parallel

    dev, dtype = devices.resolve(cfg.device, cfg.precision, cfg.launcher.strategy)
    if refuse_fsdp and cfg.launcher.strategy == "fsdp":
        raise UserError(refuse_fsdp)
    dist = init(dev.type, cfg.launcher.strategy)
    try:
        if dist.enabled and dev.type == "cuda":
            dev = torch.device("cuda", dist.local_rank)
        note = check_parallel(cfg, dist.world, dtype)
        if note and dist.main:
            console.print(note)
        yield dev, dtype, dist
        dist.barrier()
    finally:
        shutdown()


def shard(model: torch.nn.Module, device: torch.device, world: int) -> None:
    """fully_shard each block, then the root (embeddings, final norm and the tied head: one
    shared parameter, so it stays tied). fully_shard moves each rank's shard to `device`, so
    the whole model never has to be on one GPU."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # Objectives call hidden() and logits(), never forward(): hidden() must run the root's
    # all-gather hooks. The root keeps its parameters unsharded after forward, so logits()
    # (the tied head) runs on the gathered weight too.
    register_fsdp_forward_method(model, "hidden")
    if hasattr(model, "align"):  # distillation's alignment stages run layers on given inputs
        register_fsdp_forward_method(model, "align")


def _param_names(model: torch.nn.Module, opt) -> list[list[str]]:
    """For the optimizer's i-th parameter (state_dict order), every name the model gives it
    (a tied parameter has several)."""
    from lmtk.checkpoint import parameter_names

    names = parameter_names(model)
    return [names[id(p)] for g in opt.param_groups for p in g["params"]]


def full_state(model: torch.nn.Module, opt) -> tuple[dict, dict]:
    """(full weights, optimizer state in opt.state_dict()'s index-keyed layout), on rank 0;
    empty on the others. A collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(**_FULL)
    weights = get_model_state_dict(model, options=opts)
    by_name = get_optimizer_state_dict(model, opt, options=opts)
    if not by_name:  # not rank 0
        return weights, by_name
    names = _param_names(model, opt)
    # by_name keys one of each parameter's names; map them back to the optimizer's indices.
    index = {n: i for i, ns in enumerate(names) for n in ns}
    state = {index[n]: s for n, s in by_name["state"].items()}
    groups = [dict(g, params=[index[n] for n in g["params"]]) for g in by_name["param_groups"]]
    return weights, {"state": state, "param_groups": groups}


def load_optimizer(model: torch.nn.Module, opt, saved: dict) -> None:
    """Load an index-keyed (single-process layout) optimizer state into a sharded optimizer;
    every rank passes the full state and keeps its own shard. A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(model, opt)
    by_name = {
        "state": {names[int(i)][0]: s for i, s in saved["state"].items()},
        "param_groups": [dict(g, params=[names[int(i)][0] for i in g["params"]]) for g in saved["param_groups"]],
    }
    set_optimizer_state_dict(model, opt, by_name, options=StateDictOptions(full_state_dict=True))
