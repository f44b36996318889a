"""The knowledge-distillation loss, per token, with the student's head fused into it.

    loss = alpha * CE(y, z) + (1 - alpha) * T^2 * KL(p_t || p_s)          (forward KL, Hinton et al.)
         = alpha * CE(y, z) + (1 - alpha) * T^2 * KL(p_s || p_t)          (reverse KL, MiniLLM)
    p_s = softmax(z / T),  z = h W^T (+ b)       the student's logits
    p_t = softmax(t / T),  t = the teacher's logits on the same positions

averaged over the N predicted tokens. Like models/fused_ce.py (the training head), the logits are
made a chunk of rows at a time and the gradients w.r.t. h, W and b are computed in the forward
pass while the chunk is at hand; the teacher's logits are made chunk by chunk too, so neither
model's [N, vocab] logits ever exist. Per row, the gradient w.r.t. z is

    alpha (softmax(z) - onehot(y)) + (1 - alpha) T (p_s - p_t)                          forward KL
    alpha (softmax(z) - onehot(y)) + (1 - alpha) T p_s (log p_s - log p_t - KL_row)     reverse KL

(the T^2 factor keeps the soft part's gradient scale independent of T). `kd_reference` is the
plain computation on full logits, for objective.fused_head=false and the tests.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

KL_DIRECTIONS = ("forward", "reverse")


def _row_terms(z: torch.Tensor, t: torch.Tensor, y: torch.Tensor, alpha: float, T: float, reverse: bool):
    """(ce per row, kl per row, d loss_row / d z) for float32 logit rows z (student), t (teacher)."""
    ls = torch.log_softmax(z / T, dim=1)
    lt = torch.log_softmax(t / T, dim=1)
    ps = ls.exp()
    if reverse:
        kl = (ps * (ls - lt)).sum(1)
        g = ps * (ls - lt - kl[:, None]) * ((1 - alpha) * T)
    else:
        pt = lt.exp()
        kl = (pt * (lt - ls)).sum(1)
        g = (ps - pt) * ((1 - alpha) * T)
    ce = torch.logsumexp(z, dim=1) - z.gather(1, y[:, None]).squeeze(1)  # logged whatever alpha
    if alpha > 0:
        g = g + alpha * (ps if T == 1 else torch.softmax(z, dim=1))
        g.scatter_add_(1, y[:, None], torch.full_like(ce[:, None], -alpha))
    return ce, kl, g


class _LinearKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets, teacher_logits, alpha, T, reverse, chunk):
        N, d = h.shape
        V = weight.shape[0]
        dev = h.device
        cdt = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else torch.promote_types(h.dtype, weight.dtype)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        with torch.autocast(dev.type, enabled=False):
            hc, w = h.to(cdt), weight.to(cdt)
            b = None if bias is None else bias.to(cdt)
            sums = torch.zeros(3, dtype=torch.float32, device=dev)  # loss, ce, kl
            grad_h = torch.empty((N, d), dtype=cdt, device=dev) if need_h else None
            grad_w = torch.zeros((V, d), dtype=torch.float32, device=dev) if need_w else None
            grad_b = torch.zeros((V,), dtype=torch.float32, device=dev) if need_b else None
            for s in range(0, N, chunk):
                e = min(s + chunk, N)
                z = (hc[s:e] @ w.t() if b is None else torch.addmm(b, hc[s:e], w.t())).float()
                ce, kl, g = _row_terms(z, teacher_logits(s, e).float(), targets[s:e], alpha, T, reverse)
                sums += torch.stack([(alpha * ce + (1 - alpha) * T * T * kl).sum(), ce.sum(), kl.sum()])
                if need_b:
                    grad_b += g.sum(0)
                g = g.to(cdt)
                if need_h:
                    grad_h[s:e] = g @ w
                if need_w:
                    grad_w.addmm_(g.t().float(), hc[s:e].float())
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.n, ctx.dtypes = max(N, 1), (h.dtype, weight.dtype, None if bias is None else bias.dtype)
        means = sums / max(N, 1)
        ctx.mark_non_differentiable(means[1:])
        return means[0], means[1], means[2]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _ce, _kl):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_out / ctx.n
        dh, dw, db = ctx.dtypes
        out_h = None if grad_h is None else (grad_h.float() * scale).to(dh)
        out_w = None if grad_w is None else (grad_w * scale).to(dw)
        out_b = None if grad_b is None else (grad_b * scale).to(db)
        return out_h, out_w, out_b, None, None, None, None, None, None


def linear_kd(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
              teacher_logits: Callable[[int, int], torch.Tensor], alpha: float = 0.5, temperature: float = 1.0,
              kl: str = "forward", chunk: int = 1024):
    """(loss, ce, kl): the mean KD loss over the rows of h [N, d] (the student's final hidden
    states, head transform applied) against `targets` [N] and `teacher_logits(s, e)`, the teacher's
    logits of rows s..e-1 ([e - s, V], made on demand, without gradients). ce and kl are the
    means of their parts (for logging; no gradient flows through them)."""
    if kl not in KL_DIRECTIONS:
        raise ValueError(f"kl={kl!r}: one of {', '.join(KL_DIRECTIONS)}")
    return _LinearKD.apply(h, weight, bias, targets, teacher_logits, float(alpha), float(temperature), kl == "reverse", max(1, chunk))


def kd_reference(z: torch.Tensor, t: torch.Tensor, targets: torch.Tensor, alpha: float = 0.5,
                 temperature: float = 1.0, kl: str = "forward"):
    """(loss, ce, kl) on full logits z (student, [N, V]) and t (teacher), by autograd: the
    plain path (objective.fused_head=false) and the reference the fused one is tested against."""
    T = temperature
    z, t = z.float(), t.float().detach()
    ls, lt = F.log_softmax(z / T, dim=-1), F.log_softmax(t / T, dim=-1)
    if kl == "reverse":
        kl_rows = (ls.exp() * (ls - lt)).sum(-1)
    else:
        kl_rows = (lt.exp() * (lt - ls)).sum(-1)
    ce = F.cross_entropy(z, targets)
    loss = alpha * ce + (1 - alpha) * T * T * kl_rows.mean()
    return loss, ce.detach(), kl_rows.mean().detach()
