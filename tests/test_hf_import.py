"""Hugging Face import (models/hf.py): tiny random HF-format directories written here (config.json,
safetensors under HF's parameter names, a tokenizer.json trained with `tokenizers`), loaded
with load_hf and checked against hand-written BERT / GPT-2 / Llama computations on the HF
tensors themselves; with `transformers` installed, against its BertForMaskedLM,
RobertaForMaskedLM, GPT2LMHeadModel, LlamaForCausalLM (grouped-query) and MistralForCausalLM
(sliding window) to 1e-4, padded batches included."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lmtk.data.tokenizer import Tokenizer, require_special
from lmtk.errors import UserError
from lmtk.models import ModelConfig, build_model
from lmtk.models.hf import add_special, is_hf, load_base, load_hf

TEXT = [
    "the quick brown fox jumps over the lazy dog.",
    "a small model trained on one machine reads every sentence twice.",
    "hidden states and logits match to four decimal places, or the test fails.",
    "tokens, positions and segments are added before the first layer norm.",
] * 8


# ---------------------------------------------------------------- tiny HF directories


def _write_tokenizer(d, kind: str, config: dict | None = None):
    """tokenizer.json (+ tokenizer_config.json) of the kind each family ships: BERT's WordPiece
    with [CLS] ... [SEP] template, GPT-2's byte-level BPE with <|endoftext|> only, Llama's
    SentencePiece-style (Metaspace) BPE with <unk> <s> </s> and no pad."""
    from tokenizers import Tokenizer as TK, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if kind == "wordpiece":
        tk = TK(models.WordPiece(unk_token="[UNK]"))
        tk.normalizer = normalizers.BertNormalizer(lowercase=True)
        tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tk.decoder = decoders.WordPiece()
        tk.train_from_iterator(TEXT, trainers.WordPieceTrainer(vocab_size=90, special_tokens=["[PAD]", "[UNK]"], show_progress=False))
        tk.add_special_tokens(["[CLS]", "[SEP]", "[MASK]"])  # ids after the vocabulary: not 0..4
        v = tk.get_vocab()
        tk.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", v["[CLS]"]), ("[SEP]", v["[SEP]"])])
        settings = {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "mask_token": "[MASK]", "unk_token": "[UNK]"}
    elif kind == "bytelevel":
        tk = TK(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        tk.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=290, special_tokens=["<|endoftext|>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
        settings = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    else:
        tk = TK(models.BPE(unk_token="<unk>"))
        tk.pre_tokenizer = pre_tokenizers.Metaspace()
        tk.decoder = decoders.Metaspace()
        tk.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=100, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tk.get_vocab()["<s>"])])
        settings = {"bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None}
    tk.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(settings))
    return tk


def _rand(gen, *shape, norm=False):
    t = torch.randn(*shape, generator=gen) * (0.1 if norm else 0.3)
    return t + 1 if norm else t


BERT_CFG = dict(model_type="bert", architectures=["BertForMaskedLM"], vocab_size=96, hidden_size=16, num_hidden_layers=2,
                num_attention_heads=2, intermediate_size=40, max_position_embeddings=24, type_vocab_size=2,
                layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=0)
GPT2_CFG = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=300, n_embd=16, n_layer=2, n_head=2,
                n_positions=24, layer_norm_epsilon=1e-5, activation_function="gelu_new", bos_token_id=0, eos_token_id=0)
LLAMA_CFG = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=104, hidden_size=32, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                 rms_norm_eps=1e-5, rope_theta=500.0, hidden_act="silu", tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def bert_weights(c: dict, gen, mlm_head=True, pooler=True) -> dict:
    d, f = c["hidden_size"], c["intermediate_size"]
    w = {"bert.embeddings.word_embeddings.weight": _rand(gen, c["vocab_size"], d),
         "bert.embeddings.position_embeddings.weight": _rand(gen, c["max_position_embeddings"], d),
         "bert.embeddings.token_type_embeddings.weight": _rand(gen, c["type_vocab_size"], d),
         "bert.embeddings.LayerNorm.weight": _rand(gen, d, norm=True), "bert.embeddings.LayerNorm.bias": _rand(gen, d)}
    for i in range(c["num_hidden_layers"]):
        p = f"bert.encoder.layer.{i}."
        for name, (o, n) in {"attention.self.query": (d, d), "attention.self.key": (d, d), "attention.self.value": (d, d),
                             "attention.output.dense": (d, d), "intermediate.dense": (f, d), "output.dense": (d, f)}.items():
            w[p + name + ".weight"], w[p + name + ".bias"] = _rand(gen, o, n), _rand(gen, o)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            w[p + name + ".weight"], w[p + name + ".bias"] = _rand(gen, d, norm=True), _rand(gen, d)
    if pooler:
        w["bert.pooler.dense.weight"], w["bert.pooler.dense.bias"] = _rand(gen, d, d), _rand(gen, d)
    if mlm_head:
        w["cls.predictions.transform.dense.weight"], w["cls.predictions.transform.dense.bias"] = _rand(gen, d, d), _rand(gen, d)
        w["cls.predictions.transform.LayerNorm.weight"] = _rand(gen, d, norm=True)
        w["cls.predictions.transform.LayerNorm.bias"] = _rand(gen, d)
        w["cls.predictions.bias"] = _rand(gen, c["vocab_size"])
    return w


def gpt2_weights(c: dict, gen) -> dict:
    d = c["n_embd"]
    w = {"transformer.wte.weight": _rand(gen, c["vocab_size"], d), "transformer.wpe.weight": _rand(gen, c["n_positions"], d),
         "transformer.ln_f.weight": _rand(gen, d, norm=True), "transformer.ln_f.bias": _rand(gen, d)}
    for i in range(c["n_layer"]):
        p = f"transformer.h.{i}."
        for name, (n, o) in {"attn.c_attn": (d, 3 * d), "attn.c_proj": (d, d), "mlp.c_fc": (d, 4 * d), "mlp.c_proj": (4 * d, d)}.items():
            w[p + name + ".weight"], w[p + name + ".bias"] = _rand(gen, n, o), _rand(gen, o)  # Conv1D: [in, out]
        for name in ("ln_1", "ln_2"):
            w[p + name + ".weight"], w[p + name + ".bias"] = _rand(gen, d, norm=True), _rand(gen, d)
        w[p + "attn.bias"] = torch.ones(1, 1, c["n_positions"], c["n_positions"]).tril()  # older files' mask buffer
    return w


def llama_weights(c: dict, gen) -> dict:
    d, f, H, Hkv = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"], c["num_key_value_heads"]
    dh = d // H
    w = {"model.embed_tokens.weight": _rand(gen, c["vocab_size"], d), "model.norm.weight": _rand(gen, d, norm=True),
         "lm_head.weight": _rand(gen, c["vocab_size"], d)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name, shape in {"self_attn.q_proj": (H * dh, d), "self_attn.k_proj": (Hkv * dh, d), "self_attn.v_proj": (Hkv * dh, d),
                            "self_attn.o_proj": (d, d), "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f)}.items():
            w[p + name + ".weight"] = _rand(gen, *shape)
        for name in ("input_layernorm", "post_attention_layernorm"):
            w[p + name + ".weight"] = _rand(gen, d, norm=True)
    return w


def write_hf(d, config: dict, weights: dict, tokenizer: str):
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(d / "model.safetensors"))
    _write_tokenizer(d, tokenizer)
    return d


# ---------------------------------------------------------------- hand-written references


def _lin(x, w, k):
    return x @ w[k + ".weight"].T + w[k + ".bias"]


def _ln(x, w, k, eps):
    return F.layer_norm(x, x.shape[-1:], w[k + ".weight"], w[k + ".bias"], eps)


def _attend(q, k, v, causal):
    """q [B, H, T, Dh], k/v [B, Hk, T, Dh] (grouped heads repeated): softmax(q k^T / sqrt Dh) v."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        T = q.shape[2]
        s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2).flatten(2)


def bert_reference(w, c, ids, types):
    """BERT as its paper draws it, on the HF tensors: (final hidden states, MLM logits, pooled)."""
    B, T = ids.shape
    H, eps, p = c["num_attention_heads"], c["layer_norm_eps"], "bert."
    x = (w[p + "embeddings.word_embeddings.weight"][ids] + w[p + "embeddings.position_embeddings.weight"][:T]
         + w[p + "embeddings.token_type_embeddings.weight"][types])
    x = _ln(x, w, p + "embeddings.LayerNorm", eps)
    for i in range(c["num_hidden_layers"]):
        L = f"{p}encoder.layer.{i}."
        q, k, v = (_lin(x, w, L + "attention.self." + n).view(B, T, H, -1).transpose(1, 2) for n in ("query", "key", "value"))
        x = _ln(x + _lin(_attend(q, k, v, False), w, L + "attention.output.dense"), w, L + "attention.output.LayerNorm", eps)
        x = _ln(x + _lin(F.gelu(_lin(x, w, L + "intermediate.dense")), w, L + "output.dense"), w, L + "output.LayerNorm", eps)
    t = _ln(F.gelu(_lin(x, w, "cls.predictions.transform.dense")), w, "cls.predictions.transform.LayerNorm", eps)
    logits = t @ w[p + "embeddings.word_embeddings.weight"].T + w["cls.predictions.bias"]
    return x, logits, torch.tanh(_lin(x[:, 0], w, p + "pooler.dense"))


def gpt2_reference(w, c, ids):
    B, T = ids.shape
    H, eps, p = c["n_head"], c["layer_norm_epsilon"], "transformer."

    def conv(x, k):  # Conv1D: x W + b with W [in, out]
        return x @ w[k + ".weight"] + w[k + ".bias"]

    x = w[p + "wte.weight"][ids] + w[p + "wpe.weight"][:T]
    for i in range(c["n_layer"]):
        L = f"{p}h.{i}."
        q, k, v = (t.view(B, T, H, -1).transpose(1, 2) for t in conv(_ln(x, w, L + "ln_1", eps), L + "attn.c_attn").chunk(3, -1))
        x = x + conv(_attend(q, k, v, True), L + "attn.c_proj")
        x = x + conv(F.gelu(conv(_ln(x, w, L + "ln_2", eps), L + "mlp.c_fc"), approximate="tanh"), L + "mlp.c_proj")
    x = _ln(x, w, p + "ln_f", eps)
    return x, x @ w[p + "wte.weight"].T


def llama_reference(w, c, ids):
    B, T = ids.shape
    H, Hkv, eps = c["num_attention_heads"], c["num_key_value_heads"], c["rms_norm_eps"]
    dh = c["hidden_size"] // H

    def rms(x, k):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w[k + ".weight"]

    inv = 1.0 / c["rope_theta"] ** (torch.arange(0, dh, 2).float() / dh)
    ang = torch.cat([torch.outer(torch.arange(T).float(), inv)] * 2, dim=-1)  # [T, dh]: channel i and i + dh/2 share a frequency

    def rope(t):
        half = torch.cat([-t[..., dh // 2:], t[..., : dh // 2]], dim=-1)
        return t * ang.cos() + half * ang.sin()

    x = w["model.embed_tokens.weight"][ids]
    for i in range(c["num_hidden_layers"]):
        L = f"model.layers.{i}."
        a = rms(x, L + "input_layernorm")
        q = rope((a @ w[L + "self_attn.q_proj.weight"].T).view(B, T, H, dh).transpose(1, 2))
        k = rope((a @ w[L + "self_attn.k_proj.weight"].T).view(B, T, Hkv, dh).transpose(1, 2))
        v = (a @ w[L + "self_attn.v_proj.weight"].T).view(B, T, Hkv, dh).transpose(1, 2)
        x = x + _attend(q, k, v, True) @ w[L + "self_attn.o_proj.weight"].T
        m = rms(x, L + "post_attention_layernorm")
        x = x + (F.silu(m @ w[L + "mlp.gate_proj.weight"].T) * (m @ w[L + "mlp.up_proj.weight"].T)) @ w[L + "mlp.down_proj.weight"].T
    x = rms(x, "model.norm")
    return x, x @ w["lm_head.weight"].T


def _ids(V, B=2, T=12, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- without transformers


def test_bert_directory_maps_every_weight_and_matches_a_hand_written_bert(tmp_path):
    w = bert_weights(BERT_CFG, torch.Generator().manual_seed(0))
    model, tok, meta = load_hf(write_hf(tmp_path / "bert", BERT_CFG, w, "wordpiece"))
    c = model.cfg
    assert (c.norm_position, c.embedding_norm, c.type_vocab_size, c.head_transform, c.head_bias, c.pooler, c.norm_eps) == \
        ("post", True, 2, True, True, True, 1e-12)
    assert meta["objective"] == {"name": "mlm", "masked_shift": 0} and meta["lm_head"] and meta["dropped"] == []
    ids, types = _ids(96), _ids(2, seed=1)
    with torch.no_grad():
        h = model.hidden(ids, causal=False, token_type_ids=types)
        ref_h, ref_logits, ref_pool = bert_reference(w, BERT_CFG, ids, types)
        torch.testing.assert_close(h, ref_h, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.logits(h), ref_logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.pool(h), ref_pool, atol=1e-5, rtol=1e-5)
        # token types matter, and None means type 0 everywhere
        assert not torch.allclose(model.hidden(ids, causal=False), h, atol=1e-3)
        torch.testing.assert_close(model.hidden(ids, causal=False), model.hidden(ids, causal=False, token_type_ids=torch.zeros_like(ids)))
        # the training loss goes through the same head (transform + bias)
        targets = _ids(96, seed=2)
        torch.testing.assert_close(model.head_loss(h, targets, dispatch=False), F.cross_entropy(ref_logits.flatten(0, 1), targets.flatten()),
                                   atol=1e-5, rtol=1e-5)


def test_gpt2_directory_transposes_conv1d_and_matches_a_hand_written_gpt2(tmp_path):
    w = gpt2_weights(GPT2_CFG, torch.Generator().manual_seed(0))
    model, tok, meta = load_hf(write_hf(tmp_path / "gpt2", GPT2_CFG, w, "bytelevel"))
    assert model.cfg.mlp == "gelu-tanh" and model.cfg.tie_embeddings and meta["objective"]["name"] == "clm"
    ids = _ids(300)
    with torch.no_grad():
        h = model.hidden(ids, causal=True)
        ref_h, ref_logits = gpt2_reference(w, GPT2_CFG, ids)
        torch.testing.assert_close(h, ref_h, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.logits(h), ref_logits, atol=1e-5, rtol=1e-5)


def test_llama_directory_with_grouped_query_heads_matches_a_hand_written_llama(tmp_path):
    w = llama_weights(LLAMA_CFG, torch.Generator().manual_seed(0))
    model, tok, meta = load_hf(write_hf(tmp_path / "llama", LLAMA_CFG, w, "metaspace"))
    c = model.cfg
    assert (c.n_kv_heads, c.rope_layout, c.rope_base, c.norm, c.norm_eps, c.bias, c.tie_embeddings) == \
        (2, "half", 500.0, "rmsnorm", 1e-5, False, False)
    ids = _ids(104)
    with torch.no_grad():
        h = model.hidden(ids, causal=True)
        ref_h, ref_logits = llama_reference(w, LLAMA_CFG, ids)
        torch.testing.assert_close(h, ref_h, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.logits(h), ref_logits, atol=1e-5, rtol=1e-5)


def test_a_left_over_or_missing_tensor_is_one_error_naming_it(tmp_path):
    w = bert_weights(BERT_CFG, torch.Generator().manual_seed(0))
    extra = dict(w, **{"bert.encoder.layer.0.attention.self.rel.weight": torch.zeros(3)})
    with pytest.raises(UserError, match=r"unused bert\.encoder\.layer\.0\.attention\.self\.rel\.weight; missing none") as err:
        load_hf(write_hf(tmp_path / "extra", BERT_CFG, extra, "wordpiece"))
    assert "\n" not in str(err.value)
    short = {k: v for k, v in w.items() if k != "bert.encoder.layer.1.output.dense.bias"}
    with pytest.raises(UserError, match=r"unused none; missing bert\.encoder\.layer\.1\.output\.dense\.bias"):
        load_hf(write_hf(tmp_path / "short", BERT_CFG, short, "wordpiece"))


def test_bare_encoder_and_task_heads(tmp_path):
    """A BertModel file (no bert. prefix, no MLM head) loads with a plain tied head and says so;
    a next-sentence head is dropped and named."""
    w = bert_weights(BERT_CFG, torch.Generator().manual_seed(0), mlm_head=False)
    bare = {k.removeprefix("bert."): v for k, v in w.items()}
    model, _, meta = load_hf(write_hf(tmp_path / "bare", dict(BERT_CFG, architectures=["BertModel"]), bare, "wordpiece"))
    assert not meta["lm_head"] and not model.cfg.head_transform and not model.cfg.head_bias and model.cfg.pooler
    nsp = dict(w, **{"cls.seq_relationship.weight": torch.zeros(2, 16), "cls.seq_relationship.bias": torch.zeros(2)})
    _, _, meta = load_hf(write_hf(tmp_path / "nsp", BERT_CFG, nsp, "wordpiece"))
    assert meta["dropped"] == ["cls.seq_relationship.bias", "cls.seq_relationship.weight"]


def test_pytorch_model_bin_is_read_with_weights_only(tmp_path):
    w = gpt2_weights(GPT2_CFG, torch.Generator().manual_seed(0))
    d = write_hf(tmp_path / "bin", GPT2_CFG, w, "bytelevel")
    (d / "model.safetensors").unlink()
    torch.save(w, d / "pytorch_model.bin")
    model, _, _ = load_hf(d)
    with torch.no_grad():
        torch.testing.assert_close(model(_ids(300)), gpt2_reference(w, GPT2_CFG, _ids(300))[1], atol=1e-5, rtol=1e-5)


def test_unsupported_architecture_is_one_line_naming_it_and_the_supported(tmp_path):
    d = tmp_path / "t5"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}))
    with pytest.raises(UserError, match=r"model_type 't5' \(T5ForConditionalGeneration\) of .* is not supported; "
                                        r"supported: bert, roberta, gpt2, llama, mistral") as err:
        load_hf(d)
    assert "\n" not in str(err.value)
    (d / "config.json").write_text(json.dumps(dict(LLAMA_CFG, rope_scaling={"rope_type": "llama3", "factor": 8.0})))
    from safetensors.torch import save_file

    save_file(llama_weights(LLAMA_CFG, torch.Generator().manual_seed(0)), str(d / "model.safetensors"))
    with pytest.raises(UserError, match="rotary scaling 'llama3'"):
        load_hf(d)


def test_directory_errors(tmp_path):
    with pytest.raises(UserError, match="no Hugging Face model directory at"):
        load_hf(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        load_hf(tmp_path / "empty")
    d = write_hf(tmp_path / "nowts", GPT2_CFG, gpt2_weights(GPT2_CFG, torch.Generator().manual_seed(0)), "bytelevel")
    (d / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="has no tokenizer.json"):
        load_hf(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(UserError, match=r"has no weights \(expected model.safetensors or pytorch_model.bin\)"):
        load_hf(d)


def test_special_ids_are_read_not_assumed(tmp_path):
    _, bert_tok, _ = load_hf(write_hf(tmp_path / "b", BERT_CFG, bert_weights(BERT_CFG, torch.Generator().manual_seed(0)), "wordpiece"))
    v = bert_tok.tk.get_vocab()
    assert (bert_tok.pad_id, bert_tok.cls_id, bert_tok.sep_id, bert_tok.mask_id) == (v["[PAD]"], v["[CLS]"], v["[SEP]"], v["[MASK]"])
    assert bert_tok.mask_id > 4 and bert_tok.eos_id == bert_tok.sep_id and bert_tok.has_mask
    text = "the quick fox"
    assert bert_tok.encode(text, specials=True) == [bert_tok.cls_id, *bert_tok.encode(text), bert_tok.sep_id]

    _, gpt_tok, meta = load_hf(write_hf(tmp_path / "g", GPT2_CFG, gpt2_weights(GPT2_CFG, torch.Generator().manual_seed(0)), "bytelevel"))
    assert gpt_tok.eos_id == gpt_tok.bos_id == gpt_tok.tk.get_vocab()["<|endoftext|>"]
    assert not gpt_tok.has_mask and not gpt_tok.has_pad and gpt_tok.pad_id is None
    assert meta["specials"] == {"unk": "<|endoftext|>", "bos": "<|endoftext|>", "eos": "<|endoftext|>"}
    docs = ["the quick brown fox", "jumps  over\tthe lazy dog <|endoftext|> again"]
    want = [i for d in docs for i in gpt_tok.encode(d) + [gpt_tok.eos_id]]
    assert gpt_tok.exact_token_bytes and list(gpt_tok.encode_stream(docs)) == want  # the word-cache path

    _, llama_tok, _ = load_hf(write_hf(tmp_path / "l", LLAMA_CFG, llama_weights(LLAMA_CFG, torch.Generator().manual_seed(0)), "metaspace"))
    v = llama_tok.tk.get_vocab()
    assert (llama_tok.bos_id, llama_tok.eos_id, llama_tok.unk_id, llama_tok.pad_id) == (v["<s>"], v["</s>"], v["<unk>"], None)
    ids = llama_tok.encode_stream(["the quick fox", "a lazy dog"])  # documents separated by </s>
    assert list(ids).count(llama_tok.eos_id) == 2 and ids[-1] == llama_tok.eos_id
    # the roles survive a checkpoint: tokenizer.json + meta["specials"]
    again = Tokenizer.from_file(tmp_path / "l" / "tokenizer.json", specials=llama_tok.specials)
    assert again.specials == llama_tok.specials


def test_masked_objective_on_a_tokenizer_without_mask_is_one_line(tmp_path):
    from types import SimpleNamespace

    from lmtk.objectives import CLM, MLM

    _, tok, _ = load_hf(write_hf(tmp_path / "g", GPT2_CFG, gpt2_weights(GPT2_CFG, torch.Generator().manual_seed(0)), "bytelevel"))
    with pytest.raises(UserError, match="the tokenizer has no mask token, which masked LM needs; add one explicitly") as err:
        require_special(tok, "mask", "masked LM needs")
    assert "\n" not in str(err.value)
    cfg = SimpleNamespace(mask_rate=0.15, mask_token_frac=0.8, random_token_frac=0.1)
    with pytest.raises(UserError, match="the tokenizer has no mask token, which objective=mlm"):
        MLM(cfg, tok)
    assert set(CLM(cfg, tok).val_objectives()) == {"clm"}  # validation reports the causal reading alone
    # BERT's tokenizer has its mask; random replacements skip the special ids wherever they are
    _, bert_tok, _ = load_hf(write_hf(tmp_path / "b", BERT_CFG, bert_weights(BERT_CFG, torch.Generator().manual_seed(0)), "wordpiece"))
    assert bert_tok.special_ids != list(range(5))
    mlm = MLM(SimpleNamespace(mask_rate=0.5, mask_token_frac=0.0, random_token_frac=1.0), bert_tok)
    batch = torch.full((64, 32), bert_tok.tk.get_vocab()["the"])
    x, pos = mlm.corrupt(batch, torch.Generator().manual_seed(0))
    drawn = set(x.gather(1, pos).flatten().tolist())
    assert not drawn & set(bert_tok.special_ids) and len(drawn) > 40 and max(drawn) < bert_tok.vocab_size


def test_add_special_grows_the_embedding_and_keeps_old_logits(tmp_path):
    model, tok, _ = load_hf(write_hf(tmp_path / "l", LLAMA_CFG, llama_weights(LLAMA_CFG, torch.Generator().manual_seed(0)), "metaspace"))
    V = model.cfg.vocab_size
    ids = _ids(tok.vocab_size)
    with torch.no_grad():
        before = model(ids)
    assert tok.vocab_size < V  # room in the model's (padded) vocabulary: no resize needed
    pad = add_special(model, tok, "[PAD]")
    assert tok.pad_id == pad == tok.vocab_size - 1 and model.cfg.vocab_size == V
    for n in range(V - tok.vocab_size + 1):  # fill the model's spare rows, then one more
        add_special(model, tok, f"<extra{n}>", role="mask")
    assert model.cfg.vocab_size == tok.vocab_size == V + 1 and tok.mask_id == V and tok.pad_id == pad
    assert model.embed.weight.shape == (V + 1, 32) and model.head.weight.shape == (V + 1, 32)
    torch.testing.assert_close(model.embed.weight[V], model.embed.weight[:V].mean(0))
    with torch.no_grad():
        after = model(ids)
    torch.testing.assert_close(after[..., :V], before)
    with pytest.raises(UserError, match="say which role"):
        add_special(model, tok, "<odd>")


def test_is_hf_and_load_base(tmp_path):
    d = write_hf(tmp_path / "g", GPT2_CFG, gpt2_weights(GPT2_CFG, torch.Generator().manual_seed(0)), "bytelevel")
    assert is_hf(d) and is_hf("hf:gpt2") and not is_hf(tmp_path)
    model, _, meta = load_base(str(d))
    assert meta["model_type"] == "gpt2" and model.cfg.n_layers == 2


# ---------------------------------------------------------------- the model's new keys


OLD_MODEL_JSON = {"vocab_size": 64, "d_model": 16, "n_layers": 1, "n_heads": 2, "max_seq_len": 16, "positions": "learned",
                  "norm": "layernorm", "norm_position": "pre", "embedding_norm": False, "bias": True, "mlp": "gelu",
                  "mixer": "attention", "dropout": 0.0, "tie_embeddings": True, "init_std": 0.02}
OLD_KEYS = {"embed.weight", "pos.weight", "final_norm.weight", "final_norm.bias", "head.weight",
            "blocks.0.norm1.weight", "blocks.0.norm1.bias", "blocks.0.norm2.weight", "blocks.0.norm2.bias",
            "blocks.0.mixer.qkv.weight", "blocks.0.mixer.qkv.bias", "blocks.0.mixer.out.weight", "blocks.0.mixer.out.bias",
            "blocks.0.mlp.up.weight", "blocks.0.mlp.up.bias", "blocks.0.mlp.down.weight", "blocks.0.mlp.down.bias"}


def test_old_model_json_builds_the_same_model_and_new_keys_round_trip():
    cfg = ModelConfig.from_dict(OLD_MODEL_JSON)
    assert (cfg.type_vocab_size, cfg.head_transform, cfg.head_bias, cfg.pooler) == (0, False, False, False)
    torch.manual_seed(0)
    model = build_model(cfg)
    assert set(model.state_dict()) == OLD_KEYS and model.pooler is None and model.head_transform is None
    # same seed, same weights as a model built from today's full config (nothing new drew random numbers)
    torch.manual_seed(0)
    full = build_model(ModelConfig.from_dict(cfg.to_dict()))
    for k, v in model.state_dict().items():
        assert torch.equal(v, full.state_dict()[k])
    ids = _ids(64, T=8)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), full(ids), rtol=0, atol=0)
        with pytest.raises(ValueError, match="no token type embeddings"):
            model(ids, token_type_ids=torch.zeros_like(ids))
        with pytest.raises(ValueError, match="no pooler"):
            model.pool(model.hidden(ids))
    on = ModelConfig(**{**OLD_MODEL_JSON, "type_vocab_size": 2, "head_transform": True, "head_bias": True, "pooler": True,
                        "mlp": "gelu-tanh"})
    assert ModelConfig.from_dict(json.loads(json.dumps(on.to_dict()))) == on
    assert set(build_model(on).state_dict()) - OLD_KEYS == {
        "type_embed.weight", "head.bias", "pooler.weight", "pooler.bias", "head_transform.dense.weight",
        "head_transform.dense.bias", "head_transform.norm.weight", "head_transform.norm.bias"}
    with pytest.raises(ValueError, match="mlp='geglu'"):
        ModelConfig(vocab_size=8, mlp="geglu")


def test_resize_vocab_untied_with_bias():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**{**OLD_MODEL_JSON, "tie_embeddings": False, "head_bias": True})).eval()
    ids = _ids(64, T=8)
    with torch.no_grad():
        before = model(ids)
        model.resize_vocab(70)
        after = model(ids)
    assert model.head.weight.shape == (70, 16) and model.head.bias.shape == (70,) and model.cfg.vocab_size == 70
    assert model.head.weight is not model.embed.weight
    torch.testing.assert_close(after[..., :64], before)
    torch.testing.assert_close(model.head.bias[64:], model.head.bias[:64].mean().expand(6))


# ---------------------------------------------------------------- against transformers


def _tf_model(kind: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "bert":
        cfg = transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=48, max_position_embeddings=32, type_vocab_size=2)
        return transformers.BertForMaskedLM(cfg), "wordpiece"
    if kind == "roberta":
        cfg = transformers.RobertaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=48, max_position_embeddings=34, type_vocab_size=1, pad_token_id=0)
        return transformers.RobertaForMaskedLM(cfg), "wordpiece"
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg), "bytelevel"
    common = dict(vocab_size=104, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=48, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=500.0, bos_token_id=1, eos_token_id=2)
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)), "metaspace"
    return transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=5)), "metaspace"


@pytest.mark.parametrize("kind", ["bert", "roberta", "gpt2", "llama", "mistral"])
def test_matches_transformers(kind, tmp_path):
    ref, tokenizer = _tf_model(kind)
    ref.eval()
    # random LayerNorm / RMSNorm weights and biases (HF initialises them to 1 and 0, which would hide a swap)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    ref.save_pretrained(tmp_path)
    _write_tokenizer(tmp_path, tokenizer)
    model, tok, meta = load_hf(tmp_path)
    encoder = kind in ("bert", "roberta")
    V, B, T = ref.config.vocab_size, 3, 12
    ids = _ids(V, B, T, seed=3)
    if kind == "roberta":
        ids = ids.clamp(min=1)  # pad_token_id=0 would take RoBERTa's pad position
    lengths = torch.tensor([T, 7, 3])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    kw = {"token_type_ids": _ids(2, B, T, seed=4)} if kind == "bert" else {}
    with torch.no_grad():
        for attention_mask in (None, mask):
            out = ref(input_ids=ids, attention_mask=None if attention_mask is None else attention_mask.long(),
                      output_hidden_states=True, **kw)
            h = model.hidden(ids, causal=not encoder, attention_mask=attention_mask, **kw)
            real = torch.ones(B, T, dtype=torch.bool) if attention_mask is None else attention_mask
            torch.testing.assert_close(h[real], out.hidden_states[-1][real], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(model.logits(h)[real], out.logits[real], atol=1e-4, rtol=1e-4)
    if kind == "mistral":  # the window matters at this length: a model without it differs
        model.cfg.window = None
        for b in model.blocks:
            b.mixer.window = None
        with torch.no_grad():
            assert not torch.allclose(model.hidden(ids), out.hidden_states[-1], atol=1e-3)


def test_an_imported_model_saved_as_a_checkpoint_loads_back_the_same(tmp_path):
    """The finetune path: load_hf -> checkpoint.write (meta with the model and the tokenizer's
    roles) -> load_pretrained gives the same logits and special tokens."""
    from lmtk import checkpoint

    model, tok, meta = load_hf(write_hf(tmp_path / "b", BERT_CFG, bert_weights(BERT_CFG, torch.Generator().manual_seed(0)), "wordpiece"))
    add_special(model, tok, "<bos>")
    ckpt = checkpoint.write(tmp_path / "ckpt", model, {}, {"model": model.cfg.to_dict(), "objective": meta["objective"],
                                                          "specials": tok.specials}, tokenizer=tok.to_json(), config="")
    again, tok2, meta2 = checkpoint.load_pretrained(ckpt)
    assert tok2.specials == tok.specials and tok2.bos_id == tok.vocab_size - 1 and checkpoint.masked_shift(meta2) == 0
    ids, types = _ids(96), _ids(2, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(again(ids, causal=False, token_type_ids=types), model(ids, causal=False, token_type_ids=types),
                                   rtol=0, atol=0)


def test_hf_name_downloads_through_huggingface_hub(tmp_path, monkeypatch):
    """hf:<name>[@rev] goes to snapshot_download (faked here: tests stay offline), safetensors
    first; a failure is one line."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    src = write_hf(tmp_path / "hub", GPT2_CFG, gpt2_weights(GPT2_CFG, torch.Generator().manual_seed(0)), "bytelevel")
    calls = []

    def fake(name, revision=None, allow_patterns=None):
        calls.append((name, revision, tuple(allow_patterns)))
        return str(src)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    model, _, meta = load_hf("hf:someone/tiny-gpt2@v1")
    assert meta["source"] == "hf:someone/tiny-gpt2@v1" and model.cfg.n_layers == 2
    assert calls == [("someone/tiny-gpt2", "v1", calls[0][2])] and "model.safetensors" in calls[0][2]

    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nmore detail")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(UserError, match=r"^cannot download hf:someone/tiny-gpt2 from the Hugging Face hub: We couldn't connect") as err:
        load_hf("hf:someone/tiny-gpt2")
    assert "\n" not in str(err.value)


def test_catalogue_documents_these_rows():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "errors.md").read_text()
    rows = ["hf-no-directory", "hf-no-config", "hf-no-weights", "hf-no-tokenizer", "hf-unsupported-architecture",
            "hf-unsupported-feature", "hf-weights-mismatch", "hf-download-failed", "tokenizer-lacks-special",
            "add-special-without-role"]
    assert [r for r in rows if f"`{r}` °" not in doc] == []


def test_train_masked_lm_with_gpt2s_tokenizer_is_one_line_before_any_run(tmp_path):
    """`lmtk train objective=mlm tokenizer.path=<GPT-2's tokenizer.json>`: exit 2, one line, no run directory."""
    import os
    import subprocess
    import sys

    d = tmp_path / "g"
    d.mkdir()
    _write_tokenizer(d, "bytelevel")
    (tmp_path / "text.txt").write_text("\n\n".join(TEXT * 4))
    env = dict(os.environ, LMTK_RUNS=str(tmp_path / "runs"), LMTK_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "lmtk", "train", "objective=mlm", f"tokenizer.path={d / 'tokenizer.json'}",
                        "data=text", f"data.train={tmp_path / 'text.txt'}", "data.seq_len=16", "model.d_model=16",
                        "model.n_layers=1", "model.n_heads=2", "budget.hours=null", "budget.steps=1", "run.name=mlm"],
                       env=env, capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: the tokenizer has no mask token, which objective=mlm") and "Traceback" not in p.stderr
    assert not (tmp_path / "runs" / "mlm").exists()
