"""Distillation's stages as one objective of the one loop (distill.stages: fractions of the budget).

    mixer    each aligned student layer's mixer gets its teacher layer's mixer input and matches
             that layer's mixer output: MSE per layer, averaged over layers ("attention transfer",
             LoLCATs; MOHAWK's matrix-mixing alignment, on outputs)
    hidden   each aligned student block gets its teacher block's input (the residual stream) and
             matches the block's output (MOHAWK's hidden-state alignment)
    kd       end to end: alpha CE(labels) + (1 - alpha) T^2 KL per token (kd.py), both heads fused
             so no [tokens, vocab] logits exist

The stage is a function of the budget fraction, as AntLM's phase is, so a resumed run is in the
right stage. Aligned layers are those not copied whole from the teacher (transfer.kept_layers):
a kept layer would match exactly and only weight decay would move it. The alignment stages run
only the student's layers they align (its embeddings and other layers get no gradient), and with
LoRA (peft=lora) each stage trains its own parameters: the alignment stages the student's fresh
(not copied) parameters of the aligned layers, kd the adapters. Both need DDP told that some
parameters go without gradients in a step (partial_steps)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmtk.errors import UserError

STAGES = ("mixer", "hidden", "kd")


def parse_stages(spec) -> list[tuple[str, float]]:
    """["mixer:0.1", "kd:0.9"] -> [("mixer", 0.1), ("kd", 0.9)]; one-line errors for unknown names,
    bad fractions and fractions that do not sum to 1."""
    items = [spec] if isinstance(spec, str) else list(spec or [])
    if not items:
        raise UserError("distill.stages is empty: give stages with budget fractions, e.g. distill.stages=[mixer:0.1,kd:0.9]")
    out = []
    for item in items:
        name, sep, frac = str(item).partition(":")
        name = name.strip()
        if name not in STAGES:
            from lmtk.errors import suggest

            raise UserError(f"distill.stages: unknown stage '{name}' (one of: {', '.join(STAGES)}){suggest(name, STAGES)}")
        try:
            f = float(frac) if sep else float("nan")
        except ValueError:
            f = float("nan")
        if not f > 0:
            raise UserError(f"distill.stages: '{item}' needs a positive budget fraction, e.g. {name}:0.5")
        out.append((name, f))
    total = sum(f for _, f in out)
    if abs(total - 1.0) > 1e-6:
        raise UserError(f"distill.stages fractions sum to {total:g}, not 1: {', '.join(map(str, items))}")
    return out


def stage_at(stages: list[tuple[str, float]], frac: float) -> tuple[str, float]:
    """(the stage at budget fraction `frac`, the fraction of that stage used)."""
    start = 0.0
    for i, (name, f) in enumerate(stages):
        if frac < start + f or i == len(stages) - 1:
            return name, min(1.0, max(0.0, (frac - start) / f))
        start += f
    raise AssertionError("unreachable")


class DistillObjective:
    """The student's loss at each step: the stage's (see the module docstring). `teacher` is
    frozen, in eval mode, on the student's device; `layers` the student layers the alignment stages
    train; `trainable` {stage: parameter names} when stages train different parameters (LoRA),
    else None (every trainable parameter may get a gradient in every stage)."""

    name = "clm"  # the student is a causal LM: its checkpoints read as one
    masked_shift = 0
    val_key = "clm"
    bidirectional = False
    head_fraction = 1.0
    partial_steps = True  # loop: parameters without gradients in a step are expected (DDP)

    def __init__(self, teacher, stages, layers: list[int], dcfg, ocfg, student=None, trainable: dict | None = None):
        self.teacher, self.stages, self.layers = teacher, stages, list(layers)
        self.alpha, self.T, self.kl = float(dcfg.alpha), float(dcfg.temperature), str(dcfg.kl)
        self.fused = bool(getattr(ocfg, "fused_head", True))
        self.chunk = int(getattr(ocfg, "head_chunk", 1024) or 1024)
        self.student, self.trainable = student, trainable
        self._stage = None
        if not self.layers and any(s in ("mixer", "hidden") for s, _ in stages):
            raise UserError("every student layer is its teacher's layer (copied whole): the mixer and hidden stages have "
                            "nothing to align; use distill.stages=[kd:1.0] or give the student other mixers")

    def stage(self, frac: float) -> str:
        return stage_at(self.stages, frac)[0]

    def _enter(self, stage: str) -> None:
        """Which parameters train in `stage` (only when stages train different parameters)."""
        if stage == self._stage:
            return
        self._stage = stage
        if self.trainable is not None:
            names = self.trainable[stage]
            for n, p in self.student.named_parameters():
                p.requires_grad_(n in names)

    def loss(self, model, batch: torch.Tensor, gen=None, frac: float = 0.0):
        stage = self.stage(frac)
        self._enter(stage)
        if stage == "kd":
            return self.kd_loss(model, batch, stage)
        return self.align_loss(model, batch, stage)

    @torch.no_grad()
    def _trace(self, batch: torch.Tensor) -> list[dict]:
        trace: list[dict] = []
        self.teacher.hidden(batch, causal=True, trace=trace)
        return trace

    def align_loss(self, model, batch: torch.Tensor, stage: str):
        """Mean over the aligned layers of MSE(student layer(teacher's input), teacher's output)."""
        part, (src, dst) = ("mixer", ("mixer_in", "mixer_out")) if stage == "mixer" else ("block", ("block_in", "block_out"))
        trace = self._trace(batch)
        outs = model.align(part, {i: trace[i][src] for i in self.layers})
        per_layer = {i: F.mse_loss(outs[i].float(), trace[i][dst].float()) for i in self.layers}
        loss = torch.stack(list(per_layer.values())).mean()
        return loss, {"phase": stage, **{f"align/{i}": v.detach() for i, v in per_layer.items()}}

    def kd_loss(self, model, batch: torch.Tensor, stage: str = "kd"):
        from lmtk.distill.kd import kd_reference, linear_kd

        student = model.model if hasattr(model, "model") else model  # the LanguageModel behind the loop's step model
        h = model.hidden(batch, causal=True)[:, :-1]
        targets = batch[:, 1:].reshape(-1)
        if self.alpha == 1.0:  # the labels alone (LoLCATs' stage 2): the training head, no teacher pass
            loss = model.head_loss(h, batch[:, 1:], chunk=self.chunk) if self.fused else \
                F.cross_entropy(model.logits(h).float().flatten(0, 1), targets)
            return loss, {"phase": stage, "kd/ce": loss.detach()}
        with torch.no_grad():
            th = self.teacher.hidden(batch, causal=True)[:, :-1].reshape(-1, h.shape[-1])
        hs = student.head_input(h.reshape(-1, h.shape[-1]))  # head transform, muP's readout multiplier
        if self.fused and torch.is_grad_enabled():
            teacher = self.teacher

            def teacher_logits(s: int, e: int) -> torch.Tensor:
                # called inside the fused loss, where autocast is off: the rows in the head's dtype
                with torch.no_grad():
                    return teacher.logits(th[s:e].to(teacher.head.weight.dtype))
            loss, ce, kl = linear_kd(hs, student.head.weight, student.head.bias, targets, teacher_logits,
                                     self.alpha, self.T, self.kl, self.chunk)
        else:
            with torch.no_grad():
                t = self.teacher.logits(th)
            loss, ce, kl = kd_reference(student.head(hs), t, targets, self.alpha, self.T, self.kl)
        return loss, {"phase": stage, "kd/ce": ce.detach(), "kd/kl": kl.detach()}
