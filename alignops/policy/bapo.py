"""BAPO's bound search (docs/methods.md §2.19): no grad, no host sync, one optional all-reduce."""

from __future__ import annotations

import math
from decimal import Decimal

import torch
from torch import Tensor


def step_candidates(start: float, stop: float, step: float, *, clamp_last: bool) -> list[float]:
    """start + n*step for n = 0, 1, ... while <= stop, from an integer counter and exact decimal
    arithmetic, so bounds never drift (0.6 + 15 * 0.02 is 0.9, not 0.8999999999999999).
    With clamp_last, a last step that would pass `stop` lands on it (the official BAPO code)."""
    a, b, d = Decimal(repr(float(start))), Decimal(repr(float(stop))), Decimal(repr(float(step)))
    values = []
    n = 0
    while a + n * d <= b:
        values.append(float(a + n * d))
        n += 1
    if clamp_last and values[-1] < float(b):
        values.append(float(b))
    return values


def _sorted_prefix(keys: Tensor, weights: list[Tensor]):
    """Keys sorted ascending and, for each weight, the prefix sums in that order (with a leading 0)."""
    order = torch.argsort(keys, stable=True)
    sorted_keys = keys.index_select(0, order)
    sums = [torch.nn.functional.pad(torch.cumsum(w.index_select(0, order), 0), (1, 0)) for w in weights]
    return sorted_keys, sums


def bapo_candidate_sums(ratio: Tensor, adv: Tensor, mask: Tensor, lows: list[float], highs: list[float],
                        mode: str) -> tuple[Tensor, Tensor]:
    """(S+ for every upper candidate, S- for every lower candidate), float64.

    paper:          S+(c) = sum_{A>0, r<=c} r|A|,            S-(c) = sum_{A<0, r>=c} r|A|
    official_code:  S+(c) = sum_{A>=0} min(r, c) A,          S-(c) = sum_{A<0} max(r, c) |A|
    One sort per sign and prefix sums answer every candidate in O(N log N).
    """
    r = ratio.detach().reshape(-1)
    a = adv.detach().reshape(-1).to(torch.float64)
    m = mask.reshape(-1)
    inf = torch.tensor(math.inf, dtype=r.dtype, device=r.device)
    zero = torch.zeros((), dtype=torch.float64, device=r.device)
    r64 = r.to(torch.float64)
    pos, neg = m & (a > 0), m & (a < 0)
    highs_t = torch.tensor(highs, dtype=torch.float64).to(dtype=r.dtype, device=r.device)
    lows_t = torch.tensor(lows, dtype=torch.float64).to(dtype=r.dtype, device=r.device)

    pos_keys, (pos_ra, pos_a) = _sorted_prefix(torch.where(pos, r, inf),
                                               [torch.where(pos, r64 * a, zero), torch.where(pos, a, zero)])
    neg_keys, (neg_ra, neg_a) = _sorted_prefix(torch.where(neg, r, inf),
                                               [torch.where(neg, -r64 * a, zero), torch.where(neg, -a, zero)])
    n_pos_le = torch.searchsorted(pos_keys, highs_t, right=True)     # positives with r <= c_high
    n_neg_lt = torch.searchsorted(neg_keys, lows_t, right=False)     # negatives with r < c_low
    if mode == "paper":
        s_plus = pos_ra.index_select(0, n_pos_le)
        s_minus = neg_ra[-1] - neg_ra.index_select(0, n_neg_lt)
    else:
        highs64, lows64 = highs_t.to(torch.float64), lows_t.to(torch.float64)
        s_plus = pos_ra.index_select(0, n_pos_le) + highs64 * (pos_a[-1] - pos_a.index_select(0, n_pos_le))
        s_minus = (neg_ra[-1] - neg_ra.index_select(0, n_neg_lt)) + lows64 * neg_a.index_select(0, n_neg_lt)
    return s_plus, s_minus


def bapo_search(ratio: Tensor, adv: Tensor, mask: Tensor, *, mode: str, target: float,
                low_range: tuple[float, float], high_range: tuple[float, float], low_step: float,
                high_step: float, eps: float = 1e-8, process_group=None) -> tuple[Tensor, Tensor, Tensor]:
    """BAPO's bound search (docs/methods.md §2.19) on detached ratios. Returns 0-dim tensors
    (c_low, c_high, rho) without a host sync; rho is the positive share (paper) or the
    positive/negative ratio (official_code) at the chosen bounds.

    The search's candidate sequence is fixed in advance, so every candidate's sums are computed at
    once and the first candidate that meets the target is picked (the last one if none does):
        paper:          raise c_high by high_step up to high_range[1], then c_low by low_step,
                        while c_low + low_step <= low_range[1];
        official_code:  raise c_low (the last step clamped to low_range[1]), then c_high.
    With a process_group the sums are all-reduced first, so every rank picks the same bounds.
    """
    if mode == "paper":
        highs = step_candidates(high_range[0], high_range[1], high_step, clamp_last=False)
        lows = step_candidates(low_range[0], low_range[1], low_step, clamp_last=False)
        k_high, k_low = len(highs) - 1, len(lows) - 1
        # The loop only runs while c_low can still take a step (Algorithm 1's condition).
        seq = [(0, 0)] if k_low == 0 else (
            [(0, h) for h in range(k_high + 1)] + [(lo, k_high) for lo in range(1, k_low + 1)])
    else:
        highs = step_candidates(high_range[0], high_range[1], high_step, clamp_last=True)
        lows = step_candidates(low_range[0], low_range[1], low_step, clamp_last=True)
        seq = [(lo, 0) for lo in range(len(lows))] + [(len(lows) - 1, h) for h in range(1, len(highs))]

    s_plus, s_minus = bapo_candidate_sums(ratio, adv, mask, lows, highs, mode)
    signal = (mask & (adv != 0)).sum().to(torch.float64).reshape(1)
    if process_group is not None:
        import torch.distributed as dist  # noqa: PLC0415
        packed = torch.cat([s_plus, s_minus, signal])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=process_group)
        s_plus, s_minus, signal = packed[:len(highs)], packed[len(highs):-1], packed[-1:]

    device = s_plus.device
    lo_idx = torch.tensor([lo for lo, _ in seq], device=device)
    hi_idx = torch.tensor([h for _, h in seq], device=device)
    sp, sm = s_plus.index_select(0, hi_idx), s_minus.index_select(0, lo_idx)
    if mode == "paper":
        total = sp + sm
        rho = torch.where(total > 0, sp / torch.where(total > 0, total, torch.ones_like(total)),
                          torch.zeros_like(total))
    else:
        rho = torch.where(sm > 0, sp / (sm + eps), torch.full_like(sm, math.inf))
    meets = rho >= target
    first = torch.argmax(meets.to(torch.int8))
    chosen = torch.where(meets.any(), first, torch.full_like(first, len(seq) - 1))
    # No token with a non-zero advantage: the share is undefined, keep the starting bounds.
    chosen = torch.where(signal[0] > 0, chosen, torch.zeros_like(chosen))
    lows_t = torch.tensor(lows, dtype=torch.float64, device=device)
    highs_t = torch.tensor(highs, dtype=torch.float64, device=device)
    c_low = lows_t.index_select(0, lo_idx.index_select(0, chosen.reshape(1))).reshape(())
    c_high = highs_t.index_select(0, hi_idx.index_select(0, chosen.reshape(1))).reshape(())
    return c_low, c_high, rho.index_select(0, chosen.reshape(1)).reshape(())
