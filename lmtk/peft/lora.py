"""LoRA (Hu et al. 2021) and DoRA (Liu et al. 2024) as a linear layer that owns its base weight.

LoRALinear keeps the base layer's `weight` and `bias` under their own names, so a base state
dict loads into an adapted model unchanged, and adds
  lora_a [r, in]   random (Kaiming-uniform, as nn.Linear initialises a weight)
  lora_b [out, r]  zero, so the adapted layer starts as exactly the base layer
  y = x W^T + b + s * dropout(x) A^T B^T,   s = alpha / r   (rsLoRA: alpha / sqrt(r))
DoRA adds magnitude [out] = the row norms of W and rescales each output row:
  W' = magnitude * (W + s B A) / ||W + s B A||_row   (the norm treated as a constant in
backward, as the paper suggests), so y = (m / n) * (x W^T + s dropout(x) A^T B^T) + b; at the
start m / n is exactly 1. merge() folds the update into the weight for inference.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 dora: bool = False):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank {r} must be at least 1")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the base layer's own parameters: same names, same tensors
        self.bias = base.bias
        self.weight.requires_grad_(False)
        for attr in ("is_residual_out",):  # markers the model's init reads
            if hasattr(base, attr):
                setattr(self, attr, getattr(base, attr))
        self.r, self.alpha, self.rslora, self.dora = r, alpha, rslora, dora
        self.scale = alpha / math.sqrt(r) if rslora else alpha / r
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_a = nn.Parameter(torch.empty(r, self.in_features, device=dev, dtype=dt))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, r, device=dev, dtype=dt))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.lora_a.lmtk_own_init = self.lora_b.lmtk_own_init = True
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if dora:
            self.magnitude = nn.Parameter(self._row_norm(self.weight.detach()).clone())

    @staticmethod
    def _row_norm(w: torch.Tensor) -> torch.Tensor:
        return w.float().norm(dim=1).to(w.dtype)

    def delta(self) -> torch.Tensor:
        """s B A: the update of the weight."""
        return self.scale * (self.lora_b @ self.lora_a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the base layer's own computation first, so that with B = 0 the output is the base's bit for bit
        y = F.linear(x, self.weight, self.bias)
        update = F.linear(F.linear(self.drop(x), self.lora_a), self.lora_b) * self.scale
        if not self.dora:
            return y + update
        mag = self.magnitude / self._row_norm(self.weight + self.delta()).detach()
        xw = y if self.bias is None else y - self.bias
        # = mag * (x W^T + update) + b, written so that mag == 1 returns y + update exactly
        return y + (mag - 1) * xw + mag * update

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        w = self.weight + self.delta()
        if self.dora:
            w = (self.magnitude / self._row_norm(w))[:, None] * w
        return w

    def merge(self) -> nn.Linear:
        """A plain nn.Linear with the update folded in (the base weight tensor is left as it was)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.merged_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        for attr in ("is_residual_out",):
            if hasattr(self, attr):
                setattr(lin, attr, getattr(self, attr))
        return lin

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, scale={self.scale:.4g}"
                f"{', dora' if self.dora else ''}")
