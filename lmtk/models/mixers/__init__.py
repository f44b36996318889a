"""Token mixers: the pluggable slot of a Block.

The contract every mixer keeps:

    forward(x [B, T, D], causal=True, state=None, offset=0, decode=False) -> (y [B, T, D], new_state)

`causal` is chosen at call time, so one model switches between causal and bidirectional
use (a mixer that cannot read both ways sets `causal_only = True`: the model then has no
masked reading). Decoding passes `decode=True`, the layer's state from the previous call (None
at the start) and `offset`, the absolute position of x's first token; the mixer returns its
new state (a KV cache for attention; the recurrent state for recurrent mixers). Training
passes none of them and gets None back. `flops_per_token(seq_len)` gives the mixer's
training FLOPs beyond its weight matmuls (attention's scores), for MFU."""

from lmtk.models.mixers.attention import Attention

MIXERS = {"attention": Attention}


def build_mixer(cfg, layer: int):
    return MIXERS[cfg.mixer](cfg, layer)


def causal_only(cfg) -> bool:
    """Whether a model of this config has a layer that cannot read bidirectionally (decided
    from the mixer classes, before any model is built)."""
    return bool(getattr(MIXERS[cfg.mixer], "causal_only", False))
