"""The optional GPU fast path: flash-linear-attention's Triton chunk kernels (extra `lmtk[fla]`,
package fla-core) for the chunked forms of recurrence.py and delta.py on CUDA.

model.mixer.kernel chooses, per recurrent mixer:

    auto    fla's kernel when the op runs on a CUDA tensor and fla imports; the PyTorch op otherwise
    torch   always the PyTorch op (recurrence.py / delta.py)
    fla     always fla's kernel; without a CUDA GPU or without fla a one-line error

The PyTorch ops stay the reference and the only path on the CPU: on a CPU tensor nothing here
imports fla (`use_fla` looks at the tensor's device first). Decoding steps of one token keep the
PyTorch step form. fla's layout is time-first ([B, T, H, D]) with the state [B, H, Dk, Dv] and
natural-log decays, like ours; scale is passed explicitly (fla's default is Dk^-0.5). What it
covers: the gated linear recurrence with g None, [H] (a fixed decay: fla's g_gamma, which takes
no gradient, so a [H] decay that needs one runs the PyTorch op), [B, H, T] (chunk_simple_gla) and
[B, H, T, Dk] (chunk_gla), and the gated delta rule with g None or [B, H, T]
(chunk_gated_delta_rule). q, k shared across heads ([B, 1, T, Dk]) are expanded for
simple_gla / gla, and passed as one head group to the delta rule (its grouped-value heads).

This path is unexercised on the machines lmtk has been developed on (no GPU):
tests/test_kernels.py compares it with the PyTorch op (outputs, final states, gradients) and
skips where CUDA or fla is absent."""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch import Tensor

KERNELS = ("auto", "torch", "fla")


@functools.cache
def _fla_installed() -> bool:
    """Whether the fla package is installed (found, not imported)."""
    return importlib.util.find_spec("fla") is not None


@functools.cache
def _fla_ops():
    """fla's chunk kernels (imported on first use, on CUDA only); None if they do not import."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        from fla.ops.gla import chunk_gla
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception:  # noqa: BLE001 - a broken install (no Triton, no matching CUDA) means: not available
        return None
    return {"simple_gla": chunk_simple_gla, "gla": chunk_gla, "gated_delta_rule": chunk_gated_delta_rule}


def check(kernel: str, mixer: str) -> None:
    """model.mixer.kernel=fla where it cannot run: a one-line UserError (before any weights exist)."""
    from lmtk.errors import UserError

    if kernel != "fla":
        return
    if not torch.cuda.is_available():
        raise UserError(f"model.mixer.kernel=fla for mixer {mixer} needs a CUDA GPU (none is visible to torch); "
                        "use model.mixer.kernel=auto (or torch)")
    if not _fla_installed() or _fla_ops() is None:
        raise UserError(f"model.mixer.kernel=fla for mixer {mixer}: fla's kernels do not import; "
                        "install them with pip install 'lmtk[fla]', or use model.mixer.kernel=auto")


def use_fla(kernel: str, x: Tensor) -> bool:
    """Whether the chunked op on x (a CUDA or CPU tensor) runs fla's kernel. Never imports fla for a
    CPU tensor or kernel=torch."""
    if kernel == "torch":
        return False
    if not x.is_cuda:
        if kernel == "fla":
            from lmtk.errors import UserError

            raise UserError(f"model.mixer.kernel=fla but the mixer runs on {x.device.type}; "
                            "fla's kernels are CUDA only: use model.mixer.kernel=auto")
        return False
    if kernel == "fla":
        return True
    return _fla_installed() and _fla_ops() is not None


def _time_first(x: Tensor, H: int | None = None) -> Tensor:
    """[B, H|1, T, ...] -> [B, T, H, ...] (expanding a shared head to H when given), contiguous."""
    if H is not None and x.shape[1] != H:
        x = x.expand(x.shape[0], H, *x.shape[2:])
    return x.transpose(1, 2).contiguous()


def fla_recurrence(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, state: Tensor | None = None,
                   scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """recurrence.chunked through fla (same arguments and results: o [B, H, T, Dv] in q's dtype,
    the final state in fp32). Shapes fla does not cover run recurrence.chunked."""
    from lmtk.models.mixers import recurrence

    B, H, T, Dv = v.shape
    ops = _fla_ops()
    if ops is None or (g is not None and g.dim() == 1 and g.requires_grad):
        return recurrence.chunked(q, k, v, g, state=state, scale=scale)
    cdt = recurrence.compute_dtype(q.dtype)
    S0 = None if state is None else state.to(cdt)
    qt, kt, vt = _time_first(q, H), _time_first(k.to(q.dtype), H), _time_first(v.to(q.dtype))  # one dtype for Triton
    if g is None or g.dim() == 1:
        gamma = torch.zeros(H, device=q.device, dtype=torch.float32) if g is None else g.float()
        o, S = ops["simple_gla"](qt, kt, vt, g_gamma=gamma, scale=scale, initial_state=S0, output_final_state=True)
    elif g.dim() == 3 or g.shape[-1] == 1:
        gt = _time_first(g.reshape(g.shape[0], H, T).expand(B, H, T).float())
        o, S = ops["simple_gla"](qt, kt, vt, g=gt, scale=scale, initial_state=S0, output_final_state=True)
    else:
        gt = _time_first(g.expand(B, *g.shape[1:]).float())
        o, S = ops["gla"](qt, kt, vt, gt, scale=scale, initial_state=S0, output_final_state=True)
    return o.transpose(1, 2).to(q.dtype), S.to(cdt)


def fla_delta(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, state: Tensor | None = None,
              scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """delta.chunked through fla's chunk_gated_delta_rule (g None: a zero log-decay). Per-head
    fixed decays g [H] are expanded over batch and time."""
    from lmtk.models.mixers import delta, recurrence

    B, H, T, Dv = v.shape
    ops = _fla_ops()
    if ops is None:
        return delta.chunked(q, k, v, beta, g, state=state, scale=scale)
    cdt = recurrence.compute_dtype(q.dtype)
    if g is None:
        g = torch.zeros(B, H, T, device=q.device, dtype=torch.float32)
    elif g.dim() == 1:
        g = g.float().view(1, H, 1).expand(B, H, T)
    g = g.reshape(g.shape[0], H, T).expand(B, H, T)
    o, S = ops["gated_delta_rule"](_time_first(q), _time_first(k.to(q.dtype)), _time_first(v.to(q.dtype)),
                                   _time_first(g.float()), _time_first(beta.expand(B, H, T).to(q.dtype)), scale=scale,
                                   initial_state=None if state is None else state.to(cdt), output_final_state=True)
    return o.transpose(1, 2).to(q.dtype), S.to(cdt)
