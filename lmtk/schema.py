"""Typed schema of every config section.

Hydra composes the YAML; these dataclasses then check it: unknown keys and values of
the wrong type become one-line errors instead of surprises deep inside training.
Defaults here are the fallbacks; conf/ and recipes/ set the real ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional


@dataclass
class RunCfg:
    root: str = "runs"  # conf/base.yaml sets ${oc.env:LMTK_RUNS,runs}
    name: Optional[str] = None  # default: <recipe>-<timestamp>
    overwrite: bool = False


@dataclass
class ModelCfg:
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # grouped-query attention: key/value heads, dividing n_heads (null: n_heads)
    window: Optional[int] = None  # sliding-window attention: keys each query sees, itself included (null: all)
    d_ff: Optional[int] = None  # default: 4*d (gelu) or 8/3*d rounded to 64 (gated)
    vocab_size: Optional[int] = None  # filled from the tokenizer
    max_seq_len: int = 1024  # only learned positions need it (a table of this many rows)
    positions: str = "learned"  # learned | sinusoidal | rope | alibi | none
    rope_base: float = 10000.0
    rope_layout: str = "interleaved"  # interleaved (pairs 2i, 2i+1; the fast one) | half (rotate_half); a checkpoint keeps its own
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_position: str = "pre"  # pre | post
    norm_eps: Optional[float] = None  # epsilon of every norm; null: the norm's usual (LayerNorm 1e-5, RMSNorm 1e-6)
    embedding_norm: bool = False  # cramming normalises the embedding output
    bias: bool = True
    mlp: str = "gelu"  # gelu | gelu-tanh (GPT-2's approximation) | gated-gelu | swiglu | moe (sparse experts: model.moe.*)
    mixer: Any = field(default_factory=lambda: {"name": "attention"})  # model/mixer=NAME; knobs checked by the mixer's Config
    layers: Optional[Any] = None  # hybrids: "RRAR RRAR" (A attention, R model.mixer) or a list of mixer names
    dropout: float = 0.0
    tie_embeddings: bool = True
    init_std: float = 0.02
    type_vocab_size: int = 0  # token type (segment) embeddings, BERT's (0: none)
    head_transform: bool = False  # BERT's MLM head transform (dense -> act -> norm) before the decoder
    head_bias: bool = False  # a bias on the LM head (BERT's decoder bias)
    pooler: bool = False  # dense + tanh on the first token (BERT's pooler)
    moe: Any = None  # model.mlp=moe: experts, top_k, d_expert, router, balance, kind (checked by models/moe.py Config)
    parametrization: str = "standard"  # standard | mup (width-dependent init, per-layer lrs, readout multiplier)
    mup_base_width: Optional[int] = None  # mup: the d_model the learning rate was tuned at


@dataclass
class ObjectiveCfg:
    name: str = "clm"  # clm | mlm | antlm | gpt-bert | mtp | rts
    mask_rate: float = 0.15
    mask_token_frac: float = 0.8  # of the selected positions: 80% [MASK]
    random_token_frac: float = 0.1  # 10% random token, the rest unchanged
    mask_rate_final: Optional[float] = None  # gpt-bert: mask rate decays linearly to this (None: constant)
    phases: List[str] = field(default_factory=list)  # antlm: ["clm:4", "mlm:16", "clm:4"]
    causal_weight: int = 1  # gpt-bert: causal:masked micro-batch ratio
    masked_weight: int = 15
    mtp_k: int = 4  # mtp: tokens predicted ahead, the main (next-token) head included (1: clm)
    mtp_weights: List[float] = field(default_factory=list)  # mtp: a weight per head, main first ([]: equal)
    replace_rate: float = 0.15  # rts: share of tokens replaced by random ones
    lm_weight: float = 0.0  # rts: weight of the swapped-token LM loss beside detection (0: detection alone)
    fused_head: bool = True  # training loss by the chunked head + cross-entropy (no [N, vocab] logits); false: plain head
    head_chunk: int = 1024  # fused head: rows per chunk (memory: one [head_chunk, vocab] buffer)


@dataclass
class DataCfg:
    source: str = "embedded"  # embedded | text | hf
    train: Optional[Any] = None  # path, glob, directory or list of them (source=text)
    val: Optional[Any] = None  # same; default: a document-level split of train
    name: Optional[str] = None  # HF dataset name (source=hf)
    config: Optional[str] = None  # HF dataset config
    split: str = "train"
    val_split: Optional[str] = None  # HF split for validation; default: split of train
    field: str = "text"  # jsonl / parquet / HF column holding the text
    val_fraction: float = 0.01  # documents held out when no val is given
    max_chars: Optional[int] = None  # cap on characters read (quick runs, tests)
    seq_len: int = 128


@dataclass
class TokenizerCfg:
    kind: str = "bpe"  # bpe (byte-level) | wordpiece
    vocab_size: int = 8192
    path: Optional[str] = None  # reuse an existing tokenizer.json (or a run name)
    train_chars: int = 20_000_000  # characters sampled to train the tokenizer
    lowercase: bool = False


@dataclass
class OptimCfg:
    name: str = "adamw"
    weight_decay: float = 0.01
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    # parameter names (globs, matched whole or from a dot on) without weight decay; null: lmtk.train.optim.NO_DECAY
    no_decay: Optional[List[str]] = None
    head: Optional[List[str]] = None  # names of a task head's parameters (null: classifier.*)
    head_lr_scale: float = 1.0  # the head's learning rate = train.lr x this


@dataclass
class ScheduleCfg:
    name: str = "cosine"  # triangle | cosine | constant
    warmup: float = 0.05  # fraction of the budget
    peak: float = 0.5  # triangle: where the LR peaks, as a fraction of the budget
    final: float = 0.1  # cosine: final LR as a fraction of the peak


@dataclass
class LoggerCfg:
    name: str = "console"  # console | wandb (console and metrics.jsonl are always on)
    project: str = "lmtk"
    entity: Optional[str] = None
    mode: str = "offline"  # wandb mode: offline needs no account
    every: int = 10  # steps between log lines


@dataclass
class BudgetCfg:
    steps: Optional[int] = None
    tokens: Optional[int] = None
    hours: Optional[float] = None
    epochs: Optional[float] = None


@dataclass
class CheckpointCfg:
    every: int = 0  # steps; 0: only the final checkpoint
    keep: int = 2  # step checkpoints kept (final/ is always kept)


@dataclass
class TrainCfg:
    batch_size: int = 32  # sequences per optimizer step
    micro_batch_size: int = 32  # sequences per forward/backward
    lr: float = 1e-3
    grad_clip: float = 1.0
    batch_ramp: float = 0.0  # fraction of the budget over which batch size ramps up
    compile: bool = False
    activation_checkpointing: bool = False  # recompute blocks in backward: less memory, ~30% more compute
    peak_tflops: Optional[float] = None  # accelerator peak for MFU; null: lmtk.device.PEAK_TFLOPS by GPU name


@dataclass
class ValCfg:
    every: int = 0  # steps; 0: only at start and end
    tokens: int = 65536  # fixed token count, so runs compare
    at_start: bool = True
    mask_rate: float = 0.15  # masked readings (val/mlm_*) mask this share whatever the training rate, so runs compare
    seed: Optional[int] = None  # masking seed of validation; None: seed + 12345


@dataclass
class LauncherCfg:
    nproc: int = 1  # >1: re-launch under torchrun with this many data-parallel processes
    strategy: str = "ddp"  # ddp (replicated model) | fsdp (FSDP2: parameters, gradients, optimizer state sharded)


@dataclass
class GuardCfg:
    max_bad_steps: int = 5  # consecutive non-finite steps before stopping


@dataclass
class TaskCfg:
    """`lmtk finetune task=...`: labelled sentences (or pairs) for classification or regression."""

    source: str = "none"  # none (no task: finetune on data= text with the LM objective) | glue | local
    name: Optional[str] = None  # glue: the GLUE config (sst2, mrpc, ...); local: a label for the task
    train: Optional[str] = None  # local: .tsv / .csv / .jsonl file
    val: Optional[str] = None  # local: the validation file (null: val_fraction of train held out)
    split: str = "train"  # glue: the training split
    val_split: str = "validation"  # glue: the validation split (mnli: validation_matched)
    text: str = "sentence"  # column of the (first) sentence
    text_pair: Optional[str] = None  # column of the second sentence of a pair task
    label: str = "label"  # column of the label
    kind: str = "auto"  # classification | regression | auto (regression when every label is a non-integer number)
    num_labels: Optional[int] = None  # classification: number of classes (null: the classes seen in train)
    metrics: List[str] = field(default_factory=lambda: ["accuracy"])  # the first one is the score (best epoch)
    max_len: int = 128  # tokens per example, special tokens included (longer ones truncated)
    val_fraction: float = 0.1  # local without task.val
    max_examples: Optional[int] = None  # cap on training examples (quick runs, tests)


@dataclass
class HeadCfg:
    pooling: str = "auto"  # auto (encoders: first token; causal models: last real token) | first | last
    dropout: float = 0.1


@dataclass
class PeftCfg:
    method: str = "full"  # full | bitfit | lora
    r: int = 8  # lora rank
    alpha: float = 16.0  # lora: the update is scaled by alpha / r (rslora: alpha / sqrt(r))
    dropout: float = 0.0  # lora: dropout on the adapter's input
    targets: List[str] = field(default_factory=lambda: ["*mixer.*"])  # lora: module names (globs) of the linear layers adapted
    rslora: bool = False  # lora: scale alpha / sqrt(r)
    dora: bool = False  # lora: weight-decomposed (DoRA) magnitude + direction
    bias: str = "none"  # lora: none | all (train every bias too)
    biases: List[str] = field(default_factory=lambda: ["*"])  # bitfit: which biases train (globs over parameter names)
    add_biases: bool = True  # bitfit: give linear layers without a bias a zero-initialised one (crammed models have none)


@dataclass
class DistillCfg:
    """`lmtk distill teacher=...`: how the student starts and what it learns when."""

    shape: str = "config"  # config: the student's mixer knobs as set | attention: the knobs that give them the teacher attention's shapes
    init: str = "auto"  # auto (qkv_copy where the student's widths allow, else copy) | scratch | copy | qkv_copy
    stages: List[str] = field(default_factory=lambda: ["mixer:0.1", "kd:0.9"])  # stage:budget fraction; mixer | hidden | kd
    alpha: float = 0.5  # kd: weight of the labels' cross-entropy; 1 - alpha on the T^2-scaled KL to the teacher
    temperature: float = 1.0  # kd: T, softening both distributions
    kl: str = "forward"  # kd: forward KL(teacher || student) | reverse KL(student || teacher)
    restart_schedule: bool = True  # the LR schedule restarts at each stage (warm-up, decay); false: one over the budget


@dataclass
class SearchCfg:
    """`lmtk search`: a grid of candidates ranked at initialisation (hidden covariance), optionally trained briefly."""

    batches: int = 4  # batches of train.micro_batch_size windows scored per candidate (the first ones its training run would see)
    train_steps: int = 0  # 0: rank only; N: train the top candidates N steps each, as runs <search>-<i>, and report Kendall's tau
    top: Optional[int] = None  # with train_steps: how many of the best-scored candidates train (null: all)
    max_candidates: int = 64  # a larger grid is refused (narrow it, or raise this)


@dataclass
class Config:
    recipe: str = "default"
    description: str = ""
    run: RunCfg = field(default_factory=RunCfg)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on CUDA; no bf16: fp16, fp32 under fsdp; fp32 on CPU) | fp32 | bf16 | fp16
    resume: Any = False  # false | auto | PATH
    model: ModelCfg = field(default_factory=ModelCfg)
    objective: ObjectiveCfg = field(default_factory=ObjectiveCfg)
    data: DataCfg = field(default_factory=DataCfg)
    tokenizer: TokenizerCfg = field(default_factory=TokenizerCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    schedule: ScheduleCfg = field(default_factory=ScheduleCfg)
    logger: LoggerCfg = field(default_factory=LoggerCfg)
    budget: BudgetCfg = field(default_factory=BudgetCfg)
    checkpoint: CheckpointCfg = field(default_factory=CheckpointCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    val: ValCfg = field(default_factory=ValCfg)
    guard: GuardCfg = field(default_factory=GuardCfg)
    launcher: LauncherCfg = field(default_factory=LauncherCfg)
    # lmtk finetune: the base model (a run, checkpoint or Hugging Face directory), the task, the method
    base: Optional[str] = None
    task: TaskCfg = field(default_factory=TaskCfg)
    head: HeadCfg = field(default_factory=HeadCfg)
    peft: PeftCfg = field(default_factory=PeftCfg)
    # lmtk distill: the teacher (a run, checkpoint or Hugging Face decoder directory) and the method
    teacher: Optional[str] = None
    distill: DistillCfg = field(default_factory=DistillCfg)
    # lmtk search: how candidates are scored and how many train
    search: SearchCfg = field(default_factory=SearchCfg)


# Values restricted to a set; checked after composition so typos fail before any work.
CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "model.positions": ("learned", "sinusoidal", "rope", "alibi", "none"),
    "model.rope_layout": ("half", "interleaved"),
    "model.norm": ("layernorm", "rmsnorm"),
    "model.norm_position": ("pre", "post"),
    "model.mlp": ("gelu", "gelu-tanh", "gated-gelu", "swiglu", "moe"),
    "model.parametrization": ("standard", "mup"),
    "objective.name": ("clm", "mlm", "antlm", "gpt-bert", "mtp", "rts"),
    "data.source": ("embedded", "text", "hf"),
    "tokenizer.kind": ("bpe", "wordpiece"),
    "optim.name": ("adamw",),
    "schedule.name": ("triangle", "cosine", "constant"),
    "logger.name": ("console", "wandb"),
    "launcher.strategy": ("ddp", "fsdp"),
    "task.source": ("none", "glue", "local"),
    "task.kind": ("auto", "classification", "regression"),
    "head.pooling": ("auto", "first", "last"),
    "peft.method": ("full", "bitfit", "lora"),
    "peft.bias": ("none", "all"),
    "distill.init": ("auto", "scratch", "copy", "qkv_copy"),
    "distill.kl": ("forward", "reverse"),
    "distill.shape": ("config", "attention"),
}
