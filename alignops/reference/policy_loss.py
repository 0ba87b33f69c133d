"""Eager per-token math of the policy-loss family, the aggregation modes and the metrics.

Everything here is plain torch on `[tokens]`-shaped tensors (the `[B, T]` layout or the packed
`[N]` layout), float64-capable, differentiable through autograd. alignops.policy_loss wires it to
the method registry and the public API; the formulas are docs/methods.md §1.4-1.12 and §2.

Conventions:
    - `mask` is a bool tensor shaped like the tokens. Every input has already been zeroed at
      masked-out positions (see `sanitize`), so padding can never reach `exp` and produce an
      inf whose zero gradient turns into NaN (0 * inf) in backward.
    - Per-token functions return phi, the loss to minimise per token (docs/methods.md R1), before
      aggregation.
    - Bounds are absolute ratio bounds (c_low < 1 < c_high); PPO's relative knobs become
      (1 - clip_low, 1 + clip_high) in the caller.
"""

from __future__ import annotations

import dataclasses
import math
from decimal import Decimal

import torch
from torch import Tensor

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")

# GSPO's combined sequence log-ratio is clamped above only, at 10, as verl does (docs/methods.md §00.3).
GSPO_LOG_RATIO_MAX = 10.0


# --------------------------------------------------------------------------------------------
# layouts: rows of a [B, T] batch, or rows of a packed [N] batch given by cu_seqlens


class Rows:
    """Row structure of the token tensors: per-row sums and row-to-token broadcasts."""

    def __init__(self, token_shape: torch.Size, device: torch.device, cu_seqlens: Tensor | None = None):
        self.token_shape = token_shape
        self.packed = cu_seqlens is not None
        if self.packed:
            self.offsets = cu_seqlens.to(device=device, dtype=torch.int64)
            self.num_rows = self.offsets.numel() - 1
            n = token_shape[0]
            # token n lies in row i iff offsets[i] <= n < offsets[i+1]: count the row ends <= n.
            self.row_ids = torch.searchsorted(self.offsets[1:], torch.arange(n, device=device), right=True)
        else:
            self.num_rows = token_shape[0]

    def row_sum(self, x: Tensor) -> Tensor:
        if not self.packed:
            return x.sum(-1)
        # segment_reduce, not index_add: index_add uses float atomics on CUDA (non-deterministic).
        return torch.segment_reduce(x, "sum", offsets=self.offsets)

    def to_tokens(self, per_row: Tensor) -> Tensor:
        if not self.packed:
            return per_row.unsqueeze(-1).expand(self.token_shape)
        return per_row.index_select(0, self.row_ids)

    def row_mean(self, x: Tensor, mask: Tensor) -> Tensor:
        """Per-row mean over masked-in tokens; an empty row's mean is 0 (its length is clamped to 1)."""
        lengths = self.row_sum(mask.to(x.dtype))
        return self.row_sum(x) / lengths.clamp(min=1)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 math for every input dtype (docs/methods.md R3), fp64 for fp64 inputs (the oracle)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sanitize(x: Tensor | None, mask: Tensor, dtype: torch.dtype) -> Tensor | None:
    """x in the compute dtype with masked-out positions replaced by 0 (gradient 0 there too)."""
    if x is None:
        return None
    x = x.to(dtype)
    return torch.where(mask, x, torch.zeros((), dtype=dtype, device=x.device))


# --------------------------------------------------------------------------------------------
# ratios


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


# --------------------------------------------------------------------------------------------
# per-token losses: one function per loss family. Each takes a TokenInputs and returns a TokenLoss.


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


def ppo_token_loss(t: TokenInputs) -> TokenLoss:
    """PPO / GRPO / DAPO clipped surrogate, clip-higher and optional dual clip (docs/methods.md §2.1)."""
    ratio = torch.exp(log_ratio(t.logp, t.old_logp, t.ratio_log_clamp))
    low, high = 1.0 - t.clip_low, 1.0 + t.clip_high
    phi = clipped_surrogate(ratio, t.adv, low, high, t.clip_ratio_c)
    return TokenLoss(phi, ratio.detach(), low, high)


def gppo_token_loss(t: TokenInputs, beta1: float, beta2: float) -> TokenLoss:
    """GPPO (docs/methods.md §2.18): clip-higher PPO in value; clipped tokens keep the bounded gradient
    -beta * bound * A through r / sg(r)."""
    d = log_ratio(t.logp, t.old_logp, t.ratio_log_clamp)
    ratio = torch.exp(d)
    one = straight_through_one(d)
    low, high = 1.0 - t.clip_low, 1.0 + t.clip_high
    r = ratio.detach()
    low_clipped = (t.adv < 0) & (r < low)
    high_clipped = (t.adv > 0) & (r > high)
    phi = torch.where(low_clipped, -beta1 * low * one * t.adv,
                      torch.where(high_clipped, -beta2 * high * one * t.adv, -ratio * t.adv))
    if t.clip_ratio_c is not None:
        phi = torch.where(t.adv < 0, torch.minimum(phi, -t.clip_ratio_c * t.adv), phi)
    return TokenLoss(phi, r, low, high)


def cispo_token_loss(t: TokenInputs) -> TokenLoss:
    """CISPO (docs/methods.md §2.17, §00.7): -sg(clip(r, 1 - clip_low, 1 + clip_high)) * A * logp."""
    ratio = torch.exp(log_ratio(t.logp, t.old_logp, t.ratio_log_clamp)).detach()
    low, high = 1.0 - t.clip_low, 1.0 + t.clip_high
    weight = ratio.clamp(low, high)
    return TokenLoss(-weight * t.adv * t.logp, ratio, low, high)


def ecpo_token_loss(t: TokenInputs, delta: float, ratio_level: str) -> TokenLoss:
    """ECPO (docs/methods.md §2.16, §00.8): pi'_old = max(sg(pi) / (1 + eps + delta), pi_old), i.e. the
    log-ratio loses a detached shift max(sg(d) - log(1 + eps + delta), 0), then PPO. eps is the
    upper clip. At sequence level the log-ratio is the row's mean (GSPO's geometric mean)."""
    d = log_ratio(t.logp, t.old_logp, t.ratio_log_clamp)
    if ratio_level == "sequence":
        d = t.rows.to_tokens(t.rows.row_mean(d, t.mask))
    shift = math.log1p(t.clip_high + delta)
    d_early = d - (d.detach() - shift).clamp(min=0)
    ratio = torch.exp(d_early)
    low, high = 1.0 - t.clip_low, 1.0 + t.clip_high
    phi = clipped_surrogate(ratio, t.adv, low, high, t.clip_ratio_c)
    return TokenLoss(phi, ratio.detach(), low, high)


def gspo_token_loss(t: TokenInputs, token_form: bool) -> TokenLoss:
    """GSPO (docs/methods.md §2.11): s_i = exp(mean_t (logp - old_logp)), clamped above at 10 (not the
    +-20 token clamp). The token form s_it = sg(s_i) * exp(logp - sg(logp)) lets token-level
    advantages through and equals GSPO when advantages are constant per row."""
    seq = t.rows.row_mean(t.logp - t.old_logp, t.mask)
    if token_form:
        log_s = t.rows.to_tokens(seq.detach()) + (t.logp - t.logp.detach())
    else:
        log_s = t.rows.to_tokens(seq)
    if t.ratio_log_clamp is not None:
        log_s = log_s.clamp(max=GSPO_LOG_RATIO_MAX)
    ratio = torch.exp(log_s)
    low, high = 1.0 - t.clip_low, 1.0 + t.clip_high
    phi = clipped_surrogate(ratio, t.adv, low, high, t.clip_ratio_c)
    return TokenLoss(phi, ratio.detach(), low, high)


def reinforce_token_loss(t: TokenInputs, scale: Tensor | float = 1.0) -> TokenLoss:
    """REINFORCE / GPG: phi = -scale * A * logp (no ratio, no clip)."""
    ratio = torch.exp(log_ratio(t.logp, t.old_logp, t.ratio_log_clamp)).detach()
    return TokenLoss(-scale * t.adv * t.logp, ratio, None, None)


def bapo_token_loss(t: TokenInputs, c_low: Tensor, c_high: Tensor) -> TokenLoss:
    """BAPO's loss (docs/methods.md §2.19): PPO with absolute bounds chosen by `bapo_search`."""
    ratio = torch.exp(log_ratio(t.logp, t.old_logp, t.ratio_log_clamp))
    phi = clipped_surrogate(ratio, t.adv, c_low.to(ratio.dtype), c_high.to(ratio.dtype), t.clip_ratio_c)
    return TokenLoss(phi, ratio.detach(), c_low, c_high)


# --------------------------------------------------------------------------------------------
# BAPO bound search (no grad, no host sync, one optional all-reduce)


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


# --------------------------------------------------------------------------------------------
# GPG's alpha (docs/methods.md §2.15)


def group_matrix(num_rows: int, group_size: int | None, group_ids: Tensor | None, device) -> Tensor:
    """[B, B] bool: same_group[i, j]."""
    if group_ids is None:
        g = torch.arange(num_rows, device=device) // group_size
    else:
        g = group_ids.to(device)
    return g.unsqueeze(0) == g.unsqueeze(1)


def gpg_alpha(rows: Rows, adv: Tensor, mask: Tensor, *, group_size=None, group_ids=None, rewards=None,
              mode: str = "zero_variance", process_group=None) -> Tensor:
    """alpha = B_g / (B_g - M): groups over groups with a learning signal. A group is invalid
    (zero variance) when its rewards are all equal, or, without rewards, when every advantage of
    its rows is exactly 0 (what group-normalised advantages give a constant-reward group).
    Groups whose rows are all fully masked are not counted at all.
    All groups invalid -> alpha = 0 (the loss is 0 then anyway; the official code divides 0/0).
    mode="verl_nonzero": alpha = B / count_nonzero(rewards), verl's definition."""
    dtype = torch.float64
    device = adv.device
    if mode == "verl_nonzero":
        stats = torch.stack([torch.tensor(float(rewards.numel()), dtype=dtype, device=device),
                             (rewards != 0).sum().to(dtype)])
        if process_group is not None:
            import torch.distributed as dist  # noqa: PLC0415
            dist.all_reduce(stats, group=process_group)
        return stats[0] / stats[1].clamp(min=1)
    same = group_matrix(rows.num_rows, group_size, group_ids, device)
    if rewards is not None:
        r = rewards.to(device=device, dtype=dtype)
        # a group has signal iff some member's reward differs from another member's
        differs = (r.unsqueeze(0) != r.unsqueeze(1)) & same
        row_signal = differs.any(1)
    else:
        nonzero = rows.row_sum(((adv != 0) & mask).to(dtype)) > 0
        row_signal = (same & nonzero.unsqueeze(0)).any(1)
    # Groups made only of fully-masked rows are padding, not groups: counting them would make
    # alpha (and the loss) change when empty rows are appended.
    nonempty = rows.row_sum(mask.to(dtype)) > 0
    real_group = (same & nonempty.unsqueeze(0)).any(1)
    group_size_of_row = same.sum(1).to(dtype)
    # each group counted once: its rows add up 1/size each
    num_groups = (real_group.to(dtype) / group_size_of_row).sum()
    valid_groups = ((row_signal & real_group).to(dtype) / group_size_of_row).sum()
    stats = torch.stack([num_groups, valid_groups]).round()
    if process_group is not None:
        import torch.distributed as dist  # noqa: PLC0415
        dist.all_reduce(stats, group=process_group)
    return torch.where(stats[1] > 0, stats[0] / stats[1].clamp(min=1), torch.zeros_like(stats[0]))


# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# aggregation (docs/methods.md §1.6, §00.2)


def default_normalizer(agg: str, mask: Tensor, rows: Rows, max_len: float | None, dtype) -> Tensor:
    """The aggregation's denominator from this call's own mask; empty rows are never counted."""
    if agg == "token-mean":
        return mask.sum().to(dtype)
    nonempty_rows = (rows.row_sum(mask.to(dtype)) > 0).sum().to(dtype)
    if agg == "seq-mean-token-sum-norm":
        return nonempty_rows * max_len
    return nonempty_rows


def aggregate(x: Tensor, mask: Tensor, rows: Rows, agg: str, normalizer) -> Tensor:
    """Agg(x) = numerator / normalizer; a zero normaliser gives exactly 0 with a zero gradient."""
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    x = torch.where(mask, x, zero)
    if agg == "seq-mean-token-mean":
        lengths = rows.row_sum(mask.to(x.dtype))
        numerator = (rows.row_sum(x) / lengths.clamp(min=1)).sum()
    else:
        numerator = x.sum()
    norm = torch.as_tensor(normalizer, dtype=x.dtype, device=x.device)
    positive = norm > 0
    # divide by a safe denominator first: where() alone would route 0 * (1/0) = NaN into backward
    return torch.where(positive, numerator / torch.where(positive, norm, torch.ones_like(norm)), zero)


# --------------------------------------------------------------------------------------------
# metrics (docs/design.md names; token-weighted over masked-in tokens; detached fp32 scalars)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    return torch.where(mask, x, zero).sum() / mask.sum().clamp(min=1).to(x.dtype)


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
        out["clip_ratio/low"] = masked_mean(clip_low, mask)
        out["clip_ratio/high"] = masked_mean(clip_high, mask)
        out["clip_ratio/region"] = masked_mean(clip_low + clip_high, mask)
    out["ratio/mean"] = masked_mean(r, mask)
    max_r = torch.where(mask, r, torch.full_like(r, -math.inf)).max() if r.numel() else r.new_zeros(())
    out["ratio/max"] = torch.where(mask.any(), max_r, torch.zeros_like(max_r))
    return out


def finalize_metrics(metrics: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to(torch.float32) for k, v in metrics.items()}
