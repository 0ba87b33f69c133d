"""value_loss: the PPO family's clipped critic loss (docs/methods.md §2.1)."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from alignops import layout
from alignops._validate import check_float, renamed_keywords
from alignops.policy.math import finalize_metrics


@dataclasses.dataclass
class ValueLossOutput:
    """`loss`: scalar tensor with autograd. `metrics`: detached fp32 scalar tensors (vf_loss, vf_clipfrac,
    vpred_mean, explained_variance; no host sync)."""
    loss: Tensor
    metrics: dict[str, Tensor]


@renamed_keywords(clip_range="cliprange_value")
def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor | None = None, *,
               cliprange_value: float | None = 0.5, agg: str = "token-mean", normalizer=None,
               max_len: int | None = None, cu_seqlens: Tensor | None = None,
               validate_mask: bool | None = None) -> ValueLossOutput:
    """PPO's clipped value loss (docs/methods.md §2.1):

        L_V = 1/2 Agg( max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2) )

    `values` `[B, T]` (or packed `[N]`) with autograd; `old_values` (rollout-time values) and
    `returns` (the GAE targets, computed before whitening) detached, same shape. `cliprange_value`
    (the value clip c, TRL's and verl's name) None disables the clipped branch (plain 1/2 MSE).
    Aggregation and normaliser as in
    `policy_loss` (verl aggregates the critic with the actor's mode). Masked positions never
    reach the arithmetic. Metrics: vf_loss, vf_clipfrac (share of valid tokens where the clipped
    branch is the larger), vpred_mean, explained_variance. `mask` is bool or 0/1 (any other value is
    an error, checked on CPU tensors, and on GPU ones with `validate_mask=True`; there are no
    per-token weights)."""
    if not isinstance(values, Tensor) or not values.dtype.is_floating_point:
        raise TypeError("values must be a floating-point torch.Tensor")
    if cu_seqlens is None and values.dim() != 2:
        raise ValueError(f"values must be [B, T] (or packed [N] with cu_seqlens), got shape {tuple(values.shape)}")
    if cu_seqlens is not None:
        if values.dim() != 1:
            raise ValueError(f"with cu_seqlens, values must be packed [N], got shape {tuple(values.shape)}")
        cu_seqlens = layout.check_cu_seqlens(cu_seqlens, values.shape[0], values.device)
    for name, x in (("old_values", old_values), ("returns", returns)):
        if x is None:
            raise ValueError(f"{name} is required")
        layout.check_like(name, x, values)
    clip = check_float("cliprange_value", cliprange_value, lo=0.0, allow_none=True)
    layout.check_agg(agg)
    if agg == "seq-mean-token-sum-norm" and normalizer is None and max_len is None:
        raise ValueError("agg='seq-mean-token-sum-norm' needs max_len or an explicit normalizer")
    mask = layout.token_mask(mask, values.shape, values.device, validate=validate_mask,
                             weights="value_loss takes no per-token weights")
    rows = layout.Rows(values.shape, values.device, cu_seqlens)
    dtype = layout.compute_dtype(values.dtype)
    v = layout.sanitize(values, mask, dtype)
    v_old = layout.sanitize(old_values.detach(), mask, dtype)
    ret = layout.sanitize(returns.detach(), mask, dtype)
    unclipped = (v - ret).square()
    if clip is None:
        per_token = unclipped
        clipped_wins = torch.zeros_like(mask)
    else:
        clipped = (v_old + (v - v_old).clamp(-clip, clip) - ret).square()
        per_token = torch.maximum(unclipped, clipped)
        clipped_wins = clipped > unclipped
    norm = layout.check_normalizer(normalizer, values.device)
    if norm is None:
        norm = layout.default_normalizer(agg, mask, rows, max_len, dtype)
    loss = 0.5 * layout.aggregate(per_token, mask, rows, agg, norm)
    with torch.no_grad():
        ret_var = layout.token_mean((ret - layout.token_mean(ret, mask)).square(), mask)
        res_var = layout.token_mean((ret - v - layout.token_mean(ret - v, mask)).square(), mask)
        explained = torch.where(ret_var > 0, 1 - res_var / ret_var.clamp_min(1e-12), torch.zeros_like(ret_var))
        metrics = {"vf_loss": loss.detach(), "vf_clipfrac": layout.token_mean(clipped_wins.to(dtype), mask),
                   "vpred_mean": layout.token_mean(v.detach(), mask), "explained_variance": explained}
    return ValueLossOutput(loss, finalize_metrics(metrics))
