"""Pieces the recurrent mixers share."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ShortConv(nn.Module):
    """Causal depthwise convolution over time of width `size` (Zoology / Based / Mamba: a short
    convolution on a mixer's inputs helps recall), with its decoding state: the last size-1
    inputs. x [B, T, C] -> [B, T, C]."""

    def __init__(self, channels: int, size: int, activation: bool = True):
        super().__init__()
        self.size = size
        self.weight = nn.Parameter(torch.empty(channels, 1, size))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.activation = activation
        nn.init.normal_(self.weight, 0.0, size ** -0.5)
        self.weight.lmtk_own_init = True  # the model-wide init leaves it alone

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None, decode: bool = False):
        """(y, new state [B, size-1, C] when decoding else None)."""
        B, T, C = x.shape
        past = state if state is not None else x.new_zeros(B, self.size - 1, C)
        full = torch.cat([past, x], dim=1)  # [B, size-1+T, C]
        y = F.conv1d(full.transpose(1, 2), self.weight, self.bias, groups=C).transpose(1, 2)
        if self.activation:
            y = F.silu(y)
        return y, (full[:, full.shape[1] - (self.size - 1):] if decode else None)
