"""The torch backend of the logits pass (token log-probs, log-sum-exp, entropy)."""

from __future__ import annotations

import torch
from torch import Tensor

from alignops.layout import compute_dtype


def token_stats(logits: Tensor, labels: Tensor, temperature: float = 1.0, ignore_index: int = -100):
    """Returns (logp, lse, entropy) per position, in fp32 (fp64 for fp64 logits), with autograd.

    Positions whose label is ignore_index hold 0 in all three outputs and get no gradient.
    """
    valid = labels != ignore_index
    z = logits.to(compute_dtype(logits.dtype)) / temperature
    # Ignored rows are zeroed first so that whatever they hold (an all -inf row, NaN) cannot
    # reach their gradient: 0 * NaN would survive the final where().
    z = torch.where(valid.unsqueeze(-1), z, torch.zeros((), dtype=z.dtype, device=z.device))
    lse = torch.logsumexp(z, dim=-1)
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels)).long()
    # log_softmax, not z_y - lse: for logp near 0 that difference of two numbers ~lse keeps only
    # ulp(lse) of absolute precision (the kernels likewise take (x_y - max) / T - log s).
    logp = torch.log_softmax(z, dim=-1).gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    p = torch.softmax(z, dim=-1)
    # A logit of -inf has p = 0; replacing it by 0 keeps p*z (and its gradient) finite.
    z_finite = torch.where(torch.isneginf(z), torch.zeros_like(z), z)
    entropy = lse - (p * z_finite).sum(-1)
    zero = torch.zeros_like(logp)
    return torch.where(valid, logp, zero), torch.where(valid, lse, zero), torch.where(valid, entropy, zero)


def token_logprobs(logits: Tensor, labels: Tensor, temperature: float = 1.0, ignore_index: int = -100,
                   return_entropy: bool = False):
    logp, _, entropy = token_stats(logits, labels, temperature, ignore_index)
    return logp, (entropy if return_entropy else None)


def token_stats_grad(logits3, labels, logp, lse, entropy, a, b, temperature, ignore_index, out):
    """The backward of token_stats given a = dL/dlogp and b = dL/dH, written into `out` (the kernel
    contract of token_stats_bwd, with the temperature itself):
    dL/dz_v = a (1[v=y] - p_v) - b p_v (log p_v + H), divided by T."""
    dtype = compute_dtype(logits3.dtype)
    z = logits3.reshape(-1, logits3.shape[-1]).to(dtype) / temperature
    valid = labels != ignore_index
    z = torch.where(valid.unsqueeze(-1), z, torch.zeros((), dtype=dtype))
    log_p = torch.log_softmax(z, dim=-1)
    p = log_p.exp()
    g = -a.unsqueeze(-1) * p - b.unsqueeze(-1) * torch.where(p > 0, p * (log_p + entropy.unsqueeze(-1)), 0.0)
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    g.scatter_add_(1, safe.unsqueeze(-1), a.unsqueeze(-1))
    g = torch.where(valid.unsqueeze(-1), g / temperature, 0.0)
    out.copy_(g.reshape(out.shape))
