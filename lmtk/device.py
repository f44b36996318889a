"""Device and precision resolution (auto: CUDA + bf16 when present, else CPU + fp32)."""

from __future__ import annotations

import torch

from lmtk.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve(device: str, precision: str) -> tuple[torch.device, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA GPU is visible to torch; use device=cpu (or device=auto)")
    if precision == "auto":
        # bf16 autocast on CPUs without bf16 units is ~35x slower than fp32.
        precision = "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else ("fp16" if device == "cuda" else "fp32")
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return torch.device(device), DTYPES[precision]


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast to `dtype` for the forward pass; fp32 runs with autocast off."""
    if dtype == torch.float32:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)
