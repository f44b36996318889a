"""Device and precision resolution (auto: CUDA + bf16 when present, else CPU + fp32), and the
accelerator peak-FLOPs table behind MFU."""

from __future__ import annotations

import torch

from lmtk.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Dense bf16/fp16 tensor-core peak in TFLOP/s (vendor data sheets, without sparsity), matched as a
# substring of the lower-cased torch.cuda.get_device_name(); first match wins, so longer names
# come before their prefixes. MFU uses it when train.peak_tflops is null; a GPU not listed
# reports no MFU until train.peak_tflops is set.
PEAK_TFLOPS = {
    "h200": 989, "h100": 989, "a100": 312, "l40s": 362, "l40": 181, "4090": 165, "a10": 125, "3090": 71, "v100": 125, "t4": 65,
}


def peak_tflops(device: torch.device, configured: float | None = None) -> float | None:
    """train.peak_tflops when set, else the PEAK_TFLOPS entry of this GPU's name (None on CPU or
    for a GPU not in the table)."""
    if configured:
        return float(configured)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def resolve(device: str, precision: str, strategy: str = "ddp") -> tuple[torch.device, torch.dtype]:
    """(device, dtype) for the config's device and precision. precision=auto: bf16 on a CUDA GPU
    with bf16, else fp16 (with a GradScaler) under ddp or a single process, else fp32 under fsdp
    (which refuses fp16: its GradScaler would skip steps per shard); fp32 on CPU (bf16 autocast
    on CPUs without bf16 units is ~35x slower)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA GPU is visible to torch; use device=cpu (or device=auto)")
    if precision == "auto":
        if device != "cuda":
            precision = "fp32"
        elif torch.cuda.is_bf16_supported():
            precision = "bf16"
        else:
            precision = "fp32" if strategy == "fsdp" else "fp16"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return torch.device(device), DTYPES[precision]


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast to `dtype` for the forward pass; fp32 runs with autocast off."""
    if dtype == torch.float32:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)
