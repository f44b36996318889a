"""Language-model loss and bits-per-byte on held-out token windows.

Training's validation calls this, and so will `lmtk eval`: one definition of the number a
run reports. Each objective gives per-target negative log-likelihoods (`Objective.nll`);
bits-per-byte divides their sum by the bytes of text those targets stand for."""

from __future__ import annotations

import math

import torch

from lmtk.device import autocast


@torch.no_grad()
def lm_metrics(model, objectives: dict, data, *, tokens: int, batch_size: int, device, dtype, seed: int,
               token_bytes) -> dict:
    """{<name>_loss, <name>_bpb} for each objective in `objectives` (name -> Objective), on the
    first `tokens` tokens of `data` (Batches), with masking drawn from `seed`."""
    was_training = model.training
    model.eval()
    out = {}
    try:
        for name, obj in objectives.items():
            nats, n, nbytes = 0.0, 0, 0
            gen = torch.Generator(device).manual_seed(seed)
            for batch in data.ordered(tokens, batch_size):
                batch = batch.to(device)
                with autocast(device, dtype):
                    nll, targets = obj.nll(model, batch, gen)
                nats += nll.double().sum().item()
                n += nll.numel()
                nbytes += int(token_bytes[targets.cpu().numpy()].sum())
            out[f"{name}_loss"] = nats / max(1, n)
            out[f"{name}_bpb"] = nats / math.log(2) / max(1, nbytes)
    finally:
        model.train(was_training)
    return out
