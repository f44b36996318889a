"""suite=harness: EleutherAI's lm-evaluation-harness (`lm-eval`, the `eval` extra) over an lmtk run.

`HarnessLM` answers lm-eval's three request kinds with lmtk's model and tokenizer:

- loglikelihood (context, continuation) -> (log p(continuation | context), greedy?): context and
  continuation are encoded together and split where the context's own tokens stop, so a token
  that spans the boundary belongs to the continuation; whitespace at the end of the context
  moves to the continuation first (" word" is how BPE vocabularies hold a word). Scored by
  lmtk.eval.scoring.continuation_logprobs: length-sorted, right-padded batches; a context too
  long for the window is cut from the left.
- loglikelihood_rolling (text,) -> log p(text): [SEP] + the text, every token scored once
  (scoring.rolling_logprobs: a sliding window over texts longer than the window, the windows of
  all texts batched together).
- generate_until (context, gen_kwargs) -> text: greedy unless the task samples, lmtk.models.infer's
  cached decoding, requests whose contexts have the same token length batched together (no
  padding: decoding caches take no mask); a row stops at [SEP], at any `until` string (cut
  off the answer) or after max_gen_toks tokens.

"BOS": lmtk's tokenizers have none; training puts [SEP] between documents, so a text follows
[SEP] (sep_prefix=True puts it before every request; an empty context is [SEP] alone).

The class needs no lm-eval to work (tests call it directly); run() imports lm-eval, mixes in its
LM base class and calls `lm_eval.simple_evaluate` on the configured tasks, offline included: a
folder of local task YAMLs (include_path) over local data files."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from lmtk.errors import UserError, suggest

INSTALL = "suite=harness needs lm-evaluation-harness: pip install 'lmtk[eval]'"


@dataclass
class Config:
    # lm-eval task, group or tag names (or paths of task YAMLs); `lm-eval ls tasks` lists the built-in ones
    tasks: List[str] = field(default_factory=lambda: ["lambada_openai"])
    include_path: Optional[str] = None  # a folder of task YAMLs of your own (local data files: offline)
    include_defaults: bool = True  # index lm-eval's built-in tasks too (~15k YAMLs: ~20 s to scan)
    limit: Optional[float] = None  # documents per task: N (>= 1) or a fraction (< 1); None: all
    num_fewshot: Optional[int] = None  # None: each task's own (0 where it sets none)
    batch_size: int = 16  # requests per forward pass
    max_gen_tokens: int = 256  # generate_until's budget where a task's gen_kwargs set no max_gen_toks
    max_len: Optional[int] = None  # tokens the model sees at once (None: model.max_seq_len)
    rolling_stride: Optional[int] = None  # loglikelihood_rolling's window step (None: max_len // 2)
    sep_prefix: bool = True  # put [SEP] (lmtk's document boundary) before every request's text
    bootstrap_iters: int = 0  # lm-eval's bootstrap for standard errors (0: none, the fast choice)


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.api.model import LM  # noqa: F401
    except ImportError:
        raise UserError(INSTALL) from None
    return lm_eval


def _as_list(x) -> list[str]:
    if x is None:
        return []
    return [x] if isinstance(x, str) else [str(s) for s in x]


class HarnessLM:
    """lm-eval's LM interface (loglikelihood, loglikelihood_rolling, generate_until) over an lmtk
    LanguageModel and Tokenizer. Requests are anything with `.args` (lm-eval's Instance)."""

    def __init__(self, model, tokenizer, *, batch_size: int = 16, max_len: int | None = None,
                 max_gen_tokens: int = 256, rolling_stride: int | None = None, sep_prefix: bool = True,
                 device=None, dtype=None, seed: int = 0):
        super().__init__()  # lm-eval's LM.__init__ (rank, world size, cache hook) when mixed in
        self.model = model
        self.tok = tokenizer  # not `tokenizer`: lm-eval reads HF tokenizer fields off that name
        self.batch_size = max(1, int(batch_size))
        self.max_len = min(int(max_len or model.cfg.max_seq_len), model.cfg.max_seq_len)  # position tables end there
        if self.max_len < 2:
            raise UserError(f"harness.max_len={self.max_len} must be at least 2")
        self.max_gen_tokens = int(max_gen_tokens)
        if rolling_stride is not None and not 1 <= rolling_stride <= self.max_len - 1:
            raise UserError(f"harness.rolling_stride={rolling_stride} must be in 1..{self.max_len - 1} (the window less one)")
        self.rolling_stride = rolling_stride
        self.prefix = [tokenizer.eos_id] if sep_prefix else []
        self._device = torch.device(device) if device is not None else next(model.parameters()).device
        self.dtype = dtype or torch.float32
        self.seed = seed
        self.counts = Counter()  # what happened that a note should say: truncations, requests by kind

    # -- lm-eval's optional hooks ------------------------------------------------------------
    def _cache(self, kind: str, args, result) -> None:
        hook = getattr(self, "cache_hook", None)
        if hook is not None:
            hook.add_partial(kind, args, result)

    # -- loglikelihood -------------------------------------------------------------------------
    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) for scoring `continuation` after `context`."""
        n_space = len(context) - len(context.rstrip())
        if n_space:
            context, continuation = context[:-n_space], context[-n_space:] + continuation
        if not context:
            return [self.tok.eos_id], self.tok.encode(continuation)
        ctx = self.tok.encode(context)
        whole = self.tok.encode(context + continuation)
        cut = 0
        while cut < min(len(ctx), len(whole)) and ctx[cut] == whole[cut]:
            cut += 1
        return (self.prefix + whole[:cut]) or [self.tok.eos_id], whole[cut:]

    def _fit(self, ctx: list[int], cont: list[int]) -> tuple[list[int], list[int]]:
        """A continuation longer than the window keeps its last max_len - 1 tokens (the rest
        becomes context): scoring it whole is impossible."""
        if len(cont) > self.max_len - 1:
            self.counts["continuation_cut"] += 1
            keep = self.max_len - 1
            return (ctx + cont[:-keep])[-1:], cont[-keep:]
        if len(ctx) + len(cont) > self.max_len:
            self.counts["context_cut"] += 1
        return ctx, cont

    def loglikelihood_tokens(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        from lmtk.eval.scoring import continuation_logprobs

        out: list = [(0.0, True)] * len(pairs)  # an empty continuation: log 1, trivially greedy
        todo = [i for i, (_, cont) in enumerate(pairs) if cont]
        fitted = [self._fit(list(pairs[i][0]), list(pairs[i][1])) for i in todo]
        scores = continuation_logprobs(self.model, fitted, batch_size=self.batch_size, device=self._device,
                                       dtype=self.dtype, max_len=self.max_len)
        for i, (lp, greedy) in zip(todo, scores):
            out[i] = (float(lp), bool(greedy))
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        self.counts["loglikelihood"] += len(requests)
        pairs = [self.encode_pair(*req.args) for req in requests]
        out = self.loglikelihood_tokens(pairs)
        for req, res in zip(requests, out):
            self._cache("loglikelihood", req.args, res)
        return out

    # -- loglikelihood_rolling ---------------------------------------------------------------
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text) of each whole text, every token scored once after [SEP]; the windows of
        all texts batched together (scoring.rolling_logprobs)."""
        from lmtk.eval.scoring import rolling_logprobs

        self.counts["loglikelihood_rolling"] += len(requests)
        seqs = [[self.tok.eos_id] + self.tok.encode(req.args[0]) for req in requests]
        self.counts["rolling_windows"] += sum(len(s) > self.max_len for s in seqs)
        scores = rolling_logprobs(self.model, seqs, stride=self.rolling_stride, batch_size=self.batch_size,
                                  device=self._device, dtype=self.dtype, max_len=self.max_len)
        out = [float(lp) for lp, _ in scores]
        for req, res in zip(requests, out):
            self._cache("loglikelihood_rolling", req.args, res)
        return out

    # -- generate_until ----------------------------------------------------------------------
    def _gen_settings(self, kwargs) -> tuple[list[str], int, float, int | None, float | None]:
        kw = {"until": kwargs} if isinstance(kwargs, str) else dict(kwargs or {})
        until = _as_list(kw.pop("until", None))
        max_new = int(kw.pop("max_gen_toks", self.max_gen_tokens))
        temperature = float(kw.pop("temperature", 1.0 if kw.get("do_sample") else 0.0) or 0.0)
        if not kw.pop("do_sample", False):
            temperature = 0.0  # lm-eval's default: greedy unless the task asks to sample
        top_k = kw.pop("top_k", None)
        top_p = kw.pop("top_p", None)
        return until, max(0, max_new), temperature, (int(top_k) if top_k else None), (float(top_p) if top_p else None)

    def _finish(self, new: list[int], until: list[str]) -> str:
        """The answer: the new tokens up to [SEP], cut before the first `until` string."""
        if self.tok.eos_id in new:
            new = new[: new.index(self.tok.eos_id)]
        text = self.tok.decode(new)
        cuts = [text.find(u) for u in until if u and u in text]
        return text[: min(cuts)] if cuts else text

    def _done(self, new: list[int], until: list[str]) -> bool:
        if self.tok.eos_id in new:
            return True
        if not until:
            return False
        text = self.tok.decode(new)
        return any(u and u in text for u in until)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lmtk.device import autocast
        from lmtk.models.infer import generate

        self.counts["generate_until"] += len(requests)
        jobs = []
        for req in requests:
            context, kwargs = req.args
            until, max_new, temperature, top_k, top_p = self._gen_settings(kwargs)
            ids = self.prefix + self.tok.encode(context) if context else [self.tok.eos_id]
            keep = max(1, self.max_len - max_new)  # room for the answer without sliding the window
            if len(ids) > keep:
                self.counts["context_cut"] += 1
                ids = ids[-keep:]
            jobs.append((ids, until, max_new, temperature, top_k, top_p))
        groups = defaultdict(list)  # same length and settings: one batch without padding
        for i, (ids, _, *settings) in enumerate(jobs):
            groups[(len(ids), *settings)].append(i)
        out: list = [""] * len(jobs)
        gen = torch.Generator(self._device).manual_seed(self.seed)
        for (T, max_new, temperature, top_k, top_p), members in groups.items():
            for b in range(0, len(members), self.batch_size):
                rows = members[b : b + self.batch_size]
                if max_new == 0:
                    continue
                ids = torch.tensor([jobs[i][0] for i in rows], dtype=torch.long, device=self._device)
                done: set[int] = set()

                def stop(seq, rows=rows, T=T, done=done):
                    for r, i in enumerate(rows):
                        if r not in done and self._done(seq[r, T:].tolist(), jobs[i][1]):
                            done.add(r)
                    return len(done) == len(rows)

                with torch.no_grad(), autocast(self._device, self.dtype):
                    seq = generate(self.model, ids, max_new, temperature=temperature, top_k=top_k, top_p=top_p,
                                   gen=gen, max_len=self.max_len, stop=stop)
                for r, i in enumerate(rows):
                    out[i] = self._finish(seq[r, T:].tolist(), jobs[i][1])
        for req, res in zip(requests, out):
            self._cache("generate_until", req.args, res)
        return out


def adapter(target, cfg: Config):
    """An lm_eval.api.model.LM over target's model and tokenizer (lm-eval imported here)."""
    _import_lm_eval()
    from lm_eval.api.model import LM

    cls = type("LmtkHarnessLM", (HarnessLM, LM), {})
    return cls(target.model, target.tokenizer, batch_size=cfg.batch_size, max_len=cfg.max_len,
               max_gen_tokens=cfg.max_gen_tokens, rolling_stride=cfg.rolling_stride, sep_prefix=cfg.sep_prefix,
               device=getattr(target, "device", None), dtype=getattr(target, "dtype", None),
               seed=int(getattr(target, "seed", 0) or 0))


def _check_config(cfg: Config) -> None:
    if not _as_list(cfg.tasks):
        raise UserError("harness.tasks is empty: name lm-eval tasks, e.g. harness.tasks=[lambada_openai]")
    if cfg.batch_size < 1:
        raise UserError(f"harness.batch_size={cfg.batch_size} must be at least 1")
    if cfg.max_gen_tokens < 1:
        raise UserError(f"harness.max_gen_tokens={cfg.max_gen_tokens} must be at least 1")
    if cfg.num_fewshot is not None and cfg.num_fewshot < 0:
        raise UserError(f"harness.num_fewshot={cfg.num_fewshot} must be 0 or more")
    if cfg.limit is not None and cfg.limit <= 0:
        raise UserError(f"harness.limit={cfg.limit} must be positive (N documents, or a fraction below 1)")
    if cfg.include_path is not None:
        from pathlib import Path

        if not Path(cfg.include_path).expanduser().is_dir():
            raise UserError(f"harness.include_path={cfg.include_path}: no such folder (a folder of task YAMLs)")


def _is_data_error(err: BaseException) -> bool:
    """A task's dataset could not be had (offline, missing file), as opposed to a bug."""
    mod = type(err).__module__.split(".")[0]
    return mod in ("datasets", "huggingface_hub", "fsspec", "requests", "urllib3") or isinstance(
        err, (ConnectionError, FileNotFoundError))


BOOKKEEPING = {"alias", "name", "sample_len", "sample_count", "samples"}  # lm-eval's per-task fields that are no scores


def _flatten(results: dict) -> tuple[dict, list[dict], int]:
    """lm-eval's results -> (scores "<task>/<metric>" -> float, rows, documents scored)."""
    scores, rows = {}, []
    n_samples = results.get("n-samples", {})
    n_shot = results.get("n-shot", {})
    sections = list(results.get("results", {}).items()) + [
        (g, m) for g, m in results.get("groups", {}).items() if g not in results.get("results", {})]
    for task, metrics in sections:
        n = n_samples.get(task, {}).get("effective")
        for key, value in metrics.items():
            if key in BOOKKEEPING or "_stderr," in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, _, filt = key.partition(",")
            name = f"{task}/{metric}" if filt in ("", "none") else f"{task}/{metric}[{filt}]"
            scores[name] = float(value)
            se = metrics.get(f"{metric}_stderr,{filt}" if filt else f"{metric}_stderr")
            rows.append({"task": task, "metric": metric, "filter": filt or "none", "value": float(value),
                         "stderr": float(se) if isinstance(se, (int, float)) and not isinstance(se, bool) else None,
                         "n": n, "num_fewshot": n_shot.get(task)})
    total = sum(int(v.get("effective", 0)) for v in n_samples.values())
    return scores, rows, total


def run(target, cfg: Config) -> dict:
    """Evaluate target (model, tokenizer, meta, device, dtype, seed) on cfg.tasks with lm-eval."""
    _check_config(cfg)
    lm_eval = _import_lm_eval()
    from lm_eval.tasks import TaskManager

    from lmtk.checkpoint import objective_name
    from lmtk.objectives import ENCODER_OBJECTIVES

    tasks = _as_list(cfg.tasks)  # a bare name (harness.tasks=lambada_openai) is a list of one
    manager = TaskManager(include_path=cfg.include_path, include_defaults=cfg.include_defaults)
    known = set(manager.all_tasks)
    for t in tasks:
        if t not in known and not t.endswith((".yaml", ".yml")):
            where = f" in {cfg.include_path}" if cfg.include_path else ""
            hint = "" if cfg.include_defaults else " (harness.include_defaults=false: built-in tasks are not indexed)"
            raise UserError(f"unknown lm-eval task '{t}'{where}{suggest(t, known)}{hint}")
    lm = adapter(target, cfg)
    limit = cfg.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    seed = int(getattr(target, "seed", 0) or 0)
    try:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, num_fewshot=cfg.num_fewshot, limit=limit, task_manager=manager,
            bootstrap_iters=cfg.bootstrap_iters, log_samples=False, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed)
    except Exception as err:
        if _is_data_error(err):
            first = (str(err).splitlines() or [type(err).__name__])[0]
            raise UserError(f"lm-eval could not load the data of {', '.join(tasks)}: {first}; offline, point a local "
                            "task YAML at local files (dataset_path: json, dataset_kwargs.data_files) in "
                            "harness.include_path") from None
        raise
    scores, rows, samples = _flatten(results or {})
    notes = [f"lm-eval {getattr(lm_eval, '__version__', '?')}: {', '.join(tasks)}"
             + (f", limit {limit}" if limit is not None else "")]
    if objective_name(getattr(target, "meta", None) or {}) in ENCODER_OBJECTIVES:
        notes.append("this model was trained as an encoder only: its causal (left-to-right) scores here are meaningless")
    c = lm.counts
    if c["context_cut"]:
        notes.append(f"{c['context_cut']} contexts longer than the {lm.max_len}-token window were cut from the left")
    if c["continuation_cut"]:
        notes.append(f"{c['continuation_cut']} continuations longer than the window: only their last "
                     f"{lm.max_len - 1} tokens were scored")
    if c["rolling_windows"]:
        notes.append(f"{c['rolling_windows']} texts longer than the window were scored with a sliding window")
    if not scores:
        notes.append("lm-eval returned no numeric scores")
    if any(not math.isfinite(v) for v in scores.values()):
        notes.append("some scores are not finite")
    return {"scores": scores, "samples": samples, "rows": rows, "notes": notes}
