"""Padded batches: with attention_mask, every real token's output equals the unpadded text's
(both readings for attention; right padding for left-to-right mixers)."""

import pytest
import torch

from lmtk.models import LanguageModel, ModelConfig


def tiny(mixer="attention", **kw):
    torch.manual_seed(0)
    kw = {"positions": "rope", **kw}
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=2, max_seq_len=32, rope_layout="half",
                      norm="rmsnorm", mlp="swiglu", bias=False, mixer={"name": mixer}, **kw)
    return LanguageModel(cfg).eval()


def padded(texts, pad=0):
    T = max(len(t) for t in texts)
    ids = torch.full((len(texts), T), pad)
    mask = torch.zeros(len(texts), T, dtype=torch.bool)
    for i, t in enumerate(texts):
        ids[i, :len(t)] = torch.tensor(t)
        mask[i, :len(t)] = True
    return ids, mask


TEXTS = [[5, 9, 3, 7, 1, 8, 2, 4, 6], [4, 4, 2], [7, 1, 3, 3, 9, 2]]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_padded_batch_equals_one_by_one_attention(causal, positions):
    model = tiny(positions=positions)
    ids, mask = padded(TEXTS)
    with torch.no_grad():
        batch = model(ids, causal=causal, attention_mask=mask)
        unmasked = model(ids, causal=causal)
        for i, t in enumerate(TEXTS):
            alone = model(torch.tensor([t]), causal=causal)[0]
            torch.testing.assert_close(batch[i, :len(t)], alone, atol=1e-5, rtol=1e-5)
    if not causal:  # without the mask the pads change the bidirectional reading: the mask is doing the work
        assert not torch.allclose(unmasked[1, :3], batch[1, :3], atol=1e-4)
    assert torch.isfinite(batch).all()  # padded query rows are never empty (no NaN)


def test_padded_batch_with_window_and_gqa():
    model = tiny(n_kv_heads=1, window=4)
    ids, mask = padded(TEXTS)
    with torch.no_grad():
        batch = model(ids, causal=True, attention_mask=mask)
        for i, t in enumerate(TEXTS):
            torch.testing.assert_close(batch[i, :len(t)], model(torch.tensor([t]))[0], atol=1e-5, rtol=1e-5)


def test_recurrent_and_hybrid_take_right_padding():
    model = tiny("gla", layers="RA")
    ids, mask = padded(TEXTS)
    with torch.no_grad():
        batch = model(ids, causal=True, attention_mask=mask)
        for i, t in enumerate(TEXTS):
            torch.testing.assert_close(batch[i, :len(t)], model(torch.tensor([t]))[0], atol=1e-5, rtol=1e-5)
        left = mask.flip(1)
        with pytest.raises(ValueError, match="pad batches on the right"):
            model(ids, causal=True, attention_mask=left)


def test_mask_gradients_flow_under_activation_checkpointing():
    model = tiny().train()
    model.activation_checkpointing = True
    ids, mask = padded(TEXTS)
    out = model(ids, causal=False, attention_mask=mask)
    model.zero_grad()
    out[1, :3].sum().backward()
    g1 = model.embed.weight.grad.clone()
    model.activation_checkpointing = False
    model.zero_grad()
    model(ids, causal=False, attention_mask=mask)[1, :3].sum().backward()
    torch.testing.assert_close(g1, model.embed.weight.grad, atol=1e-6, rtol=1e-5)
