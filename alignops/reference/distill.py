"""The torch backend of the distillation kernels (contract: alignops/distill.py)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from alignops.distill import FORWARD_KL, REVERSE_KL
from alignops.layout import compute_dtype

# Rows per step: bounds the fp32 temporaries (a few [rows, V]) of this eager backend.
_STEP_BYTES = 64 << 20


def _row_log_probs(x: Tensor, inv_temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """(log p, raw row max, log sum exp) of z = x * inv_temperature. log p = (x - max) * inv - log s:
    the max is taken off before the scale, as in alignops/reference/token_stats.py."""
    m = x.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    z = (x - m) * inv_temperature
    log_s = torch.logsumexp(z, dim=-1, keepdim=True)
    return z - log_s, m.squeeze(-1), log_s.squeeze(-1)


def _terms(ls: Tensor, lt: Tensor, divergence: int, beta: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per element: the loss term, p_s, p_t and h = dL/dp_s (0 where p_s = 0; unused by forward KL).
    A term whose probability is 0 contributes exactly 0 (never 0 * inf)."""
    ps, pt = ls.exp(), lt.exp()
    zero = torch.zeros((), dtype=ls.dtype, device=ls.device)
    if divergence == FORWARD_KL:
        return torch.where(pt > 0, pt * (lt - ls), zero), ps, pt, torch.zeros_like(ls)
    if divergence == REVERSE_KL:
        h = torch.where(ps > 0, ls - lt, zero)
        return ps * h, ps, pt, h
    lm = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
    h = torch.where(ps > 0, (1.0 - beta) * (ls - lm), zero)
    return beta * torch.where(pt > 0, pt * (lt - lm), zero) + ps * h, ps, pt, h


def _grad(divergence: int, ps: Tensor, pt: Tensor, h: Tensor, dot: Tensor) -> Tensor:
    """dL/dz: p_s - p_t for forward KL, p_s (h - sum p_s h) otherwise (not a difference of two
    products of p_s, which cancels for the largest p_s)."""
    return ps - pt if divergence == FORWARD_KL else ps * (h - dot)


def _steps(n: int, vocab: int):
    step = max(1, _STEP_BYTES // (8 * max(vocab, 1)))
    for s in range(0, n, step):
        yield s, min(s + step, n)


def distill_fwd(student: Tensor, teacher: Tensor, valid: Tensor, inv_temperature: float, divergence: int,
                beta: float, loss: Tensor, stats: Tensor) -> None:
    acc = compute_dtype(student.dtype)
    xs_all, xt_all = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
    for s, e in _steps(xs_all.shape[0], xs_all.shape[1]):
        v = valid[s:e].unsqueeze(-1)
        xs = torch.where(v, xs_all[s:e].to(acc), 0.0)
        xt = torch.where(v, xt_all[s:e].to(acc), 0.0)
        ls, ms, log_ss = _row_log_probs(xs, inv_temperature)
        lt, mt, log_st = _row_log_probs(xt, inv_temperature)
        term, ps, _, h = _terms(ls, lt, divergence, beta)
        dot = torch.full_like(ms, -1.0) if divergence == FORWARD_KL else (ps * h).sum(-1)
        keep = valid[s:e]
        loss[s:e] = torch.where(keep, term.sum(-1), 0.0)
        stats[s:e] = torch.where(keep.unsqueeze(-1), torch.stack([ms, log_ss, mt, log_st, dot], -1), 0.0)


def distill_bwd(student: Tensor, teacher: Tensor, valid: Tensor, stats: Tensor, grad_loss: Tensor,
                inv_temperature: float, divergence: int, beta: float, grad_student: Tensor) -> None:
    acc = compute_dtype(student.dtype)
    xs_all, xt_all = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
    g_all = grad_student.view(-1, grad_student.shape[-1])
    for s, e in _steps(xs_all.shape[0], xs_all.shape[1]):
        v = valid[s:e].unsqueeze(-1)
        ms, log_ss, mt, log_st, dot = stats[s:e].unbind(-1)
        xs = torch.where(v, xs_all[s:e].to(acc), 0.0)
        xt = torch.where(v, xt_all[s:e].to(acc), 0.0)
        ls = (xs - ms.unsqueeze(-1)) * inv_temperature - log_ss.unsqueeze(-1)
        lt = (xt - mt.unsqueeze(-1)) * inv_temperature - log_st.unsqueeze(-1)
        _, ps, pt, h = _terms(ls, lt, divergence, beta)
        g = _grad(divergence, ps, pt, h, dot.unsqueeze(-1)) * (grad_loss[s:e] * inv_temperature).unsqueeze(-1)
        g_all[s:e] = torch.where(v, g, 0.0).to(g_all.dtype)
