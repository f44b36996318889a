"""Hybrid CLM+MLM objectives: one model that is both a causal and a masked LM.

AntLM ("Bridging Causal and Masked Language Models", BabyLM 2024): training alternates whole
phases of CLM and MLM; only the attention mask and the loss switch, never the model.

GPT-BERT ("GPT or BERT: why not both?", BabyLM 2024): masked next-token prediction. A masked
token at position k+1 is predicted from the output at position k, so masked and causal
training share one shifted head and one loss; masked micro-batches attend bidirectionally.
"""

from __future__ import annotations

import torch

from lmtk.errors import UserError
from lmtk.objectives import CLM, MLM, VAL_MASK_RATE, Objective


def parse_phases(phases) -> list[tuple[str, float]]:
    out = []
    for p in phases:
        name, _, weight = str(p).partition(":")
        try:
            w = float(weight)
        except ValueError:
            raise UserError(f"objective.phases entry '{p}' is not name:weight (e.g. clm:4)") from None
        if name not in ("clm", "mlm") or w <= 0:
            raise UserError(f"objective.phases entry '{p}': the name must be clm or mlm and the weight positive")
        out.append((name, w))
    if not out:
        raise UserError("objective=antlm needs objective.phases, e.g. [clm:4,mlm:16,clm:4]")
    return out


class AntLM(Objective):
    name = "antlm"
    bidirectional = True

    def __init__(self, cfg, tok):
        super().__init__(cfg, tok)
        self.parts = {"clm": CLM(cfg, tok), "mlm": MLM(cfg, tok)}
        phases = parse_phases(cfg.phases)
        total = sum(w for _, w in phases)
        self.phases = []  # (end fraction, name)
        acc = 0.0
        for name, w in phases:
            acc += w
            self.phases.append((acc / total, name))

    def phase(self, frac: float) -> tuple[int, str]:
        for i, (end, name) in enumerate(self.phases):
            if frac < end:
                return i, name
        return len(self.phases) - 1, self.phases[-1][1]

    def predict(self, model, batch, gen, frac: float = 0.0):
        return self.parts[self.phase(frac)[1]].predict(model, batch, gen)

    def loss(self, model, batch, gen, frac: float = 0.0):
        i, name = self.phase(frac)
        return self.mean_loss(model, batch, *self.parts[name].predict(model, batch, gen)), {"phase": f"{i}:{name}"}


class MaskedNextToken(MLM):
    """GPT-BERT's masked half: corrupt positions 1..L-1, attend bidirectionally, predict the
    original token at p from the output at p-1 (only at masked positions: sparse prediction)."""

    name = "mntp"
    masked_shift = 1

    def predict(self, model, batch, gen, rate: float | None = None):
        x, pos = self.corrupt(batch, gen, rate=rate, first=1)
        h = model.hidden(x, causal=False)
        return h.gather(1, (pos - 1)[..., None].expand(-1, -1, h.shape[-1])), pos


class GPTBERT(Objective):
    name = "gpt-bert"
    bidirectional = True
    masked_shift = 1

    def __init__(self, cfg, tok):
        super().__init__(cfg, tok)
        if cfg.causal_weight < 0 or cfg.masked_weight < 0 or cfg.causal_weight + cfg.masked_weight == 0:
            raise UserError("objective.causal_weight and objective.masked_weight must be >= 0 and not both 0")
        self.causal = CLM(cfg, tok)
        self.masked = MaskedNextToken(cfg, tok)
        self.p_causal = cfg.causal_weight / (cfg.causal_weight + cfg.masked_weight)

    def mask_rate(self, frac: float) -> float:
        end = self.cfg.mask_rate_final
        return self.cfg.mask_rate if end is None else self.cfg.mask_rate + (end - self.cfg.mask_rate) * min(max(frac, 0.0), 1.0)

    def pick_causal(self, gen: torch.Generator, device) -> bool:
        return bool(torch.rand((), generator=gen, device=device) < self.p_causal)

    def predict(self, model, batch, gen, frac: float = 0.0):
        if self.pick_causal(gen, batch.device):
            return self.causal.predict(model, batch, gen)
        return self.masked.predict(model, batch, gen, rate=self.mask_rate(frac))

    def loss(self, model, batch, gen, frac: float = 0.0):
        causal = self.pick_causal(gen, batch.device)
        if causal:
            h, pos = self.causal.predict(model, batch, gen)
        else:
            h, pos = self.masked.predict(model, batch, gen, rate=self.mask_rate(frac))
        return self.mean_loss(model, batch, h, pos), {"phase": "causal" if causal else "masked", "mask_rate": self.mask_rate(frac)}

    def val_objectives(self, mask_rate: float = VAL_MASK_RATE) -> dict:
        return {"clm": self.causal, "mlm": MaskedNextToken(self.cfg, self._tok, rate=mask_rate)}
