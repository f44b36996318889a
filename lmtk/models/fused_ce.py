"""Linear + cross-entropy in chunks of rows, never holding the full [N, V] logits or their gradient.

`linear_cross_entropy(h, weight, targets)` equals
`F.cross_entropy(F.linear(h, weight, bias), targets, ignore_index=..., reduction="mean")`
(to float rounding) with the same gradients w.r.t. `h`, `weight` and `bias`. The gradients are
computed in the forward pass, chunk by chunk, while each chunk's logits are at hand:

    logits_c = h_c @ W^T (+ b)        [R, V], one buffer reused by every chunk
    p_c      = softmax(logits_c)      in place; loss_c = -sum(log p_c[target]) over valid rows (rows
                                      where that probability underflows are recomputed exactly;
                                      where host syncs cost, lse = max(logits_c) - log(max(p_c)))
    g_c      = p_c - onehot           (ignored rows zeroed)
    grad_h_c = g_c @ W ;  grad_W += g_c^T @ h_c ;  grad_b += sum(g_c)

backward only scales these sums by grad_output / n_valid (a device tensor: no host sync). The
logits chunk is the only [R, V] tensor alive, so memory is O(R * V) instead of O(N * V), and the
element-wise passes of the unfused path (log_softmax forward and backward, the NLL scatter into
a zero-filled [N, V] gradient, four fresh [N, V] allocations) shrink to one in-place softmax
and a scatter per chunk, in a buffer that CPU keeps between calls. The gradient is computed
even if the loss is never backpropagated, so callers use this only where gradients are wanted
(training) and keep the plain head where they need logits (validation, inference).

Under autocast the matmuls run in the autocast dtype and the softmax in float32, as the plain
path's `.float()` logits do; gradients come back in the dtypes of `h` and `weight`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Below this many rows x vocabulary entries the plain head (F.linear + F.cross_entropy) is faster
# than the fused one, whose chunk loop and custom backward are fixed costs; memory there is a few
# MB either way. Measured on a 2-core CPU, fwd+bwd of the head alone (bench/step.py --micro),
# fused/plain: 127x1024 1.08-1.11, 254x512 1.14-1.16, 1016x256 0.88-1.01, 508x1024 0.84-0.94,
# 1016x1024 0.82-0.96, 1016x4096 0.78-0.83 (bench/RESULTS.md, issue 16). Not yet measured on a GPU.
PLAIN_BELOW = 200_000
DEFAULT_CHUNK = 1024  # rows per chunk (objective.head_chunk's default); chosen by measurement (bench/RESULTS.md, "vs Hugging Face")


_WORKSPACE: dict = {}


def _workspace(slot: int, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The [R, V] chunk buffer. On CPU it is kept between calls, since a fresh allocation of this
    size is mmap-ed and page-faulted in on every step (keeping it: +2.4% tok/s on bench/vs_hf.py's
    GPT step); it stays allocated for the life of the process (206 MB at 1024 x 50304 fp32). The
    GPU caching allocator reuses memory by itself. Not for concurrent forwards in threads."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    n = shape[0] * shape[1]
    buf = _WORKSPACE.get((slot, dtype))
    if buf is None or buf.numel() < n:
        _WORKSPACE.pop((slot, dtype), None)
        buf = _WORKSPACE[(slot, dtype)] = torch.empty(n, dtype=dtype)
    return buf[:n].view(shape)


def _cheap_sync(device: torch.device) -> bool:
    """Whether reading a tensor on `device` from Python is free (CPU), or a host sync to avoid."""
    return device.type == "cpu"


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets, ignore_index: int, chunk: int):
        N, d = h.shape
        V = weight.shape[0]
        dev = h.device
        if torch.is_autocast_enabled(dev.type):
            cdt = torch.get_autocast_dtype(dev.type)
        else:
            cdt = torch.promote_types(h.dtype, weight.dtype)
        sdt = torch.promote_types(cdt, torch.float32)  # softmax and accumulation dtype
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        with torch.autocast(dev.type, enabled=False):
            hc, w = h.to(cdt), weight.to(cdt)
            b = None if bias is None else bias.to(cdt)
            valid = targets != ignore_index
            n_valid = valid.sum()
            # On CPU asking whether any target is ignored costs nothing; on an accelerator it would
            # be a host sync, so there ignored rows are always masked (one element-wise pass).
            sync_ok = _cheap_sync(dev)
            masking = not sync_ok or not bool(valid.all())
            tiny = torch.finfo(sdt).tiny * 2**20  # below this a probability has lost precision
            tgt = torch.where(valid, targets, 0)[:, None]
            loss_sum = torch.zeros((), dtype=sdt, device=dev)
            grad_h = torch.empty((N, d), dtype=cdt, device=dev) if need_h else None
            # written by the first chunk's matmul; zeros when there are no rows at all
            grad_w = (torch.empty if N else torch.zeros)((V, d), dtype=sdt, device=dev) if need_w else None
            grad_b = torch.zeros((V,), dtype=sdt, device=dev) if need_b else None
            R = max(1, min(chunk, N))
            logits = _workspace(0, (R, V), cdt, dev)
            # the softmax overwrites the logits where the dtypes allow (fp32), else its own buffer
            probs = logits if cdt == sdt else _workspace(1, (R, V), sdt, dev)
            minus_one = torch.full((R, 1), -1.0, dtype=sdt, device=dev)
            for s in range(0, N, R):
                e = min(s + R, N)
                r = e - s
                hs, ts, lg, p = hc[s:e], tgt[s:e], logits[:r], probs[:r]
                if b is None:
                    torch.mm(hs, w.t(), out=lg)
                else:
                    torch.addmm(b, hs, w.t(), out=lg)
                if sync_ok:
                    # loss = -log(softmax at the target): as exact as log_softmax unless that
                    # probability is (nearly) subnormal, a loss above ~73 nats (fp32; diverging
                    # runs): those rows are recomputed from their logits. No extra pass over the chunk.
                    torch.softmax(lg, 1, dtype=sdt, out=p)
                    pt = p.gather(1, ts).squeeze(1)
                    row_loss = -pt.log()
                    low = pt < tiny
                    if masking:
                        low &= valid[s:e]
                    if bool(low.any()):
                        rows = low.nonzero().squeeze(1)
                        x = (hs[rows] @ w.t() if b is None else torch.addmm(b, hs[rows], w.t())).to(sdt)
                        row_loss[rows] = torch.logsumexp(x, 1) - x.gather(1, ts[rows]).squeeze(1)
                else:
                    # loss = logsumexp - logit[target], with logsumexp = max - log(softmax at the max)
                    # (>= 1/V, so its log is exact): no host sync, at the price of two row maxima.
                    m = lg.amax(1).to(sdt)
                    picked = lg.gather(1, ts).squeeze(1).to(sdt)
                    torch.softmax(lg, 1, dtype=sdt, out=p)
                    row_loss = m - p.amax(1).log() - picked
                loss_sum += torch.where(valid[s:e], row_loss, 0).sum() if masking else row_loss.sum()
                if not (need_h or need_w or need_b):
                    continue
                g = p.scatter_add_(1, ts, minus_one[:r])  # softmax - onehot
                if masking:
                    g.mul_(valid[s:e, None])
                if need_b:
                    grad_b += g.sum(0)
                if cdt != sdt:
                    g = lg.copy_(g)  # the matmuls run in the compute dtype
                if need_h:
                    torch.mm(g, w, out=grad_h[s:e])
                if need_w:
                    if cdt == sdt:
                        torch.mm(g.t(), hs, out=grad_w) if s == 0 else grad_w.addmm_(g.t(), hs)
                    elif s == 0:
                        grad_w.copy_(g.t() @ hs)
                    else:
                        grad_w += g.t() @ hs
        ctx.save_for_backward(n_valid, grad_h, grad_w, grad_b)
        ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss_sum / n_valid

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        n_valid, grad_h, grad_w, grad_b = ctx.saved_tensors
        # nothing to predict: the loss is NaN (as F.cross_entropy's), the gradients zero (as its are)
        scale = grad_out / n_valid.clamp(min=1)
        dh, dw, db = ctx.dtypes
        out_h = None if grad_h is None else (grad_h.to(scale.dtype) * scale).to(dh)
        out_w = None if grad_w is None else grad_w.mul_(scale).to(dw)
        out_b = None if grad_b is None else grad_b.mul_(scale).to(db)
        return out_h, out_w, out_b, None, None, None


def fused_pays(rows: int, vocab: int) -> bool:
    """Whether the fused head is worth it for `rows` predictions over `vocab` entries: at
    rows x vocab >= PLAIN_BELOW (measured; below it the plain head is as fast or faster)."""
    return rows * vocab >= PLAIN_BELOW


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None,
                         ignore_index: int = -100, chunk: int | None = None, dispatch: bool = True) -> torch.Tensor:
    """Mean cross-entropy of `h @ weight.T + bias` against `targets` over the positions whose target
    is not `ignore_index` (nan if there are none, as F.cross_entropy). `h` is [..., d], `targets`
    the matching [...]; `chunk` rows at a time (default DEFAULT_CHUNK). Without gradients, or
    (dispatch=True) where the fused path does not pay (fused_pays), this is the plain computation."""
    h2 = h.reshape(-1, h.shape[-1])
    t = targets.reshape(-1)
    grads = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    if not grads or (dispatch and not fused_pays(h2.shape[0], weight.shape[0])):
        logits = F.linear(h2, weight, bias)
        return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), t, ignore_index=ignore_index)
    return _LinearCrossEntropy.apply(h2, weight, bias, t, ignore_index, chunk or DEFAULT_CHUNK)
