"""Triton kernel of the one-launch policy loss: per row of logits, the softmax statistics, logp and
entropy, the per-token policy epilogue and then at once the gradient row (contract:
alignops/policy/one_launch.py; the per-token math mirrors csrc/common/policy_math.h, tie rules
included; codes, knobs and flags are alignops/policy/kernel_abi.py's table).

One program per row (rows looped when N exceeds the grid cap). The row is read twice, statistics
then gradient, but the second read comes from L2 for one row per program, so HBM sees one read of
the logits and one write of the gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from alignops.policy.kernel_abi import KL_CODES, KNOBS, METHOD_CODES, unpack_flags

from .token_stats import (row_softmax_stats, _MAX_PROGRAMS, _check_inv_temperature, _check_logits, _check_rows, _device_guard,
                          _interpreted, _launch_config, _round_to_bf16)

CLIP = tl.constexpr(METHOD_CODES["clip"])
GPPO = tl.constexpr(METHOD_CODES["gppo"])
CISPO = tl.constexpr(METHOD_CODES["cispo"])
REINFORCE = tl.constexpr(METHOD_CODES["reinforce"])
SAPO = tl.constexpr(METHOD_CODES["sapo"])
DRO = tl.constexpr(METHOD_CODES["dro"])
DPPO_TV = tl.constexpr(METHOD_CODES["dppo_tv"])
DPPO_KL = tl.constexpr(METHOD_CODES["dppo_kl"])
KL_NONE = tl.constexpr(KL_CODES["none"])
KL_K1 = tl.constexpr(KL_CODES["k1"])
KL_K2 = tl.constexpr(KL_CODES["k2"])
KL_K3 = tl.constexpr(KL_CODES["k3"])


@triton.jit
def _expm1(u):
    # Kahan's expm1 from exp and log: a few ulp everywhere, where exp(u) - 1 loses every digit
    # near 0 (tl has no expm1 that also runs in the interpreter).
    e = tl.exp(u)
    em1 = e - 1.0
    safe_log = tl.where((e == 1.0) | (em1 == -1.0), 1.0, tl.log(e))
    mid = em1 * u / safe_log
    return tl.where(e == 1.0, u, tl.where(em1 == -1.0, -1.0, tl.where(e == float("inf"), e, mid)))


@triton.jit
def _max_backward(x, y, g):
    """torch.maximum's backward: the larger side takes g, equal sides g / 2 each."""
    half = g / 2.0
    gx = tl.where(x > y, g, tl.where(x == y, half, 0.0))
    gy = tl.where(y > x, g, tl.where(x == y, half, 0.0))
    return gx, gy


@triton.jit
def _dual_clip_backward(phi, adv, g, dual_clip, DUAL_CLIP: tl.constexpr):
    """min(phi, -c A) where A < 0: (new phi, gradient left for phi)."""
    if DUAL_CLIP:
        cap = -dual_clip * adv
        g_phi, g_cap = _max_backward(-phi, -cap, g)
        capped = tl.where(phi < cap, phi, tl.where(phi > cap, cap, phi + (cap - cap)))
        phi = tl.where(adv < 0.0, capped, phi)
        g = tl.where(adv < 0.0, g_phi, g)
    return phi, g


@triton.jit
def _policy_token(logp, old_logp, adv, g, clip_lo, clip_hi, dual_clip, log_clamp, early_shift, gppo_k_low,
                  gppo_k_high, scale, sapo_tau_pos, sapo_tau_neg, dro_beta, dppo_delta_low, dppo_delta_high,
                  dppo_is_cap, METHOD: tl.constexpr, DUAL_CLIP: tl.constexpr, LOG_CLAMP: tl.constexpr,
                  EARLY_SHIFT: tl.constexpr):
    """(phi, dL/dlogp) of one token given g = dL/dphi, in autograd's order through
    alignops/policy/methods.py (see csrc/common/policy_math.h)."""
    d = logp - old_logp
    gate = d == d
    if LOG_CLAMP:
        gate = (d >= -log_clamp) & (d <= log_clamp)
        d = tl.where(d < -log_clamp, -log_clamp, tl.where(d > log_clamp, log_clamp, d))
    if METHOD == REINFORCE:
        s = -scale * adv
        value = s * logp
        grad = g * s
    elif METHOD == CISPO:
        r = tl.exp(d)
        s = -tl.where(r < clip_lo, clip_lo, tl.where(r > clip_hi, clip_hi, r)) * adv
        value = s * logp
        grad = g * s
    elif METHOD == SAPO:
        r = tl.exp(d)
        tau = tl.where(adv > 0.0, sapo_tau_pos, sapo_tau_neg)
        s = 1.0 / (1.0 + tl.exp(-(tau * (r - 1.0))))
        k = -(4.0 / tau)
        g_s = (g * adv) * k
        value = (k * s) * adv
        grad = tl.where(gate, (((g_s * (1.0 - s)) * s) * tau) * r, 0.0)
    elif METHOD == DRO:
        # the log-ratio unclamped (no exp); e's two uses give g m + (g e) c, then logp adds g (-A)
        e = logp - old_logp
        c = 0.5 * dro_beta
        m = c * e
        neg_adv = -adv
        value = neg_adv * logp + m * e
        grad = g * neg_adv + ((g * m) + ((g * e) * c))
    elif (METHOD == DPPO_TV) or (METHOD == DPPO_KL):
        # the region reads p = exp(logp) and p_old = exp(old_logp), not the clamped log-ratio
        r = tl.exp(d)
        w = tl.where(r > dppo_is_cap, dppo_is_cap, r)
        prob = tl.exp(logp)
        prob_old = tl.exp(old_logp)
        up = adv > 0.0
        if METHOD == DPPO_TV:
            diff = prob - prob_old
            inside_up = diff <= dppo_delta_high
            inside_down = diff >= -dppo_delta_low
        else:
            # binary KL, 1 - p floored by 1e-8 (alignops/policy/methods.py's _DPPO_EPS)
            q_old = 1.0 - prob_old
            kl = prob_old * (old_logp - logp) + q_old * tl.log((q_old + 1e-8) / ((1.0 - prob) + 1e-8))
            inside_up = (kl <= dppo_delta_high) | (prob <= prob_old)
            inside_down = (kl <= dppo_delta_low) | (prob >= prob_old)
        inside = tl.where(up, tl.where(inside_up, 1.0, 0.0), tl.where(inside_down, 1.0, 0.0))
        s = -(w * inside) * adv
        value = s * logp
        grad = g * s
    elif METHOD == GPPO:
        r = tl.exp(d)
        low_clipped = (adv < 0.0) & (r < clip_lo)
        high_clipped = (adv > 0.0) & (r > clip_hi)
        clipped = low_clipped | high_clipped
        k = tl.where(low_clipped, gppo_k_low, gppo_k_high)
        phi = tl.where(clipped, k * adv, -r * adv)
        phi, g_phi = _dual_clip_backward(phi, adv, g, dual_clip, DUAL_CLIP)
        value = phi
        grad = tl.where(clipped, (g_phi * adv) * k, (-(g_phi * adv)) * r)
        grad = tl.where(gate, grad, 0.0)
    else:
        tl.static_assert(METHOD == CLIP)
        if EARLY_SHIFT:
            excess = d - early_shift
            d = d - tl.where(excess > 0.0, excess, 0.0)
        r = tl.exp(d)
        neg_adv = -adv
        unclipped = neg_adv * r
        clipped = neg_adv * tl.where(r < clip_lo, clip_lo, tl.where(r > clip_hi, clip_hi, r))
        phi = tl.where(unclipped > clipped, unclipped,
                       tl.where(unclipped < clipped, clipped, unclipped + (clipped - clipped)))
        phi, g_phi = _dual_clip_backward(phi, adv, g, dual_clip, DUAL_CLIP)
        g_u, g_c = _max_backward(unclipped, clipped, g_phi)
        inside = (r >= clip_lo) & (r <= clip_hi)
        g_ratio = g_u * neg_adv + tl.where(inside, g_c * neg_adv, 0.0)
        value = phi
        grad = tl.where(gate, g_ratio * r, 0.0)
    return value, grad


@triton.jit
def _kl_token(logp, ref_logp, g, KL: tl.constexpr):
    """(KL, dL/dlogp) given g = dL/dKL, u = ref_logp - logp."""
    u = ref_logp - logp
    if KL == KL_K1:
        value = -u
        grad = -(-g)
    elif KL == KL_K2:
        value = (0.5 * u) * u
        grad = -((g * u) * 0.5 + g * (0.5 * u))
    elif KL == KL_K3:
        em1 = _expm1(u)
        value = em1 - u
        grad = -(g * (em1 + 1.0) + (-g))
    else:
        u_inside = (u >= -20.0) & (u <= 20.0)
        uc = tl.where(u < -20.0, -20.0, tl.where(u > 20.0, 20.0, u))
        em1 = _expm1(uc)
        k = em1 - uc
        k_inside = (k >= -10.0) & (k <= 10.0)
        value = tl.where(k < -10.0, -10.0, tl.where(k > 10.0, 10.0, k))
        gk = tl.where(k_inside, g, 0.0)
        grad = -tl.where(u_inside, gk * (em1 + 1.0) + (-gk), 0.0)
    return value, grad


@triton.jit
def _policy_loss_fused_kernel(
    logits_ptr, labels_ptr, old_ptr, adv_ptr, ref_ptr, isw_ptr, norm_ptr, len_ptr, mask_ptr,
    logp_ptr, entropy_ptr, loss_ptr, pg_ptr, grad_ptr,
    N, T, V, stride_b, stride_t, grad_stride_b, grad_stride_t, ignore_index,
    clip_lo, clip_hi, dual_clip, log_clamp, early_shift, gppo_k_low, gppo_k_high, scale, sapo_tau_pos, sapo_tau_neg,
    dro_beta, dppo_delta_low, dppo_delta_high, dppo_is_cap, kl_coef, entropy_coef,
    INV_TEMP: tl.constexpr, METHOD: tl.constexpr, KL: tl.constexpr, HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr,
    HAS_IS_WEIGHT: tl.constexpr, DUAL_CLIP: tl.constexpr, LOG_CLAMP: tl.constexpr, EARLY_SHIFT: tl.constexpr,
    HAS_ENTROPY_COEF: tl.constexpr, NEED_ENTROPY: tl.constexpr, COMPUTE_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr, SOFTWARE_BF16_ROUNDING: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols_in_tile = tl.arange(0, BLOCK_V)
    out_dtype = grad_ptr.dtype.element_ty
    for row32 in range(pid, N, num_programs):
        row = tl.cast(row32, tl.int64)
        label = tl.load(labels_ptr + row)
        ignored = label == ignore_index
        in_range = (label >= 0) & (label < V)
        # An ignored row is never read (its loads are masked off) and has logp = H = 0; the policy
        # math still sees those zeros where the caller's mask keeps the token, as the two-pass path.
        readable = (label != ignore_index)
        row_ptr = logits_ptr + (row // T) * stride_b + (row % T) * stride_t
        # The row's readable length: 0 skips every load of an ignored row (a scalar predicate
        # and-ed into a block mask is not accepted by the interpreter).
        read_len = tl.where(readable, V, 0)
        m, s, t = row_softmax_stats(row_ptr, read_len, V, INV_TEMP, NEED_ENTROPY, BLOCK_V)
        # s = 0 only for an ignored row (a row of -inf logits has its own s = 0 and NaN stats, as
        # in token_stats); 1 keeps the ignored row's discarded values free of log(0) warnings.
        s = tl.where(readable, s, 1.0)
        log_s = tl.log(s)
        lse = m * INV_TEMP + log_s
        x_label = tl.load(row_ptr + label, mask=in_range & readable, other=0.0).to(tl.float32)
        # (x_y - m) * inv_temp - log s, not z_y - lse: lse ~ 1000 would swamp a small logp.
        logp = tl.where(in_range, (x_label - m) * INV_TEMP - log_s, float("nan"))
        logp = tl.where(ignored, 0.0, logp)
        entropy = 0.0 * logp
        if NEED_ENTROPY:
            entropy = tl.where(ignored, 0.0, log_s - t / s)

        # ---- epilogue: weights (coef / normaliser) / row length, as autograd forms them
        adv = tl.load(adv_ptr + row)
        if HAS_OLD:
            old = tl.load(old_ptr + row)
        else:
            old = logp
        agg_norm = tl.load(norm_ptr + row)
        row_len = tl.load(len_ptr + row)
        active = (tl.load(mask_ptr + row) != 0) & (agg_norm > 0.0)
        safe_norm = tl.where(active, agg_norm, 1.0)
        w = (1.0 / safe_norm) / row_len
        if HAS_IS_WEIGHT:
            g_phi = w * tl.load(isw_ptr + row)
        else:
            g_phi = w
        phi, a = _policy_token(logp, old, adv, g_phi, clip_lo, clip_hi, dual_clip, log_clamp, early_shift,
                               gppo_k_low, gppo_k_high, scale, sapo_tau_pos, sapo_tau_neg, dro_beta, dppo_delta_low,
                               dppo_delta_high, dppo_is_cap, METHOD, DUAL_CLIP, LOG_CLAMP, EARLY_SHIFT)
        pg = g_phi * phi
        loss = pg
        if KL != KL_NONE:
            tl.static_assert(HAS_REF)
            w_kl = (kl_coef / safe_norm) / row_len
            kl, dkl = _kl_token(logp, tl.load(ref_ptr + row), w_kl, KL)
            loss += w_kl * kl
            a = a + dkl
        b = 0.0 * a
        if HAS_ENTROPY_COEF:
            b = (-entropy_coef / safe_norm) / row_len
            loss += b * entropy
        loss = tl.where(active, loss, 0.0)
        pg = tl.where(active, pg, 0.0)
        a = tl.where(active, a, 0.0) * INV_TEMP
        b = tl.where(active, b, 0.0) * INV_TEMP
        tl.store(logp_ptr + row, logp)
        if COMPUTE_ENTROPY:
            tl.store(entropy_ptr + row, entropy)
        tl.store(loss_ptr + row, loss)
        tl.store(pg_ptr + row, pg)

        # ---- gradient row, at once (the row is still in cache)
        grad_row_ptr = grad_ptr + (row // T) * grad_stride_b + (row % T) * grad_stride_t
        has_grad = readable & in_range
        grad_len = tl.where(has_grad, V, 0)
        via_label = (tl.abs(x_label) < float("inf")) & (tl.abs(logp) < float("inf"))
        x_ref = tl.where(via_label, x_label, 0.0)
        offset = tl.where(via_label, logp, -lse)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + cols_in_tile
            in_row = cols < V
            # Loaded before this program stores to it: the gradient may alias the logits.
            x = tl.load(row_ptr + cols, mask=cols < grad_len, other=float("-inf")).to(tl.float32)
            log_p = (x - x_ref) * INV_TEMP + offset
            p = tl.exp(log_p)
            g = tl.where(cols == label, a, 0.0) - a * p
            if HAS_ENTROPY_COEF:
                g -= b * p * (tl.where(p > 0.0, log_p, 0.0) + entropy)
            g = tl.where(has_grad, g, 0.0)
            if SOFTWARE_BF16_ROUNDING:
                tl.store(grad_row_ptr + cols, _round_to_bf16(g), mask=in_row)
            else:
                tl.store(grad_row_ptr + cols, g.to(out_dtype), mask=in_row)


def policy_loss_fused(logits, labels, old_logp, adv, ref_logp, is_weight, agg_norm, row_len, mask, method, kl_estimator,
                      knobs, flags, inv_temperature, ignore_index, compute_entropy, logp, entropy, loss_terms,
                      pg_terms, grad_logits) -> None:
    """Same signature and meaning as torch.ops.alignops_C.policy_loss_fused_cpu (knob order and flag
    bits: alignops/policy/kernel_abi.py)."""
    _check_logits(logits)
    _check_logits(grad_logits, "grad_logits")
    B, T, V = logits.shape
    N = B * T
    device = logits.device
    if tuple(grad_logits.shape) != (B, T, V) or grad_logits.dtype != logits.dtype:
        raise ValueError(f"grad_logits must have the logits' shape {(B, T, V)} and dtype {logits.dtype}")
    _check_rows(labels, "labels", N, torch.int64, device)
    for name, x in (("old_logp", old_logp), ("adv", adv), ("ref_logp", ref_logp), ("is_weight", is_weight),
                    ("agg_norm", agg_norm), ("row_len", row_len), ("logp", logp), ("entropy", entropy), ("loss_terms", loss_terms),
                    ("pg_terms", pg_terms)):
        _check_rows(x, name, N, torch.float32, device)
    _check_rows(mask, "mask", N, torch.bool, device)
    if method not in METHOD_CODES.values():
        raise ValueError(f"method code must be one of {sorted(METHOD_CODES.values())}, got {method!r}")
    if kl_estimator not in KL_CODES.values():
        raise ValueError(f"kl_estimator code must be one of {sorted(KL_CODES.values())}, got {kl_estimator!r}")
    if len(knobs) != len(KNOBS):
        raise ValueError(f"knobs must hold {len(KNOBS)} values, got {len(knobs)}")
    inv_temperature = _check_inv_temperature(inv_temperature)
    if N == 0:
        return
    knob = dict(zip(KNOBS, (float(k) for k in knobs)))
    flag = {f.upper(): on for f, on in unpack_flags(int(flags)).items()}
    block_v, num_warps = _launch_config(V)
    with _device_guard(device):
        _policy_loss_fused_kernel[(min(N, _MAX_PROGRAMS),)](
            logits, labels, old_logp, adv, ref_logp, is_weight, agg_norm, row_len, mask.view(torch.uint8),
            logp, entropy, loss_terms, pg_terms, grad_logits,
            N, T, V, logits.stride(0), logits.stride(1), grad_logits.stride(0), grad_logits.stride(1),
            int(ignore_index), **knob, **flag,
            INV_TEMP=inv_temperature, METHOD=int(method), KL=int(kl_estimator),
            HAS_ENTROPY_COEF=knob["entropy_coef"] != 0.0,
            NEED_ENTROPY=bool(compute_entropy) or knob["entropy_coef"] != 0.0, COMPUTE_ENTROPY=bool(compute_entropy),
            BLOCK_V=block_v, SOFTWARE_BF16_ROUNDING=_interpreted() and grad_logits.dtype == torch.bfloat16,
            num_warps=num_warps,
        )
