"""The base of a fine-tuning run, resolved in ONE place (resolve_base): an lmtk run or
checkpoint directory (or a run name in the runs directory, or an adapter directory), else a
Hugging Face model directory (or hf:<name>) through lmtk.models.hf.load_hf(path) -> (model,
tokenizer, meta); meta["objective"]["name"] (mlm | clm) or meta["causal"] says how to read it.

A fine-tuning run is a base like any other: its model is rebuilt (base architecture, the biases
BitFit added, its PEFT layers and head), loaded, LoRA merged into the weights and the task head
dropped, so every base is a plain LanguageModel."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmtk import checkpoint
from lmtk.errors import UserError


@dataclass
class Base:
    lm: torch.nn.Module  # a LanguageModel with the base's weights
    tok: object  # lmtk.data.tokenizer.Tokenizer
    meta: dict  # the checkpoint's meta.json (HF: load_hf's meta)
    path: str  # where it came from (absolute)
    kind: str  # lmtk | hf
    ckpt: Path | None = None
    encoder: bool = False  # trained with a masked objective: read bidirectionally, pool the first token
    objective: str | None = None
    added_biases: list = field(default_factory=list)  # linear layers that got a bias from BitFit along the chain

    def describe(self) -> str:
        what = f"checkpoint {self.ckpt}" if self.ckpt is not None else self.path
        return f"{what} ({'encoder' if self.encoder else 'causal'}, {self.objective or '?'})"


def _is_lmtk(p: Path) -> bool:
    return checkpoint.is_checkpoint(p) or (p / "run.json").is_file() or (p / "checkpoints").is_dir()


def resolve_base(spec, root, key: str = "base", command: str = "finetune") -> Base:
    """The base named by `base=`: a run name (in the runs directory), a run or checkpoint
    directory, or a Hugging Face model directory (config.json). One-line errors otherwise, naming
    `key` (lmtk distill's teacher= is found the same way)."""
    from lmtk.runs import runs_root

    if not spec:
        raise UserError(f"lmtk {command} needs {key}=RUN: a run name, a run or checkpoint directory, or a Hugging Face model directory")
    if str(spec).startswith("hf:"):  # hf:<name>[@revision]: the Hugging Face import downloads it
        return _hf_base(str(spec))
    p = Path(str(spec)).expanduser()
    if not p.exists() and root is not None and (runs_root(root) / str(spec)).exists():
        p = runs_root(root) / str(spec)
    if not p.exists():
        where = runs_root(root) if root is not None else Path.cwd()
        raise UserError(f"{key}={spec}: no run, checkpoint or model directory there (nor a run of that name in {where}); `lmtk runs` lists runs")
    p = p.resolve()
    if _is_lmtk(p):
        return _lmtk_base(p, key)
    if (p / "adapter.json").is_file():
        return _adapter_base(p, root)
    if (p / "config.json").is_file():
        return _hf_base(p)
    raise UserError(f"{key}={spec} is not a model: {p} has no lmtk checkpoint (meta.json, checkpoints/) "
                    "and no Hugging Face config.json")


def _lmtk_base(p: Path, key: str = "base") -> Base:
    from lmtk.data.tokenizer import Tokenizer
    from lmtk.runs import RunDir

    if checkpoint.is_checkpoint(p):
        ckpt = p
    else:
        final = RunDir(p).ckpt_dir / "final"
        if checkpoint.is_checkpoint(final):
            ckpt = final
        else:
            try:
                ckpt = checkpoint.resolve(p)
            except UserError:
                raise UserError(f"{key}={p} is a run without a checkpoint (did it finish?); give a finished run or a checkpoint directory") from None
    meta = checkpoint.verify(ckpt)
    if not meta.get("model"):
        raise UserError(f"{key} checkpoint {ckpt} has no model config in meta.json; it is not an lmtk model checkpoint")
    lm, added = load_language_model(ckpt, meta)
    ft = meta.get("finetune")
    if ft:
        encoder, objective = bool(ft.get("encoder")), ft.get("base_objective")
    else:
        from lmtk.objectives import ENCODER_OBJECTIVES

        objective = checkpoint.objective_name(meta)
        encoder = objective in ENCODER_OBJECTIVES
    tok = Tokenizer.from_file(checkpoint.tokenizer_path(ckpt))
    return Base(lm=lm, tok=tok, meta=meta, path=str(p), kind="lmtk", ckpt=ckpt, encoder=encoder, objective=objective,
                added_biases=added)


def _adapter_base(p: Path, root) -> Base:
    """An adapter directory alone (adapter.safetensors + adapter.json): loaded onto the base its
    adapter.json names, which must be the base it was trained on; then merged."""
    from lmtk import peft
    from lmtk.finetune.model import build_task_model

    meta = peft.read_adapter(p)
    base = resolve_base(meta["base"]["path"], root)
    model = peft.load_adapter(base.lm, p, build_head=build_task_model)  # BitFit's biases: added again by its method
    peft.merge(model)
    lm = model.lm if hasattr(model, "lm") else model
    for prm in lm.parameters():
        prm.requires_grad_(True)
    base.path, base.ckpt = str(p), None
    base.added_biases = list(meta.get("added_biases", base.added_biases))
    return base


def load_language_model(ckpt: Path, meta: dict):
    """(LanguageModel in eval mode, biases BitFit added along the way) from a checkpoint: a
    pretraining one as it is; a fine-tuning one rebuilt (its PEFT layers, head), loaded, LoRA merged
    into the weights and the task head dropped (checkpoint.load_pretrained uses this too, so
    `lmtk generate` and evaluation take fine-tuning runs)."""
    from lmtk import peft
    from lmtk.models import ModelConfig, build_model

    lm = build_model(ModelConfig.from_dict(meta["model"]))
    ft = meta.get("finetune")
    added = []
    if ft:
        model, added = rebuild(lm, ft)
        checkpoint.load_weights(model, ckpt)
        peft.merge(model)
        lm = model.lm if hasattr(model, "lm") else model
        for prm in lm.parameters():
            prm.requires_grad_(True)
    else:
        checkpoint.load_weights(lm, ckpt)
    return lm.eval(), added


def rebuild(lm, ft: dict):
    """A fine-tuning run's model around a fresh `lm` of its base architecture: the biases BitFit
    added along the chain, the head, the PEFT layers; returns (model, added biases)."""
    from omegaconf import OmegaConf

    from lmtk import peft
    from lmtk.finetune.model import build_task_model

    added = [n[3:] if n.startswith("lm.") else n for n in ft.get("added_biases", [])]  # names inside the LanguageModel
    _add_named_biases(lm, added)
    model = build_task_model(lm, ft["head"]) if ft.get("head") else lm
    cfg = OmegaConf.create(ft["peft"])
    if cfg.method == "bitfit":
        cfg.add_biases = False  # those it added are back already
    peft.apply(model, cfg, skip=tuple(ft.get("skip", ())))
    return model, added


def _add_named_biases(lm, names) -> None:
    for name in names:
        try:
            m = lm.get_submodule(name)
        except AttributeError:
            raise UserError(f"the base's fine-tuning record names a layer '{name}' this model does not have") from None
        if getattr(m, "bias", None) is None:
            m.bias = torch.nn.Parameter(torch.zeros(m.out_features, dtype=m.weight.dtype))


def _hf_base(p) -> Base:
    try:
        from lmtk.models.hf import load_hf
    except ImportError:
        raise UserError(f"base={p} is a Hugging Face model directory, but this lmtk has no Hugging Face import "
                        "(lmtk.models.hf); give an lmtk run or checkpoint") from None
    lm, tok, meta = load_hf(p)
    meta = dict(meta or {})
    objective = meta.get("objective")
    if isinstance(objective, dict):
        objective = objective.get("name")
    causal = meta.get("causal")
    encoder = (not causal) if causal is not None else objective == "mlm"
    lm.eval()
    return Base(lm=lm, tok=tok, meta=meta, path=str(p), kind="hf", encoder=encoder, objective=objective)
