"""Token mixers: the pluggable slot of a Block.

The contract every mixer keeps:

    forward(x [B, T, D], causal=True, state=None, offset=0, decode=False) -> (y [B, T, D], new_state)

Mixers that read both ways (attention) also take `attention_mask` [B, T] (True at real
tokens) for padded batches; left-to-right mixers never get one (LanguageModel.hidden: right
padding only, which cannot reach a real token's output). `causal` is chosen at call time, so one model switches between causal and bidirectional
use (a mixer that cannot read both ways sets `causal_only = True`: the model then has no
masked reading). Decoding passes `decode=True`, the layer's state from the previous call (None
at the start) and `offset`, the absolute position of x's first token; the mixer returns its
new state (a KV cache for attention; the recurrent state for recurrent mixers). Training
passes none of them and gets None back. `flops_per_token(seq_len)` gives the mixer's
training FLOPs beyond its weight matmuls (attention's scores, a recurrence's state updates),
for MFU. A mixer's knobs are its `Config` dataclass (model.mixer.*, conf/model/mixer/NAME.yaml);
`init_weights()`, when a mixer has it, runs after the model-wide init, so the mixer's own
initialisation (decay spectra, gate biases) is what stays."""

from __future__ import annotations

import copy
import dataclasses

from lmtk.errors import UserError, suggest
from lmtk.models.mixers.attention import Attention
from lmtk.models.mixers.gdn import GatedDeltaNet
from lmtk.models.mixers.gla import GLA
from lmtk.models.mixers.hgrn2 import HGRN2
from lmtk.models.mixers.linear import LinearAttention
from lmtk.models.mixers.mamba2 import Mamba2
from lmtk.models.mixers.metala import MetaLA
from lmtk.models.mixers.mlstm import MLSTM
from lmtk.models.mixers.retnet import RetNet

# The one list of mixer names. Each class has a `Config` dataclass of its knobs (model.mixer.*).
MIXERS = {
    "attention": Attention, "linear": LinearAttention, "retnet": RetNet, "gla": GLA, "hgrn2": HGRN2,
    "metala": MetaLA, "mamba2": Mamba2, "mlstm": MLSTM, "gdn": GatedDeltaNet,
}


def mixer_config(knobs: dict) -> dict:
    """model.mixer completed with the mixer's defaults; unknown names and keys are one-line errors."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    knobs = dict(knobs)
    name = knobs.pop("name", "attention")
    if name not in MIXERS:
        raise UserError(f"model.mixer.name={name} is not one of: {', '.join(MIXERS)}{suggest(str(name), MIXERS)}")
    fields = MIXERS[name].Config
    known = [f.name for f in dataclasses.fields(fields)]
    for key in knobs:
        if key not in known:
            raise UserError(f"unknown config key 'model.mixer.{key}' for mixer {name}{suggest(key, known)}"
                            + (f"; its keys: {', '.join(known)}" if known else "; it has no knobs"))
    try:
        merged = OmegaConf.merge(OmegaConf.structured(fields), knobs)
    except OmegaConfBaseException as err:
        raise UserError(f"invalid value for model.mixer.{getattr(err, 'key', '?')}: {str(getattr(err, 'msg', err)).splitlines()[0]}") from None
    knobs = OmegaConf.to_container(merged)
    fields(**knobs)  # the Config's own __post_init__ checks values (choices, ranges): a UserError
    return {"name": name, **knobs}


def layer_mixers(layers, n_layers: int, mixer: str) -> list[str]:
    """The mixer name of each layer. `layers`: None (every layer `mixer`), a pattern of one
    letter per layer (A softmax attention, R the configured recurrent `mixer`; spaces ignored)
    or a list of mixer names."""
    if layers is None:
        return [mixer] * n_layers
    if isinstance(layers, str):
        letters = layers.replace(" ", "")
        bad = sorted(set(letters) - set("AR"))
        if bad:
            raise UserError(f"model.layers='{layers}': use A (attention) and R (model.mixer) per layer, not {', '.join(bad)}")
        if "R" in letters and mixer == "attention":
            raise UserError(f"model.layers='{layers}' has R layers but model.mixer is attention; choose one, e.g. model/mixer=gla")
        names = ["attention" if c == "A" else mixer for c in letters]
    else:
        names = [str(n) for n in layers]
        for n in names:
            if n not in MIXERS:
                raise UserError(f"model.layers: '{n}' is not a mixer (one of: {', '.join(MIXERS)}){suggest(n, MIXERS)}")
    if len(names) != n_layers:
        raise UserError(f"model.layers gives {len(names)} layers but model.n_layers={n_layers}")
    return names


def layer_knobs(cfg, name: str) -> dict:
    """The knobs of a layer whose mixer is `name`: model.mixer's are its named mixer's, a layer of
    another mixer (a hybrid's attention layers, a list of names) takes that mixer's defaults."""
    return cfg.mixer if name == cfg.mixer["name"] else mixer_config({"name": name})


def build_mixer(cfg, layer: int):
    name = cfg.layer_mixers()[layer]
    if name != cfg.mixer["name"]:
        cfg = copy.copy(cfg)
        cfg.mixer = layer_knobs(cfg, name)
    return MIXERS[name](cfg, layer)


def causal_only(cfg) -> bool:
    """Whether a model of this config has a layer that cannot read bidirectionally (decided
    from the mixer classes, before any model is built)."""
    return any(getattr(MIXERS[n], "causal_only", False) for n in cfg.layer_mixers())
