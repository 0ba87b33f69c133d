"""Eager reference for the logits pass (token log-probs, log-sum-exp, entropy)."""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 math for every input dtype (docs/methods.md R3), fp64 for fp64 inputs (the oracle)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
    logp = z.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1) - lse
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
