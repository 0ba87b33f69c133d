// CUDA kernel of the one-launch policy loss (compile-checked only; not yet run on a GPU): one block
// per row computes the softmax statistics, logp and entropy, the per-token policy epilogue
// (csrc/common/policy_math.h, the same code as the CPU kernel) and at once the gradient row.
// Contract: alignops/policy_loss.py (_epilogue_policy_loss); the C launcher is declared below
// and belongs in csrc/cuda/launchers.h when it is wired into bindings.cpp.
//
// Scalar loads for now: the vectorised row access of token_stats.cu is file-local there and
// should move into token_stats_row.cuh before this kernel is tuned.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "../common/policy_math.h"
#include "../common/softmax_stats.h"

namespace {

using alignops::PolicyParams;
using alignops::SoftmaxStats;

constexpr int kThreads = 256;

__device__ __forceinline__ float load_float(const float* p) { return __ldg(p); }
__device__ __forceinline__ float load_float(const __half* p) { return __half2float(p[0]); }
__device__ __forceinline__ float load_float(const __nv_bfloat16* p) { return __bfloat162float(p[0]); }
__device__ __forceinline__ void store_float(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_float(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_float(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

__device__ SoftmaxStats<float> shfl_stats(SoftmaxStats<float> st, int offset) {
  return {__shfl_down_sync(0xffffffffu, st.m, offset), __shfl_down_sync(0xffffffffu, st.s, offset),
          __shfl_down_sync(0xffffffffu, st.t, offset)};
}

// Block-wide merge of per-thread statistics (m in raw-logit units, `scale` = 1/T); every thread
// gets the row's statistics.
__device__ SoftmaxStats<float> block_merge(SoftmaxStats<float> st, float scale) {
  __shared__ SoftmaxStats<float> warp_stats[kThreads / 32];
  __shared__ SoftmaxStats<float> row_stats;
  for (int offset = 16; offset > 0; offset >>= 1) st = alignops::stats_merge(st, shfl_stats(st, offset), scale);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_stats[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < kThreads / 32 ? warp_stats[lane] : alignops::stats_empty<float>();
    for (int offset = 16; offset > 0; offset >>= 1) st = alignops::stats_merge(st, shfl_stats(st, offset), scale);
    if (lane == 0) row_stats = st;
  }
  __syncthreads();
  return row_stats;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) policy_loss_fused_kernel(
    const scalar_t* logits, int64_t N, int64_t T, int64_t V, int64_t stride_b, int64_t stride_t,
    const int64_t* labels, const float* old_logp, const float* adv, const float* ref_logp, const float* is_weight,
    const float* agg_norm, const float* row_len, const bool* mask, PolicyParams params, float inv_temp,
    int64_t ignore_index, int compute_entropy, float* logp_out, float* entropy_out, float* loss_out,
    float* pg_out, scalar_t* grad, int64_t grad_stride_b, int64_t grad_stride_t) {
  __shared__ float coef[4];  // logp, entropy, a, b of the row, from thread 0
  const bool need_entropy = compute_entropy || params.entropy_coef != 0.0;
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const int64_t label = labels[row];
    const bool ignored = label == ignore_index;
    const bool in_range = label >= 0 && label < V;
    const scalar_t* x = logits + (row / T) * stride_b + (row % T) * stride_t;
    scalar_t* g = grad + (row / T) * grad_stride_b + (row % T) * grad_stride_t;
    SoftmaxStats<float> st = alignops::stats_empty<float>();
    if (!ignored) {
      // per-thread statistics over a strided slice: m in raw logits, differences scaled once by
      // 1/T (stats_merge's scale) like the other kernels; __fmul_rn keeps the products unfused
      for (int64_t v = threadIdx.x; v < V; v += kThreads)
        st = alignops::stats_merge(st, SoftmaxStats<float>{load_float(x + v), 1.f, 0.f}, inv_temp);
    }
    st = block_merge(st, inv_temp);
    if (threadIdx.x == 0) {
      float lp = 0.f, h = 0.f;
      if (!ignored) {
        lp = in_range ? __fmul_rn(load_float(x + label) - st.m, inv_temp) - logf(st.s) : __int_as_float(0x7fc00000);
        h = need_entropy ? alignops::stats_entropy(st) : 0.f;
      }
      const alignops::TokenEpilogue<float> e = alignops::policy_epilogue<float>(
          lp, h, old_logp[row], adv[row], ref_logp[row], is_weight[row], agg_norm[row], row_len[row], mask[row],
          params);
      logp_out[row] = lp;
      entropy_out[row] = compute_entropy ? h : 0.f;
      loss_out[row] = e.loss_term;
      pg_out[row] = e.pg_term;
      coef[0] = lp;
      coef[1] = h;
      coef[2] = e.a * inv_temp;
      coef[3] = e.b * inv_temp;
    }
    __syncthreads();
    const float lp = coef[0], h = coef[1], a = coef[2], b = coef[3];
    if (ignored || !in_range) {
      for (int64_t v = threadIdx.x; v < V; v += kThreads) store_float(g + v, 0.f);
    } else {
      // log p_v = (x_v - x_y)/T + logp: exact at v = y (see token_stats.py's contract); read the
      // label's logit before any thread overwrites it (grad may alias logits).
      const float xy = load_float(x + label);
      const bool via_label = isfinite(xy) && isfinite(lp);
      const float lse = __fmul_rn(st.m, inv_temp) + logf(st.s);
      __syncthreads();
      for (int64_t v = threadIdx.x; v < V; v += kThreads) {
        const float xv = load_float(x + v);
        const float zc = via_label ? __fmul_rn(xv - xy, inv_temp) + lp : __fmul_rn(xv, inv_temp) - lse;
        store_float(g + v, alignops::logits_grad<float>(zc, v == label, 0.f, h, a, b));
      }
    }
    __syncthreads();  // coef and the shared statistics are reused by the next row
  }
}

template <typename scalar_t>
int launch(const void* logits, int64_t B, int64_t T, int64_t V, int64_t stride_b, int64_t stride_t,
           const int64_t* labels, const float* old_logp, const float* adv, const float* ref_logp,
           const float* is_weight, const float* agg_norm, const float* row_len, const bool* mask,
           const PolicyParams& params, float inv_temperature, int64_t ignore_index, int compute_entropy,
           float* logp, float* entropy, float* loss_terms, float* pg_terms, void* grad_logits,
           int64_t grad_stride_b, int64_t grad_stride_t, void* stream) {
  const int64_t N = B * T;
  if (N == 0) return 0;
  const unsigned grid = static_cast<unsigned>(N < (1 << 20) ? N : (1 << 20));
  policy_loss_fused_kernel<scalar_t><<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const scalar_t*>(logits), N, T, V, stride_b, stride_t, labels, old_logp, adv, ref_logp,
      is_weight, agg_norm, row_len, mask, params, inv_temperature, ignore_index, compute_entropy, logp, entropy,
      loss_terms, pg_terms, static_cast<scalar_t*>(grad_logits), grad_stride_b, grad_stride_t);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

// dtype: 0 = fp32, 1 = fp16, 2 = bf16 (AlignopsDtype); knobs/flags as in policy_math.h.
extern "C" int alignops_policy_loss_fused_cuda(
    const void* logits, int dtype, int64_t B, int64_t T, int64_t V, int64_t stride_b, int64_t stride_t,
    const int64_t* labels, const float* old_logp, const float* adv, const float* ref_logp, const float* is_weight,
    const float* agg_norm, const float* row_len, const bool* mask, int method, int kl_estimator,
    const double* knobs, long long flags, float inv_temperature, int64_t ignore_index, int compute_entropy,
    float* logp, float* entropy, float* loss_terms, float* pg_terms, void* grad_logits, int64_t grad_stride_b,
    int64_t grad_stride_t, void* stream) {
  const PolicyParams params = alignops::make_policy_params(method, kl_estimator, knobs, flags);
  switch (dtype) {
    case 0:
      return launch<float>(logits, B, T, V, stride_b, stride_t, labels, old_logp, adv, ref_logp, is_weight,
                           agg_norm, row_len, mask, params, inv_temperature, ignore_index, compute_entropy, logp,
                           entropy, loss_terms, pg_terms, grad_logits, grad_stride_b, grad_stride_t, stream);
    case 1:
      return launch<__half>(logits, B, T, V, stride_b, stride_t, labels, old_logp, adv, ref_logp, is_weight,
                            agg_norm, row_len, mask, params, inv_temperature, ignore_index, compute_entropy, logp,
                            entropy, loss_terms, pg_terms, grad_logits, grad_stride_b, grad_stride_t, stream);
    case 2:
      return launch<__nv_bfloat16>(logits, B, T, V, stride_b, stride_t, labels, old_logp, adv, ref_logp,
                                   is_weight, agg_norm, row_len, mask, params, inv_temperature, ignore_index,
                                   compute_entropy, logp, entropy, loss_terms, pg_terms, grad_logits, grad_stride_b,
                                   grad_stride_t, stream);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}
