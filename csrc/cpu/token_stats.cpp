// CPU kernels of the logits pass: per-token log-prob, log-sum-exp and entropy, and the fused
// backward. Contract: alignops/token_logprobs.py.
//
// Rows run in parallel (at::parallel_for). Each row is processed in blocks of kBlock elements
// converted once to fp32 in an L1-resident buffer: block max, then exp-sums on the hot buffer,
// then an exact merge into the running statistics. One read of the row from memory and one
// exp per element; a single-pass online update would need two.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "../common/softmax_stats.h"
#include "ops.h"

namespace alignops::cpu {
namespace {

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

// Rows are visited in order; a row costs ~V, so a grain of a few rows keeps threads busy
// without oversubscribing short inputs.
inline int64_t row_grain(int64_t V) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)); }

template <typename scalar_t>
inline const scalar_t* row_ptr(const scalar_t* base, int64_t n, int64_t T, int64_t sb, int64_t st) {
  return base + (n / T) * sb + (n % T) * st;
}

// fp32 statistics of z = x * inv_temp over one row.
template <typename scalar_t>
SoftmaxStats<float> row_stats_f32(const scalar_t* x, int64_t V, float inv_temp, float* buf) {
  SoftmaxStats<float> st = stats_empty<float>();
  for (int64_t v0 = 0; v0 < V; v0 += kBlock) {
    const int64_t len = std::min(kBlock, V - v0);
    for (int64_t i = 0; i < len; ++i) buf[i] = to_float(x[v0 + i]) * inv_temp;
    const int64_t vlen = len - len % Vec::size();
    Vec vmax(-std::numeric_limits<float>::infinity());
    for (int64_t i = 0; i < vlen; i += Vec::size()) vmax = at::vec::maximum(vmax, Vec::loadu(buf + i));
    float m = hmax(vmax);
    for (int64_t i = vlen; i < len; ++i) m = (buf[i] > m || std::isnan(buf[i])) ? buf[i] : m;
    if (m == -std::numeric_limits<float>::infinity()) continue;  // block of -inf logits: p = 0
    // A NaN logit makes the row NaN. exp_u20 is a bit-trick polynomial that does not propagate
    // NaN, so this cannot be left to the arithmetic.
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
      // e == 0 where d = -inf; blend keeps 0 * -inf from turning into NaN.
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

// fp64 path, for float64 logits (gradcheck and oracle comparisons): plain loops, exact exp.
SoftmaxStats<double> row_stats_f64(const double* x, int64_t V, double inv_temp) {
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

template <typename scalar_t, typename acc_t>
void fwd_impl(const at::Tensor& logits, const at::Tensor& labels, double inv_temperature,
              int64_t ignore_index, bool compute_entropy, const at::Tensor& logp,
              const at::Tensor& lse, const at::Tensor& entropy) {
  const int64_t N = labels.numel(), T = logits.size(1), V = logits.size(2);
  const int64_t sb = logits.stride(0), st_ = logits.stride(1);
  const scalar_t* base = logits.data_ptr<scalar_t>();
  const int64_t* y = labels.data_ptr<int64_t>();
  acc_t* out_logp = logp.data_ptr<acc_t>();
  acc_t* out_lse = lse.data_ptr<acc_t>();
  acc_t* out_ent = entropy.data_ptr<acc_t>();
  const acc_t inv_temp = static_cast<acc_t>(inv_temperature);

  at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
    alignas(64) float buf[kBlock];
    for (int64_t n = begin; n < end; ++n) {
      const int64_t label = y[n];
      if (label == ignore_index) {
        out_logp[n] = out_lse[n] = out_ent[n] = acc_t(0);
        continue;
      }
      const scalar_t* x = row_ptr(base, n, T, sb, st_);
      SoftmaxStats<acc_t> s;
      if constexpr (std::is_same_v<scalar_t, double>) {
        s = row_stats_f64(x, V, inv_temp);
      } else {
        s = row_stats_f32(x, V, inv_temp, buf);
      }
      out_lse[n] = stats_lse(s);
      // (z_y - m) - log s, not z_y - lse: lse is ~1000 for shifted logits and its fp32 ulp would
      // swamp a small log-prob.
      out_logp[n] = (label >= 0 && label < V)
                        ? (static_cast<acc_t>(x[label]) * inv_temp - s.m) - std::log(s.s)
                        : std::numeric_limits<acc_t>::quiet_NaN();
      out_ent[n] = compute_entropy ? stats_entropy(s) : acc_t(0);
    }
  });
}

template <typename scalar_t, typename acc_t>
void bwd_impl(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& logp, const at::Tensor& lse,
              const at::Tensor& entropy, const at::Tensor& grad_logp, const at::Tensor& grad_entropy,
              double inv_temperature, int64_t ignore_index, bool has_entropy_grad,
              const at::Tensor& grad_logits) {
  const int64_t N = labels.numel(), T = logits.size(1), V = logits.size(2);
  const int64_t sb = logits.stride(0), st_ = logits.stride(1);
  const int64_t gsb = grad_logits.stride(0), gst = grad_logits.stride(1);
  const scalar_t* base = logits.data_ptr<scalar_t>();
  scalar_t* gbase = grad_logits.data_ptr<scalar_t>();
  const int64_t* y = labels.data_ptr<int64_t>();
  const acc_t* logp_p = logp.data_ptr<acc_t>();
  const acc_t* lse_p = lse.data_ptr<acc_t>();
  const acc_t* ent_p = entropy.data_ptr<acc_t>();
  const acc_t* ga = grad_logp.data_ptr<acc_t>();
  const acc_t* gb = grad_entropy.data_ptr<acc_t>();
  const acc_t inv_temp = static_cast<acc_t>(inv_temperature);

  at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
    alignas(64) float buf[kBlock];
    for (int64_t n = begin; n < end; ++n) {
      const int64_t label = y[n];
      const scalar_t* x = row_ptr(base, n, T, sb, st_);
      scalar_t* g = const_cast<scalar_t*>(row_ptr<scalar_t>(gbase, n, T, gsb, gst));
      if (label == ignore_index || label < 0 || label >= V) {
        std::fill(g, g + V, scalar_t(0));
        continue;
      }
      const acc_t h = ent_p[n];
      // log p_v = (z_v - z_y) + logp_y: both terms are small and exact where z_v - lse would carry
      // lse's fp32 rounding (1e-4 at |z| ~ 1000). A label logit of -inf falls back to lse.
      const acc_t zy = static_cast<acc_t>(x[label]) * inv_temp;
      const bool via_label = std::isfinite(zy) && std::isfinite(logp_p[n]);
      const acc_t shift = via_label ? zy - logp_p[n] : lse_p[n];
      // The temperature's 1/T is folded into the coefficients.
      const acc_t a = ga[n] * inv_temp, b = has_entropy_grad ? gb[n] * inv_temp : acc_t(0);
      if constexpr (std::is_same_v<scalar_t, double>) {
        for (int64_t v = 0; v < V; ++v) {
          const double zc = via_label ? (x[v] * inv_temp - zy) + logp_p[n] : x[v] * inv_temp - shift;
          g[v] = logits_grad<double>(zc, v == label, 0.0, h, a, b);
        }
        continue;
      } else {
        const Vec vzy(via_label ? zy : shift), vlogp(via_label ? logp_p[n] : 0.f), vh(h), va(a), vb(b),
            zero(0.f), vinv(inv_temp);
        for (int64_t v0 = 0; v0 < V; v0 += kBlock) {
          const int64_t len = std::min(kBlock, V - v0);
          // Read the whole block before writing it: grad_logits may alias the logits.
          for (int64_t i = 0; i < len; ++i) buf[i] = to_float(x[v0 + i]);
          const int64_t vlen = len - len % Vec::size();
          for (int64_t i = 0; i < vlen; i += Vec::size()) {
            const Vec zc = (Vec::loadu(buf + i) * vinv - vzy) + vlogp;
            const Vec p = zc.exp_u20();
            Vec gv = Vec(0.f) - va * p;
            if (b != 0.f) gv = gv - Vec::blendv(vb * p * (zc + vh), zero, p == zero);
            gv.store(buf + i);
          }
          for (int64_t i = vlen; i < len; ++i) {
            const float zc = (buf[i] * inv_temp - (via_label ? zy : shift)) + (via_label ? logp_p[n] : 0.f);
            buf[i] = logits_grad<float>(zc, false, 0.f, h, a, b);
          }
          if (label >= v0 && label < v0 + len) buf[label - v0] += a;
          for (int64_t i = 0; i < len; ++i) g[v0 + i] = static_cast<scalar_t>(buf[i]);
        }
      }
    }
  });
}

}  // namespace

void token_stats_fwd(const at::Tensor& logits, const at::Tensor& labels, double inv_temperature,
                     int64_t ignore_index, bool compute_entropy, const at::Tensor& logp,
                     const at::Tensor& lse, const at::Tensor& entropy) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "token_stats_fwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    TORCH_CHECK(logp.scalar_type() == c10::CppTypeToScalarType<acc_t>::value, "token_stats_fwd: output dtype");
    fwd_impl<scalar_t, acc_t>(logits, labels, inv_temperature, ignore_index, compute_entropy, logp, lse, entropy);
  });
}

void token_stats_bwd(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& logp,
                     const at::Tensor& lse, const at::Tensor& entropy, const at::Tensor& grad_logp,
                     const at::Tensor& grad_entropy, double inv_temperature, int64_t ignore_index,
                     bool has_entropy_grad, const at::Tensor& grad_logits) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "token_stats_bwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    TORCH_CHECK(grad_logits.scalar_type() == logits.scalar_type(), "token_stats_bwd: grad dtype");
    TORCH_CHECK(lse.scalar_type() == c10::CppTypeToScalarType<acc_t>::value, "token_stats_bwd: stats dtype");
    bwd_impl<scalar_t, acc_t>(logits, labels, logp, lse, entropy, grad_logp, grad_entropy, inv_temperature,
                              ignore_index, has_entropy_grad, grad_logits);
  });
}

}  // namespace alignops::cpu
