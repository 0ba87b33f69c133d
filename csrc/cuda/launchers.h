// C launchers of the CUDA kernels. Plain C types only: bindings.cpp includes this header and is
// compiled by the host compiler without any CUDA or torch-CUDA headers. Each launcher returns a
// cudaError_t as an int (0 = success); alignops_cuda_error_string turns it into text.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum AlignopsDtype { ALIGNOPS_F32 = 0, ALIGNOPS_F16 = 1, ALIGNOPS_BF16 = 2 };

const char* alignops_cuda_error_string(int err);

// Contract: alignops/token_stats.py. logits are [B, T, V] with strides (stride_b, stride_t, 1);
// labels, logp, lse, entropy are contiguous [B*T].
int alignops_token_stats_fwd_cuda(const void* logits, int dtype, int64_t B, int64_t T, int64_t V,
                                  int64_t stride_b, int64_t stride_t, const int64_t* labels,
                                  float inv_temperature, int64_t ignore_index, int compute_entropy,
                                  float* logp, float* lse, float* entropy, void* stream);

// log p_v is rebuilt as (z_v - z_y) + logp[row] (falling back to z_v - lse[row] when z_y is not
// finite): lse's fp32 rounding at |z| ~ 1000 would otherwise cost 1e-4 relative in p.
// grad_logits has the logits' dtype and strides (grad_stride_b, grad_stride_t, 1); it may alias
// the logits (in-place backward).
int alignops_token_stats_bwd_cuda(const void* logits, int dtype, int64_t B, int64_t T, int64_t V,
                                  int64_t stride_b, int64_t stride_t, const int64_t* labels,
                                  const float* logp, const float* lse, const float* entropy, const float* grad_logp,
                                  const float* grad_entropy, float inv_temperature,
                                  int64_t ignore_index, int has_entropy_grad, void* grad_logits,
                                  int64_t grad_stride_b, int64_t grad_stride_t, void* stream);

#ifdef __cplusplus
}
#endif
