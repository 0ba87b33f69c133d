"""float64 oracles written for the tests: plain torch math from the formulas of docs/methods.md, on the
same (already rounded) inputs the code under test gets, with the gradient w.r.t. the logits taken by
autograd. Nothing here imports alignops: an oracle that shares code with the kernels would share
their bugs.

Layouts: `[B, T, V]` logits with `[B, T]` labels, or packed `[N, V]` with `[N]` labels and
`cu_seqlens` (`[B + 1]` row offsets). A position counts iff mask != 0 and label != ignore_index.
"""
from __future__ import annotations

import math
from decimal import Decimal
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

IGNORE = -100


def _rows(labels, cu_seqlens):
    """[num_rows, n_tokens] float64 one-hot row membership of the flat tokens."""
    n = labels.numel()
    if cu_seqlens is None:
        b, t = labels.shape
        rows = torch.arange(b).repeat_interleave(t)
        num = b
    else:
        cu = [int(c) for c in cu_seqlens]
        num = len(cu) - 1
        rows = torch.cat([torch.full((cu[i + 1] - cu[i],), i) for i in range(num)]) if n else \
            torch.zeros(0, dtype=torch.int64)
    member = torch.zeros(num, n, dtype=torch.float64)
    member[rows, torch.arange(n)] = 1.0
    return member


def token_stats(x64, labels, temperature, valid):
    """(logp, entropy) of every position, float64, 0 where not valid. x64: [..., V] float64 leaf."""
    z = x64 / temperature
    lsm = torch.log_softmax(z, dim=-1)
    lp = lsm.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    p = lsm.exp()
    ent = -(torch.where(p > 0, p * lsm, torch.zeros_like(p))).sum(-1)
    zero = torch.zeros((), dtype=torch.float64)
    return torch.where(valid, lp, zero), torch.where(valid, ent, zero)


def valid_positions(labels, mask, ignore_index=IGNORE):
    valid = labels != ignore_index
    if mask is not None:
        valid = valid & (mask != 0)
    return valid


def aggregate(x, valid, member, agg, max_len=None, normalizer=None):
    """Agg(x) over the valid positions (flat float64 tensors); empty rows never count. An explicit
    `normalizer` (a float) replaces the mode's denominator; a zero denominator gives 0."""
    x = torch.where(valid, x, torch.zeros((), dtype=torch.float64)).reshape(-1)
    v = valid.reshape(-1).to(torch.float64)
    lengths = member @ v
    nonempty = (lengths > 0).sum().to(torch.float64)
    if agg == "token-mean":
        num, den = x.sum(), v.sum()
    elif agg == "seq-mean-token-sum":
        num, den = x.sum(), nonempty
    elif agg == "seq-mean-token-mean":
        num, den = ((member @ x) / lengths.clamp(min=1)).sum(), nonempty
    elif agg == "seq-mean-token-sum-norm":
        num, den = x.sum(), nonempty * float(max_len)
    else:
        raise ValueError(agg)
    if normalizer is not None:
        den = torch.as_tensor(float(normalizer), dtype=torch.float64)
    return num / den if den > 0 else num * 0.0


def kl_value(lp, ref, estimator):
    u = ref - lp
    if estimator == "k1":
        return lp - ref
    if estimator == "k2":
        return 0.5 * u ** 2
    if estimator == "k3":
        return torch.expm1(u) - u
    if estimator == "low_var_kl":
        uc = u.clamp(-20.0, 20.0)
        return (torch.expm1(uc) - uc).clamp(-10.0, 10.0)
    raise ValueError(estimator)


# method -> (family, its shared-knob defaults); the families' per-token losses are in `_phi`
METHOD_FAMILY = {
    "ppo": ("clip", 0.2, None, None, "token-mean"),
    "grpo": ("clip", 0.2, None, None, "token-mean"),
    "dapo": ("clip", 0.2, 0.28, None, "token-mean"),
    "dr_grpo": ("clip", 0.2, None, None, "seq-mean-token-sum-norm"),
    "ecpo": ("ecpo", 0.2, None, None, "token-mean"),
    "gppo": ("gppo", 0.2, 0.28, None, "token-mean"),
    "gppo_klear": ("gppo", 0.2, 0.28, 10.0, "token-mean"),
    "cispo": ("cispo", 1.0, 0.2, None, "token-mean"),
    "cispo_scalerl": ("cispo", 1.0, 4.0, None, "token-mean"),
    "reinforce": ("reinforce", 0.2, None, None, "seq-mean-token-sum"),
    "gpg": ("reinforce", 0.2, None, None, "token-mean"),
    "sapo": ("sapo", 0.2, None, None, "token-mean"),
    "dro": ("dro", 0.2, None, None, "token-mean"),    # dro_beta has no default: pass it
    "dppo_tv": ("dppo_tv", 0.2, None, None, "token-mean"),
    "dppo_kl": ("dppo_kl", 0.2, None, None, "token-mean"),
}
_OWN_DEFAULTS = {"gppo": {"gppo_beta1": 1.0, "gppo_beta2": 1.0}, "gppo_klear": {"gppo_beta1": 0.25, "gppo_beta2": 1.0},
                 "ecpo": {"ecpo_delta": 0.1}, "sapo": {"sapo_tau_pos": 1.0, "sapo_tau_neg": 1.05},
                 "dppo_tv": {"dppo_is_cap": 20.0}, "dppo_kl": {"dppo_is_cap": 20.0}}


class PolicyOracle(NamedTuple):
    loss: torch.Tensor
    pg_loss: torch.Tensor
    grad: torch.Tensor
    logp: torch.Tensor
    entropy: torch.Tensor
    scale: torch.Tensor
    coef: torch.Tensor    # max over tokens of |dL/dlogp| + |dL/dH|
    # max over tokens of |d(dL/dlogp)/dlogp| (|logp| + 1): how far one float32 rounding of logp
    # moves the gradient. The KL terms make it absolute, not relative to dL/dlogp: k2's
    # dL/dlogp = kl_coef w (logp - ref) vanishes as logp -> ref while its rounding does not.
    logp_sensitivity: torch.Tensor = torch.zeros((), dtype=torch.float64)


def _phi(family, lp, old, adv, low, high, dual, ratio_log_clamp, opts):
    d = lp - old
    if ratio_log_clamp is not None:
        d = d.clamp(-ratio_log_clamp, ratio_log_clamp)

    def dual_clip(phi):
        if dual is None:
            return phi
        return torch.where(adv < 0, torch.minimum(phi, -dual * adv), phi)

    if family in ("clip", "ecpo"):
        if family == "ecpo":
            shift = math.log1p((high - 1.0) + opts["ecpo_delta"])
            d = d - (d.detach() - shift).clamp(min=0.0)
        r = torch.exp(d)
        return dual_clip(torch.maximum(-adv * r, -adv * r.clamp(low, high)))
    if family == "gppo":
        r = torch.exp(d)
        rd = r.detach()
        one = torch.exp(d - d.detach())
        lo_c = (adv < 0) & (rd < low)
        hi_c = (adv > 0) & (rd > high)
        phi = torch.where(lo_c, -opts["gppo_beta1"] * low * one * adv,
                          torch.where(hi_c, -opts["gppo_beta2"] * high * one * adv, -r * adv))
        return dual_clip(phi)
    if family == "cispo":
        w = torch.exp(d).detach().clamp(low, high)
        return -w * adv * lp
    if family == "reinforce":
        return -opts.get("gpg_alpha", 1.0) * adv * lp
    if family == "sapo":
        tau = torch.where(adv > 0, torch.full_like(adv, opts["sapo_tau_pos"]), torch.full_like(adv, opts["sapo_tau_neg"]))
        return -(4.0 / tau) * torch.sigmoid(tau * (torch.exp(d) - 1.0)) * adv
    if family == "dro":
        # docs/methods.md §2.45: -A logp + beta/2 (logp - old)^2, the log-ratio unclamped (no exp)
        return -adv * lp + 0.5 * opts["dro_beta"] * (lp - old) ** 2
    if family in ("dppo_tv", "dppo_kl"):
        # docs/methods.md §2.35: -sg(min(r, C)) A logp where the sampled token's probability stayed in
        # the region on the side A pushes (A > 0: delta_high above p_old), 0 elsewhere; the bounds
        # are clip_low/clip_high themselves (low = 1 - clip_low, high = 1 + clip_high here)
        delta_low, delta_high = 1.0 - low, high - 1.0
        p, p_old = torch.exp(lp.detach()), torch.exp(old)
        pos = adv > 0
        if family == "dppo_tv":
            ok_pos, ok_neg = p - p_old <= delta_high, p_old - p <= delta_low
        else:
            eps = 1e-8
            bkl = p_old * torch.log(p_old / p) + (1 - p_old) * torch.log((1 - p_old + eps) / (1 - p + eps))
            ok_pos, ok_neg = (bkl <= delta_high) | (p <= p_old), (bkl <= delta_low) | (p >= p_old)
        w = torch.where(pos, ok_pos, ok_neg).double() * torch.minimum(torch.exp(d.detach()), torch.tensor(
            opts["dppo_is_cap"], dtype=torch.float64))
        return -w * adv * lp
    raise ValueError(family)


def _knobs(defaults, method, opts, clip_low, clip_high, clip_ratio_c, agg):
    """(family, options, clip_low, clip_high, dual clip, agg): the given ones over the method's
    (family, clip_low, clip_high, dual clip, agg) defaults and its own options' defaults."""
    family, d_low, d_high, d_dual, d_agg = defaults
    clip_low = d_low if clip_low is None else clip_low
    clip_high = (d_high if d_high is not None else clip_low) if clip_high is None else clip_high
    return (family, {**_OWN_DEFAULTS.get(method, {}), **opts}, clip_low, clip_high,
            d_dual if clip_ratio_c is None else clip_ratio_c, d_agg if agg is None else agg)


def policy_loss(logits, labels, old_logp, advantages, mask=None, *, method="grpo", temperature=1.0,
                clip_low=None, clip_high=None, clip_ratio_c=None, ref_logp=None, kl_coef=0.0,
                kl_estimator="k3", entropy_coef=0.0, agg=None, max_len=None, normalizer=None,
                rollout_is_weights=None, ratio_log_clamp=20.0, cu_seqlens=None, ignore_index=IGNORE,
                **opts):
    """PolicyOracle(loss, pg_loss, dloss/dlogits, logp, entropy, scale, coef) in float64 for
    fused_policy_loss's arguments; `scale` is the aggregate of the terms' absolute values, `coef`
    the largest per-token |dL/dlogp| + |dL/dH|.
    `advantages` per sequence [B] or per token; `old_logp=None` is on-policy."""
    family, opts, clip_low, clip_high, dual, agg = _knobs(METHOD_FAMILY[method], method, opts, clip_low, clip_high,
                                                          clip_ratio_c, agg)
    low, high = 1.0 - clip_low, 1.0 + clip_high

    x = logits.detach().to(torch.float64).requires_grad_()
    valid = valid_positions(labels, mask, ignore_index)
    lp, ent = token_stats(x, labels, temperature, valid)
    member = _rows(labels, cu_seqlens)
    zero = torch.zeros((), dtype=torch.float64)

    def tok(t):
        return torch.where(valid, t.detach().to(torch.float64), zero)

    adv = advantages.detach().to(torch.float64)
    if adv.shape != labels.shape:
        adv = (member.T @ adv).reshape(labels.shape)  # per sequence, broadcast over the row
    adv = torch.where(valid, adv, zero)
    old = lp.detach() if old_logp is None else tok(old_logp)
    phi = _phi(family, lp, old, adv, low, high, dual, ratio_log_clamp, opts)
    if rollout_is_weights is not None:
        phi = phi * tok(rollout_is_weights)

    def agg_(t):
        return aggregate(t, valid, member, agg, max_len, normalizer)

    pg = agg_(phi)
    loss = pg
    # the size of the terms that cancel in the sum: float32 rounding is relative to it
    scale = agg_(phi.detach().abs())
    sensitivity = torch.zeros((), dtype=torch.float64)
    if kl_coef:
        kl = kl_value(lp, tok(ref_logp), kl_estimator)
        loss = loss + kl_coef * agg_(kl)
        scale = scale + kl_coef * agg_(kl.detach().abs())
        if valid.any():
            # the KL part's curvature: aggregation weight (agg is linear) x d2KL/dlogp2, per token
            lp_ = lp.detach().requires_grad_()
            slope, = torch.autograd.grad(kl_value(lp_, tok(ref_logp), kl_estimator).sum(), lp_, create_graph=True)
            curv = (torch.autograd.grad(slope.sum(), lp_, allow_unused=True, materialize_grads=True)[0]
                    if slope.requires_grad else torch.zeros_like(lp_))  # k1: a constant slope
            t = torch.zeros_like(lp_, requires_grad=True)
            weight, = torch.autograd.grad(agg_(t), t, allow_unused=True, materialize_grads=True)
            sensitivity = (kl_coef * weight.abs() * curv.abs() * (lp.detach().abs() + 1))[valid].max()
    if entropy_coef:
        loss = loss - entropy_coef * agg_(ent)
        scale = scale + abs(entropy_coef) * agg_(ent.detach())
    grad, a, b = torch.autograd.grad(loss, (x, lp, ent), allow_unused=True, materialize_grads=True)
    # the largest per-token coefficient: the scale of a gradient entry's rounding noise
    coef = (a.abs() + b.abs()).max() if a.numel() else torch.zeros((), dtype=torch.float64)
    return PolicyOracle(loss.detach(), pg.detach(), grad, lp.detach(), ent.detach(), scale.detach(), coef,
                        sensitivity.detach())


def policy_loss_graph(logp, old_logp, advantages, mask, *, method="grpo", clip_low=None, clip_high=None,
                      clip_ratio_c=None, agg=None, max_len=None, normalizer=None, ratio_log_clamp=20.0,
                      ref_logp=None, kl_coef=0.0, kl_estimator="k3", bapo_bounds=None, absolute=False, **opts):
    """The float64 loss of policy_loss's arguments on given `[B, T]` log-probs, differentiable w.r.t.
    `logp` (no entropy or IS weights): the token-level methods of METHOD_FAMILY, GSPO (sequence ratio
    exp(mean log-ratio) capped at e^10; gspo-token: sg(s) exp(logp - sg(logp))) and BAPO (PPO with
    absolute bounds `bapo_bounds`, else the paper search's over this call's tokens). Positions with
    mask == 0 count nowhere (whatever their log-probs). absolute=True: the same aggregation of the
    terms' absolute values."""
    if method in ("gspo", "gspo-token"):
        defaults = ("gspo", 3e-4, 4e-4, None, "seq-mean-token-mean")
    elif method == "bapo":
        defaults = ("clip", 0.2, None, None, "token-mean")
    else:
        defaults = METHOD_FAMILY[method]
    family, opts, clip_low, clip_high, dual, agg = _knobs(defaults, method, opts, clip_low, clip_high, clip_ratio_c,
                                                          agg)
    low, high = 1.0 - clip_low, 1.0 + clip_high
    valid = mask.detach().cpu() != 0
    member = _rows(valid, None)
    zero = torch.zeros((), dtype=torch.float64)
    lp = torch.where(valid, logp.to(torch.float64), zero)
    adv = advantages.detach().to(torch.float64)
    if adv.shape != valid.shape:
        adv = (member.T @ adv).reshape(valid.shape)
    adv = torch.where(valid, adv, zero)
    old = lp.detach() if old_logp is None else torch.where(valid, old_logp.detach().to(torch.float64), zero)
    if family == "gspo":
        lengths = member @ valid.reshape(-1).to(torch.float64)
        seq = (member @ (lp - old).reshape(-1)) / lengths.clamp(min=1)
        log_s = (member.T @ seq).reshape(valid.shape)
        if method == "gspo-token":
            log_s = log_s.detach() + (lp - lp.detach())
        if ratio_log_clamp is not None:
            log_s = log_s.clamp(max=10.0)
        s = torch.exp(log_s)
        phi = torch.maximum(-adv * s, -adv * s.clamp(low, high))
        if dual is not None:
            phi = torch.where(adv < 0, torch.minimum(phi, -dual * adv), phi)
    else:
        if method == "bapo":
            if bapo_bounds is None:
                d = (lp.detach() - old) if ratio_log_clamp is None else \
                    (lp.detach() - old).clamp(-ratio_log_clamp, ratio_log_clamp)
                bapo_bounds = bapo_search_loop(torch.exp(d).numpy(), adv.numpy(), valid.numpy())
            low, high = bapo_bounds
        phi = _phi(family, lp, old, adv, low, high, dual, ratio_log_clamp, opts)
    size = torch.abs if absolute else (lambda t: t)
    loss = aggregate(size(phi), valid, member, agg, max_len, normalizer)
    if kl_coef:
        ref = torch.where(valid, ref_logp.detach().to(torch.float64), zero)
        kl = size(kl_value(lp, ref, kl_estimator))
        loss = loss + kl_coef * aggregate(kl, valid, member, agg, max_len, normalizer)
    return loss


def policy_loss_from_logp(logp, old_logp, advantages, mask, **kw):
    """(loss, dloss/dlogp, scale) in float64 of policy_loss_graph; `scale` is the aggregate of the
    terms' absolute values (the size float32 rounding is relative to)."""
    x = logp.detach().to(torch.float64).requires_grad_()
    loss = policy_loss_graph(x, old_logp, advantages, mask, **kw)
    (grad,) = torch.autograd.grad(loss, x)
    scale = policy_loss_graph(x.detach(), old_logp, advantages, mask, absolute=True, **kw)
    return loss.detach(), grad, scale


def bapo_search_loop(r, A, m, mode="paper", target=None, low_range=None, high_range=None,
                     low_step=None, high_step=None):
    """The bound search as the literal loop of Algorithm 1 (paper) / the official recipe."""
    official = mode == "official_code"
    target = target if target is not None else (1.0 if official else 0.4)
    a_lo, b_lo = low_range or ((0.6, 0.8) if official else (0.6, 0.9))
    a_hi, b_hi = high_range or ((1.2, 2.0) if official else (1.2, 3.0))
    d_lo = low_step or (0.05 if official else 0.02)
    d_hi = high_step or 0.05
    D = lambda x: Decimal(repr(float(x)))  # noqa: E731
    sel = m.astype(bool)
    r, A = r[sel].astype(np.float64), A[sel].astype(np.float64)

    def stat(c_lo, c_hi):
        if not official:
            sp = float(np.sum(np.where((A > 0) & (r <= c_hi), r * np.abs(A), 0.0)))
            sm = float(np.sum(np.where((A < 0) & (r >= c_lo), r * np.abs(A), 0.0)))
            return sp / (sp + sm) if sp + sm > 0 else 0.0
        sp = float(np.sum(np.where(A >= 0, np.minimum(r, c_hi) * A, 0.0)))
        sm = float(np.sum(np.where(A < 0, np.maximum(r, c_lo) * -A, 0.0)))
        return math.inf if sm <= 0 else sp / (sm + 1e-8)

    if not official:
        n_lo = n_hi = 0
        if not np.any(A != 0):
            return float(D(a_lo)), float(D(a_hi))
        rho = stat(float(D(a_lo)), float(D(a_hi)))
        while rho < target and D(a_lo) + (n_lo + 1) * D(d_lo) <= D(b_lo):
            if D(a_hi) + (n_hi + 1) * D(d_hi) <= D(b_hi):
                n_hi += 1
            else:
                n_lo += 1
            rho = stat(float(D(a_lo) + n_lo * D(d_lo)), float(D(a_hi) + n_hi * D(d_hi)))
        return float(D(a_lo) + n_lo * D(d_lo)), float(D(a_hi) + n_hi * D(d_hi))
    lo, hi = D(a_lo), D(a_hi)
    if not np.any(A != 0):
        return float(lo), float(hi)
    rho = stat(float(lo), float(hi))
    while rho < target and lo < D(b_lo):
        lo = min(lo + D(d_lo), D(b_lo))
        rho = stat(float(lo), float(hi))
    while rho < target and hi < D(b_hi):
        hi = min(hi + D(d_hi), D(b_hi))
        rho = stat(float(lo), float(hi))
    return float(lo), float(hi)




def sequence_logprobs(logits, labels, mask=None, *, temperature=1.0, cu_seqlens=None, ignore_index=IGNORE):
    """(x64 leaf, sums [B], means [B], lengths [B]) in float64; an empty row's mean is 0."""
    x = logits.detach().to(torch.float64).requires_grad_()
    valid = valid_positions(labels, mask, ignore_index)
    lp, _ = token_stats(x, labels, temperature, valid)
    member = _rows(labels, cu_seqlens)
    sums = member @ lp.reshape(-1)
    lengths = member @ valid.reshape(-1).to(torch.float64)
    return x, sums, sums / lengths.clamp(min=1), lengths


def sft_loss(logits, labels, mask=None, *, weighting="none", temperature=1.0, cu_seqlens=None,
             ignore_index=IGNORE):
    """(loss, grad) of the token-mean (weighted) NLL, float64."""
    x = logits.detach().to(torch.float64).requires_grad_()
    valid = valid_positions(labels, mask, ignore_index)
    lp, _ = token_stats(x, labels, temperature, valid)
    w = torch.ones_like(lp) if weighting == "none" else lp.detach().exp()
    count = valid.sum().to(torch.float64)
    total = -(torch.where(valid, w * lp, torch.zeros((), dtype=torch.float64))).sum()
    loss = total / count if count > 0 else total * 0.0
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


def dpo_sigmoid(chosen, rejected, ref_chosen, ref_rejected, beta):
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    return (-F.logsigmoid(beta * h)).mean()


def orpo(sum_w, sum_l, len_w, len_l, beta, logp_clamp=-1e-6):
    """ORPO with the response-only token-mean NLL; mean log-probs clamped to <= -1e-6."""
    mw = (sum_w / len_w.clamp(min=1)).clamp(max=logp_clamp)
    ml = (sum_l / len_l.clamp(min=1)).clamp(max=logp_clamp)
    log_odds = (mw - ml) - (torch.log(-torch.expm1(mw)) - torch.log(-torch.expm1(ml)))
    odds = (-beta * F.logsigmoid(log_odds)).mean()
    tokens = len_w.sum()
    nll = -sum_w.sum() / tokens if tokens > 0 else sum_w.sum() * 0.0
    return nll + odds
