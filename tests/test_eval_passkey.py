"""suite=passkey: prompt construction (length, depth, answer), scoring by greedy cached decoding
(a model that copies the key scores 1, a random one ~0), lengths past the context reported, and
the masked-only refusal."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from lmtk.errors import UserError
from lmtk.eval import passkey as suite
from lmtk.models import LanguageModel, ModelConfig


@pytest.fixture(scope="module")
def tok():
    from lmtk.data.tokenizer import train_tokenizer

    text = " ".join([suite.INTRO, suite.FILLER, suite.NEEDLE.format(key="12345"), suite.QUESTION] * 20
                    + [str(n) for n in range(0, 10000, 7)])
    return train_tokenizer(SimpleNamespace(kind="bpe", vocab_size=400, train_chars=10**9, lowercase=False), [text])


@pytest.mark.parametrize("length", [96, 256, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_prompt_has_the_requested_length_the_key_at_the_depth_and_the_answer(tok, length, depth):
    key = "40721"
    p = suite.build_prompt(tok, length, depth, key)
    assert len(p.ids) == length - suite.answer_room(5)  # exact: prompt + room for the answer = the length
    needle = tok.encode(suite.NEEDLE.format(key=key))
    assert p.ids[p.needle_start:p.needle_start + len(needle)] == needle
    intro, question = tok.encode(suite.INTRO), tok.encode(suite.QUESTION)
    n_fill = len(p.ids) - len(intro) - len(needle) - len(question)
    assert abs((p.needle_start - len(intro)) / n_fill - depth) <= 1 / n_fill  # depth of the filler before it
    assert abs(p.needle_start / len(p.ids) - depth) < (len(p.ids) - n_fill) / len(p.ids)  # and of the prompt
    assert p.answer == key and p.ids[-len(question):] == question
    assert tok.decode(p.ids).count(key) == 2  # the needle states it twice, nothing else does


def test_keys_have_the_digits_and_answers_are_read_from_the_start():
    import random

    rng = random.Random(0)
    keys = [suite.make_key(rng, 5) for _ in range(50)]
    assert all(len(k) == 5 and k.isdigit() and k[0] != "0" for k in keys) and len(set(keys)) > 40
    assert suite.read_answer(" 40721. Remember") == "40721"
    assert suite.read_answer(" 4 0 7 2 1") == "40721"
    assert suite.read_answer(" the number 40721") == ""


def test_a_length_too_short_for_the_prompt_is_an_error(tok):
    with pytest.raises(UserError, match=r"passkey.lengths: 20 tokens is too short for the prompt"):
        suite.build_prompt(tok, 20, 0.5, "12345")


class CopyingModel:
    """A 'model' that cheats: reads the key out of the prompt at prefill and writes it back, a
    token per decoding step, through infer.generate's cache protocol."""

    def __init__(self, tok, max_seq_len):
        self.tok, self.cfg = tok, SimpleNamespace(max_seq_len=max_seq_len)

    def eval(self):
        return self

    def new_cache(self):
        return SimpleNamespace(offset=0, answers=None, step=0)

    def __call__(self, ids, causal=True, cache=None):
        if cache.offset == 0:
            keys = [re.search(r"secret number is (\d+)", self.tok.decode(row)).group(1) for row in ids.tolist()]
            cache.answers = [self.tok.encode(f" {k}.") for k in keys]
        cache.offset += ids.shape[1]
        logits = torch.zeros(len(ids), ids.shape[1], self.tok.vocab_size)
        for b, ans in enumerate(cache.answers):
            logits[b, -1, ans[min(cache.step, len(ans) - 1)]] = 1.0
        cache.step += 1
        return logits


def target(model, tok, max_seq_len, meta=None):
    mc = ModelConfig(vocab_size=448, d_model=32, n_layers=2, n_heads=2, max_seq_len=max_seq_len, positions="rope")
    return SimpleNamespace(model=model, tokenizer=tok, model_cfg=mc, meta=meta or {"objective": {"name": "clm"}},
                           device=torch.device("cpu"), dtype=None, name="tiny", seed=0)


CFG = dict(lengths=[96, 192, 512], depths=[0.0, 0.5, 1.0], trials=2)


def test_a_model_that_copies_the_key_scores_one_and_a_random_model_about_zero(tok):
    out = suite.run(target(CopyingModel(tok, 256), tok, 256), suite.Config(**CFG))
    assert list(out["scores"]) == ["accuracy", "len96", "len192"] and out["scores"]["accuracy"] == 1.0
    assert out["samples"] == 2 * 3 * 2
    by_len = {r["length"]: r for r in out["rows"]}
    assert by_len[96]["50%"] == by_len[192]["100%"] == 1.0
    assert by_len[512]["mean"] is None and "past the context" in by_len[512]["note"]  # reported, not scored
    assert any("512 (reported, not scored)" in n for n in out["notes"])

    torch.manual_seed(0)
    mc = ModelConfig(vocab_size=448, d_model=32, n_layers=2, n_heads=2, max_seq_len=256, positions="rope")
    rand = suite.run(target(LanguageModel(mc).eval(), tok, 256), suite.Config(**CFG))
    assert rand["scores"]["len96"] <= 0.2 and rand["scores"]["len192"] <= 0.2


def test_masked_only_run_and_lengths_all_past_the_context_are_refused(tok):
    with pytest.raises(UserError, match=r"suite=passkey decodes left to right, but run tiny was trained with objective=mlm"):
        suite.run(target(None, tok, 256, meta={"objective": {"name": "mlm"}}), suite.Config(**CFG))
    with pytest.raises(UserError, match=r"every length in passkey.lengths \(512, 1024\) is past the model's context"):
        suite.run(target(None, tok, 256), suite.Config(lengths=[512, 1024]))
    with pytest.raises(UserError, match=r"passkey.depths: 1.5 is not a fraction"):
        suite.Config(depths=[0.5, 1.5])
