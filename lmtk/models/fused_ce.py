"""Linear + cross-entropy in chunks of rows, never holding the full [N, V] logits or their gradient.

`linear_cross_entropy(h, weight, targets)` equals
`F.cross_entropy(F.linear(h, weight, bias), targets, ignore_index=..., reduction="mean")`
(to float rounding) with the same gradients w.r.t. `h`, `weight` and `bias`. The gradients are
computed in the forward pass, chunk by chunk, while each chunk's logits are at hand:

    logits_c = h_c @ W^T (+ b)              [R, V], one reused buffer
    logp_c   = log_softmax(logits_c)        loss_c = -sum(logp_c[targets_c]) over valid rows
    g_c      = exp(logp_c) - onehot         (softmax - onehot; ignored rows zeroed)
    grad_h_c = g_c @ W ;  grad_W += g_c^T @ h_c ;  grad_b += sum(g_c)

backward only scales these sums by grad_output / n_valid (a device tensor: no host sync). The
logits chunk is the only [R, V] tensor alive, so memory is O(R * V) instead of O(N * V), and the
element-wise passes of the unfused path (log_softmax backward, the NLL scatter, the fresh
zero-filled [N, V] allocations) disappear. The gradient is computed even if the loss is never
backpropagated, so callers use this only where gradients are wanted (training) and keep the plain
head where they need logits (validation, inference).

Under autocast the matmuls run in the autocast dtype and the softmax in float32, as the plain
path's `.float()` logits do; gradients come back in the dtypes of `h` and `weight`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK = 1024  # rows per chunk; chosen by measurement (bench/RESULTS.md, "vs Hugging Face")


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
            masking = dev.type != "cpu" or not bool(valid.all())
            tgt = torch.where(valid, targets, 0)[:, None]
            loss_sum = torch.zeros((), dtype=sdt, device=dev)
            grad_h = torch.empty((N, d), dtype=cdt, device=dev) if need_h else None
            grad_w = torch.empty((V, d), dtype=sdt, device=dev) if need_w else None
            grad_b = torch.zeros((V,), dtype=sdt, device=dev) if need_b else None
            R = max(1, min(chunk, N))
            logits = torch.empty((R, V), dtype=cdt, device=dev)
            # the softmax overwrites the logits where the dtypes allow (fp32), else its own buffer
            probs = logits if cdt == sdt else torch.empty((R, V), dtype=sdt, device=dev)
            minus_one = torch.full((R, 1), -1.0, dtype=sdt, device=dev)
            for s in range(0, N, R):
                e = min(s + R, N)
                r = e - s
                hs, ts, lg, p = hc[s:e], tgt[s:e], logits[:r], probs[:r]
                if b is None:
                    torch.mm(hs, w.t(), out=lg)
                else:
                    torch.addmm(b, hs, w.t(), out=lg)
                # loss = logsumexp - logit[target], with logsumexp = max - log(softmax at the max):
                # one exp per element (softmax) instead of two (log_softmax, then exp for the
                # gradient), and the softmax at the max is >= 1/V, so its log is exact.
                m = lg.amax(1).to(sdt)
                picked = lg.gather(1, ts).squeeze(1).to(sdt)
                torch.softmax(lg, 1, dtype=sdt, out=p)
                row_loss = m - p.amax(1).log() - picked
                loss_sum += (row_loss * valid[s:e]).sum() if masking else row_loss.sum()
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
        scale = grad_out / n_valid
        dh, dw, db = ctx.dtypes
        out_h = None if grad_h is None else (grad_h.to(scale.dtype) * scale).to(dh)
        out_w = None if grad_w is None else grad_w.mul_(scale).to(dw)
        out_b = None if grad_b is None else grad_b.mul_(scale).to(db)
        return out_h, out_w, out_b, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None,
                         ignore_index: int = -100, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Mean cross-entropy of `h @ weight.T + bias` against `targets` over the positions whose target
    is not `ignore_index` (nan if there are none, as F.cross_entropy). `h` is [..., d], `targets`
    the matching [...]. Without gradients this falls back to the plain computation."""
    h2 = h.reshape(-1, h.shape[-1])
    t = targets.reshape(-1)
    if not (torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))):
        return F.cross_entropy(F.linear(h2, weight, bias).float(), t, ignore_index=ignore_index)
    return _LinearCrossEntropy.apply(h2, weight, bias, t, ignore_index, chunk)
