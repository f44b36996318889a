"""Token mixers: the pluggable slot of a Block. Each maps [B, T, D] -> [B, T, D] and takes
`causal` at call time, so one model can switch between causal and bidirectional use."""

from lmtk.models.mixers.attention import Attention

MIXERS = {"attention": Attention}


def build_mixer(cfg, layer: int):
    return MIXERS[cfg.mixer](cfg, layer)
