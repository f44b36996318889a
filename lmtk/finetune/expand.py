"""State expansion after training (StateX: Shen, Chen, Thai, Han, Liu and Sun 2025, "StateX:
Enhancing RNN Recall via Post-training State Expansion", arXiv:2509.22630):

    lmtk finetune base=RUN model.mixer.state_expand=2 peft=full [data=text ... | task=...]

A recurrent model's recall is bounded by its fixed-size state; training with a large state from
the start is costly, so StateX widens the state of a trained model and trains it briefly. Here
`model.mixer.state_expand=f` multiplies the base's state size by f: gla's key width per head
(S [Dk, Dv] -> [f Dk, Dv]), mamba2's N (h [N, P] -> [f N, P]). The widened model is built from the
base's config with the mixer's state_expand knob multiplied (so its checkpoints reload as what
they are) and each recurrent layer takes its base layer's weights through the mixer's
widen_state_from(base mixer), which starts the new state dimensions unread: the model's output
is the base's at step 0 (to float rounding), and training decides what to store there. Every
other weight (embeddings, norms, MLPs, attention layers of a hybrid, the head) is copied by name.

The paper instead re-initialises the expanded layers (GLA: one head of all the key and value
width; Mamba-2: 4x N), which loses the function until post-training recovers it; it expands a
subset of layers, which model.layers of a hybrid can mimic only by hand here (every recurrent
layer of the base is widened)."""

from __future__ import annotations

import torch

from lmtk.errors import UserError

KEY = "model.mixer.state_expand"


def requested(cfg) -> int | None:
    """The factor asked for on the command line (model.mixer.state_expand; the recipe's model is a
    placeholder for the base's, so nothing else of model.* is read), None for none or 1."""
    mixer = cfg.model.mixer
    f = mixer.get("state_expand") if hasattr(mixer, "get") else None
    if f is None or f == 1:
        return None
    if isinstance(f, bool) or not isinstance(f, int) or f < 1:
        raise UserError(f"{KEY}={f}: the state-size factor must be a whole number >= 1")
    return f


def check(lm, factor: int, peft_method: str) -> None:
    """One-line refusals: a base with no recurrent layer, a recurrent mixer that cannot widen its
    state, a PEFT method other than full."""
    from lmtk.models.mixers import MIXERS

    names = lm.cfg.layer_mixers()
    recurrent = sorted({n for n in names if n != "attention"})
    if not recurrent:
        raise UserError(f"{KEY}={factor}: the base is softmax attention, whose state (the KV cache) already grows with the "
                        "context; state expansion widens a recurrent mixer's fixed-size state (gla, mamba2)")
    able = [n for n, cls in MIXERS.items() if hasattr(cls, "widen_state_from")]
    for n in recurrent:
        if n not in able:
            raise UserError(f"{KEY}={factor}: the base's mixer {n} has no state expansion; it is implemented for {', '.join(able)}")
    if peft_method != "full":
        raise UserError(f"{KEY}={factor} needs peft=full: the widened weights are new to the base, so an adapter "
                        f"(peft={peft_method}) saved against the base's shapes could not be loaded onto it")


@torch.no_grad()
def expand_state(lm, factor: int, seed: int = 0):
    """A new LanguageModel: `lm`'s config with each recurrent mixer's state `factor` times larger,
    its weights `lm`'s (mixer.widen_state_from for the recurrent layers), in eval mode like a base.
    The new key / B rows' fresh initialisation is drawn under `seed`."""
    import dataclasses

    from lmtk.models import build_model

    cfg = lm.cfg
    mixer = dict(cfg.mixer)
    mixer["state_expand"] = int(mixer.get("state_expand", 1)) * factor
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new = build_model(dataclasses.replace(cfg, mixer=mixer))
    widened = {i for i, n in enumerate(cfg.layer_mixers()) if n != "attention"}
    src = dict(lm.named_parameters())
    for name, p in new.named_parameters():
        if name.startswith(tuple(f"blocks.{i}.mixer." for i in widened)):
            continue
        if src[name].shape != p.shape:
            raise RuntimeError(f"state expansion: {name} is {tuple(p.shape)} in the widened model, {tuple(src[name].shape)} in the base")
        p.copy_(src[name])
    for i in sorted(widened):
        new.blocks[i].mixer.widen_state_from(lm.blocks[i].mixer)
    return new.to(next(lm.parameters()).device).eval()


def state_size(lm) -> int:
    """Recurrent state entries per sequence, summed over the layers (the readout's S or h)."""
    total = 0
    for b in lm.blocks:
        m = b.mixer
        if hasattr(m, "dk"):
            total += m.n_heads * m.dk * m.dv
        elif hasattr(m, "d_state"):
            total += m.n_heads * m.d_state * m.head_dim
    return total
