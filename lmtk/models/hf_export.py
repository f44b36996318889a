"""Hugging Face export: an lmtk run (or checkpoint) as a directory `transformers` loads, without
`transformers` (the inverse of models/hf.py's import).

    export_hf(run, out, force=False, root=None) -> info

The directory holds config.json, model.safetensors (float32), generation_config.json (causal
models), tokenizer.json, tokenizer_config.json and special_tokens_map.json. Which transformers
class a model becomes is decided from its ModelConfig and objective (hf_family); each family
is a function that renames LanguageModel's state dict onto that class's names, taking every
tensor exactly once:

    causal, learned (or sinusoidal) positions, LayerNorm, GELU MLP    -> GPT2LMHeadModel
    causal, rotary positions, RMSNorm, SwiGLU / GeGLU (grouped-query) -> LlamaForCausalLM
        ... with a sliding window                                     -> MistralForCausalLM
    masked (objective mlm), post-norm, learned positions, LayerNorm,
        GELU MLP, embedding LayerNorm, the MLM head's transform       -> BertForMaskedLM

What has no transformers class (recurrent mixers, hybrids, options none of the classes has) is
a one-line UserError naming the option that blocks it and what the checkpoint directory, which
stands alone, gives instead. Exact rewrites are made where they exist: the interleaved rotary
layout is permuted to the half one (layers.convert_rope_layout), a scaled sinusoidal table is
written as the learned table it equals, and a model without biases gets zero biases where
GPT-2 and BERT always have them."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from lmtk.errors import UserError
from lmtk.models.layers import NORM_EPS, convert_rope_layout

TARGETS = ("hf",)
CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "bert": "BertForMaskedLM"}
# HF's names of lmtk's GELUs (erf GELU; the tanh approximation, GPT-2's gelu_new)
GELU_NAMES = {"gelu": "gelu", "gelu-tanh": "gelu_new"}
# objectives whose masked reading is the model (BERT family); objectives that train only a
# masked reading with another convention have no transformers class (mntp: masked_shift 1)
# Llama's gated MLP, act(gate) * up: its hidden_act for lmtk's gated MLPs
GATED_ACTS = {"swiglu": "silu", "gated-gelu": "gelu"}
MASKED_ONLY = ("mntp",)


class Blocked(Exception):
    """What stops a model from mapping onto a transformers class (the option, in words)."""


# ---------------------------------------------------------------- which class


def hf_family(cfg, masked: bool) -> str:
    """gpt2 | llama | mistral | bert for a ModelConfig (masked: trained with a masked
    objective), or Blocked naming the first option none of those classes has."""
    if cfg.mlp == "moe":
        raise Blocked("model.mlp=moe is a sparse mixture of experts: GPT-2, Llama, Mistral and BERT have dense MLPs")
    mixers = cfg.layer_mixers()
    others = sorted(set(mixers) - {"attention"})
    if others and len(others) == len(set(mixers)):
        raise Blocked(f"model.mixer={others[0]} is a recurrent mixer, which no transformers class has")
    if others:
        pattern = cfg.layers if isinstance(cfg.layers, str) else ",".join(cfg.layers)
        raise Blocked(f"model.layers={pattern!r} mixes attention with {', '.join(others)} layers (a hybrid), which no transformers class has")
    if cfg.mixer.get("kv_shift"):
        raise Blocked("model.mixer.kv_shift=true (KV shifting attention): no transformers class mixes keys and values "
                      "with the previous token's")
    if getattr(cfg, "parametrization", "standard") == "mup" and cfg.d_model != cfg.mup_base_width:
        raise Blocked(f"model.parametrization=mup at model.d_model={cfg.d_model} != model.mup_base_width={cfg.mup_base_width}: "
                      "its logit multiplier and 1/d_head attention scale are in no transformers class")
    if masked:
        return _masked_family(cfg)
    return _causal_family(cfg)


def _causal_family(cfg) -> str:
    for key, why in (("type_vocab_size", "token type embeddings"), ("head_transform", "an MLM head transform"),
                     ("pooler", "a pooler")):
        if getattr(cfg, key):
            raise Blocked(f"model.{key}={getattr(cfg, key)} ({why}) on a causal model: GPT-2 and Llama have none")
    if cfg.norm_position != "pre":
        raise Blocked(f"model.norm_position={cfg.norm_position}: GPT-2 and Llama are pre-norm")
    if cfg.embedding_norm:
        raise Blocked("model.embedding_norm=true: neither GPT-2 nor Llama normalises the embeddings")
    if cfg.positions in ("learned", "sinusoidal"):
        if cfg.norm != "layernorm":
            raise Blocked(f"model.norm={cfg.norm} with model.positions={cfg.positions}: GPT-2 uses LayerNorm "
                          "(RMSNorm is Llama's, with rotary positions)")
        if cfg.mlp not in GELU_NAMES:
            raise Blocked(f"model.mlp={cfg.mlp} with model.positions={cfg.positions}: GPT-2's MLP is a plain GELU one "
                          "(SwiGLU is Llama's, with rotary positions)")
        if cfg.n_kv_heads not in (None, cfg.n_heads):
            raise Blocked(f"model.n_kv_heads={cfg.n_kv_heads} with model.positions={cfg.positions}: GPT-2 has no grouped-query heads")
        if cfg.window is not None:
            raise Blocked(f"model.window={cfg.window} with model.positions={cfg.positions}: GPT-2 has no sliding window")
        return "gpt2"
    if cfg.positions != "rope":
        raise Blocked(f"model.positions={cfg.positions}: GPT-2 has learned positions, Llama rotary ones")
    if cfg.norm != "rmsnorm":
        raise Blocked(f"model.norm={cfg.norm} with rotary positions: Llama uses RMSNorm")
    if cfg.mlp not in GATED_ACTS:
        raise Blocked(f"model.mlp={cfg.mlp} with rotary positions: Llama's MLP is a gated one (swiglu, or gated-gelu)")
    if cfg.window is not None:
        if cfg.bias:
            raise Blocked(f"model.window={cfg.window} with model.bias=true: MistralForCausalLM (the sliding window) has no biases")
        return "mistral"
    return "llama"


def _masked_family(cfg) -> str:
    if cfg.norm_position != "post":
        raise Blocked(f"model.norm_position={cfg.norm_position}: BertForMaskedLM is post-norm")
    if cfg.norm != "layernorm":
        raise Blocked(f"model.norm={cfg.norm}: BERT uses LayerNorm")
    if cfg.positions not in ("learned", "sinusoidal"):
        raise Blocked(f"model.positions={cfg.positions}: BERT has learned absolute positions")
    if cfg.mlp not in GELU_NAMES:
        raise Blocked(f"model.mlp={cfg.mlp}: BERT's MLP is a plain GELU one")
    if not cfg.embedding_norm:
        raise Blocked("model.embedding_norm=false: BERT normalises its embeddings")
    if not cfg.head_transform:
        raise Blocked("model.head_transform=false: BertForMaskedLM's head always has its dense + LayerNorm transform")
    if cfg.n_kv_heads not in (None, cfg.n_heads) or cfg.window is not None:
        raise Blocked("grouped-query heads or a sliding window (model.n_kv_heads, model.window): BERT has neither")
    return "bert"


# ---------------------------------------------------------------- state dict -> HF names


class Source:
    """lmtk's tensors taken one by one into the HF state dict (`out`); check() fails on any left."""

    def __init__(self, state: dict):
        self.src = {k: v.detach() for k, v in state.items()}
        self.out: dict[str, torch.Tensor] = {}

    def take(self, key: str) -> torch.Tensor:
        return self.src.pop(key)

    def put(self, name: str, key: str, transpose: bool = False) -> None:
        t = self.take(key)
        self.out[name] = t.t() if transpose else t

    def put_bias(self, name: str, key: str, n: int) -> None:
        """The bias at key, or zeros where the model has none (GPT-2 and BERT always have them)."""
        self.out[name] = self.src.pop(key) if key in self.src else torch.zeros(n)

    def put_rows(self, names: dict, key: str, sizes: list[int]) -> None:
        """Split a fused projection's rows (q, k, v; gate, up) into HF's separate ones."""
        for name, part in zip(names, self.take(key).split(sizes, dim=0)):
            self.out[name] = part

    def head_bias(self, family: str) -> None:
        """A bias on the LM head (BitFit can add one): dropped if zero, else no place for it."""
        b = self.src.pop("head.bias", None)
        if b is not None and bool(b.any()):
            raise Blocked(f"the LM head has a bias (one BitFit added), which {CLASSES[family]} has no place for")

    def check(self, family: str) -> None:
        if self.src:
            keys = sorted(self.src)
            shown = ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
            raise Blocked(f"weights {shown} have no place in {CLASSES[family]}")


def _state(model, family: str) -> dict:
    """The model's state dict as the family reads it: a tied head once (as the embedding), rotary
    q/k rows in the half layout, a scaled sinusoidal table as the learned table it equals."""
    cfg = model.cfg
    sd = dict(model.state_dict())
    if cfg.tie_embeddings:
        sd.pop("head.weight", None)
    if cfg.positions == "rope":
        sd = convert_rope_layout(sd, cfg, "half")
    if cfg.positions == "sinusoidal":
        sd["pos.weight"] = (model.pos_scale * model.pos_table).detach()
        sd.pop("pos_scale")
    return sd


def _eps(cfg) -> float:
    return float(NORM_EPS[cfg.norm] if cfg.norm_eps is None else cfg.norm_eps)


def _gpt2(model, tok) -> tuple[dict, dict]:
    """GPT-2: Conv1D weights are stored [in, out] (transposed); biases everywhere (zeros where
    the model has none)."""
    cfg, d = model.cfg, model.cfg.d_model
    s = Source(_state(model, "gpt2"))
    for i in range(cfg.n_layers):
        src, dst = f"blocks.{i}.", f"transformer.h.{i}."
        for lm_name, hf_name, n in (("norm1", "ln_1", d), ("norm2", "ln_2", d)):
            s.put(f"{dst}{hf_name}.weight", f"{src}{lm_name}.weight")
            s.put_bias(f"{dst}{hf_name}.bias", f"{src}{lm_name}.bias", n)
        for lm_name, hf_name, n in (("mixer.qkv", "attn.c_attn", 3 * d), ("mixer.out", "attn.c_proj", d),
                                    ("mlp.up", "mlp.c_fc", cfg.d_ff), ("mlp.down", "mlp.c_proj", d)):
            s.put(f"{dst}{hf_name}.weight", f"{src}{lm_name}.weight", transpose=True)
            s.put_bias(f"{dst}{hf_name}.bias", f"{src}{lm_name}.bias", n)
    s.put("transformer.wte.weight", "embed.weight")
    s.put("transformer.wpe.weight", "pos.weight")
    s.put("transformer.ln_f.weight", "final_norm.weight")
    s.put_bias("transformer.ln_f.bias", "final_norm.bias", d)
    if not cfg.tie_embeddings:
        s.put("lm_head.weight", "head.weight")
    s.head_bias("gpt2")
    s.check("gpt2")
    config = {
        "model_type": "gpt2", "architectures": [CLASSES["gpt2"]], "vocab_size": cfg.vocab_size, "n_embd": d,
        "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.d_ff, "n_positions": cfg.max_seq_len,
        "n_ctx": cfg.max_seq_len, "activation_function": GELU_NAMES[cfg.mlp], "layer_norm_epsilon": _eps(cfg),
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False, "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
    }
    return config, s.out


def _llama(model, tok, family: str = "llama") -> tuple[dict, dict]:
    """Llama / Mistral: the fused qkv rows split into q, k, v (H, Hkv, Hkv heads); the gated
    MLP's fused up rows into gate (the activated half, first) and up (SwiGLU: hidden_act silu,
    gated-gelu: gelu); RMSNorm weights; an untied head
    as lm_head. Biases (model.bias, or those BitFit added) are attention_bias = mlp_bias."""
    cfg = model.cfg
    d, H = cfg.d_model, cfg.n_heads
    Hkv, Dh = cfg.n_kv_heads or H, d // H
    sd = _state(model, family)
    linears = [f"blocks.{i}.{n}" for i in range(cfg.n_layers) for n in ("mixer.qkv", "mixer.out", "mlp.up", "mlp.down")]
    bias = any(f"{n}.bias" in sd for n in linears)
    if bias and family == "mistral":
        raise Blocked("the model has biases (one BitFit added): MistralForCausalLM (the sliding window) has none")
    s = Source(sd)
    for i in range(cfg.n_layers):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        att = dst + "self_attn."
        qkv = [att + "q_proj", att + "k_proj", att + "v_proj"]
        s.put_rows([n + ".weight" for n in qkv], src + "mixer.qkv.weight", [H * Dh, Hkv * Dh, Hkv * Dh])
        s.put(att + "o_proj.weight", src + "mixer.out.weight")
        s.put(dst + "input_layernorm.weight", src + "norm1.weight")
        s.put(dst + "post_attention_layernorm.weight", src + "norm2.weight")
        gate_up = [dst + "mlp.gate_proj", dst + "mlp.up_proj"]
        s.put_rows([n + ".weight" for n in gate_up], src + "mlp.up.weight", [cfg.d_ff, cfg.d_ff])
        s.put(dst + "mlp.down_proj.weight", src + "mlp.down.weight")
        if bias:
            for names, key, sizes in ((qkv, "mixer.qkv", [H * Dh, Hkv * Dh, Hkv * Dh]), (gate_up, "mlp.up", [cfg.d_ff, cfg.d_ff])):
                if src + key + ".bias" not in s.src:
                    s.src[src + key + ".bias"] = torch.zeros(sum(sizes))
                s.put_rows([n + ".bias" for n in names], src + key + ".bias", sizes)
            s.put_bias(att + "o_proj.bias", src + "mixer.out.bias", d)
            s.put_bias(dst + "mlp.down_proj.bias", src + "mlp.down.bias", d)
    s.put("model.embed_tokens.weight", "embed.weight")
    s.put("model.norm.weight", "final_norm.weight")
    if not cfg.tie_embeddings:
        s.put("lm_head.weight", "head.weight")
    s.head_bias(family)
    s.check(family)
    config = {
        "model_type": family, "architectures": [CLASSES[family]], "vocab_size": cfg.vocab_size, "hidden_size": d,
        "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers, "num_attention_heads": H,
        "num_key_value_heads": Hkv, "head_dim": Dh, "hidden_act": GATED_ACTS[cfg.mlp], "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": _eps(cfg), "rope_theta": float(cfg.rope_base),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_base)},
        "attention_dropout": cfg.dropout, "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings,
    }
    if family == "mistral":
        config["sliding_window"] = int(cfg.window)
    else:
        config.update(attention_bias=bias, mlp_bias=bias)
    return config, s.out


def _bert(model, tok) -> tuple[dict, dict]:
    """BERT (BertForMaskedLM): q, k, v split from the fused rows; post-norm LayerNorms; the
    embedding LayerNorm; token types (one zero row where the model has none); the MLM head's
    transform and decoder bias (zeros without one); a pooler when the model has one (BertModel
    reads it, BertForMaskedLM leaves it)."""
    cfg, d = model.cfg, model.cfg.d_model
    s = Source(_state(model, "bert"))
    for i in range(cfg.n_layers):
        src, dst = f"blocks.{i}.", f"bert.encoder.layer.{i}."
        att = dst + "attention.self."
        names = [att + "query", att + "key", att + "value"]
        s.put_rows([n + ".weight" for n in names], src + "mixer.qkv.weight", [d, d, d])
        if src + "mixer.qkv.bias" not in s.src:
            s.src[src + "mixer.qkv.bias"] = torch.zeros(3 * d)
        s.put_rows([n + ".bias" for n in names], src + "mixer.qkv.bias", [d, d, d])
        for lm_name, hf_name, n in (("mixer.out", "attention.output.dense", d), ("norm1", "attention.output.LayerNorm", d),
                                    ("mlp.up", "intermediate.dense", cfg.d_ff), ("mlp.down", "output.dense", d),
                                    ("norm2", "output.LayerNorm", d)):
            s.put(f"{dst}{hf_name}.weight", f"{src}{lm_name}.weight")
            s.put_bias(f"{dst}{hf_name}.bias", f"{src}{lm_name}.bias", n)
    e = "bert.embeddings."
    s.put(e + "word_embeddings.weight", "embed.weight")
    s.put(e + "position_embeddings.weight", "pos.weight")
    if cfg.type_vocab_size:
        s.put(e + "token_type_embeddings.weight", "type_embed.weight")
    else:
        s.out[e + "token_type_embeddings.weight"] = torch.zeros(1, d)
    s.put(e + "LayerNorm.weight", "embed_norm.weight")
    s.put_bias(e + "LayerNorm.bias", "embed_norm.bias", d)
    if cfg.pooler:
        s.put("bert.pooler.dense.weight", "pooler.weight")
        s.put_bias("bert.pooler.dense.bias", "pooler.bias", d)
    h = "cls.predictions."
    s.put(h + "transform.dense.weight", "head_transform.dense.weight")
    s.put_bias(h + "transform.dense.bias", "head_transform.dense.bias", d)
    s.put(h + "transform.LayerNorm.weight", "head_transform.norm.weight")
    s.put_bias(h + "transform.LayerNorm.bias", "head_transform.norm.bias", d)
    s.put_bias(h + "bias", "head.bias", cfg.vocab_size)
    # the decoder's own bias is what an untied BertForMaskedLM adds (a tied one ties it to the above)
    s.out[h + "decoder.bias"] = s.out[h + "bias"]
    if not cfg.tie_embeddings:
        s.put(h + "decoder.weight", "head.weight")
    s.check("bert")
    config = {
        "model_type": "bert", "architectures": [CLASSES["bert"]], "vocab_size": cfg.vocab_size, "hidden_size": d,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "intermediate_size": cfg.d_ff,
        "hidden_act": GELU_NAMES[cfg.mlp], "max_position_embeddings": cfg.max_seq_len,
        "type_vocab_size": cfg.type_vocab_size or 1, "layer_norm_eps": _eps(cfg), "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.dropout, "position_embedding_type": "absolute",
        "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings,
    }
    return config, s.out


FAMILIES = {"gpt2": _gpt2, "llama": _llama, "mistral": lambda m, t: _llama(m, t, "mistral"), "bert": _bert}


# ---------------------------------------------------------------- tokenizer files

ROLE_ORDER = ("bos", "eos", "unk", "pad", "cls", "sep", "mask")


def tokenizer_files(tok, max_len: int) -> dict[str, dict]:
    """tokenizer_config.json and special_tokens_map.json for lmtk's Tokenizer: every role it has
    (lmtk's own: [SEP] is eos, the document separator), roles it lacks set to null (so
    neither transformers nor lmtk's import guess one from a token's usual spelling)."""
    roles = {r: tok.specials.get(r) for r in ROLE_ORDER}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": int(max_len),
              "clean_up_tokenization_spaces": False, **{f"{r}_token": t for r, t in roles.items()}}
    return {"tokenizer_config.json": config,
            "special_tokens_map.json": {f"{r}_token": t for r, t in roles.items() if t is not None}}


def _token_ids(tok) -> dict:
    return {f"{r}_token_id": getattr(tok, f"{r}_id", None) for r in ("bos", "eos", "pad")}


# ---------------------------------------------------------------- the command


def _masked(base) -> bool:
    """Whether the run's model is its masked reading (objective mlm; a fine-tuning run: its
    base's), refusing objectives that train only a masked reading no transformers class has."""
    if base.objective in MASKED_ONLY:
        raise Blocked(f"objective={base.objective} trains a masked next-token reading (masked_shift 1), which no transformers class has")
    return bool(base.encoder)


def export_hf(run, out, force: bool = False, root=None) -> dict:
    """Write the Hugging Face directory `out` for a run name, run directory or checkpoint
    directory (a run: its final checkpoint; a fine-tuning run: its LM with LoRA merged and the
    task head dropped). Refuses a non-empty `out` unless force (then replaces it), and models
    no transformers class has (one line naming the option, and the checkpoint to use instead).
    Returns {family, architecture, path, checkpoint, files}."""
    from lmtk import checkpoint
    from lmtk.finetune.base import resolve_base

    ckpt = checkpoint.locate(run, root)
    out = Path(out).expanduser()
    _check_out(out, ckpt, force)
    base = resolve_base(str(ckpt), None, key="RUN", command="export")
    model, tok = base.lm.float().eval(), base.tok
    try:
        family = hf_family(model.cfg, _masked(base))
        config, tensors = FAMILIES[family](model, tok)
    except Blocked as why:
        raise UserError(f"{why}, so {run} has no Hugging Face export; its checkpoint stands alone instead: "
                        f"lmtk generate {ckpt}, lmtk eval {ckpt}, base={ckpt} for lmtk finetune") from None
    config.update(_token_ids(tok), dtype="float32")
    files = {"config.json": config, **tokenizer_files(tok, model.cfg.max_seq_len)}
    if family != "bert":
        files["generation_config.json"] = _token_ids(tok)
    _write(out, files, tensors, tok.to_json(), force)
    return {"family": family, "architecture": CLASSES[family], "path": str(out), "checkpoint": str(ckpt),
            "files": sorted([*files, "model.safetensors", "tokenizer.json"])}


def _check_out(out: Path, ckpt: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory; give a directory for the export")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise UserError(f"{out} exists and is not empty; pass --force to replace it, or give another directory")
    lmtk_dir = any((out / m).exists() for m in ("meta.json", "run.json", "checkpoints"))
    inside = out.resolve() == ckpt.resolve() or out.resolve() in ckpt.resolve().parents
    if lmtk_dir or inside:
        raise UserError(f"{out} holds an lmtk run or checkpoint; --force replaces only other directories: give another one")


def _write(out: Path, files: dict, tensors: dict, tokenizer_json: str, force: bool) -> None:
    """Written into a temporary directory beside `out`, then renamed (an old `out` moved aside
    first and removed), so `out` is either the whole export or what it was."""
    from safetensors.torch import save_file

    from lmtk.checkpoint import replace_dir

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file({k: v.detach().to(torch.float32).contiguous().clone() for k, v in tensors.items()},
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "tokenizer.json").write_text(tokenizer_json)
        for name, data in files.items():
            (tmp / name).write_text(json.dumps(data, indent=2) + "\n")
        replace_dir(tmp, out)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"could not write the export to {out}: {err.strerror}") from None


__all__ = ["CLASSES", "export_hf", "hf_family", "tokenizer_files"]
