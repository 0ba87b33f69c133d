"""rollout_correction: importance weights and rejection masks for the mismatch between the inference
engine's log-probs and the trainer's (docs/methods.md §1.15).

    rc = ao.rollout_correction(old_logp, rollout_logp, mask, level="token", threshold=2.0)
    out = ao.policy_loss(logp, old_logp, adv, rc.mask, rollout_is_weights=rc.rollout_is_weights)

or, equivalently, inside the loss: `ao.policy_loss(logp, old_logp, adv, mask, rollout_logp=rollout_logp,
rollout_correction={"level": "token", "threshold": 2.0})`.

With delta_t = old_logp_t - rollout_logp_t (log pi_train / pi_rollout, 0 outside the mask):

    level="token"      log w_t = delta_t
    level="sequence"   log w_t = S_i = sum_t m_t delta_t          (the product of the row's ratios)
    level="geometric"  log w_t = S_i / L_i                          (their geometric mean; 0 for an empty row)
    raw = exp(clamp(log w, -ratio_log_clamp, ratio_log_clamp))      (log-space first: no overflow)
    mode="truncate"    w = clamp(raw, low, high)                     (TIS; verl's float threshold, TRL's *_truncate)
    mode="mask"        w = raw * 1[low <= raw <= high]               (verl's IcePop, TRL's *_mask)

and `rejection={criterion: threshold}` removes tokens or whole rows from the mask by verl's divergence
criteria (token_k*, seq_sum_k*, seq_mean_k*, seq_max_k*; all must pass). Everything is fp32 (fp64 for
fp64 inputs), detached, without a host synchronisation; empty rows and a fully masked batch give
finite values (weights 0, metrics 0). The metrics carry verl's names (`rollout_corr/...`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch
from torch import Tensor

from alignops import layout
from alignops._validate import check_bool, check_choice, check_float, is_number
from alignops.distributed import all_reduce_sum

LEVELS = ("token", "sequence", "geometric")
MODES = ("truncate", "mask")
REJECTION_CRITERIA = ("token_k1", "token_k2", "token_k3", "seq_sum_k1", "seq_sum_k2", "seq_sum_k3",
                      "seq_mean_k1", "seq_mean_k2", "seq_mean_k3", "seq_max_k2", "seq_max_k3")
# The keywords of rollout_correction that the policy losses take in their `rollout_correction=` dict.
OPTION_NAMES = ("level", "mode", "threshold", "rejection", "batch_normalize", "ratio_log_clamp", "process_group")
PREFIX = "rollout_corr/"
# The metrics' exponents are clamped to +-this (verl's SAFETY_BOUND), whatever ratio_log_clamp says:
# they stay finite for sequence products far beyond exp(88).
METRIC_LOG_CLAMP = 20.0


class RolloutCorrection(NamedTuple):
    """What rollout_correction returns (it unpacks as a triple)."""
    rollout_is_weights: Tensor | None  # like old_logp, fp32 (fp64 for fp64), detached, 0 outside the input
                                       # mask; None for level=None
    mask: Tensor                       # bool: the input mask less the rejected tokens (rejection=)
    metrics: dict[str, Tensor]         # "rollout_corr/<verl's name>": detached fp32 scalars


@dataclasses.dataclass(frozen=True)
class Options:
    """rollout_correction's keyword options, checked (check_options)."""
    level: str | None
    mode: str
    low: float | None
    high: float | None
    rejection: tuple  # ((criterion, lower or None, upper), ...)
    batch_normalize: bool
    ratio_log_clamp: float | None
    process_group: object


def _check_threshold(threshold):
    if threshold is None:
        return None, None
    if is_number(threshold):
        return None, check_float("threshold", threshold, lo=0.0)
    if isinstance(threshold, (tuple, list)) and len(threshold) == 2:
        low = check_float("threshold (low)", threshold[0], lo=0.0, allow_none=True)
        high = check_float("threshold (high)", threshold[1], lo=0.0, allow_none=True)
        if low is not None and high is not None and low > high:
            raise ValueError(f"threshold=(low, high) needs low <= high, got {tuple(threshold)}")
        return low, high
    raise TypeError(f"threshold must be a float (the upper bound), a pair (low, high) or None, "
                    f"got {type(threshold).__name__}")


def _check_rejection(rejection) -> tuple:
    if rejection is None:
        return ()
    if not isinstance(rejection, dict):
        raise TypeError(f"rejection must be a dict {{criterion: threshold}} or None, got {type(rejection).__name__}")
    if not rejection:
        raise ValueError(f"rejection={{}} names no criterion; pass None, or criteria of {REJECTION_CRITERIA}")
    out = []
    for name, spec in rejection.items():
        if name not in REJECTION_CRITERIA:
            raise ValueError(f"rejection: unknown criterion {name!r}; the criteria are {REJECTION_CRITERIA}")
        what = f"rejection[{name!r}]"
        if name.endswith("k1"):
            # bounds on the ratio exp(k1) = pi_rollout / pi_train; one number u means (1/u, u), as verl
            if is_number(spec):
                upper = check_float(what, spec, lo=0.0)
                lower = 1.0 / upper
            elif isinstance(spec, (tuple, list)) and len(spec) == 2:
                lower = check_float(f"{what} (lower)", spec[0], lo=0.0)
                upper = check_float(f"{what} (upper)", spec[1], lo=0.0)
            else:
                raise TypeError(f"{what} must be a float u (bounds (1/u, u)) or a pair (lower, upper), "
                                f"got {type(spec).__name__}")
            if lower > upper:
                raise ValueError(f"{what} needs lower <= upper, got ({lower}, {upper})")
            out.append((name, lower, upper))
        else:
            if not is_number(spec):
                raise TypeError(f"{what} must be a float (the upper bound of the divergence), got {type(spec).__name__}")
            out.append((name, None, check_float(what, spec, lo=0.0)))
    return tuple(out)


def check_options(*, level="token", mode="truncate", threshold=2.0, rejection=None, batch_normalize=False,
                  ratio_log_clamp=20.0, process_group=None) -> Options:
    """The options checked, each error naming its argument (no tensor is read)."""
    if level is not None:
        check_choice("level", level, LEVELS + (None,))
    check_choice("mode", mode, MODES)
    low, high = _check_threshold(threshold)
    return Options(level, mode, low, high, _check_rejection(rejection), check_bool("batch_normalize", batch_normalize),
                   check_float("ratio_log_clamp", ratio_log_clamp, lo=0.0, allow_none=True), process_group)


def check_route_options(options) -> Options:
    """The `rollout_correction=` dict of the policy losses, checked (unknown keys name the dict)."""
    if options is None:
        return check_options()
    if not isinstance(options, dict):
        raise TypeError(f"rollout_correction must be a dict of rollout_correction's options {OPTION_NAMES} or None, "
                        f"got {type(options).__name__}")
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(f"rollout_correction: unknown option(s) {unknown}; the options are {OPTION_NAMES}")
    return check_options(**options)


def rollout_correction(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor | None = None, *,
                       level: str | None = "token", mode: str = "truncate", threshold=2.0,
                       rejection: dict | None = None, batch_normalize: bool = False,
                       ratio_log_clamp: float | None = 20.0, cu_seqlens: Tensor | None = None,
                       validate_mask: bool | None = None, process_group=None) -> RolloutCorrection:
    """Truncated (or masked) importance weights pi_train / pi_rollout and a rejection mask.

    Args:
        old_logp: `[B, T]` (or packed `[N]` with `cu_seqlens`) the trainer's log-probs of the sampled
            tokens (the behaviour policy recomputed; the current policy's in an on-policy step).
        rollout_logp: the inference engine's log-probs of the same tokens, same shape.
        mask: bool or 0/1 like old_logp; None = all tokens.
        level: "token" (one ratio per token), "sequence" (the product of the row's ratios, summed in
            log space), "geometric" (their geometric mean), or None (no weights: rejection and metrics).
        mode: "truncate" (w = clamp(ratio, low, high)) or "mask" (w = ratio inside [low, high], else 0).
        threshold: the upper bound `high` (a float), a pair `(low, high)` (either may be None), or None
            (no bound). verl's default 2.0; TRL's `vllm_importance_sampling_clip_max` 3.0.
        rejection: `{criterion: threshold}` with verl's criteria (`token_k1`, `seq_mean_k3`, ...; a
            float u or a pair for the `*_k1` ratio bounds, an upper bound for k2/k3): the tokens or
            rows that fail any criterion leave the returned mask.
        batch_normalize: divide the weights by their batch mean (token mean; row mean at the
            sequence and geometric levels), global over `process_group` when one is given.
        ratio_log_clamp: the log-weights (and the log-ratios of the rejection statistics) are
            clamped to +-this before exp (verl's 20); None disables (TRL's weights).
        cu_seqlens: `[B + 1]` row offsets of the packed layout.
        validate_mask: check a non-bool mask's 0/1 values (default: on CPU tensors only).
        process_group: the ranks batch_normalize averages over (metrics stay per rank).

    Returns:
        RolloutCorrection(rollout_is_weights, mask, metrics).
    """
    opts = check_options(level=level, mode=mode, threshold=threshold, rejection=rejection,
                         batch_normalize=batch_normalize, ratio_log_clamp=ratio_log_clamp,
                         process_group=process_group)
    if not isinstance(old_logp, Tensor):
        raise TypeError(f"old_logp must be a torch.Tensor, got {type(old_logp).__name__}")
    if not old_logp.dtype.is_floating_point:
        raise TypeError(f"old_logp must be a floating-point tensor, got {old_logp.dtype}")
    rows = layout.token_layout("old_logp", old_logp, cu_seqlens)
    if rollout_logp is None:
        raise TypeError("rollout_logp must be a torch.Tensor, got None")
    layout.check_like("rollout_logp", rollout_logp, old_logp)
    mask = layout.token_mask(mask, old_logp.shape, old_logp.device, validate=validate_mask)
    return correct(old_logp, rollout_logp, mask, rows, opts)


# --------------------------------------------------------------------------------------------
# the math (inputs checked; mask bool)


class _Batch:
    """The reductions of one call: token means over the mask, row sums/means/max/min, means over the
    non-empty rows. Every empty reduction is 0."""

    def __init__(self, mask: Tensor, rows: layout.Rows, dtype):
        self.mask, self.rows, self.dtype = mask, rows, dtype
        self.lengths = rows.lengths(mask, dtype)
        self.valid = self.lengths > 0
        self.n_tokens = mask.sum()
        self.n_rows = self.valid.sum()
        self.zero = torch.zeros((), dtype=dtype, device=mask.device)

    def tmean(self, x: Tensor) -> Tensor:
        return layout.token_mean(x.to(self.dtype), self.mask)

    def tvar(self, x: Tensor) -> Tensor:
        """verl's E[x^2] - E[x]^2 over the tokens (>= 0; 0 for fewer than two tokens)."""
        var = (self.tmean(x * x) - self.tmean(x) ** 2).clamp(min=0)
        return torch.where(self.n_tokens > 1, var, self.zero)

    def tmax(self, x: Tensor) -> Tensor:
        m = torch.where(self.mask, x, torch.full_like(x, -math.inf)).max() if x.numel() else self.zero
        return torch.where(self.n_tokens > 0, m, self.zero)

    def tmin(self, x: Tensor) -> Tensor:
        return -self.tmax(-x)

    def row_sum(self, x: Tensor) -> Tensor:
        return self.rows.row_sum(torch.where(self.mask, x, self.zero))

    def row_mean(self, x: Tensor) -> Tensor:
        return self.row_sum(x) / self.lengths.clamp(min=1)

    def row_max(self, x: Tensor) -> Tensor:
        """Max over each row's masked-in tokens; 0 for an empty row (verl's _sequence_max)."""
        init = torch.full((self.rows.num_rows,), -math.inf, dtype=x.dtype, device=x.device)
        vals = torch.where(self.mask, x, torch.full_like(x, -math.inf)).reshape(-1)
        m = init.scatter_reduce(0, self.rows.row_ids, vals, "amax", include_self=True)
        return torch.where(self.valid, m, torch.zeros_like(m))

    def vmean(self, v: Tensor) -> Tensor:
        """Mean over the non-empty rows."""
        v = torch.where(self.valid, v.to(self.dtype), self.zero)
        return v.sum() / self.n_rows.clamp(min=1).to(self.dtype)

    def vstd(self, v: Tensor) -> Tensor:
        """Unbiased std over the non-empty rows (torch.std); 0 for fewer than two."""
        mean = self.vmean(v)
        d = torch.where(self.valid, v.to(self.dtype) - mean, self.zero)
        var = (d * d).sum() / (self.n_rows - 1).clamp(min=1).to(self.dtype)
        return torch.where(self.n_rows > 1, var.sqrt(), self.zero)

    def vmax(self, v: Tensor) -> Tensor:
        m = torch.where(self.valid, v, torch.full_like(v, -math.inf)).max() if v.numel() else self.zero
        return torch.where(self.n_rows > 0, m, self.zero)

    def vmin(self, v: Tensor) -> Tensor:
        return -self.vmax(-v)


def _clamp(x: Tensor, c: float | None) -> Tensor:
    return x if c is None else x.clamp(-c, c)


def _log(x: float | None, default: float) -> float:
    return default if x is None else (math.log(x) if x > 0 else -math.inf)


def correct(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, rows: layout.Rows, opts: Options) -> RolloutCorrection:
    """rollout_correction on checked inputs (`mask` bool, `rows` the token layout)."""
    with torch.no_grad():
        dtype = layout.compute_dtype(torch.promote_types(old_logp.dtype, rollout_logp.dtype))
        old = layout.sanitize(old_logp.detach(), mask, dtype)
        roll = layout.sanitize(rollout_logp.detach(), mask, dtype)
        delta = old - roll  # log(pi_train / pi_rollout); 0 outside the mask
        b = _Batch(mask, rows, dtype)
        metrics: dict[str, Tensor] = {}
        weights = None
        if opts.level is not None:
            weights = _weights(delta, b, opts, metrics)
        keep = mask
        if opts.rejection:
            keep = _reject(delta, b, opts, metrics)
        _offpolicy(old, roll, delta, b, metrics)
        metrics = {PREFIX + k: v.detach().to(torch.float32) for k, v in metrics.items()}
        return RolloutCorrection(weights, keep, metrics)


def _weights(delta: Tensor, b: _Batch, o: Options, metrics: dict) -> Tensor:
    c, mask = o.ratio_log_clamp, b.mask
    if o.level == "token":
        log_w, seq_log = delta, None
    else:
        seq_log = b.row_sum(delta)  # log of the row's product of ratios, unclamped (metrics)
        if o.level == "geometric":
            seq_log = seq_log / b.lengths.clamp(min=1)
        log_w = b.rows.to_tokens(seq_log)
    zero = torch.zeros_like(delta)
    raw = torch.where(mask, torch.exp(_clamp(log_w, c)), zero)
    if o.mode == "truncate":
        w = raw if (o.low is None and o.high is None) else raw.clamp(o.low, o.high)
        inside = None
    else:
        inside = torch.ones_like(mask)
        if o.low is not None:
            inside = inside & (raw >= o.low)
        if o.high is not None:
            inside = inside & (raw <= o.high)
        w = torch.where(inside, raw, zero)
    w = torch.where(mask, w, zero)

    # verl's compute_is_metrics: the applied weights, the raw ones for the fractions; the lower
    # bound of the fractions is 1/high when none is given.
    high = math.inf if o.high is None else o.high
    low = o.low if o.low is not None else (1.0 / o.high if o.high is not None else 0.0)
    if seq_log is None:
        metrics["rollout_is_mean"] = b.tmean(w)
        metrics["rollout_is_ratio_fraction_high"] = b.tmean((raw > high).to(b.dtype))
        metrics["rollout_is_ratio_fraction_low"] = b.tmean((raw < low).to(b.dtype))
        metrics["rollout_is_max"] = b.tmax(w)
        metrics["rollout_is_min"] = b.tmin(w)
    else:
        metrics["rollout_is_max"] = torch.exp(_clamp(b.vmax(seq_log), METRIC_LOG_CLAMP))
        metrics["rollout_is_min"] = torch.exp(_clamp(b.vmin(seq_log), METRIC_LOG_CLAMP))
        metrics["rollout_is_min"] = torch.where(b.n_rows > 0, metrics["rollout_is_min"], b.zero)
        metrics["rollout_is_max"] = torch.where(b.n_rows > 0, metrics["rollout_is_max"], b.zero)
        metrics["rollout_is_mean"] = b.tmean(w)
        metrics["rollout_is_ratio_fraction_high"] = b.vmean((seq_log > _log(high, math.inf)).to(b.dtype))
        metrics["rollout_is_ratio_fraction_low"] = b.vmean((seq_log < _log(low, -math.inf)).to(b.dtype))
    w_c = w.clamp(0.0, high)
    metrics["rollout_is_std"] = b.tvar(w_c).sqrt()
    mean_c, sq_c = b.tmean(w_c), b.tmean(w_c * w_c)
    metrics["rollout_is_eff_sample_size"] = torch.where(sq_c > 0, mean_c * mean_c / torch.where(
        sq_c > 0, sq_c, torch.ones_like(sq_c)), b.zero)
    row_w, row_raw = b.row_mean(w), b.row_mean(raw)
    metrics["rollout_is_seq_mean"] = b.vmean(row_w)
    metrics["rollout_is_seq_std"] = b.vstd(row_w)
    metrics["rollout_is_seq_max"] = b.vmax(row_w)
    metrics["rollout_is_seq_min"] = b.vmin(row_w)
    metrics["rollout_is_seq_max_deviation"] = b.vmax((row_w - 1.0).abs())
    metrics["rollout_is_seq_fraction_high"] = b.vmean((row_raw > high).to(b.dtype))
    metrics["rollout_is_seq_fraction_low"] = b.vmean((row_raw < low).to(b.dtype))
    if inside is not None:
        metrics["rollout_is_oob_ratio"] = b.tmean((~inside).to(b.dtype))

    if o.batch_normalize:
        # the token mean of the weights, or the mean of the non-empty rows' weights (sequence, geometric)
        if o.level == "token":
            parts = torch.stack([w.sum(), b.n_tokens.to(b.dtype)])
        else:
            parts = torch.stack([torch.where(b.valid, row_w, b.zero).sum(), b.n_rows.to(b.dtype)])
        parts = all_reduce_sum(parts.to(torch.float64), o.process_group)
        mean = (parts[0] / parts[1].clamp(min=1)).to(b.dtype)
        factor = torch.where(mean > 1e-8, mean, torch.ones_like(mean))
        w = w / factor
        metrics["rollout_is_batch_norm_factor"] = factor
    return w


def _reject(delta: Tensor, b: _Batch, o: Options, metrics: dict) -> Tensor:
    """verl's compute_rollout_rejection_mask: every criterion must pass; returns the kept mask."""
    dc = _clamp(delta, o.ratio_log_clamp)
    stats = {"k1": -dc, "k2": 0.5 * dc * dc, "k3": torch.expm1(dc) - dc}
    mask = b.mask
    keep_all = torch.ones_like(mask)

    def f(x):
        return x.to(b.dtype)

    for name, lower, upper in o.rejection:
        agg, est = name.rsplit("_", 1)
        k1 = est == "k1"
        lo, hi = (math.log(lower), math.log(upper)) if k1 else (0.0, upper)
        tok = stats[est]
        if agg == "token":
            keep = (tok <= hi) & (tok >= lo) if k1 else tok <= hi
            seq_vals, per_token, level_seq = b.row_mean(tok), tok, False
        else:
            seq = {"seq_sum": b.row_sum, "seq_mean": b.row_mean, "seq_max": b.row_max}[agg](tok)
            keep_row = (seq <= hi) & (seq >= lo) if k1 else seq <= hi
            keep = b.rows.to_tokens(keep_row)
            seq_vals, per_token, level_seq = seq, b.rows.to_tokens(seq), True
        p = f"rollout_rs_{name}_"
        metrics[p + "mean"] = b.tmean(per_token)
        if level_seq:
            metrics[p + "max"], metrics[p + "min"] = b.vmax(seq_vals), b.vmin(seq_vals)
            metrics[p + "fraction_high"] = b.vmean(f(seq_vals > hi))
            metrics[p + "fraction_low"] = b.vmean(f(seq_vals < lo)) if k1 else b.zero
        else:
            metrics[p + "max"], metrics[p + "min"] = b.tmax(tok), b.tmin(tok)
            metrics[p + "fraction_high"] = b.tmean(f(tok > hi))
            metrics[p + "fraction_low"] = b.tmean(f(tok < lo)) if k1 else b.zero
        metrics[p + "std"] = b.tvar(per_token.clamp(lo, hi)).sqrt()
        metrics[p + "seq_mean"] = b.vmean(seq_vals)
        metrics[p + "seq_std"] = b.vstd(seq_vals)
        metrics[p + "seq_max"] = b.vmax(seq_vals)
        metrics[p + "seq_min"] = b.vmin(seq_vals)
        metrics[p + "seq_max_deviation"] = b.vmax(seq_vals.abs())
        metrics[p + "seq_fraction_high"] = b.vmean(f(seq_vals > hi))
        if k1:
            metrics[p + "seq_fraction_low"] = b.vmean(f(seq_vals < lo))
        metrics[p + "masked_fraction"] = b.tmean(f(~keep))
        metrics[p + "seq_masked_fraction"] = b.vmean(f(b.row_sum(f(~keep)) > 0))
        keep_all = keep_all & keep
    metrics["rollout_rs_masked_fraction"] = b.tmean(f(~keep_all))
    metrics["rollout_rs_seq_masked_fraction"] = b.vmean(f(b.row_sum(f(~keep_all)) > 0))
    return mask & keep_all


def _offpolicy(old: Tensor, roll: Tensor, delta: Tensor, b: _Batch, metrics: dict) -> None:
    """verl's compute_offpolicy_metrics: perplexities, KL(pi_rollout || pi_train) estimates, chi^2
    (every exponent of a log-ratio clamped to +-METRIC_LOG_CLAMP)."""
    c = METRIC_LOG_CLAMP
    mean_old, mean_roll = b.row_mean(old), b.row_mean(roll)
    metrics["training_ppl"] = b.vmean(torch.exp(-mean_old))
    metrics["training_log_ppl"] = b.vmean(-mean_old)
    metrics["kl"] = b.tmean(-delta)
    dc = _clamp(delta, c)
    metrics["k3_kl"] = b.tmean(torch.expm1(dc) - dc)
    metrics["rollout_ppl"] = b.vmean(torch.exp(-mean_roll))
    metrics["rollout_log_ppl"] = b.vmean(-mean_roll)
    diff = mean_roll - mean_old
    metrics["log_ppl_diff"] = b.vmean(diff)
    metrics["log_ppl_abs_diff"] = b.vmean(diff.abs())
    metrics["log_ppl_diff_max"] = b.vmax(diff)
    metrics["log_ppl_diff_min"] = b.vmin(diff)
    metrics["ppl_ratio"] = b.vmean(torch.exp(_clamp(diff, c)))
    metrics["chi2_token"] = torch.where(b.n_tokens > 0, b.tmean(torch.exp(2.0 * dc)) - 1.0, b.zero)
    seq = _clamp(b.row_sum(delta), c)
    metrics["chi2_seq"] = torch.where(b.n_rows > 0, b.vmean(torch.exp(2.0 * seq)) - 1.0, b.zero)
