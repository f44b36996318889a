"""Hugging Face export (models/hf_export.py, `lmtk export RUN --to hf OUT`): tiny CPU runs
(2 layers, d 32) of each family exported, loaded with transformers (skipped without it) and
compared with lmtk's logits to 1e-4, then imported back with lmtk's own load_hf (round trip);
runs no transformers class has refuse in one line; OUT and run errors; a LoRA fine-tuning run
exports its merged LM."""

from __future__ import annotations

import json

import pytest
import torch

import helpers
from lmtk import checkpoint
from lmtk.errors import UserError
from lmtk.models.hf import load_hf
from lmtk.models.hf_export import export_hf

RUNS = {
    # the default recipe: rope (half), RMSNorm, SwiGLU, no biases, tied -> Llama, tie_word_embeddings
    "llama": [],
    # grouped-query heads, untied head, biases, the interleaved rotary layout (converted on export)
    "llama-gqa": ["model.n_heads=4", "model.n_kv_heads=2", "model.tie_embeddings=false", "model.bias=true",
                  "model.rope_layout=interleaved", "model.rope_base=500.0", "model.norm_eps=1e-5"],
    "mistral": ["model.window=8"],
    "llama-geglu": ["model.mlp=gated-gelu"],  # hidden_act gelu
    "gpt2": ["model=gpt2", "model.mlp=gelu-tanh"],
    # scaled sinusoidal positions (written as the table they equal), no biases (zeros), untied head
    "gpt2-sinusoidal": ["model=gpt2", "model.positions=sinusoidal", "model.bias=false", "model.tie_embeddings=false"],
    "gla": ["model/mixer=gla"],
    "hybrid": ["model/mixer=gla", "model.layers=AR"],
}
FAMILY = {"llama": "llama", "llama-gqa": "llama", "mistral": "mistral", "llama-geglu": "llama", "gpt2": "gpt2", "gpt2-sinusoidal": "gpt2"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_cache):
    """The tiny runs of RUNS (2 steps each), by name."""
    root = tmp_path_factory.mktemp("export-runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMTK_RUNS", str(root))
        mp.setenv("LMTK_CACHE", str(shared_cache))
        for name, extra in RUNS.items():
            helpers.train(*helpers.TINY, *extra, "budget.steps=2", f"run.name={name}")
    helpers.reset_console()
    return {name: root / name for name in RUNS}


def _ids(V: int, B: int = 3, T: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def _check_export(run, out, masked: bool = False) -> dict:
    """Export `run`, load it with transformers and with lmtk's import; logits equal lmtk's to
    1e-4 (and the tokenizers agree). Returns the measured max |diff|es."""
    transformers = pytest.importorskip("transformers")
    model, tok, _ = checkpoint.load_pretrained(run)
    info = export_hf(run, out)
    auto = transformers.AutoModelForMaskedLM if masked else transformers.AutoModelForCausalLM
    hf = auto.from_pretrained(out).eval()
    assert type(hf).__name__ == info["architecture"]
    ids = _ids(tok.vocab_size)
    with torch.no_grad():
        ours = model(ids, causal=not masked)
        theirs = hf(input_ids=ids).logits
        again, tok2, meta = load_hf(out)
        back = again(ids, causal=not masked)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(back, ours, atol=1e-4, rtol=1e-4)
    assert tok2.specials == tok.specials and meta["objective"]["name"] == ("mlm" if masked else "clm")
    text = "the quick brown fox, 12 jumps."
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert (hf_tok.eos_token_id, hf_tok.pad_token_id, hf_tok.bos_token_id) == (tok.eos_id, tok.pad_id, tok.bos_id)
    return {"hf": (theirs - ours).abs().max().item(), "round_trip": (back - ours).abs().max().item(), "ids": ids,
            "logits": theirs, **info}


@pytest.mark.parametrize("name", list(FAMILY))
def test_causal_runs_export_and_match_transformers(runs, name, tmp_path):
    got = _check_export(runs[name], tmp_path / "hf")
    assert got["family"] == FAMILY[name]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg = checkpoint.load_pretrained(runs[name])[0].cfg
    assert config["vocab_size"] == cfg.vocab_size and config["vocab_size"] % 64 == 0  # the padded vocabulary
    assert config["tie_word_embeddings"] == cfg.tie_embeddings
    if name == "llama":  # the default recipe
        assert config["tie_word_embeddings"] is True and config["architectures"] == ["LlamaForCausalLM"]
    if name == "llama-gqa":
        assert config["num_key_value_heads"] == 2 and config["attention_bias"] and config["rope_theta"] == 500.0
        assert config["rms_norm_eps"] == 1e-5
    if name == "llama-geglu":
        assert config["hidden_act"] == "gelu"
    if name == "mistral":  # the window matters at this length: without it the logits differ
        assert config["sliding_window"] == 8
        model = checkpoint.load_pretrained(runs[name])[0]
        for b in model.blocks:
            b.mixer.window = None
        with torch.no_grad():
            assert (model(got["ids"]) - got["logits"]).abs().max() > 1e-4
    print(f"{name}: max |logit diff| transformers {got['hf']:.2e}, round trip {got['round_trip']:.2e}")


def _bert_checkpoint(path, tie: bool = True, bias: bool = True):
    """A BERT-shaped lmtk checkpoint (what `lmtk finetune base=<a BERT>` with objective mlm
    saves): post-norm, learned positions, token types, the MLM head's transform and bias, a
    pooler; random norm weights so that a swap shows."""
    from test_hf_import import _write_tokenizer

    from lmtk.models import ModelConfig, build_model
    from lmtk.models.hf import hf_tokenizer

    path.mkdir(parents=True)
    _write_tokenizer(path, "wordpiece")
    tok = hf_tokenizer(path)
    cfg = ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=40, positions="learned",
                      norm="layernorm", norm_position="post", norm_eps=1e-12, embedding_norm=True, bias=bias, mlp="gelu",
                      tie_embeddings=tie, type_vocab_size=2, head_transform=True, head_bias=True, pooler=True)
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    ckpt = path / "ckpt"
    checkpoint.write(ckpt, model, {}, {"model": cfg.to_dict(), "objective": {"name": "mlm", "masked_shift": 0},
                                       "specials": tok.specials}, tokenizer=tok.to_json(), config="")
    return ckpt


@pytest.mark.parametrize("tie,bias", [(True, True), (False, False)])
def test_masked_checkpoint_exports_as_bert(tmp_path, tie, bias):
    ckpt = _bert_checkpoint(tmp_path / "b", tie=tie, bias=bias)
    got = _check_export(ckpt, tmp_path / "hf", masked=True)
    assert got["family"] == "bert"
    print(f"bert tie={tie} bias={bias}: max |logit diff| transformers {got['hf']:.2e}, round trip {got['round_trip']:.2e}")


def _one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("name,blocked", [("gla", "model.mixer=gla is a recurrent mixer"),
                                          ("hybrid", "model.layers='AR' mixes attention with gla layers (a hybrid)")])
def test_recurrent_and_hybrid_runs_refuse_in_one_line(runs, name, blocked, tmp_path):
    with pytest.raises(UserError) as err:
        export_hf(runs[name], tmp_path / "hf")
    msg = _one_line(err)
    assert msg.startswith(blocked) and "its checkpoint stands alone instead: lmtk generate " in msg
    assert str(runs[name] / "checkpoints" / "final") in msg
    assert not (tmp_path / "hf").exists()


BERT_SHAPE = dict(norm_position="post", embedding_norm=True, head_transform=True)


@pytest.mark.parametrize("masked,options,blocked", [
    # lmtk's crammed BERT (conf/model/crammed-bert.yaml): pre-norm comes first
    (True, dict(positions="sinusoidal", embedding_norm=True, bias=False, mlp="gated-gelu"), "model.norm_position=pre: BertForMaskedLM is post-norm"),
    (True, dict(BERT_SHAPE, positions="rope"), "model.positions=rope: BERT has learned absolute positions"),
    (True, dict(BERT_SHAPE, mlp="gated-gelu"), "model.mlp=gated-gelu: BERT's MLP is a plain GELU one"),
    (True, dict(BERT_SHAPE, head_transform=False), "model.head_transform=false: BertForMaskedLM's head always has"),
    (True, dict(BERT_SHAPE, embedding_norm=False), "model.embedding_norm=false: BERT normalises its embeddings"),
    (False, dict(norm_position="post"), "model.norm_position=post: GPT-2 and Llama are pre-norm"),
    (False, dict(positions="learned", norm="rmsnorm"), "model.norm=rmsnorm with model.positions=learned: GPT-2 uses LayerNorm"),
    (False, dict(positions="learned", mlp="swiglu"), "model.mlp=swiglu with model.positions=learned: GPT-2's MLP"),
    (False, dict(positions="rope", norm="layernorm", mlp="swiglu"), "model.norm=layernorm with rotary positions: Llama uses RMSNorm"),
    (False, dict(positions="rope", norm="rmsnorm", mlp="gelu"), "model.mlp=gelu with rotary positions: Llama's MLP is a gated one"),
    (False, dict(positions="none"), "model.positions=none: GPT-2 has learned positions, Llama rotary ones"),
    (False, dict(positions="alibi"), "model.positions=alibi: GPT-2 has learned positions, Llama rotary ones"),
    (False, dict(positions="rope", norm="rmsnorm", mlp="swiglu", mixer={"name": "attention", "kv_shift": True}),
     "model.mixer.kv_shift=true (KV shifting attention): no transformers class"),
    (False, dict(positions="rope", norm="rmsnorm", mlp="swiglu", window=4, bias=True), "model.window=4 with model.bias=true: MistralForCausalLM"),
    (False, dict(embedding_norm=True), "model.embedding_norm=true: neither GPT-2 nor Llama"),
    (False, dict(positions="rope", norm="rmsnorm", mlp="swiglu", parametrization="mup", mup_base_width=16),
     "model.parametrization=mup at model.d_model=32 != model.mup_base_width=16: its logit multiplier"),
])
def test_options_without_a_transformers_class_are_named(masked, options, blocked):
    from lmtk.models import ModelConfig
    from lmtk.models.hf_export import Blocked, hf_family

    cfg = ModelConfig(**{"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 2, **options})
    with pytest.raises(Blocked, match="^" + blocked.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        hf_family(cfg, masked)


def test_missing_run_and_occupied_out(runs, tmp_path):
    with pytest.raises(UserError) as err:
        export_hf("nope", tmp_path / "hf", root=runs["llama"].parent)
    assert _one_line(err).startswith("no run named 'nope'")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError) as err:
        export_hf(runs["llama"], out)
    assert "exists and is not empty; pass --force" in _one_line(err) and (out / "notes.txt").read_text() == "mine"
    export_hf(runs["llama"], out, force=True)  # replaced whole: no stale files
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()
    with pytest.raises(UserError) as err:  # --force never replaces a run
        export_hf(runs["llama"], runs["gla"], force=True)
    assert "holds an lmtk run or checkpoint" in _one_line(err) and (runs["gla"] / "run.json").is_file()


def test_cli(runs, tmp_path):
    res = helpers.cli("export", "llama", str(tmp_path / "hf"), "--to", "hf", "--root", str(runs["llama"].parent))
    assert res.exit_code == 0, res.output
    assert "as LlamaForCausalLM" in res.output and "AutoModelForCausalLM.from_pretrained" in res.output
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json",
        "tokenizer_config.json"]


def test_lora_finetune_run_exports_its_merged_lm(runs, lmtk_env, tmp_path):
    """A LoRA fine-tuning run (continued LM training) exports its LM with the adapters merged:
    the export's logits are the fine-tuned model's, not the base's."""
    d = tmp_path / "text"
    d.mkdir()
    (d / "a.txt").write_text("\n\n".join(f"the cat {i} sat on the mat and looked at the dog" for i in range(300)))
    res = helpers.cli("finetune", f"base={runs['llama']}", "data=text", f"data.train={d}/a.txt", "peft=lora",
                      "peft.targets=[*mixer.*,*mlp.*]", "train.lr=5e-2", "budget.epochs=null", "budget.steps=3",
                      "data.seq_len=32", "train.batch_size=4", "train.micro_batch_size=4", "val.tokens=1024", "run.name=ft")
    assert res.exit_code == 0, res.output
    ft = lmtk_env.runs / "ft"
    got = _check_export(ft, tmp_path / "hf")
    assert got["family"] == "llama"
    base = checkpoint.load_pretrained(runs["llama"])[0]
    tuned = checkpoint.load_pretrained(ft)[0]
    ids = _ids(tuned.cfg.vocab_size)
    with torch.no_grad():
        assert (base(ids) - tuned(ids)).abs().max() > 1e-3  # LoRA changed the model, and the export has that
    print(f"lora finetune: max |logit diff| transformers {got['hf']:.2e}, round trip {got['round_trip']:.2e}")


def test_bitfit_runs_export_their_biases_or_name_the_head_bias(runs, lmtk_env, tmp_path):
    """BitFit on the bias-free default model adds zero biases to every linear layer: trained on
    the attention and MLP layers only, they export as Llama's attention_bias / mlp_bias (zeros
    where untrained); a trained bias on the LM head has no place in LlamaForCausalLM: one line."""
    d = tmp_path / "text"
    d.mkdir()
    (d / "a.txt").write_text("\n\n".join(f"the cat {i} sat on the mat and looked at the dog" for i in range(300)))
    common = [f"base={runs['llama']}", "data=text", f"data.train={d}/a.txt", "peft=bitfit", "train.lr=5e-2",
              "budget.epochs=null", "budget.steps=3", "data.seq_len=32", "train.batch_size=4", "train.micro_batch_size=4",
              "val.tokens=1024"]
    for args in (["peft.biases=[*mixer.qkv*,*mlp.down*]", "run.name=layers"], ["run.name=head"]):
        res = helpers.cli("finetune", *common, *args)
        assert res.exit_code == 0, res.output
    got = _check_export(lmtk_env.runs / "layers", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert got["family"] == "llama" and config["attention_bias"] and config["mlp_bias"]
    with pytest.raises(UserError) as err:
        export_hf(lmtk_env.runs / "head", tmp_path / "hf2")
    assert _one_line(err).startswith("the LM head has a bias (one BitFit added), which LlamaForCausalLM has no place for")
