// One row of the logits pass on the CPU, shared by every CPU kernel that reads logits
// (token_stats.cpp, policy_loss.cpp): softmax statistics, the label's log-prob, the gradient row.
//
// Differences are taken on the raw logits and scaled once: (x_v - x_max) / T rounds a small number,
// where x_v / T - x_max / T would round two numbers near 1000 (an fp32 ulp of 6e-5 each) first.
// So SoftmaxStats::m holds the raw row max here, and blocks merge with the 1/T scale.
// Rows are processed in blocks of kBlock elements converted once to fp32 in an L1-resident
// buffer: block max, then exp-sums on the hot buffer, then an exact merge — one read of the row
// from memory and one exp per element.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "../common/softmax_stats.h"

namespace alignops::cpu {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kBlock = 2048;  // 8 KiB of fp32: stays in L1 with the output buffer

template <typename T>
inline float to_float(T x) { return static_cast<float>(x); }

// NaN-propagating horizontal max (std::max_element would skip a NaN lane).
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

// The fp32 view of one block: the logits themselves when they are fp32, else converted once into
// the L1-resident buffer.
template <typename scalar_t>
inline const float* block_as_float(const scalar_t* x, int64_t len, float* buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return x;
  } else {
    for (int64_t i = 0; i < len; ++i) buf[i] = to_float(x[i]);
    return buf;
  }
}

// Statistics of z = x * inv_temp over a row; m is the raw max (see above).
template <typename scalar_t>
SoftmaxStats<float> row_stats(const scalar_t* x, int64_t V, float inv_temp, float* buf) {
  SoftmaxStats<float> st = stats_empty<float>();
  for (int64_t v0 = 0; v0 < V; v0 += kBlock) {
    const int64_t len = std::min(kBlock, V - v0);
    const float* xb = block_as_float(x + v0, len, buf);
    const int64_t vlen = len - len % Vec::size();
    Vec vmax(-std::numeric_limits<float>::infinity());
    for (int64_t i = 0; i < vlen; i += Vec::size()) vmax = at::vec::maximum(vmax, Vec::loadu(xb + i));
    float m = hmax(vmax);
    for (int64_t i = vlen; i < len; ++i) m = (xb[i] > m || std::isnan(xb[i])) ? xb[i] : m;
    if (m == -std::numeric_limits<float>::infinity()) continue;  // block of -inf logits: p = 0
    // A NaN logit makes the row NaN. exp_u20 is a bit-trick polynomial that does not propagate
    // NaN, so this cannot be left to the arithmetic.
    if (std::isnan(m)) {
      const float nan = std::numeric_limits<float>::quiet_NaN();
      return {nan, nan, nan};
    }
    // max(d, -200): exp_u20 is exactly 0 below ln(FLT_MIN) ~ -87.3, so e is unchanged, and a -inf
    // logit adds e * d = 0 * -200 = 0 to t, not 0 * -inf = NaN.
    const Vec vm(m), vinv(inv_temp), vfloor(-200.f);
    Vec vs(0.f), vt(0.f);
    for (int64_t i = 0; i < vlen; i += Vec::size()) {
      const Vec d = at::vec::maximum((Vec::loadu(xb + i) - vm) * vinv, vfloor);
      const Vec e = d.exp_u20();
      vs = vs + e;
      vt = vt + e * d;
    }
    float s = hsum(vs), t = hsum(vt);
    for (int64_t i = vlen; i < len; ++i) {
      const float d = (xb[i] - m) * inv_temp, e = std::exp(d);
      s += e;
      if (e > 0.f) t += e * d;
    }
    st = stats_merge<float>(st, {m, s, t}, inv_temp);
  }
  return st;
}

// fp64 logits (gradcheck, oracle comparisons): plain loops, exact exp.
inline SoftmaxStats<double> row_stats(const double* x, int64_t V, double inv_temp, float* /*buf*/) {
  SoftmaxStats<double> st = stats_empty<double>();
  for (int64_t v0 = 0; v0 < V; v0 += kBlock) {
    const int64_t len = std::min(kBlock, V - v0);
    double m = -std::numeric_limits<double>::infinity();
    for (int64_t i = 0; i < len; ++i) m = (x[v0 + i] > m || std::isnan(x[v0 + i])) ? x[v0 + i] : m;
    if (m == -std::numeric_limits<double>::infinity()) continue;
    double s = 0, t = 0;
    for (int64_t i = 0; i < len; ++i) {
      const double d = (x[v0 + i] - m) * inv_temp, e = std::exp(d);
      s += e;
      if (e > 0) t += e * d;
    }
    st = stats_merge<double>(st, {m, s, t}, inv_temp);
  }
  return st;
}

template <typename acc_t>
inline acc_t row_lse(SoftmaxStats<acc_t> st, acc_t inv_temp) { return st.m * inv_temp + std::log(st.s); }

// log p_y = (x_y - max) / T - log s; never z_y - lse (lse's fp32 ulp is 1e-4 at |z| ~ 1000).
template <typename acc_t>
inline acc_t row_logp(acc_t x_label, SoftmaxStats<acc_t> st, acc_t inv_temp) {
  return (x_label - st.m) * inv_temp - std::log(st.s);
}

// The gradient row a (1[v=y] - p_v) - b p_v (log p_v + H), a and b already carrying the 1/T.
// log p_v = (x_v - x_y) / T + logp_y (raw difference, then one rounding), falling back to
// x_v / T - lse when the label's logit or log-prob is not finite. Each block is read whole before
// it is written, so g may alias x.
template <typename scalar_t, typename acc_t>
void grad_row(const scalar_t* x, scalar_t* g, int64_t V, int64_t label, acc_t inv_temp, acc_t logp, acc_t lse,
              acc_t h, acc_t a, acc_t b, float* buf) {
  const acc_t xy = static_cast<acc_t>(x[label]);
  const bool via_label = std::isfinite(xy) && std::isfinite(logp);
  if constexpr (std::is_same_v<scalar_t, double>) {
    for (int64_t v = 0; v < V; ++v) {
      const double zc = via_label ? (x[v] - xy) * inv_temp + logp : x[v] * inv_temp - lse;
      g[v] = logits_grad<double>(zc, v == label, 0.0, h, a, b);
    }
  } else {
    // zc = (x - ref) * scale + off: via the label (ref = x_y, off = logp) or via lse (ref = 0).
    // fp32 gradients are computed straight into g (one read, one store per element; elementwise,
    // so g may alias x); other dtypes through the fp32 buffer, converted once each way.
    const float ref = via_label ? xy : 0.f, off = via_label ? logp : -lse;
    const Vec vref(ref), voff(off), vh(h), va(a), vb(b), vinv(inv_temp);
    // max(zc, -200): exp_u20 returns exactly 0 below ln(FLT_MIN) ~ -87.3, so p is unchanged, and a
    // -inf logit gets a finite zc + h: b p (zc + h) is 0, not 0 * -inf = NaN.
    const Vec vfloor(-200.f);
    for (int64_t v0 = 0; v0 < V; v0 += kBlock) {
      const int64_t len = std::min(kBlock, V - v0);
      const float* xb = block_as_float(x + v0, len, buf);
      float* out;
      if constexpr (std::is_same_v<scalar_t, float>) out = g + v0; else out = buf;
      const int64_t vlen = len - len % Vec::size();
      if (b != 0.f) {
        for (int64_t i = 0; i < vlen; i += Vec::size()) {
          const Vec zc = at::vec::maximum((Vec::loadu(xb + i) - vref) * vinv + voff, vfloor);
          const Vec p = zc.exp_u20();
          (Vec(0.f) - p * (va + vb * (zc + vh))).store(out + i);
        }
      } else {
        for (int64_t i = 0; i < vlen; i += Vec::size()) {
          const Vec zc = (Vec::loadu(xb + i) - vref) * vinv + voff;
          (Vec(0.f) - va * zc.exp_u20()).store(out + i);
        }
      }
      for (int64_t i = vlen; i < len; ++i) {
        const float zc = (xb[i] - ref) * inv_temp + off;
        out[i] = logits_grad<float>(zc, false, 0.f, h, a, b);
      }
      if (label >= v0 && label < v0 + len) out[label - v0] += a;
      if constexpr (!std::is_same_v<scalar_t, float>) {
        for (int64_t i = 0; i < len; ++i) g[v0 + i] = static_cast<scalar_t>(buf[i]);
      }
    }
  }
}

}  // namespace alignops::cpu
