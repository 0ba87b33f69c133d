"""Eager torch implementations of the advantage kernels (the `torch` backend).

Each function implements the kernel contract written in alignops/advantages/__init__.py, with the
same arguments and caller-allocated outputs as the C++ and Triton kernels, using vectorised torch
ops only (scatter/index ops, no Python loop over groups or rows). Statistics are accumulated in
float64 whatever the input dtype, as the fused kernels do.
"""

from __future__ import annotations

import torch
from torch import Tensor

MODE_CENTER, MODE_SCALE, MODE_RLOO = 0, 1, 2


def group_advantages(rewards: Tensor, order: Tensor, offsets: Tensor, mode: int, std_eps: float,
                     singleton_raw: bool, adv: Tensor, count: Tensor, mean: Tensor, std: Tensor) -> None:
    num_groups = offsets.numel() - 1
    n = rewards.numel()
    if n == 0:
        for t in (count, mean, std):
            t.zero_()
        return
    sizes = offsets[1:] - offsets[:-1]
    group_of_sorted = torch.repeat_interleave(torch.arange(num_groups, device=rewards.device), sizes,
                                              output_size=n)
    group = torch.empty_like(group_of_sorted)
    group[order] = group_of_sorted

    r = rewards.to(torch.float64)
    valid = ~torch.isnan(r)
    r0 = torch.where(valid, r, torch.zeros_like(r))
    zeros = torch.zeros(num_groups, dtype=torch.float64, device=r.device)
    cnt = zeros.index_add(0, group, valid.to(torch.float64))
    mu = zeros.index_add(0, group, r0) / cnt.clamp_min(1)
    dev = torch.where(valid, r - mu[group], torch.zeros_like(r))
    # Corrected two-pass (Chan, Golub & LeVeque): the deviations' own mean `corr`, without which the
    # centred rewards of [1000, 1000, 1000, 1000 + 1e-6] sum to ~1e-13, scaled by 1 / (std + eps) to 1e-7.
    dsum = zeros.index_add(0, group, dev)
    corr = dsum / cnt.clamp_min(1)
    m2 = (zeros.index_add(0, group, dev * dev) - dsum * corr).clamp_min(0)
    inf = torch.full_like(zeros, float("inf"))
    lo = inf.scatter_reduce(0, group, torch.where(valid, r, inf[0]), "amin")
    hi = (-inf).scatter_reduce(0, group, torch.where(valid, r, -inf[0]), "amax")
    # All scorable rewards equal: the spread is exactly zero, so the advantages are exactly zero
    # (a two-pass mean of [0.1, 0.1, 0.1] leaves deviations of ~1e-17 that eps would not hide).
    flat = (lo == hi) | (cnt <= 1)
    corr = torch.where(flat, zeros, corr)
    sd = torch.where(flat, zeros, torch.sqrt(m2 / (cnt - 1).clamp_min(1)))

    k = cnt[group]
    centered = torch.where(flat[group], torch.zeros_like(r), (r - mu[group]) - corr[group])
    if mode == MODE_SCALE:
        a = centered / (sd[group] + std_eps)
    elif mode == MODE_RLOO:
        a = centered * k / (k - 1).clamp_min(1)
    else:
        a = centered
    single = k == 1
    a = torch.where(single, r0 if singleton_raw else torch.zeros_like(r), a)
    a = torch.where(valid, a, torch.zeros_like(r))
    adv.copy_(a)
    count.copy_(cnt)
    mean.copy_(mu + corr)
    std.copy_(sd)


def masked_moments(x: Tensor, mask: Tensor, out: Tensor) -> None:
    """out[0:3] = (count, mean, M2 = sum of squared deviations from the mean) over mask, float64,
    two passes. Masked-out entries may hold anything (NaN, inf): they are selected away."""
    xd = x.to(torch.float64)
    zero = torch.zeros((), dtype=torch.float64, device=x.device)
    n = mask.sum(dtype=torch.float64)
    mean = torch.where(mask, xd, zero).sum() / n.clamp_min(1)
    dev = torch.where(mask, xd - mean, zero)
    out[0] = n
    out[1] = mean
    out[2] = (dev * dev).sum()


def whiten_apply(x: Tensor, mask: Tensor, stats: Tensor, shift_back: bool, out: Tensor) -> None:
    """out = (x - mean) * inv_std (+ mean when shift_back) where mask, else 0; stats = (mean, inv_std)."""
    mean, inv_std = stats[0], stats[1]
    y = (x.to(torch.float64) - mean) * inv_std
    if shift_back:
        y = y + mean
    out.copy_(torch.where(mask, y, torch.zeros_like(y)))


def gae_scan(rewards: Tensor, values: Tensor, mask: Tensor, cu_seqlens: Tensor, gamma: float,
             lam_actor: Tensor, lam_critic: Tensor, adv: Tensor, ret: Tensor) -> None:
    """Backward GAE scan per row [cu_seqlens[b], cu_seqlens[b+1]) over masked-in positions only.

    Vectorised over rows: the rows are laid out padded [B, Tmax] and scanned from the end, one
    time step per iteration (the eager path trainers use); masked positions carry the running
    values across.
    """
    n = rewards.numel()
    num_rows = cu_seqlens.numel() - 1
    if n == 0 or num_rows == 0:
        adv.zero_()
        ret.zero_()
        return
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    t_max = int(lengths.max())
    pos = torch.arange(t_max, device=rewards.device)
    in_row = pos.unsqueeze(0) < lengths.unsqueeze(1)
    idx = (cu_seqlens[:-1].unsqueeze(1) + pos.unsqueeze(0)).clamp_max(max(n - 1, 0))
    f64 = torch.float64
    m = mask[idx] & in_row
    r = torch.where(m, rewards[idx].to(f64), 0.0)
    v = torch.where(m, values[idx].to(f64), 0.0)
    gl_a = gamma * lam_actor.to(f64)
    gl_c = gamma * lam_critic.to(f64)
    next_value = torch.zeros(num_rows, dtype=f64, device=r.device)
    run_a = torch.zeros_like(next_value)
    run_c = torch.zeros_like(next_value)
    out_a = torch.zeros_like(r)
    out_c = torch.zeros_like(r)
    for t in range(t_max - 1, -1, -1):
        mt = m[:, t]
        delta = r[:, t] + gamma * next_value - v[:, t]
        run_a = torch.where(mt, delta + gl_a * run_a, run_a)
        run_c = torch.where(mt, delta + gl_c * run_c, run_c)
        next_value = torch.where(mt, v[:, t], next_value)
        out_a[:, t] = torch.where(mt, run_a, 0.0)
        out_c[:, t] = torch.where(mt, run_c + v[:, t], 0.0)
    adv.copy_(out_a[in_row])
    ret.copy_(out_c[in_row])
