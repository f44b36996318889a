"""AdamW with parameter groups decided by parameter name: weight decay except on biases, norms,
embeddings and the mixers' per-channel scalars (optim.no_decay), a learning-rate scale for
a task head (optim.head, optim.head_lr_scale) and the per-parameter ones a model states (muP's). Names, not tensor ranks, decide, so a LoRA
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


def lr_scales(model: torch.nn.Module) -> dict[str, float]:
    """{parameter name: learning-rate multiplier} from every module that states its own
    (LanguageModel.lr_scales: muP's hidden matrices), under the names `model` gives them."""
    out = {}
    for prefix, m in model.named_modules():
        own = getattr(m, "lr_scales", None)
        if callable(own):
            out.update({f"{prefix}.{n}" if prefix else n: s for n, s in own().items()})
    return out


def param_groups(model: torch.nn.Module, cfg_optim) -> list[dict]:
    """[decay, no decay] (+ [head decay, head no decay] with lr_scale when the model has a head)
    (+ a group per further lr multiplier a module states: muP's hidden matrices, lr x 1/m) over
    the trainable parameters, in the model's order; a tied parameter counts once, under its
    first name."""
    no_decay = list(getattr(cfg_optim, "no_decay", None) or NO_DECAY)
    head = list(getattr(cfg_optim, "head", None) or HEAD)
    head_scale = float(getattr(cfg_optim, "head_lr_scale", 1.0) or 1.0)
    scales = lr_scales(model)
    buckets = {(h, nd, 1.0): [] for h in (False, True) for nd in (False, True)}
    for name, p in model.named_parameters():  # duplicates (tied weights) removed
        if p.requires_grad:
            buckets.setdefault((matches(name, head), matches(name, no_decay), scales.get(name, 1.0)), []).append(p)
    wd = cfg_optim.weight_decay
    groups = [{"params": buckets[(False, False, 1.0)], "weight_decay": wd},
              {"params": buckets[(False, True, 1.0)], "weight_decay": 0.0}]
    if buckets[(True, False, 1.0)] or buckets[(True, True, 1.0)]:
        groups += [{"params": buckets[(True, False, 1.0)], "weight_decay": wd, "lr_scale": head_scale},
                   {"params": buckets[(True, True, 1.0)], "weight_decay": 0.0, "lr_scale": head_scale}]
    for (h, nd, s), params in buckets.items():
        if s != 1.0:
            groups.append({"params": params, "weight_decay": 0.0 if nd else wd, "lr_scale": (head_scale if h else 1.0) * s})
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
    """The step's learning rate into every group, scaled by the group's lr_scale (a head's, muP's)."""
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
