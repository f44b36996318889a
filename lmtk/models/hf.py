"""Hugging Face import: a local model directory (or `hf:<name>` from the hub) as lmtk's
LanguageModel + Tokenizer, without `transformers`.

    load_hf(path_or_name) -> (model, tokenizer, meta)

A directory holds config.json, the weights (model.safetensors, pytorch_model.bin, or their
sharded *.index.json forms) and tokenizer.json (with tokenizer_config.json /
special_tokens_map.json, which name the special tokens). config.json's `model_type` picks the
mapping:

    bert, roberta (and BERT-layout encoders such as MiniLM): post-LN, learned positions, token
        types, embedding LayerNorm, the MLM head's transform + decoder bias, the pooler
    gpt2: pre-LN, learned positions, tanh-GELU, Conv1D weights (stored [in, out])
    llama, mistral: RMSNorm, rotary (the half layout HF's weights use), SwiGLU, grouped-query
        heads, untied head, mistral's sliding window

Each mapping renames every tensor of the file onto the model's state dict (attention's fused
qkv projection: the q, k, v rows concatenated); a tensor left over or a model weight not filled
is a one-line error listing them. Task heads the model has no place for (NSP, a classifier) are
dropped and named in meta["dropped"]."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmtk.data.tokenizer import ROLES, Tokenizer, require_special
from lmtk.errors import UserError
from lmtk.models.transformer import LanguageModel, ModelConfig

SUPPORTED = ("bert", "roberta", "gpt2", "llama", "mistral")
# BERT-layout encoders: the same weights under another model_type
BERT_LIKE = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta", "camembert": "roberta"}
GELUS = {"gelu": "gelu", "gelu_new": "gelu-tanh", "gelu_pytorch_tanh": "gelu-tanh", "gelu_fast": "gelu-tanh"}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# buffers some files carry (position ids, causal-mask tables, rotary frequencies): nothing to map
BUFFERS = ("embeddings.position_ids", "attn.bias", "attn.masked_bias", "rotary_emb.inv_freq")
# heads of other tasks, which the LanguageModel has no place for: dropped, named in meta["dropped"]
TASK_HEADS = ("cls.seq_relationship.", "classifier.", "score.", "qa_outputs.")


def is_hf(spec) -> bool:
    """Whether a base= value names a Hugging Face model: hf:<name>, or a directory with
    config.json and no lmtk checkpoint (meta.json) in it."""
    s = str(spec)
    if s.startswith("hf:"):
        return True
    p = Path(s).expanduser()
    return (p / "config.json").is_file() and not (p / "meta.json").is_file()


def load_base(spec, root=None):
    """(model, tokenizer, meta) of a base= value: a Hugging Face model (is_hf) through load_hf,
    else an lmtk run or checkpoint through checkpoint.load_pretrained."""
    if is_hf(spec):
        return load_hf(spec)
    from lmtk.checkpoint import load_pretrained

    return load_pretrained(spec, root)


def load_hf(path_or_name) -> tuple[LanguageModel, Tokenizer, dict]:
    """(model in eval mode, tokenizer, meta) from a local Hugging Face directory or `hf:<name>`
    (`hf:<name>@<revision>`; downloaded with huggingface_hub).

    meta: source (as given), path (the local directory), model_type, architecture, model (the
    ModelConfig as a dict), objective {name: mlm | clm, masked_shift: 0} (what the model was
    pretrained for, in checkpoint meta's form), lm_head (whether the file had trained LM head
    weights: a bare BertModel has none, its head is the tied embedding without transform or
    bias), specials (the tokenizer's roles -> tokens), dropped (task-head tensors not mapped),
    dtype (of the stored weights; the model is float32), hf_config (config.json)."""
    path = _local_dir(str(path_or_name))
    config = _read_json(path / "config.json", what="config.json")
    if config is None:
        raise UserError(f"{path} has no config.json; a Hugging Face model directory holds config.json, weights and tokenizer.json")
    model_type = str(config.get("model_type", "")).lower()
    arch = (config.get("architectures") or [None])[0]
    if model_type not in MAPPINGS and model_type not in BERT_LIKE:
        shown = f"model_type {model_type!r}" + (f" ({arch})" if arch else "") if model_type else f"architecture {arch!r}"
        raise UserError(f"{shown} of {path} is not supported; supported: {', '.join(SUPPORTED)} (and BERT-layout encoders)")
    weights, dtype = _read_weights(path)
    family = BERT_LIKE.get(model_type, model_type)
    mapping = Mapping(weights)
    cfg, extra = MAPPINGS[family](config, mapping, path)
    mapping.check(path)
    model = LanguageModel(cfg)
    state = mapping.out
    missing, unexpected = model.load_state_dict(state, strict=False)
    # a tied head is the embedding itself: state dict names it twice, the file once
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "head.weight")]
    if missing or unexpected:
        raise UserError(f"{path}: the mapped weights do not fit the model (missing {_names(missing)}, unexpected {_names(unexpected)})")
    model.eval()
    tok = hf_tokenizer(path, config)
    if tok.vocab_size > cfg.vocab_size:
        raise UserError(f"{path}: tokenizer.json has {tok.vocab_size} tokens but the model's vocab_size is {cfg.vocab_size}; "
                        "the tokenizer is not this model's")
    meta = {
        "source": str(path_or_name), "path": str(path), "model_type": model_type, "architecture": arch,
        "model": cfg.to_dict(), "specials": tok.specials, "dropped": sorted(mapping.dropped), "dtype": dtype,
        "hf_config": config, **extra,
    }
    return model, tok, meta


def add_special(model: LanguageModel, tok: Tokenizer, token: str, role: str | None = None) -> int:
    """Add `token` to the tokenizer as its `role` token (pad, mask, ...; None: read from the
    token's usual spelling, e.g. "[PAD]" -> pad) and grow the model's embedding (and head) to the
    new vocabulary (LanguageModel.resize_vocab: new rows at the mean of the old ones). Explicit,
    for what an objective needs and an imported tokenizer lacks (GPT-2 has no [PAD] or [MASK]).
    Returns the token's id."""
    from lmtk.data.tokenizer import USUAL_NAMES

    if role is None:
        role = next((r for r, names in USUAL_NAMES.items() if token in names), None)
        if role is None:
            raise UserError(f"add_special: say which role {token!r} takes (role=one of {', '.join(ROLES)})")
    tid = tok.add_special(token, role)
    model.resize_vocab(max(tok.vocab_size, tid + 1))
    return tid


# ---------------------------------------------------------------- files


def _local_dir(spec: str) -> Path:
    if spec.startswith("hf:"):
        return _download(spec[3:])
    p = Path(spec).expanduser()
    if not p.is_dir():
        raise UserError(f"no Hugging Face model directory at {spec} (give a directory with config.json, "
                        "model.safetensors or pytorch_model.bin and tokenizer.json, or hf:<name>)")
    return p.resolve()


def _download(name: str) -> Path:
    """snapshot_download of what load_hf reads (safetensors weights when the repo has them)."""
    name, _, revision = name.partition("@")
    if not name:
        raise UserError("base=hf: needs a model name, e.g. hf:bert-base-uncased")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError("base=hf:... downloads with huggingface_hub, which is not installed (pip install huggingface_hub)") from None
    common = ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    try:
        local = Path(snapshot_download(name, revision=revision or None,
                                       allow_patterns=common + ["model.safetensors", "model-*.safetensors", "model.safetensors.index.json"]))
        if not any((local / f).is_file() for f in WEIGHT_FILES[:2]):  # an older repo: pickled weights only
            local = Path(snapshot_download(name, revision=revision or None,
                                           allow_patterns=common + ["pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json"]))
    except Exception as err:
        raise UserError(f"cannot download hf:{name} from the Hugging Face hub: {(str(err).splitlines() or [type(err).__name__])[0]}") from None
    return local


def _read_json(p: Path, what: str):
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {p} ({what}): {err}") from None


def _read_weights(path: Path) -> tuple[dict, str]:
    """{name: tensor} of every weight file (shards joined), and their dtype."""
    found = next((f for f in WEIGHT_FILES if (path / f).is_file()), None)
    if found is None:
        raise UserError(f"{path} has no weights (expected {' or '.join(WEIGHT_FILES[::2])})")
    if found.endswith(".index.json"):
        index = _read_json(path / found, what="weight index")
        files = sorted(set((index or {}).get("weight_map", {}).values()))
    else:
        files = [found]
    out = {}
    for f in files:
        p = path / f
        try:
            if f.endswith(".safetensors"):
                from safetensors.torch import load_file

                out.update(load_file(str(p)))
            else:
                out.update(torch.load(p, map_location="cpu", weights_only=True))
        except Exception as err:
            raise UserError(f"cannot read weights {p}: {(str(err).splitlines() or [type(err).__name__])[0]}") from None
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in out.values() if t.is_floating_point()})
    return out, ",".join(dtypes)


def _names(keys, n: int = 8) -> str:
    keys = sorted(keys)
    return "none" if not keys else ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


class Mapping:
    """HF tensors taken one by one into lmtk's state dict (`out`); check() fails on any left."""

    def __init__(self, weights: dict):
        # old TF-converted BERT files name LayerNorm's weight/bias gamma/beta
        self.src = {k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): v
                    for k, v in weights.items()}
        self.out: dict[str, torch.Tensor] = {}
        self.dropped: list[str] = []
        self.missing: list[str] = []

    def has(self, key: str) -> bool:
        return key in self.src

    def take(self, key: str) -> torch.Tensor | None:
        if key not in self.src:
            self.missing.append(key)
            return None
        return self.src.pop(key)

    def put(self, name: str, *keys: str, transpose: bool = False) -> None:
        """out[name] = the tensors at keys (rows concatenated when several; transposed first:
        GPT-2's Conv1D stores [in, out])."""
        parts = [self.take(k) for k in keys]
        if any(p is None for p in parts):
            return
        if transpose:
            parts = [p.t() for p in parts]
        self.out[name] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def put_linear(self, name: str, key: str, bias: bool = True, transpose: bool = False) -> None:
        self.put(f"{name}.weight", f"{key}.weight", transpose=transpose)
        if bias:
            self.put(f"{name}.bias", f"{key}.bias")

    def tied_copy(self, key: str, embed: torch.Tensor) -> bool:
        """Drop a stored copy of the tied embedding (older files save the tied head too).
        False if it is not a copy."""
        if key in self.src and self.src[key].shape == embed.shape and torch.equal(self.src[key], embed):
            del self.src[key]
            return True
        return key not in self.src

    def check(self, path: Path) -> None:
        for k in list(self.src):
            if any(k == b or k.endswith("." + b) for b in BUFFERS):
                del self.src[k]
            elif any(k.startswith(h) or ("." + h) in k for h in TASK_HEADS):
                self.dropped.append(k)
                del self.src[k]
        if self.src or self.missing:
            raise UserError(f"{path}: weights do not match the {'/'.join(SUPPORTED)} layout: "
                            f"unused {_names(self.src)}; missing {_names(self.missing)}")


def _prefix(m: Mapping, candidates, probe: str) -> str:
    """The prefix under which the model's body is stored (BertForMaskedLM: "bert.", BertModel: "")."""
    for p in candidates:
        if m.has(p + probe):
            return p
    return candidates[-1]


def _unsupported(path: Path, what: str) -> UserError:
    return UserError(f"{path}: {what} is not supported by lmtk's import")


def _gelu(config: dict, key: str, path: Path) -> str:
    act = config.get(key, "gelu")
    if act not in GELUS:
        raise _unsupported(path, f"{key}={act!r} (supported: {', '.join(GELUS)})")
    return GELUS[act]


# ---------------------------------------------------------------- mappings


def _bert(config: dict, m: Mapping, path: Path):
    """BERT / RoBERTa: post-LN encoder; HF names under bert. / roberta. (or bare, BertModel)."""
    roberta = BERT_LIKE.get(config.get("model_type"), "bert") == "roberta"
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise _unsupported(path, f"position_embedding_type={config['position_embedding_type']!r} (absolute only)")
    p = _prefix(m, ["bert.", "roberta.", ""], "embeddings.word_embeddings.weight")
    d, L = config["hidden_size"], config["num_hidden_layers"]
    pos = m.src.get(p + "embeddings.position_embeddings.weight")
    max_len = config["max_position_embeddings"]
    if roberta and pos is not None:
        # RoBERTa numbers positions from padding_idx + 1 (pad positions use padding_idx): a text
        # padded on the right has positions pad+1, pad+2, ..., so the table starts there
        offset = int(config.get("pad_token_id", 1)) + 1
        m.src[p + "embeddings.position_embeddings.weight"] = pos[offset:]
        max_len -= offset
    for i in range(L):
        src, dst = f"{p}encoder.layer.{i}.", f"blocks.{i}."
        att = src + "attention.self."
        m.put(dst + "mixer.qkv.weight", att + "query.weight", att + "key.weight", att + "value.weight")
        m.put(dst + "mixer.qkv.bias", att + "query.bias", att + "key.bias", att + "value.bias")
        m.put_linear(dst + "mixer.out", src + "attention.output.dense")
        m.put_linear(dst + "norm1", src + "attention.output.LayerNorm")
        m.put_linear(dst + "mlp.up", src + "intermediate.dense")
        m.put_linear(dst + "mlp.down", src + "output.dense")
        m.put_linear(dst + "norm2", src + "output.LayerNorm")
    embed = m.src.get(p + "embeddings.word_embeddings.weight")
    m.put("embed.weight", p + "embeddings.word_embeddings.weight")
    m.put("pos.weight", p + "embeddings.position_embeddings.weight")
    type_vocab = 0
    if m.has(p + "embeddings.token_type_embeddings.weight"):
        type_vocab = int(m.src[p + "embeddings.token_type_embeddings.weight"].shape[0])
        m.put("type_embed.weight", p + "embeddings.token_type_embeddings.weight")
    m.put_linear("embed_norm", p + "embeddings.LayerNorm")
    pooler = m.has(p + "pooler.dense.weight")
    if pooler:
        m.put_linear("pooler", p + "pooler.dense")
    # the MLM head: BERT's cls.predictions.*, RoBERTa's lm_head.*
    h = "cls.predictions." if not roberta else "lm_head."
    dense, norm = (h + "transform.dense", h + "transform.LayerNorm") if not roberta else (h + "dense", h + "layer_norm")
    transform = m.has(dense + ".weight")
    if transform:
        m.put_linear("head_transform.dense", dense)
        m.put_linear("head_transform.norm", norm)
    head_bias = m.has(h + "bias") or m.has(h + "decoder.bias")
    if m.has(h + "bias"):
        bias = m.take(h + "bias")
        if m.has(h + "decoder.bias") and torch.equal(m.src[h + "decoder.bias"], bias):
            del m.src[h + "decoder.bias"]  # older files store the decoder's bias twice
        m.out["head.bias"] = bias
    elif head_bias:
        m.put("head.bias", h + "decoder.bias")
    tie = bool(config.get("tie_word_embeddings", True))
    if tie and embed is not None:
        m.tied_copy(h + "decoder.weight", embed)
    elif not tie:
        m.put("head.weight", h + "decoder.weight")
    cfg = ModelConfig(
        vocab_size=config["vocab_size"], d_model=d, n_layers=L, n_heads=config["num_attention_heads"],
        d_ff=config["intermediate_size"], max_seq_len=max_len, positions="learned", norm="layernorm",
        norm_position="post", norm_eps=float(config.get("layer_norm_eps", 1e-12)), embedding_norm=True, bias=True,
        mlp=_gelu(config, "hidden_act", path), dropout=float(config.get("hidden_dropout_prob", 0.0)),
        tie_embeddings=tie, type_vocab_size=type_vocab, head_transform=transform, head_bias=head_bias, pooler=pooler,
    )
    return cfg, {"objective": {"name": "mlm", "masked_shift": 0}, "lm_head": transform or head_bias}


def _gpt2(config: dict, m: Mapping, path: Path):
    """GPT-2: pre-LN decoder; Conv1D weights are stored [in, out], so they are transposed."""
    if config.get("scale_attn_by_inverse_layer_idx") or not config.get("scale_attn_weights", True):
        raise _unsupported(path, "GPT-2 attention scaling other than 1/sqrt(head_dim)")
    if config.get("add_cross_attention"):
        raise _unsupported(path, "GPT-2 with cross-attention")
    p = _prefix(m, ["transformer.", ""], "wte.weight")
    d, L = config["n_embd"], config["n_layer"]
    for i in range(L):
        src, dst = f"{p}h.{i}.", f"blocks.{i}."
        m.put_linear(dst + "norm1", src + "ln_1")
        m.put_linear(dst + "mixer.qkv", src + "attn.c_attn", transpose=True)
        m.put_linear(dst + "mixer.out", src + "attn.c_proj", transpose=True)
        m.put_linear(dst + "norm2", src + "ln_2")
        m.put_linear(dst + "mlp.up", src + "mlp.c_fc", transpose=True)
        m.put_linear(dst + "mlp.down", src + "mlp.c_proj", transpose=True)
    embed = m.src.get(p + "wte.weight")
    m.put("embed.weight", p + "wte.weight")
    m.put("pos.weight", p + "wpe.weight")
    m.put_linear("final_norm", p + "ln_f")
    tie = bool(config.get("tie_word_embeddings", True))
    if tie and embed is not None:
        m.tied_copy("lm_head.weight", embed)
    elif not tie:
        m.put("head.weight", "lm_head.weight")
    cfg = ModelConfig(
        vocab_size=config["vocab_size"], d_model=d, n_layers=L, n_heads=config["n_head"],
        d_ff=config.get("n_inner") or 4 * d, max_seq_len=config["n_positions"], positions="learned",
        norm="layernorm", norm_position="pre", norm_eps=float(config.get("layer_norm_epsilon", 1e-5)), bias=True,
        mlp=_gelu(config, "activation_function", path), dropout=float(config.get("resid_pdrop", 0.0)), tie_embeddings=tie,
    )
    return cfg, {"objective": {"name": "clm", "masked_shift": 0}, "lm_head": True}


def _rope_base(config: dict, path: Path) -> float:
    """rope_theta, refusing scaled rotary variants (linear, dynamic, yarn, llama3 ...)."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise _unsupported(path, f"rotary scaling {kind!r} (plain rotary positions only)")
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def _llama(config: dict, m: Mapping, path: Path):
    """Llama / Mistral: RMSNorm, rotary in the half layout (HF's weights are stored permuted for
    rotate_half), SwiGLU (gate_proj is the activated half; hidden_act gelu: lmtk's gated-gelu),
    grouped-query heads."""
    d, L, H = config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]
    Hkv = config.get("num_key_value_heads") or H
    if config.get("head_dim") not in (None, d // H) or d % H:
        raise _unsupported(path, f"head_dim={config.get('head_dim')} other than hidden_size / num_attention_heads")
    mlp = {"silu": "swiglu", "gelu": "gated-gelu"}.get(config.get("hidden_act", "silu"))
    if mlp is None:
        raise _unsupported(path, f"hidden_act={config['hidden_act']!r} (silu or gelu)")
    bias = bool(config.get("attention_bias", False))
    if bool(config.get("mlp_bias", False)) != bias:
        raise _unsupported(path, "attention_bias differing from mlp_bias")
    window = config.get("sliding_window") if config.get("model_type") == "mistral" else None
    p = _prefix(m, ["model.", ""], "embed_tokens.weight")
    for i in range(L):
        src, dst = f"{p}layers.{i}.", f"blocks.{i}."
        att = src + "self_attn."
        m.put(dst + "mixer.qkv.weight", att + "q_proj.weight", att + "k_proj.weight", att + "v_proj.weight")
        if bias:
            m.put(dst + "mixer.qkv.bias", att + "q_proj.bias", att + "k_proj.bias", att + "v_proj.bias")
        m.put_linear(dst + "mixer.out", att + "o_proj", bias=bias)
        m.put(dst + "norm1.weight", src + "input_layernorm.weight")
        m.put(dst + "norm2.weight", src + "post_attention_layernorm.weight")
        m.put(dst + "mlp.up.weight", src + "mlp.gate_proj.weight", src + "mlp.up_proj.weight")
        if bias:
            m.put(dst + "mlp.up.bias", src + "mlp.gate_proj.bias", src + "mlp.up_proj.bias")
        m.put_linear(dst + "mlp.down", src + "mlp.down_proj", bias=bias)
    embed = m.src.get(p + "embed_tokens.weight")
    m.put("embed.weight", p + "embed_tokens.weight")
    m.put("final_norm.weight", p + "norm.weight")
    tie = bool(config.get("tie_word_embeddings", False))
    if tie and embed is not None:
        m.tied_copy("lm_head.weight", embed)
    elif not tie:
        m.put("head.weight", "lm_head.weight")
    cfg = ModelConfig(
        vocab_size=config["vocab_size"], d_model=d, n_layers=L, n_heads=H, n_kv_heads=Hkv if Hkv != H else None,
        window=int(window) if window else None, d_ff=config["intermediate_size"],
        max_seq_len=int(config.get("max_position_embeddings", 2048)), positions="rope",
        rope_base=_rope_base(config, path), rope_layout="half", norm="rmsnorm", norm_position="pre",
        norm_eps=float(config.get("rms_norm_eps", 1e-6)), bias=bias, mlp=mlp,
        dropout=float(config.get("attention_dropout", 0.0)), tie_embeddings=tie,
    )
    return cfg, {"objective": {"name": "clm", "masked_shift": 0}, "lm_head": True}


MAPPINGS = {"bert": _bert, "roberta": _bert, "gpt2": _gpt2, "llama": _llama, "mistral": _llama}


# ---------------------------------------------------------------- tokenizer


def _token_text(v):
    """A special token as tokenizer_config.json / special_tokens_map.json write it: a string or
    an AddedToken dict ({"content": ...})."""
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


def hf_specials(path: Path, config: dict, vocab: dict) -> dict:
    """{role: token} read from tokenizer_config.json, then special_tokens_map.json, then
    config.json's *_token_id; roles none of them settles take their usual spelling (lmtk's
    USUAL_NAMES). A role set to null in tokenizer_config.json is absent."""
    from lmtk.data.tokenizer import usual_specials

    by_id = {i: t for t, i in vocab.items()}
    out, settled = {}, set()
    for fname in ("tokenizer_config.json", "special_tokens_map.json"):
        data = _read_json(path / fname, what="tokenizer settings") or {}
        for role in ROLES:
            key = f"{role}_token"
            if role in settled or key not in data:
                continue
            settled.add(role)
            text = _token_text(data[key])
            if text is not None and text in vocab:
                out[role] = text
    for role in ("pad", "bos", "eos"):
        tid = config.get(f"{role}_token_id")
        if isinstance(tid, list):
            tid = tid[0] if tid else None
        if role not in settled and isinstance(tid, int) and tid in by_id:
            out[role] = by_id[tid]
            settled.add(role)
    for role, text in usual_specials(vocab).items():
        if role not in settled and role not in out:
            out[role] = text
    if "eos" not in out and "sep" in out:
        out["eos"] = out["sep"]
    return out


def hf_tokenizer(path: Path, config: dict | None = None) -> Tokenizer:
    """lmtk's Tokenizer on the directory's tokenizer.json, special tokens read (hf_specials)."""
    p = path / "tokenizer.json"
    if not p.is_file():
        raise UserError(f"{path} has no tokenizer.json (lmtk reads the fast tokenizer's file; "
                        "transformers' AutoTokenizer.from_pretrained(...).save_pretrained(dir) writes one)")
    from tokenizers import Tokenizer as TK

    try:
        tk = TK.from_file(str(p))
    except Exception as err:
        raise UserError(f"cannot load tokenizer {p}: {(str(err).splitlines() or [type(err).__name__])[0]}") from None
    # a tokenizer.json may pad or truncate every encoding to a fixed length (sentence-transformers'
    # do): lmtk encodes whole documents and pads batches itself
    tk.no_padding()
    tk.no_truncation()
    return Tokenizer(tk, hf_specials(path, config or {}, tk.get_vocab()))


__all__ = ["SUPPORTED", "add_special", "hf_tokenizer", "is_hf", "load_base", "load_hf", "require_special"]
