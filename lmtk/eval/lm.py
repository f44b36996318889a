"""Language-model loss and bits-per-byte on held-out token windows: validation.

Training's validation (train/loop.py's evaluate) and `lmtk eval suite=ppl` both call
validate(): one definition of the number a run reports, so the two agree exactly on the same
data, checkpoint, token budget, batch size and seed. Each objective gives per-target negative log-likelihoods and the positions of
its targets in the batch (`Objective.nll`); bits-per-byte divides their sum by the UTF-8
bytes of text those targets stand for: the per-token byte counts stored beside the ids
(TokenCache.val_bytes, Tokenizer.encode_stream(with_bytes=True)), gathered at the same
positions, so every tokenizer is charged the real bytes of the text it scored."""

from __future__ import annotations

import math

import torch

from lmtk.device import autocast


@torch.no_grad()
def lm_metrics(model, objectives: dict, data, *, tokens: int, batch_size: int, device, dtype, seed: int) -> dict:
    """{<name>_loss, <name>_bpb} for each objective in `objectives` (name -> Objective), on the
    first `tokens` tokens of `data` (Batches with byte counts; without them no _bpb), with
    masking drawn from `seed`."""
    was_training = model.training
    model.eval()
    out = {}
    try:
        for name, obj in objectives.items():
            nats, n, nbytes, have_bytes = 0.0, 0, 0, True
            gen = torch.Generator(device).manual_seed(seed)
            for batch, batch_bytes in data.ordered(tokens, batch_size):
                batch = batch.to(device)
                with autocast(device, dtype):
                    nll, pos = obj.nll(model, batch, gen)
                nats += nll.double().sum().item()
                n += nll.numel()
                if batch_bytes is None:
                    have_bytes = False
                else:
                    nbytes += int(batch_bytes.gather(1, pos.cpu()).sum())
            out[f"{name}_loss"] = nats / max(1, n)
            if have_bytes:
                out[f"{name}_bpb"] = nats / math.log(2) / max(1, nbytes)
    finally:
        model.train(was_training)
    return out


def val_seed(cfg) -> int:
    """Seed of validation's masking: val.seed, or (null) derived from the run's seed."""
    return cfg.val.seed if cfg.val.seed is not None else cfg.seed + 12345


def readings(objective, mask_rate: float, model) -> tuple[dict, str | None]:
    """(name -> objective: the readings validation reports, a note or None). Every model gets its
    causal and masked reading (objective.val_objectives); a model whose mixer reads left to right
    only has no masked reading, and the note says so."""
    objs = objective.val_objectives(mask_rate)
    if model.causal_only:
        objs.pop("mlm", None)
        return objs, f"causal reading only (model.mixer={model.cfg.mixer['name']} reads left to right)"
    return objs, None


def validate(model, objectives: dict, data, *, main: str, tokens: int, batch_size: int, device, dtype, seed: int) -> dict:
    """val/<name>_loss and val/<name>_bpb for each reading (lm_metrics), and val/loss, val/bpb:
    the `main` reading's (the training objective's val_key)."""
    m = lm_metrics(model, objectives, data, tokens=tokens, batch_size=batch_size, device=device, dtype=dtype, seed=seed)
    out = {f"val/{k}": v for k, v in m.items()}
    for k in ("loss", "bpb"):
        if f"val/{main}_{k}" in out:
            out[f"val/{k}"] = out[f"val/{main}_{k}"]
    return out
