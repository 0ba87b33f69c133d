// CUDA kernels of the logits pass: per-token log-prob, log-sum-exp and entropy, and the fused
// backward. Contract: alignops/token_stats.py; C launchers: launchers.h. No torch headers.
//
// One thread block per row; a 1-D grid of at most kMaxBlocks blocks loops over rows, so no grid
// dimension grows with the number of tokens. Every offset is int64 (N * V exceeds 2^31 at
// N = 16k, V = 152k). Each thread walks its share of the row (token_stats_row.cuh) with 16-byte
// loads; forward then merges the threads' SoftmaxStats in a fixed tree (warp shuffles, then one
// warp over the per-warp results), so results are bitwise reproducible and independent of other
// rows. No atomics.
//
// Precision: accumulation is fp32. setup.py compiles with --use_fast_math, which turns expf/logf
// into the MUFU approximations (__expf: 2 + 1.17|x| ulp, x = z - max <= 0; denormals flush to 0).
// Only terms with |z - max| <~ 20 carry weight in the sums, so they stay within ~1e-6 relative,
// inside the 1e-5 fp32 budget; `make cuda-check` compiles without fast-math, which is also correct.
// Differences are taken on the raw logits and scaled once, (x - m) / T, as on the CPU; what would
// break at |x| ~ 1000 is FMA contraction (nvcc's default, fast-math or not) of that product into
// the following subtraction: __fmul_rn (mul_rn) blocks it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdint.h>
#include <string.h>

#include "../common/softmax_stats.h"
#include "launchers.h"
#include "token_stats_row.cuh"

namespace alignops {
namespace cuda_kernels {
namespace {

using cuda_row::RowSplit;
using Stats = SoftmaxStats<float>;

// Far below the 2^31 - 1 limit of grid x; rows beyond it are looped over by the same blocks.
using cuda_row::grid_for;
using cuda_row::row_offset;

// ---- element types: scalar conversion and 16-byte vector load/store -----------------------------

template <typename scalar_t>
struct Elem;

template <>
struct Elem<float> {
  static constexpr int kVec = 4;
  __device__ static float to_float(float x) { return x; }
  __device__ static float from_float(float x) { return x; }
  __device__ static void unpack(uint4 r, float* out) {
    out[0] = __uint_as_float(r.x);
    out[1] = __uint_as_float(r.y);
    out[2] = __uint_as_float(r.z);
    out[3] = __uint_as_float(r.w);
  }
  __device__ static uint4 pack(const float* g) {
    return make_uint4(__float_as_uint(g[0]), __float_as_uint(g[1]), __float_as_uint(g[2]), __float_as_uint(g[3]));
  }
};

template <>
struct Elem<__nv_bfloat16> {
  static constexpr int kVec = 8;
  __device__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  // bf16 is the top half of an fp32: widening is a shift, no conversion instruction.
  __device__ static void unpack(uint4 r, float* out) {
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = __uint_as_float(w[i] << 16);  // little-endian: element 2i is the low half
      out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
  // One paired conversion (cvt.rn.bf16x2.f32) per two elements; .x lands in the low half.
  __device__ static uint32_t pair(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &h, sizeof u);
    return u;
  }
  __device__ static uint4 pack(const float* g) {
    return make_uint4(pair(g[0], g[1]), pair(g[2], g[3]), pair(g[4], g[5]), pair(g[6], g[7]));
  }
};

template <>
struct Elem<__half> {
  static constexpr int kVec = 8;
  __device__ static float to_float(__half x) { return __half2float(x); }
  __device__ static __half from_float(float x) { return __float2half_rn(x); }
  __device__ static void unpack(uint4 r, float* out) {
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] & 0xffffu)));
      out[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] >> 16)));
    }
  }
  __device__ static uint32_t pair(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &h, sizeof u);
    return u;
  }
  __device__ static uint4 pack(const float* g) {
    return make_uint4(pair(g[0], g[1]), pair(g[2], g[3]), pair(g[4], g[5]), pair(g[6], g[7]));
  }
};

// Enough 16-byte loads in flight per thread (two for 2-byte types, four for fp32: 16 elements).
template <typename scalar_t>
struct Unroll {
  static constexpr int value = 16 / Elem<scalar_t>::kVec;
};

// ---- row access -----------------------------------------------------------------------------------

// Forward reads only: the read-only path (ld.global.nc) is safe because forward never writes logits.
template <typename scalar_t>
struct ReadOnlyRow {
  const scalar_t* row;
  const scalar_t* vec_base;  // row + head: 16-byte aligned
  __device__ float scalar(int64_t v) const { return Elem<scalar_t>::to_float(__ldg(row + v)); }
  __device__ void vector(int64_t j, float* out) const {
    const uint4 r = __ldg(reinterpret_cast<const uint4*>(vec_base) + j);
    Elem<scalar_t>::unpack(r, out);
  }
};

// Backward: plain (coherent) loads, because the gradient may alias the logits.
template <typename scalar_t>
struct ReadWriteRow {
  const scalar_t* x;
  scalar_t* g;
  const scalar_t* x_vec;  // x + head
  scalar_t* g_vec;        // g + head
  __device__ float scalar_load(int64_t v) const { return Elem<scalar_t>::to_float(x[v]); }
  __device__ void scalar_store(int64_t v, float value) const { g[v] = Elem<scalar_t>::from_float(value); }
  __device__ void vector_load(int64_t j, float* out) const {
    Elem<scalar_t>::unpack(reinterpret_cast<const uint4*>(x_vec)[j], out);
  }
  __device__ void vector_store(int64_t j, const float* value) const {
    reinterpret_cast<uint4*>(g_vec)[j] = Elem<scalar_t>::pack(value);
  }
};

// ---- block reduction of SoftmaxStats ---------------------------------------------------------------

// m is in raw-logit units: `scale` (= 1/temperature) turns differences of m into z units.
__device__ __forceinline__ Stats warp_merge(Stats st, float scale) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    Stats other;
    other.m = __shfl_down_sync(0xffffffffu, st.m, offset);
    other.s = __shfl_down_sync(0xffffffffu, st.s, offset);
    other.t = __shfl_down_sync(0xffffffffu, st.t, offset);
    st = stats_merge<float>(st, other, scale);
  }
  return st;  // complete in lane 0
}

// The row's statistics, valid in thread 0. The caller must __syncthreads() before the next call
// (warp 0 reads the shared slots that the next call's lane-0 writes would overwrite).
template <int kBlock>
__device__ __forceinline__ Stats block_merge(Stats st, Stats* warp_slots, float scale) {
  constexpr int kWarps = kBlock / 32;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  st = warp_merge(st, scale);
  if (lane == 0) warp_slots[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < kWarps ? warp_slots[lane] : stats_empty<float>();
    st = warp_merge(st, scale);
  }
  return st;
}

// ---- kernels ----------------------------------------------------------------------------------------

// __launch_bounds__(kBlock, 2048 / kBlock): at most 32 registers, so two 1024-thread blocks share an
// SM and one streams its row while the other is in its reduction or barrier (without the bound
// ptxas gave the 1024-thread bf16 backward 60 registers: one block per SM). No spills at sm_80/90.
template <typename scalar_t, int kBlock>
__global__ void __launch_bounds__(kBlock, 2048 / kBlock)
token_stats_fwd_kernel(const scalar_t* __restrict__ logits, int64_t N, int64_t T, int64_t V, int64_t stride_b,
                       int64_t stride_t, const int64_t* __restrict__ labels, float inv_temp,
                       int64_t ignore_index, bool compute_entropy, float* __restrict__ logp_out,
                       float* __restrict__ lse_out, float* __restrict__ entropy_out) {
  constexpr int kVec = Elem<scalar_t>::kVec;
  __shared__ Stats warp_slots[kBlock / 32];
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const int64_t label = labels[row];
    if (label == ignore_index) {  // not read at all: an ignored row may hold anything
      if (threadIdx.x == 0) logp_out[row] = lse_out[row] = entropy_out[row] = 0.f;
      continue;  // block-uniform, and no shared memory was touched
    }
    const scalar_t* x = logits + row_offset(row, T, stride_b, stride_t);
    const bool label_in_row = label >= 0 && label < V;  // else logp is NaN, and x[label] never read
    // Issued before the row loop so that its latency hides under the row instead of following it.
    float x_label = 0.f;
    if (threadIdx.x == 0 && label_in_row) x_label = Elem<scalar_t>::to_float(__ldg(x + label));
    const uint64_t addr = reinterpret_cast<uint64_t>(x);
    const RowSplit sp = cuda_row::split_row(addr, addr, V, sizeof(scalar_t));
    cuda_row::StatsVisitor<kVec, ReadOnlyRow<scalar_t>> vis{{x, x + sp.head}, inv_temp, stats_empty<float>()};
    cuda_row::visit_thread_share<Unroll<scalar_t>::value>(sp, V, threadIdx.x, kBlock, vis);
    const Stats st = block_merge<kBlock>(vis.st, warp_slots, inv_temp);
    if (threadIdx.x == 0) {
      const float log_s = logf(st.s);
      lse_out[row] = cuda_row::mul_rn(st.m, inv_temp) + log_s;
      // x_y - m is exact, and (x_y - m) / T - log s keeps a small log-prob accurate where
      // z_y - lse would carry lse's fp32 rounding (~1e-4 at |z| ~ 1000).
      logp_out[row] = label_in_row ? cuda_row::mul_rn(x_label - st.m, inv_temp) - log_s : NAN;
      entropy_out[row] = compute_entropy ? stats_entropy<float>(st) : 0.f;
    }
    __syncthreads();
  }
}

template <typename scalar_t, int kBlock>
__global__ void __launch_bounds__(kBlock, 2048 / kBlock)
token_stats_bwd_kernel(const scalar_t* logits, int64_t N, int64_t T, int64_t V, int64_t stride_b, int64_t stride_t,
                       const int64_t* __restrict__ labels, const float* __restrict__ logp,
                       const float* __restrict__ lse, const float* __restrict__ entropy,
                       const float* __restrict__ grad_logp, const float* __restrict__ grad_entropy,
                       float inv_temp, int64_t ignore_index, bool has_entropy_grad, scalar_t* grad_logits,
                       int64_t grad_stride_b, int64_t grad_stride_t) {
  // logits and grad_logits carry no __restrict__: they may be the same buffer.
  constexpr int kVec = Elem<scalar_t>::kVec;
  constexpr int kUnroll = Unroll<scalar_t>::value;
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const int64_t label = labels[row];
    scalar_t* g = grad_logits + row_offset(row, T, grad_stride_b, grad_stride_t);
    const scalar_t* x = logits + row_offset(row, T, stride_b, stride_t);
    const uint64_t gaddr = reinterpret_cast<uint64_t>(g);
    if (label == ignore_index || label < 0 || label >= V) {
      const RowSplit sp = cuda_row::split_row(gaddr, gaddr, V, sizeof(scalar_t));
      cuda_row::ZeroVisitor<kVec, ReadWriteRow<scalar_t>> zero{{x, g, x + sp.head, g + sp.head}};
      cuda_row::visit_thread_share<kUnroll>(sp, V, threadIdx.x, kBlock, zero);
      continue;
    }
    const float x_label = Elem<scalar_t>::to_float(x[label]);
    // Every thread has read x[label] before any thread may overwrite it (in-place backward).
    __syncthreads();
    const RowSplit sp = cuda_row::split_row(reinterpret_cast<uint64_t>(x), gaddr, V, sizeof(scalar_t));
    const cuda_row::GradCoeffs coeffs = cuda_row::make_grad_coeffs(
        x_label, logp[row], lse[row], entropy[row], grad_logp[row], has_entropy_grad ? grad_entropy[row] : 0.f,
        has_entropy_grad, inv_temp, label);
    cuda_row::GradVisitor<kVec, ReadWriteRow<scalar_t>> vis{{x, g, x + sp.head, g + sp.head}, coeffs, sp.head};
    cuda_row::visit_thread_share<kUnroll>(sp, V, threadIdx.x, kBlock, vis);
  }
}

// ---- launch configuration ---------------------------------------------------------------------------

// 256 threads for short rows (up to ~4 vectors each), 1024 for vocabulary-sized rows (V = 152k bf16
// is 19k vectors: ~19 per thread), so the per-row reduction stays a small part of the row's time.
template <typename scalar_t>
int block_size_for(int64_t V) {
  const int64_t nvec = (V + Elem<scalar_t>::kVec - 1) / Elem<scalar_t>::kVec;
  if (nvec <= 256 * 4) return 256;
  if (nvec <= 512 * 8) return 512;
  return 1024;
}

template <typename scalar_t>
cudaError_t launch_fwd(const void* logits, int64_t B, int64_t T, int64_t V, int64_t stride_b, int64_t stride_t,
                       const int64_t* labels, float inv_temp, int64_t ignore_index, bool compute_entropy,
                       float* logp, float* lse, float* entropy, cudaStream_t stream) {
  const int64_t N = B * T;
  const auto* x = static_cast<const scalar_t*>(logits);
  const int grid = grid_for(N);
  switch (block_size_for<scalar_t>(V)) {
    case 256:
      token_stats_fwd_kernel<scalar_t, 256><<<grid, 256, 0, stream>>>(
          x, N, T, V, stride_b, stride_t, labels, inv_temp, ignore_index, compute_entropy, logp, lse, entropy);
      break;
    case 512:
      token_stats_fwd_kernel<scalar_t, 512><<<grid, 512, 0, stream>>>(
          x, N, T, V, stride_b, stride_t, labels, inv_temp, ignore_index, compute_entropy, logp, lse, entropy);
      break;
    default:
      token_stats_fwd_kernel<scalar_t, 1024><<<grid, 1024, 0, stream>>>(
          x, N, T, V, stride_b, stride_t, labels, inv_temp, ignore_index, compute_entropy, logp, lse, entropy);
  }
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_bwd(const void* logits, int64_t B, int64_t T, int64_t V, int64_t stride_b, int64_t stride_t,
                       const int64_t* labels, const float* logp, const float* lse, const float* entropy,
                       const float* grad_logp, const float* grad_entropy, float inv_temp, int64_t ignore_index,
                       bool has_entropy_grad, void* grad_logits, int64_t grad_stride_b, int64_t grad_stride_t,
                       cudaStream_t stream) {
  const int64_t N = B * T;
  const auto* x = static_cast<const scalar_t*>(logits);
  auto* g = static_cast<scalar_t*>(grad_logits);
  const int grid = grid_for(N);
  switch (block_size_for<scalar_t>(V)) {
    case 256:
      token_stats_bwd_kernel<scalar_t, 256><<<grid, 256, 0, stream>>>(
          x, N, T, V, stride_b, stride_t, labels, logp, lse, entropy, grad_logp, grad_entropy, inv_temp,
          ignore_index, has_entropy_grad, g, grad_stride_b, grad_stride_t);
      break;
    case 512:
      token_stats_bwd_kernel<scalar_t, 512><<<grid, 512, 0, stream>>>(
          x, N, T, V, stride_b, stride_t, labels, logp, lse, entropy, grad_logp, grad_entropy, inv_temp,
          ignore_index, has_entropy_grad, g, grad_stride_b, grad_stride_t);
      break;
    default:
      token_stats_bwd_kernel<scalar_t, 1024><<<grid, 1024, 0, stream>>>(
          x, N, T, V, stride_b, stride_t, labels, logp, lse, entropy, grad_logp, grad_entropy, inv_temp,
          ignore_index, has_entropy_grad, g, grad_stride_b, grad_stride_t);
  }
  return cudaGetLastError();
}

}  // namespace
}  // namespace cuda_kernels
}  // namespace alignops

// ---- C launchers (launchers.h) ------------------------------------------------------------------------

extern "C" const char* alignops_cuda_error_string(int err) {
  return cudaGetErrorString(static_cast<cudaError_t>(err));
}

extern "C" int alignops_token_stats_fwd_cuda(const void* logits, int dtype, int64_t B, int64_t T, int64_t V,
                                             int64_t stride_b, int64_t stride_t, const int64_t* labels,
                                             float inv_temperature, int64_t ignore_index, int compute_entropy,
                                             float* logp, float* lse, float* entropy, void* stream) {
  using namespace alignops::cuda_kernels;
  if (B < 0 || T < 0 || V <= 0) return static_cast<int>(cudaErrorInvalidValue);
  if (B == 0 || T == 0) return static_cast<int>(cudaSuccess);
  const auto s = static_cast<cudaStream_t>(stream);
  const bool ent = compute_entropy != 0;
  switch (dtype) {
    case ALIGNOPS_F32:
      return launch_fwd<float>(logits, B, T, V, stride_b, stride_t, labels, inv_temperature, ignore_index, ent,
                               logp, lse, entropy, s);
    case ALIGNOPS_F16:
      return launch_fwd<__half>(logits, B, T, V, stride_b, stride_t, labels, inv_temperature, ignore_index, ent,
                                logp, lse, entropy, s);
    case ALIGNOPS_BF16:
      return launch_fwd<__nv_bfloat16>(logits, B, T, V, stride_b, stride_t, labels, inv_temperature,
                                       ignore_index, ent, logp, lse, entropy, s);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

extern "C" int alignops_token_stats_bwd_cuda(const void* logits, int dtype, int64_t B, int64_t T, int64_t V,
                                             int64_t stride_b, int64_t stride_t, const int64_t* labels,
                                             const float* logp, const float* lse, const float* entropy,
                                             const float* grad_logp, const float* grad_entropy,
                                             float inv_temperature, int64_t ignore_index, int has_entropy_grad,
                                             void* grad_logits, int64_t grad_stride_b, int64_t grad_stride_t,
                                             void* stream) {
  using namespace alignops::cuda_kernels;
  if (B < 0 || T < 0 || V <= 0) return static_cast<int>(cudaErrorInvalidValue);
  if (B == 0 || T == 0) return static_cast<int>(cudaSuccess);
  const auto s = static_cast<cudaStream_t>(stream);
  const bool has_b = has_entropy_grad != 0;
  switch (dtype) {
    case ALIGNOPS_F32:
      return launch_bwd<float>(logits, B, T, V, stride_b, stride_t, labels, logp, lse, entropy, grad_logp,
                               grad_entropy, inv_temperature, ignore_index, has_b, grad_logits, grad_stride_b,
                               grad_stride_t, s);
    case ALIGNOPS_F16:
      return launch_bwd<__half>(logits, B, T, V, stride_b, stride_t, labels, logp, lse, entropy, grad_logp,
                                grad_entropy, inv_temperature, ignore_index, has_b, grad_logits, grad_stride_b,
                                grad_stride_t, s);
    case ALIGNOPS_BF16:
      return launch_bwd<__nv_bfloat16>(logits, B, T, V, stride_b, stride_t, labels, logp, lse, entropy,
                                       grad_logp, grad_entropy, inv_temperature, ignore_index, has_b,
                                       grad_logits, grad_stride_b, grad_stride_t, s);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}
