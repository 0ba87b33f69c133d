// CPU kernels of the logits pass: per-token log-prob, log-sum-exp and entropy, and the fused
// backward. Contract: alignops/token_stats.py.
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

#include "ops.h"
#include "row_ops.h"

namespace alignops::cpu {
namespace {

// Rows are visited in order; a row costs ~V, so a grain of a few rows keeps threads busy
// without oversubscribing short inputs.
inline int64_t row_grain(int64_t V) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)); }

template <typename scalar_t>
inline const scalar_t* row_ptr(const scalar_t* base, int64_t n, int64_t T, int64_t sb, int64_t st) {
  return base + (n / T) * sb + (n % T) * st;
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
      const SoftmaxStats<acc_t> s = row_stats(x, V, inv_temp, buf);
      out_lse[n] = row_lse(s, inv_temp);
      out_logp[n] = (label >= 0 && label < V) ? row_logp(static_cast<acc_t>(x[label]), s, inv_temp)
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
      // The temperature's 1/T is folded into the coefficients.
      const acc_t a = ga[n] * inv_temp, b = has_entropy_grad ? gb[n] * inv_temp : acc_t(0);
      grad_row<scalar_t, acc_t>(x, g, V, label, inv_temp, logp_p[n], lse_p[n], ent_p[n], a, b, buf);
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
