"""Group estimators: statistics of the rollouts of one prompt (GRPO, RLOO, GVPO, GPG, SEED-GRPO,
ReMax, OPO, GRPO pass@k) and the group machinery the other families build on.

Groups are `group_size=G` consecutive rows or `group_ids=[B]` (see alignops.advantages); the
statistics come from the `group_advantages` kernel in one pass with no Python loop over groups.
Group statistics are never reduced over ranks: a group lives on one rank.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from alignops import _backend, layout
from alignops._validate import check_choice, check_float
from alignops.advantages._common import (_check_finite, _float_tensor, _local_moments, _resolve, _rewards,
                                         _row_lengths, _same_device, _tensor, _var)
from alignops.distributed import all_reduce_sum, merge_moments

_MODE = {"center": 0, "scale": 1, "rloo": 2}
_SINGLETON = ("error", "zero", "raw")


class GroupStats(NamedTuple):
    """Per-group statistics of the scorable (non-NaN) rewards; groups are numbered as documented
    in the alignops.advantages docstring and `group_index[i]` is the group of row i."""
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


# --------------------------------------------------------------------------------------------
# group machinery (also used by the token-level and shaping estimators)


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


def _run_groups(r: Tensor, groups: _Groups, mode: str, std_eps: float, singleton: str, backend) -> tuple:
    check_choice("singleton", singleton, _SINGLETON)
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
    check_choice("scale", scale, ("group", "batch", "none"))
    std_eps = check_float("std_eps", std_eps, lo=0.0, lo_open=False)
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
    check_choice("alpha_mode", alpha_mode, ("zero_variance", "verl_nonzero"))
    check_choice("f_norm", f_norm, ("none", "std"))
    std_eps = check_float("std_eps", std_eps, lo=0.0, lo_open=False)
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


def opo_advantages(rewards: Tensor, group_size: int | None = None, *, group_ids: Tensor | None = None,
                   num_groups: int | None = None, mask: Tensor | None = None, lengths: Tensor | None = None,
                   singleton: str = "error", backend: str | None = None,
                   validate_mask: bool | None = None) -> Tensor:
    """OPO (docs/methods.md §2.40; verl `opo`): R_i - b_g with the length-weighted baseline
    b_g = sum_j L_j R_j / sum_j L_j over the group's scorable rows, L the rows' token counts
    (`mask` [B, T] summed, or `lengths` [B]). Equal rewards give exactly 0; a group whose scorable
    rows have no tokens at all takes the plain mean; NaN rewards are left out and get 0; a group
    with one scorable reward follows `singleton` (verl: "raw", A = R). Returns `[B]`."""
    r = _rewards(rewards)
    groups = _groups(r.numel(), r.device, group_size, group_ids, num_groups)
    length = _row_lengths(mask, lengths, r.numel(), r.device, validate_mask, required=True)
    centered, stats = _run_groups(r, groups, "center", 0.0, singleton, backend)
    g = groups.index
    valid = ~torch.isnan(r)
    rd = torch.where(valid, r.double(), 0.0)
    w = torch.where(valid, length, 0.0)
    zeros = torch.zeros(groups.num_groups, dtype=torch.float64, device=r.device)
    num = zeros.index_add(0, g, w * rd)
    den = zeros.index_add(0, g, w)
    plain = zeros.index_add(0, g, rd) / stats.count.clamp_min(1)  # float64, where no scorable row has a token
    baseline = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), plain)
    adv = torch.where(valid & ~stats.zero_variance[g], rd - baseline[g], 0.0)
    adv = torch.where(stats.count[g] == 1, centered.double(), adv)
    return adv.to(r.dtype)


def grpo_passk_advantages(rewards: Tensor, group_size: int | None = None, *, group_ids: Tensor | None = None,
                          num_groups: int | None = None, scale: str = "group", std_eps: float = 1e-6,
                          singleton: str = "error", backend: str | None = None) -> Tensor:
    """GRPO pass@k with k = the group size (docs/methods.md §2.41; verl `grpo_passk`): the
    leave-one-out advantage of max_j R_j, A_i = max_j R_j - max_{j != i} R_j. Only a group's
    unique best row gets a non-zero advantage, R_max - R_second; a tied maximum gives 0 to all.
    scale="group" divides by std_g + std_eps (unbiased std of the group's scorable rewards, verl
    `norm_adv_by_std_in_grpo=True`), "none" does not. NaN rewards are left out and get 0; a group
    with one scorable reward follows `singleton` (verl raises). Returns `[B]`."""
    check_choice("scale", scale, ("group", "none"))
    std_eps = check_float("std_eps", std_eps, lo=0.0, lo_open=False)
    r = _rewards(rewards)
    groups = _groups(r.numel(), r.device, group_size, group_ids, num_groups)
    centered, stats = _run_groups(r, groups, "center", 0.0, singleton, backend)
    g, p = groups.index, groups.num_groups
    valid = ~torch.isnan(r)
    x = torch.where(valid, r.double(), -torch.inf)
    lowest = torch.full((p,), -torch.inf, dtype=torch.float64, device=r.device)
    top = lowest.scatter_reduce(0, g, x, "amax")
    is_top = valid & (x == top[g])
    n_top = torch.zeros(p, dtype=torch.int64, device=r.device).index_add_(0, g, is_top.long())
    second = lowest.scatter_reduce(0, g, torch.where(is_top, -torch.inf, x), "amax")
    best = is_top & (n_top[g] == 1) & (stats.count[g] >= 2)  # then `second` is a finite reward
    adv = torch.where(best, top[g] - torch.where(best, second[g], 0.0), 0.0)
    if scale == "group":  # adv != 0 only where the group's rewards differ, so std_g > 0 there
        adv = torch.where(adv != 0, adv / (stats.std.double()[g] + std_eps), 0.0)
    adv = torch.where(stats.count[g] == 1, centered.double(), adv)
    return adv.to(r.dtype)


def seed_grpo_advantages(rewards: Tensor, semantic_entropy: Tensor, group_size: int | None = None, *,
                         alpha: float, group_ids: Tensor | None = None, num_groups: int | None = None,
                         base: str = "mean", std_eps: float = 1e-6, singleton: str = "error",
                         backend: str | None = None) -> Tensor:
    """SEED-GRPO: A_i * max(0, 1 - alpha * SE_g / log G_g), G_g the rows of the group (scale 1 when
    G_g = 1). base="mean": A = R - mean_g (the paper's Dr.GRPO base); "std": GRPO's A.
    `semantic_entropy` is `[P]` (per group) or `[B]` (per row, equal within a group); get it from
    clusters of answers with `semantic_entropy(...)`. `alpha` has no verified default: required."""
    alpha = check_float("alpha", alpha, lo=0.0, lo_open=False)
    check_choice("base", base, ("mean", "std"))
    std_eps = check_float("std_eps", std_eps, lo=0.0, lo_open=False)
    r = _rewards(rewards)
    groups = _groups(r.numel(), r.device, group_size, group_ids, num_groups)
    se = _same_device(_float_tensor(semantic_entropy, "semantic_entropy"), r.device, "semantic_entropy").to(r.dtype)
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


def remax_advantages(rewards: Tensor, greedy_rewards: Tensor, mask: Tensor | None = None, *,
                     validate_mask: bool | None = None) -> Tensor:
    """ReMax: reward minus the reward of the greedy decode of the same prompt (verl `remax`).
    `[B]` rewards give `[B]`; token rewards `[B, T]` with `mask` give the return-to-go minus the
    baseline at every valid token (0 elsewhere), like verl."""
    r = _float_tensor(rewards, "rewards")
    b = _same_device(_float_tensor(greedy_rewards, "greedy_rewards"), r.device, "greedy_rewards").to(r.dtype)
    if b.dim() != 1 or b.shape[0] != r.shape[0]:
        raise ValueError(f"greedy_rewards must be [B] with B={r.shape[0]}, got shape {tuple(b.shape)}")
    _check_finite(b, "greedy_rewards", allow_nan=False)
    if r.dim() == 1:
        if mask is not None:
            raise ValueError("mask is only used with token-level [B, T] rewards")
        return r - b
    if r.dim() != 2:
        raise ValueError(f"rewards must be [B] or [B, T], got shape {tuple(r.shape)}")
    m = layout.token_mask(mask, r.shape, r.device, validate=validate_mask)
    rz = torch.where(m, r, 0.0)
    returns = rz.flip(-1).cumsum(-1).flip(-1)
    return torch.where(m, returns - b.unsqueeze(-1), 0.0)
