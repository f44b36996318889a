#!/usr/bin/env python
"""Training tokens/s of lmtk against Hugging Face `transformers` at identical dimensions.

Two pairs, each measured in this one process with alternating timed rounds (lmtk, HF, then
HF, lmtk, ...) so that load from other processes on a shared machine hits both alike; the
figure per model is the median over rounds of (tokens / round time):

  bert: lmtk's Cramming BERT (conf/model/crammed-bert.yaml: pre-LN, no biases, gated GELU,
        embedding norm, sinusoidal positions) trained with lmtk.objectives.MLM (15% of the
        positions, 80/10/10 corruption, sparse prediction: the LM head runs on the masked
        positions only)
    vs  transformers BertForMaskedLM with the same layers / d_model / heads / intermediate
        size / vocabulary, the same corruption (lmtk's MLM.corrupt, same seeds), labels -100
        on unmasked positions: HF runs its MLM head (dense + LN + decoder) on every position.
  gpt:  lmtk GPT of conf/model/gpt2.yaml (learned positions, pre-LN LayerNorm, GELU MLP,
        biases, tied head) with lmtk.objectives.CLM, whose training loss is the fused, chunked
        head + cross-entropy (lmtk/models/fused_ce.py; --plain-head: [N, vocab] logits + F.cross_entropy)
    vs  transformers GPT2LMHeadModel, same dimensions, labels = inputs.

Both sides: the same random-token batches, dropout 0, HF attention on SDPA
(attn_implementation="sdpa"; checked at run time: no materialised mask), GPT-2's activation
set to exact "gelu" (lmtk's; HF's default "gelu_new" is an unfused Python tanh formula),
fp32 on CPU and bf16 autocast on CUDA, and the same optimizer: lmtk.train.optim.build_optimizer
(AdamW exactly as lmtk builds it, fused in the current lmtk) applied to each model. A step is forward + backward + AdamW step on
one batch (no grad clipping, no accumulation).

    python bench/vs_hf.py                     # CPU: small dims, ~3-5 min on 2 cores
    python bench/vs_hf.py --only gpt --rounds 5 --steps 4
    python bench/vs_hf.py --only gpt --no-mem --plain-head   # lmtk without the fused head (before/after)
    python bench/vs_hf.py --device cuda       # GPU defaults: BERT 16x768 seq128, GPT 12x768 seq1024

Memory: on CUDA, peak torch.cuda.max_memory_allocated of each model alone (own subprocess);
on CPU, the peak-RSS increase (VmHWM) over the post-import baseline, each model in its own
subprocess (--no-mem skips it). The last line is machine readable: `ratio bert=<x> gpt=<y>`
(lmtk tok/s / HF tok/s).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from common import stub_tokenizer, table

REPO = Path(__file__).resolve().parents[1]

CPU_DEFAULTS = {
    "bert": dict(layers=4, d_model=256, heads=4, seq=128, batch=8, vocab=32768),
    "gpt": dict(layers=4, d_model=256, heads=4, seq=256, batch=4, vocab=50304),
}
GPU_DEFAULTS = {
    "bert": dict(layers=16, d_model=768, heads=12, seq=128, batch=128, vocab=32768),
    "gpt": dict(layers=12, d_model=768, heads=12, seq=1024, batch=16, vocab=50304),
}
TARGETS = {"cpu": {"bert": 1.5, "gpt": 1.2}, "cuda": {"bert": 1.5, "gpt": 1.5}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--only", choices=["bert", "gpt"], default=None, help="run one pair only")
    for name in ("layers", "d-model", "heads", "seq", "batch", "vocab"):
        p.add_argument(f"--{name}", type=int, default=None,
                       help=f"{name} for both pairs (default: per pair, CPU {CPU_DEFAULTS['bert'][name.replace('-', '_')]}/"
                       f"{CPU_DEFAULTS['gpt'][name.replace('-', '_')]}, GPU {GPU_DEFAULTS['bert'][name.replace('-', '_')]}/"
                       f"{GPU_DEFAULTS['gpt'][name.replace('-', '_')]} for bert/gpt)")
    p.add_argument("--d-ff", type=int, default=None, help="intermediate size (default: 4 x d_model)")
    p.add_argument("--bert-mlp", default="gated-gelu", choices=["gated-gelu", "gelu"],
                   help="lmtk BERT MLP (default: %(default)s as crammed-bert.yaml; gelu = HF's MLP exactly)")
    p.add_argument("--mask-rate", type=float, default=0.15)
    p.add_argument("--plain-head", action="store_true",
                   help="lmtk's training loss through the plain head (objective.fused_head=false: [N, vocab] logits + "
                   "F.cross_entropy) instead of the fused, chunked linear + cross-entropy")
    p.add_argument("--head-chunk", type=int, default=None,
                   help="rows per chunk of lmtk's fused head (default: lmtk.models.fused_ce.DEFAULT_CHUNK)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per model (default: CPU 1, GPU 5)")
    p.add_argument("--rounds", type=int, default=3, help="alternating timed rounds (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="steps per model per round (default: CPU 2, GPU 20)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-mem", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--child-mem", default=None, help=argparse.SUPPRESS)  # internal: one model's memory
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device.startswith("cuda")
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    args.steps = args.steps if args.steps is not None else (20 if gpu else 2)
    return args


def dims(args, pair: str) -> SimpleNamespace:
    base = dict((GPU_DEFAULTS if args.device.startswith("cuda") else CPU_DEFAULTS)[pair])
    for k in base:
        v = getattr(args, k)
        if v is not None:
            base[k] = v
    base["d_ff"] = args.d_ff or 4 * base["d_model"]
    return SimpleNamespace(**base)




# ---------------------------------------------------------------------------------------
# the four trainers: each is (model, step(i) -> loss tensor, tokens per step)
# ---------------------------------------------------------------------------------------




def _optim_cfg():
    from omegaconf import OmegaConf

    return OmegaConf.load(REPO / "conf" / "optim" / "adamw.yaml")


def _mlm_objective(d, mask_rate: float, fused_head: bool = True):
    from omegaconf import OmegaConf

    from lmtk.objectives import MLM

    cfg = OmegaConf.load(REPO / "conf" / "objective" / "mlm.yaml")
    cfg.mask_rate = mask_rate
    cfg.fused_head = fused_head
    return MLM(cfg, stub_tokenizer(d.vocab))


def _lmtk_model(yaml_name: str, d, **extra):
    from omegaconf import OmegaConf

    from lmtk.models import ModelConfig, build_model

    m = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / yaml_name))
    m.update(n_layers=d.layers, d_model=d.d_model, n_heads=d.heads, d_ff=d.d_ff, vocab_size=d.vocab,
             max_seq_len=max(d.seq, m["max_seq_len"]), **extra)
    return build_model(ModelConfig.from_dict(m))


def _hf_bert(d):
    from transformers import AutoModelForMaskedLM, BertConfig

    cfg = BertConfig(vocab_size=d.vocab, hidden_size=d.d_model, num_hidden_layers=d.layers, num_attention_heads=d.heads,
                     intermediate_size=d.d_ff, hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     max_position_embeddings=max(512, d.seq), tie_word_embeddings=True)
    return AutoModelForMaskedLM.from_config(cfg, attn_implementation="sdpa")


def _hf_gpt(d):
    from transformers import AutoModelForCausalLM, GPT2Config

    cfg = GPT2Config(vocab_size=d.vocab, n_embd=d.d_model, n_layer=d.layers, n_head=d.heads, n_inner=d.d_ff,
                     n_positions=max(1024, d.seq), activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, use_cache=False, bos_token_id=None, eos_token_id=None, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")


def build(which: str, args, device: torch.device):
    """which: lmtk-bert | hf-bert | lmtk-gpt | hf-gpt."""
    from lmtk.objectives import CLM
    from lmtk.train.optim import build_optimizer

    side, pair = which.split("-")
    d = dims(args, pair)
    torch.manual_seed(0)
    if which == "lmtk-bert":
        model = _lmtk_model("crammed-bert.yaml", d, mlp=args.bert_mlp)
    elif which == "hf-bert":
        model = _hf_bert(d)
    elif which == "lmtk-gpt":
        model = _lmtk_model("gpt2.yaml", d)
    else:
        model = _hf_gpt(d)
    if side == "hf":
        assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    model = model.to(device).train()
    opt = build_optimizer(model, _optim_cfg(), 1e-4, device)
    gen_data = torch.Generator().manual_seed(1234)  # same ids for both sides of a pair
    batches = [torch.randint(5, d.vocab, (d.batch, d.seq), generator=gen_data).to(device) for _ in range(4)]
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda"
           else torch.autocast(device.type, enabled=False))
    fused = not args.plain_head
    if args.head_chunk:
        import lmtk.models.fused_ce

        lmtk.models.fused_ce.DEFAULT_CHUNK = args.head_chunk
    mlm = _mlm_objective(d, args.mask_rate, fused) if pair == "bert" else None
    clm = CLM(SimpleNamespace(fused_head=fused), stub_tokenizer(d.vocab)) if pair == "gpt" else None

    def loss_of(i: int, rows: int | None = None) -> torch.Tensor:
        batch = batches[i % len(batches)][:rows]
        gen = torch.Generator(device).manual_seed(i)
        if which == "lmtk-bert":
            return mlm.loss(model, batch, gen)[0]
        if which == "hf-bert":
            x, pos = mlm.corrupt(batch, gen)  # lmtk's corruption, same seed: same inputs as lmtk-bert
            labels = torch.full_like(batch, -100).scatter_(1, pos, batch.gather(1, pos))
            return model(input_ids=x, labels=labels).loss
        if which == "lmtk-gpt":
            return clm.loss(model, batch, gen)[0]
        return model(input_ids=batch, labels=batch, use_cache=False).loss

    def step(i: int) -> torch.Tensor:
        with amp:
            loss = loss_of(i)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return SimpleNamespace(name=which, model=model, step=step, loss_of=loss_of, tokens=d.batch * d.seq, dims=d, amp=amp)


def count_flops(t, device: torch.device) -> tuple[float, list]:
    """Matmul FLOPs of one forward+backward of the whole batch (FlopCounterMode on one sequence,
    times the batch; SDPA excluded as the counter does not see CPU SDPA), plus the attention
    scores as 12 * layers * d * T per token (causal counted as full, as PaLM's MFU does).
    Also returns the SDPA calls seen: (mask is None, is_causal) each."""
    from torch.utils.flop_counter import FlopCounterMode

    calls = []
    orig = F.scaled_dot_product_attention

    def spy(*a, **k):
        calls.append((k.get("attn_mask") is None and (len(a) < 4 or a[3] is None), bool(k.get("is_causal", False))))
        return orig(*a, **k)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        with FlopCounterMode(display=False) as fc, t.amp:
            loss = t.loss_of(10_000, rows=1)
            loss.backward()
    finally:
        torch.nn.functional.scaled_dot_product_attention = orig
    t.model.zero_grad(set_to_none=True)
    counts = fc.get_flop_counts().get("Global", {})
    matmul = t.dims.batch * sum(v for k, v in counts.items() if "attention" not in str(k))
    d = t.dims
    attn = 12 * d.layers * d.d_model * d.seq * t.tokens
    return float(matmul + attn), calls


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_pair(args, pair: str, device: torch.device) -> dict:
    trainers = [build(f"lmtk-{pair}", args, device), build(f"hf-{pair}", args, device)]
    info = {}
    for t in trainers:
        flops, calls = count_flops(t, device)
        masked = sum(not m for m, _ in calls)
        info[t.name] = dict(flops=flops, sdpa_calls=len(calls), sdpa_masked=masked,
                            sdpa_causal=sum(c for _, c in calls),
                            params=sum(p.numel() for p in {id(p): p for p in t.model.parameters()}.values()))
        for i in range(args.warmup):
            t.step(i)
        sync(device)
    per_round = {t.name: [] for t in trainers}
    step_no = args.warmup
    for r in range(args.rounds):
        order = trainers if r % 2 == 0 else trainers[::-1]
        for t in order:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                loss = t.step(step_no)
                step_no += 1
            float(loss)  # host sync
            sync(device)
            dt = time.perf_counter() - t0
            per_round[t.name].append(t.tokens * args.steps / dt)
        print(f"  [{pair}] round {r + 1}/{args.rounds}: "
              + "  ".join(f"{n} {v[-1]:,.0f} tok/s" for n, v in per_round.items()), flush=True)
    for t in trainers:
        info[t.name]["tok_s"] = statistics.median(per_round[t.name])
        info[t.name]["rounds"] = per_round[t.name]
        info[t.name]["loss"] = float(t.step(step_no))
    del trainers
    return info


# ---------------------------------------------------------------------------------------
# memory: each model alone in its own process
# ---------------------------------------------------------------------------------------


def _vm_hwm_kib() -> int:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries the parent's peak RSS over
    fork + exec into the child's ru_maxrss, so a child of this (large) process would read it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child_mem(args) -> None:
    device = torch.device(args.device)
    import transformers  # noqa: F401  (imported in the baseline for both sides)

    base_kib = _vm_hwm_kib()
    t = build(args.child_mem, args, device)
    for i in range(2):
        t.step(i)
    sync(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = (_vm_hwm_kib() - base_kib) / 1024
    print(json.dumps({"peak_mib": peak}))


def measure_mem(args, which: str, argv: list[str]) -> float | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--device", args.device, "--child-mem", which]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        print(f"  memory subprocess {which} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


# ---------------------------------------------------------------------------------------


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import transformers
    except ImportError:
        print("error: bench/vs_hf.py needs transformers: pip install -e '.[bench]' (or make bench)", file=sys.stderr)
        return 2
    transformers.logging.set_verbosity_error()
    if args.child_mem:
        child_mem(args)
        return 0
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    prec = "bf16 autocast" if gpu else "fp32"
    dev_name = torch.cuda.get_device_name(device) if gpu else f"{platform.machine()} CPU, {torch.get_num_threads()} threads ({os.cpu_count()} cores), {torch.backends.cpu.get_cpu_capability()}"
    print(f"device: {dev_name}; torch {torch.__version__}, transformers {transformers.__version__}, {prec}; "
          f"{args.warmup} warm-up steps, {args.rounds} alternating rounds x {args.steps} steps per model, median; "
          f"load average at start {os.getloadavg()[0]:.1f}", flush=True)
    pairs = [args.only] if args.only else ["bert", "gpt"]
    t_start = time.perf_counter()
    results = {}
    for pair in pairs:
        d = dims(args, pair)
        print(f"[{pair}] {d.layers} layers, d{d.d_model}, {d.heads} heads, d_ff {d.d_ff}, vocab {d.vocab}, "
              f"seq {d.seq}, batch {d.batch}", flush=True)
        results[pair] = time_pair(args, pair, device)
    mem = {}
    if not args.no_mem:
        child_argv = [a for a in argv if a not in ("--no-mem",)]
        for pair in pairs:
            for side in ("lmtk", "hf"):
                print(f"  [mem] {side}-{pair} ...", flush=True)
                mem[f"{side}-{pair}"] = measure_mem(args, f"{side}-{pair}", child_argv)

    head = ["pair", "model", "params", "batch x seq", "GFLOP/step", "tok/s (median)", "rounds tok/s", "TFLOP/s",
            "peak mem MiB" + (" (cuda alloc)" if gpu else " (RSS delta)"), "final loss"]
    rows, ratios = [], {}
    desc = {
        "lmtk-bert": f"lmtk crammed-BERT ({args.bert_mlp}), MLM sparse" + (", plain head" if args.plain_head else ""),
        "hf-bert": "HF BertForMaskedLM (sdpa), dense head",
        "lmtk-gpt": "lmtk GPT (gpt2.yaml), CLM" + (", plain head" if args.plain_head else ""),
        "hf-gpt": "HF GPT2LMHeadModel (sdpa, gelu)",
    }
    for pair, info in results.items():
        d = dims(args, pair)
        for name, r in info.items():
            m = mem.get(name)
            rows.append([pair, desc[name], f"{r['params'] / 1e6:.2f}M", f"{d.batch}x{d.seq}", f"{r['flops'] / 1e9:,.1f}",
                         f"{r['tok_s']:,.0f}", " / ".join(f"{x:,.0f}" for x in r["rounds"]),
                         f"{r['flops'] / (d.batch * d.seq) * r['tok_s'] / 1e12:.3f}",
                         "-" if m is None else f"{m:,.0f}", f"{r['loss']:.3f}"])
        lm, hf = info[f"lmtk-{pair}"], info[f"hf-{pair}"]
        paired = [a / b for a, b in zip(lm["rounds"], hf["rounds"])]
        ratios[pair] = (lm["tok_s"] / hf["tok_s"], min(paired), max(paired), lm["flops"] / hf["flops"])
    print("\ntraining throughput, lmtk vs transformers (forward + backward + AdamW step; same data, dims, precision, optimizer)")
    print(table(head, rows))
    for pair, info in results.items():
        hf = info[f"hf-{pair}"]
        print(f"  HF {pair} attention: {hf['sdpa_calls']} SDPA calls per forward+backward, "
              f"{hf['sdpa_masked']} with a materialised mask, {hf['sdpa_causal']} is_causal")
    kind = "cuda" if gpu else "cpu"
    trows = []
    for pair, (r, lo, hi, fr) in ratios.items():
        tgt = TARGETS[kind][pair]
        gap = "met" if r >= tgt else f"missed: {r:.2f}x vs {tgt:.1f}x ({100 * (r / tgt - 1):+.0f}%)"
        trows.append([pair, f"{r:.2f}x", f"{lo:.2f}-{hi:.2f}x", f"{fr:.2f}", f">= {tgt:.1f}x", gap])
    print("\n" + table(["pair", "lmtk/HF tok/s (medians)", "per-round range", "lmtk/HF FLOP per step", "target", "status"], trows))
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; load average at end {os.getloadavg()[0]:.1f}")
    print("ratio " + " ".join(f"{p}={r[0]:.3f}" for p, r in ratios.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
