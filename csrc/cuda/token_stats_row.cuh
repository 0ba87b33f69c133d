// Per-thread work of the CUDA token-statistics kernels (csrc/cuda/token_stats.cu), written as
// __host__ __device__ code with no CUDA headers so that the same index arithmetic and math can be
// compiled and checked on a machine without a GPU (tests/test_cuda_kernels.py builds it with g++).
//
// A row of V logits is split at 16-byte boundaries: an unaligned head (< one vector), whole
// 16-byte vectors, and a tail. Thread `tid` of `nthreads` takes head/tail elements tid, tid+nthreads,
// ... and vectors tid, tid+nthreads, ...; each element belongs to exactly one thread, which is what
// makes the in-place backward safe (every element is read and then written by the same thread).
#pragma once

#include <float.h>
#include <math.h>
#include <stdint.h>

#include "../common/softmax_stats.h"

namespace alignops {
namespace cuda_row {

constexpr int kVecBytes = 16;

// The grid: one block per row, at most kMaxBlocks blocks, each looping over rows block, block +
// grid, ... (grid x allows 2^31 - 1 blocks; a launch far below that keeps every index in range).
constexpr int64_t kMaxBlocks = 65535LL * 8;

inline int grid_for(int64_t N) { return static_cast<int>(N < kMaxBlocks ? N : kMaxBlocks); }

// Element offset of row `row` of a [B, T, V] view with strides (stride_b, stride_t, 1), in int64:
// N * V passes 2^31 at N = 14134, V = 151936, and a view's row stride alone can pass it.
ALIGNOPS_HD int64_t row_offset(int64_t row, int64_t T, int64_t stride_b, int64_t stride_t) {
  return (row / T) * stride_b + (row % T) * stride_t;
}

// Device pass only: the host compiler (also under nvcc) would warn about an unknown pragma.
#if defined(__CUDA_ARCH__)
#define ALIGNOPS_UNROLL _Pragma("unroll")
#else
#define ALIGNOPS_UNROLL
#endif

// Differences are taken on the raw logits and scaled once, d = (x - m) * inv_temp, as in the CPU
// kernels (csrc/cpu/row_ops.h): rounding z = x * inv_temp first costs ~|z| * 2^-24 in every
// log-prob at |x| ~ 1000 with T != 1, twice eager's error. The product is rounded on its own,
// never contracted into an FMA (nvcc contracts by default, and --use_fast_math keeps it on).
ALIGNOPS_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;  // host self-check: built with -ffp-contract=off
#endif
}

struct RowSplit {
  int64_t head;   // elements [0, head) before the first 16-byte boundary
  int64_t nvec;   // 16-byte vectors starting at element head
  int64_t tail;   // first element after the vectors; [tail, V) is the tail
};

// `addrs_mod16` are the row addresses modulo 16 of every pointer that is accessed with vectors
// (the logits, and the gradient in backward). Vectors are used only if they share one alignment.
ALIGNOPS_HD RowSplit split_row(uint64_t addr_a, uint64_t addr_b, int64_t V, int elem_bytes) {
  const uint64_t ra = addr_a % kVecBytes, rb = addr_b % kVecBytes;
  if (ra != rb || ra % elem_bytes != 0) return {V, 0, V};  // everything scalar, still correct
  int64_t head = static_cast<int64_t>((kVecBytes - ra) % kVecBytes) / elem_bytes;
  if (head > V) head = V;
  const int64_t vec = kVecBytes / elem_bytes;
  const int64_t nvec = (V - head) / vec;
  return {head, nvec, head + nvec * vec};
}

// Visits this thread's share of a row: scalar(v) for head and tail elements, and
// vectors<K>(j, step) for the K vectors j, j+step, ..., j+(K-1)*step (vector j starts at element
// head + j*kVec). K = kUnroll while a full unrolled group remains, then 1: all K loads are issued
// before any of them is used, which keeps enough bytes in flight to saturate HBM.
template <int kUnroll, class Visitor>
ALIGNOPS_HD void visit_thread_share(const RowSplit& sp, int64_t V, int64_t tid, int64_t nthreads,
                                    Visitor& vis) {
  for (int64_t v = tid; v < sp.head; v += nthreads) vis.scalar(v);
  int64_t j = tid;
  for (; j + (kUnroll - 1) * nthreads < sp.nvec; j += kUnroll * nthreads) vis.template vectors<kUnroll>(j, nthreads);
  for (; j < sp.nvec; j += nthreads) vis.template vectors<1>(j, nthreads);
  for (int64_t v = sp.tail + tid; v < V; v += nthreads) vis.scalar(v);
}

// Adds the raw logits x[0..K) to a thread's running statistics (m in raw-logit units, s and t in
// z units): chunk max first, then one exp per element relative to the running max (rescaling s and
// t only when the max grows, which after the first chunks is rare), so the row costs one exp per
// element.
template <int K>
ALIGNOPS_HD void absorb_chunk(SoftmaxStats<float>& st, const float (&x)[K], float inv_temp) {
  float chunk_max = x[0];
ALIGNOPS_UNROLL
  for (int k = 1; k < K; ++k) chunk_max = fmaxf(chunk_max, x[k]);
  if (chunk_max > st.m) {
    if (st.m != -INFINITY) {  // s = t = 0 otherwise, and (m - max) * s would be -inf * 0
      const float d = mul_rn(st.m - chunk_max, inv_temp), e = expf(d);
      st.t = e * fmaf(d, st.s, st.t);
      st.s *= e;
    }
    st.m = chunk_max;
  } else if (!(chunk_max > -INFINITY)) {
    // Only -inf and NaN here (fmaxf skips NaN). -inf has p = 0 and adds nothing; a NaN must poison
    // the row, including m, because stats_merge treats m = -inf as "empty" and would drop it.
    bool has_nan = false;
ALIGNOPS_UNROLL
    for (int k = 0; k < K; ++k) has_nan |= (x[k] != x[k]);
    if (has_nan) st = {NAN, NAN, NAN};
    return;
  }
ALIGNOPS_UNROLL
  for (int k = 0; k < K; ++k) {
    const float d = mul_rn(x[k] - st.m, inv_temp);
    const float e = expf(d);  // d = NaN (a NaN logit) gives e = NaN: s, and the row, become NaN
    st.s += e;
    // d = -inf gives e = 0; clamping d keeps 0 * -inf from becoming NaN without a branch.
    st.t = fmaf(e, fmaxf(d, -FLT_MAX), st.t);
  }
}

// Forward: a thread's statistics over its share. Loader: scalar(v) -> float logit, and
// vector(j, float* out) writing the kVec logits of vector j.
template <int kVec, class Loader>
struct StatsVisitor {
  Loader load;
  float inv_temp;
  SoftmaxStats<float> st;

  ALIGNOPS_HD void scalar(int64_t v) {
    const float x[1] = {load.scalar(v)};
    absorb_chunk<1>(st, x, inv_temp);
  }

  template <int K>
  ALIGNOPS_HD void vectors(int64_t j, int64_t step) {
    float x[K * kVec];
ALIGNOPS_UNROLL
    for (int k = 0; k < K; ++k) load.vector(j + k * step, x + k * kVec);
    absorb_chunk<K * kVec>(st, x, inv_temp);
  }
};

// Coefficients of one row's backward (see logits_grad in softmax_stats.h). log p_v is rebuilt as
// (x_v - shift) * inv_temp + offset: shift = x_y, offset = logp (exact at v = y), or shift = 0,
// offset = -lse when x_y or logp is not finite. a and b already carry the final 1/temperature.
struct GradCoeffs {
  float inv_temp, shift, offset, entropy, a, b;
  int64_t label;
};

ALIGNOPS_HD GradCoeffs make_grad_coeffs(float x_label, float logp, float lse, float entropy, float grad_logp,
                                        float grad_entropy, bool has_entropy_grad, float inv_temp,
                                        int64_t label) {
  const bool via_label = isfinite(x_label) && isfinite(logp);
  return {inv_temp,
          via_label ? x_label : 0.f,
          via_label ? logp : -lse,
          entropy,
          grad_logp * inv_temp,
          has_entropy_grad ? grad_entropy * inv_temp : 0.f,
          label};
}

ALIGNOPS_HD float grad_element(const GradCoeffs& c, float x, bool is_label) {
  const float log_p = mul_rn(x - c.shift, c.inv_temp) + c.offset;
  return logits_grad<float>(log_p, is_label, 0.f, c.entropy, c.a, c.b);
}

// Backward: IO has scalar_load(v), scalar_store(v, g), vector_load(j, float*), vector_store(j,
// const float*). Every element is loaded before it is stored, by the same thread.
template <int kVec, class IO>
struct GradVisitor {
  IO io;
  GradCoeffs c;
  int64_t head;

  ALIGNOPS_HD void scalar(int64_t v) { io.scalar_store(v, grad_element(c, io.scalar_load(v), v == c.label)); }

  template <int K>
  ALIGNOPS_HD void vectors(int64_t j, int64_t step) {
    float x[K * kVec];
ALIGNOPS_UNROLL
    for (int k = 0; k < K; ++k) io.vector_load(j + k * step, x + k * kVec);
ALIGNOPS_UNROLL
    for (int k = 0; k < K; ++k) {
      // The label's position inside this vector as a 32-bit index (-1: not here), so the
      // per-element test is a 32-bit compare.
      const int64_t rel = c.label - (head + (j + k * step) * kVec);
      const int label_lane = (rel >= 0 && rel < kVec) ? static_cast<int>(rel) : -1;
ALIGNOPS_UNROLL
      for (int i = 0; i < kVec; ++i) x[k * kVec + i] = grad_element(c, x[k * kVec + i], i == label_lane);
    }
ALIGNOPS_UNROLL
    for (int k = 0; k < K; ++k) io.vector_store(j + k * step, x + k * kVec);
  }
};

// Ignored rows (and out-of-range labels): zeros, without reading the logits.
template <int kVec, class IO>
struct ZeroVisitor {
  IO io;

  ALIGNOPS_HD void scalar(int64_t v) { io.scalar_store(v, 0.f); }

  template <int K>
  ALIGNOPS_HD void vectors(int64_t j, int64_t step) {
    const float zeros[kVec] = {};
ALIGNOPS_UNROLL
    for (int k = 0; k < K; ++k) io.vector_store(j + k * step, zeros);
  }
};

}  // namespace cuda_row
}  // namespace alignops
