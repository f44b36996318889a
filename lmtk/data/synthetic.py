"""Synthetic training data made on the fly: MQAR (multi-query associative recall, Arora et al.
2023, "Zoology") and random tokens, each as a pure function of a seed, plus the data sources
that feed them to the training loop (train.loop.fit reads `.n` and `.get(start, count, pin)`).

MQAR, as Zoology defines it: a sequence of length L starts with `kv` key-value pairs
(k1 v1 k2 v2 ...), keys drawn without repeats from the lower half of the vocabulary
[1, V/2) and values from the upper half [V/2, V). The rest of the sequence is filler in
which every key reappears once, as a query, at an even offset of the query region; the
offsets are drawn without repeats with weight (g + 1)^(a - 1) for g = 0, 1, ... (a power
law: with a = 0.01 most queries come soon after the pairs, a few far later, as repeated
bigrams do in text; a = 1 is uniform). The target at a query's position is its value (what
the next token would be); every other position's target is IGNORE. Filler is token 0, or
random tokens of the whole vocabulary with `random_filler` (Zoology's generator default;
its paper's figure 2 uses zeros).
"""

from __future__ import annotations

import torch

IGNORE = -100  # targets that are not scored (F.cross_entropy's ignore_index)


def mqar_fits(seq_len: int, kv_pairs: int) -> bool:
    """Whether `kv_pairs` pairs and their queries fit in `seq_len` tokens: 2 kv for the pairs,
    then a query region with at least kv even offsets."""
    return kv_pairs >= 1 and (seq_len - 2 * kv_pairs) // 2 >= kv_pairs


def query_gap_weights(space: int, power_a: float) -> torch.Tensor:
    """Unnormalised weights of query offset g = 0..space-1 (in steps of two tokens): (g + 1)^(a - 1)."""
    return torch.arange(1, space + 1, dtype=torch.float64) ** (power_a - 1)


def mqar(n: int, seq_len: int, kv_pairs: int, vocab_size: int, seed: int, power_a: float = 0.01,
         random_filler: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs [n, seq_len], targets [n, seq_len]) of `n` MQAR sequences, the same for the same
    arguments. targets[b, t] is the value of the key queried at inputs[b, t], IGNORE elsewhere.
    The caller checks mqar_fits() and vocab_size >= 4 + 2 kv_pairs (lmtk.eval.mqar does)."""
    assert mqar_fits(seq_len, kv_pairs) and vocab_size // 2 - 1 >= kv_pairs, (seq_len, kv_pairs, vocab_size)
    g = torch.Generator().manual_seed(seed)
    half = vocab_size // 2
    rows = torch.arange(n)[:, None]
    # kv distinct keys from 1..half-1 and distinct values from half..V-1 per sequence: the first
    # kv of a random permutation (argsort of uniform noise)
    keys = 1 + torch.rand(n, half - 1, generator=g).argsort(dim=1)[:, :kv_pairs]
    values = half + torch.rand(n, vocab_size - half, generator=g).argsort(dim=1)[:, :kv_pairs]
    context = 2 * kv_pairs
    space = (seq_len - context) // 2
    gaps = torch.multinomial(query_gap_weights(space, power_a).expand(n, space), kv_pairs, replacement=False, generator=g)
    qpos = context + 2 * gaps  # query positions [n, kv]

    if random_filler:
        inputs = torch.randint(0, vocab_size, (n, seq_len), generator=g)
    else:
        inputs = torch.zeros(n, seq_len, dtype=torch.long)
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values
    inputs[rows, qpos] = keys
    targets = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    targets[rows, qpos] = values
    return inputs, targets


class MQARData:
    """MQAR for train.loop.fit: sample s of training is sequence s of an endless stream, made on
    the fly from (seed, s) alone. A batch is inputs and targets stacked: [count, 2, seq_len]."""

    n = 2**40  # windows per epoch: the stream has no end (budgets here are steps)

    def __init__(self, seq_len: int, kv_pairs: int, vocab_size: int, seed: int, power_a: float = 0.01,
                 random_filler: bool = False):
        self.args = dict(seq_len=seq_len, kv_pairs=kv_pairs, vocab_size=vocab_size, power_a=power_a,
                         random_filler=random_filler)
        self.seed = seed

    def get(self, start: int, count: int, pin: bool = False) -> torch.Tensor:
        # a batch is seeded by its first sample: the loop asks for consecutive, disjoint ranges
        inputs, targets = mqar(count, seed=self.seed * 1_000_003 + start, **self.args)
        batch = torch.stack([inputs, targets], dim=1)
        return batch.pin_memory() if pin else batch


class RandomTokens:
    """Uniform random token windows [count, seq_len] from ids first..vocab_size-1, seeded by (seed,
    start): a data source for fit() when only the speed of training matters."""

    n = 2**40

    def __init__(self, vocab_size: int, seq_len: int, seed: int = 0, first: int = 5):
        self.vocab_size, self.seq_len, self.seed, self.first = vocab_size, seq_len, seed, first

    def get(self, start: int, count: int, pin: bool = False) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + start)
        batch = torch.randint(self.first, self.vocab_size, (count, self.seq_len), generator=g)
        return batch.pin_memory() if pin else batch
