"""Parameter-efficient fine-tuning inside the model: which parameters train, and LoRA layers
that own their base weights (peft/lora.py), so a base state dict loads unchanged.

  full    every parameter trains
  bitfit  only biases (peft.biases: which, by name) and the task head; linear layers without a
          bias get a zero-initialised one first (peft.add_biases), which changes nothing at step 0
  lora    linear layers whose module name matches peft.targets become LoRALinear (rank peft.r,
          scale peft.alpha / r, or / sqrt(r) with peft.rslora, DoRA with peft.dora); only the
          adapters, the task head and (peft.bias=all) the biases train

An adapter is saved alone (adapter.safetensors: the trainable tensors; adapter.json: the method,
the head, the base's model config and fingerprint) and loads onto its base (load_adapter); merge()
folds LoRA into plain linear layers for inference.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn as nn
from omegaconf import OmegaConf

from lmtk.errors import UserError
from lmtk.peft.lora import LoRALinear
from lmtk.train.optim import matches

HEAD_PREFIX = "classifier."
ADAPTER_FILES = ("adapter.safetensors", "adapter.json")


def _plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def linear_names(model: nn.Module) -> list[str]:
    """Module names of the linear layers PEFT may adapt (the task head excluded)."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoRALinear)) and not n.startswith(HEAD_PREFIX)]


def add_biases(model: nn.Module, skip: tuple = ()) -> list[str]:
    """Zero-initialised biases for the linear layers that have none (BitFit on a bias-free base):
    the model's outputs are unchanged. Returns the module names that got one."""
    added = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and m.bias is None and not name.startswith(HEAD_PREFIX) and name not in skip:
            m.bias = nn.Parameter(torch.zeros(m.out_features, device=m.weight.device, dtype=m.weight.dtype))
            added.append(name)
    return added


def apply(model: nn.Module, cfg, skip: tuple = ()) -> dict:
    """Make `model` train with the method of `cfg` (the peft section), in place. `skip`: module
    names left alone (a task model's unused LM head). Returns what it did, for the console and
    adapter.json: {method, added_biases, adapted}."""
    method = cfg.method
    info = {"method": method, "added_biases": [], "adapted": []}
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return info
    if method == "bitfit":
        if cfg.add_biases:
            info["added_biases"] = add_biases(model, skip)
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(HEAD_PREFIX) or _is_bias(name) and matches(name, cfg.biases))
        if not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith(HEAD_PREFIX)):
            raise UserError(f"peft=bitfit: peft.biases={list(cfg.biases)} matches no bias of the model "
                            "(set peft.add_biases=true for a base without biases)")
        return info
    if method == "lora":
        names = [n for n in linear_names(model) if n not in skip]
        targets = [n for n in names if matches(n, cfg.targets)]
        if not targets:
            shown = ", ".join(sorted({_generic(n) for n in names})[:8])
            raise UserError(f"peft.targets={list(cfg.targets)} match no linear layer of the model; its linear layers: {shown}")
        for p in model.parameters():
            p.requires_grad_(False)
        for n in targets:
            m = model.get_submodule(n)
            if isinstance(m, LoRALinear):
                raise UserError(f"{n} is already a LoRA layer; merge the base's adapter first")
            _set_module(model, n, LoRALinear(m, cfg.r, cfg.alpha, cfg.dropout, cfg.rslora, cfg.dora))
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(HEAD_PREFIX) or name.rsplit(".", 1)[-1] in ("lora_a", "lora_b", "magnitude")
                             or cfg.bias == "all" and _is_bias(name))
        info["adapted"] = targets
        return info
    raise UserError(f"peft.method={method} is not one of: full, bitfit, lora")


def _is_bias(name: str) -> bool:
    return name.rsplit(".", 1)[-1] == "bias"


def _generic(name: str) -> str:
    import re

    return re.sub(r"\.\d+\.", ".N.", name)


def count(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters); a tied parameter counts once."""
    params = list(model.parameters())  # duplicates removed
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def describe(model: nn.Module, info: dict) -> str:
    trainable, total = count(model)
    extra = ""
    if info.get("added_biases"):
        extra = f"; added zero-initialised biases to {len(info['added_biases'])} linear layers (the base has none)"
    if info.get("adapted"):
        extra = f"; LoRA on {len(info['adapted'])} linear layers ({', '.join(sorted({_generic(n) for n in info['adapted']})[:4])})"
    return f"peft={info['method']}: {trainable:,} of {total:,} parameters train ({100 * trainable / max(1, total):.2f}%){extra}"


def merge(model: nn.Module) -> nn.Module:
    """Every LoRALinear folded into a plain nn.Linear (in place); returns the model."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            _set_module(model, name, m.merge())
    return model


def fingerprint(model: nn.Module) -> str:
    """sha256 of a model's tensors (names, shapes, dtypes, bytes): which base an adapter belongs to."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors: what an adapter adds to (or changes in) its base."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_adapter(model: nn.Module, dest: Path, meta: dict) -> None:
    """dest/adapter.safetensors + dest/adapter.json (meta: method, peft, head, base {model, fingerprint})."""
    from safetensors.torch import save_file

    from lmtk.checkpoint import write_atomic

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    state = adapter_state(model)
    tmp = dest / ".adapter.safetensors.tmp"
    save_file(state, str(tmp))
    tmp.replace(dest / "adapter.safetensors")
    write_atomic(dest / "adapter.json", json.dumps({**meta, "tensors": sorted(state)}, indent=2, default=str))


def read_adapter(path) -> dict:
    p = Path(path)
    if not (p / "adapter.json").is_file() or not (p / "adapter.safetensors").is_file():
        raise UserError(f"no adapter at {path} (expected adapter.safetensors and adapter.json)")
    return json.loads((p / "adapter.json").read_text())


def load_adapter(base: nn.Module, path, build_head=None) -> nn.Module:
    """The adapted model: `base` (a LanguageModel with the base's weights) with the adapter at
    `path` applied and loaded. build_head(base, head_meta) wraps it in its task model when the
    adapter has a head. A base other than the adapter's is refused."""
    from safetensors.torch import load_file

    meta = read_adapter(path)
    want, have = meta["base"]["fingerprint"], fingerprint(base)
    if want != have:
        same_shape = meta["base"].get("model") == base.cfg.to_dict()
        why = "its weights differ" if same_shape else "its architecture differs"
        raise UserError(f"adapter {path} was trained on another base ({why}: fingerprint {have}, the adapter's base is {want}); "
                        f"load it onto {meta['base'].get('path', 'its base')}")
    model = build_head(base, meta["head"]) if meta.get("head") else base
    info = apply(model, OmegaConf.create(meta["peft"]), skip=tuple(meta.get("skip", ())))
    del info
    state = load_file(str(Path(path) / "adapter.safetensors"))
    params = dict(model.named_parameters())
    missing = sorted(set(meta["tensors"]) - set(params))
    if missing:
        raise UserError(f"adapter {path} does not fit this model ({len(missing)} tensors have no place, e.g. {missing[0]})")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)
    return model
