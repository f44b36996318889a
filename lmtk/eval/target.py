"""What `lmtk eval` evaluates: a run name, a run directory or a checkpoint directory, loaded once.

A run gives its final/ checkpoint (else its latest step); results go to the run's eval/. A
checkpoint inside a run (runs/x/checkpoints/step-N) writes into that run's eval/ too (the
results file names the checkpoint); a checkpoint copied elsewhere writes <ckpt>/eval/.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmtk.errors import UserError


@dataclass
class Target:
    model: torch.nn.Module  # eval mode, on `device`
    tokenizer: Any  # lmtk.data.tokenizer.Tokenizer
    model_cfg: Any  # ModelConfig
    meta: dict  # the checkpoint's meta.json (step, tokens, objective {name, masked_shift}, ...)
    device: torch.device
    dtype: torch.dtype  # autocast dtype of forward passes
    name: str  # how tables and results name it
    seed: int
    run_dir: Path | None  # the run around the checkpoint, or None for a checkpoint on its own
    checkpoint: Path
    run_cfg: Any  # the run's config.yaml (DictConfig) when saved with the checkpoint, else None

    @property
    def out_dir(self) -> Path:
        """Where results files go: <run>/eval/ or <checkpoint>/eval/."""
        return (self.run_dir if self.run_dir is not None else self.checkpoint) / "eval"

    @property
    def causal_only(self) -> bool:
        return bool(self.model.causal_only)

    @property
    def objective(self) -> str | None:
        from lmtk.checkpoint import objective_name

        return objective_name(self.meta)

    @property
    def masked_shift(self) -> int:
        from lmtk.checkpoint import masked_shift

        return masked_shift(self.meta)

    @property
    def masked(self) -> bool:
        """Trained as a masked LM only (MLM, RTS): its natural reading is bidirectional."""
        from lmtk.objectives import ENCODER_OBJECTIVES

        return self.objective in ENCODER_OBJECTIVES

    def describe_mixer(self) -> str:
        return f"model.mixer={self.model_cfg.mixer['name']}"


def _run_of(ckpt: Path) -> Path | None:
    run = ckpt.parent.parent
    return run if ckpt.parent.name == "checkpoints" and (run / "run.json").is_file() else None


def load(spec: str, *, root, device: str = "auto", precision: str = "auto", seed: int = 0) -> Target:
    """The Target of `spec` (run name in `root`, run directory or checkpoint directory)."""
    from omegaconf import OmegaConf

    from lmtk import checkpoint, device as devices

    p = Path(spec).expanduser()
    if not p.exists() and not (Path(root).expanduser() / spec).exists():
        raise UserError(f"no run named '{spec}' in {Path(root).expanduser().resolve()}; `lmtk runs` lists them "
                        "(or give a run or checkpoint directory)")
    ckpt = checkpoint.locate(spec, root).resolve()
    dev, dtype = devices.resolve(device, precision)
    model, tok, meta = checkpoint.load_pretrained(ckpt)
    model.to(dev)
    run_dir = _run_of(ckpt)
    text = checkpoint.config_text(ckpt)
    run_cfg = OmegaConf.create(text) if text else None
    if run_dir is not None:
        name = run_dir.name if ckpt.name == "final" else f"{run_dir.name}/{ckpt.name}"
    else:
        name = ckpt.name if ckpt.name not in ("final",) else f"{ckpt.parent.name}/{ckpt.name}"
    return Target(model=model, tokenizer=tok, model_cfg=model.cfg, meta=meta, device=dev, dtype=dtype, name=name,
                  seed=seed, run_dir=run_dir, checkpoint=ckpt, run_cfg=run_cfg)
