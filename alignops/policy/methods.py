"""The policy-loss methods: each one's torch math next to its registry entry (alignops/policy/registry.py).

Formulas: docs/methods.md §1.4-1.12 and §2; §00 settles where sources disagree.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from alignops._validate import check_choice, check_float, is_number
from alignops.layout import Rows
from alignops.policy import bapo
from alignops.policy.math import TokenInputs, TokenLoss, clipped_surrogate, log_ratio, straight_through_one
from alignops.policy.registry import OneLaunch, register_method

# GSPO's combined sequence log-ratio is clamped above only, at 10, as verl does (docs/methods.md §00.3).
GSPO_LOG_RATIO_MAX = 10.0


# --------------------------------------------------------------------------------------------
# PPO's clipped surrogate and its presets

def ppo_token_loss(t: TokenInputs) -> TokenLoss:
    """PPO / GRPO / DAPO clipped surrogate, clip-higher and optional dual clip (docs/methods.md §2.1)."""
    ratio = torch.exp(log_ratio(t.logp, t.old_logp, t.ratio_log_clamp))
    low, high = 1.0 - t.clip_low, 1.0 + t.clip_high
    phi = clipped_surrogate(ratio, t.adv, low, high, t.clip_ratio_c)
    return TokenLoss(phi, ratio.detach(), low, high)


register_method("ppo", ppo_token_loss, one_launch=OneLaunch("clip"),
                doc="clipped surrogate; clip_low/clip_high (clip-higher), dual clip clip_ratio_c")
register_method("grpo", ppo_token_loss, one_launch=OneLaunch("clip"), examples=({"clip_ratio_c": 3.0},),
                doc="PPO surrogate on group-normalised advantages; the DeepSeekMath form is "
                    "agg='seq-mean-token-mean' with kl_coef=0.04, kl_estimator='k3'")
register_method("dapo", ppo_token_loss, defaults={"clip_low": 0.2, "clip_high": 0.28}, one_launch=OneLaunch("clip"),
                examples=({"clip_ratio_c": 3.0},), doc="clip-higher 0.2/0.28, token-mean over the global batch")
register_method("dr_grpo", ppo_token_loss, defaults={"agg": "seq-mean-token-sum-norm"}, one_launch=OneLaunch("clip"),
                doc="PPO surrogate, constant normaliser B * max_len (pass max_len)")


# --------------------------------------------------------------------------------------------
# GPPO

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


def _check_gppo(opts):
    return {**opts, **{k: check_float(k, opts[k], lo=0.0, lo_open=False) for k in ("gppo_beta1", "gppo_beta2")}}


def _gppo_knobs(opts, shared):
    # -beta * bound in float64 here, so both kernels get the value the C++ reference rounds once
    return {"gppo_k_low": -opts["gppo_beta1"] * (1.0 - shared.clip_low),
            "gppo_k_high": -opts["gppo_beta2"] * (1.0 + shared.clip_high)}


def _gppo_loss(t, *, gppo_beta1, gppo_beta2):
    return gppo_token_loss(t, gppo_beta1, gppo_beta2)


register_method("gppo", _gppo_loss, defaults={"clip_low": 0.2, "clip_high": 0.28},
                options={"gppo_beta1": 1.0, "gppo_beta2": 1.0}, validate=_check_gppo,
                one_launch=OneLaunch("gppo", _gppo_knobs),
                examples=({"gppo_beta1": 0.5, "gppo_beta2": 0.75, "clip_ratio_c": 3.0},),
                doc="clip-higher value, clipped tokens keep gradient -beta*bound*A")
register_method("gppo_klear", _gppo_loss, defaults={"clip_low": 0.2, "clip_high": 0.28, "clip_ratio_c": 10.0},
                options={"gppo_beta1": 0.25, "gppo_beta2": 1.0}, validate=_check_gppo,
                one_launch=OneLaunch("gppo", _gppo_knobs),
                doc="Klear-Reasoner script values (beta1=0.25, beta2=1, dual clip 10)")


# --------------------------------------------------------------------------------------------
# CISPO

def cispo_token_loss(t: TokenInputs) -> TokenLoss:
    """CISPO (docs/methods.md §2.17, §00.7): -sg(clip(r, 1 - clip_low, 1 + clip_high)) * A * logp."""
    ratio = torch.exp(log_ratio(t.logp, t.old_logp, t.ratio_log_clamp)).detach()
    low, high = 1.0 - t.clip_low, 1.0 + t.clip_high
    weight = ratio.clamp(low, high)
    return TokenLoss(-weight * t.adv * t.logp, ratio, low, high)


register_method("cispo", cispo_token_loss, defaults={"clip_low": 1.0, "clip_high": 0.2}, one_launch=OneLaunch("cispo"),
                doc="-sg(clip(r, 1-clip_low, 1+clip_high)) A logp; default: no lower bound, upper 1.2 (verl)")
register_method("cispo_scalerl", cispo_token_loss, defaults={"clip_low": 1.0, "clip_high": 4.0},
                one_launch=OneLaunch("cispo"), doc="TRL/ScaleRL: absolute upper bound 5.0 (epsilon_high=5.0)")


# --------------------------------------------------------------------------------------------
# ECPO

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


def _check_ecpo(opts):
    check_choice("ratio_level", opts["ratio_level"], ("token", "sequence"))
    return {**opts, "ecpo_delta": check_float("ecpo_delta", opts["ecpo_delta"], lo=0.0, lo_open=False)}


register_method("ecpo", lambda t, ecpo_delta, ratio_level: ecpo_token_loss(t, ecpo_delta, ratio_level),
                options={"ecpo_delta": 0.1, "ratio_level": "token"}, validate=_check_ecpo,
                one_launch=OneLaunch("clip", lambda o, s: {"early_shift": math.log1p(s.clip_high + o["ecpo_delta"])},
                                     when=lambda o: o["ratio_level"] == "token"),
                examples=({"ecpo_delta": 0.1, "clip_ratio_c": 3.0}, {"ratio_level": "sequence"}),
                doc="early-clipped pi_old for large ratios: bounded, non-zero gradient")


# --------------------------------------------------------------------------------------------
# SAPO

def sapo_token_loss(t: TokenInputs, tau_pos: float, tau_neg: float) -> TokenLoss:
    """SAPO (docs/methods.md §2.33): a soft gate instead of the clip, phi = -(4 / tau) sigmoid(tau (r - 1)) A
    with tau = tau_pos where A > 0, else tau_neg; at r = 1 its gradient is PPO's, -A dr."""
    ratio = torch.exp(log_ratio(t.logp, t.old_logp, t.ratio_log_clamp))
    tau = torch.where(t.adv > 0, t.adv.new_tensor(tau_pos), t.adv.new_tensor(tau_neg))
    gate = torch.sigmoid(tau * (ratio - 1.0))
    return TokenLoss(-(4.0 / tau) * gate * t.adv, ratio.detach(), None, None)


def _check_sapo(opts):
    return {**opts, **{k: check_float(k, opts[k], lo=0.0) for k in ("sapo_tau_pos", "sapo_tau_neg")}}


register_method("sapo", lambda t, sapo_tau_pos, sapo_tau_neg: sapo_token_loss(t, sapo_tau_pos, sapo_tau_neg),
                options={"sapo_tau_pos": 1.0, "sapo_tau_neg": 1.05}, validate=_check_sapo,
                one_launch=OneLaunch("sapo", lambda o, s: {"sapo_tau_pos": o["sapo_tau_pos"],
                                                           "sapo_tau_neg": o["sapo_tau_neg"]}),
                examples=({"sapo_tau_pos": 0.5, "sapo_tau_neg": 2.0},),
                doc="soft sigmoid gate instead of the clip, temperatures by the sign of A (verl/SkyRL 1.0/1.05)")


# --------------------------------------------------------------------------------------------
# GSPO (sequence ratios: no one-launch form)

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


register_method("gspo", lambda t: gspo_token_loss(t, token_form=False),
                defaults={"clip_low": 3e-4, "clip_high": 4e-4, "agg": "seq-mean-token-mean"},
                doc="sequence ratio exp(mean log-ratio), clipped per sequence")
register_method("gspo-token", lambda t: gspo_token_loss(t, token_form=True),
                defaults={"clip_low": 3e-4, "clip_high": 4e-4, "agg": "seq-mean-token-mean"},
                doc="GSPO with token-level advantages: sg(s_i) * exp(logp - sg(logp))")


# --------------------------------------------------------------------------------------------
# VESPO (sequence weights: no one-launch form)

# log(1e-8): the floor of VESPO's sequence log-weight (its reference implementation and TRL's)
VESPO_LOG_W_MIN = math.log(1e-8)
VESPO_LOG_W_MAX = 20.0


def vespo_token_loss(t: TokenInputs, k_pos: float, lambda_pos: float, k_neg: float, lambda_neg: float) -> TokenLoss:
    """VESPO (docs/methods.md §2.34): phi = -sg(g(w)) * A * logp with the sequence weight
    w = exp(clamp(sum_t log r_t, log 1e-8, 20)) and the Gamma gate g(w) = e^lambda w^k e^(-lambda w)
    (g(1) = 1), k and lambda by the sign of A (A >= 0: the _pos pair)."""
    d = log_ratio(t.logp, t.old_logp, t.ratio_log_clamp).detach()
    log_w = t.rows.to_tokens(t.rows.row_sum(d).clamp(VESPO_LOG_W_MIN, VESPO_LOG_W_MAX))
    nonneg = t.adv >= 0
    k = torch.where(nonneg, t.adv.new_tensor(k_pos), t.adv.new_tensor(k_neg))
    lam = torch.where(nonneg, t.adv.new_tensor(lambda_pos), t.adv.new_tensor(lambda_neg))
    gate = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    phi = -gate * t.adv * t.logp
    # TRL's vespo/phi_seq_mean, the gate's mean over the rows; empty rows never count (TRL counts
    # them with the gate g(1) = 1)
    lengths = t.rows.lengths(t.mask, gate.dtype)
    nonempty = lengths > 0
    per_row = t.rows.row_sum(torch.where(t.mask, gate, 0.0)) / lengths.clamp(min=1)
    mean = per_row.sum() / nonempty.sum().clamp(min=1)
    return TokenLoss(phi, torch.exp(d), None, None, {"vespo/phi_seq_mean": mean})


def _check_vespo(opts):
    out = {k: check_float(k, opts[k], lo=0.0, lo_open=False) for k in ("vespo_k_pos", "vespo_k_neg")}
    out.update({k: check_float(k, opts[k], lo=0.0) for k in ("vespo_lambda_pos", "vespo_lambda_neg")})
    return {**opts, **out}


register_method("vespo", lambda t, vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg:
                vespo_token_loss(t, vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg),
                options={"vespo_k_pos": 2.0, "vespo_lambda_pos": 3.0, "vespo_k_neg": 3.0, "vespo_lambda_neg": 2.0},
                validate=_check_vespo,
                examples=({}, {"vespo_k_pos": 0.5, "vespo_lambda_pos": 1.0, "vespo_k_neg": 1.0,
                               "vespo_lambda_neg": 0.5}),
                doc="smooth sequence-level Gamma gate of the importance weight instead of a clip (TRL 2.0/3.0, 3.0/2.0)")


# --------------------------------------------------------------------------------------------
# DPPO (a divergence trust region instead of a ratio clip)

# 1 - p is floored as verl's dppo_kl floors it, so a token with p = 1 has a finite binary KL
_DPPO_EPS = 1e-8


def dppo_token_loss(t: TokenInputs, divergence: str, is_cap: float) -> TokenLoss:
    """DPPO (docs/methods.md §2.35): -sg(min(r, C)) * A * logp on the tokens whose sampled-token
    probability stayed inside the trust region, 0 elsewhere. The region is bounded on the side the
    advantage pushes: for A > 0, TV p - p_old <= clip_high (binary KL <= clip_high or p <= p_old); for
    A <= 0, p - p_old >= -clip_low (binary KL <= clip_low or p >= p_old)."""
    ratio = torch.exp(log_ratio(t.logp, t.old_logp, t.ratio_log_clamp)).detach()
    lp = t.logp.detach()
    p, p_old = torch.exp(lp), torch.exp(t.old_logp)
    up = t.adv > 0
    if divergence == "tv":
        inside = torch.where(up, p - p_old <= t.clip_high, p - p_old >= -t.clip_low)
    else:
        kl = p_old * (t.old_logp - lp) + (1.0 - p_old) * torch.log((1.0 - p_old + _DPPO_EPS) / (1.0 - p + _DPPO_EPS))
        inside = torch.where(up, (kl <= t.clip_high) | (p <= p_old), (kl <= t.clip_low) | (p >= p_old))
    weight = ratio.clamp(max=is_cap) * inside
    n = t.mask.sum().clamp(min=1)
    metrics = {"dppo/outside": (t.mask & ~inside).sum() / n,
               "dppo/truncated": (t.mask & inside & (ratio > is_cap)).sum() / n}
    return TokenLoss(-weight * t.adv * t.logp, ratio, None, None, metrics)


def _check_dppo(opts):
    return {**opts, "dppo_is_cap": check_float("dppo_is_cap", opts["dppo_is_cap"], lo=0.0)}


def _dppo_knobs(opts, shared):
    # the region's bounds are clip_low/clip_high themselves (the kernel compares p - p_old or the
    # binary KL with them as torch does, not with 1 -+ them)
    return {"dppo_delta_low": shared.clip_low, "dppo_delta_high": shared.clip_high,
            "dppo_is_cap": opts["dppo_is_cap"]}


# the capped example first: the one-launch tests run the first example (RATIO_TARGETS reach 1.5, not 20)
_DPPO = dict(options={"dppo_is_cap": 20.0}, validate=_check_dppo,
             examples=({"clip_low": 0.05, "clip_high": 0.1, "dppo_is_cap": 1.5}, {}))
register_method("dppo_tv", lambda t, dppo_is_cap: dppo_token_loss(t, "tv", dppo_is_cap), **_DPPO,
                one_launch=OneLaunch("dppo_tv", _dppo_knobs),
                doc="-sg(min(r, C)) A logp inside a TV region of the sampled token's probability (clip_low/high)")
register_method("dppo_kl", lambda t, dppo_is_cap: dppo_token_loss(t, "kl", dppo_is_cap), **_DPPO,
                one_launch=OneLaunch("dppo_kl", _dppo_knobs),
                doc="-sg(min(r, C)) A logp inside a binary-KL region of the token's probability (clip_low/high)")


# --------------------------------------------------------------------------------------------
# GMPO (geometric-mean sequence ratio)

def gmpo_token_loss(t: TokenInputs) -> TokenLoss:
    """GMPO (docs/methods.md §2.36): the sequence ratio is the geometric mean of the token ratios,
    each log-ratio clipped to [-clip_low, clip_high] on the side the advantage's sign pushes (the
    PPO min in log space), s_i = exp(mean_t sgn(A) min(sgn(A) d, sgn(A) clip(d))); phi = -mean_t(A) s_i
    on every token of the row (summed per row by seq-mean-token-mean: -mean(A) s_i per sequence)."""
    d = log_ratio(t.logp, t.old_logp, t.ratio_log_clamp)  # +-20 as every method (verl's geo_mean: none)
    sign = torch.sign(t.adv)
    d_min = sign * torch.minimum(sign * d, sign * d.clamp(-t.clip_low, t.clip_high))
    length = t.rows.lengths(t.mask, d.dtype).clamp(min=1)
    ratio = t.rows.to_tokens(torch.exp(t.rows.row_sum(d_min) / length))
    adv = t.rows.to_tokens(t.rows.row_sum(t.adv) / length)
    clipped = t.mask & (d.detach() != d.detach().clamp(-t.clip_low, t.clip_high))
    n = t.mask.sum().clamp(min=1)
    metrics = {"gmpo/clipped_pos": (clipped & (t.adv > 0)).sum() / n,
               "gmpo/clipped_neg": (clipped & (t.adv < 0)).sum() / n}
    return TokenLoss(-adv * ratio, ratio.detach(), None, None, metrics)


register_method("geo_mean", lambda t: gmpo_token_loss(t), defaults={"agg": "seq-mean-token-mean"},
                examples=({}, {"clip_low": 0.4, "clip_high": 0.4}),
                doc="GMPO: geometric-mean sequence ratio with per-token log-space clipping (verl geo_mean)")


# --------------------------------------------------------------------------------------------
# REINFORCE and GPG

def reinforce_token_loss(t: TokenInputs, scale: Tensor | float = 1.0) -> TokenLoss:
    """REINFORCE / GPG: phi = -scale * A * logp (no ratio, no clip)."""
    ratio = torch.exp(log_ratio(t.logp, t.old_logp, t.ratio_log_clamp)).detach()
    return TokenLoss(-scale * t.adv * t.logp, ratio, None, None)


register_method("reinforce", lambda t: reinforce_token_loss(t), defaults={"agg": "seq-mean-token-sum"},
                one_launch=OneLaunch("reinforce", lambda o, s: {"scale": 1.0}), doc="-A logp")


def group_matrix(num_rows: int, group_size: int | None, group_ids: Tensor | None, device) -> Tensor:
    """[B, B] bool: same_group[i, j]."""
    if group_ids is None:
        g = torch.arange(num_rows, device=device) // group_size
    else:
        g = group_ids.to(device)
    return g.unsqueeze(0) == g.unsqueeze(1)


def gpg_group_alpha(rows: Rows, adv: Tensor, mask: Tensor, *, group_size=None, group_ids=None, rewards=None,
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


def _check_gpg(opts):
    check_choice("gpg_alpha_mode", opts["gpg_alpha_mode"], ("zero_variance", "verl_nonzero"))
    if opts["gpg_alpha"] is not None:
        opts = {**opts, "gpg_alpha": check_float("gpg_alpha", opts["gpg_alpha"], lo=0.0, lo_open=False)}
    if opts["gpg_alpha_mode"] == "verl_nonzero" and opts["rewards"] is None and opts["gpg_alpha"] is None:
        raise ValueError("gpg_alpha_mode='verl_nonzero' needs rewards=[B]")
    gs, gid = opts["group_size"], opts["group_ids"]
    if gs is not None and gid is not None:
        raise ValueError("give group_size or group_ids, not both")
    if gs is not None and (isinstance(gs, bool) or not isinstance(gs, int) or gs < 1):
        raise ValueError(f"group_size must be a positive int, got {gs!r}")
    return opts


def _check_gpg_rows(opts, rows):
    for k in ("group_ids", "rewards"):
        v = opts.get(k)
        if v is not None and (not isinstance(v, torch.Tensor) or tuple(v.shape) != (rows.num_rows,)):
            raise ValueError(f"{k} must be a [{rows.num_rows}] tensor (one entry per sequence)")
    if opts.get("group_size") is not None and rows.num_rows % opts["group_size"]:
        raise ValueError(f"group_size={opts['group_size']} does not divide the number of sequences {rows.num_rows}")


def _gpg_loss(t, *, gpg_alpha, gpg_alpha_mode, group_size, group_ids, rewards, process_group):
    if gpg_alpha is not None:
        alpha = torch.as_tensor(float(gpg_alpha), dtype=t.logp.dtype, device=t.logp.device)
    elif group_size is not None or group_ids is not None or gpg_alpha_mode == "verl_nonzero":
        alpha = gpg_group_alpha(t.rows, t.adv, t.mask, group_size=group_size, group_ids=group_ids,
                          rewards=rewards, mode=gpg_alpha_mode, process_group=process_group).to(t.logp.dtype)
    else:
        alpha = torch.ones((), dtype=t.logp.dtype, device=t.logp.device)
    tl = reinforce_token_loss(t, alpha)
    tl.metrics["gpg/alpha"] = alpha
    return tl


register_method("gpg", _gpg_loss,
                options={"gpg_alpha": None, "gpg_alpha_mode": "zero_variance", "group_size": None,
                         "group_ids": None, "rewards": None, "process_group": None},
                validate=_check_gpg, check_rows=_check_gpg_rows,
                # alpha computed from the batch's groups is not token-local; a given alpha is
                one_launch=OneLaunch("reinforce", lambda o, s: {"scale": o["gpg_alpha"]},
                                     when=lambda o: o["gpg_alpha"] is not None),
                examples=({"gpg_alpha": 1.5}, {"group_size": 2}),
                doc="-alpha A logp, alpha = #groups / #groups with signal (or gpg_alpha)")


# --------------------------------------------------------------------------------------------
# BAPO (bounds searched over the batch: no one-launch form)

def bapo_token_loss(t: TokenInputs, c_low: Tensor, c_high: Tensor) -> TokenLoss:
    """BAPO's loss (docs/methods.md §2.19): PPO with absolute bounds chosen by `bapo_search`."""
    ratio = torch.exp(log_ratio(t.logp, t.old_logp, t.ratio_log_clamp))
    phi = clipped_surrogate(ratio, t.adv, c_low.to(ratio.dtype), c_high.to(ratio.dtype), t.clip_ratio_c)
    return TokenLoss(phi, ratio.detach(), c_low, c_high)


def _check_bapo(opts):
    check_choice("bapo_mode", opts["bapo_mode"], ("paper", "official_code"))
    opts = dict(opts)
    for k in ("bapo_low_step", "bapo_high_step"):
        if opts[k] is not None:
            opts[k] = check_float(k, opts[k], lo=0.0)
    if opts["bapo_target"] is not None:
        opts["bapo_target"] = check_float("bapo_target", opts["bapo_target"], lo=0.0, lo_open=False)
    for k in ("bapo_low_range", "bapo_high_range", "bapo_bounds"):
        v = opts[k]
        if v is None:
            continue
        if not (isinstance(v, (tuple, list)) and len(v) == 2 and all(is_number(x) for x in v)):
            raise TypeError(f"{k} must be a pair of floats, got {v!r}")
        if not (0 < v[0] <= v[1]):
            raise ValueError(f"{k} must satisfy 0 < {k}[0] <= {k}[1], got {tuple(v)}")
    return opts


def _bapo_loss(t, *, bapo_mode, bapo_target, bapo_low_range, bapo_high_range, bapo_low_step,
               bapo_high_step, bapo_bounds, process_group):
    if bapo_bounds is not None:
        c_low = torch.as_tensor(float(bapo_bounds[0]), dtype=torch.float64, device=t.logp.device)
        c_high = torch.as_tensor(float(bapo_bounds[1]), dtype=torch.float64, device=t.logp.device)
        metrics = {}
    else:
        official = bapo_mode == "official_code"
        target = bapo_target if bapo_target is not None else (1.0 if official else 0.4)
        low_range = bapo_low_range or ((0.6, 0.8) if official else (0.6, 0.9))
        high_range = bapo_high_range or ((1.2, 2.0) if official else (1.2, 3.0))
        low_step = bapo_low_step or (0.05 if official else 0.02)
        high_step = bapo_high_step or 0.05
        with torch.no_grad():
            ratio = torch.exp(log_ratio(t.logp.detach(), t.old_logp, t.ratio_log_clamp))
            c_low, c_high, rho = bapo.bapo_search(
                ratio, t.adv, t.mask, mode=bapo_mode, target=target, low_range=low_range,
                high_range=high_range, low_step=low_step, high_step=high_step, process_group=process_group)
        metrics = {"bapo/rho": rho}
    tl = bapo_token_loss(t, c_low, c_high)
    tl.metrics.update(metrics, **{"bapo/clip_low": c_low, "bapo/clip_high": c_high})
    return tl


register_method("bapo", _bapo_loss,
                options={"bapo_mode": "paper", "bapo_target": None, "bapo_low_range": None,
                         "bapo_high_range": None, "bapo_low_step": None, "bapo_high_step": None,
                         "bapo_bounds": None, "process_group": None},
                validate=_check_bapo, examples=({}, {"bapo_mode": "official_code"}),
                doc="PPO with absolute bounds searched per call (bapo_mode='paper'|'official_code')")


# --------------------------------------------------------------------------------------------
# Clip-Cov and KL-Cov (the entropy-mechanism paper): tokens picked by their covariance between
# advantage and log-prob over the call's tokens, so no one-launch form

def token_covariance(t: TokenInputs) -> Tensor:
    """(A_t - mean A)(logp_t - mean logp), the means over the call's masked-in tokens, detached, in the
    compute dtype (fp32, fp64 for fp64 inputs) from the inputs' rounded values (docs/methods.md §2.44).
    Masked-out tokens hold 0 (their inputs are sanitised to 0); callers mask them out."""
    lp = t.logp.detach()
    n = t.mask.sum().clamp(min=1).to(lp.dtype)
    return (t.adv - t.adv.sum() / n) * (lp - lp.sum() / n)


def clip_cov_token_loss(t: TokenInputs, cov_ratio: float, lb: float, ub: float, seed: int | None) -> TokenLoss:
    """Clip-Cov (docs/methods.md §2.44): PPO's clipped surrogate (dual clip if clip_ratio_c is set), with
    max(int(cov_ratio * N), 1) tokens drawn uniformly at random among the masked-in tokens the PPO clip
    left alone whose covariance lies in (lb, ub) taken out of the loss (phi = 0, no gradient)."""
    ratio = torch.exp(log_ratio(t.logp, t.old_logp, t.ratio_log_clamp))
    low, high = 1.0 - t.clip_low, 1.0 + t.clip_high
    r = ratio.detach()
    ppo_clipped = -t.adv * r.clamp(low, high) > -t.adv * r
    cov = token_covariance(t)
    candidate = (t.mask & ~ppo_clipped & (cov > lb) & (cov < ub)).reshape(-1)
    n_tokens = int(t.mask.sum())          # the count on the host, as verl (one synchronisation)
    n_clip = max(int(cov_ratio * n_tokens), 1)
    idx = candidate.nonzero().squeeze(1)  # row-major: row, then position (the packed order)
    drop = torch.zeros_like(candidate)
    if idx.numel():
        # the CPU generator, as verl: torch's default one (seed None) or a private one seeded per call;
        # no draw at all when nothing is a candidate (so the default generator advances as verl's)
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        perm = torch.randperm(idx.numel(), generator=gen)[:n_clip]
        drop[idx[perm.to(idx.device)]] = True
    drop = drop.view_as(t.mask)
    phi = clipped_surrogate(ratio, t.adv, low, high, t.clip_ratio_c)
    phi = torch.where(drop, torch.zeros((), dtype=phi.dtype, device=phi.device), phi)
    n = t.mask.sum().clamp(min=1)
    return TokenLoss(phi, r, low, high, {"clip_cov/clipped": drop.sum() / n})


def _check_clip_cov(opts):
    out = {"clip_cov_ratio": check_float("clip_cov_ratio", opts["clip_cov_ratio"], lo=0.0, hi=1.0),
           "clip_cov_lb": check_float("clip_cov_lb", opts["clip_cov_lb"]),
           "clip_cov_ub": check_float("clip_cov_ub", opts["clip_cov_ub"])}
    if out["clip_cov_lb"] > out["clip_cov_ub"]:
        raise ValueError(f"clip_cov_lb must be <= clip_cov_ub, got clip_cov_lb={out['clip_cov_lb']}, "
                         f"clip_cov_ub={out['clip_cov_ub']}")
    seed = opts["clip_cov_seed"]
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"clip_cov_seed must be None (torch's default generator) or an int >= 0, got {seed!r}")
    return {**opts, **out}


register_method("clip_cov", lambda t, clip_cov_ratio, clip_cov_lb, clip_cov_ub, clip_cov_seed:
                clip_cov_token_loss(t, clip_cov_ratio, clip_cov_lb, clip_cov_ub, clip_cov_seed),
                options={"clip_cov_ratio": 2e-4, "clip_cov_lb": 1.0, "clip_cov_ub": 5.0, "clip_cov_seed": None},
                validate=_check_clip_cov,
                examples=({"clip_cov_seed": 0},
                          {"clip_cov_ratio": 0.3, "clip_cov_lb": -0.5, "clip_cov_ub": 0.5, "clip_cov_seed": 3}),
                doc="PPO clip; a random share clip_cov_ratio of the tokens with covariance in (lb, ub) "
                    "leaves the loss (verl clip_cov)")


def kl_cov_token_loss(t: TokenInputs, cov_ratio: float, coef: float) -> TokenLoss:
    """KL-Cov (docs/methods.md §2.44): phi = -r A, plus coef |logp - old_logp| on the max(int(cov_ratio * N), 1)
    masked-in tokens of largest covariance; among equal covariances the earlier token (row-major, the
    packed order) is taken. No clip. The count and the ranks stay on the device."""
    d = t.logp - t.old_logp
    ratio = torch.exp(log_ratio(t.logp, t.old_logp, t.ratio_log_clamp))
    cov = torch.where(t.mask, token_covariance(t), -math.inf).reshape(-1)
    order = torch.sort(cov, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    n = t.mask.sum()
    k = torch.floor(n.to(torch.float64) * cov_ratio).clamp(min=1)   # verl's max(1, int(N * ratio)), N > 0
    selected = (rank.view_as(t.mask) < k) & t.mask
    penalty = torch.where(selected, coef * d.abs(), torch.zeros((), dtype=d.dtype, device=d.device))
    phi = -ratio * t.adv + penalty
    nn = n.clamp(min=1)
    metrics = {"kl_cov/selected": selected.sum() / nn,
               "kl_cov/abs_kl": torch.where(t.mask, d.detach().abs(), 0.0).sum() / nn}
    return TokenLoss(phi, ratio.detach(), None, None, metrics)


def _check_kl_cov(opts):
    return {**opts, "kl_cov_ratio": check_float("kl_cov_ratio", opts["kl_cov_ratio"], lo=0.0, hi=1.0),
            "kl_cov_coef": check_float("kl_cov_coef", opts["kl_cov_coef"], lo=0.0, lo_open=False)}


register_method("kl_cov", lambda t, kl_cov_ratio, kl_cov_coef: kl_cov_token_loss(t, kl_cov_ratio, kl_cov_coef),
                options={"kl_cov_ratio": 2e-4, "kl_cov_coef": 0.1}, validate=_check_kl_cov,
                examples=({}, {"kl_cov_ratio": 0.3, "kl_cov_coef": 1.0}),
                doc="-r A, plus kl_cov_coef |log r| on the share kl_cov_ratio of tokens of largest covariance "
                    "(verl kl_cov)")


# --------------------------------------------------------------------------------------------
# DRO (verl's dro: the policy gradient with a quadratic log-ratio penalty)

def dro_token_loss(t: TokenInputs, beta: float) -> TokenLoss:
    """verl's DRO (docs/methods.md §2.45): phi = -A logp + (beta / 2) (logp - old_logp)^2. No exp, so the
    penalty's log-ratio is not clamped (the ratio metrics' is)."""
    d = t.logp - t.old_logp
    ratio = torch.exp(log_ratio(t.logp, t.old_logp, t.ratio_log_clamp)).detach()
    return TokenLoss(-t.adv * t.logp + 0.5 * beta * d * d, ratio, None, None)


def _check_dro(opts):
    if opts["dro_beta"] is None:
        raise ValueError("method='dro' needs dro_beta > 0, the weight of its quadratic log-ratio penalty "
                         "(no default, as in verl, whose policy_loss.dro_beta is required)")
    return {**opts, "dro_beta": check_float("dro_beta", opts["dro_beta"], lo=0.0)}


register_method("dro", lambda t, dro_beta: dro_token_loss(t, dro_beta), options={"dro_beta": None},
                validate=_check_dro, one_launch=OneLaunch("dro", lambda o, s: {"dro_beta": o["dro_beta"]}),
                examples=({"dro_beta": 0.1}, {"dro_beta": 2.0}),
                doc="-A logp + dro_beta/2 (log r)^2; dro_beta required (verl dro)")
