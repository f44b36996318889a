"""muP, the maximal update parametrisation for Adam (Yang et al., "Tensor Programs V"; why the
learning rate then transfers across widths: Noci et al. 2024, "Why do Learning Rates Transfer?").

model.parametrization=mup with model.mup_base_width = d0, the d_model the learning rate was
tuned at, and width multiplier m = d_model / d0. Each parameter is classified by which of its
dimensions grow with the width (compared with the same model at twice the width):

    hidden (matrix-like: two or more dimensions grow; attention and MLP projections, a recurrent
    mixer's input/output projections):  Linear init std / sqrt(m)  (std ∝ 1/sqrt(fan_in)),
                                        Adam lr x 1/m
    vector-like (one dimension grows: token/position embeddings, the tied or untied output
    embedding, biases, norm scales, depthwise convolutions) and scalar-like (none):
                                        init and lr unchanged
    output logits:                      x 1/m   (the readout multiplier)
    an MoE's router scores:             x 1/m   (a readout too: fan-in grows, the E experts do not;
                                        without it the scores at init grow as sqrt(m), top-k sharpens
                                        and sigmoid gates saturate as the model widens)
    attention scores:                   q.k x sqrt(d0_head) / d_head  (1/d_head, not 1/sqrt(d_head);
                                        d0_head = d_head / m, the head dimension at the base width
                                        with the same head count)

At d_model == d0 every multiplier is 1: the model, its initialisation and its parameter groups'
learning rates are the standard parametrisation's, so a recipe tuned in SP is the muP base as it
stands, and only other widths differ.

Tied embeddings: the one table is vector-like (constant init, lr unscaled) both as input and
as readout, the readout multiplier 1/m scaling its output logits (muP's shared readout); the
untied head is treated the same way (constant init std, not zero-init, so the base width equals SP).

Not covered: depth (the 1/sqrt(2 n_layers) residual-output init stays as in SP); weight decay,
which AdamW multiplies by each group's lr, so hidden matrices decay x 1/m too; recurrent mixers'
own score scales (e.g. GLA's 1/sqrt(d_k)) and their self-initialised parameters (identity feature
maps, decay spectra) keep their SP form, and low-rank bottlenecks whose fan-in grows but fan-out
does not (readout-like, which muP would give a 1/m multiplier; the MoE router is the one that has it)
are left as vectors; widening by
adding heads at a fixed head dimension (the attention scale assumes the head count is fixed);
training objectives' own heads (objective=mtp's future heads, rts's detector) keep SP's init and lr
(the mtp heads' logits do take the readout multiplier: they go through head_input).
"""

from __future__ import annotations

import dataclasses
import math

import torch


def width_mult(cfg) -> float:
    """m = d_model / mup_base_width under muP; 1 in the standard parametrisation."""
    if getattr(cfg, "parametrization", "standard") != "mup":
        return 1.0
    return cfg.d_model / cfg.mup_base_width


def attention_scale(cfg, head_dim: int) -> float | None:
    """The softmax attention's score scale: None (SDPA's 1/sqrt(d_head)) in SP; muP's
    sqrt(d0_head) / d_head, which equals 1/sqrt(d_head) at the base width."""
    if getattr(cfg, "parametrization", "standard") != "mup":
        return None
    return math.sqrt(head_dim / width_mult(cfg)) / head_dim


def output_mult(cfg) -> float:
    """The readout multiplier on the output logits: 1/m."""
    return 1.0 / width_mult(cfg)


def hidden_names(model: torch.nn.Module) -> list[str]:
    """Names of the matrix-like parameters of a LanguageModel: those with two or more dimensions
    that grow with the width, found by building the same model at twice the width on the meta
    device (no memory, no compute) and comparing shapes."""
    from lmtk.models.transformer import LanguageModel

    cfg = model.cfg
    moe = cfg.moe
    if moe and moe.get("d_expert"):  # a set expert width grows with the model too (null: d_ff / top_k already does)
        moe = {**moe, "d_expert": 2 * moe["d_expert"]}
    wide = dataclasses.replace(cfg, d_model=2 * cfg.d_model, d_ff=2 * cfg.d_ff, moe=moe, parametrization="standard")
    with torch.device("meta"):
        probe = LanguageModel(wide)
    shapes = {n: p.shape for n, p in probe.named_parameters()}
    names = []
    for n, p in model.named_parameters():
        grown = sum(a != b for a, b in zip(p.shape, shapes[n]))
        if grown >= 2:
            names.append(n)
    return names
