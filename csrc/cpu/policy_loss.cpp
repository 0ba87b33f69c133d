// CPU kernel of the one-launch policy loss: per row of logits, the softmax statistics, logp and
// entropy, the per-token policy epilogue (csrc/common/policy_math.h) and then at once the gradient
// row dL/dz. Contract: alignops/policy_loss.py (_epilogue_policy_loss).
//
// The row is read twice (statistics, then gradient) but the second read hits cache for any
// vocabulary that fits in L2 per thread (151936 fp32 = 600 KB), so memory sees one read of the
// logits and one write of the gradient, against two reads and one write for forward + backward.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "../common/policy_math.h"
#include "../common/softmax_stats.h"
#include "ops.h"

namespace alignops::cpu {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kBlock = 2048;  // 8 KiB of fp32: stays in L1

template <typename T>
inline float to_float(T x) { return static_cast<float>(x); }

inline float hmax(const Vec& v) {
  alignas(64) float a[Vec::size()];
  v.store(a);
  float m = a[0];
  for (int i = 1; i < Vec::size(); ++i) m = (a[i] > m || std::isnan(a[i])) ? a[i] : m;
  return m;
}

inline float hsum(const Vec& v) {
  alignas(64) float a[Vec::size()];
  v.store(a);
  float s = 0.f;
  for (int i = 0; i < Vec::size(); ++i) s += a[i];
  return s;
}

// Same blocking and the same arithmetic as token_stats.cpp's forward, so logp and entropy agree
// bit for bit with token_logprobs on the cpu backend.
template <typename scalar_t>
SoftmaxStats<float> row_stats(const scalar_t* x, int64_t V, float inv_temp, float* buf) {
  SoftmaxStats<float> st = stats_empty<float>();
  for (int64_t v0 = 0; v0 < V; v0 += kBlock) {
    const int64_t len = std::min(kBlock, V - v0);
    for (int64_t i = 0; i < len; ++i) buf[i] = to_float(x[v0 + i]) * inv_temp;
    const int64_t vlen = len - len % Vec::size();
    Vec vmax(-std::numeric_limits<float>::infinity());
    for (int64_t i = 0; i < vlen; i += Vec::size()) vmax = at::vec::maximum(vmax, Vec::loadu(buf + i));
    float m = hmax(vmax);
    for (int64_t i = vlen; i < len; ++i) m = (buf[i] > m || std::isnan(buf[i])) ? buf[i] : m;
    if (m == -std::numeric_limits<float>::infinity()) continue;
    // exp_u20 does not propagate NaN: a NaN logit must poison the row explicitly.
    if (std::isnan(m)) {
      const float nan = std::numeric_limits<float>::quiet_NaN();
      return {nan, nan, nan};
    }
    const Vec vm(m), zero(0.f);
    Vec vs(0.f), vt(0.f);
    for (int64_t i = 0; i < vlen; i += Vec::size()) {
      const Vec d = Vec::loadu(buf + i) - vm;
      const Vec e = d.exp_u20();
      vs = vs + e;
      vt = vt + Vec::blendv(e * d, zero, e == zero);
    }
    float s = hsum(vs);
    float t = hsum(vt);
    for (int64_t i = vlen; i < len; ++i) {
      const float d = buf[i] - m, e = std::exp(d);
      s += e;
      if (e > 0.f) t += e * d;
    }
    st = stats_merge<float>(st, {m, s, t});
  }
  return st;
}

SoftmaxStats<double> row_stats(const double* x, int64_t V, double inv_temp, float*) {
  SoftmaxStats<double> st = stats_empty<double>();
  for (int64_t v0 = 0; v0 < V; v0 += kBlock) {
    const int64_t len = std::min(kBlock, V - v0);
    double m = -std::numeric_limits<double>::infinity();
    for (int64_t i = 0; i < len; ++i) m = std::max(m, x[v0 + i] * inv_temp);
    if (m == -std::numeric_limits<double>::infinity()) continue;
    double s = 0, t = 0;
    for (int64_t i = 0; i < len; ++i) {
      const double d = x[v0 + i] * inv_temp - m, e = std::exp(d);
      s += e;
      if (e > 0) t += e * d;
    }
    st = stats_merge<double>(st, {m, s, t});
  }
  return st;
}

// Gradient row; a and b already carry the 1/T. Each block is read whole before it is written, so
// g may alias x.
template <typename scalar_t, typename acc_t>
void grad_row(const scalar_t* x, scalar_t* g, int64_t V, int64_t label, acc_t inv_temp, acc_t logp, acc_t lse,
              acc_t h, acc_t a, acc_t b, float* buf) {
  // log p_v = (z_v - z_y) + logp_y: exact at v = y, where z_v - lse would carry lse's rounding.
  const acc_t zy = static_cast<acc_t>(x[label]) * inv_temp;
  const bool via_label = std::isfinite(zy) && std::isfinite(logp);
  if constexpr (std::is_same_v<scalar_t, double>) {
    for (int64_t v = 0; v < V; ++v) {
      const double zc = via_label ? (x[v] * inv_temp - zy) + logp : x[v] * inv_temp - lse;
      g[v] = logits_grad<double>(zc, v == label, 0.0, h, a, b);
    }
  } else {
    const float ref = via_label ? zy : lse, off = via_label ? logp : 0.f;
    const Vec vref(ref), voff(off), vh(h), va(a), vb(b), zero(0.f), vinv(inv_temp);
    for (int64_t v0 = 0; v0 < V; v0 += kBlock) {
      const int64_t len = std::min(kBlock, V - v0);
      for (int64_t i = 0; i < len; ++i) buf[i] = to_float(x[v0 + i]);
      const int64_t vlen = len - len % Vec::size();
      for (int64_t i = 0; i < vlen; i += Vec::size()) {
        const Vec zc = (Vec::loadu(buf + i) * vinv - vref) + voff;
        const Vec p = zc.exp_u20();
        Vec gv = Vec(0.f) - va * p;
        if (b != 0.f) gv = gv - Vec::blendv(vb * p * (zc + vh), zero, p == zero);
        gv.store(buf + i);
      }
      for (int64_t i = vlen; i < len; ++i) {
        const float zc = (buf[i] * inv_temp - ref) + off;
        buf[i] = logits_grad<float>(zc, false, 0.f, h, a, b);
      }
      if (label >= v0 && label < v0 + len) buf[label - v0] += a;
      for (int64_t i = 0; i < len; ++i) g[v0 + i] = static_cast<scalar_t>(buf[i]);
    }
  }
}

template <typename scalar_t, typename acc_t>
void fused_impl(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& old_logp,
                const at::Tensor& adv, const at::Tensor& ref_logp, const at::Tensor& is_weight,
                const at::Tensor& agg_norm, const at::Tensor& row_len, const at::Tensor& mask, const PolicyParams& params, double inv_temperature,
                int64_t ignore_index, bool compute_entropy, const at::Tensor& logp_out,
                const at::Tensor& entropy_out, const at::Tensor& loss_out, const at::Tensor& pg_out,
                const at::Tensor& grad_logits) {
  const int64_t N = labels.numel(), T = logits.size(1), V = logits.size(2);
  const int64_t sb = logits.stride(0), st = logits.stride(1);
  const int64_t gsb = grad_logits.stride(0), gst = grad_logits.stride(1);
  const scalar_t* base = logits.data_ptr<scalar_t>();
  scalar_t* gbase = grad_logits.data_ptr<scalar_t>();
  const int64_t* y = labels.data_ptr<int64_t>();
  const acc_t* old_p = old_logp.data_ptr<acc_t>();
  const acc_t* adv_p = adv.data_ptr<acc_t>();
  const acc_t* ref_p = ref_logp.data_ptr<acc_t>();
  const acc_t* isw_p = is_weight.data_ptr<acc_t>();
  const acc_t* norm_p = agg_norm.data_ptr<acc_t>();
  const acc_t* len_p = row_len.data_ptr<acc_t>();
  const bool* mask_p = mask.data_ptr<bool>();
  acc_t* logp_o = logp_out.data_ptr<acc_t>();
  acc_t* ent_o = entropy_out.data_ptr<acc_t>();
  acc_t* loss_o = loss_out.data_ptr<acc_t>();
  acc_t* pg_o = pg_out.data_ptr<acc_t>();
  const acc_t inv_temp = static_cast<acc_t>(inv_temperature);
  const bool need_entropy = compute_entropy || params.entropy_coef != 0.0;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1));

  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    alignas(64) float buf[kBlock];
    for (int64_t n = begin; n < end; ++n) {
      const int64_t label = y[n];
      const scalar_t* x = base + (n / T) * sb + (n % T) * st;
      scalar_t* g = gbase + (n / T) * gsb + (n % T) * gst;
      const bool ignored = label == ignore_index;
      const bool in_range = label >= 0 && label < V;
      // An ignored row is not read (token_stats contract): logp = H = 0, which the policy math
      // still sees when the caller's mask keeps the token (as the two-pass path does).
      acc_t lp = 0, lse = 0, h = 0;
      if (!ignored) {
        const SoftmaxStats<acc_t> s = row_stats(x, V, inv_temp, buf);
        lse = stats_lse(s);
        lp = in_range ? (static_cast<acc_t>(x[label]) * inv_temp - s.m) - std::log(s.s)
                      : std::numeric_limits<acc_t>::quiet_NaN();
        h = need_entropy ? stats_entropy(s) : acc_t(0);
      }
      const TokenEpilogue<acc_t> e = policy_epilogue<acc_t>(lp, h, old_p[n], adv_p[n], ref_p[n], isw_p[n],
                                                            norm_p[n], len_p[n], mask_p[n], params);
      logp_o[n] = lp;
      ent_o[n] = compute_entropy ? h : acc_t(0);
      loss_o[n] = e.loss_term;
      pg_o[n] = e.pg_term;
      if (ignored || !in_range) {
        std::fill(g, g + V, scalar_t(0));
        continue;
      }
      grad_row<scalar_t, acc_t>(x, g, V, label, inv_temp, lp, lse, h, e.a * inv_temp, e.b * inv_temp, buf);
    }
  });
}

}  // namespace

void policy_loss_fused(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& old_logp,
                       const at::Tensor& adv, const at::Tensor& ref_logp, const at::Tensor& is_weight,
                       const at::Tensor& agg_norm, const at::Tensor& row_len, const at::Tensor& mask, int64_t method, int64_t kl_estimator,
                       const std::vector<double>& knobs, int64_t flags, double inv_temperature,
                       int64_t ignore_index, bool compute_entropy, const at::Tensor& logp,
                       const at::Tensor& entropy, const at::Tensor& loss_terms, const at::Tensor& pg_terms,
                       const at::Tensor& grad_logits) {
  TORCH_CHECK(knobs.size() == kPolicyKnobCount, "policy_loss_fused: expected ", kPolicyKnobCount, " knobs");
  TORCH_CHECK(method >= kPolicyClip && method <= kPolicyReinforce, "policy_loss_fused: unknown method code ",
              method);
  TORCH_CHECK(kl_estimator >= kKlNone && kl_estimator <= kKlLowVar, "policy_loss_fused: unknown KL code ",
              kl_estimator);
  const PolicyParams params = make_policy_params(static_cast<int>(method), static_cast<int>(kl_estimator),
                                                 knobs.data(), flags);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "policy_loss_fused", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    for (auto* t : {&old_logp, &adv, &ref_logp, &is_weight, &agg_norm, &row_len, &logp, &entropy, &loss_terms, &pg_terms}) {
      TORCH_CHECK(t->scalar_type() == acc, "policy_loss_fused: per-token tensors must be ", acc);
    }
    TORCH_CHECK(grad_logits.scalar_type() == logits.scalar_type(), "policy_loss_fused: grad dtype");
    fused_impl<scalar_t, acc_t>(logits, labels, old_logp, adv, ref_logp, is_weight, agg_norm, row_len, mask, params,
                                inv_temperature, ignore_index, compute_entropy, logp, entropy, loss_terms,
                                pg_terms, grad_logits);
  });
}

}  // namespace alignops::cpu
