"""Torch math shared by the policy-loss methods: the per-token inputs and outputs of a method, ratios,
the clipped surrogate, the KL estimators and the ratio metrics.

Plain torch on token-shaped tensors (the `[B, T]` or packed `[N]` layout of alignops.layout),
float64-capable, differentiable through autograd. Every input has already been zeroed at
masked-out positions (layout.sanitize). Per-token functions return phi, the loss to minimise per
token (docs/methods.md R1), before aggregation. Bounds are absolute ratio bounds
(c_low < 1 < c_high); PPO's relative knobs become (1 - clip_low, 1 + clip_high).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from alignops.layout import Rows, token_mean

KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")


@dataclasses.dataclass
class TokenInputs:
    logp: Tensor            # with autograd
    old_logp: Tensor        # detached
    adv: Tensor             # detached, token-shaped
    mask: Tensor            # bool
    rows: Rows
    clip_low: float
    clip_high: float
    clip_ratio_c: float | None
    ratio_log_clamp: float | None


@dataclasses.dataclass
class TokenLoss:
    phi: Tensor                     # per-token loss (autograd)
    ratio: Tensor | None            # detached ratio used for the clip metrics (None: no ratio)
    low: Tensor | float | None      # absolute clip bounds used by the clip metrics
    high: Tensor | float | None
    metrics: dict = dataclasses.field(default_factory=dict)


def log_ratio(logp: Tensor, old_logp: Tensor, clamp: float | None) -> Tensor:
    """logp - old_logp, clamped to +-clamp before any exp (docs/methods.md §1.4): the gradient is zero
    outside the clamp, which is intended."""
    d = logp - old_logp
    return d if clamp is None else d.clamp(-clamp, clamp)


def straight_through_one(log_ratio_: Tensor) -> Tensor:
    """exp(d - sg(d)): value exactly 1, gradient d(log_ratio), i.e. r / sg(r)."""
    return torch.exp(log_ratio_ - log_ratio_.detach())


def clipped_surrogate(ratio: Tensor, adv: Tensor, low, high, dual_clip: float | None) -> Tensor:
    """phi = -min(r A, clip(r, low, high) A), and with dual clip c: min(phi, -c A) where A < 0.

    `low`/`high` are absolute bounds (floats or 0-dim tensors). Inside the bounds both surrogate
    terms are equal and torch.maximum splits the gradient between two identical gradients, so
    the sum is exactly -A dr.
    """
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(min=low, max=high)
    phi = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        phi = torch.where(adv < 0, torch.minimum(phi, -dual_clip * adv), phi)
    return phi


# KL estimators (docs/methods.md §1.10, §00.6): u = ref_logp - logp


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str) -> Tensor:
    u = ref_logp - logp
    if estimator == "k1":
        return -u
    if estimator == "k2":
        return 0.5 * u * u
    if estimator == "k3":
        # expm1(u) - u, not exp(u) - u - 1: near u = 0 the latter loses every digit.
        return torch.expm1(u) - u
    if estimator == "low_var_kl":
        u = u.clamp(-20.0, 20.0)
        return (torch.expm1(u) - u).clamp(-10.0, 10.0)
    raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


# metrics (docs/design.md names; token-weighted over masked-in tokens; detached fp32 scalars)


def ratio_metrics(tl: TokenLoss, adv: Tensor, mask: Tensor) -> dict[str, Tensor]:
    out = {}
    if tl.ratio is None:
        return out
    r = tl.ratio
    if tl.low is not None:
        low = torch.as_tensor(tl.low, dtype=r.dtype, device=r.device)
        high = torch.as_tensor(tl.high, dtype=r.dtype, device=r.device)
        clip_low = ((r < low) & (adv < 0)).to(r.dtype)
        clip_high = ((r > high) & (adv > 0)).to(r.dtype)
        out["clip_ratio/low"] = token_mean(clip_low, mask)
        out["clip_ratio/high"] = token_mean(clip_high, mask)
        out["clip_ratio/region"] = token_mean(clip_low + clip_high, mask)
    out["ratio/mean"] = token_mean(r, mask)
    max_r = torch.where(mask, r, torch.full_like(r, -math.inf)).max() if r.numel() else r.new_zeros(())
    out["ratio/max"] = torch.where(mask.any(), max_r, torch.zeros_like(max_r))
    return out


def finalize_metrics(metrics: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to(torch.float32) for k, v in metrics.items()}
