// Per-row softmax statistics and the logits-pass gradient, shared by the CPU and CUDA kernels.
// Plain C++ (no torch headers) so nvcc compiles it without torch's CUDA headers.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define ALIGNOPS_HD __host__ __device__ __forceinline__
#else
#define ALIGNOPS_HD inline
#endif

namespace alignops {

// Running statistics of z[0..k) relative to their running max m:
//   s = sum exp(z - m),   t = sum exp(z - m) * (z - m).
// Keeping t relative to m (instead of sum p*z) keeps the entropy H = log s - t/s accurate for
// logits shifted by +-1000, where lse - sum(p*z) cancels catastrophically in fp32.
template <typename acc_t>
struct SoftmaxStats {
  acc_t m, s, t;
};

template <typename acc_t>
ALIGNOPS_HD SoftmaxStats<acc_t> stats_empty() {
  return {-INFINITY, acc_t(0), acc_t(0)};
}

// Combines the statistics of two disjoint parts of a row. `scale` converts differences of m to
// z units when m is kept in raw-logit units (the CPU kernels: z = x * scale); 1 when m is z.
template <typename acc_t>
ALIGNOPS_HD SoftmaxStats<acc_t> stats_merge(SoftmaxStats<acc_t> a, SoftmaxStats<acc_t> b,
                                            acc_t scale = acc_t(1)) {
  if (b.m == -INFINITY) return a;  // also covers parts made only of -inf logits
  if (a.m == -INFINITY) return b;
  const acc_t m = a.m > b.m ? a.m : b.m;
  const acc_t da = (a.m - m) * scale, db = (b.m - m) * scale;  // <= 0
  const acc_t ea = exp(da), eb = exp(db);
  return {m, a.s * ea + b.s * eb, ea * (a.t + da * a.s) + eb * (b.t + db * b.s)};
}

template <typename acc_t>
ALIGNOPS_HD acc_t stats_lse(SoftmaxStats<acc_t> st) {
  return st.m + log(st.s);
}

template <typename acc_t>
ALIGNOPS_HD acc_t stats_entropy(SoftmaxStats<acc_t> st) {
  return log(st.s) - st.t / st.s;
}

// d loss / d z_v for one element of a row, before the division by the temperature:
//   a * (1[v = y] - p) - b * p * (z - lse + H),   p = exp(z - lse).
// p == 0 (z = -inf) contributes exactly 0 rather than 0 * inf = NaN.
template <typename acc_t>
ALIGNOPS_HD acc_t logits_grad(acc_t z, bool is_label, acc_t lse, acc_t entropy, acc_t a, acc_t b) {
  const acc_t zc = z - lse;
  const acc_t p = exp(zc);
  acc_t g = (is_label ? a : acc_t(0)) - a * p;
  if (p > acc_t(0)) g -= b * p * (zc + entropy);
  return g;
}

}  // namespace alignops
