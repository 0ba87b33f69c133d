"""policy_loss and fused_policy_loss against an independent float64 oracle (docs/methods.md §1-§3).

The oracle below is written from docs/methods.md's analytic per-token values and weights
(w = dphi/dlogp), the aggregation weights of §1.6 and the KL derivatives of §1.10, in numpy with
explicit branches; it shares no code with alignops.policy (whose gradients come
from autograd). Ratios are kept away from clip bounds (ties are measure-zero, docs/methods.md §2.1).
"""
from __future__ import annotations

import math
import zlib

import numpy as np

# the BAPO search as a literal loop (tests/test_fuzz.py imports it from here)
from tests.policy_oracle import bapo_search_loop  # noqa: E402


def ppo_value_weight(r, A, lo, hi, dual=None):
    """-min(rA, clip(r)A) and its d/dlogp given dr/dlogp = r, per docs/methods.md §2.1."""
    value = -np.minimum(r * A, np.clip(r, lo, hi) * A)
    w = np.where(A >= 0, np.where(r <= hi, -r * A, 0.0), np.where(r < lo, 0.0, -r * A))
    if dual is not None:
        capped = (A < 0) & (value > -dual * A)
        value = np.where(capped, -dual * A, value)
        w = np.where(capped, 0.0, w)
    return value, w


def kl_value_grad(logp, ref, est):
    u = ref - logp
    if est == "k1":
        return logp - ref, np.ones_like(u)
    if est == "k2":
        return 0.5 * u * u, logp - ref
    if est == "k3":
        return np.expm1(u) - u, -np.expm1(u)
    if est == "low_var_kl":
        uc = np.clip(u, -20, 20)
        k = np.expm1(uc) - uc
        g = np.where((np.abs(u) > 20) | (k > 10) | (k < -10), 0.0, -np.expm1(uc))
        return np.clip(k, -10, 10), g
    raise AssertionError(est)


def oracle(method, logp, old, adv_tok, mask, *, agg="token-mean", clip_low=0.2, clip_high=None,
           clip_ratio_c=None, ref=None, kl_coef=0.0, kl_est="k3", ent=None, ent_coef=0.0,
           normalizer=None, max_len=None, is_w=None, ecpo_delta=0.1, ratio_level="token",
           beta1=1.0, beta2=1.0, alpha=1.0, bapo_bounds=None, tau_pos=1.0, tau_neg=1.05,
           vespo=(2.0, 3.0, 3.0, 2.0), dppo_is_cap=20.0, clip_cov=(2e-4, 1.0, 5.0, 0), kl_cov=(2e-4, 0.1),
           dro_beta=None):
    """Returns (loss, dL/dlogp, dL/dH) for [B, T] float64 numpy inputs."""
    logp, old, A = (np.asarray(x, np.float64) for x in (logp, old, adv_tok))
    m = np.asarray(mask, bool)
    B, T = logp.shape
    ch = clip_low if clip_high is None else clip_high
    lo, hi = 1 - clip_low, 1 + ch
    logp = np.where(m, logp, 0.0)
    old = np.where(m, old, 0.0)
    A = np.where(m, A, 0.0)
    L = m.sum(1)
    d = np.clip(logp - old, -20, 20)
    in_clamp = np.abs(logp - old) <= 20
    r = np.exp(d)
    grad = np.zeros((B, T))
    phi = np.zeros((B, T))
    if method in ("ppo", "grpo", "dapo", "dr_grpo"):
        phi, w = ppo_value_weight(r, A, lo, hi, clip_ratio_c)
        grad_tok = w * in_clamp
    elif method == "bapo":
        c_lo, c_hi = bapo_bounds
        phi, w = ppo_value_weight(r, A, c_lo, c_hi, clip_ratio_c)
        grad_tok = w * in_clamp
    elif method in ("gppo", "gppo_klear"):
        low_c = (A < 0) & (r < lo)
        high_c = (A > 0) & (r > hi)
        phi = np.where(low_c, -beta1 * lo * A, np.where(high_c, -beta2 * hi * A, -r * A))
        w = np.where(low_c, -beta1 * lo * A, np.where(high_c, -beta2 * hi * A, -r * A))
        if clip_ratio_c is not None:
            capped = (A < 0) & (phi > -clip_ratio_c * A)
            phi = np.where(capped, -clip_ratio_c * A, phi)
            w = np.where(capped, 0.0, w)
        grad_tok = w * in_clamp
    elif method in ("cispo", "cispo_scalerl"):
        rc = np.clip(r, lo, hi)
        phi, grad_tok = -rc * A * logp, -rc * A
    elif method == "ecpo" and ratio_level == "token":
        rho = np.minimum(r, 1 + ch + ecpo_delta)
        phi, w = ppo_value_weight(rho, A, lo, hi, clip_ratio_c)
        grad_tok = w * in_clamp
    elif method in ("reinforce", "gpg"):
        phi, grad_tok = -alpha * A * logp, -alpha * A * np.ones_like(logp)
    elif method == "sapo":
        tau = np.where(A > 0, tau_pos, tau_neg)
        sig = 1.0 / (1.0 + np.exp(-tau * (r - 1.0)))
        phi, grad_tok = -(4.0 / tau) * sig * A, -4.0 * sig * (1.0 - sig) * r * A * in_clamp
    elif method == "vespo":
        gate = vespo_gate(d, A, m, vespo)
        phi, grad_tok = -gate * A * logp, -gate * A
    elif method in ("dppo_tv", "dppo_kl"):
        w = np.minimum(r, dppo_is_cap) * dppo_inside(method, logp, old, A, clip_low, ch)
        phi, grad_tok = -w * A * logp, -w * A
    elif method == "clip_cov":
        phi, w = ppo_value_weight(r, A, lo, hi, clip_ratio_c)
        keep = ~clip_cov_dropped(logp, A, m, r, lo, hi, *clip_cov)
        phi, grad_tok = phi * keep, w * in_clamp * keep
    elif method == "kl_cov":
        sel = kl_cov_selected(logp, A, m, kl_cov[0])
        raw = logp - old      # the penalty's log-ratio is not clamped (no exp)
        phi = -r * A + sel * kl_cov[1] * np.abs(raw)
        grad_tok = -r * A * in_clamp + sel * kl_cov[1] * np.sign(raw)
    elif method == "dro":
        raw = logp - old
        phi, grad_tok = -A * logp + 0.5 * dro_beta * raw * raw, -A + dro_beta * raw
    elif method == "geo_mean":
        grad_tok = None
    elif method in ("gspo", "gspo-token") or method == "ecpo":
        grad_tok = None
    else:
        raise AssertionError(method)
    if method == "geo_mean":
        phi, s_row, live = gmpo_parts(logp, old, A, m, clip_low, ch)

    # aggregation weights a_t (docs/methods.md §1.6); empty rows never counted
    nonempty = int((L > 0).sum())
    if normalizer == 0 or (normalizer is None and not m.any()):
        normalizer = math.inf   # docs/methods.md §00.2: a zero normaliser gives loss 0, gradient 0
    if agg == "token-mean":
        a = m / (normalizer if normalizer is not None else m.sum())
    elif agg == "seq-mean-token-mean":
        a = m / np.maximum(L, 1)[:, None] / (normalizer if normalizer is not None else nonempty)
    elif agg == "seq-mean-token-sum":
        a = m / (normalizer if normalizer is not None else nonempty)
    else:
        a = m / (normalizer if normalizer is not None else nonempty * max_len)

    isw = np.ones((B, T)) if is_w is None else np.asarray(is_w, np.float64)
    if grad_tok is not None:
        grad = a * isw * grad_tok
    elif method == "geo_mean":
        # phi_t = -mean(A) s_i on every token of row i; d s_i / d logp_t = s_i live_t / L_i
        for i in range(B):
            if L[i]:
                abar = A[i][m[i]].sum() / L[i]
                grad[i] = m[i] * (-abar * s_row[i] / L[i]) * live[i] * (a[i] * isw[i]).sum()
    else:
        # sequence ratios: phi_t depends on every token of its row through the row's mean log-ratio
        for i in range(B):
            if L[i] == 0:
                continue
            dm = (logp[i] - old[i])[m[i]].sum() / L[i]
            if method == "ecpo":
                dm_e = min(dm, math.log(1 + ch + ecpo_delta))
                s = math.exp(dm_e)
                phi[i], w = ppo_value_weight(np.full(T, s), A[i], lo, hi, clip_ratio_c)
                live = 1.0
            else:
                s = math.exp(min(dm, 10.0))
                phi[i], w = ppo_value_weight(np.full(T, s), A[i], lo, hi, clip_ratio_c)
                live = 0.0 if dm > 10 else 1.0
            if method == "gspo-token":
                grad[i] = a[i] * isw[i] * w * live
            else:
                grad[i] = m[i] * (a[i] * isw[i] * w).sum() / L[i] * live
    loss = float((a * isw * phi).sum())
    if ref is not None and kl_coef:
        kv, kg = kl_value_grad(logp, np.where(m, ref, 0.0), kl_est)
        loss += kl_coef * float((a * kv).sum())
        grad = grad + kl_coef * a * kg
    grad_h = np.zeros((B, T))
    if ent is not None and ent_coef:
        e = np.where(m, np.asarray(ent, np.float64), 0.0)
        loss -= ent_coef * float((a * e).sum())
        grad_h = -ent_coef * a
    return loss, grad, grad_h


def token_cov(logp, A, m):
    """(A - mean A)(logp - mean logp), the means over the masked-in tokens (docs/methods.md §2.44)."""
    n = max(int(m.sum()), 1)
    return (A - np.where(m, A, 0.0).sum() / n) * (logp - np.where(m, logp, 0.0).sum() / n)


def clip_cov_dropped(logp, A, m, r, lo, hi, ratio, lb, ub, seed):
    """Clip-Cov's dropped tokens (docs/methods.md §2.44): max(int(ratio N), 1) of the candidates (masked in,
    not clipped by PPO, covariance in (lb, ub)) taken in row-major order by a permutation drawn with
    torch.randperm from a CPU generator seeded with `seed` (the draw the method documents)."""
    cov = token_cov(logp, A, m)
    ppo_clipped = ((A > 0) & (r > hi)) | ((A < 0) & (r < lo))
    idx = np.flatnonzero(m & ~ppo_clipped & (cov > lb) & (cov < ub))
    drop = np.zeros(m.shape, bool)
    if idx.size:
        perm = torch.randperm(idx.size, generator=torch.Generator().manual_seed(seed)).numpy()
        drop.flat[idx[perm[:max(int(ratio * int(m.sum())), 1)]]] = True
    return drop


def kl_cov_selected(logp, A, m, ratio):
    """KL-Cov's penalised tokens (docs/methods.md §2.44): the max(int(ratio N), 1) masked-in tokens of largest
    covariance, the earlier (row-major) first among equal ones."""
    sel = np.zeros(m.shape, bool)
    idx = np.flatnonzero(m)
    if idx.size:
        order = np.argsort(-token_cov(logp, A, m).flat[idx], kind="stable")
        sel.flat[idx[order[:max(int(idx.size * ratio), 1)]]] = True
    return sel


def dppo_inside(method, logp, old, A, low, high):
    """DPPO's trust region (docs/methods.md §2.35): 1 where the sampled token's probability stayed
    within the divergence bound on the side its advantage pushes (A > 0: high, else low)."""
    p, po = np.exp(logp), np.exp(old)
    if method == "dppo_tv":
        inside = np.where(A > 0, p - po <= high, p - po >= -low)
    else:
        with np.errstate(invalid="ignore"):  # the batches' old log-probs may exceed 0: NaN compares False
            kl = po * (old - logp) + (1 - po) * np.log((1 - po + 1e-8) / (1 - p + 1e-8))
        inside = np.where(A > 0, (kl <= high) | (p <= po), (kl <= low) | (p >= po))
    return inside.astype(np.float64)


def gmpo_parts(logp, old, A, m, low, high):
    """GMPO (docs/methods.md §2.36): (phi per token, s per row, live per token) where s_i is the
    exp of the row mean of sgn(A) min(sgn(A) d, sgn(A) clip(d, -low, high)) and live_t = 1 where that
    term moves with logp_t (A = 0 contributes 0 and never moves)."""
    d = np.clip(logp - old, -20, 20)   # the +-20 clamp of every method (docs/methods.md §1.4)
    sg = np.sign(A)
    dmin = sg * np.minimum(sg * d, sg * np.clip(d, -low, high))
    live = np.where(sg > 0, d <= high, np.where(sg < 0, d >= -low, False)) & (np.abs(logp - old) <= 20)
    L = np.maximum(m.sum(1), 1)
    s = np.exp(np.where(m, dmin, 0.0).sum(1) / L)
    abar = np.where(m, A, 0.0).sum(1) / L
    return np.repeat((-abar * s)[:, None], d.shape[1], 1), s, live.astype(np.float64)


def vespo_gate(d, A, m, params):
    """VESPO's detached gate per token (docs/methods.md §2.34): the row's log-weight is the sum of its
    (+-20 clamped) token log-ratios clamped to [log 1e-8, 20]; g(w) = exp(lam + k log w - lam w) with
    (k, lam) = (k_pos, lam_pos) where A >= 0, else (k_neg, lam_neg)."""
    k_pos, lam_pos, k_neg, lam_neg = params
    log_w = np.clip(np.where(m, d, 0.0).sum(1, keepdims=True), math.log(1e-8), 20.0)
    k = np.where(A >= 0, k_pos, k_neg)
    lam = np.where(A >= 0, lam_pos, lam_neg)
    return np.exp(lam + k * log_w - lam * np.exp(log_w))


def bapo_rho(r, A, m, c_lo, c_hi):
    """BAPO's positive share at bounds (c_lo, c_hi), paper form: the |A|-weighted ratio mass of the
    positive tokens the upper bound lets through over that of both signs."""
    sel = np.asarray(m, bool)
    r, A = np.asarray(r, np.float64)[sel], np.asarray(A, np.float64)[sel]
    sp = float(np.sum(np.where((A > 0) & (r <= c_hi), r * np.abs(A), 0.0)))
    sm = float(np.sum(np.where((A < 0) & (r >= c_lo), r * np.abs(A), 0.0)))
    return sp / (sp + sm) if sp + sm > 0 else 0.0


def oracle_metrics(method, logp, old, adv_tok, mask, *, clip_low=0.2, clip_high=None, ref=None, kl_est="k3",
                   ent=None, pg_loss=0.0, ecpo_delta=0.1, ratio_level="token", bapo_bounds=None,
                   vespo=(2.0, 3.0, 3.0, 2.0), dppo_is_cap=20.0, clip_cov=(2e-4, 1.0, 5.0, 0), kl_cov=(2e-4, 0.1)):
    """The metrics of docs/design.md ("token-weighted over masked-in tokens", 0 when there are none)
    for [B, T] float64 numpy inputs: clip_ratio/low = r < 1 - clip_low with A < 0, clip_ratio/high =
    r > 1 + clip_high with A > 0, region their sum, ratio/mean and ratio/max of the method's ratio
    (ECPO's early-clipped one, GSPO's sequence ratio capped at e^10), approx_kl = mean(old - logp),
    kl and entropy where given, pg_loss as passed (the oracle's loss without the KL and entropy)."""
    logp, old, A = (np.asarray(x, np.float64) for x in (logp, old, adv_tok))
    m = np.asarray(mask, bool)
    n = max(int(m.sum()), 1)
    ch = clip_low if clip_high is None else clip_high
    d = np.clip(logp - old, -20, 20)
    if method in ("gspo", "gspo-token") or (method == "ecpo" and ratio_level == "sequence"):
        r = np.zeros_like(d)
        for i in range(d.shape[0]):
            if m[i].any():
                dm = ((logp[i] - old[i]) if method != "ecpo" else d[i])[m[i]].mean()
                cap = 10.0 if method != "ecpo" else math.log(1 + ch + ecpo_delta)
                r[i] = math.exp(min(dm, cap))
    elif method == "ecpo":
        r = np.exp(np.minimum(d, math.log(1 + ch + ecpo_delta)))
    elif method == "geo_mean":
        r = np.repeat(gmpo_parts(logp, old, A, m, clip_low, ch)[1][:, None], d.shape[1], 1)
    else:
        r = np.exp(d)

    def mean(x):
        return float(np.where(m, x, 0.0).sum() / n)
    out = {"pg_loss": pg_loss, "ratio/mean": mean(r), "ratio/max": float(r[m].max()) if m.any() else 0.0,
           "approx_kl": mean(old - logp)}
    bounds = {"bapo": bapo_bounds, "reinforce": None, "gpg": None, "sapo": None, "vespo": None, "dppo_tv": None,
              "dppo_kl": None, "geo_mean": None, "kl_cov": None, "dro": None}.get(method, (1 - clip_low, 1 + ch))
    if bounds is not None:
        low = ((r < bounds[0]) & (A < 0)).astype(np.float64)
        high = ((r > bounds[1]) & (A > 0)).astype(np.float64)
        out.update({"clip_ratio/low": mean(low), "clip_ratio/high": mean(high), "clip_ratio/region": mean(low + high)})
    if ref is not None:
        out["kl"] = mean(kl_value_grad(logp, np.asarray(ref, np.float64), kl_est)[0])
    if ent is not None:
        out["entropy"] = mean(np.asarray(ent, np.float64))
    if method == "bapo":
        out.update({"bapo/clip_low": bapo_bounds[0], "bapo/clip_high": bapo_bounds[1],
                    "bapo/rho": bapo_rho(r, A, m, *bapo_bounds)})
    if method == "gpg":
        out["gpg/alpha"] = 1.0   # no groups given: alpha 1
    if method == "clip_cov":
        out["clip_cov/clipped"] = mean(clip_cov_dropped(np.where(m, logp, 0.0), np.where(m, A, 0.0), m, r,
                                                        1 - clip_low, 1 + ch, *clip_cov))
    if method == "kl_cov":
        out["kl_cov/selected"] = mean(kl_cov_selected(np.where(m, logp, 0.0), np.where(m, A, 0.0), m, kl_cov[0]))
        out["kl_cov/abs_kl"] = mean(np.abs(logp - old))
    if method in ("dppo_tv", "dppo_kl"):
        inside = dppo_inside(method, logp, old, A, clip_low, ch) > 0
        out.update({"dppo/outside": mean(~inside), "dppo/truncated": mean(inside & (r > dppo_is_cap))})
    if method == "geo_mean":
        clipped = (logp - old != np.clip(logp - old, -clip_low, ch))
        out.update({"gmpo/clipped_pos": mean(clipped & (A > 0)), "gmpo/clipped_neg": mean(clipped & (A < 0))})
    if method == "vespo":
        # TRL's vespo/phi_seq_mean: the mean over the non-empty rows of the row's gate
        gate = vespo_gate(d, A, m, vespo)
        L = m.sum(1)
        per_row = np.where(m, gate, 0.0).sum(1)[L > 0] / L[L > 0]
        out["vespo/phi_seq_mean"] = float(per_row.mean()) if per_row.size else 0.0
    return out


# ============================================================================================
# tests

import os  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import assume, example, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import alignops as ao  # noqa: E402
from alignops.policy import METHODS, bapo_search, method_names  # noqa: E402
from alignops.policy import AGG_MODES, KL_ESTIMATORS  # noqa: E402
from alignops.policy.bapo import step_candidates  # noqa: E402
from tests import policy_oracle  # noqa: E402
from tests.conftest import device_backend_pairs  # noqa: E402

PAIRS = device_backend_pairs()
PAIR_IDS = [f"{d}-{b}" for d, b in PAIRS]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
RATIO_METHODS = ["ppo", "grpo", "dapo", "gppo", "gppo_klear", "cispo", "cispo_scalerl", "ecpo", "bapo",
                 "gspo", "gspo-token"]
ALL_METHODS = sorted(set(method_names()) | {"ecpo-seq"})

PAPER_CANDIDATES = step_candidates(0.6, 0.9, 0.02, clamp_last=False) + step_candidates(1.2, 3.0, 0.05, clamp_last=False)


# the options a method cannot run without (dro_beta), or needs to draw the same tokens twice (clip_cov)
REQUIRED_OPTIONS = {"dro": {"dro_beta": 0.5}, "clip_cov": {"clip_cov_seed": 0, "clip_cov_ratio": 0.3,
                                                           "clip_cov_lb": -0.5, "clip_cov_ub": 0.5}}


def defaults_of(method):
    d = METHODS[method].defaults
    return d["clip_low"], d["clip_high"], d["clip_ratio_c"]


def nudge_off_bounds(logp, old, bounds, gap=2e-3):
    """Moves old_logp so that no ratio lies within `gap` (relative) of a clip bound."""
    r = np.exp(logp - old)
    for b in (b for b in bounds if b > 0):
        close = np.abs(r / b - 1) < gap
        old = np.where(close, old - 3 * gap, old)
        r = np.exp(logp - old)
    return old


def make_batch(seed, B, T, *, spread=1.5, token_adv=False, empty_rows=True, zero_adv=True):
    g = np.random.default_rng(seed)
    logp = -g.random((B, T)) * 3 - 0.02
    old = logp + g.uniform(-spread, spread, (B, T))
    adv = g.normal(size=(B, T) if token_adv else (B,))
    if zero_adv:
        adv[g.random(adv.shape) < 0.15] = 0.0
    mask = g.random((B, T)) > 0.25
    if empty_rows and B > 1:
        mask[g.integers(B)] = False
    ref = logp + g.normal(size=(B, T)) * 0.7
    ent = g.random((B, T)) * 3
    isw = g.uniform(0.5, 2.0, (B, T))
    return dict(logp=logp, old=old, adv=adv, mask=mask, ref=ref, ent=ent, isw=isw)


def to_t(x, dtype):
    return torch.tensor(x, dtype=torch.float64).to(dtype)


def rounded(x, dtype):
    """The float64 value of x after rounding to dtype (the oracle sees what the code sees)."""
    return to_t(x, dtype).to(torch.float64).numpy()


def tolerances(dtype):
    return (1e-10, 1e-10) if dtype == torch.float64 else (2e-5, 2e-5)


def close(actual, expected, dtype, what, rounded_to=None):
    """fp32 math: within 2e-5 of the largest magnitude (fp64: 1e-10). A gradient returned in a
    low-precision leaf's dtype may additionally carry that dtype's one final rounding."""
    _, atol = tolerances(dtype)
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if not expected.size:
        return
    scale = max(1.0, float(np.max(np.abs(expected))))
    rounding = 0.0 if rounded_to is None else np.abs(expected) * torch.finfo(rounded_to).eps / 2
    excess = np.abs(actual - expected) - rounding - atol * scale
    assert np.all(excess <= 0), f"{what}: max error {np.max(np.abs(actual - expected)):.3e} (scale {scale:.3g})"


def effective_clip(name, clip_low=None, clip_high=None, clip_ratio_c=None):
    """(clip_low, clip_high, clip_ratio_c) that `name` runs with: the given ones over its defaults."""
    d_low, d_high, d_c = defaults_of(name)
    cl = d_low if clip_low is None else clip_low
    ch = (cl if d_high is None else d_high) if clip_high is None else clip_high
    cc = d_c if clip_ratio_c is None else clip_ratio_c
    return cl, ch, cc


def fed_old(name, logp, old, clip_low=None, clip_high=None, clip_ratio_c=None):
    """The old log-probs run_both feeds `name` with: `old` nudged off that method's bounds."""
    cl, ch, cc = effective_clip(name, clip_low, clip_high, clip_ratio_c)
    bounds = [1 - cl, 1 + ch] + ([cc] if cc else []) + ([1 + ch + 0.1] if name == "ecpo" else [])
    if name == "bapo":
        bounds = PAPER_CANDIDATES
    return nudge_off_bounds(logp, old, bounds)


def run_both(method, data, dtype, *, agg, kl_est, kl_coef, ent_coef, clip_low=None, clip_high=None,
             clip_ratio_c=None, normalizer=None, use_isw=False, ratio_level="token", extra=None):
    """(alignops loss, dL/dlogp, dL/dH, metrics), the oracle's (loss, dL/dlogp, dL/dH) and the
    oracle's metrics (oracle_metrics)."""
    B, T = data["logp"].shape
    name = "ecpo" if method == "ecpo-seq" else method
    cl, ch, cc = effective_clip(name, clip_low, clip_high, clip_ratio_c)
    data = dict(data)
    data["old"] = fed_old(name, data["logp"], data["old"], clip_low, clip_high, clip_ratio_c)
    max_len = T + 3
    kw = dict(method=name, clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c, agg=agg,
              kl_estimator=kl_est, kl_coef=kl_coef, entropy_coef=ent_coef, normalizer=normalizer, **(extra or {}))
    if agg == "seq-mean-token-sum-norm":
        kw["max_len"] = max_len
    if name == "ecpo":
        kw["ratio_level"] = ratio_level
    logp = to_t(data["logp"], dtype).requires_grad_()
    ent = to_t(data["ent"], dtype).requires_grad_()
    out = ao.policy_loss(logp, to_t(data["old"], dtype), to_t(data["adv"], dtype), torch.tensor(data["mask"]),
                         ref_logp=to_t(data["ref"], dtype), entropy=ent,
                         rollout_is_weights=to_t(data["isw"], dtype) if use_isw else None, **kw)
    g_logp, g_ent = torch.autograd.grad(out.loss, [logp, ent], allow_unused=True)
    g_ent = torch.zeros_like(ent) if g_ent is None else g_ent

    R = {k: rounded(v, dtype) for k, v in data.items() if k not in ("mask",)}
    adv_tok = R["adv"] if R["adv"].ndim == 2 else np.repeat(R["adv"][:, None], T, 1)
    okw = dict(agg=agg, clip_low=cl, clip_high=ch, clip_ratio_c=cc, ref=R["ref"], kl_coef=kl_coef, kl_est=kl_est,
               ent=R["ent"], ent_coef=ent_coef, normalizer=normalizer, max_len=max_len,
               is_w=R["isw"] if use_isw else None, ratio_level=ratio_level)
    if name == "gppo_klear":
        okw.update(beta1=0.25, beta2=1.0)
    if extra and "gppo_beta1" in extra:
        okw.update(beta1=extra["gppo_beta1"], beta2=extra["gppo_beta2"])
    if extra and "ecpo_delta" in extra:
        okw.update(ecpo_delta=extra["ecpo_delta"])
    if extra and "sapo_tau_pos" in extra:
        okw.update(tau_pos=extra["sapo_tau_pos"], tau_neg=extra["sapo_tau_neg"])
    if extra and "dppo_is_cap" in extra:
        okw["dppo_is_cap"] = extra["dppo_is_cap"]
    if name in ("clip_cov", "kl_cov"):
        # the selection's hard edges: a covariance at lb / ub, or the k-th largest one level with the next
        # (N = 2 always ties: c_1 = c_2 in exact arithmetic, and fp32 and float64 break it differently; the
        # tie rule itself is tested in tests/test_integration_verl_losses.py::test_kl_cov_tie_rule)
        m = data["mask"]
        c = token_cov(np.where(m, R["logp"], 0.0), np.where(m, adv_tok, 0.0), m)[m]
        if name == "kl_cov" and c.size:
            k = max(int(c.size * (extra or {}).get("kl_cov_ratio", 2e-4)), 1)
            srt = np.sort(c)[::-1]
            assume(k >= c.size or srt[k - 1] - srt[k] > 1e-6 * max(abs(srt[k - 1]), 1e-3))
        if name == "clip_cov" and c.size:
            e = {"clip_cov_lb": 1.0, "clip_cov_ub": 5.0, **(extra or {})}
            assume(np.abs(c - e["clip_cov_lb"]).min() > 1e-6 and np.abs(c - e["clip_cov_ub"]).min() > 1e-6)
    if name == "clip_cov":
        e = {"clip_cov_ratio": 2e-4, "clip_cov_lb": 1.0, "clip_cov_ub": 5.0, **(extra or {})}
        okw["clip_cov"] = (e["clip_cov_ratio"], e["clip_cov_lb"], e["clip_cov_ub"], e["clip_cov_seed"])
    if name == "kl_cov":
        e = {"kl_cov_ratio": 2e-4, "kl_cov_coef": 0.1, **(extra or {})}
        okw["kl_cov"] = (e["kl_cov_ratio"], e["kl_cov_coef"])
    if name == "dro":
        okw["dro_beta"] = extra["dro_beta"]
    if extra and "vespo_k_pos" in extra:
        okw.update(vespo=tuple(extra[k] for k in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg",
                                                   "vespo_lambda_neg")))
    if name == "bapo":
        okw["bapo_bounds"] = bapo_search_loop(np.exp(np.clip(R["logp"] - R["old"], -20, 20)), adv_tok,
                                              data["mask"])
        # metrics are fp32 by contract; the search itself is checked bit-exactly in the BAPO tests
        assert out.metrics["bapo/clip_low"].item() == np.float32(okw["bapo_bounds"][0])
        assert out.metrics["bapo/clip_high"].item() == np.float32(okw["bapo_bounds"][1])
    expected = oracle(name, R["logp"], R["old"], adv_tok, data["mask"], **okw)
    pg_only = oracle(name, R["logp"], R["old"], adv_tok, data["mask"], **{**okw, "kl_coef": 0.0, "ent_coef": 0.0})
    e_metrics = oracle_metrics(name, R["logp"], R["old"], adv_tok, data["mask"], clip_low=cl, clip_high=ch,
                               ref=R["ref"], kl_est=kl_est, ent=R["ent"], pg_loss=pg_only[0],
                               ecpo_delta=okw.get("ecpo_delta", 0.1), ratio_level=ratio_level,
                               bapo_bounds=okw.get("bapo_bounds"), vespo=okw.get("vespo", (2.0, 3.0, 3.0, 2.0)),
                               dppo_is_cap=okw.get("dppo_is_cap", 20.0),
                               clip_cov=okw.get("clip_cov", (2e-4, 1.0, 5.0, 0)), kl_cov=okw.get("kl_cov", (2e-4, 0.1)))
    return (out.loss.item(), g_logp.double().numpy(), g_ent.double().numpy(), out.metrics), expected, e_metrics


# --------------------------------------------------------------------------------------------
# loss and gradient of every method against the oracle


# The covering draws: test_matches_float64_oracle always runs these explicit examples besides its
# random small ones, and test_every_clip_branch_is_hit checks that they reach every branch.
COVER = dict(seed=0, B=64, T=16, knobs=3)   # knobs=3: the dual clip 2.0 on the PPO surrogates
COVER_EXAMPLES = [dict(COVER, agg="token-mean", kl_est="k3", kl_coef=0.04, ent_coef=0.01, token_adv=False,
                       use_isw=True),
                  dict(COVER, agg="seq-mean-token-mean", kl_est="low_var_kl", kl_coef=0.04, ent_coef=0.0,
                       token_adv=True, use_isw=False)]


def clip_knobs(name, knobs):
    """The clip keywords test_matches_float64_oracle gives `name` for its `knobs` draw."""
    clip = {}
    if name in ("ppo", "grpo", "dapo", "ecpo", "gppo", "bapo") and knobs:
        clip = [{}, dict(clip_low=0.1), dict(clip_low=0.3, clip_high=0.28), dict(clip_ratio_c=2.0)][knobs]
        if name == "bapo":
            clip = dict(clip_ratio_c=2.0) if knobs == 3 else {}
    if name.startswith("gspo") and knobs >= 2:
        clip = dict(clip_low=0.2)   # wide enough that some sequences are inside the bounds
    return clip


def with_examples(examples):
    def wrap(f):
        for ex in reversed(examples):
            f = example(**ex)(f)
        return f
    return wrap


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("method", ALL_METHODS)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 5), T=st.integers(1, 7),
       agg=st.sampled_from(AGG_MODES), kl_est=st.sampled_from(KL_ESTIMATORS),
       kl_coef=st.sampled_from([0.0, 0.04]), ent_coef=st.sampled_from([0.0, 0.01]),
       token_adv=st.booleans(), use_isw=st.booleans(), knobs=st.integers(0, 3))
@with_examples(COVER_EXAMPLES)
def test_matches_float64_oracle(method, dtype, seed, B, T, agg, kl_est, kl_coef, ent_coef, token_adv, use_isw,
                                knobs):
    """Loss, both gradients and every metric against the float64 oracles, on random small batches
    and on the covering examples (COVER)."""
    name = "ecpo" if method == "ecpo-seq" else method
    clip = clip_knobs(name, knobs)
    extra = {}
    if name == "gppo" and knobs == 1:
        extra = dict(gppo_beta1=0.5, gppo_beta2=2.0)
    if name == "ecpo" and knobs == 2:
        extra = dict(ecpo_delta=0.3)
    if name == "sapo" and knobs == 1:
        extra = dict(sapo_tau_pos=0.5, sapo_tau_neg=2.0)
    if name in ("dppo_tv", "dppo_kl") and knobs == 1:
        extra = dict(dppo_is_cap=1.5)
    if name in ("dppo_tv", "dppo_kl", "geo_mean") and knobs >= 2:
        clip = dict(clip_low=0.05, clip_high=0.1)
    if name == "vespo" and knobs == 1:
        extra = dict(vespo_k_pos=0.5, vespo_lambda_pos=1.0, vespo_k_neg=1.0, vespo_lambda_neg=0.5)
    if name == "clip_cov":
        extra = [dict(), dict(clip_cov_ratio=0.3, clip_cov_lb=-0.5, clip_cov_ub=0.5),
                 dict(clip_cov_ratio=1.0, clip_cov_lb=-1.0, clip_cov_ub=1.0), dict(clip_cov_ratio=0.2)][knobs]
        extra["clip_cov_seed"] = seed % 5
        if knobs == 3:
            clip = dict(clip_ratio_c=2.0)
    if name == "kl_cov":
        extra = [dict(), dict(kl_cov_ratio=0.3, kl_cov_coef=1.0), dict(kl_cov_ratio=1.0), dict(kl_cov_coef=0.0)][knobs]
    if name == "dro":
        extra = dict(dro_beta=[0.1, 0.5, 2.0, 1e-3][knobs])
    spread = 0.4 if name.startswith("gspo") or name == "vespo" else 1.5
    data = make_batch(seed, B, T, spread=spread, token_adv=token_adv)
    (loss, g, gh, metrics), (e_loss, e_g, e_gh), e_metrics = run_both(
        method, data, dtype, agg=agg, kl_est=kl_est, kl_coef=kl_coef, ent_coef=ent_coef, use_isw=use_isw,
        ratio_level="sequence" if method == "ecpo-seq" else "token", extra=extra, **clip)
    close(loss, e_loss, dtype, "loss")
    low = dtype if dtype in (torch.bfloat16, torch.float16) else None
    close(g, e_g, dtype, "dL/dlogp", rounded_to=low)
    close(gh, e_gh, dtype, "dL/dH", rounded_to=low)
    assert set(metrics) == set(e_metrics), set(metrics) ^ set(e_metrics)
    for k, v in metrics.items():
        assert v.dtype == torch.float32 and v.dim() == 0 and not v.requires_grad, k
        # metrics are float32 by contract: the fp32 bound whatever the inputs' dtype
        close(v.item(), e_metrics[k], torch.float32, k)


@pytest.mark.parametrize("token_adv", [False, True])
def test_every_clip_branch_is_hit(token_adv):
    """The covering examples of test_matches_float64_oracle reach every branch on the inputs it
    feeds the methods (old nudged off the bounds, masked-in tokens only): r below, inside and above
    the bounds 0.8 / 1.2 / 1.28, and beyond the dual clip 2.0 it runs them with, for both advantage
    signs (otherwise the oracle comparison would prove little)."""
    ex = next(e for e in COVER_EXAMPLES if e["token_adv"] == token_adv)
    B, T = ex["B"], ex["T"]
    data = make_batch(ex["seed"], B, T, spread=1.5, token_adv=token_adv)
    m = data["mask"]
    A = data["adv"] if token_adv else np.repeat(data["adv"][:, None], T, 1)
    for name in ("ppo", "grpo", "dapo", "gppo", "ecpo"):
        clip = clip_knobs(name, ex["knobs"])
        cl, ch, cc = effective_clip(name, **clip)
        r = np.exp(data["logp"] - fed_old(name, data["logp"], data["old"], **clip))
        lo, hi = 1 - cl, 1 + ch
        for sign in (A > 0, A < 0):
            s = sign & m
            assert np.any(s & (r < lo)) and np.any(s & (r > lo) & (r < hi)) and np.any(s & (r > hi)), name
            assert np.any(s & (r > 1.2) & (r < 1.28)) and np.any(s & (r > 1.28)), name
            assert np.any(s & (r > (cc or 2.0))), name
        if name in ("ppo", "grpo", "dapo", "gppo"):
            assert cc == 2.0, name


# GPPO, CISPO and ECPO deliberately differ from the derivative of their value (stop-gradients), so
# gradcheck applies only to the methods whose gradient is the true one.
@pytest.mark.parametrize("method", ["grpo", "gspo", "reinforce"])
def test_gradcheck_float64(method):
    data = make_batch(3, 3, 5)
    data["old"] = nudge_off_bounds(data["logp"], data["old"], [0.8, 1.2, 1.28, 1 - 3e-4, 1 + 4e-4], gap=1e-2)
    logp = torch.tensor(data["logp"], requires_grad=True)
    ent = torch.tensor(data["ent"], requires_grad=True)

    def f(lp, h):
        return ao.policy_loss(lp, torch.tensor(data["old"]), torch.tensor(data["adv"]), torch.tensor(data["mask"]),
                              method=method, ref_logp=torch.tensor(data["ref"]), kl_coef=0.1, entropy=h,
                              entropy_coef=0.01, agg="seq-mean-token-mean").loss
    assert torch.autograd.gradcheck(f, (logp, ent))


# --------------------------------------------------------------------------------------------
# layouts and docs/methods.md §3.2 oracles


def to_packed(x, mask):
    """[B, T] -> packed [N] keeping every position of each row up to its last masked-in token."""
    return torch.cat([x[i, : int(mask[i].nonzero().max()) + 1] if mask[i].any() else x[i, :0]
                      for i in range(x.shape[0])])


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("agg", AGG_MODES)
def test_packed_layout_equals_padded(method, agg):
    name = "ecpo" if method == "ecpo-seq" else method
    data = make_batch(11, 4, 6, token_adv=False)
    m = torch.tensor(data["mask"])
    lens = [int(m[i].nonzero().max()) + 1 if m[i].any() else 0 for i in range(4)]
    cu = torch.tensor([0] + list(np.cumsum(lens)))
    kw = dict(method=name, agg=agg, max_len=9, kl_coef=0.1, entropy_coef=0.01, **REQUIRED_OPTIONS.get(name, {}))
    if method == "ecpo-seq":
        kw["ratio_level"] = "sequence"
    logp = torch.tensor(data["logp"], requires_grad=True)
    a = ao.policy_loss(logp, torch.tensor(data["old"]), torch.tensor(data["adv"]), m,
                       ref_logp=torch.tensor(data["ref"]), entropy=torch.tensor(data["ent"]), **kw)
    packed = to_packed(logp.detach(), m).requires_grad_()
    b = ao.policy_loss(packed, to_packed(torch.tensor(data["old"]), m), torch.tensor(data["adv"]),
                       to_packed(m, m), ref_logp=to_packed(torch.tensor(data["ref"]), m),
                       entropy=to_packed(torch.tensor(data["ent"]), m), cu_seqlens=cu, **kw)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-12, atol=1e-12)
    (ga,) = torch.autograd.grad(a.loss, logp)
    (gb,) = torch.autograd.grad(b.loss, packed)
    torch.testing.assert_close(to_packed(ga, m), gb, rtol=1e-12, atol=1e-12)
    for k in a.metrics:
        torch.testing.assert_close(a.metrics[k], b.metrics[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["ppo", "grpo", "dapo", "gppo", "bapo", "ecpo", "cispo", "gspo", "gspo-token"])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_on_policy_reduction(method, agg):
    """old = sg(logp): every ratio method's gradient is -sum a A grad(logp) (§3.2.1)."""
    data = make_batch(5, 4, 6)
    logp = torch.tensor(data["logp"], requires_grad=True)
    out = ao.policy_loss(logp, None, torch.tensor(data["adv"]), torch.tensor(data["mask"]), method=method,
                         agg=agg, max_len=8)
    (g,) = torch.autograd.grad(out.loss, logp)
    A = np.repeat(data["adv"][:, None], 6, 1)
    _, expected, _ = oracle("reinforce", data["logp"], data["logp"], A, data["mask"], agg=agg, max_len=8)
    np.testing.assert_allclose(g.numpy(), expected, rtol=1e-12, atol=1e-14)
    assert out.metrics["ratio/mean"].item() == pytest.approx(1.0 if data["mask"].any() else 0.0)


@pytest.mark.parametrize("method", ["grpo", "dapo", "gspo", "cispo", "reinforce", "ecpo-seq", "gppo"])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_micro_batch_invariance(method, agg):
    """Four micro-batches with the global normaliser sum to the full batch (§3.2.2), fp32."""
    name = "ecpo" if method == "ecpo-seq" else method
    extra = {"ratio_level": "sequence"} if method == "ecpo-seq" else {}
    data = make_batch(21, 16, 9)
    m = torch.tensor(data["mask"])
    L = m.sum(1)
    norm = {"token-mean": float(m.sum()), "seq-mean-token-mean": float((L > 0).sum()),
            "seq-mean-token-sum": float((L > 0).sum()), "seq-mean-token-sum-norm": float((L > 0).sum()) * 12}[agg]
    f32 = lambda k: torch.tensor(data[k], dtype=torch.float32)  # noqa: E731
    logp = f32("logp").requires_grad_()
    kw = dict(method=name, agg=agg, ref_logp=f32("ref"), kl_coef=0.05, entropy=f32("ent"), entropy_coef=0.01,
              **extra)
    full = ao.policy_loss(logp, f32("old"), f32("adv"), m, normalizer=norm, **kw)
    (g_full,) = torch.autograd.grad(full.loss, logp)
    total = 0.0
    logp2 = f32("logp").requires_grad_()
    for sl in (slice(0, 4), slice(4, 8), slice(8, 12), slice(12, 16)):
        kw_mb = dict(kw, ref_logp=kw["ref_logp"][sl], entropy=kw["entropy"][sl])
        part = ao.policy_loss(logp2[sl], f32("old")[sl], f32("adv")[sl], m[sl], normalizer=norm, **kw_mb)
        part.loss.backward()
        total = total + part.loss.detach()
    torch.testing.assert_close(total, full.loss.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logp2.grad, g_full, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("agg", AGG_MODES)
def test_mask_invariance(method, agg):
    """Padding columns and fully-masked rows holding garbage (inf, NaN, sentinels) change neither
    the loss nor the gradient (§3.2.3)."""
    name = "ecpo" if method == "ecpo-seq" else method
    extra = {"ratio_level": "sequence"} if method == "ecpo-seq" else {}
    if name == "gpg":
        extra = {"group_size": 1}
    extra.update(REQUIRED_OPTIONS.get(name, {}))
    data = make_batch(8, 3, 5)
    t = lambda x: torch.tensor(x)  # noqa: E731
    kw = dict(method=name, agg=agg, max_len=7, kl_coef=0.1, entropy_coef=0.02, **extra)
    logp = t(data["logp"]).requires_grad_()
    a = ao.policy_loss(logp, t(data["old"]), t(data["adv"]), t(data["mask"]), ref_logp=t(data["ref"]),
                       entropy=t(data["ent"]), **kw)
    (ga,) = torch.autograd.grad(a.loss, logp)

    def pad(x, fill):
        x = torch.cat([t(x), torch.full((3, 2), fill, dtype=torch.float64)], 1)
        return torch.cat([x, torch.full((2, 7), fill, dtype=torch.float64)], 0)
    mask = torch.zeros(5, 7, dtype=torch.bool)
    mask[:3, :5] = t(data["mask"])
    logp_p = pad(data["logp"], 1.0).requires_grad_()     # TRL's padding sentinel
    adv = torch.cat([t(data["adv"]), torch.tensor([5.0, -7.0])])
    b = ao.policy_loss(logp_p, pad(data["old"], -1e4), adv, mask, ref_logp=pad(data["ref"], math.nan),
                       entropy=pad(data["ent"], math.inf), **{**kw, "max_len": 7})
    (gb,) = torch.autograd.grad(b.loss, logp_p)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gb[:3, :5], ga, rtol=1e-12, atol=1e-12)
    assert torch.all(gb[3:] == 0) and torch.all(gb[:, 5:] == 0)
    for k in a.metrics:
        torch.testing.assert_close(a.metrics[k], b.metrics[k], rtol=1e-6, atol=1e-7, msg=k)


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("method", ["grpo", "gspo", "bapo", "cispo"])
def test_fully_masked_and_zero_normalizer(method, agg):
    logp = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    ent = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)
    kw = dict(method=method, agg=agg, max_len=4, ref_logp=torch.randn(3, 4, dtype=torch.float64), kl_coef=0.1,
              entropy=ent, entropy_coef=0.1)
    for mask, norm in ((torch.zeros(3, 4, dtype=torch.bool), None), (torch.ones(3, 4, dtype=torch.bool), 0.0)):
        out = ao.policy_loss(logp, logp.detach() + 0.3, torch.randn(3, dtype=torch.float64), mask,
                             normalizer=norm, **kw)
        g, gh = torch.autograd.grad(out.loss, [logp, ent])
        assert out.loss.item() == 0.0 and torch.all(g == 0) and torch.all(gh == 0)
        assert all(torch.isfinite(v) for v in out.metrics.values())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_clip_mask_oracle(dtype):
    """Zero-gradient tokens are exactly the analytically clipped ones for PPO/DAPO/BAPO, none for
    CISPO/GPPO, and ECPO's early-clipped tokens keep bounded weights (§3.2.5)."""
    data = make_batch(9, 24, 12, zero_adv=False, empty_rows=False)
    data["mask"][:] = True
    data["old"] = nudge_off_bounds(data["logp"], data["old"], PAPER_CANDIDATES + [0.8, 1.28, 1.3])
    logp0 = torch.tensor(data["logp"], dtype=dtype)
    old, adv = torch.tensor(data["old"], dtype=dtype), torch.tensor(data["adv"], dtype=dtype)
    r = torch.exp(logp0 - old).double().numpy()
    A = np.repeat(data["adv"][:, None], 12, 1)

    def grad(method, **kw):
        lp = logp0.clone().requires_grad_()
        out = ao.policy_loss(lp, old, adv, None, method=method, **kw)
        return torch.autograd.grad(out.loss, lp)[0].double().numpy(), out

    for method, lo, hi in (("ppo", 0.8, 1.2), ("dapo", 0.8, 1.28)):
        g, out = grad(method)
        clipped = ((A > 0) & (r > hi)) | ((A < 0) & (r < lo))
        assert np.array_equal(g == 0, clipped)
        assert out.metrics["clip_ratio/region"].item() == pytest.approx(clipped.mean(), abs=1e-6)
        assert out.metrics["clip_ratio/high"].item() == pytest.approx(((A > 0) & (r > hi)).mean(), abs=1e-6)
    g, out = grad("bapo")
    lo, hi = out.metrics["bapo/clip_low"].item(), out.metrics["bapo/clip_high"].item()
    assert np.array_equal(g == 0, ((A > 0) & (r > hi)) | ((A < 0) & (r < lo)))
    g, _ = grad("ppo", clip_ratio_c=3.0)
    assert np.array_equal(g == 0, ((A > 0) & (r > 1.2)) | ((A < 0) & (r < 0.8)) | ((A < 0) & (r > 3.0)))
    for method in ("cispo", "gppo"):
        g, _ = grad(method)
        assert not np.any(g == 0)
    g, _ = grad("ecpo", ecpo_delta=0.1)
    early = (A < 0) & (r > 1.3)
    n = A.size
    assert early.any() and not np.any(g[early] == 0)
    np.testing.assert_allclose(g[early], -1.3 * A[early] / n, rtol=1e-5 if dtype == torch.float32 else 1e-12)
    assert np.all(np.abs(g) * n <= np.maximum(1.3, r) * np.abs(A) * (1 + 1e-6))


# --------------------------------------------------------------------------------------------
# worked vectors of docs/methods.md §2.8, §2.11, §2.15-2.19


def one_token(method, r, A, **kw):
    logp = torch.tensor([[-1.0]], dtype=torch.float64, requires_grad=True)
    old = logp.detach() - math.log(r)
    out = ao.policy_loss(logp, old, torch.tensor([A], dtype=torch.float64), None, method=method, **kw)
    (g,) = torch.autograd.grad(out.loss, logp)
    return out.loss.item(), g.item()


@pytest.mark.parametrize("A", [-1.0, -0.37])
def test_ecpo_worked_vector(A):
    """§2.16: A < 0, r = 5, eps = 0.2, delta = 0.1: loss -1.3 A and w = -1.3 A; A >= 0 is GRPO."""
    loss, w = one_token("ecpo", 5.0, A, ecpo_delta=0.1)
    assert loss == pytest.approx(-1.3 * A, rel=1e-12) and w == pytest.approx(-1.3 * A, rel=1e-12)
    for r in (0.5, 1.1, 5.0):
        assert one_token("ecpo", r, 0.8) == pytest.approx(one_token("grpo", r, 0.8), rel=1e-12)


def test_cispo_worked_vector():
    """§2.17: A > 0, r = 10: PPO's gradient is 0, CISPO's weight is -r_hat A at the upper bound;
    on-policy CISPO has the GRPO token-mean gradient."""
    assert one_token("ppo", 10.0, 0.7)[1] == 0.0
    _, w = one_token("cispo", 10.0, 0.7, clip_high=4.0)
    assert w == pytest.approx(-5.0 * 0.7, rel=1e-12)
    assert one_token("cispo_scalerl", 10.0, 0.7)[1] == pytest.approx(-5.0 * 0.7, rel=1e-12)
    assert one_token("cispo", 0.01, -0.7)[1] == pytest.approx(0.01 * 0.7, rel=1e-12)  # no lower bound
    assert one_token("cispo", 1.0, 0.7)[1] == pytest.approx(one_token("grpo", 1.0, 0.7)[1], rel=1e-12)


def test_gppo_worked_vector():
    """§2.18: beta1 = beta2 = 1: value equals clip-higher PPO; gradients differ only on clipped
    tokens, where they are -(1 - eps_l) A and -(1 + eps_h) A."""
    for r, A in ((0.5, -1.0), (1.5, 2.0), (1.0, 1.0), (0.5, 1.0), (1.5, -1.0)):
        lg, wg = one_token("gppo", r, A)
        lp, wp = one_token("dapo", r, A)
        assert lg == pytest.approx(lp, rel=1e-12)
        if (A < 0 and r < 0.8) or (A > 0 and r > 1.28):
            assert wp == 0.0 and wg == pytest.approx(-(0.8 if A < 0 else 1.28) * A, rel=1e-12)
        else:
            assert wg == pytest.approx(wp, rel=1e-12)
    # beta1 != 1 changes the value of low-clipped tokens too
    assert one_token("gppo", 0.5, -1.0, gppo_beta1=0.25)[0] == pytest.approx(0.25 * 0.8, rel=1e-12)


def test_gspo_oracles():
    """§2.11: equal token ratios give s_i = r; L_i = 1 gives token PPO; gspo-token equals gspo in
    value and gradient for per-row advantages; the combined log-ratio clamps at +10 only."""
    logp = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64, requires_grad=True)
    out = ao.policy_loss(logp, logp.detach() - 0.1, torch.tensor([1.0], dtype=torch.float64), None, method="gspo")
    assert out.metrics["ratio/mean"].item() == pytest.approx(math.exp(0.1), rel=1e-6)
    for r, A in ((1.0002, 1.0), (1.5, 1.0), (0.5, -2.0), (1.0001, -1.0)):
        assert one_token("gspo", r, A) == pytest.approx(one_token("ppo", r, A, clip_low=3e-4, clip_high=4e-4),
                                                        rel=1e-12)
    data = make_batch(4, 5, 6, spread=0.05)
    res = []
    for method in ("gspo", "gspo-token"):
        lp = torch.tensor(data["logp"], requires_grad=True)
        o = ao.policy_loss(lp, torch.tensor(data["old"]), torch.tensor(data["adv"]), torch.tensor(data["mask"]),
                           method=method, clip_low=0.01)
        res.append((o.loss, torch.autograd.grad(o.loss, lp)[0]))
    torch.testing.assert_close(res[0][0], res[1][0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(res[0][1], res[1][1], rtol=1e-12, atol=1e-14)
    loss, w = one_token("gspo", math.exp(12.0), -1.0, clip_ratio_c=None)
    assert loss == pytest.approx(math.exp(10.0), rel=1e-12) and w == 0.0
    assert one_token("ppo", math.exp(25.0), -1.0)[1] == 0.0   # +-20 token clamp: zero gradient outside


def test_grpo_kl_and_agg_oracles():
    """§2.8: logp = ref_logp gives KL value and gradient exactly 0; seq-mean-token-mean equals
    token-mean when all rows have the same length."""
    data = make_batch(2, 4, 5, empty_rows=False)
    data["mask"][:] = True
    for est in KL_ESTIMATORS:
        lp = torch.tensor(data["logp"], requires_grad=True)
        out = ao.policy_loss(lp, None, torch.zeros(4, dtype=torch.float64), None, ref_logp=lp.detach(),
                             kl_coef=1.0, kl_estimator=est)
        (g,) = torch.autograd.grad(out.loss, lp)
        assert out.loss.item() == 0.0 and out.metrics["kl"].item() == 0.0
        # k1's gradient is 1 everywhere (docs/methods.md §1.10); the others vanish at logp = ref_logp
        assert torch.all(g == (0.05 if est == "k1" else 0.0))
    vals = [ao.policy_loss(torch.tensor(data["logp"]), torch.tensor(data["old"]), torch.tensor(data["adv"]), None,
                           agg=agg).loss for agg in ("token-mean", "seq-mean-token-mean")]
    torch.testing.assert_close(vals[0], vals[1], rtol=1e-14, atol=1e-15)


def test_kl_estimators_precision_and_clamps():
    def kl(est, u_values):
        lp = torch.full((1, len(u_values)), -1.0, dtype=torch.float64, requires_grad=True)
        ref = lp.detach() + torch.tensor([u_values], dtype=torch.float64)
        out = ao.policy_loss(lp, None, torch.zeros(1, dtype=torch.float64), None, ref_logp=ref, kl_coef=1.0,
                             kl_estimator=est, agg="seq-mean-token-sum")
        return out.loss.item(), torch.autograd.grad(out.loss, lp)[0][0].tolist()

    # k3 at u = 1e-9 is u^2/2 = 5e-19: computed as expm1(u) - u, not exp(u) - u - 1 (which gives ~1e-16)
    assert kl("k3", [1e-9])[0] == pytest.approx(5e-19, rel=1e-6)
    assert kl("k3", [-30.0])[0] == pytest.approx(math.exp(-30) + 29, rel=1e-12)   # unclamped
    assert kl("k2", [0.5]) == (pytest.approx(0.125), [pytest.approx(-0.5)])
    assert kl("k1", [0.5]) == (pytest.approx(-0.5), [pytest.approx(1.0)])
    # low_var_kl: u clamped to [-20, 20], value to [-10, 10], gradient 0 where clamped
    loss, g = kl("low_var_kl", [-30.0, 30.0, 3.0, 1.5, 1e-9])
    assert loss == pytest.approx(10 + 10 + 10 + (math.expm1(1.5) - 1.5) + 5e-19, rel=1e-12)
    assert g[:3] == [0.0, 0.0, 0.0] and g[3] == pytest.approx(-math.expm1(1.5), rel=1e-12)


def test_gpg_alpha_worked_vector():
    """§2.15: groups [1,0,0,0] and [1,1,1,1]: alpha = 2, A_hat = [1.5,-.5,-.5,-.5,0,0,0,0]; the
    gradient equals REINFORCE (token-mean) with these advantages; all groups invalid -> loss 0."""
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1], dtype=torch.float64)
    adv = torch.tensor([1.5, -0.5, -0.5, -0.5, 0, 0, 0, 0], dtype=torch.float64)
    logp = -torch.rand(8, 3, dtype=torch.float64)
    expected_g = None
    for kw in (dict(group_size=4), dict(group_ids=torch.tensor([7, 7, 7, 7, 2, 2, 2, 2])),
               dict(group_size=4, rewards=rewards), dict(gpg_alpha=2.0)):
        lp = logp.clone().requires_grad_()
        out = ao.policy_loss(lp, None, adv, None, method="gpg", **kw)
        (g,) = torch.autograd.grad(out.loss, lp)
        assert out.metrics["gpg/alpha"].item() == 2.0
        lp2 = logp.clone().requires_grad_()
        ref_out = ao.policy_loss(lp2, None, 2 * adv, None, method="reinforce", agg="token-mean")
        expected_g = torch.autograd.grad(ref_out.loss, lp2)[0]
        torch.testing.assert_close(g, expected_g, rtol=1e-14, atol=1e-15)
    out = ao.policy_loss(logp.clone().requires_grad_(), None, torch.zeros(8, dtype=torch.float64), None,
                         method="gpg", group_size=4)
    assert out.loss.item() == 0.0 and out.metrics["gpg/alpha"].item() == 0.0
    out = ao.policy_loss(logp, None, adv, None, method="gpg", gpg_alpha_mode="verl_nonzero", rewards=rewards)
    assert out.metrics["gpg/alpha"].item() == pytest.approx(8 / 5)


# --------------------------------------------------------------------------------------------
# BAPO's search


def bapo_case(r_values, advs):
    r = torch.tensor([r_values], dtype=torch.float64)
    A = torch.tensor([advs], dtype=torch.float64)
    return r, A, torch.ones_like(r, dtype=torch.bool)


def test_bapo_only_negative_tokens_end_at_the_far_bounds():
    """§2.19 oracle: only negative advantages -> c_high = b+ and the largest reachable c_low."""
    r, A, m = bapo_case([0.7, 0.95, 1.1, 2.0], [-1.0, -0.5, -2.0, -1.0])
    lo, hi, rho = bapo_search(r, A, m, mode="paper", target=0.4, low_range=(0.6, 0.9), high_range=(1.2, 3.0),
                              low_step=0.02, high_step=0.05)
    assert hi.item() == 3.0 and lo.item() == 0.9 and rho.item() == 0.0   # exact: integer step counters
    assert (lo.item(), hi.item()) == bapo_search_loop(r.numpy(), A.numpy(), m.numpy())


def test_bapo_share_already_met_keeps_start():
    r, A, m = bapo_case([1.0, 1.1, 0.9], [2.0, 1.0, -0.5])
    lo, hi, rho = bapo_search(r, A, m, mode="paper", target=0.4, low_range=(0.6, 0.9), high_range=(1.2, 3.0),
                              low_step=0.02, high_step=0.05)
    assert (lo.item(), hi.item()) == (0.6, 1.2) and rho.item() == pytest.approx(3.1 / 3.55)


def test_bapo_no_signal_keeps_start_and_official_mode():
    r, A, m = bapo_case([1.0, 2.0], [0.0, 0.0])
    for mode in ("paper", "official_code"):
        out = ao.policy_loss(torch.log(r).requires_grad_(), torch.zeros_like(r), A, m, method="bapo", bapo_mode=mode)
        assert out.metrics["bapo/clip_low"].item() == np.float32(0.6)
        assert out.metrics["bapo/clip_high"].item() == np.float32(1.2)
    # official_code: lower bound raised first with effective (clipped) ratios, then the upper one
    # (raising c_low there *grows* S- = sum max(r, c_low)|A|, so the search runs through to 0.8;
    # then S+ = min(1.5, c) + min(1.9, c) first exceeds S- = 2 * (0.8 + 0.8) = 3.2 at c = 1.75)
    r, A, m = bapo_case([1.5, 0.5, 0.7, 1.9], [1.0, -2.0, -2.0, 1.0])
    lo, hi, rho = bapo_search(r, A, m, mode="official_code", target=1.0, low_range=(0.6, 0.8),
                              high_range=(1.2, 2.0), low_step=0.05, high_step=0.05)
    assert (lo.item(), hi.item()) == (0.8, 1.75)
    assert rho.item() == pytest.approx(3.25 / 3.2)
    assert (lo.item(), hi.item()) == bapo_search_loop(r.numpy(), A.numpy(), m.numpy(), mode="official_code")


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 60), pos_frac=st.floats(0.0, 1.0),
       mode=st.sampled_from(["paper", "official_code"]), target=st.sampled_from([None, 0.2, 0.5, 0.9, 2.0]))
def test_bapo_search_matches_literal_loop(seed, n, pos_frac, mode, target):
    g = np.random.default_rng(seed)
    r = np.exp(g.uniform(-1.2, 1.5, (1, n)))
    A = np.where(g.random((1, n)) < pos_frac, 1.0, -1.0) * g.random((1, n))
    m = g.random((1, n)) > 0.1
    tgt = target if target is not None else (1.0 if mode == "official_code" else 0.4)
    kw = dict(low_range=(0.6, 0.9), high_range=(1.2, 3.0), low_step=0.02, high_step=0.05) if mode == "paper" else \
        dict(low_range=(0.6, 0.8), high_range=(1.2, 2.0), low_step=0.05, high_step=0.05)
    lo, hi, _ = bapo_search(torch.tensor(r), torch.tensor(A), torch.tensor(m), mode=mode, target=tgt, **kw)
    assert (lo.item(), hi.item()) == bapo_search_loop(r, A, m, mode=mode, target=tgt, **kw)


def test_step_candidates_are_exact():
    assert step_candidates(0.6, 0.9, 0.02, clamp_last=False)[-1] == 0.9
    assert len(step_candidates(0.6, 0.9, 0.02, clamp_last=False)) == 16
    assert step_candidates(1.2, 3.0, 0.05, clamp_last=False)[-1] == 3.0
    assert step_candidates(0.8, 0.95, 0.1, clamp_last=True) == [0.8, 0.9, 0.95]


def _bapo_rank(rank, world, path, r, A, q):
    import torch.distributed as dist  # noqa: PLC0415
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    half = r.shape[1] // 2
    sl = slice(0, half) if rank == 0 else slice(half, None)
    lo, hi, _ = bapo_search(r[:, sl], A[:, sl], torch.ones_like(r[:, sl], dtype=torch.bool), mode="paper",
                            target=0.4, low_range=(0.6, 0.9), high_range=(1.2, 3.0), low_step=0.02,
                            high_step=0.05, process_group=dist.group.WORLD)
    q.put((rank, lo.item(), hi.item()))
    dist.destroy_process_group()


def test_bapo_process_group_gives_global_bounds(tmp_path):
    """With a process group every rank picks the bounds of the whole batch (§2.19)."""
    import torch.multiprocessing as mp  # noqa: PLC0415
    g = torch.Generator().manual_seed(3)
    r = torch.exp(torch.rand(1, 40, generator=g, dtype=torch.float64) * 2 - 1)
    # rank 0 sees only negative advantages, rank 1 mostly positive: local searches would differ
    A = torch.cat([-torch.rand(1, 20, generator=g, dtype=torch.float64),
                   torch.rand(1, 20, generator=g, dtype=torch.float64) - 0.3], 1)
    expected = bapo_search_loop(r.numpy(), A.numpy(), np.ones((1, 40), bool))
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_bapo_rank, args=(k, 2, str(tmp_path / "pg"), r, A, q)) for k in range(2)]
    for p in procs:
        p.start()
    results = sorted(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
    assert [x[1:] for x in results] == [expected, expected]


# --------------------------------------------------------------------------------------------
# bad input


def test_bad_input():
    lp = torch.randn(2, 3)
    adv = torch.randn(2)
    cases = [
        (dict(method="nope"), ValueError, "unknown method"),
        (dict(method="ppo", ecpo_delta=0.1), TypeError, "ecpo_delta"),
        (dict(method="ppo", bogus=1), TypeError, "bogus"),
        (dict(clip_low=0.0), ValueError, "clip_low"),
        (dict(clip_low=1.5), ValueError, "clip_low"),
        (dict(clip_high=-0.1), ValueError, "clip_high"),
        (dict(clip_ratio_c=0.5), ValueError, "clip_ratio_c"),
        (dict(kl_coef=0.1), ValueError, "ref_logp"),
        (dict(entropy_coef=0.1), ValueError, "entropy"),
        (dict(agg="seq-mean-token-sum-norm"), ValueError, "max_len"),
        (dict(agg="mean"), ValueError, "agg"),
        (dict(kl_estimator="k4", ref_logp=lp), ValueError, "kl_estimator"),
        (dict(ref_logp=torch.randn(2, 4)), ValueError, "ref_logp"),
        (dict(method="ecpo", ratio_level="item"), ValueError, "ratio_level"),
        (dict(method="bapo", bapo_mode="x"), ValueError, "bapo_mode"),
        (dict(method="bapo", bapo_low_range=(0.9, 0.6)), ValueError, "bapo_low_range"),
        (dict(method="gpg", group_size=4), ValueError, "group_size"),
        (dict(method="gpg", gpg_alpha_mode="verl_nonzero"), ValueError, "rewards"),
        (dict(normalizer=-1.0), ValueError, "normalizer"),
        (dict(clip_low="0.2"), TypeError, "clip_low"),
    ]
    for kw, exc, word in cases:
        with pytest.raises(exc, match=word):
            ao.policy_loss(lp, None, adv, None, **kw)
    with pytest.raises(ValueError, match="advantages"):
        ao.policy_loss(lp, None, torch.randn(3), None)
    with pytest.raises(ValueError, match="mask"):
        ao.policy_loss(lp, None, adv, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="logp"):
        ao.policy_loss(lp.long(), None, adv, None)
    with pytest.raises(ValueError, match="cu_seqlens"):
        ao.policy_loss(torch.randn(5), None, adv, None, cu_seqlens=torch.tensor([0, 3, 4]))
    with pytest.raises(ValueError, match="logp"):
        ao.policy_loss(torch.randn(5), None, adv, None)
    with pytest.raises(ValueError, match="temperature"):
        ao.fused_policy_loss(torch.randn(2, 3, 7), torch.zeros(2, 3, dtype=torch.long), None, adv, temperature=0.0)
    with pytest.raises(ValueError, match="labels"):
        ao.fused_policy_loss(torch.randn(2, 3, 7), torch.full((2, 3), 9), None, adv)


def test_method_defaults_and_registry():
    assert {"ppo", "grpo", "dapo", "gppo", "cispo", "ecpo", "gspo", "gspo-token", "reinforce", "gpg",
            "bapo"} <= set(method_names())
    assert METHODS["dapo"].defaults["clip_high"] == 0.28 and METHODS["gspo"].defaults["agg"] == "seq-mean-token-mean"
    assert METHODS["gppo"].options["gppo_beta1"] == 1.0 and METHODS["ecpo"].options["ecpo_delta"] == 0.1
    # dapo = ppo with clip_high 0.28
    assert one_token("dapo", 1.25, 1.0) == one_token("ppo", 1.25, 1.0, clip_high=0.28)
    ao.policy_loss  # noqa: B018
    from alignops.policy import register_method  # noqa: PLC0415
    from alignops.policy.math import TokenLoss  # noqa: PLC0415
    register_method("_test_nll", lambda t, scale: TokenLoss(-scale * t.logp, None, None, None),
                    options={"scale": 1.0})
    try:
        out = ao.policy_loss(torch.full((1, 2), -2.0), None, torch.zeros(1), None, method="_test_nll", scale=3.0)
        assert out.loss.item() == 6.0
    finally:
        del METHODS["_test_nll"]


# --------------------------------------------------------------------------------------------
# fused_policy_loss: every backend, equivalence with policy_loss(token_logprobs(...)), options


def make_logits(n, v, pattern, gen):
    x = torch.randn(n, v, generator=gen, dtype=torch.float64) * 2
    if pattern == "peaked":
        x[torch.arange(n), torch.randint(0, v, (n,), generator=gen)] += 50
    elif pattern == "shifted":
        x += 1000 * torch.sign(torch.randn(n, 1, generator=gen, dtype=torch.float64))
    return x


def fused_inputs(B, T, V, pattern, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    logits = make_logits(B * T, V, pattern, gen).reshape(B, T, V)
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[0, -1] = -100
    logits_d = logits.to(dtype)
    with torch.no_grad():
        lp = torch.log_softmax(logits_d.double() / 0.7, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    old = (lp + torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.5).float()
    ref = (lp + torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.5).float()
    adv = torch.randn(B, generator=gen).float()
    mask = torch.rand(B, T, generator=gen) > 0.2
    return logits_d, labels, old, ref, adv, mask


FUSED_KW = dict(temperature=0.7, kl_coef=0.05, kl_estimator="k3", entropy_coef=0.01)


def fused_loss_and_grad(logits, labels, old, ref, adv, mask, method, backend, **extra):
    x = logits.detach().clone().requires_grad_()
    out = ao.fused_policy_loss(x, labels, old, adv, mask, method=method, ref_logp=ref, backend=backend,
                               **{**FUSED_KW, **extra})
    (g,) = torch.autograd.grad(out.loss, x)
    return out, g


def float64_reference(logits, labels, old, ref, adv, mask, method, **extra):
    x = logits.detach().double().requires_grad_()
    logp, ent = ao.token_logprobs(x, labels, temperature=0.7, compute_entropy=True, backend="torch")
    m = mask & (labels != -100)
    kw = {**FUSED_KW, **extra}
    kw.pop("temperature")
    out = ao.policy_loss(logp, old.double(), adv.double(), m, method=method, ref_logp=ref.double(), entropy=ent, **kw)
    (g,) = torch.autograd.grad(out.loss, x)
    return out, g


@pytest.mark.parametrize("device,backend", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("method", ["grpo", "dapo", "gspo", "bapo", "cispo", "gppo", "ecpo", "reinforce"])
@pytest.mark.parametrize("pattern", ["normal", "peaked", "shifted"])
def test_fused_matches_float64(device, backend, method, pattern):
    B, T, V = (2, 3, 257) if backend == "triton" else (3, 4, 1031)
    # zlib.crc32, not hash(): str hashes change with PYTHONHASHSEED, so inputs would change per run.
    seed = zlib.crc32(f"{method}/{pattern}".encode()) % 1000
    logits, labels, old, ref, adv, mask = fused_inputs(B, T, V, pattern, seed=seed)
    e_out, e_g = float64_reference(logits, labels, old, ref, adv, mask, method)
    extra = {}
    if method == "bapo":
        # The bound search is discontinuous in the ratios: fp32 log-probs of logits shifted by 1000
        # can tip rho across the target and pick the next bound. Compare the loss at the bounds
        # the float64 search chose; the search itself is tested against a literal loop.
        extra["bapo_bounds"] = (float(e_out.metrics["bapo/clip_low"]), float(e_out.metrics["bapo/clip_high"]))
        e_out, e_g = float64_reference(logits, labels, old, ref, adv, mask, method, **extra)
    out, g = fused_loss_and_grad(logits.to(device), labels.to(device), old.to(device), ref.to(device),
                                 adv.to(device), mask.to(device), method, backend, **extra)
    assert_within_eager_error(out, g, e_out, e_g, logits, labels, old, ref, adv, mask, method, **extra)


def assert_within_eager_error(out, g, e_out, e_g, logits, labels, old, ref, adv, mask, method, **extra):
    """docs/design.md's rule: error vs float64 math on the same rounded inputs at most twice the error of
    eager torch computing in the logits' dtype, plus 2e-5 of the scale (the fp32 bound). Logits
    shifted by 1000 and divided by T = 0.7 lose ~6e-5 relative in fp32 before any kernel runs."""
    x = logits.detach().clone().requires_grad_()
    logp, ent = ao.token_logprobs(x, labels, temperature=0.7, compute_entropy=True, backend="torch")
    kw = {**FUSED_KW, **extra}
    kw.pop("temperature")
    eager = ao.policy_loss(logp, old, adv, mask & (labels != -100), method=method, ref_logp=ref, entropy=ent, **kw)
    (eager_g,) = torch.autograd.grad(eager.loss, x)
    loss_err = abs(out.loss.double().cpu() - e_out.loss).item()
    eager_loss_err = abs(eager.loss.double() - e_out.loss).item()
    assert loss_err <= 2 * eager_loss_err + 2e-5 * max(1.0, abs(e_out.loss.item())), (loss_err, eager_loss_err)
    scale = e_g.abs().max().item()
    g_err = (g.double().cpu() - e_g).abs().max().item()
    eager_g_err = (eager_g.double() - e_g).abs().max().item()
    assert g_err <= 2 * eager_g_err + 2e-5 * scale, (g_err, eager_g_err, scale)


def assert_near_policy_oracle(o, loss, grad, metrics, labels, mask, old, adv, ref, dtype, what):
    """grpo with FUSED_KW from fp32 math (bf16 or fp32 logits) against the float64 oracle `o`: loss and
    pg_loss within 1e-5 of the aggregate of the terms' absolute values, the gradient within 1e-5 of
    its largest entry or per-token coefficient (bf16: the fp32 gradient rounded once to bf16), the
    metrics within the fp32 bound of oracle_metrics on the oracle's float64 log-probs."""
    scale = o.scale.item()
    for name, got, want in (("loss", loss, o.loss), ("pg_loss", metrics["pg_loss"], o.pg_loss)):
        err = abs(got.double().item() - want.item())
        assert err <= 1e-5 * scale + 1e-7, (what, name, got.item(), want.item(), err, scale)
    gmax = max(o.grad.abs().max().item(), o.coef.item())
    rtol = 2 ** -8 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(grad.double(), o.grad, rtol=rtol, atol=rtol * gmax, msg=what)
    valid = (mask & (labels != -100)).numpy()
    A = np.repeat(adv.double().numpy()[:, None], labels.shape[1], 1)
    want = oracle_metrics("grpo", o.logp.numpy(), old.double().numpy(), A, valid, clip_low=0.2,
                          ref=ref.double().numpy(), kl_est=FUSED_KW["kl_estimator"], ent=o.entropy.numpy(),
                          pg_loss=o.pg_loss.item())
    assert set(metrics) == set(want), (what, set(metrics) ^ set(want))
    for k in want:
        if k != "pg_loss":
            close(metrics[k].item(), want[k], torch.float32, f"{what} {k}")


@pytest.mark.parametrize("device,backend", [("cpu", "torch")] + PAIRS, ids=["cpu-torch"] + PAIR_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("option", ["default", "inplace_grad", "grad_in_forward", "both"])
def test_fused_equals_policy_loss_of_token_logprobs(device, backend, dtype, option):
    B, T, V = 2, 3, 131
    logits, labels, old, ref, adv, mask = fused_inputs(B, T, V, "peaked", seed=7, dtype=dtype)
    logits, labels, old, ref, adv, mask = (t.to(device) for t in (logits, labels, old, ref, adv, mask))
    kw = {"inplace_grad": option in ("inplace_grad", "both"), "grad_in_forward": option in ("grad_in_forward", "both")}
    x = logits.detach().clone().requires_grad_()
    logp, ent = ao.token_logprobs(x, labels, temperature=0.7, compute_entropy=True, backend=backend)
    m = mask & (labels != -100)
    e = ao.policy_loss(logp, old, adv, m, method="grpo", ref_logp=ref, entropy=ent, kl_coef=0.05, entropy_coef=0.01)
    (e_g,) = torch.autograd.grad(e.loss, x)
    leaf = logits.detach().clone().requires_grad_()
    buf = leaf * 1   # a non-leaf, as logits from an lm_head are
    upstream = []
    buf.register_hook(lambda grad: upstream.append(grad))
    out = ao.fused_policy_loss(buf, labels, old, adv, mask, method="grpo", ref_logp=ref, backend=backend,
                               **FUSED_KW, **kw)
    out.loss.backward()
    # The expected value: float64 math from the formulas (tests/policy_oracle.py, no alignops code) on
    # the same rounded logits and per-token inputs; both routes must be within the fp32 bound of it.
    o = policy_oracle.policy_loss(logits.cpu(), labels.cpu(), old.cpu(), adv.cpu(), mask.cpu(), method="grpo",
                                  ref_logp=ref.cpu(), **FUSED_KW)
    for what, loss, grad, metrics in (("fused", out.loss, leaf.grad, out.metrics), ("eager", e.loss, e_g, e.metrics)):
        assert_near_policy_oracle(o, loss.detach().cpu(), grad.cpu(), {k: v.cpu() for k, v in metrics.items()},
                                  labels.cpu(), mask.cpu(), old.cpu(), adv.cpu(), ref.cpu(), dtype, what)
    # Then the two routes against each other (the equivalence docs/design.md promises):
    # the one-launch kernel returns its own per-token loss terms summed in float64: a few fp32 ulp
    # from torch's fp32 reduction (tests/test_policy_epilogue.py checks both against float64)
    one_launch = backend in ("cpu", "triton") and kw["grad_in_forward"]
    own_sum = ("pg_loss",) if one_launch else ()
    if one_launch:
        torch.testing.assert_close(out.loss.detach(), e.loss.detach(), rtol=4e-7, atol=1e-7)
        torch.testing.assert_close(out.metrics["pg_loss"], e.metrics["pg_loss"], rtol=4e-7, atol=1e-7)
    else:
        assert out.loss.item() == e.loss.item()
    if backend == "torch" and option != "default":
        # the torch backend's explicit backward formula vs autograd through the eager reference
        torch.testing.assert_close(leaf.grad, e_g, rtol=1e-5, atol=1e-6 * e_g.abs().max().item())
    elif backend in ("cpu", "triton") and kw["grad_in_forward"]:
        # the one-launch epilogue forms a = dL/dlogp in autograd's order but with the kernel's own
        # exp/expm1 (glibc on cpu, numpy in the triton interpreter, the GPU's on a device), which
        # differ from torch's by an ulp on some tokens
        scale = e_g.abs().max().item()
        if dtype == torch.bfloat16:
            torch.testing.assert_close(leaf.grad.float(), e_g.float(), rtol=2 ** -8, atol=2 ** -8 * scale)
        else:
            torch.testing.assert_close(leaf.grad, e_g, rtol=1e-5, atol=1e-6 * scale)
    else:
        # the same kernel consumes the same a = dL/dlogp and b = dL/dH: bit-identical
        assert torch.equal(leaf.grad, e_g)
    if kw["inplace_grad"]:
        # the gradient handed upstream is the logits buffer itself: no [N, V] allocation
        assert upstream[0].data_ptr() == buf.data_ptr()
    for k in e.metrics:
        assert k in own_sum or torch.equal(out.metrics[k], e.metrics[k]), k
    assert "entropy" in out.metrics


@pytest.mark.parametrize("option", ["inplace_grad", "grad_in_forward"])
def test_fused_options_scale_and_upstream(option):
    """grad_in_forward scales by grad_output; inplace_grad passes the gradient upstream (through a matmul)."""
    logits, labels, old, ref, adv, mask = fused_inputs(2, 3, 64, "normal", seed=1)
    h = torch.randn(6, 16, dtype=torch.float32)
    W = torch.randn(64, 16, dtype=torch.float32, requires_grad=True)
    grads = []
    for kw in ({}, {option: True}):
        W.grad = None
        z = (h @ W.t()).view(2, 3, 64)
        out = ao.fused_policy_loss(z, labels, old, adv, mask, method="dapo", ref_logp=ref, backend="cpu",
                                   **FUSED_KW, **kw)
        (3.0 * out.loss).backward()
        grads.append(W.grad.clone())
    # grad_in_forward scales the finished fp32 gradient by 3 (one extra rounding per element) and dW
    # sums six rows with cancellation, so compare on the scale of dW
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6 * grads[0].abs().max().item())


def test_fused_large_vocab_cpu():
    """V = 151936 and 129920 (not multiples of any tile), peaked rows, cpu backend vs float64."""
    for V in (151936, 129920):
        logits, labels, old, ref, adv, mask = fused_inputs(1, 3, V, "peaked", seed=V)
        out, g = fused_loss_and_grad(logits, labels, old, ref, adv, mask, "grpo", "cpu")
        e_out, e_g = float64_reference(logits, labels, old, ref, adv, mask, "grpo")
        assert_within_eager_error(out, g, e_out, e_g, logits, labels, old, ref, adv, mask, "grpo")


def test_fused_entropy_only_when_needed():
    logits, labels, old, ref, adv, mask = fused_inputs(2, 3, 64, "normal", seed=2)
    out = ao.fused_policy_loss(logits, labels, old, adv, mask, method="grpo", backend="cpu")
    assert "entropy" not in out.metrics
    out = ao.fused_policy_loss(logits, labels, old, adv, mask, method="grpo", backend="cpu", compute_entropy=True)
    assert "entropy" in out.metrics


def test_fused_packed_layout():
    logits, labels, old, ref, adv, mask = fused_inputs(3, 4, 97, "normal", seed=4)
    mask[:] = True
    labels[0, -1] = 5
    a, ga = fused_loss_and_grad(logits, labels, old, ref, adv, mask, "grpo", "cpu", agg="seq-mean-token-mean")
    cu = torch.tensor([0, 4, 8, 12])
    b, gb = fused_loss_and_grad(logits.reshape(12, 97), labels.reshape(12), old.reshape(12), ref.reshape(12), adv,
                                mask.reshape(12), "grpo", "cpu", agg="seq-mean-token-mean", cu_seqlens=cu)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ga.reshape(12, 97), gb, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(os.environ.get("ALIGNOPS_SKIP_COMPILE") == "1", reason="compile test disabled")
def test_fused_default_path_compiles_fullgraph():
    logits, labels, old, ref, adv, mask = fused_inputs(2, 3, 64, "normal", seed=5)

    def f(x):
        return ao.fused_policy_loss(x, labels, old, adv, mask, method="grpo", ref_logp=ref, backend="cpu",
                                    **FUSED_KW).loss
    x = logits.clone().requires_grad_()
    eager = f(x)
    (ge,) = torch.autograd.grad(eager, x)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    (gc,) = torch.autograd.grad(compiled, x)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gc, ge, rtol=1e-6, atol=1e-7)
