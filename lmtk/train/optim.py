"""AdamW with weight decay on matrices only (not norms, biases, embeddings)."""

from __future__ import annotations

import torch


def build_optimizer(model: torch.nn.Module, cfg_optim, lr: float, device: torch.device) -> torch.optim.Optimizer:
    decay, no_decay, seen = [], [], set()
    embed_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 and id(p) not in embed_ids else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg_optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # Fused AdamW (CUDA and CPU): one kernel per step, and it honours `found_inf`, which lets
    # the loop skip a non-finite step on the device without a host sync.
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg_optim.betas), eps=cfg_optim.eps, fused=True)
