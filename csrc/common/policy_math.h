// Per-token policy-loss math of the one-launch CPU kernel (csrc/cpu/policy_loss.cpp), kept free of
// torch headers and marked host + device (ALIGNOPS_HD) so a CUDA kernel can share it. The formulas are docs/methods.md §1.10 and §2; the
// eager definitions are alignops/policy/methods.py, and every derivative below is the one
// torch's autograd takes through those definitions, tie rules included:
//   - torch.clamp passes the gradient where lo <= x <= hi (both ends inclusive);
//   - torch.maximum / torch.minimum split the gradient in halves when both sides are equal.
// Matching the ties matters for the A = 0 tokens and for ratios sitting exactly on a bound.
#pragma once

#include <cmath>

#include "policy_abi.h"
#include "softmax_stats.h"

namespace alignops {

// Host-resolved knobs of one call. Bounds are absolute (1 - clip_low, 1 + clip_high).
struct PolicyParams {
  int method;
  int kl_estimator;       // kKlNone when kl_coef == 0
  double clip_lo, clip_hi;
  bool has_dual_clip;
  double dual_clip;
  bool has_log_clamp;
  double log_clamp;
  bool has_early_shift;   // ECPO: log-ratio loses max(sg(d) - shift, 0)
  double early_shift;
  double gppo_k_low, gppo_k_high;  // GPPO: -beta1 * clip_lo, -beta2 * clip_hi
  double scale;           // REINFORCE / GPG alpha
  double sapo_tau_pos, sapo_tau_neg;
  double dro_beta;
  double dppo_delta_low, dppo_delta_high;  // DPPO's region bounds (clip_low, clip_high as given)
  double dppo_is_cap;
  double kl_coef, entropy_coef;
  bool has_old, has_ref, has_is_weight;
};

// The knobs and flags arrive as laid out in policy_abi.h (generated from alignops/policy/kernel_abi.py).
inline PolicyParams make_policy_params(int method, int kl_estimator, const double* k, long long flags) {
  PolicyParams p;
  p.method = method;
  p.kl_estimator = kl_estimator;
  p.clip_lo = k[kKnobClipLo];
  p.clip_hi = k[kKnobClipHi];
  p.has_dual_clip = (flags & kFlagDualClip) != 0;
  p.dual_clip = k[kKnobDualClip];
  p.has_log_clamp = (flags & kFlagLogClamp) != 0;
  p.log_clamp = k[kKnobLogClamp];
  p.has_early_shift = (flags & kFlagEarlyShift) != 0;
  p.early_shift = k[kKnobEarlyShift];
  p.gppo_k_low = k[kKnobGppoKLow];
  p.gppo_k_high = k[kKnobGppoKHigh];
  p.scale = k[kKnobScale];
  p.sapo_tau_pos = k[kKnobSapoTauPos];
  p.sapo_tau_neg = k[kKnobSapoTauNeg];
  p.dro_beta = k[kKnobDroBeta];
  p.dppo_delta_low = k[kKnobDppoDeltaLow];
  p.dppo_delta_high = k[kKnobDppoDeltaHigh];
  p.dppo_is_cap = k[kKnobDppoIsCap];
  p.kl_coef = k[kKnobKlCoef];
  p.entropy_coef = k[kKnobEntropyCoef];
  p.has_old = (flags & kFlagHasOld) != 0;
  p.has_ref = (flags & kFlagHasRef) != 0;
  p.has_is_weight = (flags & kFlagHasIsWeight) != 0;
  return p;
}

template <typename acc_t>
struct ValueGrad {
  acc_t value, grad;  // grad = dL/dlogp given the upstream gradient dL/dvalue
};

// The backward functions below take the upstream gradient g = dL/dphi and apply the chain rule
// in the order torch's autograd does through alignops/policy/methods.py (same products,
// same association), so the gradient agrees with the two-pass path to the last bit wherever
// exp/expm1 agree; the values are only used for the loss terms.

// torch.maximum's backward: the larger side takes g, equal sides g / 2 each, NaN neither.
template <typename acc_t>
ALIGNOPS_HD void max_backward(acc_t x, acc_t y, acc_t g, acc_t* gx, acc_t* gy) {
  const acc_t half = g / acc_t(2);
  *gx = x > y ? g : (x == y ? half : acc_t(0));
  *gy = y > x ? g : (x == y ? half : acc_t(0));
}

// The log-ratio logp - old_logp clamped to +-log_clamp (docs/methods.md §1.4); gate = its derivative.
template <typename acc_t>
ALIGNOPS_HD acc_t clamped_log_ratio(acc_t logp, acc_t old_logp, const PolicyParams& p, bool* gate) {
  const acc_t d = logp - old_logp;
  *gate = true;
  if (!p.has_log_clamp) return d;
  const acc_t c = static_cast<acc_t>(p.log_clamp);
  *gate = d >= -c && d <= c;
  return d < -c ? -c : (d > c ? c : d);
}

// Dual clip where A < 0: min(phi, -c A); returns the gradient left for phi.
template <typename acc_t>
ALIGNOPS_HD acc_t dual_clip_backward(acc_t* phi, acc_t adv, acc_t g, const PolicyParams& p) {
  if (!p.has_dual_clip || !(adv < acc_t(0))) return g;
  const acc_t cap = -static_cast<acc_t>(p.dual_clip) * adv;
  acc_t g_phi, g_cap;
  max_backward(-*phi, -cap, g, &g_phi, &g_cap);  // min(x, y) = -max(-x, -y), same tie rule
  *phi = *phi < cap ? *phi : (*phi > cap ? cap : *phi + (cap - cap));
  return g_phi;
}

// phi and dL/dlogp of the method, given g = dL/dphi (the IS weight already folded into g).
template <typename acc_t>
ALIGNOPS_HD ValueGrad<acc_t> policy_token(acc_t logp, acc_t old_logp, acc_t adv, acc_t g, const PolicyParams& p) {
  bool gate;
  acc_t d = clamped_log_ratio(logp, old_logp, p, &gate);
  const acc_t lo = static_cast<acc_t>(p.clip_lo), hi = static_cast<acc_t>(p.clip_hi);
  if (p.method == kPolicyReinforce) {
    const acc_t s = -static_cast<acc_t>(p.scale) * adv;
    return {s * logp, g * s};
  }
  if (p.method == kPolicyCispo) {
    const acc_t r = exp(d);
    const acc_t s = -(r < lo ? lo : (r > hi ? hi : r)) * adv;
    return {s * logp, g * s};
  }
  if (p.method == kPolicySapo) {
    // phi = (-(4 / tau) * sigmoid(tau (r - 1))) * A; sigmoid's backward is g (1 - s) s
    const acc_t r = exp(d);
    const acc_t tau = static_cast<acc_t>(adv > acc_t(0) ? p.sapo_tau_pos : p.sapo_tau_neg);
    const acc_t s = acc_t(1) / (acc_t(1) + exp(-(tau * (r - acc_t(1)))));
    const acc_t k = -(acc_t(4) / tau);
    const acc_t g_s = (g * adv) * k;
    return {(k * s) * adv, gate ? (((g_s * (acc_t(1) - s)) * s) * tau) * r : acc_t(0)};
  }
  if (p.method == kPolicyDro) {
    // phi = (-A) logp + ((beta / 2) e) e with e = logp - old_logp, not clamped (no exp). Autograd:
    // e's two uses give g m + (g e) c, m = c e; logp then adds g (-A).
    const acc_t e = logp - old_logp;
    const acc_t c = static_cast<acc_t>(0.5 * p.dro_beta);
    const acc_t m = c * e;
    const acc_t neg_adv = -adv;
    return {neg_adv * logp + m * e, g * neg_adv + ((g * m) + ((g * e) * c))};
  }
  if (p.method == kPolicyDppoTv || p.method == kPolicyDppoKl) {
    // phi = (-(sg(min(r, C)) * inside)) A logp. The region reads the token's probability
    // p = exp(logp) and p_old = exp(old_logp), not the clamped log-ratio; it bounds the side A
    // pushes (A > 0: the upper bound). clamp(max=C) keeps a NaN ratio NaN.
    const acc_t r = exp(d);
    const acc_t cap = static_cast<acc_t>(p.dppo_is_cap);
    const acc_t w = r > cap ? cap : r;
    const acc_t prob = exp(logp), prob_old = exp(old_logp);
    const acc_t delta_lo = static_cast<acc_t>(p.dppo_delta_low), delta_hi = static_cast<acc_t>(p.dppo_delta_high);
    const bool up = adv > acc_t(0);
    bool inside;
    if (p.method == kPolicyDppoTv) {
      const acc_t diff = prob - prob_old;
      inside = up ? diff <= delta_hi : diff >= -delta_lo;
    } else {
      // binary KL; 1 - p floored by 1e-8 as alignops/policy/methods.py's _DPPO_EPS (a NaN KL,
      // from p_old > 1, is outside unless p is on the allowed side of p_old)
      const acc_t eps = static_cast<acc_t>(1e-8);
      const acc_t q_old = acc_t(1) - prob_old;
      const acc_t kl = prob_old * (old_logp - logp) + q_old * log((q_old + eps) / ((acc_t(1) - prob) + eps));
      inside = up ? (kl <= delta_hi || prob <= prob_old) : (kl <= delta_lo || prob >= prob_old);
    }
    const acc_t s = -(w * (inside ? acc_t(1) : acc_t(0))) * adv;
    return {s * logp, g * s};
  }
  if (p.method == kPolicyGppo) {
    const acc_t r = exp(d);
    const bool low_clipped = adv < acc_t(0) && r < lo;
    const bool high_clipped = adv > acc_t(0) && r > hi;
    acc_t phi;
    if (low_clipped || high_clipped) {
      // -beta * bound * exp(d - sg(d)) * A: value -beta * bound * A, gradient through exp(0) = 1.
      const acc_t k = static_cast<acc_t>(low_clipped ? p.gppo_k_low : p.gppo_k_high);
      phi = k * adv;
      const acc_t g_phi = dual_clip_backward(&phi, adv, g, p);
      return {phi, gate ? (g_phi * adv) * k : acc_t(0)};
    }
    phi = -r * adv;
    const acc_t g_phi = dual_clip_backward(&phi, adv, g, p);
    return {phi, gate ? (-(g_phi * adv)) * r : acc_t(0)};
  }
  // kPolicyClip; token-level ECPO shifts the log-ratio by a detached amount (gradient unchanged).
  if (p.has_early_shift) {
    const acc_t excess = d - static_cast<acc_t>(p.early_shift);
    d = d - (excess > acc_t(0) ? excess : acc_t(0));
  }
  const acc_t r = exp(d);
  const acc_t neg_adv = -adv;
  const acc_t unclipped = neg_adv * r;
  const acc_t clipped = neg_adv * (r < lo ? lo : (r > hi ? hi : r));
  acc_t phi = unclipped > clipped ? unclipped : (unclipped < clipped ? clipped : unclipped + (clipped - clipped));
  const acc_t g_phi = dual_clip_backward(&phi, adv, g, p);
  acc_t g_u, g_c;
  max_backward(unclipped, clipped, g_phi, &g_u, &g_c);
  const bool inside = r >= lo && r <= hi;
  const acc_t g_ratio = g_u * neg_adv + (inside ? g_c * neg_adv : acc_t(0));
  return {phi, gate ? g_ratio * r : acc_t(0)};
}

// KL estimators of u = ref_logp - logp (docs/methods.md §1.10, §00.6): value and dL/dlogp given g = dL/dKL.
template <typename acc_t>
ALIGNOPS_HD ValueGrad<acc_t> kl_token(acc_t logp, acc_t ref_logp, acc_t g, int estimator) {
  const acc_t u = ref_logp - logp;
  switch (estimator) {
    case kKlK1:
      return {-u, -(-g)};
    case kKlK2:
      return {(acc_t(0.5) * u) * u, -((g * u) * acc_t(0.5) + g * (acc_t(0.5) * u))};
    case kKlK3: {
      // expm1(u) - u, not exp(u) - u - 1: near u = 0 the latter loses every digit.
      const acc_t em1 = expm1(u);
      return {em1 - u, -(g * (em1 + acc_t(1)) + (-g))};
    }
    case kKlLowVarKl: {
      const bool u_inside = u >= acc_t(-20) && u <= acc_t(20);
      const acc_t uc = u < acc_t(-20) ? acc_t(-20) : (u > acc_t(20) ? acc_t(20) : u);
      const acc_t em1 = expm1(uc);
      const acc_t k = em1 - uc;
      const bool k_inside = k >= acc_t(-10) && k <= acc_t(10);
      const acc_t kc = k < acc_t(-10) ? acc_t(-10) : (k > acc_t(10) ? acc_t(10) : k);
      const acc_t gk = k_inside ? g : acc_t(0);
      const acc_t gu = u_inside ? gk * (em1 + acc_t(1)) + (-gk) : acc_t(0);
      return {kc, -gu};
    }
    default:
      return {acc_t(0), acc_t(0)};
  }
}

// The whole epilogue of one token. Aggregation (docs/methods.md §1.6): a term's weight is
// (coef / agg_norm) / row_len, with agg_norm the normaliser (<= 0: the loss is 0, weight 0) and
// row_len the token's row length for seq-mean-token-mean, else 1.
//   loss_term = the token's share of the loss,   pg_term = its share of pg_loss,
//   a = dL/dlogp,   b = dL/dH.
template <typename acc_t>
struct TokenEpilogue {
  acc_t loss_term, pg_term, a, b;
};

template <typename acc_t>
ALIGNOPS_HD TokenEpilogue<acc_t> policy_epilogue(acc_t logp, acc_t entropy, acc_t old_logp, acc_t adv,
                                                 acc_t ref_logp, acc_t is_weight, acc_t agg_norm, acc_t row_len,
                                                 bool active, const PolicyParams& p) {
  if (!active || !(agg_norm > acc_t(0))) return {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
  const acc_t w = (acc_t(1) / agg_norm) / row_len;
  const acc_t g_phi = p.has_is_weight ? w * is_weight : w;
  const ValueGrad<acc_t> phi = policy_token(logp, p.has_old ? old_logp : logp, adv, g_phi, p);
  const acc_t pg = g_phi * phi.value;
  acc_t loss = pg;
  acc_t a = phi.grad;
  if (p.kl_estimator != kKlNone) {
    const acc_t w_kl = (static_cast<acc_t>(p.kl_coef) / agg_norm) / row_len;
    const ValueGrad<acc_t> kl = kl_token(logp, ref_logp, w_kl, p.kl_estimator);
    loss += w_kl * kl.value;
    a = a + kl.grad;
  }
  acc_t b = acc_t(0);
  if (p.entropy_coef != 0.0) {
    b = (-static_cast<acc_t>(p.entropy_coef) / agg_norm) / row_len;
    loss += b * entropy;
  }
  return {loss, pg, a, b};
}

}  // namespace alignops
