// Declarations of the CPU kernels (one .cpp per op in this folder), registered in bindings.cpp.
#pragma once

#include <ATen/ATen.h>

namespace alignops::cpu {

// Contract: alignops/token_logprobs.py.
void token_stats_fwd(const at::Tensor& logits, const at::Tensor& labels, double inv_temperature,
                     int64_t ignore_index, bool compute_entropy, const at::Tensor& logp,
                     const at::Tensor& lse, const at::Tensor& entropy);

void token_stats_bwd(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& logp,
                     const at::Tensor& lse, const at::Tensor& entropy, const at::Tensor& grad_logp,
                     const at::Tensor& grad_entropy, double inv_temperature, int64_t ignore_index,
                     bool has_entropy_grad, const at::Tensor& grad_logits);

}  // namespace alignops::cpu
