"""suite=passkey: a number hidden at chosen depths of filler text, then asked for.

Each prompt is an instruction, filler, the needle ("The secret number is 48213. ...") at a
depth fraction of the filler, more filler and the question; the model continues it by greedy
decoding through the cached generation (models.infer.generate), and a trial counts when the
digits it writes first are the key's exactly. Accuracy per context length and depth. A
context length L is the prompt plus room for the answer (digits + 2 tokens), so a length
within the model's context (max_seq_len) is decoded without cropping; longer ones are
reported as past the context, not scored. Any run with a causal reading takes it (CLM,
hybrids, GPT-BERT, recurrent mixers); a masked-only (MLM) run is refused.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from lmtk.errors import UserError

INTRO = "A secret number is hidden in the text below. Remember it."
FILLER = (" The river runs past the old mill. Birds sing in the morning and rest at noon."
          " The road goes on over the hill and down again. A cart passes, then another.")
NEEDLE = " The secret number is {key}. Remember it: {key}."
QUESTION = " What is the secret number? The secret number is"


@dataclass
class Config:
    lengths: List[int] = field(default_factory=lambda: [256, 512, 1024, 2048])  # context lengths in tokens (prompt + answer room)
    depths: List[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # where the needle sits in the filler, 0 start .. 1 end
    trials: int = 4  # prompts per (length, depth), each with its own key
    digits: int = 5  # digits of the key
    batch_size: int = 8  # prompts decoded together
    seed: Optional[int] = None  # keys; null: the eval's seed

    def __post_init__(self):
        for key in ("trials", "digits", "batch_size"):
            if getattr(self, key) < 1:
                raise UserError(f"passkey.{key}={getattr(self, key)} must be at least 1")
        if not self.lengths or not self.depths:
            raise UserError("passkey.lengths and passkey.depths need at least one value each")
        bad = [d for d in self.depths if not 0.0 <= d <= 1.0]
        if bad:
            raise UserError(f"passkey.depths: {bad[0]} is not a fraction between 0 (start) and 1 (end)")


@dataclass
class Prompt:
    ids: List[int]
    needle_start: int  # token index where the needle begins
    answer: str  # the key's digits


def answer_room(digits: int) -> int:
    """Tokens decoded after the prompt: one per digit at worst, a leading space and one spare."""
    return digits + 2


def build_prompt(tok, length: int, depth: float, key: str) -> Prompt:
    """A prompt of exactly length - answer_room(len(key)) tokens with the needle after `depth` of the filler."""
    intro, needle, question = tok.encode(INTRO), tok.encode(NEEDLE.format(key=key)), tok.encode(QUESTION)
    n_fill = length - answer_room(len(key)) - len(intro) - len(needle) - len(question)
    if n_fill < 0:
        raise UserError(f"passkey.lengths: {length} tokens is too short for the prompt (it needs at least "
                        f"{length - n_fill} with this tokenizer); use longer lengths")
    piece = tok.encode(FILLER)
    fill = (piece * (n_fill // max(1, len(piece)) + 1))[:n_fill]
    before = round(depth * n_fill)
    ids = intro + fill[:before] + needle + fill[before:] + question
    return Prompt(ids=ids, needle_start=len(intro) + before, answer=key)


def make_key(rng: random.Random, digits: int) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1)) if digits > 1 else str(rng.randint(0, 9))


def read_answer(text: str) -> str:
    """The digits the model wrote first (spaces between digits ignored, as some tokenizers decode them)."""
    m = re.match(r"\s*(\d[\d ]*)", text)
    return m.group(1).replace(" ", "") if m else ""


def check_causal(target) -> None:
    from lmtk.checkpoint import objective_name
    from lmtk.objectives import ENCODER_OBJECTIVES

    name = objective_name(target.meta or {})
    if name in ENCODER_OBJECTIVES:
        raise UserError(f"suite=passkey decodes left to right, but run {target.name} was trained with objective={name} "
                        "(masked only: it has no causal reading); evaluate a clm, hybrid or gpt-bert run")


@torch.no_grad()
def score(model, tok, prompts: list[Prompt], max_new: int, device, dtype, batch_size: int) -> list[bool]:
    """Exact match of each prompt's greedy continuation (cached generation) with its key."""
    from lmtk.device import autocast
    from lmtk.models.infer import generate

    from lmtk.log import Progress

    out = []
    with Progress(f"passkey ({len(prompts[0].ids) if prompts else 0} tokens)", len(prompts), "prompts") as progress:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            ids = torch.tensor([p.ids for p in chunk], device=device)  # one length per cell: no padding
            with autocast(device, dtype):
                gen = generate(model, ids, max_new, temperature=0)
            for p, row in zip(chunk, gen[:, ids.shape[1]:].tolist()):
                out.append(read_answer(tok.decode(row)) == p.answer)
            progress(len(chunk))
    return out


def _pct(d: float) -> str:
    return f"{100 * d:g}%"


def run(target, cfg: Config) -> dict:
    check_causal(target)
    seed = target.seed if cfg.seed is None else cfg.seed
    context = target.model_cfg.max_seq_len
    max_new = answer_room(cfg.digits)
    fits = [L for L in cfg.lengths if L <= context]
    past = [L for L in cfg.lengths if L > context]
    if not fits:
        raise UserError(f"suite=passkey: every length in passkey.lengths ({', '.join(map(str, cfg.lengths))}) is past the "
                        f"model's context (max_seq_len {context}); give lengths up to {context}")
    model = target.model
    model.eval()
    rows, scores, n = [], {}, 0
    cell_acc = []
    for L in cfg.lengths:
        row = {"length": L}
        if L > context:
            rows.append({**row, **{_pct(d): None for d in cfg.depths}, "mean": None,
                         "note": f"past the context ({context}): not scored"})
            continue
        accs = []
        for d in cfg.depths:
            rng = random.Random(f"{seed}/{L}/{d}")
            prompts = [build_prompt(target.tokenizer, L, d, make_key(rng, cfg.digits)) for _ in range(cfg.trials)]
            hits = score(model, target.tokenizer, prompts, max_new, target.device, target.dtype or torch.float32, cfg.batch_size)
            acc = sum(hits) / len(hits)
            row[_pct(d)] = acc
            accs.append(acc)
            n += len(hits)
        row["mean"] = sum(accs) / len(accs)
        row["note"] = ""
        rows.append(row)
        cell_acc += accs
        scores[f"len{L}"] = row["mean"]
    scores = {"accuracy": sum(cell_acc) / len(cell_acc), **scores}
    notes = [f"{cfg.trials} prompts per (length, depth), {cfg.digits}-digit keys, greedy decoding of {max_new} tokens, seed {seed}"]
    if past:
        notes.append(f"lengths past the model's context ({context} tokens): {', '.join(map(str, past))} (reported, not scored)")
    return {"scores": scores, "samples": n, "rows": rows, "notes": notes, "seed": seed}
