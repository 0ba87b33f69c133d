// Declarations of the CPU kernels (one .cpp per op in this folder), registered in bindings.cpp.
#pragma once

#include <ATen/ATen.h>

namespace alignops::cpu {

// Contract: alignops/token_stats.py.
void token_stats_fwd(const at::Tensor& logits, const at::Tensor& labels, double inv_temperature,
                     int64_t ignore_index, bool compute_entropy, const at::Tensor& logp,
                     const at::Tensor& lse, const at::Tensor& entropy);

void token_stats_bwd(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& logp,
                     const at::Tensor& lse, const at::Tensor& entropy, const at::Tensor& grad_logp,
                     const at::Tensor& grad_entropy, double inv_temperature, int64_t ignore_index,
                     bool has_entropy_grad, const at::Tensor& grad_logits);

// Advantage kernels (csrc/cpu/advantages.cpp). Contract: alignops/advantages.py.
void group_advantages(const at::Tensor& rewards, const at::Tensor& order, const at::Tensor& offsets,
                      int64_t mode, double std_eps, bool singleton_raw, const at::Tensor& adv,
                      const at::Tensor& count, const at::Tensor& mean, const at::Tensor& std_out);
void masked_moments(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& out);
void whiten_apply(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& stats, bool shift_back,
                  const at::Tensor& out);
void gae_scan(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask,
              const at::Tensor& cu_seqlens, double gamma, const at::Tensor& lam_actor,
              const at::Tensor& lam_critic, const at::Tensor& adv, const at::Tensor& ret);

// One-launch policy loss (csrc/cpu/policy_loss.cpp). Contract: alignops/policy_loss.py.
void policy_loss_fused(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& old_logp,
                       const at::Tensor& adv, const at::Tensor& ref_logp, const at::Tensor& is_weight,
                       const at::Tensor& agg_norm, const at::Tensor& row_len, const at::Tensor& mask, int64_t method, int64_t kl_estimator,
                       const std::vector<double>& knobs, int64_t flags, double inv_temperature,
                       int64_t ignore_index, bool compute_entropy, const at::Tensor& logp,
                       const at::Tensor& entropy, const at::Tensor& loss_terms, const at::Tensor& pg_terms,
                       const at::Tensor& grad_logits);

}  // namespace alignops::cpu
