// Declarations of the CPU kernels (one .cpp per op in this folder).
//
// This folder is compiled once per ISA level (default, avx2, avx512), each into its own shared
// library alignops/_cpu_<isa>*.so with that level's -m flags and CPU_CAPABILITY macros (at::vec picks
// its Vectorized specialisation from the macros). Each library exports nothing but
// alignops_cpu_kernel_table(); alignops._C (compiled without ISA flags) opens the one library the
// CPU supports and calls the kernels through that table (csrc/cpu_isa.cpp). Separate libraries, not
// separate objects in one: inline functions of the torch headers would otherwise be merged across
// levels by the linker, and an AVX-512 copy could run on an AVX2 machine.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace alignops::cpu {

// Contract: alignops/token_stats.py.
void token_stats_fwd(const at::Tensor& logits, const at::Tensor& labels, double inv_temperature,
                     int64_t ignore_index, bool compute_entropy, const at::Tensor& logp,
                     const at::Tensor& lse, const at::Tensor& entropy);

void token_stats_bwd(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& logp,
                     const at::Tensor& lse, const at::Tensor& entropy, const at::Tensor& grad_logp,
                     const at::Tensor& grad_entropy, double inv_temperature, int64_t ignore_index,
                     bool has_entropy_grad, const at::Tensor& grad_logits);

// Advantage kernels (csrc/cpu/advantages.cpp). Contract: alignops/advantages/__init__.py.
void group_advantages(const at::Tensor& rewards, const at::Tensor& order, const at::Tensor& offsets,
                      int64_t mode, double std_eps, bool singleton_raw, const at::Tensor& adv,
                      const at::Tensor& count, const at::Tensor& mean, const at::Tensor& std_out);
void masked_moments(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& out);
void whiten_apply(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& stats, bool shift_back,
                  const at::Tensor& out);
void gae_scan(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask,
              const at::Tensor& cu_seqlens, double gamma, const at::Tensor& lam_actor,
              const at::Tensor& lam_critic, const at::Tensor& adv, const at::Tensor& ret);

// One-launch policy loss (csrc/cpu/policy_loss.cpp). Contract: alignops/policy/one_launch.py.
void policy_loss_fused(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& old_logp,
                       const at::Tensor& adv, const at::Tensor& ref_logp, const at::Tensor& is_weight,
                       const at::Tensor& agg_norm, const at::Tensor& row_len, const at::Tensor& mask, int64_t method, int64_t kl_estimator,
                       const std::vector<double>& knobs, int64_t flags, double inv_temperature,
                       int64_t ignore_index, bool compute_entropy, const at::Tensor& logp,
                       const at::Tensor& entropy, const at::Tensor& loss_terms, const at::Tensor& pg_terms,
                       const at::Tensor& grad_logits);

// Distillation (csrc/cpu/distill.cpp). Contract: alignops/distill.py.
void distill_fwd(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& valid,
                 double inv_temperature, int64_t divergence, double beta, const at::Tensor& loss,
                 const at::Tensor& stats);
void distill_bwd(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& valid,
                 const at::Tensor& stats, const at::Tensor& grad_loss, double inv_temperature, int64_t divergence,
                 double beta, const at::Tensor& grad_student);

// Bumped whenever a signature above or the table below changes; _C refuses a library whose
// table version differs (a stale build).
constexpr int kKernelTableVersion = 2;

struct KernelTable {
  int version;
  const char* isa;  // the level the library was compiled for: "default", "avx2", "avx512"
  decltype(&::alignops::cpu::token_stats_fwd) token_stats_fwd;
  decltype(&::alignops::cpu::token_stats_bwd) token_stats_bwd;
  decltype(&::alignops::cpu::group_advantages) group_advantages;
  decltype(&::alignops::cpu::masked_moments) masked_moments;
  decltype(&::alignops::cpu::whiten_apply) whiten_apply;
  decltype(&::alignops::cpu::gae_scan) gae_scan;
  decltype(&::alignops::cpu::policy_loss_fused) policy_loss_fused;
  decltype(&::alignops::cpu::distill_fwd) distill_fwd;
  decltype(&::alignops::cpu::distill_bwd) distill_bwd;
};

}  // namespace alignops::cpu

extern "C" const alignops::cpu::KernelTable* alignops_cpu_kernel_table();
