"""suite=harness: the lm-eval adapter over lmtk's model and tokenizer (lmtk/eval/harness.py).

The adapter's three request kinds are checked against direct computations on tiny models
without lm-eval; the end-to-end test runs lm-eval itself on local task YAMLs over local jsonl
files (offline) and is skipped where lm-eval is not installed."""

import json
import sys
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lmtk.errors import UserError
from lmtk.eval import harness
from lmtk.eval.harness import Config, HarnessLM
from lmtk.models import LanguageModel, ModelConfig

REPO = Path(__file__).resolve().parents[1]
TEXT = ("the cat sat on the mat. the dog sat on the log. a bird flew over the house and the tree. "
        "numbers: 1 2 3 4 5 6 7 8 9 10. the quick brown fox jumps over the lazy dog. ") * 20


@pytest.fixture(scope="module")
def tok():
    from lmtk.data.tokenizer import train_tokenizer

    cfg = SimpleNamespace(kind="bpe", vocab_size=320, train_chars=10**9, lowercase=False)
    return train_tokenizer(cfg, [TEXT])


def tiny(tok, seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 64, "positions": "rope", "rope_layout": "half", **kw}
    return LanguageModel(ModelConfig(vocab_size=tok.vocab_size, **kw)).eval()


class Req:
    """What the adapter reads off lm-eval's Instance: .args."""

    def __init__(self, *args):
        self.args = args


def direct_logprob(model, ctx, cont):
    """log p(cont | ctx) and greedy? from one unpadded forward over ctx + cont."""
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = F.log_softmax(model(ids).float()[0], -1)
    pos = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
    lp = sum(logp[p, t].item() for p, t in zip(pos, cont))
    greedy = all(logp[p].argmax().item() == t for p, t in zip(pos, cont))
    return lp, greedy


PAIRS = [("the cat sat on the", " mat"), ("the dog", " sat on the log."), ("", "a bird"),
         ("numbers: 1 2 3 ", "4 5"), ("the quick brown fox jumps over the lazy", " dog. the"), ("a", " b")]


def test_config_yaml_validates_against_config():
    from omegaconf import OmegaConf

    yaml = OmegaConf.load(REPO / "conf" / "eval" / "harness.yaml")
    assert set(yaml.keys()) == {f.name for f in fields(Config)}
    merged = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), yaml))  # types checked here
    assert merged == Config()  # the file and the dataclass defaults agree


def test_encode_pair_splits_at_the_context_tokens(tok):
    lm = HarnessLM(tiny(tok), tok)
    ctx, cont = lm.encode_pair("the cat sat on the", " mat")
    assert ctx == [tok.eos_id] + tok.encode("the cat sat on the")
    assert ctx[1:] + cont == tok.encode("the cat sat on the mat")
    # trailing whitespace of the context belongs to the continuation (" mat" is one BPE word)
    assert lm.encode_pair("the cat sat on the ", "mat") == (ctx, cont)
    assert lm.encode_pair("", "a bird") == ([tok.eos_id], tok.encode("a bird"))
    assert HarnessLM(tiny(tok), tok, sep_prefix=False).encode_pair("the cat", " sat")[0] == tok.encode("the cat")
    assert lm.loglikelihood([Req("the cat", "")]) == [(0.0, True)]


def test_wordpiece_runs_split_and_score_the_same_way():
    from lmtk.data.tokenizer import train_tokenizer

    wp = train_tokenizer(SimpleNamespace(kind="wordpiece", vocab_size=200, train_chars=10**9, lowercase=True), [TEXT])
    model = tiny(wp)
    lm = HarnessLM(model, wp)
    ctx, cont = lm.encode_pair("The cat sat on the ", "mat")
    assert ctx == [wp.eos_id] + wp.encode("the cat sat on the") and cont == wp.encode("mat")
    (lp, _), = lm.loglikelihood([Req("The cat sat on the ", "mat")])
    assert lp == pytest.approx(direct_logprob(model, ctx, cont)[0], abs=1e-4)
    assert isinstance(lm.generate_until([Req("the cat", {"max_gen_toks": 3})])[0], str)


def test_loglikelihood_equals_direct_computation_and_scoring(tok):
    from lmtk.eval.scoring import continuation_logprobs

    model = tiny(tok)
    lm = HarnessLM(model, tok, batch_size=4)
    got = lm.loglikelihood([Req(c, x) for c, x in PAIRS])
    pairs = [lm.encode_pair(c, x) for c, x in PAIRS]
    want = [direct_logprob(model, c, x) for c, x in pairs]
    for (g_lp, g_greedy), (w_lp, w_greedy) in zip(got, want):
        assert g_lp == pytest.approx(w_lp, abs=1e-4)
        assert g_greedy == w_greedy
    assert got == continuation_logprobs(model, pairs, batch_size=4)  # the same batches: the same numbers
    assert all(lp < 0 for lp, _ in got)


@pytest.mark.parametrize("mixer", ["attention", "gla"])
def test_padded_batch_equals_one_by_one(tok, mixer):
    model = tiny(tok, mixer={"name": mixer})
    reqs = [Req(c, x) for c, x in PAIRS]
    batched = HarnessLM(model, tok, batch_size=len(reqs)).loglikelihood(reqs)
    alone = HarnessLM(model, tok, batch_size=1).loglikelihood(reqs)
    for (a, ga), (b, gb) in zip(batched, alone):
        assert a == pytest.approx(b, abs=1e-4)
        assert ga == gb


def test_greedy_flag_true_when_continuation_is_the_argmax(tok):
    model = tiny(tok)
    lm = HarnessLM(model, tok)
    ctx = [tok.eos_id] + tok.encode("the cat")
    ids = list(ctx)
    for _ in range(3):  # the model's own greedy continuation
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    (lp, greedy), = lm.loglikelihood_tokens([(ctx, ids[len(ctx):])])
    assert greedy and lp < 0


def test_long_context_cut_from_the_left(tok):
    model = tiny(tok, max_seq_len=16)
    lm = HarnessLM(model, tok)
    ctx, cont = lm.encode_pair(TEXT[:300], " the")
    (lp, _), = lm.loglikelihood([Req(TEXT[:300], " the")])
    kept = (ctx + cont)[-16:]
    assert lp == pytest.approx(direct_logprob(model, kept[:-len(cont)], cont)[0], abs=1e-4)
    assert lm.counts["context_cut"] == 1


def test_continuation_longer_than_the_window_keeps_its_tail(tok):
    model = tiny(tok, max_seq_len=16)
    lm = HarnessLM(model, tok)
    ctx, cont = lm.encode_pair("the cat", " " + TEXT[:200])
    assert len(cont) > 15
    (lp, _), = lm.loglikelihood([Req("the cat", " " + TEXT[:200])])
    whole = ctx + cont
    assert lp == pytest.approx(direct_logprob(model, whole[-16:-15], whole[-15:])[0], abs=1e-4)
    assert lm.counts["continuation_cut"] == 1


@pytest.mark.parametrize("kw,match", [({"max_len": 1}, "harness.max_len=1 must be at least 2"),
                                      ({"rolling_stride": 64}, r"harness.rolling_stride=64 must be in 1..63")])
def test_bad_adapter_settings_are_user_errors(tok, kw, match):
    with pytest.raises(UserError, match=match):
        HarnessLM(tiny(tok), tok, **kw)


@pytest.mark.parametrize("kw,match", [
    ({"tasks": []}, r"harness.tasks is empty"),
    ({"batch_size": 0}, r"harness.batch_size=0 must be at least 1"),
    ({"max_gen_tokens": 0}, r"harness.max_gen_tokens=0 must be at least 1"),
    ({"num_fewshot": -1}, r"harness.num_fewshot=-1 must be 0 or more"),
    ({"limit": 0.0}, r"harness.limit=0.0 must be positive"),
    ({"include_path": "nope"}, r"harness.include_path=nope: no such folder"),
])
def test_bad_config_is_a_user_error_before_lm_eval_is_needed(tok, kw, match):
    target = SimpleNamespace(model=tiny(tok), tokenizer=tok, meta={}, device=torch.device("cpu"), dtype=torch.float32,
                             name="tiny", seed=0)
    with pytest.raises(UserError, match=match):
        harness.run(target, Config(**kw))


def test_loglikelihood_rolling_equals_direct_sum(tok):
    from lmtk.eval.scoring import rolling_logprob

    model = tiny(tok)
    texts = ["the cat sat on the mat.", "a bird flew over the house", TEXT[:90]]
    lm = HarnessLM(model, tok, batch_size=2)
    got = lm.loglikelihood_rolling([Req(t) for t in texts])
    for t, g in zip(texts, got):
        ids = [tok.eos_id] + tok.encode(t)
        assert len(ids) <= 64
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([ids])).float()[0], -1)
        assert g == pytest.approx(sum(logp[p, ids[p + 1]].item() for p in range(len(ids) - 1)), abs=1e-4)
    # longer than the window: the sliding window of scoring.rolling_logprob, every token once
    long = TEXT[:400]
    ids = [tok.eos_id] + tok.encode(long)
    assert len(ids) > 64
    lm16 = HarnessLM(model, tok, max_len=16, rolling_stride=15)
    (g,) = lm16.loglikelihood_rolling([Req(long)])
    assert g == pytest.approx(rolling_logprob(model, ids, stride=15, max_len=16)[0], abs=1e-4)
    # = windows of 16 tokens, each scoring the 15 tokens after its first (the last one: the
    # remaining tokens, after as much context as fits), summed
    total = 0.0
    for e in range(1, len(ids), 15):
        end = min(e + 15, len(ids))
        a = max(0, end - 16)
        total += direct_logprob(model, ids[a:e], ids[e:end])[0]
    assert g == pytest.approx(total, abs=1e-3)
    assert lm16.counts["rolling_windows"] == 1


def chain_model(tok, order):
    """A model that, whatever came before, follows token order[k] with order[k+1] (a cycle over
    the whole vocabulary): no attention or MLP output, no positions, and a head whose row for
    order[k+1] is the final norm of order[k]'s embedding (the unique argmax, by Cauchy-Schwarz:
    every normalised embedding has the same length)."""
    model = tiny(tok, n_layers=1, positions="learned", tie_embeddings=False)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "is_residual_out", False):
                m.weight.zero_()
                if m.bias is not None:
                    m.bias.zero_()
        model.pos.weight.zero_()
        e = model.final_norm(model.embed.weight)
        head = torch.zeros_like(model.head.weight)
        for k, t in enumerate(order):
            head[order[(k + 1) % len(order)]] = 10 * e[t]
        model.head.weight.copy_(head)
    return model


@pytest.fixture(scope="module")
def chain(tok):
    x, y = tok.encode("the cat")[-1], tok.encode("the dog")[-1]
    assert x != y
    clean = [i for i in range(tok.vocab_size) if i not in tok.special_ids and i not in (x, y)
             and tok.decode([i]).strip().isalnum() and tok.decode([i]).isascii()]
    b, r = clean[:30], clean[30:32]
    rest = [i for i in range(tok.vocab_size) if i not in {x, y, tok.eos_id, *b, *r}]
    order = [tok.eos_id, *rest, x, *b, y, *r]  # after x: b...; after y: r1, r2, then [SEP]
    return SimpleNamespace(model=chain_model(tok, order), b=b, y=y, r=r)


def test_chain_model_is_deterministic(tok, chain):
    from lmtk.models.infer import generate

    ids = torch.tensor([[tok.eos_id] + tok.encode("the cat")])
    out = generate(chain.model, ids, 5, temperature=0)
    assert out[0, ids.shape[1]:].tolist() == chain.b[:5]


def test_generate_until_respects_max_tokens_and_stops_at_until(tok, chain):
    lm = HarnessLM(chain.model, tok)
    full = tok.decode(chain.b[:5])
    assert lm.generate_until([Req("the cat", {"until": [], "max_gen_toks": 5})]) == [full]
    assert lm.generate_until([Req("the cat", {"max_gen_toks": 3})]) == [tok.decode(chain.b[:3])]
    # a stop string: the answer ends before it, and decoding ends once it appears
    calls = []
    hook = chain.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        u = tok.decode(chain.b[3:4])
        (out,) = lm.generate_until([Req("the cat", {"until": [u], "max_gen_toks": 25})])
    finally:
        hook.remove()
    text = tok.decode(chain.b[:25])
    assert out == text[:text.find(u)] and u not in out
    assert len(calls) <= 1 + 4  # prefill + the steps up to the token holding the stop string
    # a bare string is an until; without max_gen_toks, max_gen_tokens; [SEP] ends the text
    assert lm.generate_until([Req("the cat", "plain until")]) == [tok.decode(chain.b + [chain.y] + chain.r)]
    assert lm.generate_until([Req("the dog", {"until": ["\n\n"], "max_gen_toks": 30})]) == [tok.decode(chain.r)]


def test_generate_batched_equals_one_by_one(tok):
    model = tiny(tok, seed=3)
    ctxs = ["the cat sat", "the dog sat", "a bird", "the quick brown fox", "the cat", "1 2 3"]
    reqs = [Req(c, {"until": ["."], "max_gen_toks": 6}) for c in ctxs]
    lens = [len(tok.encode(c)) for c in ctxs]
    assert len(set(lens)) < len(lens)  # some contexts share a length: they decode as one batch
    batched = HarnessLM(model, tok, batch_size=8).generate_until(reqs)
    alone = HarnessLM(model, tok, batch_size=1).generate_until(reqs)
    assert batched == alone
    assert all("." not in s for s in batched)


def test_generate_sampling_is_seeded(tok):
    model = tiny(tok, seed=4)
    req = [Req("the cat", {"until": [], "max_gen_toks": 8, "do_sample": True, "temperature": 1.0})]
    a = HarnessLM(model, tok, seed=1).generate_until(req)
    assert a == HarnessLM(model, tok, seed=1).generate_until(req)
    greedy = HarnessLM(model, tok).generate_until([Req("the cat", {"until": [], "max_gen_toks": 8})])
    # do_sample=False ignores a temperature (lm-eval's default is greedy)
    assert greedy == HarnessLM(model, tok, seed=1).generate_until(
        [Req("the cat", {"until": [], "max_gen_toks": 8, "do_sample": False, "temperature": 0.7})])


def test_results_flatten_to_task_metric_names():
    results = {
        "results": {"t1": {"alias": "t1", "acc,none": 0.5, "acc_stderr,none": 0.1, "sample_len": 4},
                    "t2": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": "N/A"}},
        "groups": {"g": {"acc,none": 0.4}},
        "n-samples": {"t1": {"original": 10, "effective": 4}, "t2": {"original": 8, "effective": 8}},
        "n-shot": {"t1": 0, "t2": 5},
    }
    scores, rows, n = harness._flatten(results)
    assert list(scores) == ["t1/acc", "t2/exact_match[strict-match]", "g/acc"]
    assert n == 12
    assert rows[0] == {"task": "t1", "metric": "acc", "filter": "none", "value": 0.5, "stderr": 0.1, "n": 4,
                       "num_fewshot": 0}
    assert rows[1]["stderr"] is None and rows[1]["num_fewshot"] == 5


def test_generate_context_leaves_room_for_the_answer(tok, chain):
    lm = HarnessLM(chain.model, tok, max_len=16)
    (out,) = lm.generate_until([Req(TEXT[:200] + " the cat", {"max_gen_toks": 4})])
    assert out == tok.decode(chain.b[:4])
    assert lm.counts["context_cut"] == 1


def test_missing_lm_eval_is_a_user_error(monkeypatch, tok):
    import builtins

    real = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    for mod in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.delitem(sys.modules, mod)
    target = SimpleNamespace(model=tiny(tok), tokenizer=tok, meta={}, device=torch.device("cpu"),
                             dtype=torch.float32, name="tiny", seed=0)
    with pytest.raises(UserError) as err:
        harness.run(target, Config())
    assert str(err.value) == "suite=harness needs lm-evaluation-harness: pip install 'lmtk[eval]'"
    assert err.value.exit_code == 2


# -- end to end through lm-eval (skipped without it) ---------------------------------------------

MC = [
    {"question": "the cat sat on the", "choices": ["mat", "sky", "seven"], "label": 0},
    {"question": "the dog sat on the", "choices": ["log", "fox"], "label": 0},
    {"question": "a bird flew over the", "choices": ["house", "cat", "tree"], "label": 0},
    {"question": "numbers: 1 2 3", "choices": ["4", "x"], "label": 0},
    {"question": "the quick brown", "choices": ["fox", "mat"], "label": 1},
]
LAMBADA = [{"text": "the cat sat on the mat"}, {"text": "the dog sat on the log"}, {"text": "the quick brown fox"}]
GEN = [{"q": "the cat", "a": "sat"}, {"q": "the dog", "a": "sat"}]


def write_tasks(root: Path) -> Path:
    data, tasks = root / "data", root / "tasks"
    data.mkdir()
    tasks.mkdir()
    for name, rows in (("mc", MC), ("lambada", LAMBADA), ("gen", GEN)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def files(name):
        return f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data / name}.jsonl\ntest_split: test\n"

    (tasks / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + files("mc") + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (tasks / "tiny_lambada.yaml").write_text(  # lambada_openai's shape: the last word given the rest
        "task: tiny_lambada\n" + files("lambada") + "output_type: loglikelihood\n"
        "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\ndoc_to_target: \"{{' '+text.split(' ')[-1]}}\"\n"
        "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (tasks / "tiny_rolling.yaml").write_text(
        "task: tiny_rolling\n" + files("lambada") + "output_type: loglikelihood_rolling\n"
        "doc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    (tasks / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n" + files("gen") + "output_type: generate_until\ndoc_to_text: '{{q}}'\n"
        "doc_to_target: '{{a}}'\ngeneration_kwargs:\n  until: ['.']\n  max_gen_toks: 4\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    return tasks


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_end_to_end_lm_eval_offline_local_tasks(tmp_path, tok, objective):
    pytest.importorskip("lm_eval")
    tasks = write_tasks(tmp_path)
    model = tiny(tok)
    target = SimpleNamespace(model=model, tokenizer=tok, model_cfg=model.cfg, meta={"objective": {"name": objective}},
                             device=torch.device("cpu"), dtype=torch.float32, name="tiny", seed=0)
    names = ["tiny_mc", "tiny_lambada", "tiny_rolling", "tiny_gen"] if objective == "clm" else ["tiny_mc"]
    cfg = Config(tasks=names, include_path=str(tasks), include_defaults=False, batch_size=4)
    out = harness.run(target, cfg)
    assert set(out) == {"scores", "samples", "rows", "notes"}
    assert next(iter(out["scores"])) == "tiny_mc/acc"  # headline first
    n = {"tiny_mc": len(MC), "tiny_lambada": len(LAMBADA), "tiny_rolling": len(LAMBADA), "tiny_gen": len(GEN)}
    assert out["samples"] == sum(n[t] for t in names)
    for row in out["rows"]:
        assert row["n"] == n[row["task"]]
    # lm-eval's accuracy is the adapter's own argmax over the choices' log-likelihoods
    lm = HarnessLM(model, tok)
    right = 0
    for doc in MC:
        lls = [lp for lp, _ in lm.loglikelihood([Req(doc["question"], " " + c) for c in doc["choices"]])]
        right += max(range(len(lls)), key=lls.__getitem__) == doc["label"]
    assert out["scores"]["tiny_mc/acc"] == pytest.approx(right / len(MC))
    mlm_note = any("trained as an encoder only" in n for n in out["notes"])
    assert mlm_note == (objective == "mlm")
    if objective == "clm":
        assert 0.0 <= out["scores"]["tiny_lambada/acc"] <= 1.0
        assert out["scores"]["tiny_lambada/perplexity"] > 1.0
        assert out["scores"]["tiny_rolling/word_perplexity"] > 1.0
        assert out["scores"]["tiny_gen/exact_match"] in (0.0, 0.5, 1.0)


def test_unknown_task_and_offline_hub_task_are_user_errors(tmp_path, tok):
    pytest.importorskip("lm_eval")
    tasks = write_tasks(tmp_path)
    model = tiny(tok)
    target = SimpleNamespace(model=model, tokenizer=tok, meta={}, device=torch.device("cpu"), dtype=torch.float32,
                             name="tiny", seed=0)
    with pytest.raises(UserError, match=r"unknown lm-eval task 'tiny_mcc' in .* \(did you mean: tiny_mc"):
        harness.run(target, Config(tasks=["tiny_mcc"], include_path=str(tasks), include_defaults=False))
    # a task whose data is on the Hub, offline
    (tasks / "hub.yaml").write_text("task: hub_task\ndataset_path: EleutherAI/not_here\noutput_type: loglikelihood\n"
                                    "test_split: test\ndoc_to_text: '{{text}}'\ndoc_to_target: '{{text}}'\n")
    with pytest.raises(UserError, match="lm-eval could not load the data of hub_task: .*harness.include_path"):
        harness.run(target, Config(tasks=["hub_task"], include_path=str(tasks), include_defaults=False))


# -- through `lmtk eval` ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_root(tmp_path_factory, shared_cache) -> Path:
    """A finished tiny CLM run 'h'."""
    import helpers

    root = tmp_path_factory.mktemp("harness-runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMTK_RUNS", str(root))
        mp.setenv("LMTK_CACHE", str(shared_cache))
        helpers.train(*helpers.TINY, "budget.steps=2", "run.name=h")
    helpers.reset_console()
    return root


def test_lmtk_eval_suite_harness_writes_results(run_root, tmp_path):
    pytest.importorskip("lm_eval")
    import helpers

    tasks = write_tasks(tmp_path)
    res = helpers.cli("eval", "h", f"root={run_root}", "suite=harness", f"harness.include_path={tasks}",
                      "harness.include_defaults=false", "harness.tasks=[tiny_mc,tiny_lambada]", "harness.limit=2")
    assert res.exit_code == 0, res.output
    out = json.loads((run_root / "h" / "eval" / "harness.json").read_text())
    assert out["headline"] == "tiny_mc/acc" and out["samples"] == 4  # limit: 2 documents per task
    assert set(out["scores"]) == {"tiny_mc/acc", "tiny_lambada/acc", "tiny_lambada/perplexity"}
    assert out["config"]["tasks"] == ["tiny_mc", "tiny_lambada"]


def test_lmtk_eval_suite_harness_without_lm_eval_is_one_line(run_root, monkeypatch, capsys):
    import builtins

    from lmtk.cli import main

    real = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    for mod in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.delitem(sys.modules, mod)
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["lmtk", "eval", "h", f"root={run_root}", "suite=harness"])
    monkeypatch.delenv("LMTK_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["error: suite=harness needs lm-evaluation-harness: pip install 'lmtk[eval]'"]
