"""Pieces the recurrent mixers share."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmtk.models.mixers.recurrence import chunked, recurrent


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


class RecurrentMixer(nn.Module):
    """What the gated-linear-recurrence mixers (linear, retnet, gla, hgrn2) share: they read left
    to right only, run the recurrence of recurrence.py on head-first q, k, v, g, and carry the
    decoding state (S [B, H, Dk, Dv], then one ShortConv state per convolved input)."""

    causal_only = True  # a recurrence reads left to right: no masked (bidirectional) reading

    chunk: int  # chunk length of the chunked form (model.mixer.chunk)

    def check_causal(self, causal: bool) -> None:
        if not causal:
            raise ValueError(f"{type(self).__name__} is causal only (a left-to-right recurrence): "
                             "it has no bidirectional reading")

    @staticmethod
    def heads(x: torch.Tensor, n: int) -> torch.Tensor:
        """[B, T, n * D] -> [B, n, T, D]."""
        B, T, _ = x.shape
        return x.view(B, T, n, -1).transpose(1, 2)

    @staticmethod
    def merge(o: torch.Tensor) -> torch.Tensor:
        """[B, H, T, D] -> [B, T, H * D]."""
        B, H, T, D = o.shape
        return o.transpose(1, 2).reshape(B, T, H * D)

    @staticmethod
    def convolve(convs: nn.ModuleList | None, xs: list, states, decode: bool) -> tuple[list, tuple]:
        """Each input through its ShortConv (decoding: continuing from its state); no convs
        (model.mixer.conv=0): the inputs unchanged and no states."""
        if not convs:
            return list(xs), ()
        states = states or (None,) * len(xs)
        outs = [conv(x, s, decode) for conv, x, s in zip(convs, xs, states)]
        return [y for y, _ in outs], tuple(s for _, s in outs)

    def recur(self, q, k, v, g, S, decode: bool, scale: float = 1.0):
        """(o, final state) of S_t = diag(exp g_t) S_{t-1} + k_t v_t^T, o_t = S_t^T (scale q_t):
        the step form for a decoding step of one token, the chunked form otherwise (training,
        and a prefill continuing from the carried state S)."""
        if decode and q.shape[2] == 1:
            return recurrent(q, k, v, g, state=S, scale=scale)
        return chunked(q, k, v, g, chunk=self.chunk, state=S, scale=scale)

    def gated_out(self, y, x, S, conv_states, decode: bool):
        """W_o (swish(x W_g) * y) (the gate when the mixer has one) and the decoding state."""
        if self.gate is not None:
            y = F.silu(self.gate(x)) * y
        return self.drop(self.out(y)), ((S, *conv_states) if decode else None)

    @staticmethod
    def recurrence_flops(H: int, Dk: int, Dv: int) -> float:
        """Training FLOPs per token of the recurrence: the state update k v^T (2 Dk Dv: a multiply
        and an add per entry) and the readout S^T q (2 Dk Dv) per head, x3 for forward + backward
        (the backward does twice the forward's work): 12 H Dk Dv. The chunked form spends some
        more on its intra-chunk scores (O(chunk (Dk + Dv)) per token, half of it masked); like
        attention's masked half, that is not counted."""
        return 12.0 * H * Dk * Dv


def check_knobs(mixer: str, chunk: int, conv: int, **choices) -> None:
    """The knobs every recurrent mixer has (model.mixer.chunk >= 1, model.mixer.conv >= 0) and
    `choices`: name=(value, allowed values). Raises a one-line UserError."""
    from lmtk.errors import UserError, suggest

    if chunk < 1:
        raise UserError(f"model.mixer.chunk={chunk} for mixer {mixer}: the chunk length must be >= 1 (e.g. 64)")
    if conv < 0:
        raise UserError(f"model.mixer.conv={conv} for mixer {mixer}: the short convolution's size must be >= 0 (0: none)")
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise UserError(f"model.mixer.{key}={value} is not one of: {', '.join(allowed)}{suggest(str(value), allowed)}")


def split_heads(mixer: str, width: int, n_heads: int, what: str) -> int:
    """Per-head size of a `width`-wide projection over n_heads heads (a UserError if it does not divide)."""
    from lmtk.errors import UserError

    if n_heads < 1 or width < 1 or width % n_heads:
        raise UserError(f"mixer {mixer}: {what} width {width} does not split into {n_heads} heads; "
                        "change model.mixer.n_heads (or the expansion knobs)")
    return width // n_heads
