"""LanguageModel: embeddings -> stack of Blocks -> final norm -> tied LM head.

`hidden(idx, causal)` returns the final hidden states and `logits(h)` applies the head,
so objectives can run the head on a subset of positions (sparse MLM prediction);
`head_loss(h, targets)` is the head + mean cross-entropy fused, for training.

Imported BERT-family models (models/hf.py) add token type embeddings (type_vocab_size), the
MLM head's transform before the decoder (head_transform) and its bias (head_bias), and a
pooler (`pool(h)`: tanh(W h[:, 0] + b)); each is off by default, and absent when off."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.utils.checkpoint

from lmtk.models import mup
from lmtk.models.fused_ce import linear_cross_entropy
from lmtk.models.layers import MLP, MLPS, ROPE_LAYOUTS, activation, default_d_ff, make_norm, sinusoidal_table
from lmtk.models.mixers import build_mixer
from lmtk.models.moe import MoE, moe_config


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
    positions: str = "learned"  # learned | sinusoidal (added to the embeddings) | rope | alibi (in attention) | none
    rope_base: float = 10000.0
    # "interleaved" (channel pairs 2i, 2i+1: one complex multiply on CPU; what conf/model sets, and
    # what a model.json without the key means) | "half" (rotate_half: Hugging Face imports)
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
    # Added for imported (Hugging Face) models; the defaults are the model before them, so a
    # model.json or checkpoint meta without these keys builds the same model:
    type_vocab_size: int = 0  # token type (segment) embeddings, added to the input (0: none)
    head_transform: bool = False  # BERT's MLM head: dense -> the MLP's activation -> norm, before the decoder
    head_bias: bool = False  # a bias on the LM head's logits (BERT's decoder bias)
    pooler: bool = False  # dense + tanh on the first token's final hidden state (LanguageModel.pool)
    moe: Optional[dict] = None  # mlp=moe: the experts' knobs (models/moe.py Config); None for a dense MLP
    # muP (models/mup.py): "standard" | "mup", with the d_model the learning rate was tuned at
    parametrization: str = "standard"
    mup_base_width: Optional[int] = None

    def __post_init__(self):
        from lmtk.models.mixers import mixer_config

        if self.mlp not in MLPS + ("moe",):
            raise ValueError(f"mlp={self.mlp!r}: one of {', '.join(MLPS + ('moe',))}")
        self.moe = moe_config(self.moe) if self.mlp == "moe" else None
        if self.d_ff is None:
            self.d_ff = default_d_ff(self.d_model, self.moe["kind"] if self.moe else self.mlp)
        if self.rope_layout not in ROPE_LAYOUTS:
            raise ValueError(f"rope_layout={self.rope_layout!r}: one of {', '.join(ROPE_LAYOUTS)}")
        # model.json written before mixers had knobs says "mixer": "attention"
        self.mixer = mixer_config({"name": self.mixer} if isinstance(self.mixer, str) else dict(self.mixer))
        if self.layers is not None and not isinstance(self.layers, str):
            self.layers = [str(n) for n in self.layers]
        if self.parametrization not in ("standard", "mup"):
            raise ValueError(f"parametrization={self.parametrization!r}: standard | mup")
        if self.parametrization == "mup" and not (self.mup_base_width or 0) > 0:
            raise ValueError("parametrization=mup needs mup_base_width, the d_model the learning rate was tuned at")

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
        self.mlp = (MoE(cfg.d_model, cfg.d_ff, cfg.moe, cfg.bias, cfg.dropout, router_mult=mup.output_mult(cfg)) if cfg.mlp == "moe"
                    else MLP(cfg.d_model, cfg.d_ff, cfg.mlp, cfg.bias, cfg.dropout))

    def forward(self, x, causal: bool = True, state=None, offset: int = 0, decode: bool = False, attention_mask=None,
                io: dict | None = None, mixer_only: bool = False):
        """(x, the mixer's new state): state, offset and decode carry decoding (models/mixers);
        attention_mask [B, T] (True at real tokens) reaches mixers that read both ways (attention):
        a left-to-right mixer's outputs at real tokens of a right-padded batch do not depend on
        the pads after them, and LanguageModel.hidden refuses other padding for such models.
        `io`, a dict, receives the block's input and output and its mixer's (what distillation's
        alignment stages match): block_in, mixer_in, mixer_out, block_out. mixer_only: x is the
        mixer's input already and the mixer's output is returned (distillation's mixer stage; through
        the block's forward, so a sharded block gathers its parameters)."""
        kw = {} if attention_mask is None or self.mixer.causal_only else {"attention_mask": attention_mask}
        if mixer_only:
            return self.mixer(x, causal=causal, state=state, offset=offset, decode=decode, **kw)
        m_in = self.norm1(x) if self.pre else x
        h, state = self.mixer(m_in, causal=causal, state=state, offset=offset, decode=decode, **kw)
        if self.pre:
            x1 = x + h
            out = x1 + self.mlp(self.norm2(x1))
        else:
            x1 = self.norm1(x + h)
            out = self.norm2(x1 + self.mlp(x1))
        if io is not None:
            io.update(block_in=x, mixer_in=m_in, mixer_out=h, block_out=out)
        return out, state


def _scalar_pos_scale(state_dict, prefix, *args) -> None:
    """Checkpoints written before pos_scale had shape [1] hold a scalar: reshape on load."""
    key = prefix + "pos_scale"
    if key in state_dict and state_dict[key].dim() == 0:
        state_dict[key] = state_dict[key].reshape(1)


class HeadTransform(nn.Module):
    """BERT's MLM head transform: norm(act(W h + b)), applied before the (tied) decoder."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.act = activation(cfg.mlp)
        self.norm = make_norm(cfg.norm, cfg.d_model, cfg.bias, cfg.norm_eps)

    def forward(self, h):
        return self.norm(self.act(self.dense(h)))


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
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.head_bias)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        # registered last (and only when on), so a model without them initialises as before
        if cfg.type_vocab_size:
            self.type_embed = nn.Embedding(cfg.type_vocab_size, cfg.d_model)
        self.head_transform = HeadTransform(cfg) if cfg.head_transform else None
        self.pooler = nn.Linear(cfg.d_model, cfg.d_model) if cfg.pooler else None
        # training-only heads an objective adds (objective.attach: multi-token prediction's extra
        # heads, RTS's replaced-token classifier): trained, optimized and checkpointed with the
        # model, never used by logits()/generation; empty (no parameters) otherwise, and dropped
        # when a checkpoint is loaded for inference (checkpoint.load_weights)
        self.objective_heads = nn.ModuleDict()
        self.apply(self._init)
        for block in self.blocks:  # mixers own their initialisation (decay spectra, gate biases)
            if hasattr(block.mixer, "init_weights"):
                block.mixer.init_weights()
        # muP: hidden matrices' init std x 1/sqrt(m) (std ∝ 1/sqrt(fan_in)); their Adam lr x 1/m
        # (lr_scales); logits x 1/m (head_input). All 1 in SP and at the base width.
        self.mup_hidden = mup.hidden_names(self) if cfg.parametrization == "mup" else []
        self.out_mult = mup.output_mult(cfg)
        if self.mup_hidden:
            hidden = set(self.mup_hidden)
            with torch.no_grad():
                for name, m in self.named_modules():
                    if isinstance(m, nn.Linear) and f"{name}.weight" in hidden:
                        m.weight.div_(math.sqrt(mup.width_mult(cfg)))

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
               attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
               trace: list | None = None) -> torch.Tensor:
        """Final hidden states [B, T, D]. With a cache (decoding), idx continues the cached
        sequence: positions start at cache.offset, each layer reads and replaces its state.

        attention_mask [B, T] (True / 1 at real tokens, False / 0 at padding) scores a batch of
        texts of unequal length: attention layers ignore padded keys (both readings), so each
        real token's output equals the unpadded text's. Pad on the right: positions then start
        at 0 for every text, and left-to-right layers (recurrent mixers), which read no mask,
        are unaffected by the pads after the real tokens; a model with such layers refuses a
        mask with padding before a real token. Outputs at padded positions are meaningless.

        token_type_ids [B, T] (models with type_vocab_size > 0, BERT's segments): None is type 0
        everywhere; models without token types refuse them.

        trace, a list, receives one dict per layer: its block's input and output and its mixer's
        (Block.forward's `io`; a teacher's, for distillation's alignment stages)."""
        T = idx.shape[1]
        start = 0 if cache is None else cache.offset
        if trace is not None and cache is not None:
            raise ValueError("trace is for whole sequences, not for decoding with a cache")
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
        if start + T > self.cfg.max_seq_len and self.cfg.positions == "learned":
            raise ValueError(f"positions {start}..{start + T - 1} exceed max_seq_len={self.cfg.max_seq_len} (a table of that many rows)")
        x = self.embed(idx)
        if self.cfg.type_vocab_size:
            x = x + (self.type_embed.weight[0] if token_type_ids is None else self.type_embed(token_type_ids))
        elif token_type_ids is not None:
            raise ValueError("token_type_ids given, but this model has no token type embeddings (type_vocab_size=0)")
        if self.cfg.positions == "learned":
            x = x + self.pos.weight[start:start + T]
        elif self.cfg.positions == "sinusoidal":
            # the sinusoid is defined at every position: past the table's rows (a model run past
            # its training length) it is computed for this call
            table = self.pos_table if start + T <= len(self.pos_table) else sinusoidal_table(start + T, self.cfg.d_model).to(x.device)
            x = x + (self.pos_scale * table[start:start + T]).to(x.dtype)
        x = self.drop(self.embed_norm(x))
        for i, block in enumerate(self.blocks):
            if trace is not None:
                trace.append({})
                x = block(x, causal=causal, attention_mask=attention_mask, io=trace[-1])[0]
            elif cache is not None:
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

    def head_input(self, h: torch.Tensor) -> torch.Tensor:
        """What the LM head's matrix reads: the head transform's output (BERT's), times muP's
        readout multiplier 1/m (absent in SP). Every path to the logits goes through it."""
        if self.head_transform is not None:
            h = self.head_transform(h)
        return h if self.out_mult == 1.0 else h * self.out_mult

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_input(h))

    def lr_scales(self) -> dict[str, float]:
        """{parameter name: learning-rate multiplier} where it is not 1: muP's 1/m on hidden
        matrices (optim.param_groups reads it)."""
        m = mup.width_mult(self.cfg)
        return {} if m == 1.0 else {n: 1.0 / m for n in self.mup_hidden}

    def pool(self, h: torch.Tensor) -> torch.Tensor:
        """[B, D]: the pooler on the first token's hidden state, tanh(W h[:, 0] + b) (BERT's; what
        its next-sentence and classification heads read). Only models with one (cfg.pooler;
        `model.pooler is not None`)."""
        if self.pooler is None:
            raise ValueError("this model has no pooler (model.pooler is None); pool the hidden states another way")
        return torch.tanh(self.pooler(h[:, 0]))

    def head_loss(self, h: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  chunk: Optional[int] = None, dispatch: bool = True) -> torch.Tensor:
        """Mean cross-entropy of logits(h) against `targets` (positions whose target is
        `ignore_index` excluded), computed in chunks of `chunk` rows (objective.head_chunk;
        None: fused_ce.DEFAULT_CHUNK) so that neither the [N, vocab] logits nor their gradient
        is ever materialised (models/fused_ce.py); dispatch: the plain head where rows x vocab is too
        small for that to pay (fused_ce.fused_pays)."""
        return linear_cross_entropy(self.head_input(h), self.head.weight, targets, bias=self.head.bias, ignore_index=ignore_index,
                                    chunk=chunk, dispatch=dispatch)

    def align(self, part: str, inputs: dict) -> dict:
        """Layers run on given inputs, {layer: output}: part "mixer" runs layer i's mixer on
        inputs[i] (what its norm would have given it), "block" the whole block on inputs[i] (the
        residual stream). Causal, no cache: distillation's alignment stages feed each student
        layer its teacher's input (another model's trace) and match the teacher's output."""
        if part not in ("mixer", "block"):
            raise ValueError(f"align part {part!r}: mixer | block")
        if part == "mixer":
            return {i: self.blocks[i](x, causal=True, mixer_only=True)[0] for i, x in inputs.items()}
        return {i: self.blocks[i](x, causal=True)[0] for i, x in inputs.items()}

    def forward(self, idx: torch.Tensor | None, causal: bool = True, head: bool = True, cache=None,
                attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                align: tuple | None = None) -> torch.Tensor:
        """Logits (head=False: hidden states). align=(part, inputs) runs align() instead, so a
        data-parallel wrapper, which sees only forward(), arms its reducer for it too."""
        if align is not None:
            return self.align(*align)
        h = self.hidden(idx, causal, cache, attention_mask, token_type_ids)
        return self.logits(h) if head else h

    @torch.no_grad()
    def resize_vocab(self, n: int) -> None:
        """Grow the vocabulary to n tokens (a special token added to an imported tokenizer,
        models/hf.add_special): the new embedding rows, untied head rows and head biases start at
        the mean of the existing ones. cfg.vocab_size follows; a smaller n changes nothing."""
        old = self.cfg.vocab_size
        if n <= old:
            return

        def grow(p: nn.Parameter) -> nn.Parameter:
            extra = p.mean(0, keepdim=True).expand(n - old, *p.shape[1:])
            return nn.Parameter(torch.cat([p, extra]), requires_grad=p.requires_grad)

        self.embed.weight = grow(self.embed.weight)
        self.embed.num_embeddings = n
        self.head.weight = self.embed.weight if self.cfg.tie_embeddings else grow(self.head.weight)
        if self.head.bias is not None:
            self.head.bias = grow(self.head.bias)
        self.head.out_features = n
        self.cfg.vocab_size = n

    def compile_blocks(self) -> None:
        """torch.compile each block (lazily, at its first call). Blocks share one graph per input
        shape and attention mode; static shapes, because each training shape is fixed (packed
        windows, a fixed count of masked tokens) and the odd evaluation shape gets its own graph
        rather than turning the training graph into a slower dynamic one."""
        for block in self.blocks:
            block.compile(dynamic=False)

    def num_params(self, embeddings: bool = True, active: bool = False) -> int:
        """Parameters; active: those one token uses (an MoE's unrouted experts left out)."""
        n = sum(p.numel() for p in self.parameters())
        if active:
            n -= sum(m.inactive_params() for m in self.modules() if hasattr(m, "inactive_params"))
        if embeddings:
            return n
        tables = [getattr(self, name, None) for name in ("embed", "pos", "type_embed")]
        return n - sum(t.weight.numel() for t in tables if t is not None)

    def flops_per_token(self, seq_len: int, head_fraction: float = 1.0) -> float:
        """Training FLOPs per token: 6 x matmul params + attention scores (PaLM, app. B). The LM
        head runs on `head_fraction` of the positions (sparse MLM prediction: the mask rate). An
        MoE counts its router and the top_k experts a token goes to, not the others."""
        c = self.cfg
        body = self.num_params(embeddings=False, active=True) - (0 if c.tie_embeddings else self.head.weight.numel())
        head = c.vocab_size * c.d_model * head_fraction
        return 6 * (body + head) + sum(b.mixer.flops_per_token(seq_len) for b in self.blocks)
