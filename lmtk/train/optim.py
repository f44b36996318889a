"""AdamW with parameter groups decided by parameter name: weight decay except on biases, norms,
embeddings and the mixers' per-channel scalars (optim.no_decay), and a learning-rate scale for
a task head (optim.head, optim.head_lr_scale). Names, not tensor ranks, decide, so a LoRA
factor, a DoRA magnitude or a classifier bias lands where its name says, whatever its shape."""

from __future__ import annotations

from fnmatch import fnmatchcase

import torch

# The defaults of optim.no_decay: what pretraining has always left undecayed (every 1-D tensor
# and the embeddings of every mixer's model, tests/test_optim.py checks they agree).
NO_DECAY = ("*bias", "*norm*", "embed.*", "pos.*", "pos_scale", "*.A_log", "*.D", "*.skip", "*.lower_bound", "*.magnitude",
            "*.kv_shift")
HEAD = ("classifier.*",)


def matches(name: str, patterns) -> bool:
    """Whether a parameter name matches one of the glob patterns, as a whole or from a dot on
    (so `embed.*` matches `embed.weight` and also `lm.embed.weight`)."""
    return any(fnmatchcase(name, p) or fnmatchcase(name, "*." + p) for p in patterns)


def param_groups(model: torch.nn.Module, cfg_optim) -> list[dict]:
    """[decay, no decay] (+ [head decay, head no decay] with lr_scale when the model has a head)
    over the trainable parameters, in the model's order; a tied parameter counts once, under its
    first name."""
    no_decay = list(getattr(cfg_optim, "no_decay", None) or NO_DECAY)
    head = list(getattr(cfg_optim, "head", None) or HEAD)
    head_scale = float(getattr(cfg_optim, "head_lr_scale", 1.0) or 1.0)
    buckets = {(h, nd): [] for h in (False, True) for nd in (False, True)}
    for name, p in model.named_parameters():  # duplicates (tied weights) removed
        if p.requires_grad:
            buckets[(matches(name, head), matches(name, no_decay))].append(p)
    wd = cfg_optim.weight_decay
    groups = [{"params": buckets[(False, False)], "weight_decay": wd}, {"params": buckets[(False, True)], "weight_decay": 0.0}]
    if buckets[(True, False)] or buckets[(True, True)]:
        groups += [{"params": buckets[(True, False)], "weight_decay": wd, "lr_scale": head_scale},
                   {"params": buckets[(True, True)], "weight_decay": 0.0, "lr_scale": head_scale}]
    return groups


def build_optimizer(model: torch.nn.Module, cfg_optim, lr: float, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg_optim)
    for g in groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    # GPU: fused AdamW, one kernel per step, and it honours `found_inf`, which lets the loop skip a
    # non-finite step on the device without a host sync. CPU: the foreach implementation, ~5% faster
    # per step than the fused CPU kernel at the default recipe's shape on 2 cores (bench/RESULTS.md,
    # issue 16); there reading the skip decision on the host costs nothing (loop._optimizer_step).
    fused = device.type != "cpu"
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg_optim.betas), eps=cfg_optim.eps, fused=fused, foreach=not fused)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """The step's learning rate into every group, scaled by the group's lr_scale (a head's)."""
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def step_unless(opt: torch.optim.Optimizer, bad: torch.Tensor) -> None:
    """opt.step() unless `bad` (a bool tensor: the loss or gradient is not finite). Fused AdamW
    decides on the device (found_inf: no host sync); the foreach one (CPU) on the host."""
    if any(g.get("fused") for g in opt.param_groups):
        opt.found_inf = bad.float()
        opt.step()
        del opt.found_inf
    elif not bool(bad):
        opt.step()
