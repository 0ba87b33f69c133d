"""Advantage estimators and normalisation: rewards in, detached advantages out.

Every estimator follows docs/methods.md (section 00 wins): group std unbiased with eps outside the root
(default 1e-6); a group whose scorable rewards are all equal gets advantage exactly 0; singleton
groups raise unless `singleton="zero"|"raw"`; NaN rewards are left out of every statistic and get
advantage 0; whitening is token-weighted with verl semantics by default (unbiased variance,
eps=1e-8 inside the rsqrt) and OpenRLHF's (`var="biased"`, `eps_mode="floor"`) on request; N <= 1
valid tokens centres without scaling.

Layouts: rewards are `[B]` with `group_size=G` (consecutive rows) or `group_ids=[B]` (any
integers; groups are numbered by sorted id, or pass `num_groups=P` with ids in [0, P) to skip the
torch.unique, which synchronises on CUDA). Token-level tensors are `[B, T]` with a mask, or packed
`[N]` with `cu_seqlens=[B+1]` (and an optional `[N]` mask).

Distributed: every function that reduces over the batch takes `process_group` and makes one
collective per call, so every rank gets the global statistics: variances gather each rank's
(count, mean, M2) and merge them through the deviations of the means (a (sum, sum of squares,
count) all-reduce cancels all digits for data like 1000 +- 1e-3); counts are all-reduced.
Group statistics are never reduced: each group must live entirely on one rank.

Outputs are float32 (float64 for float64 inputs), whatever the input precision (R3).

Kernel contract (torch, cpu and triton backends implement it; alignops._backend's registry):

    group_advantages(rewards, order, offsets, mode, std_eps, singleton_raw, adv, count, mean, std)
        rewards [B] fp32/fp64 contiguous, NaN = unscorable; order [B] int64, offsets [P+1] int64:
        the rows of group g are rewards[order[offsets[g]:offsets[g+1]]].
        count/mean/std [P] (rewards' dtype): number of non-NaN rewards, their mean (0 if none),
        their unbiased std, exactly 0 when they are all equal or fewer than two.
        adv [B]: mode 0: R - mean; 1: (R - mean) / (std + std_eps); 2: k/(k-1) (R - mean) (RLOO).
        Exactly 0 for NaN rows and for groups whose std is 0; for a group with one scorable
        reward: R if singleton_raw else 0. Statistics accumulate in float64.
    masked_moments(x, mask, out)
        x [N] fp32/fp64, mask [N] bool, out [3] float64 = (count, mean, M2) over mask, M2 the sum
        of squared deviations from the mean, computed from deviations (never sum of squares).
        Masked-out entries never reach the arithmetic (they may hold NaN).
    whiten_apply(x, mask, stats, shift_back, out)
        stats [2] float64 = (mean, inv_std); out = (x - mean) * inv_std (+ mean if shift_back)
        where mask, 0 elsewhere; arithmetic in float64.
    gae_scan(rewards, values, mask, cu_seqlens, gamma, lam_actor, lam_critic, adv, ret)
        rows [cu_seqlens[b], cu_seqlens[b+1]) of flat [N] tensors; lam_* [B] in rewards' dtype.
        Scans each row backwards over masked-in positions only (masked positions are transparent:
        their reward and value are not read and the recurrence carries across them):
        delta_t = r_t + gamma V_next(t) - V_t, A_t = delta_t + gamma lam A_next(t);
        adv = A with lam_actor; ret = A with lam_critic + V. Both 0 at masked positions.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from alignops import _backend
from alignops.distributed import all_reduce_sum, merge_moments

_MODE = {"center": 0, "scale": 1, "rloo": 2}
_SINGLETON = ("error", "zero", "raw")


class GroupStats(NamedTuple):
    """Per-group statistics of the scorable (non-NaN) rewards; groups are numbered as documented
    in the module docstring and `group_index[i]` is the group of row i."""
    mean: Tensor           # [P]
    std: Tensor            # [P] unbiased; exactly 0 when all rewards are equal or count < 2
    count: Tensor          # [P] int64, number of scorable rewards
    zero_variance: Tensor  # [P] bool: std == 0, no learning signal (DAPO/GPG/SRL filter these)
    group_index: Tensor    # [B] int64


class GroupAdvantages(NamedTuple):
    """What the group estimators return with `return_stats=True`."""
    advantages: Tensor     # [B]
    mean: Tensor
    std: Tensor
    count: Tensor
    zero_variance: Tensor
    group_index: Tensor
    batch_std: Tensor | None = None  # scale="batch": the global std the advantages were divided by
    alpha: Tensor | None = None      # GPG: the global factor alpha the advantages were multiplied by


class AdvantagesReturns(NamedTuple):
    """Token-level estimators: `adv, ret = ...`. Returns are computed before any whitening."""
    advantages: Tensor
    returns: Tensor


class AWPOAdvantages(NamedTuple):
    advantages: Tensor     # [B]
    gate: Tensor           # [P] w_g in [0, 1)
    difficulty: Tensor     # [P] d_g
    std_ratio: Tensor      # [P] r_g
    clip_eps: Tensor       # 0-dim: the PPO clip radius for this batch


class DynamicSampling(NamedTuple):
    group_keep: Tensor     # [P] bool: the group carries signal
    row_keep: Tensor       # [B] bool: the row's group carries signal
    num_kept: Tensor       # 0-dim int64
    kept_fraction: Tensor  # 0-dim float32 (0 for an empty batch); log it as a metric


# --------------------------------------------------------------------------------------------
# argument handling


def _tensor(x, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _float_tensor(x, name: str) -> Tensor:
    """fp32 for bool/int/fp16/bf16/fp32 input, fp64 for fp64 input (statistics never in bf16)."""
    x = _tensor(x, name)
    if x.dtype.is_complex:
        raise TypeError(f"{name} must be real, got {x.dtype}")
    return x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)


def _float_param(value, name: str, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and value > hi:
        raise ValueError(f"{name} must be <= {hi}, got {value}")
    return value


def _choice(value, name: str, options) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")
    return value


# The advantage ops have torch, cpu and triton kernels (no cuda kernel): on CUDA tensors without
# triton the automatic choice is the torch backend, still on the GPU, with a one-time warning
# naming why triton cannot run; a named "cuda" is an error.
_ADVANTAGE_BACKENDS = ("torch", "cpu", "triton")


def _resolve(backend: str | None, device: torch.device) -> str:
    return _backend.resolve_backend(backend, device, supported=_ADVANTAGE_BACKENDS, what="the advantage ops")


def _check_finite(x: Tensor, name: str, allow_nan: bool) -> None:
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return  # a data-dependent check would synchronise the device
    bad = torch.isinf(x) if allow_nan else ~torch.isfinite(x)
    if bool(bad.any()):
        what = "infinite values" if allow_nan else "NaN or infinite values"
        raise ValueError(f"{name} contains {what}" + (" (NaN marks an unscorable reward)" if allow_nan else ""))


class _Groups(NamedTuple):
    index: Tensor     # [B] int64 in [0, P)
    order: Tensor     # [B] int64: rows sorted by group (stable)
    offsets: Tensor   # [P+1] int64
    num_groups: int
    sizes: Tensor     # [P] int64 rows per group (NaN rows included)


def _groups(num_rows: int, device, group_size, group_ids, num_groups) -> _Groups:
    if (group_size is None) == (group_ids is None):
        raise ValueError("give exactly one of group_size (consecutive rows) or group_ids ([B] ints)")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int):
            raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if num_rows % group_size:
            raise ValueError(f"group_size={group_size} does not divide the batch size B={num_rows}")
        p = num_rows // group_size
        rows = torch.arange(num_rows, device=device)
        offsets = torch.arange(p + 1, device=device) * group_size
        return _Groups(rows // group_size, rows, offsets, p,
                       torch.full((p,), group_size, dtype=torch.int64, device=device))
    ids = _tensor(group_ids, "group_ids")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"group_ids must be an integer tensor, got {ids.dtype}")
    if ids.shape != (num_rows,):
        raise ValueError(f"group_ids must have shape ({num_rows},) like the rewards, got {tuple(ids.shape)}")
    if ids.device != torch.device(device):
        raise ValueError(f"group_ids is on {ids.device} but the rewards are on {device}")
    ids = ids.to(torch.int64)
    if num_groups is None:
        _, index = torch.unique(ids, sorted=True, return_inverse=True)
        p = int(index.max()) + 1 if num_rows else 0
    else:
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 0:
            raise ValueError(f"num_groups must be a non-negative int, got {num_groups!r}")
        p, index = num_groups, ids
        if ids.device.type == "cpu" and num_rows and bool(((ids < 0) | (ids >= p)).any()):
            raise ValueError(f"group_ids must lie in [0, num_groups={p}) when num_groups is given")
    sizes = torch.zeros(p, dtype=torch.int64, device=device).index_add_(0, index, torch.ones_like(index))
    offsets = torch.zeros(p + 1, dtype=torch.int64, device=device)
    torch.cumsum(sizes, 0, out=offsets[1:])
    order = torch.argsort(index, stable=True)
    return _Groups(index, order, offsets, p, sizes)


def _rewards(rewards, name="rewards") -> Tensor:
    r = _float_tensor(rewards, name)
    if r.dim() != 1:
        raise ValueError(f"{name} must be a 1-d [B] tensor, got shape {tuple(r.shape)}")
    _check_finite(r, name, allow_nan=True)
    return r.contiguous()


def _run_groups(r: Tensor, groups: _Groups, mode: str, std_eps: float, singleton: str, backend) -> tuple:
    _choice(singleton, "singleton", _SINGLETON)
    p = groups.num_groups
    adv = torch.empty_like(r)
    count = torch.empty(p, dtype=r.dtype, device=r.device)
    mean = torch.empty_like(count)
    std = torch.empty_like(count)
    be = _resolve(backend, r.device)
    _backend.kernel("group_advantages", be)(r, groups.order, groups.offsets, _MODE[mode], std_eps,
                                             singleton == "raw", adv, count, mean, std)
    count = count.to(torch.int64)
    if singleton == "error" and p and bool((count == 1).any()):
        g = int(torch.nonzero(count == 1)[0, 0])
        raise ValueError(f"group {g} has a single scorable reward, so its advantage is undefined; "
                         "pass singleton='zero' (advantage 0) or singleton='raw' (advantage = reward), "
                         "or fix the grouping")
    stats = GroupStats(mean, std, count, std == 0, groups.index)
    return adv, stats


def _with_stats(adv: Tensor, stats: GroupStats, **extra) -> GroupAdvantages:
    return GroupAdvantages(adv, *stats, **extra)


# --------------------------------------------------------------------------------------------
# group estimators


def group_stats(rewards: Tensor, group_size: int | None = None, *, group_ids: Tensor | None = None,
                num_groups: int | None = None, backend: str | None = None) -> GroupStats:
    """Per-group mean, unbiased std, scorable count and zero-variance mask, in one fused pass."""
    r = _rewards(rewards)
    groups = _groups(r.numel(), r.device, group_size, group_ids, num_groups)
    return _run_groups(r, groups, "center", 0.0, "zero", backend)[1]


def grpo_advantages(rewards: Tensor, group_size: int | None = None, *, group_ids: Tensor | None = None,
                    num_groups: int | None = None, scale: str = "group", std_eps: float = 1e-6,
                    singleton: str = "error", process_group=None, return_stats: bool = False,
                    backend: str | None = None):
    """GRPO / Dr.GRPO / Lite-PPO advantages, `[B]`.

    scale="group": (R - mean_g) / (std_g + std_eps) (GRPO; verl `norm_adv_by_std_in_grpo=True`,
    TRL `scale_rewards="group"`); "none": R - mean_g (Dr.GRPO; TRL "none"); "batch": (R - mean_g)
    / (std_batch(R) + std_eps) with the unbiased std of all scorable rewards of the global batch
    (TRL "batch"; reduced over `process_group`). std unbiased, eps outside the root.
    """
    _choice(scale, "scale", ("group", "batch", "none"))
    std_eps = _float_param(std_eps, "std_eps", lo=0.0)
    r = _rewards(rewards)
    groups = _groups(r.numel(), r.device, group_size, group_ids, num_groups)
    adv, stats = _run_groups(r, groups, "scale" if scale == "group" else "center", std_eps, singleton,
                             backend)
    batch_std = None
    if scale == "batch":
        valid = ~torch.isnan(r)
        n, _, m2 = merge_moments(_local_moments(r.double(), valid.double()), process_group)
        batch_std = _var(n, m2, True).sqrt()
        adv = (adv.double() / (batch_std + std_eps)).to(r.dtype)
        batch_std = batch_std.to(r.dtype)
    return _with_stats(adv, stats, batch_std=batch_std) if return_stats else adv


def rloo_advantages(rewards: Tensor, group_size: int | None = None, *, group_ids: Tensor | None = None,
                    num_groups: int | None = None, singleton: str = "error", return_stats: bool = False,
                    backend: str | None = None):
    """RLOO: R_i minus the mean of the other scorable rewards of its group, = k/(k-1) (R_i - mean_g)
    (verl `rloo`, TRL RLOOTrainer, OpenRLHF `rloo`). Advantages of each group sum to 0."""
    r = _rewards(rewards)
    groups = _groups(r.numel(), r.device, group_size, group_ids, num_groups)
    adv, stats = _run_groups(r, groups, "rloo", 0.0, singleton, backend)
    return _with_stats(adv, stats) if return_stats else adv


def gvpo_centered_rewards(rewards: Tensor, group_size: int | None = None, *, group_ids: Tensor | None = None,
                          num_groups: int | None = None, return_stats: bool = False,
                          backend: str | None = None):
    """GVPO's centred rewards R_i - mean_g (the regression target of the centred implicit reward).
    GVPO needs every group to have k >= 2 scorable members, so singletons always raise; the loss's
    1/(k-1) factor is `1 / (stats.count - 1)`."""
    r = _rewards(rewards)
    groups = _groups(r.numel(), r.device, group_size, group_ids, num_groups)
    adv, stats = _run_groups(r, groups, "center", 0.0, "error", backend)
    return _with_stats(adv, stats) if return_stats else adv


def gpg_advantages(rewards: Tensor, group_size: int | None = None, *, group_ids: Tensor | None = None,
                   num_groups: int | None = None, alpha_mode: str = "zero_variance", f_norm: str = "none",
                   std_eps: float = 1e-6, singleton: str = "error", process_group=None,
                   return_stats: bool = False, backend: str | None = None):
    """GPG: alpha * (R - mean_g) / F_norm.

    alpha_mode="zero_variance" (official code): alpha = B_g / (B_g - M), B_g groups with a
    scorable reward, M of them with zero variance; all groups invalid -> alpha = 0 (loss 0).
    alpha_mode="verl_nonzero" (verl's `gpg`): alpha = B / max(#rows with non-zero reward, 1).
    f_norm="none" (F_norm = 1) or "std" (F_norm = std_g + std_eps). Counts are global over
    `process_group` (one all-reduce).
    """
    _choice(alpha_mode, "alpha_mode", ("zero_variance", "verl_nonzero"))
    _choice(f_norm, "f_norm", ("none", "std"))
    std_eps = _float_param(std_eps, "std_eps", lo=0.0)
    r = _rewards(rewards)
    groups = _groups(r.numel(), r.device, group_size, group_ids, num_groups)
    adv, stats = _run_groups(r, groups, "scale" if f_norm == "std" else "center", std_eps, singleton, backend)
    if alpha_mode == "zero_variance":
        present = stats.count > 0
        counts = torch.stack([present.sum(dtype=torch.float64),
                              (present & stats.zero_variance).sum(dtype=torch.float64)])
    else:
        counts = torch.stack([torch.tensor(float(r.numel()), dtype=torch.float64, device=r.device),
                              ((r != 0) & ~torch.isnan(r)).sum(dtype=torch.float64)])
    total, other = all_reduce_sum(counts, process_group)
    if alpha_mode == "zero_variance":
        valid_groups = total - other
        alpha = torch.where(valid_groups > 0, total / valid_groups.clamp_min(1), 0.0)
    else:
        alpha = total / other.clamp_min(1)
    adv = (adv.double() * alpha).to(r.dtype)
    alpha = alpha.to(r.dtype)
    return _with_stats(adv, stats, alpha=alpha) if return_stats else adv


def seed_grpo_advantages(rewards: Tensor, semantic_entropy: Tensor, group_size: int | None = None, *,
                         alpha: float, group_ids: Tensor | None = None, num_groups: int | None = None,
                         base: str = "mean", std_eps: float = 1e-6, singleton: str = "error",
                         backend: str | None = None) -> Tensor:
    """SEED-GRPO: A_i * max(0, 1 - alpha * SE_g / log G_g), G_g the rows of the group (scale 1 when
    G_g = 1). base="mean": A = R - mean_g (the paper's Dr.GRPO base); "std": GRPO's A.
    `semantic_entropy` is `[P]` (per group) or `[B]` (per row, equal within a group); get it from
    clusters of answers with `semantic_entropy(...)`. `alpha` has no verified default: required."""
    alpha = _float_param(alpha, "alpha", lo=0.0)
    _choice(base, "base", ("mean", "std"))
    std_eps = _float_param(std_eps, "std_eps", lo=0.0)
    r = _rewards(rewards)
    groups = _groups(r.numel(), r.device, group_size, group_ids, num_groups)
    se = _float_tensor(semantic_entropy, "semantic_entropy").to(r.dtype)
    if se.shape == (groups.num_groups,):
        se_rows = se[groups.index]
    elif se.shape == (r.numel(),):
        se_rows = se
    else:
        raise ValueError(f"semantic_entropy must be [P]={groups.num_groups} (per group) or [B]={r.numel()} "
                         f"(per row), got shape {tuple(se.shape)}")
    _check_finite(se_rows, "semantic_entropy", allow_nan=False)
    adv, _ = _run_groups(r, groups, "scale" if base == "std" else "center", std_eps, singleton, backend)
    size = groups.sizes[groups.index].to(r.dtype)
    se_max = torch.log(size.clamp_min(1))
    factor = torch.where(size > 1, (1 - alpha * se_rows / torch.where(size > 1, se_max, 1.0)).clamp_min(0),
                         1.0)
    return adv * factor


def semantic_entropy(cluster_ids: Tensor, group_size: int | None = None, *, group_ids: Tensor | None = None,
                     num_groups: int | None = None) -> Tensor:
    """Count-based semantic entropy per group, `[P]`: -sum_k p_k log p_k, p_k = |C_k| / G, where rows
    of a group with equal `cluster_ids` [B] share a meaning (e.g. the same extracted answer; give an
    unparseable answer its own id). float32."""
    c = _tensor(cluster_ids, "cluster_ids")
    if c.dim() != 1:
        raise ValueError(f"cluster_ids must be [B], got shape {tuple(c.shape)}")
    if c.dtype.is_floating_point or c.dtype.is_complex or c.dtype == torch.bool:
        raise TypeError(f"cluster_ids must be an integer tensor, got {c.dtype}")
    b = c.numel()
    groups = _groups(b, c.device, group_size, group_ids, num_groups)
    out = torch.zeros(groups.num_groups, dtype=torch.float32, device=c.device)
    if b == 0:
        return out
    _, cluster = torch.unique(c, return_inverse=True)
    key = groups.index * b + cluster
    uniq, counts = torch.unique(key, return_counts=True)
    g = uniq // b
    p = counts.double() / groups.sizes[g].double()
    return out.index_add_(0, g, (-p * torch.log(p)).float())


def dynamic_sampling_mask(rewards: Tensor, group_size: int | None = None, *, group_ids: Tensor | None = None,
                          num_groups: int | None = None, std_eps: float = 1e-6,
                          backend: str | None = None) -> DynamicSampling:
    """Which groups carry learning signal (DAPO / DLER / SRL dynamic sampling): at least two
    scorable rewards with std > std_eps. Groups of equal rewards (all correct, all wrong, all
    truncated) are dropped. Sync-free; the trainer decides how to refill."""
    std_eps = _float_param(std_eps, "std_eps", lo=0.0)
    stats = group_stats(rewards, group_size, group_ids=group_ids, num_groups=num_groups, backend=backend)
    keep = (stats.count >= 2) & (stats.std > std_eps)
    num = keep.sum()
    frac = num.float() / max(keep.numel(), 1)
    return DynamicSampling(keep, keep[stats.group_index], num, frac)


def remax_advantages(rewards: Tensor, greedy_rewards: Tensor, mask: Tensor | None = None) -> Tensor:
    """ReMax: reward minus the reward of the greedy decode of the same prompt (verl `remax`).
    `[B]` rewards give `[B]`; token rewards `[B, T]` with `mask` give the return-to-go minus the
    baseline at every valid token (0 elsewhere), like verl."""
    r = _float_tensor(rewards, "rewards")
    b = _float_tensor(greedy_rewards, "greedy_rewards").to(r.dtype)
    if b.dim() != 1 or b.shape[0] != r.shape[0]:
        raise ValueError(f"greedy_rewards must be [B] with B={r.shape[0]}, got shape {tuple(b.shape)}")
    _check_finite(b, "greedy_rewards", allow_nan=False)
    if r.dim() == 1:
        if mask is not None:
            raise ValueError("mask is only used with token-level [B, T] rewards")
        return r - b
    if r.dim() != 2:
        raise ValueError(f"rewards must be [B] or [B, T], got shape {tuple(r.shape)}")
    m = _mask(mask, r.shape, r.device)
    rz = torch.where(m, r, 0.0)
    returns = rz.flip(-1).cumsum(-1).flip(-1)
    return torch.where(m, returns - b.unsqueeze(-1), 0.0)


# --------------------------------------------------------------------------------------------
# token layout


def _mask(mask, shape, device) -> Tensor:
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    mask = _tensor(mask, "mask")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match {tuple(shape)}")
    if mask.device != torch.device(device):
        raise ValueError(f"mask is on {mask.device} but the data is on {device}")
    if mask.dtype.is_floating_point and mask.device.type == "cpu" and not torch.compiler.is_compiling():
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("mask must hold only 0 and 1")
    return mask if mask.dtype == torch.bool else mask != 0


class _Tokens(NamedTuple):
    shape: tuple
    mask: Tensor        # [N] bool contiguous
    cu_seqlens: Tensor  # [B+1] int64
    num_rows: int


def _tokens(x: Tensor, mask, cu_seqlens, name: str) -> _Tokens:
    if cu_seqlens is None:
        if x.dim() != 2:
            raise ValueError(f"{name} must be [B, T] (or packed [N] with cu_seqlens), got shape {tuple(x.shape)}")
        b, t = x.shape
        m = _mask(mask, x.shape, x.device).reshape(-1).contiguous()
        cu = torch.arange(b + 1, device=x.device, dtype=torch.int64) * t
        return _Tokens(tuple(x.shape), m, cu, b)
    cu = _tensor(cu_seqlens, "cu_seqlens")
    if x.dim() != 1:
        raise ValueError(f"{name} must be packed [N] when cu_seqlens is given, got shape {tuple(x.shape)}")
    if cu.dim() != 1 or cu.numel() < 1 or cu.dtype.is_floating_point or cu.dtype == torch.bool:
        raise ValueError("cu_seqlens must be a 1-d integer tensor [B+1]")
    if cu.device != x.device:
        raise ValueError(f"cu_seqlens is on {cu.device} but {name} is on {x.device}")
    cu = cu.to(torch.int64).contiguous()
    if cu.device.type == "cpu":
        if int(cu[0]) != 0 or int(cu[-1]) != x.numel() or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at N={x.numel()}")
    m = _mask(mask, x.shape, x.device).contiguous()
    return _Tokens(tuple(x.shape), m, cu, cu.numel() - 1)


def _row_of_token(tok: _Tokens) -> Tensor:
    n = tok.mask.numel()
    return torch.searchsorted(tok.cu_seqlens[1:], torch.arange(n, device=tok.mask.device), right=True)


def _row_lengths(tok: _Tokens) -> Tensor:
    rows = _row_of_token(tok)
    return torch.zeros(tok.num_rows, dtype=torch.int64, device=rows.device).index_add_(
        0, rows, tok.mask.to(torch.int64))


def _same(x, like: Tensor, name: str) -> Tensor:
    x = _float_tensor(x, name)
    if x.shape != like.shape:
        raise ValueError(f"{name} shape {tuple(x.shape)} does not match {tuple(like.shape)}")
    if x.device != like.device:
        raise ValueError(f"{name} is on {x.device} but the other inputs are on {like.device}")
    return x


# --------------------------------------------------------------------------------------------
# masked statistics and whitening


def _moments(x: Tensor, mask: Tensor, process_group, backend) -> Tensor:
    """(count, mean, M2) over mask, global over process_group."""
    out = torch.empty(3, dtype=torch.float64, device=x.device)
    _backend.kernel("masked_moments", _resolve(backend, x.device))(x, mask, out)
    return merge_moments(out, process_group)


def _local_moments(x: Tensor, w: Tensor) -> Tensor:
    """Weighted (total weight, mean, M2) of float64 x, two passes; rows with w = 0 are ignored
    even when x holds NaN there."""
    used = w > 0
    x = torch.where(used, x, 0.0)
    n = w.sum()
    mean = (w * x).sum() / n.clamp_min(1)
    dev = torch.where(used, x - mean, 0.0)
    return torch.stack([n, mean, (w * dev * dev).sum()])


def _flat_float(x, mask, name) -> tuple[Tensor, Tensor]:
    x = _float_tensor(x, name)
    m = _mask(mask, x.shape, x.device)
    return x.reshape(-1).contiguous(), m.reshape(-1).contiguous()


def masked_mean(x: Tensor, mask: Tensor | None = None, dim: int | None = None, *, process_group=None,
                backend: str | None = None) -> Tensor:
    """Mean of x over mask (global over `process_group` when dim is None). Empty selections give 0,
    not NaN (verl divides by count + 1e-8; this is exact instead)."""
    if dim is not None:
        if process_group is not None:
            raise ValueError("process_group reduces the whole batch; it cannot be combined with dim")
        xf = _float_tensor(x, "x")
        m = _mask(mask, xf.shape, xf.device)
        s = torch.where(m, xf, 0.0).sum(dim)
        return s / m.sum(dim).clamp_min(1).to(xf.dtype)
    xf, m = _flat_float(x, mask, "x")
    return _moments(xf, m, process_group, backend)[1].to(xf.dtype)


def masked_var(x: Tensor, mask: Tensor | None = None, *, unbiased: bool = True, process_group=None,
               backend: str | None = None) -> Tensor:
    """Variance of x over mask (global over `process_group`); unbiased (x N/(N-1), verl) or biased
    (OpenRLHF). Fewer than two values (one for biased) give 0."""
    xf, m = _flat_float(x, mask, "x")
    n, _, m2 = _moments(xf, m, process_group, backend)
    return _var(n, m2, unbiased).to(xf.dtype)


def _var(n: Tensor, m2: Tensor, unbiased: bool) -> Tensor:
    denom = (n - 1) if unbiased else n
    return torch.where(denom > 0, m2 / denom.clamp_min(1e-300), 0.0)


def _whiten_flat(x: Tensor, m: Tensor, shift_mean: bool, var: str, eps: float, eps_mode: str,
                 process_group, backend) -> Tensor:
    n, mean, m2 = _moments(x, m, process_group, backend)
    v = _var(n, m2, var == "unbiased")
    inv = torch.rsqrt(v + eps) if eps_mode == "add_inside" else torch.rsqrt(v.clamp_min(eps))
    # N <= 1: centre only (verl raises here; a finite answer is the contract).
    inv = torch.where(n > 1, inv, 1.0)
    stats = torch.stack([mean, inv]).contiguous()
    out = torch.empty_like(x)
    _backend.kernel("whiten_apply", _resolve(backend, x.device))(x, m, stats, not shift_mean, out)
    return out


def _whiten_args(var, eps, eps_mode):
    _choice(var, "var", ("unbiased", "biased"))
    _choice(eps_mode, "eps_mode", ("add_inside", "floor"))
    return _float_param(eps, "eps", lo=0.0)


def masked_whiten(x: Tensor, mask: Tensor | None = None, shift_mean: bool = True, *, var: str = "unbiased",
                  eps: float = 1e-8, eps_mode: str = "add_inside", process_group=None,
                  backend: str | None = None) -> Tensor:
    """(x - mean) / std over the masked-in entries of the whole (global) batch, token-weighted.

    Defaults are verl's `masked_whiten` (unbiased variance, rsqrt(var + eps)); `var="biased",
    eps_mode="floor"` is OpenRLHF's (rsqrt(max(var, eps))). `shift_mean=False` adds the mean back.
    Masked-out entries come back as 0. With N <= 1 valid entries the values are centred only.
    Works on any shape (a packed [N] tensor is just a 1-d x). One fused statistics pass, one
    all-reduce of (sum, sum of squares, count) when `process_group` is given, one apply pass.
    """
    eps = _whiten_args(var, eps, eps_mode)
    xf = _float_tensor(x, "x")
    xflat, m = _flat_float(xf, mask, "x")
    return _whiten_flat(xflat, m, shift_mean, var, eps, eps_mode, process_group, backend).view(xf.shape)


# --------------------------------------------------------------------------------------------
# token-level estimators


def _lam_tensor(lam, rows: int, dtype, device, name: str) -> Tensor:
    if isinstance(lam, Tensor):
        lt = _float_tensor(lam, name).to(dtype)
        if lt.shape != (rows,):
            raise ValueError(f"{name} must be a float or a [B]={rows} tensor, got shape {tuple(lt.shape)}")
        if lt.device != torch.device(device):
            raise ValueError(f"{name} is on {lt.device} but the rewards are on {device}")
        if lt.device.type == "cpu" and bool(((lt < 0) | (lt > 1) | torch.isnan(lt)).any()):
            raise ValueError(f"{name} values must lie in [0, 1]")
        return lt.contiguous()
    value = _float_param(lam, name, lo=0.0, hi=1.0)
    return torch.full((rows,), value, dtype=dtype, device=device)


def _gae_flat(r: Tensor, v: Tensor, tok: _Tokens, gamma: float, lam, critic_lam, backend):
    lam_a = _lam_tensor(lam, tok.num_rows, r.dtype, r.device, "lam")
    lam_c = lam_a if critic_lam is None else _lam_tensor(critic_lam, tok.num_rows, r.dtype, r.device,
                                                         "critic_lam")
    rf, vf = r.reshape(-1).contiguous(), v.reshape(-1).contiguous()
    adv, ret = torch.empty_like(rf), torch.empty_like(rf)
    _backend.kernel("gae_scan", _resolve(backend, r.device))(rf, vf, tok.mask, tok.cu_seqlens, gamma,
                                                              lam_a, lam_c, adv, ret)
    return adv, ret


def gae_advantages(token_rewards: Tensor, values: Tensor, mask: Tensor | None = None, gamma: float = 1.0,
                   lam=0.95, *, critic_lam=None, cu_seqlens: Tensor | None = None, whiten: bool = False,
                   var: str = "unbiased", eps: float = 1e-8, eps_mode: str = "add_inside",
                   process_group=None, backend: str | None = None) -> AdvantagesReturns:
    """GAE with masked positions transparent to the scan (verl `gae`; PPO, VC-PPO, VAPO, ORZ).

    `lam` is the actor's lambda (a float or a per-row [B] tensor, e.g. `vapo_lambda(...)`);
    `critic_lam` (default: lam) is the lambda of the value targets (VC-PPO's decoupled GAE uses
    1.0). Returns (advantages, returns); returns = GAE(critic_lam) + V, computed before any
    whitening. `whiten=True` whitens the advantages over the global batch like `masked_whiten`.
    Masked positions get 0 in both outputs and their rewards/values are never read.
    """
    r = _float_tensor(token_rewards, "token_rewards")
    v = _same(values, r, "values")
    dtype = torch.float64 if torch.float64 in (r.dtype, v.dtype) else torch.float32
    r, v = r.to(dtype), v.to(dtype)
    gamma = _float_param(gamma, "gamma", lo=0.0, hi=1.0)
    eps = _whiten_args(var, eps, eps_mode)
    tok = _tokens(r, mask, cu_seqlens, "token_rewards")
    adv, ret = _gae_flat(r, v, tok, gamma, lam, critic_lam, backend)
    if whiten:
        adv = _whiten_flat(adv, tok.mask, True, var, eps, eps_mode, process_group, backend)
    return AdvantagesReturns(adv.view(tok.shape), ret.view(tok.shape))


def vapo_lambda(lengths: Tensor, alpha: float = 0.05) -> Tensor:
    """VAPO's length-adaptive actor lambda per row: clamp(1 - 1/(alpha L), 0, 1) (negative for
    L < 1/alpha without the clamp). `lengths` [B] (e.g. mask.sum(-1)). float32."""
    alpha = _float_param(alpha, "alpha", lo=0.0, lo_open=True)
    lengths = _float_tensor(lengths, "lengths")
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be [B], got shape {tuple(lengths.shape)}")
    lam = 1 - 1 / (alpha * lengths.clamp_min(0))
    return torch.nan_to_num(lam, neginf=0.0).clamp(0, 1)


def k1_penalty(old_logp: Tensor, ref_logp: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-token k1 KL estimate for KL-in-reward, old_logp - ref_logp, 0 at masked positions
    (verl `apply_kl_penalty` with kl_penalty="kl", OpenRLHF `compute_approx_kl` k1). Detached."""
    old = _float_tensor(old_logp, "old_logp").detach()
    ref = _same(ref_logp, old, "ref_logp").detach()
    m = _mask(mask, old.shape, old.device)
    return torch.where(m, old - ref, 0.0)


def token_level_rewards(scores: Tensor, mask: Tensor | None = None, *, cu_seqlens: Tensor | None = None,
                        shape=None, kl: Tensor | None = None, kl_coef: float = 0.0) -> Tensor:
    """Token rewards r_t = score * 1[t = last valid token of the row] - kl_coef * kl_t (valid t).

    Layout: `mask` [B, T] (or `shape=(B, T)` for an all-valid batch), or packed with `cu_seqlens`
    (and an optional [N] mask, or `shape=(N,)`). Rows without valid tokens drop their score.
    """
    s = _rewards(scores, "scores")
    if kl is not None:
        like = _float_tensor(kl, "kl")
    elif mask is not None:
        like = torch.empty(_tensor(mask, "mask").shape, dtype=s.dtype, device=s.device)
    elif shape is not None:
        like = torch.empty(tuple(shape), dtype=s.dtype, device=s.device)
    else:
        raise ValueError("token_level_rewards needs the token layout: mask, kl or shape")
    tok = _tokens(like, mask, cu_seqlens, "kl" if kl is not None else "mask")
    if tok.num_rows != s.numel():
        raise ValueError(f"scores has {s.numel()} rows but the token layout has {tok.num_rows}")
    return _token_rewards_flat(s, tok, None if kl is None else like.to(s.dtype).reshape(-1),
                               _float_param(kl_coef, "kl_coef")).view(tok.shape)


def _token_rewards_flat(s: Tensor, tok: _Tokens, kl_flat: Tensor | None, kl_coef: float) -> Tensor:
    n = tok.mask.numel()
    rows = _row_of_token(tok)
    pos = torch.arange(n, device=s.device)
    last = torch.full((tok.num_rows,), -1, dtype=torch.int64, device=s.device).scatter_reduce(
        0, rows, torch.where(tok.mask, pos, -1), "amax")
    out = torch.zeros(n, dtype=s.dtype, device=s.device)
    has = last >= 0
    out.index_put_((last.clamp_min(0),), torch.where(has, s, 0.0), accumulate=True)
    if kl_flat is not None and kl_coef != 0.0:
        out = out - kl_coef * torch.where(tok.mask, kl_flat, 0.0)
    return torch.where(tok.mask, out, 0.0)


def kl_penalized_scores(scores: Tensor, old_logp: Tensor, ref_logp: Tensor, mask: Tensor | None = None, *,
                        kl_coef: float, cu_seqlens: Tensor | None = None) -> Tensor:
    """TRL RLOO's sequence-level KL in the reward: R - kl_coef * sum_t mask * (old_logp - ref_logp)."""
    s = _rewards(scores, "scores")
    kl = k1_penalty(old_logp, ref_logp, mask)
    tok = _tokens(kl, mask, cu_seqlens, "old_logp")
    if tok.num_rows != s.numel():
        raise ValueError(f"scores has {s.numel()} rows but the token layout has {tok.num_rows}")
    per_row = torch.zeros(tok.num_rows, dtype=torch.float64, device=s.device).index_add_(
        0, _row_of_token(tok), kl.reshape(-1).double())
    return (s.double() - _float_param(kl_coef, "kl_coef") * per_row).to(s.dtype)


def _reinforce_pp(scores: Tensor, mask, cu_seqlens, old_logp, ref_logp, kl_coef, gamma, var, eps,
                  eps_mode, process_group, backend, shape) -> AdvantagesReturns:
    kl_coef = _float_param(kl_coef, "kl_coef", lo=0.0)
    gamma = _float_param(gamma, "gamma", lo=0.0, hi=1.0)
    eps = _whiten_args(var, eps, eps_mode)
    if (old_logp is None) != (ref_logp is None):
        raise ValueError("give both old_logp and ref_logp for the KL-in-reward term, or neither")
    if old_logp is not None:
        kl = k1_penalty(old_logp, ref_logp, mask).to(scores.dtype)
        like = kl
    else:
        kl = None
        if mask is not None:
            like = torch.empty(_tensor(mask, "mask").shape, dtype=scores.dtype, device=scores.device)
        elif shape is not None:
            like = torch.empty(tuple(shape), dtype=scores.dtype, device=scores.device)
        else:
            raise ValueError("give mask (or shape, or old_logp/ref_logp) for the token layout")
    tok = _tokens(like, mask, cu_seqlens, "mask")
    if tok.num_rows != scores.numel():
        raise ValueError(f"scores has {scores.numel()} rows but the token layout has {tok.num_rows}")
    r = _token_rewards_flat(scores, tok, None if kl is None else kl.reshape(-1), kl_coef)
    # Returns are GAE with V = 0 and lambda = 1: G_t = r_t + gamma G_next(t), masked positions skipped.
    _, returns = _gae_flat(r, torch.zeros_like(r), tok, gamma, 1.0, None, backend)
    adv = _whiten_flat(returns, tok.mask, True, var, eps, eps_mode, process_group, backend)
    return AdvantagesReturns(adv.view(tok.shape), returns.view(tok.shape))


def reinforce_pp_advantages(scores: Tensor, mask: Tensor | None = None, *, cu_seqlens: Tensor | None = None,
                            shape=None, old_logp: Tensor | None = None, ref_logp: Tensor | None = None,
                            kl_coef: float = 0.0, gamma: float = 1.0, var: str = "unbiased", eps: float = 1e-8,
                            eps_mode: str = "add_inside", process_group=None,
                            backend: str | None = None) -> AdvantagesReturns:
    """REINFORCE++ (verl `reinforce_plus_plus`, OpenRLHF `reinforce`): token rewards = score on
    the last valid token - kl_coef * k1(old_logp, ref_logp); discounted returns over valid tokens;
    advantages = returns whitened over all valid tokens of the global batch (verl semantics by
    default; `var="biased", eps_mode="floor"` for OpenRLHF). NaN scores are not allowed here."""
    s = _rewards(scores, "scores")
    _check_finite(s, "scores", allow_nan=False)
    return _reinforce_pp(s, mask, cu_seqlens, old_logp, ref_logp, kl_coef, gamma, var, eps, eps_mode,
                         process_group, backend, shape)


def reinforce_pp_baseline_advantages(scores: Tensor, mask: Tensor | None = None, group_size: int | None = None,
                                     *, group_ids: Tensor | None = None, num_groups: int | None = None,
                                     cu_seqlens: Tensor | None = None, shape=None,
                                     old_logp: Tensor | None = None, ref_logp: Tensor | None = None,
                                     kl_coef: float = 0.0, singleton: str = "error", var: str = "unbiased",
                                     eps: float = 1e-8, eps_mode: str = "add_inside", process_group=None,
                                     backend: str | None = None) -> AdvantagesReturns:
    """REINFORCE++-baseline (verl `reinforce_plus_plus_baseline`, OpenRLHF `reinforce_baseline`):
    R - mean_g as the score (no std), optional k1 KL in the reward, gamma = 1, then global
    token-level whitening. NaN scores get 0 before whitening (they are left out of mean_g)."""
    s = _rewards(scores, "scores")
    groups = _groups(s.numel(), s.device, group_size, group_ids, num_groups)
    centered, _ = _run_groups(s, groups, "center", 0.0, singleton, backend)
    return _reinforce_pp(centered, mask, cu_seqlens, old_logp, ref_logp, kl_coef, 1.0, var, eps, eps_mode,
                         process_group, backend, shape)


# --------------------------------------------------------------------------------------------
# DLER, AWPO, DAPO


def dler_advantages(rewards: Tensor, group_size: int | None = None, *, group_ids: Tensor | None = None,
                    num_groups: int | None = None, mask: Tensor | None = None, lengths: Tensor | None = None,
                    truncated: Tensor | None = None, batch_std_of: str = "centered",
                    stat_weighting: str = "token", std_eps: float = 1e-6, singleton: str = "error",
                    process_group=None, backend: str | None = None) -> Tensor:
    """DLER batch-wise normalisation (docs/methods.md §00.13): a = R - mean_g (R = 0 where `truncated`),
    A = (a - mean_batch(a)) / (std_batch(X) + std_eps), X = a ("centered", default) or R ("raw",
    TRL's scale_rewards="batch" when rows are weighted equally). stat_weighting="token" counts each
    row once per valid token (needs `mask` [B, T] or `lengths` [B]); "row" counts rows. std
    unbiased; statistics global over `process_group` (one all-reduce). Returns `[B]`."""
    _choice(batch_std_of, "batch_std_of", ("centered", "raw"))
    _choice(stat_weighting, "stat_weighting", ("token", "row"))
    std_eps = _float_param(std_eps, "std_eps", lo=0.0)
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
            w = (m != 0).sum(-1).double()
        else:
            w = _float_tensor(lengths, "lengths").double()
            if w.shape != r.shape:
                raise ValueError(f"lengths must be [B]={r.numel()}, got shape {tuple(w.shape)}")
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


def awpo_advantages(outcome_rewards: Tensor, reasoning_rewards: Tensor, group_size: int | None = None, *,
                    group_ids: Tensor | None = None, num_groups: int | None = None, r_out_max: float = 1.0,
                    eps_mix: float = 0.6, alpha_base: float = 1.0, alpha_prio: float = 1.5,
                    tau_low: float = 0.2, tau_high: float = 0.8, clip_eps_min: float = 0.1,
                    clip_eps_max: float = 0.2, std_eps: float = 1e-6, eps_std: float = 1e-6,
                    singleton: str = "error", process_group=None, backend: str | None = None) -> AWPOAdvantages:
    """AWPO (docs/methods.md §00.12, the survey's equations): R_mix = R_out + R_rsn; A_out, A_mix are
    GRPO-normalised per group; r_g = std_mix / (std_out + std_mix + eps_std); gate
    w_g = 1[mean_out < r_out_max] 1[r_g < eps_mix] r_g; difficulty d_g = alpha_base +
    (alpha_prio - alpha_base) 1[tau_low < mean_out < tau_high]; A = d_g ((1 - w_g) A_out + w_g A_mix);
    clip radius eps = clip_eps_min + (1 - mean over groups of w) (clip_eps_max - clip_eps_min), the
    mean global over `process_group`. The default constants are ours (the paper's are unverified);
    set them explicitly for a paper reproduction. A row is unscorable if either reward is NaN."""
    for name, val in (("r_out_max", r_out_max), ("alpha_base", alpha_base), ("alpha_prio", alpha_prio),
                      ("tau_low", tau_low), ("tau_high", tau_high)):
        _float_param(val, name)
    eps_mix = _float_param(eps_mix, "eps_mix", lo=0.0)
    clip_eps_min = _float_param(clip_eps_min, "clip_eps_min", lo=0.0)
    clip_eps_max = _float_param(clip_eps_max, "clip_eps_max", lo=clip_eps_min)
    std_eps = _float_param(std_eps, "std_eps", lo=0.0)
    eps_std = _float_param(eps_std, "eps_std", lo=0.0)
    r_out = _rewards(outcome_rewards, "outcome_rewards")
    r_rsn = _rewards(reasoning_rewards, "reasoning_rewards").to(r_out.dtype)
    if r_rsn.shape != r_out.shape:
        raise ValueError(f"reasoning_rewards shape {tuple(r_rsn.shape)} does not match outcome_rewards "
                         f"{tuple(r_out.shape)}")
    unscorable = torch.isnan(r_out) | torch.isnan(r_rsn)
    r_out = torch.where(unscorable, float("nan"), r_out).contiguous()
    r_mix = (r_out + r_rsn).contiguous()
    groups = _groups(r_out.numel(), r_out.device, group_size, group_ids, num_groups)
    a_out, s_out = _run_groups(r_out, groups, "scale", std_eps, singleton, backend)
    a_mix, s_mix = _run_groups(r_mix, groups, "scale", std_eps, singleton, backend)
    ratio = s_mix.std / (s_out.std + s_mix.std + eps_std)
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
    clip_eps = (clip_eps_min + (1 - mean_gate) * (clip_eps_max - clip_eps_min)).to(r_out.dtype)
    return AWPOAdvantages(adv, gate, difficulty, ratio, clip_eps)


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
    penalty_factor = _float_param(penalty_factor, "penalty_factor", lo=0.0)
    L = _float_tensor(lengths, "lengths").double()
    excess = (L - (max_length - cache_length)) / cache_length
    return (-penalty_factor * excess.clamp(0, 1)).float()


# --------------------------------------------------------------------------------------------
# KL controllers


class FixedKLController:
    """Constant KL coefficient (verl `kl_ctrl.type=fixed`)."""

    def __init__(self, kl_coef: float):
        self.value = _float_param(kl_coef, "kl_coef", lo=0.0)

    def update(self, current_kl=None, n_steps: int = 1) -> float:
        return self.value


class AdaptiveKLController:
    """Ziegler et al.'s adaptive KL coefficient (verl `kl_ctrl.type=adaptive`, docs/methods.md §1.10):
    value *= 1 + clip(KL / target_kl - 1, -0.2, 0.2) * n_steps / horizon.

    `current_kl` is the batch KL (a float or a 0-dim tensor; a tensor is read once, which
    synchronises). In data-parallel training pass the global mean so every rank stays identical.
    """

    def __init__(self, init_kl_coef: float, target_kl: float, horizon: int):
        self.value = _float_param(init_kl_coef, "init_kl_coef", lo=0.0)
        self.target = _float_param(target_kl, "target_kl", lo=0.0, lo_open=True)
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon <= 0:
            raise ValueError(f"horizon must be a positive int, got {horizon!r}")
        self.horizon = horizon

    def update(self, current_kl, n_steps: int) -> float:
        if isinstance(current_kl, Tensor):
            current_kl = float(current_kl.detach().reshape(()))
        current_kl = _float_param(current_kl, "current_kl")
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 0:
            raise ValueError(f"n_steps must be a non-negative int, got {n_steps!r}")
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


__all__ = [
    "GroupStats", "GroupAdvantages", "AdvantagesReturns", "AWPOAdvantages", "DynamicSampling",
    "group_stats", "grpo_advantages", "rloo_advantages", "gvpo_centered_rewards", "gpg_advantages",
    "seed_grpo_advantages", "semantic_entropy", "dynamic_sampling_mask", "remax_advantages",
    "masked_mean", "masked_var", "masked_whiten", "gae_advantages", "vapo_lambda", "k1_penalty",
    "token_level_rewards", "kl_penalized_scores", "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages", "dler_advantages", "awpo_advantages", "dapo_overlong_penalty",
    "FixedKLController", "AdaptiveKLController",
]
