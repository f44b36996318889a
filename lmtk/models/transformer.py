"""LanguageModel: embeddings -> stack of Blocks -> final norm -> tied LM head.

`hidden(idx, causal)` returns the final hidden states and `logits(h)` applies the head,
so objectives can run the head on a subset of positions (sparse MLM prediction);
`head_loss(h, targets)` is the head + mean cross-entropy fused, for training."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.utils.checkpoint

from lmtk.models.fused_ce import linear_cross_entropy
from lmtk.models.layers import MLP, ROPE_LAYOUTS, default_d_ff, make_norm, sinusoidal_table
from lmtk.models.mixers import build_mixer


@dataclass
class ModelConfig:
    vocab_size: int
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # grouped-query attention: key/value heads (None: n_heads)
    window: Optional[int] = None  # sliding-window attention: keys each query sees (None: all)
    d_ff: Optional[int] = None
    max_seq_len: int = 1024
    positions: str = "learned"
    rope_base: float = 10000.0
    # "half" (rotate_half, the fast one; what conf/model sets) | "interleaved": the layout of runs
    # written before issue 16, whose model.json has no rope_layout, hence this default
    rope_layout: str = "interleaved"
    norm: str = "layernorm"
    norm_position: str = "pre"
    norm_eps: Optional[float] = None  # None: the norm's usual (layers.NORM_EPS); model.json written before it has none
    embedding_norm: bool = False
    bias: bool = True
    mlp: str = "gelu"
    mixer: dict = field(default_factory=lambda: {"name": "attention"})  # name + the mixer's knobs
    layers: Optional[object] = None  # hybrids: a letter per layer (A / R) or mixer names (mixers.layer_mixers)
    dropout: float = 0.0
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self):
        from lmtk.models.mixers import mixer_config

        if self.d_ff is None:
            self.d_ff = default_d_ff(self.d_model, self.mlp)
        if self.rope_layout not in ROPE_LAYOUTS:
            raise ValueError(f"rope_layout={self.rope_layout!r}: one of {', '.join(ROPE_LAYOUTS)}")
        # model.json written before mixers had knobs says "mixer": "attention"
        self.mixer = mixer_config({"name": self.mixer} if isinstance(self.mixer, str) else dict(self.mixer))
        if self.layers is not None and not isinstance(self.layers, str):
            self.layers = [str(n) for n in self.layers]

    def layer_mixers(self) -> list[str]:
        from lmtk.models.mixers import layer_mixers

        return layer_mixers(self.layers, self.n_layers, self.mixer["name"])

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)


class Block(nn.Module):
    """norm -> mixer -> residual, norm -> MLP -> residual (pre-norm); post-norm normalises after each residual."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.pre = cfg.norm_position == "pre"
        self.norm1 = make_norm(cfg.norm, cfg.d_model, cfg.bias, cfg.norm_eps)
        self.mixer = build_mixer(cfg, layer)
        self.norm2 = make_norm(cfg.norm, cfg.d_model, cfg.bias, cfg.norm_eps)
        self.mlp = MLP(cfg.d_model, cfg.d_ff, cfg.mlp, cfg.bias, cfg.dropout)

    def forward(self, x, causal: bool = True, state=None, offset: int = 0, decode: bool = False, attention_mask=None):
        """(x, the mixer's new state): state, offset and decode carry decoding (models/mixers);
        attention_mask [B, T] (True at real tokens) reaches mixers that read both ways (attention):
        a left-to-right mixer's outputs at real tokens of a right-padded batch do not depend on
        the pads after them, and LanguageModel.hidden refuses other padding for such models."""
        kw = {} if attention_mask is None or self.mixer.causal_only else {"attention_mask": attention_mask}
        if self.pre:
            h, state = self.mixer(self.norm1(x), causal=causal, state=state, offset=offset, decode=decode, **kw)
            x = x + h
            return x + self.mlp(self.norm2(x)), state
        h, state = self.mixer(x, causal=causal, state=state, offset=offset, decode=decode, **kw)
        x = self.norm1(x + h)
        return self.norm2(x + self.mlp(x)), state


def _scalar_pos_scale(state_dict, prefix, *args) -> None:
    """Checkpoints written before pos_scale had shape [1] hold a scalar: reshape on load."""
    key = prefix + "pos_scale"
    if key in state_dict and state_dict[key].dim() == 0:
        state_dict[key] = state_dict[key].reshape(1)


@dataclass
class DecodeCache:
    """Decoding state of a LanguageModel: one mixer state per layer (a KV cache for attention,
    the recurrent state for recurrent mixers) and the number of positions already seen."""

    states: list
    offset: int = 0


class LanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.activation_checkpointing = False  # a training choice, set by the loop (train.activation_checkpointing)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.positions == "learned":
            self.pos = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        elif cfg.positions == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(cfg.max_seq_len, cfg.d_model), persistent=False)
            # Scaled sinusoid (as in Cramming): a learned scale, starting where the table's RMS
            # (1/sqrt 2) matches the token embeddings' (init_std), so positions do not drown tokens.
            # Shape [1], not a scalar: FSDP2 cannot shard 0-dim parameters.
            self.pos_scale = nn.Parameter(torch.full((1,), cfg.init_std * 2**0.5))
            self._register_load_state_dict_pre_hook(_scalar_pos_scale)
        self.embed_norm = make_norm(cfg.norm, cfg.d_model, cfg.bias, cfg.norm_eps) if cfg.embedding_norm else nn.Identity()
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.final_norm = make_norm(cfg.norm, cfg.d_model, cfg.bias, cfg.norm_eps) if cfg.norm_position == "pre" else nn.Identity()
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.apply(self._init)
        for block in self.blocks:  # mixers own their initialisation (decay spectra, gate biases)
            if hasattr(block.mixer, "init_weights"):
                block.mixer.init_weights()

    def _init(self, m: nn.Module) -> None:
        std = self.cfg.init_std
        if isinstance(m, nn.Linear):
            # GPT-2: residual output projections scaled so the residual stream's variance stays flat.
            scale = 1 / math.sqrt(2 * self.cfg.n_layers) if getattr(m, "is_residual_out", False) else 1.0
            nn.init.normal_(m.weight, 0.0, std * scale)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)

    def hidden(self, idx: torch.Tensor, causal: bool = True, cache: "DecodeCache | None" = None,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states [B, T, D]. With a cache (decoding), idx continues the cached
        sequence: positions start at cache.offset, each layer reads and replaces its state.

        attention_mask [B, T] (True / 1 at real tokens, False / 0 at padding) scores a batch of
        texts of unequal length: attention layers ignore padded keys (both readings), so each
        real token's output equals the unpadded text's. Pad on the right: positions then start
        at 0 for every text, and left-to-right layers (recurrent mixers), which read no mask,
        are unaffected by the pads after the real tokens; a model with such layers refuses a
        mask with padding before a real token. Outputs at padded positions are meaningless."""
        T = idx.shape[1]
        start = 0 if cache is None else cache.offset
        if attention_mask is not None:
            if cache is not None:
                raise ValueError("attention_mask is for scoring padded batches, not for decoding with a cache")
            attention_mask = attention_mask.to(device=idx.device, dtype=torch.bool)
            if attention_mask.shape != idx.shape:
                raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match idx {tuple(idx.shape)}")
            if self.causal_only and bool((attention_mask[:, 1:] & ~attention_mask[:, :-1]).any()):
                raise ValueError("this model has left-to-right (recurrent) layers: pad batches on the right")
            if bool(attention_mask.all()):
                attention_mask = None  # nothing padded: the unmasked (fast) path
        if start + T > self.cfg.max_seq_len and self.cfg.positions in ("learned", "sinusoidal"):
            raise ValueError(f"positions {start}..{start + T - 1} exceed max_seq_len={self.cfg.max_seq_len} (a table of that many rows)")
        x = self.embed(idx)
        if self.cfg.positions == "learned":
            x = x + self.pos.weight[start:start + T]
        elif self.cfg.positions == "sinusoidal":
            x = x + (self.pos_scale * self.pos_table[start:start + T]).to(x.dtype)
        x = self.drop(self.embed_norm(x))
        for i, block in enumerate(self.blocks):
            if cache is not None:
                x, cache.states[i] = block(x, causal=causal, state=cache.states[i], offset=start, decode=True)
            elif self.activation_checkpointing and self.training and torch.is_grad_enabled():
                # recompute the block in backward instead of storing its activations
                x = torch.utils.checkpoint.checkpoint(block, x, causal, None, 0, False, attention_mask,
                                                      use_reentrant=False)[0]
            else:
                x = block(x, causal=causal, attention_mask=attention_mask)[0]
        if cache is not None:
            cache.offset += T
        return self.final_norm(x)

    def new_cache(self) -> "DecodeCache":
        """An empty decoding cache: give it to hidden()/forward() call after call."""
        return DecodeCache([None] * len(self.blocks))

    @property
    def causal_only(self) -> bool:
        """Whether some layer's mixer cannot read bidirectionally (recurrent mixers): then the
        model has no masked (MLM) reading."""
        from lmtk.models.mixers import causal_only

        return causal_only(self.cfg)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(h)

    def head_loss(self, h: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  chunk: Optional[int] = None, dispatch: bool = True) -> torch.Tensor:
        """Mean cross-entropy of logits(h) against `targets` (positions whose target is
        `ignore_index` excluded), computed in chunks of `chunk` rows (objective.head_chunk;
        None: fused_ce.DEFAULT_CHUNK) so that neither the [N, vocab] logits nor their gradient
        is ever materialised (models/fused_ce.py); dispatch: the plain head where rows x vocab is too
        small for that to pay (fused_ce.fused_pays)."""
        return linear_cross_entropy(h, self.head.weight, targets, bias=self.head.bias, ignore_index=ignore_index,
                                    chunk=chunk, dispatch=dispatch)

    def forward(self, idx: torch.Tensor, causal: bool = True, head: bool = True, cache=None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.hidden(idx, causal, cache, attention_mask)
        return self.logits(h) if head else h

    def compile_blocks(self) -> None:
        """torch.compile each block (lazily, at its first call). Blocks share one graph per input
        shape and attention mode; static shapes, because each training shape is fixed (packed
        windows, a fixed count of masked tokens) and the odd evaluation shape gets its own graph
        rather than turning the training graph into a slower dynamic one."""
        for block in self.blocks:
            block.compile(dynamic=False)

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if embeddings else n - self.embed.weight.numel() - (self.pos.weight.numel() if hasattr(self, "pos") else 0)

    def flops_per_token(self, seq_len: int, head_fraction: float = 1.0) -> float:
        """Training FLOPs per token: 6 x matmul params + attention scores (PaLM, app. B). The LM
        head runs on `head_fraction` of the positions (sparse MLM prediction: the mask rate)."""
        c = self.cfg
        body = self.num_params(embeddings=False) - (0 if c.tie_embeddings else self.head.weight.numel())
        head = c.vocab_size * c.d_model * head_fraction
        return 6 * (body + head) + sum(b.mixer.flops_per_token(seq_len) for b in self.blocks)
