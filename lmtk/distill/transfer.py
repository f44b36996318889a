"""Weight transfer from the teacher into the student before distillation (distill.init).

    scratch    nothing: the student's own initialisation
    copy       embeddings, positions, norms, MLPs, the head (and BERT's head transform / pooler);
               the mixers stay fresh. A student layer whose mixer is the teacher layer's own (the
               same mixer with the same knobs: a hybrid's attention layers) is copied whole.
    qkv_copy   copy, and each teacher attention layer's q, k, v and o go into the student mixer's
               matching projections (mixer.attention_slots(): gla's q, k, v, out; mamba2's C, B, x
               rows of in_proj and out_proj; ...); grouped key/value heads are repeated for the
               query heads they serve; gates, decays and feature maps stay fresh. A short conv in
               front of copied projections starts as the identity (its last tap 1), so the copies
               reach the recurrence as they are.
    auto       qkv_copy where every recurrent layer of the student can take its teacher layer's
               q, k, v, o at its configured widths, else copy (a note says why).

The student's model config is the teacher's with model.mixer and model.layers replaced, so every
copied tensor has the same name and shape in both. Returns what was copied, which distillation's
stages use to tell the layers copied whole (nothing to align) from the rest."""

from __future__ import annotations

import torch

from lmtk.errors import UserError

INITS = ("auto", "scratch", "copy", "qkv_copy")


def kept_layers(student, teacher) -> list[int]:
    """Layers whose student mixer is the teacher layer's own (name and knobs): copied whole."""
    from lmtk.models.mixers import layer_knobs

    s_names, t_names = student.cfg.layer_mixers(), teacher.cfg.layer_mixers()
    return [i for i, (a, b) in enumerate(zip(s_names, t_names))
            if a == b and layer_knobs(student.cfg, a) == layer_knobs(teacher.cfg, b)]


def qkv_problem(student, teacher) -> str | None:
    """Why qkv_copy cannot run (one line), or None when it can."""
    kept = set(kept_layers(student, teacher))
    for i, (sb, tb) in enumerate(zip(student.blocks, teacher.blocks)):
        if i in kept:
            continue
        t_kind = teacher.cfg.layer_mixers()[i]
        if t_kind != "attention":
            return (f"teacher layer {i} is {t_kind}, not softmax attention: distill.init=qkv_copy has no q, k, v, o to copy "
                    "from it; use distill.init=copy")
        slots = sb.mixer.attention_slots()
        name = student.cfg.layer_mixers()[i]
        if slots is None:
            return (f"the student's {name} has no projections attention's q, k, v could go into; use distill.init=copy")
        att = tb.mixer
        for role, slot in slots.items():
            heads_ok = slot.heads in ((att.n_heads,) if role in ("q", "o") else (att.n_heads, att.n_kv))
            if not heads_ok or slot.head_dim != att.head_dim:
                grouped = role in ("k", "v") and att.n_kv != att.n_heads
                want = f"{att.n_kv} or {att.n_heads} heads x {att.head_dim}" if grouped else f"{att.n_heads} x {att.head_dim}"
                knobs = type(sb.mixer).attention_knobs(teacher.cfg, student.cfg.mixer) or {}
                shape = " ".join(f"model.mixer.{k}={'null' if v is None else v}" for k, v in knobs.items())
                return (f"distill.init=qkv_copy: layer {i}'s {name} {role} is {slot.heads} heads x {slot.head_dim}, the teacher's "
                        f"attention {role} {want}; give the student attention's shapes (distill.shape=attention: {shape}) "
                        "or use distill.init=copy")
    return None


def resolve_init(init: str, student, teacher) -> tuple[str, str | None]:
    """(the init that runs, a note for auto's choice or None); qkv_copy that cannot run is an error."""
    if init not in INITS:
        raise UserError(f"distill.init={init} is not one of: {', '.join(INITS)}")
    if init in ("qkv_copy", "auto"):
        problem = qkv_problem(student, teacher)
        if problem is None:
            return "qkv_copy", None
        if init == "qkv_copy":
            raise UserError(problem)
        return "copy", f"distill.init=auto chose copy, not qkv_copy: {problem.removeprefix('distill.init=qkv_copy: ')}"
    return init, None


@torch.no_grad()
def transfer(student, teacher, init: str) -> dict:
    """Copy the teacher's weights into the student as `init` says (scratch | copy | qkv_copy, after
    resolve_init). Returns {"init", "copied": student parameter names given teacher values,
    "kept": layers copied whole, "qkv": layers given attention's projections}."""
    record = {"init": init, "copied": [], "kept": [], "qkv": []}
    if init == "scratch":
        return record
    t_params = dict(teacher.named_parameters())
    kept = kept_layers(student, teacher)
    record["kept"] = kept

    def take(name: str) -> None:
        p = dict(student.named_parameters())[name]
        p.copy_(t_params[name])
        record["copied"].append(name)

    for name, _ in student.named_parameters():
        if not name.startswith("blocks."):
            take(name)  # embeddings, positions, final norm, head, head transform, pooler
            continue
        layer, rest = name.split(".", 2)[1:]
        if not rest.startswith("mixer.") or int(layer) in kept:
            take(name)  # norms and MLP of every block; the whole of a kept layer
    if init == "qkv_copy":
        for i, (sb, tb) in enumerate(zip(student.blocks, teacher.blocks)):
            if i not in kept:
                record["copied"] += _attention_into(sb.mixer, tb.mixer, f"blocks.{i}.mixer.")
                record["qkv"].append(i)
    return record


def _attention_into(mixer, att, prefix: str) -> list[str]:
    """The attention layer `att`'s q, k, v, o into `mixer`'s slots; returns the names written."""
    H, Hkv, Dh = att.n_heads, att.n_kv, att.head_dim
    W = att.qkv.weight
    Bias = att.qkv.bias
    rows = {"q": slice(0, H * Dh), "k": slice(H * Dh, (H + Hkv) * Dh), "v": slice((H + Hkv) * Dh, (H + 2 * Hkv) * Dh)}
    written = []
    names = {id(m): n for n, m in mixer.named_modules()}
    for role, slot in mixer.attention_slots().items():
        lin = slot.linear
        lname = prefix + names[id(lin)]
        if role == "o":
            lin.weight.copy_(att.out.weight)
            if lin.bias is not None and att.out.bias is not None:
                lin.bias.copy_(att.out.bias)
                written.append(lname + ".bias")
            written.append(lname + ".weight")
            continue
        w = W[rows[role]].unflatten(0, (-1, Dh))  # [heads, Dh, d]
        b = None if Bias is None else Bias[rows[role]].unflatten(0, (-1, Dh))
        if w.shape[0] != slot.heads:  # grouped key/value heads, one per query head they serve
            w = w.repeat_interleave(slot.heads // w.shape[0], dim=0)
            b = None if b is None else b.repeat_interleave(slot.heads // b.shape[0], dim=0)
        span = slice(slot.offset, slot.offset + slot.heads * slot.head_dim)
        lin.weight[span].copy_(w.flatten(0, 1))
        written.append(lname + ".weight")
        if b is not None and lin.bias is not None:
            lin.bias[span].copy_(b.flatten(0, 1))
            written.append(lname + ".bias")
    if getattr(mixer, "conv", None) is not None:  # the identity: copied projections reach the recurrence as they are
        mixer.conv.weight.zero_()
        mixer.conv.weight[:, :, -1] = 1.0
        mixer.conv.bias.zero_()
    return sorted(set(written))
