"""Reward shaping and sampling: DLER's batch-wise normalisation, AWPO's gated mix of outcome and
reasoning rewards, GDPO's decoupled normalisation of several rewards, DAPO's overlong penalty and
dynamic sampling.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from alignops import layout
from alignops._validate import check_choice, check_float, renamed_keywords
from alignops.advantages._common import (_check_finite, _check_nonnegative, _float_tensor, _local_moments,
                                         _rewards, _row_lengths, _same_device, _tensor, _var)
from alignops.advantages.group import _groups, _run_groups, group_stats
from alignops.advantages.token import _WHITEN_RENAMES, _whiten_args
from alignops.distributed import all_reduce_sum, merge_moments

class AWPOAdvantages(NamedTuple):
    advantages: Tensor     # [B]
    gate: Tensor           # [P] w_g in [0, 1)
    difficulty: Tensor     # [P] d_g
    std_ratio: Tensor      # [P] r_g
    clip_low: Tensor       # 0-dim: this batch's PPO clip radius, clip_low (= clip_high: symmetric)

    @property
    def clip_eps(self):
        raise TypeError("AWPOAdvantages has no field 'clip_eps': it is now 'clip_low' (docs/glossary.md)")


class DynamicSampling(NamedTuple):
    group_keep: Tensor     # [P] bool: the group carries signal
    row_keep: Tensor       # [B] bool: the row's group carries signal
    num_kept: Tensor       # 0-dim int64
    kept_fraction: Tensor  # 0-dim float32 (0 for an empty batch); log it as a metric


# --------------------------------------------------------------------------------------------
# DLER, AWPO, DAPO (overlong penalty, dynamic sampling)


def dler_advantages(rewards: Tensor, group_size: int | None = None, *, group_ids: Tensor | None = None,
                    num_groups: int | None = None, mask: Tensor | None = None, lengths: Tensor | None = None,
                    truncated: Tensor | None = None, batch_std_of: str = "centered",
                    stat_weighting: str = "token", std_eps: float = 1e-6, singleton: str = "error",
                    process_group=None, backend: str | None = None, validate_mask: bool | None = None) -> Tensor:
    """DLER batch-wise normalisation (docs/methods.md §00.13): a = R - mean_g (R = 0 where `truncated`),
    A = (a - mean_batch(a)) / (std_batch(X) + std_eps), X = a ("centered", default) or R ("raw",
    TRL's scale_rewards="batch" when rows are weighted equally). stat_weighting="token" counts each
    row once per valid token (needs `mask` [B, T], bool or 0/1, or `lengths` [B], any non-negative
    per-row weights); "row" counts rows. std unbiased; statistics global over `process_group` (one
    all-reduce). Returns `[B]`."""
    check_choice("batch_std_of", batch_std_of, ("centered", "raw"))
    check_choice("stat_weighting", stat_weighting, ("token", "row"))
    std_eps = check_float("std_eps", std_eps, lo=0.0, lo_open=False)
    r = _rewards(rewards)
    if truncated is not None:
        t = _tensor(truncated, "truncated")
        if t.shape != r.shape:
            raise ValueError(f"truncated must be [B]={r.numel()}, got shape {tuple(t.shape)}")
        r = torch.where(t.to(r.device) != 0, torch.where(torch.isnan(r), r, 0.0), r)
    groups = _groups(r.numel(), r.device, group_size, group_ids, num_groups)
    a, _ = _run_groups(r, groups, "center", 0.0, singleton, backend)
    if stat_weighting == "token":
        if (mask is None) == (lengths is None):
            raise ValueError("stat_weighting='token' needs exactly one of mask [B, T] or lengths [B]")
        if mask is not None:
            m = _tensor(mask, "mask")
            if m.dim() != 2 or m.shape[0] != r.numel():
                raise ValueError(f"mask must be [B, T] with B={r.numel()}, got shape {tuple(m.shape)}")
            w = layout.check_mask(m, device=r.device, name="mask", validate=validate_mask,
                                  weights="per-row token counts go in lengths= [B]").sum(-1).double()
        else:
            w = _float_tensor(lengths, "lengths").double()
            if w.shape != r.shape:
                raise ValueError(f"lengths must be [B]={r.numel()}, got shape {tuple(w.shape)}")
            _same_device(w, r.device, "lengths")
            _check_nonnegative(w, "lengths")
    else:
        w = torch.ones(r.numel(), dtype=torch.float64, device=r.device)
    valid = ~torch.isnan(r)
    w = torch.where(valid, w, 0.0)
    ad = a.double()
    x = ad if batch_std_of == "centered" else r.double()
    moments = merge_moments(torch.stack([_local_moments(ad, w), _local_moments(x, w)]), process_group)
    mean_a = moments[0, 1]
    std = _var(moments[1, 0], moments[1, 2], True).sqrt()
    out = (ad - mean_a) / (std + std_eps)
    return torch.where(valid, out, 0.0).to(r.dtype)


@renamed_keywords(clip_eps_min="clip_low_min", clip_eps_max="clip_low_max", eps_std="ratio_eps")
def awpo_advantages(outcome_rewards: Tensor, reasoning_rewards: Tensor, group_size: int | None = None, *,
                    group_ids: Tensor | None = None, num_groups: int | None = None, r_out_max: float = 1.0,
                    eps_mix: float = 0.6, alpha_base: float = 1.0, alpha_prio: float = 1.5,
                    tau_low: float = 0.2, tau_high: float = 0.8, clip_low_min: float = 0.1,
                    clip_low_max: float = 0.2, std_eps: float = 1e-6, ratio_eps: float = 1e-6,
                    singleton: str = "error", process_group=None, backend: str | None = None) -> AWPOAdvantages:
    """AWPO (docs/methods.md §00.12, the survey's equations): R_mix = R_out + R_rsn; A_out, A_mix are
    GRPO-normalised per group; r_g = std_mix / (std_out + std_mix + ratio_eps); gate
    w_g = 1[mean_out < r_out_max] 1[r_g < eps_mix] r_g; difficulty d_g = alpha_base +
    (alpha_prio - alpha_base) 1[tau_low < mean_out < tau_high]; A = d_g ((1 - w_g) A_out + w_g A_mix);
    clip radius clip_low = clip_low_min + (1 - mean over groups of w) (clip_low_max - clip_low_min), the
    mean global over `process_group` (symmetric: pass it as clip_low, clip_high defaults to it). The
    default constants are ours (the paper's are unverified); set them explicitly for a paper reproduction. A row is unscorable if either reward is NaN."""
    for name, val in (("r_out_max", r_out_max), ("alpha_base", alpha_base), ("alpha_prio", alpha_prio),
                      ("tau_low", tau_low)):
        check_float(name, val)
    check_float("tau_high", tau_high, lo=tau_low, lo_open=False)
    eps_mix = check_float("eps_mix", eps_mix, lo=0.0, lo_open=False)
    clip_low_min = check_float("clip_low_min", clip_low_min, lo=0.0, lo_open=False)
    clip_low_max = check_float("clip_low_max", clip_low_max, lo=clip_low_min, lo_open=False)
    std_eps = check_float("std_eps", std_eps, lo=0.0, lo_open=False)
    ratio_eps = check_float("ratio_eps", ratio_eps, lo=0.0, lo_open=False)
    r_out = _rewards(outcome_rewards, "outcome_rewards")
    r_rsn = _same_device(_rewards(reasoning_rewards, "reasoning_rewards"), r_out.device, "reasoning_rewards",
                         "outcome_rewards").to(r_out.dtype)
    if r_rsn.shape != r_out.shape:
        raise ValueError(f"reasoning_rewards shape {tuple(r_rsn.shape)} does not match outcome_rewards "
                         f"{tuple(r_out.shape)}")
    unscorable = torch.isnan(r_out) | torch.isnan(r_rsn)
    r_out = torch.where(unscorable, float("nan"), r_out).contiguous()
    r_mix = (r_out + r_rsn).contiguous()
    groups = _groups(r_out.numel(), r_out.device, group_size, group_ids, num_groups)
    a_out, s_out = _run_groups(r_out, groups, "scale", std_eps, singleton, backend)
    a_mix, s_mix = _run_groups(r_mix, groups, "scale", std_eps, singleton, backend)
    ratio = s_mix.std / (s_out.std + s_mix.std + ratio_eps)
    gate = torch.where((s_out.mean < r_out_max) & (ratio < eps_mix), ratio, 0.0)
    mid = (s_out.mean > tau_low) & (s_out.mean < tau_high)
    difficulty = torch.where(mid, alpha_prio, alpha_base).to(r_out.dtype)
    gi = groups.index
    adv = difficulty[gi] * ((1 - gate[gi]) * a_out + gate[gi] * a_mix)
    present = s_out.count > 0
    sums = torch.stack([torch.where(present, gate, 0.0).sum(dtype=torch.float64),
                        present.sum(dtype=torch.float64)])
    gate_sum, n_groups = all_reduce_sum(sums, process_group)
    mean_gate = gate_sum / n_groups.clamp_min(1)
    clip_low = (clip_low_min + (1 - mean_gate) * (clip_low_max - clip_low_min)).to(r_out.dtype)
    return AWPOAdvantages(adv, gate, difficulty, ratio, clip_low)


@renamed_keywords(**_WHITEN_RENAMES)
def gdpo_advantages(rewards: Tensor, group_size: int | None = None, *, group_ids: Tensor | None = None,
                    num_groups: int | None = None, weights=None, mask: Tensor | None = None,
                    lengths: Tensor | None = None, scale: str = "group", std_eps: float = 1e-6,
                    singleton: str = "error", var: str = "unbiased", var_eps: float = 1e-8,
                    var_eps_mode: str = "add_inside", process_group=None, backend: str | None = None,
                    validate_mask: bool | None = None) -> Tensor:
    """GDPO (docs/methods.md §2.42; verl `gdpo`): every reward component is group-normalised on its
    own, as GRPO (`scale="group"`: (R_k - mean_g) / (std_g + std_eps); "none": R_k - mean_g), the
    results are summed with `weights` [K] (default 1 each), and the sum is whitened over the batch
    like `masked_whiten` (verl's defaults: unbiased variance, rsqrt(var + var_eps)).

    `rewards` is `[B, K]` (one column a reward component) or `[B]` (one component). The whitening is
    token-weighted with `mask` [B, T] or `lengths` [B] (verl's: each row counts once per valid
    token), row-weighted when neither is given; global over `process_group`. A NaN component is left
    out of that component's statistics and adds 0; a row whose components are all NaN is left out
    of the whitening and gets 0. Fewer than two weighted values, or zero spread, centre only.
    Returns `[B]`."""
    check_choice("scale", scale, ("group", "none"))
    std_eps = check_float("std_eps", std_eps, lo=0.0, lo_open=False)
    eps = _whiten_args(var, var_eps, var_eps_mode)
    r = _float_tensor(rewards, "rewards")
    if r.dim() == 1:
        r = r.unsqueeze(-1)
    if r.dim() != 2:
        raise ValueError(f"rewards must be [B, K] (K reward components) or [B], got shape {tuple(r.shape)}")
    b, k = r.shape
    if k == 0:
        raise ValueError("rewards must have at least one component (K >= 1), got shape (B, 0)")
    _check_finite(r, "rewards", allow_nan=True)
    if weights is None:
        w = torch.ones(k, dtype=torch.float64, device=r.device)
    else:
        w = _float_tensor(weights if isinstance(weights, Tensor) else torch.tensor(weights, dtype=torch.float64),
                          "weights").double().to(r.device)
        if w.shape != (k,):
            raise ValueError(f"weights must hold one weight per reward component (K={k}), got shape "
                             f"{tuple(w.shape)}")
        _check_finite(w, "weights", allow_nan=False)
    length = _row_lengths(mask, lengths, b, r.device, validate_mask, required=False)
    groups = _groups(b, r.device, group_size, group_ids, num_groups)
    total = torch.zeros(b, dtype=torch.float64, device=r.device)
    for j in range(k):
        # in float64: the sum is whitened, which would amplify each component's fp32 rounding
        adv, _ = _run_groups(r[:, j].double().contiguous(), groups, "scale" if scale == "group" else "center",
                             std_eps, singleton, backend)
        total = total + w[j] * adv
    scorable = ~torch.isnan(r).all(-1)
    weight = torch.where(scorable, torch.ones_like(total) if length is None else length, 0.0)
    n, mean, m2 = merge_moments(_local_moments(total, weight), process_group)
    v = _var(n, m2, var == "unbiased")
    denom = v + eps if var_eps_mode == "add_inside" else v.clamp_min(eps)
    # N <= 1 or no spread at all (denom 0 needs var_eps = 0): centre only, as masked_whiten's N <= 1
    inv = torch.where((n > 1) & (denom > 0), torch.rsqrt(torch.where(denom > 0, denom, 1.0)), 1.0)
    out = torch.where(scorable, (total - mean) * inv, 0.0)
    return out.to(r.dtype)


def dapo_overlong_penalty(lengths: Tensor, max_length: int, cache_length: int,
                          penalty_factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment, added to the task reward: 0 up to max_length -
    cache_length, then falling linearly to -penalty_factor at max_length, capped there (replayed
    data can exceed max_length; verl leaves it uncapped, OpenRLHF caps). float32 [B]."""
    for name, val in (("max_length", max_length), ("cache_length", cache_length)):
        if isinstance(val, bool) or not isinstance(val, int):
            raise TypeError(f"{name} must be an int, got {type(val).__name__}")
    if not 0 < cache_length <= max_length:
        raise ValueError(f"cache_length must lie in (0, max_length={max_length}], got {cache_length}")
    penalty_factor = check_float("penalty_factor", penalty_factor, lo=0.0, lo_open=False)
    L = _float_tensor(lengths, "lengths").double()
    if L.dim() != 1:
        raise ValueError(f"lengths must be [B], got shape {tuple(L.shape)}")
    excess = (L - (max_length - cache_length)) / cache_length
    return (-penalty_factor * excess.clamp(0, 1)).float()


def dynamic_sampling_mask(rewards: Tensor, group_size: int | None = None, *, group_ids: Tensor | None = None,
                          num_groups: int | None = None, std_eps: float = 1e-6,
                          backend: str | None = None) -> DynamicSampling:
    """Which groups carry learning signal (DAPO / DLER / SRL dynamic sampling): at least two
    scorable rewards with std > std_eps. Groups of equal rewards (all correct, all wrong, all
    truncated) are dropped. Sync-free; the trainer decides how to refill."""
    std_eps = check_float("std_eps", std_eps, lo=0.0, lo_open=False)
    stats = group_stats(rewards, group_size, group_ids=group_ids, num_groups=num_groups, backend=backend)
    keep = (stats.count >= 2) & (stats.std > std_eps)
    num = keep.sum()
    frac = num.float() / max(keep.numel(), 1)
    return DynamicSampling(keep, keep[stats.group_index], num, frac)
