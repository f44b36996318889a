"""The bad-input catalogue (docs/errors.md), row by row: one line on stderr starting
'error:', exit status 2, no traceback, and an existing run left untouched."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "data.max_chars=200000", "tokenizer.vocab_size=512", "model.d_model=32", "model.n_layers=2",
    "model.n_heads=2", "data.seq_len=32", "train.batch_size=4", "train.micro_batch_size=4",
    "val.tokens=1024", "budget.hours=null", "budget.steps=2",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A runs root with one finished run 'done' (checkpoint every step) and data files."""
    base = tmp_path_factory.mktemp("errors")
    env = dict(os.environ, LMTK_RUNS=str(base / "runs"), LMTK_CACHE=str(base / "cache"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "lmtk", "train", *TINY, "run.name=done", "checkpoint.every=1", "checkpoint.keep=5"],
                       env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    # teachers lmtk distill refuses: a recurrent one (for qkv_copy) and a masked (encoder) one
    for extra in (["model/mixer=gla", "run.name=recurrent"], ["objective=mlm", "run.name=encoder"]):
        p = subprocess.run([sys.executable, "-m", "lmtk", "train", *TINY, *extra], env=env, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
    d = base / "data"
    d.mkdir()
    (d / "empty.txt").write_text("")
    (d / "binary.txt").write_bytes(b"\x00\x01\x02" * 1000)
    (d / "short.txt").write_text("just a few words\n")
    (d / "rows.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
    (d / "task.tsv").write_text("sentence\tlabel\n" + "".join(f"a {w} film\t{y}\n" for w, y in [("good", "pos"), ("bad", "neg")] * 8))
    (d / "odd.tsv").write_text("sentence\tlabel\na fine film\tmeh\n")
    _adapter_on_changed_base(base, d / "adapter")
    (d / "nopairs").mkdir()
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    other = Tokenizer(models.BPE())
    other.pre_tokenizer = pre_tokenizers.ByteLevel()
    other.train_from_iterator(["another vocabulary altogether"] * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=["[SEP]"]))
    other.save(str(d / "other-tokenizer.json"))
    return base, env


def _adapter_on_changed_base(base, dest):
    """A LoRA adapter whose adapter.json names run 'done' as its base, but whose base weights
    were others (a fingerprint that is not done's): what an adapter on the wrong base looks like."""
    from omegaconf import OmegaConf

    from lmtk import peft
    from lmtk.finetune.base import resolve_base

    b = resolve_base(str(base / "runs" / "done"), None)
    cfg = OmegaConf.create({"method": "lora", "r": 2, "alpha": 4.0, "dropout": 0.0, "targets": ["*mixer.*"], "rslora": False,
                            "dora": False, "bias": "none", "biases": ["*"], "add_biases": True})
    peft.apply(b.lm, cfg)
    peft.save_adapter(b.lm, dest, {"peft": OmegaConf.to_container(cfg), "head": None, "skip": [],
                                   "base": {"path": str(base / "runs" / "done"), "fingerprint": "0" * 16, "model": b.lm.cfg.to_dict()}})


def _digest(run: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(run.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


FT = ["task=local", "task.train={base}/data/task.tsv", "budget.epochs=1"]

# (row id, lmtk arguments, fragment of the expected one-line message)
ROWS = [
    ("unknown-command", ["trian"], "No such command 'trian'"),
    ("unknown-recipe", ["train", "cramming-brt"], "unknown recipe 'cramming-brt' (did you mean: cramming-bert"),
    ("unknown-key", ["train", "model.d_modle=3"], "unknown config key 'model.d_modle' (did you mean: model.d_model"),
    ("unknown-group-option", ["train", "model=gpt3"], "unknown option 'gpt3' for model"),
    ("wrong-type", ["train", "model.d_model=abc"], "invalid value for model.d_model"),
    ("bad-choice", ["train", "precision=fp8"], "precision=fp8 is not one of: auto, fp32, bf16, fp16"),
    ("no-budget", ["train", "budget.hours=null"], "no budget: set one of budget.steps"),
    ("batch-not-multiple", ["train", "train.batch_size=10", "train.micro_batch_size=4"], "is not a multiple of train.micro_batch_size"),
    ("mup-no-base-width", ["train", "model.parametrization=mup"], "model.parametrization=mup needs model.mup_base_width"),
    ("seq-too-long", ["train", "model.positions=learned", "model.max_seq_len=64", "data.seq_len=128"], "exceeds model.max_seq_len"),
    ("missing-data-file", ["train", "data=text", "data.train={base}/data/nope.txt"], "data file not found"),
    ("glob-matches-nothing", ["train", "data=text", "data.train={base}/data/*.md"], "no files match"),
    ("empty-data-file", ["train", *TINY, "data=text", "data.train={base}/data/empty.txt"], "the training data is empty"),
    ("binary-data-file", ["train", *TINY, "data=text", "data.train={base}/data/binary.txt"], "looks binary"),
    ("data-shorter-than-a-sequence", ["train", *TINY, "data=text", "data.train={base}/data/short.txt"], "fewer than two sequences"),
    ("jsonl-field-missing", ["train", *TINY, "data=text", "data.train={base}/data/rows.jsonl"], "has no field 'text'; set data.field"),
    ("hf-dataset-missing", ["train", *TINY, "data=hf", "data.name={base}/no-such-dataset"], "cannot load dataset"),
    ("tokenizer-path-missing", ["train", *TINY, "tokenizer.path={base}/nope.json"], "no tokenizer.json there"),
    ("vocab-smaller-than-tokenizer", ["train", *TINY, "model.vocab_size=100"], "smaller than the tokenizer's vocabulary"),
    ("run-name-exists", ["train", *TINY, "run.name=done"], "run 'done' already exists"),
    ("resume-finished-run", ["train", *TINY, "run.name=done", "resume=auto"], "already finished"),
    ("resume-changed-model", ["train", *TINY, "run.name=done", "resume={base}/runs/done/checkpoints/step-000001", "model.d_model=64"], "cannot resume run 'done' with model.d_model=64: it was trained with model.d_model=32"),
    ("checkpoint-other-architecture", ["train", *TINY, "run.name=new", "resume={base}/runs/done/checkpoints/final", "model.n_layers=3"], "the model config differs (n_layers: 2 -> 3)"),
    ("checkpoint-other-objective-heads", ["train", *TINY, "run.name=new", "resume={base}/runs/done/checkpoints/final", "objective=mtp"],
     "and this run's objective differ in their training heads (mtp)"),
    ("mtp-k-out-of-range", ["train", "objective=mtp", "objective.mtp_k=0"], "objective.mtp_k=0 must be at least 1 (1: clm)"),
    ("rts-replace-rate-out-of-range", ["train", "objective=rts", "objective.replace_rate=1.5"],
     "objective.replace_rate=1.5 must be between 0 and 1"),
    ("resume-path-without-checkpoint", ["train", *TINY, "resume={base}/data"], "no checkpoint at"),
    ("cuda-absent", ["train", *TINY, "device=cuda"], "device=cuda but no CUDA GPU"),
    ("sinusoidal-seq-too-long", ["train", "model.positions=sinusoidal", "model.max_seq_len=64", "data.seq_len=128"],
     "data.seq_len=128 exceeds model.max_seq_len=64"),
    ("resume-true", ["train", *TINY, "resume=true"], "resume=true is not a choice: resume=auto continues run.name"),
    ("logger-every-zero", ["train", "logger.every=0"], "logger.every=0 must be at least 1"),
    ("resume-auto-without-run-name", ["train", *TINY, "resume=auto"], "resume=auto needs run.name=NAME"),
    ("unknown-key-added", ["train", "+model.extra=1"], "unknown config key 'model.extra'"),
    ("layers-length", ["train", "model.n_layers=3", "model.layers=[attention,attention]"],
     "model.layers gives 2 layers but model.n_layers=3"),
    ("layers-letter", ["train", "model.layers=AX"], "model.layers='AX': use A (attention) and R (model.mixer) per layer, not X"),
    ("layers-recurrent-without-mixer", ["train", "model.layers=AR"], "has R layers but model.mixer is attention"),
    ("unknown-mixer-option", ["train", "model/mixer=gls"], "unknown option 'gls' for model/mixer"),
    ("unknown-mixer-key", ["train", "model.mixer.chunk=3"], "unknown config key 'model.mixer.chunk'"),
    ("mixer-knob-out-of-range", ["train", "model/mixer=mamba2", "model.mixer.conv=-1"],
     "model.mixer.conv=-1 for mixer mamba2: the short convolution's size must be >= 0 (0: none)"),
    ("moe-knob-out-of-range", ["train", "model.mlp=moe", "model.moe.top_k=17"], "model.moe.top_k=17: between 1 and model.moe.experts=16"),
    ("mixer-kernel-fla-unavailable", ["train", "model/mixer=gla", "model.mixer.kernel=fla"],
     "model.mixer.kernel=fla for mixer gla needs a CUDA GPU"),
    ("finetune-base-missing", ["finetune", "base={base}/runs/nope", *FT], "no run, checkpoint or model directory there"),
    ("finetune-base-not-a-model", ["finetune", "base={base}/data", *FT], "is not a model"),
    ("task-column-missing", ["finetune", "base=done", *FT, "task.text=review"], "has no column 'review' (task.text); its columns: sentence, label"),
    ("task-label-not-a-number", ["finetune", "base=done", *FT, "task.kind=regression"], "has label 'pos', not a number (task.kind=regression)"),
    ("task-label-not-a-class", ["finetune", "base=done", *FT, "task.val={base}/data/odd.tsv"], "has label 'meh', not one of the training classes (neg, pos)"),
    ("lora-targets-match-nothing", ["finetune", "base=done", *FT, "peft=lora", "peft.targets=[*attn.q_proj]"],
     "peft.targets=['*attn.q_proj'] match no linear layer of the model; its linear layers: lm.blocks.N.mixer.out"),
    ("adapter-wrong-base", ["finetune", "base={base}/data/adapter", *FT], "was trained on another base (its weights differ"),
    ("finetune-setting-in-train", ["train", "peft=lora"], "peft.method=lora is a fine-tuning setting: use lmtk finetune"),
    ("state-expand-attention-base", ["finetune", "base=done", *FT, "model.mixer.state_expand=2"],
     "model.mixer.state_expand=2: the base is softmax attention, whose state (the KV cache) already grows with the context"),
    ("state-expand-needs-full", ["finetune", "base=recurrent", *FT, "model.mixer.state_expand=2", "peft=lora"],
     "model.mixer.state_expand=2 needs peft=full"),
    ("eval-no-run", ["eval", "suite=ppl"], "lmtk eval needs a run: lmtk eval RUN"),
    ("eval-run-not-found", ["eval", "nope"], "no run named 'nope'"),
    ("eval-unknown-suite", ["eval", "done", "suite=ppll"], "unknown suite 'ppll' (did you mean: ppl"),
    ("eval-unknown-key", ["eval", "done", "ppl.tokns=5"], "unknown config key 'ppl.tokns' (did you mean: ppl.tokens"),
    ("eval-override-after-run", ["eval", "done", "suite=ppl", "other"], "override 'other' is not key=value"),
    ("eval-ppl-data-file-missing", ["eval", "done", "data=text", "data.val={base}/data/nope.txt"], "data file not found"),
    ("eval-ppl-data-val-unset", ["eval", "done", "data=text"], "data=text needs data.val=FILE"),
    ("eval-pairs-path-unset", ["eval", "done", "suite=pairs"], "suite=pairs needs pairs.path=FILE_OR_FOLDER"),
    ("eval-pairs-path-missing", ["eval", "done", "suite=pairs", "pairs.path={base}/data/nope"], "no such file or folder"),
    ("eval-pairs-no-jsonl", ["eval", "done", "suite=pairs", "pairs.path={base}/data/nopairs"], "has no .jsonl files"),
    ("eval-pairs-line-not-blimp", ["eval", "done", "suite=pairs", "pairs.path={base}/data/rows.jsonl"],
     "rows.jsonl:1 has no 'sentence_good'"),
    ("eval-pairs-bad-method", ["eval", "done", "suite=pairs", "pairs.path={base}/data/nopairs", "pairs.method=ppl"],
     "pairs.method=ppl is not one of: auto, causal, pll"),
    ("eval-length-masked-only", ["eval", "encoder", "suite=length"],
     "suite=length scores left-to-right loss by position, but run encoder was trained with objective=mlm"),
    ("eval-length-multiples", ["eval", "done", "suite=length", "length.multiples=[0,2]"],
     "length.multiples=[0, 2]: give whole multiples of the training context, each at least 1"),
    ("distill-no-teacher", ["distill"], "lmtk distill needs teacher=RUN"),
    ("distill-teacher-missing", ["distill", "teacher={base}/runs/nope"], "/runs/nope: no run, checkpoint or model directory there"),
    ("distill-teacher-not-a-model", ["distill", "teacher={base}/data"], "is not a model"),
    ("distill-teacher-encoder", ["distill", "teacher=encoder"], "is a masked (encoder) model (mlm)"),
    ("distill-vocab-mismatch", ["distill", "teacher=done", "tokenizer.path={base}/data/other-tokenizer.json"],
     "is not the teacher's tokenizer"),
    ("distill-qkv-copy-recurrent-teacher", ["distill", "teacher=recurrent", "model/mixer=gdn", "distill.init=qkv_copy"],
     "teacher layer 0 is gla, not softmax attention: distill.init=qkv_copy has no q, k, v, o to copy from it"),
    ("distill-qkv-copy-shapes", ["distill", "teacher=done", "distill.init=qkv_copy"],
     "give the student attention's shapes (distill.shape=attention: model.mixer.n_heads=null"),
    ("distill-stages-sum", ["distill", "teacher=done", "distill.stages=[mixer:0.5,kd:0.6]"], "distill.stages fractions sum to 1.1, not 1"),
    ("distill-unknown-stage", ["distill", "teacher=done", "distill.stages=[mixr:0.5,kd:0.5]"], "distill.stages: unknown stage 'mixr'"),
    ("distill-layers-length", ["distill", "teacher=done", "model.layers=RRA"], "model.layers gives 3 layers but model.n_layers=2 (the teacher's"),
    ("distill-model-key", ["distill", "teacher=done", "model.d_model=64"], "only those can be set for lmtk distill"),
    ("distill-lora-nothing-to-align", ["distill", "teacher=done", "model/mixer=linear", "distill.shape=attention",
                                       "distill.init=qkv_copy", "peft=lora"], "distill stage mixer has nothing to train"),
    ("distill-nothing-to-align", ["distill", "teacher=done", "model/mixer=attention"], "the mixer and hidden stages have nothing to align"),
    ("distill-shape-impossible", ["distill", "teacher=done", "model/mixer=mlstm", "distill.shape=attention"],
     "distill.shape=attention: model.mixer=mlstm has no setting with attention's q, k, v, o shapes"),
    ("distill-alpha-range", ["distill", "teacher=done", "distill.alpha=2"], "distill.alpha=2.0 must be in [0, 1]"),
    ("recipe-of-another-command", ["train", "lolcats"], "recipe 'lolcats' is an lmtk distill recipe: run lmtk distill lolcats ..."),
    ("distill-setting-in-train", ["train", "teacher=done"], "teacher=done is a distillation setting: use lmtk distill"),
    ("export-run-missing", ["export", "nope", "--to", "hf", "{base}/out"], "no run named 'nope'"),
    ("export-unknown-target", ["export", "done", "--to", "onnx", "{base}/out"], "--to onnx: lmtk exports to hf (a Hugging Face model directory) only"),
    ("export-out-not-empty", ["export", "done", "--to", "hf", "{base}/data"], "data exists and is not empty; pass --force to replace it"),
    ("export-force-onto-a-run", ["export", "done", "--to", "hf", "{base}/runs/done", "--force"], "holds an lmtk run or checkpoint; --force replaces only other directories"),
    ("export-recurrent", ["export", "recurrent", "--to", "hf", "{base}/out"],
     "model.mixer=gla is a recurrent mixer, which no transformers class has, so recurrent has no Hugging Face export; its checkpoint stands alone instead: lmtk generate "),
    ("export-no-transformers-class", ["export", "encoder", "--to", "hf", "{base}/out"],
     "model.norm_position=pre: BertForMaskedLM is post-norm, so encoder has no Hugging Face export"),
    ("plot-run-missing", ["plot", "nope"], "no run named 'nope'"),
    ("plot-several-without-out", ["plot", "done", "recurrent"], "2 runs are overlaid into one set of plots: name a folder for them with --out DIR"),
    ("plot-out-is-a-file", ["plot", "done", "--out", "{base}/data/short.txt"], "is a file; give a folder for the PNGs"),
    ("plot-bad-axis", ["plot", "done", "--x", "epoch"], "Invalid value for '--x'"),
    ("runs-show-missing", ["runs", "show", "nope"], "no run named 'nope'"),
    ("runs-compare-one-run", ["runs", "compare", "done"], "lmtk runs compare needs at least two runs"),
    ("runs-rm-missing", ["runs", "rm", "nope", "--yes"], "no run named 'nope'"),
    ("completion-unknown-shell", ["completion", "tcsh"], "'tcsh' is not one of 'bash', 'zsh', 'fish'"),
    ("search-no-grid", ["search", "model.d_model=32"], "lmtk search needs a grid: give at least one override a list of values"),
    ("search-unknown-key", ["search", "model.d_modle=[32,64]"], "unknown config key 'model.d_modle' (did you mean: model.d_model"),
    ("search-train-steps-negative", ["search", "model.d_model=[32,64]", "search.train_steps=-1"], "search.train_steps=-1 must be at least 0"),
    ("search-too-many-candidates", ["search", "model.d_model=[32,64]", "model.n_layers=[1,2]", "search.max_candidates=3"],
     "the grid has 4 candidates (2 x 2), more than search.max_candidates=3; narrow it, or raise search.max_candidates"),
    ("search-no-valid-candidate", ["search", "model.d_model=[30,31]"],
     "no candidate of the grid is valid; candidate 1 (model.d_model=30): model.d_model=30 is not divisible by model.n_heads=4"),
    ("search-grid-without-brackets", ["search", "model.d_model=64,128"], "model.d_model=64,128: a grid's values go in brackets, model.d_model=[64,128]"),
    ("search-grid-on-search-key", ["search", "model.d_model=[32,64]", "search.batches=[1,2]"], "search.* sets the search itself, not a candidate"),
    ("resume-changed-data-stream", ["train", *TINY, "run.name=done", "resume={base}/runs/done/checkpoints/step-000001", "data.seq_len=16"],
     "cannot resume run 'done' with data.seq_len=16: it was trained with data.seq_len=32"),
]

# Lines that may come before the error: progress of work done before the input was found bad.
PROGRESS = ("trained ", "tokenised ")


def _one_error_line(stderr: str, expect: str) -> None:
    """The promise: exactly one line starting 'error: ', the last, nothing else but progress lines."""
    lines = stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and expect in lines[-1], stderr
    assert all(line.startswith(PROGRESS) for line in lines[:-1]), stderr


@pytest.fixture(scope="module")
def outcomes(world):
    """Every row's `python -m lmtk ...` run once, three at a time (each is ~3 s of interpreter and
    torch start-up; one after another they took 5 minutes of the suite), with a digest of every
    existing run before and after all of them: {row: CompletedProcess}, (before, after)."""
    from concurrent.futures import ThreadPoolExecutor

    base, env = world
    before = {r.name: _digest(r) for r in (base / "runs").iterdir()}

    def one(row):
        args = [a.replace("{base}", str(base)) for a in row[1]]
        return row[0], subprocess.run([sys.executable, "-m", "lmtk", *args], env=env, capture_output=True, text=True,
                                      timeout=300)

    with ThreadPoolExecutor(max_workers=3) as pool:
        done = dict(pool.map(one, ROWS))
    after = {r.name: _digest(r) for r in (base / "runs").iterdir()}
    return done, (before, after)


@pytest.mark.parametrize("row,args,expect", ROWS, ids=[r[0] for r in ROWS])
def test_catalogue_row(world, outcomes, row, args, expect):
    if row in ("cuda-absent", "mixer-kernel-fla-unavailable") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    base, _ = world
    done, (before, after) = outcomes
    p = done[row]
    assert p.returncode == 2, p.stderr
    _one_error_line(p.stderr, expect)
    assert after == before  # every existing run is untouched, and no row left a run behind
    assert not (base / "runs" / "new").exists()


def _main(argv, capsys):
    from lmtk.cli import main

    sys.argv = ["lmtk", *argv]
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err
    return exc.value.code, err


def test_row_unreadable_data_file(tmp_path, monkeypatch, capsys):
    f = tmp_path / "locked.txt"
    f.write_text("text " * 1000)
    real = Path.read_bytes

    def deny(self):
        if self == f:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", deny)  # root ignores chmod, so simulate
    code, err = _main(["train", *TINY, "data=text", f"data.train={f}"], capsys)
    assert code == 2
    _one_error_line(err, f"cannot read data file {f}: Permission denied")


def test_row_disk_full_while_saving(monkeypatch, capsys, tmp_path):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    code, err = _main(["train", *TINY, "run.name=full"], capsys)
    assert code == 2
    assert re.search(r"error: could not save checkpoint final: No space left on device \(disk full", err)
    assert not list((tmp_path / "runs" / "full" / "checkpoints").glob(".tmp-*"))  # no torn directory left
    assert json.loads((tmp_path / "runs" / "full" / "run.json").read_text())["status"] == "failed"


def test_row_out_of_memory(monkeypatch, capsys):
    from lmtk.objectives import CLM

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(CLM, "loss", oom)
    code, err = _main(["train", *TINY, "run.name=oom"], capsys)
    assert code == 2 and "out of GPU memory at train.micro_batch_size=4; lower it" in err.strip().splitlines()[-1]
    assert "Traceback" not in err


def test_row_run_in_use(world, capsys):
    base, env = world
    lock = base / "runs" / "done" / ".lock"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        lock.write_text(str(sleeper.pid))
        p = subprocess.run([sys.executable, "-m", "lmtk", "train", *TINY, "run.name=done", "run.overwrite=true"],
                           env=env, capture_output=True, text=True)
    finally:
        sleeper.kill()
        sleeper.wait()
        lock.unlink()
    assert p.returncode == 2
    _one_error_line(p.stderr, f"in use by process {sleeper.pid}")
    assert (base / "runs" / "done" / "checkpoints" / "final").is_dir()  # overwrite did not delete it


def test_row_runs_rm_running(world):
    base, env = world
    lock = base / "runs" / "done" / ".lock"
    before = _digest(base / "runs" / "done")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        lock.write_text(str(sleeper.pid))
        p = subprocess.run([sys.executable, "-m", "lmtk", "runs", "rm", "done", "--yes"], env=env, capture_output=True, text=True)
    finally:
        sleeper.kill()
        sleeper.wait()
        lock.unlink()
    assert p.returncode == 2
    _one_error_line(p.stderr, f"run 'done' is running (process {sleeper.pid}); stop it first")
    assert _digest(base / "runs" / "done") == before


def test_debug_env_shows_traceback(world):
    base, env = world
    p = subprocess.run([sys.executable, "-m", "lmtk", "train", "model.d_modle=3"], env=dict(env, LMTK_DEBUG="1"),
                       capture_output=True, text=True)
    assert p.returncode != 0 and "Traceback" in p.stderr


def test_catalogue_documents_every_row():
    doc = (REPO / "docs" / "errors.md").read_text()
    names = [r[0] for r in ROWS] + ["unreadable-data-file", "disk-full-while-saving", "out-of-memory", "run-in-use",
                                    "corrupted-checkpoint", "too-many-non-finite-steps",
                                    "runs-rm-running", "plot-without-matplotlib"]
    missing = [n for n in names if f"`{n}`" not in doc]
    assert not missing, f"docs/errors.md lacks rows: {missing}"
