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


# verl's kl_loss_type names -> the alignops estimator that computes the same value and gradient
# (verl computes "k3" as the clamped k3, alignops's low_var_kl; the trainer's --kl_loss_type and the
# verl plugin both translate through this).
VERL_KL_LOSS_TYPES = {"kl": "k1", "k1": "k1", "mse": "k2", "k2": "k2", "mse+": "k2", "k2+": "k2",
                      "k3": "low_var_kl", "low_var_kl": "low_var_kl"}
_VERL_KL_UNSUPPORTED = {
    "abs": "verl's |logp - ref_logp|, which alignops does not compute",
    "full": "verl's full-vocabulary KL, which verl itself does not implement (NotImplementedError)",
}


def kl_estimator_from_verl(kl_loss_type) -> str:
    """The alignops kl_estimator that computes what verl's `kl_loss_type` computes (value and
    gradient); a ValueError naming the value for the ones alignops has no estimator for."""
    if not isinstance(kl_loss_type, str):
        raise TypeError(f"kl_loss_type must be one of verl's names (a str), got {kl_loss_type!r}")
    if kl_loss_type in VERL_KL_LOSS_TYPES:
        return VERL_KL_LOSS_TYPES[kl_loss_type]
    known = sorted(VERL_KL_LOSS_TYPES)
    base = kl_loss_type[:-1] if kl_loss_type.endswith("+") else None
    if base in ("kl", "k1", "k3", "low_var_kl", "abs"):
        raise ValueError(f"kl_loss_type={kl_loss_type!r} is verl's straight-through estimator (the value of "
                         f"{base!r}, the gradient of k2), which alignops has no estimator for; the verl names alignops "
                         f"computes: {known} (k3 and low_var_kl both mean the clamped k3, alignops's low_var_kl)")
    if kl_loss_type in _VERL_KL_UNSUPPORTED:
        raise ValueError(f"kl_loss_type={kl_loss_type!r} is {_VERL_KL_UNSUPPORTED[kl_loss_type]}; the verl "
                         f"names alignops computes: {known}")
    raise ValueError(f"kl_loss_type={kl_loss_type!r} is not one of verl's KL names that alignops computes: "
                     f"{known} (kl_estimator takes alignops's own names: k1, k2, k3 exact, low_var_kl)")
