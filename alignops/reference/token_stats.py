"""The torch backend of the logits pass (token log-probs, log-sum-exp, entropy)."""

from __future__ import annotations

import torch
from torch import Tensor

from alignops.layout import compute_dtype


def token_stats(logits: Tensor, labels: Tensor, temperature: float = 1.0, ignore_index: int = -100, *,
                inv_temperature: float | None = None):
    """Returns (logp, lse, entropy) per position, in fp32 (fp64 for fp64 logits), with autograd.

    Positions whose label is ignore_index hold 0 in all three outputs and get no gradient.
    The logits are multiplied by `inv_temperature` (default 1 / temperature), as the backward does:
    its log p_v = (x_v - x_y) * (1/T) + logp_y then cancels the forward's rounding exactly at the
    row's max even when logp_y is large (a division here and a product there left ~ulp(logp_y)).
    """
    inv = 1.0 / temperature if inv_temperature is None else inv_temperature
    valid = labels != ignore_index
    x = logits.to(compute_dtype(logits.dtype))
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    # Ignored rows are zeroed first so that whatever they hold (an all -inf row, NaN) cannot
    # reach their gradient: 0 * NaN would survive the final where().
    x = torch.where(valid.unsqueeze(-1), x, zero)
    # The row's largest logit is taken off before the temperature scales, as the kernels do:
    # x - max is exact near the max, while x / T first would round every logit by ulp(|x| / T)
    # (logits ~ 1000: ~1e-4 in log-probs, entropies and gradients in fp32). Log-softmax is
    # shift-invariant, so the (detached) shift changes no value and no gradient.
    m = x.detach().amax(dim=-1, keepdim=True) if x.shape[-1] else x.new_zeros((*x.shape[:-1], 1))
    m = torch.where(torch.isfinite(m), m, zero)
    z = (x - m) * inv
    lse = torch.logsumexp(z, dim=-1) + m.squeeze(-1) * inv
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels)).long()
    # log_softmax, not z_y - lse: for logp near 0 that difference of two numbers ~lse keeps only
    # ulp(lse) of absolute precision (the kernels likewise take (x_y - max) / T - log s).
    log_p = torch.log_softmax(z, dim=-1)
    logp = log_p.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    p = log_p.exp()
    # -sum p log p, not lse - sum p z (which cancels two numbers ~ max |z|). A logit of -inf has
    # p = 0 and log p = -inf: that term is 0, and its gradient stays finite.
    entropy = -(p * torch.where(p > 0, log_p, zero)).sum(-1)
    zero = torch.zeros_like(logp)
    return torch.where(valid, logp, zero), torch.where(valid, lse, zero), torch.where(valid, entropy, zero)


def token_stats_fwd(logits3, labels, inv_temperature, ignore_index, compute_entropy, logp, lse, entropy):
    """The kernel contract of token_stats_fwd (alignops/logits/kernels.py) on the torch backend."""
    with torch.no_grad():
        lp, ls, en = token_stats(logits3.reshape(-1, logits3.shape[-1]), labels, ignore_index=ignore_index,
                                 inv_temperature=inv_temperature)
    logp.copy_(lp)
    lse.copy_(ls)
    if compute_entropy:
        entropy.copy_(en)
    else:
        entropy.zero_()


def token_stats_bwd(logits3, labels, logp, lse, entropy, grad_logp, grad_entropy, inv_temperature, ignore_index,
                    has_entropy_grad, grad_logits):
    """The kernel contract of token_stats_bwd on the torch backend:
    dL/dz_v = a (1[v=y] - p_v) - b p_v (log p_v + H), divided by T, with a = grad_logp, b = grad_entropy.
    log p_v is rebuilt from the row's statistics as the kernels do, (z_v - z_y) + logp, or z_v - lse
    where z_y or logp is not finite; so the same code serves a vocabulary shard, whose statistics
    (lse, the label's logp) are the whole vocabulary's (alignops/logits/vocab_shard.py)."""
    dtype = compute_dtype(logits3.dtype)
    x = logits3.reshape(-1, logits3.shape[-1]).to(dtype)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(-1)
    xy = x.gather(-1, safe)
    lp = logp.unsqueeze(-1)
    via_label = torch.isfinite(xy) & torch.isfinite(lp)
    # (x_v - x_y) / T: the logits' difference first (exact near the label's logit), then the
    # temperature; x_v / T - x_y / T would round both by ulp(|x| / T)
    log_p = torch.where(via_label, (x - xy) * inv_temperature + lp, x * inv_temperature - lse.unsqueeze(-1))
    p = log_p.exp()
    a = grad_logp.unsqueeze(-1)
    g = -a * p
    if has_entropy_grad:
        b = grad_entropy.unsqueeze(-1)
        g = g - b * torch.where(p > 0, p * (log_p + entropy.unsqueeze(-1)), torch.zeros_like(p))
    g.scatter_add_(1, safe, a)
    g = torch.where(valid.unsqueeze(-1), g * inv_temperature, torch.zeros_like(g))
    grad_logits.copy_(g.reshape(grad_logits.shape))
