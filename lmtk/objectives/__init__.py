"""Objectives: the only thing that differs between CLM, MLM and hybrid training.

An objective maps (model, batch of token windows, RNG) to the hidden states that predict
tokens and the positions in the batch of the tokens they predict (`predict`); the targets are
the batch's tokens at those positions. `nll` runs the head on them (per-target negative
log-likelihoods and the positions, so validation can charge each target its bytes of text),
`loss` is their mean, computed in training by the fused
head + cross-entropy (model.head_loss) that never materialises the logits. The loop never
looks inside."""

from __future__ import annotations

import abc

import torch
import torch.nn.functional as F

from lmtk.data.tokenizer import require_special
from lmtk.errors import UserError

VAL_MASK_RATE = 0.15  # default of val.mask_rate: validation masks 15% whatever the training rate


class Objective(abc.ABC):
    name = "?"
    masked_shift = 0  # masked predictions: the output at p - masked_shift predicts token p
    val_key = "clm"  # which val/<key>_loss is this objective's val/loss
    head_fraction = 1.0  # share of positions the LM head runs on (for FLOPs / MFU)
    bidirectional = False  # trains a masked (bidirectional) reading: needs mixers that read both ways

    def __init__(self, cfg, tok):
        self.cfg = cfg
        self._tok = tok
        self.vocab = tok.vocab_size
        self.mask_id = tok.mask_id
        self.n_special = len(tok.special_ids)  # lmtk's tokenizers: the specials are ids 0..n_special-1
        # training loss through model.head_loss (fused, chunked head + cross-entropy) unless
        # objective.fused_head=false; validation always runs the plain head (it needs per-target nll)
        self.fused_head = bool(getattr(cfg, "fused_head", True))
        self.head_chunk = getattr(cfg, "head_chunk", None)  # rows per chunk of the fused head (None: its default)
        self.head_dispatch = True  # the plain head where the fused one does not pay (fused_ce.fused_pays)

    @abc.abstractmethod
    def predict(self, model, batch: torch.Tensor, gen: torch.Generator):
        """(final hidden states [B, k, d] that make the predictions, positions [B, k] in the batch
        of the tokens they predict): the targets are batch.gather(1, positions)."""

    def nll(self, model, batch: torch.Tensor, gen: torch.Generator, *args, **kwargs):
        """(nll [B, k] in nats, positions [B, k]) for the predicted tokens of the batch: target
        (b, j) is batch[b, positions[b, j]]. Extra arguments go to predict() (a hybrid's budget
        fraction, a mask rate)."""
        h, pos = self.predict(model, batch, gen, *args, **kwargs)
        return _nll(model.logits(h), batch.gather(1, pos)).reshape(pos.shape), pos

    def attach(self, model) -> None:
        """Add this objective's own trainable heads to `model.objective_heads` (none by default), before
        training starts: there they are optimized and checkpointed with the model (resume restores
        them), while generation, evaluation and export use the model's own head alone."""

    def val_objectives(self, mask_rate: float = VAL_MASK_RATE) -> dict:
        """The causal and the masked reading of this model, reported at every validation; the
        masked one masks `mask_rate` (val.mask_rate) of the tokens (only with a tokenizer that has
        a mask token: an imported GPT-2 tokenizer has none)."""
        out = {"clm": CLM(self.cfg, self._tok)}
        if getattr(self._tok, "mask_id", None) is not None:
            out["mlm"] = MLM(self.cfg, self._tok, rate=mask_rate)
        return out

    def loss(self, model, batch: torch.Tensor, gen: torch.Generator, frac: float = 0.0):
        """(mean loss, metrics). `frac` is the budget fraction used so far, for objectives
        that change over training (phase schedules, mask-rate decay); metrics may carry
        non-tensor values such as the phase name, which the loop logs as they are."""
        return self.mean_loss(model, batch, *self.predict(model, batch, gen)), {}

    def mean_loss(self, model, batch: torch.Tensor, h: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the head on `h` against the batch's tokens at `pos`: the mean of
        nll(), without materialising the logits when gradients are wanted (model.head_loss)."""
        targets = batch.gather(1, pos)
        if self.fused_head and torch.is_grad_enabled():
            return model.head_loss(h, targets, chunk=self.head_chunk, dispatch=self.head_dispatch)
        return _nll(model.logits(h), targets).mean()


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")


class CLM(Objective):
    """Next-token prediction under a causal mask."""

    name = "clm"

    def predict(self, model, batch, gen):
        B, L = batch.shape
        return model.hidden(batch, causal=True)[:, :-1], torch.arange(1, L, device=batch.device).expand(B, -1)


class MLM(Objective):
    """BERT masking with a fixed number of positions per sequence (static shapes for compile),
    80% [MASK] / 10% random / 10% unchanged, bidirectional attention, and sparse prediction:
    the LM head runs only on the selected positions (Cramming)."""

    name = "mlm"
    val_key = "mlm"
    bidirectional = True

    def __init__(self, cfg, tok, rate: float | None = None):
        super().__init__(cfg, tok)
        require_special(tok, "mask", f"objective={self.name} (masked prediction) puts in place of the tokens it hides")
        self.rate = cfg.mask_rate if rate is None else rate
        self.head_fraction = self.rate
        # random replacements are drawn from the non-special ids: n_special.. when the specials
        # are ids 0..n-1 (lmtk's tokenizers), else through a table (imported tokenizers)
        specials = tok.special_ids
        self.replace_ids = None
        if specials != list(range(len(specials))):
            keep = torch.ones(self.vocab, dtype=torch.bool)
            keep[[i for i in specials if i < self.vocab]] = False
            self.replace_ids = keep.nonzero().squeeze(1)

    def corrupt(self, batch, gen, rate: float | None = None, first: int = 0):
        """(corrupted batch, selected positions [B, k]); positions drawn from first..L-1."""
        B, L = batch.shape
        rate = self.rate if rate is None else rate
        k = max(1, round(rate * (L - first)))
        pos = first + torch.rand(B, L - first, generator=gen, device=batch.device).argsort(dim=1)[:, :k]
        n_mask = round(self.cfg.mask_token_frac * k)
        n_rand = round(self.cfg.random_token_frac * k)
        x = batch.clone()
        rows = torch.arange(B, device=batch.device)[:, None]
        x[rows, pos[:, :n_mask]] = self.mask_id
        if n_rand:
            if self.replace_ids is None:
                rand = torch.randint(self.n_special, self.vocab, (B, n_rand), generator=gen, device=batch.device)
            else:
                if self.replace_ids.device != batch.device:  # moved once, not every step
                    self.replace_ids = self.replace_ids.to(batch.device)
                table = self.replace_ids
                rand = table[torch.randint(0, len(table), (B, n_rand), generator=gen, device=batch.device)]
            x[rows, pos[:, n_mask : n_mask + n_rand]] = rand
        return x, pos

    def predict(self, model, batch, gen):
        x, pos = self.corrupt(batch, gen)
        h = model.hidden(x, causal=False)
        return h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1])), pos


def objective_class(name: str) -> type[Objective]:
    from lmtk.objectives.hybrid import GPTBERT, AntLM
    from lmtk.objectives.mtp import MTP
    from lmtk.objectives.rts import RTS

    classes = {"clm": CLM, "mlm": MLM, "antlm": AntLM, "gpt-bert": GPTBERT, "mtp": MTP, "rts": RTS}
    if name not in classes:
        raise UserError(f"unknown objective '{name}'; choices: {', '.join(classes)}")
    return classes[name]


def build_objective(cfg, tok) -> Objective:
    return objective_class(cfg.name)(cfg, tok)


# objectives that train a masked (bidirectional) reading only, with BERT's convention (masked_shift 0):
# their checkpoints are encoders (fine-tuning's first-token head, export as BERT, no causal reading)
ENCODER_OBJECTIVES = ("mlm", "rts")


class Labelled:
    """Next-token prediction scored only where a label is given: batches are inputs and
    targets stacked, [B, 2, L] (lmtk.data.synthetic.MQARData), and every row has the same
    number of scored positions (targets other than IGNORE; MQAR: the kv query positions), so
    the head runs on those rows alone, as MLM's sparse prediction does. For synthetic tasks
    trained by eval suites (lmtk.eval.mqar); not a choice of objective= for `lmtk train`."""

    name = "labelled"
    masked_shift = 0
    val_key = "labelled"
    bidirectional = False

    def __init__(self, scored_per_row: int, seq_len: int):
        self.k = scored_per_row
        self.head_fraction = scored_per_row / seq_len  # for FLOPs / MFU

    def predict(self, model, batch: torch.Tensor):
        """(hidden states [B, k, d] at the scored positions, their targets [B, k])."""
        from lmtk.data.synthetic import IGNORE

        inputs, targets = batch[:, 0], batch[:, 1]
        h = model.hidden(inputs, causal=True)
        # the k scored positions of each row, in order, without a host sync (nonzero() would sync)
        pos = (targets != IGNORE).to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, : self.k]
        return h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1])), targets.gather(1, pos)

    def loss(self, model, batch: torch.Tensor, gen: torch.Generator, frac: float = 0.0):
        h, targets = self.predict(model, batch)
        return model.head_loss(h, targets), {}
