// Registers the C++ and CUDA kernels as torch ops (torch.ops.alignops_C.*). The autograd,
// fake kernels and backend choice live in Python (alignops/); these ops only run kernels into
// outputs the caller allocated. The CPU kernels are called through the table of the ISA level
// chosen at load (csrc/cpu_isa.cpp); this file is compiled without ISA flags.
#include <torch/extension.h>

#include "cpu_isa.h"
#include "cuda/launchers.h"

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace {

void check_rows(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK(logits.dim() == 3, "alignops_C: logits must be [B, T, V], got ", logits.sizes());
  TORCH_CHECK(logits.stride(2) == 1, "alignops_C: logits need unit stride over V");
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.is_contiguous() &&
                  labels.numel() == logits.size(0) * logits.size(1),
              "alignops_C: labels must be contiguous int64 [B*T]");
}

// A fresh gradient buffer's first touch costs one page fault per 4 KiB, which on a virtual machine
// took as long as the backward kernel itself (250 MB: ~55 ms of faults). Where transparent huge
// pages are enabled on request ("madvise" mode, a common default) this asks for 2 MiB pages before
// the kernel writes. A hint: the result does not depend on it, and a refusal changes only speed.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const size_t bytes = t.numel() * t.element_size();
  if (!t.is_contiguous() || bytes < 4 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(t.data_ptr()) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(t.data_ptr()) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

void check_stat(const at::Tensor& t, const at::Tensor& labels, const char* name) {
  TORCH_CHECK(t.is_contiguous() && t.numel() == labels.numel(), "alignops_C: ", name,
              " must be contiguous [B*T]");
}

void token_stats_fwd_cpu(const at::Tensor& logits, const at::Tensor& labels, double inv_temperature,
                         int64_t ignore_index, bool compute_entropy, const at::Tensor& logp,
                         const at::Tensor& lse, const at::Tensor& entropy) {
  check_rows(logits, labels);
  for (auto* t : {&logp, &lse, &entropy}) check_stat(*t, labels, "outputs");
  alignops::cpu_kernels().token_stats_fwd(logits, labels, inv_temperature, ignore_index, compute_entropy,
                                 logp, lse, entropy);
}

void token_stats_bwd_cpu(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& logp,
                         const at::Tensor& lse,
                         const at::Tensor& entropy, const at::Tensor& grad_logp,
                         const at::Tensor& grad_entropy, double inv_temperature,
                         int64_t ignore_index, bool has_entropy_grad,
                         const at::Tensor& grad_logits) {
  check_rows(logits, labels);
  check_rows(grad_logits, labels);
  for (auto* t : {&logp, &lse, &entropy, &grad_logp, &grad_entropy}) check_stat(*t, labels, "row stats");
  if (!grad_logits.is_same(logits)) advise_huge_pages(grad_logits);
  alignops::cpu_kernels().token_stats_bwd(logits, labels, logp, lse, entropy, grad_logp, grad_entropy,
                                 inv_temperature, ignore_index, has_entropy_grad, grad_logits);
}

void policy_loss_fused_cpu(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& old_logp,
                           const at::Tensor& adv, const at::Tensor& ref_logp, const at::Tensor& is_weight,
                           const at::Tensor& agg_norm, const at::Tensor& row_len, const at::Tensor& mask, int64_t method, int64_t kl_estimator,
                           std::vector<double> knobs, int64_t flags, double inv_temperature,
                           int64_t ignore_index, bool compute_entropy, const at::Tensor& logp,
                           const at::Tensor& entropy, const at::Tensor& loss_terms, const at::Tensor& pg_terms,
                           const at::Tensor& grad_logits) {
  check_rows(logits, labels);
  check_rows(grad_logits, labels);
  for (auto* t : {&old_logp, &adv, &ref_logp, &is_weight, &agg_norm, &row_len, &mask, &logp, &entropy, &loss_terms, &pg_terms})
    check_stat(*t, labels, "per-token tensors");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "alignops_C: mask must be bool");
  if (!grad_logits.is_same(logits)) advise_huge_pages(grad_logits);
  alignops::cpu_kernels().policy_loss_fused(logits, labels, old_logp, adv, ref_logp, is_weight, agg_norm, row_len, mask, method,
                                   kl_estimator, knobs, flags, inv_temperature, ignore_index, compute_entropy,
                                   logp, entropy, loss_terms, pg_terms, grad_logits);
}

#ifdef ALIGNOPS_WITH_CUDA
int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return ALIGNOPS_F32;
    case at::kHalf: return ALIGNOPS_F16;
    case at::kBFloat16: return ALIGNOPS_BF16;
    default: TORCH_CHECK(false, "alignops_C cuda: unsupported dtype ", t.scalar_type());
  }
  return -1;
}

void check_cuda(int err) {
  TORCH_CHECK(err == 0, "alignops_C cuda kernel failed: ", alignops_cuda_error_string(err));
}

void token_stats_fwd_cuda(const at::Tensor& logits, const at::Tensor& labels, double inv_temperature,
                          int64_t ignore_index, bool compute_entropy, const at::Tensor& logp,
                          const at::Tensor& lse, const at::Tensor& entropy, int64_t stream) {
  check_rows(logits, labels);
  for (auto* t : {&logp, &lse, &entropy}) check_stat(*t, labels, "outputs");
  check_cuda(alignops_token_stats_fwd_cuda(
      logits.data_ptr(), dtype_code(logits), logits.size(0), logits.size(1), logits.size(2),
      logits.stride(0), logits.stride(1), labels.data_ptr<int64_t>(), float(inv_temperature),
      ignore_index, compute_entropy, logp.data_ptr<float>(), lse.data_ptr<float>(),
      entropy.data_ptr<float>(), reinterpret_cast<void*>(stream)));
}

void token_stats_bwd_cuda(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& logp,
                          const at::Tensor& lse,
                          const at::Tensor& entropy, const at::Tensor& grad_logp,
                          const at::Tensor& grad_entropy, double inv_temperature,
                          int64_t ignore_index, bool has_entropy_grad,
                          const at::Tensor& grad_logits, int64_t stream) {
  check_rows(logits, labels);
  check_rows(grad_logits, labels);
  for (auto* t : {&logp, &lse, &entropy, &grad_logp, &grad_entropy}) check_stat(*t, labels, "row stats");
  TORCH_CHECK(grad_logits.scalar_type() == logits.scalar_type(), "alignops_C: grad dtype");
  check_cuda(alignops_token_stats_bwd_cuda(
      logits.data_ptr(), dtype_code(logits), logits.size(0), logits.size(1), logits.size(2),
      logits.stride(0), logits.stride(1), labels.data_ptr<int64_t>(), logp.data_ptr<float>(),
      lse.data_ptr<float>(), entropy.data_ptr<float>(), grad_logp.data_ptr<float>(), grad_entropy.data_ptr<float>(),
      float(inv_temperature), ignore_index, has_entropy_grad, grad_logits.data_ptr(),
      grad_logits.stride(0), grad_logits.stride(1), reinterpret_cast<void*>(stream)));
}
#endif

// ---- advantage kernels (contract: alignops/advantages/__init__.py) ----
void check_vec(const at::Tensor& t, at::ScalarType dtype, int64_t n, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == dtype && t.dim() == 1 &&
                  (n < 0 || t.numel() == n),
              "alignops_C: ", name, " must be a contiguous 1-d CPU tensor of dtype ", dtype,
              n >= 0 ? " and the matching length" : "");
}

void group_advantages_cpu(const at::Tensor& rewards, const at::Tensor& order, const at::Tensor& offsets,
                          int64_t mode, double std_eps, bool singleton_raw, const at::Tensor& adv,
                          const at::Tensor& count, const at::Tensor& mean, const at::Tensor& std_out) {
  const auto dt = rewards.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "alignops_C: rewards must be float32 or float64");
  check_vec(rewards, dt, -1, "rewards");
  check_vec(order, at::kLong, rewards.numel(), "order");
  check_vec(offsets, at::kLong, -1, "offsets");
  TORCH_CHECK(offsets.numel() >= 1, "alignops_C: offsets must hold num_groups + 1 entries");
  check_vec(adv, dt, rewards.numel(), "adv");
  for (auto* t : {&count, &mean, &std_out}) check_vec(*t, dt, offsets.numel() - 1, "group stats");
  alignops::cpu_kernels().group_advantages(rewards, order, offsets, mode, std_eps, singleton_raw, adv, count, mean,
                                  std_out);
}

void masked_moments_cpu(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& out) {
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "alignops_C: x must be float32 or float64");
  check_vec(x, dt, -1, "x");
  check_vec(mask, at::kBool, x.numel(), "mask");
  check_vec(out, at::kDouble, 3, "out");
  alignops::cpu_kernels().masked_moments(x, mask, out);
}

void whiten_apply_cpu(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& stats, bool shift_back,
                      const at::Tensor& out) {
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "alignops_C: x must be float32 or float64");
  check_vec(x, dt, -1, "x");
  check_vec(mask, at::kBool, x.numel(), "mask");
  check_vec(stats, at::kDouble, 2, "stats");
  check_vec(out, dt, x.numel(), "out");
  alignops::cpu_kernels().whiten_apply(x, mask, stats, shift_back, out);
}

void gae_scan_cpu(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask,
                  const at::Tensor& cu_seqlens, double gamma, const at::Tensor& lam_actor,
                  const at::Tensor& lam_critic, const at::Tensor& adv, const at::Tensor& ret) {
  const auto dt = rewards.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "alignops_C: rewards must be float32 or float64");
  const int64_t n = rewards.numel();
  check_vec(rewards, dt, -1, "rewards");
  check_vec(values, dt, n, "values");
  check_vec(mask, at::kBool, n, "mask");
  check_vec(cu_seqlens, at::kLong, -1, "cu_seqlens");
  const int64_t rows = cu_seqlens.numel() - 1;
  TORCH_CHECK(rows >= 0, "alignops_C: cu_seqlens must hold B + 1 entries");
  check_vec(lam_actor, dt, rows, "lam_actor");
  check_vec(lam_critic, dt, rows, "lam_critic");
  check_vec(adv, dt, n, "adv");
  check_vec(ret, dt, n, "ret");
  alignops::cpu_kernels().gae_scan(rewards, values, mask, cu_seqlens, gamma, lam_actor, lam_critic, adv, ret);
}

}  // namespace

void check_distill_rows(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& valid,
                        const at::Tensor& stats) {
  for (const at::Tensor* t : {&student, &teacher}) {
    TORCH_CHECK(t->dim() == 3 && t->stride(2) == 1, "alignops_C: distill rows must be [B, T, V] with unit stride over V");
  }
  TORCH_CHECK(teacher.sizes() == student.sizes() && teacher.scalar_type() == student.scalar_type(),
              "alignops_C: teacher rows must match the student's shape and dtype");
  const int64_t n = student.size(0) * student.size(1);
  TORCH_CHECK(valid.scalar_type() == at::kBool && valid.is_contiguous() && valid.numel() == n,
              "alignops_C: valid must be contiguous bool [B*T]");
  const auto acc = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(stats.scalar_type() == acc && stats.is_contiguous() && stats.numel() == 5 * n,
              "alignops_C: distill stats must be contiguous [B*T, 5] of the accumulation dtype");
}

void distill_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& valid,
                     double inv_temperature, int64_t divergence, double beta, const at::Tensor& loss,
                     const at::Tensor& stats) {
  check_distill_rows(student, teacher, valid, stats);
  TORCH_CHECK(loss.scalar_type() == stats.scalar_type() && loss.is_contiguous() && loss.numel() == valid.numel(),
              "alignops_C: distill loss must be contiguous [B*T] of the accumulation dtype");
  alignops::cpu_kernels().distill_fwd(student, teacher, valid, inv_temperature, divergence, beta, loss, stats);
}

void distill_bwd_cpu(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& valid,
                     const at::Tensor& stats, const at::Tensor& grad_loss, double inv_temperature,
                     int64_t divergence, double beta, const at::Tensor& grad_student) {
  check_distill_rows(student, teacher, valid, stats);
  TORCH_CHECK(grad_loss.scalar_type() == stats.scalar_type() && grad_loss.is_contiguous() &&
                  grad_loss.numel() == valid.numel(),
              "alignops_C: distill grad_loss must be contiguous [B*T] of the accumulation dtype");
  TORCH_CHECK(grad_student.sizes() == student.sizes() && grad_student.scalar_type() == student.scalar_type() &&
                  grad_student.stride(2) == 1,
              "alignops_C: grad_student must be [B, T, V] of the student's dtype with unit stride over V");
  advise_huge_pages(grad_student);
  alignops::cpu_kernels().distill_bwd(student, teacher, valid, stats, grad_loss, inv_temperature, divergence, beta,
                                      grad_student);
}

TORCH_LIBRARY(alignops_C, m) {
  m.def("group_advantages_cpu(Tensor rewards, Tensor order, Tensor offsets, int mode, float std_eps, "
        "bool singleton_raw, Tensor(a!) adv, Tensor(b!) count, Tensor(c!) mean, Tensor(d!) std) -> ()",
        &group_advantages_cpu);
  m.def("masked_moments_cpu(Tensor x, Tensor mask, Tensor(a!) out) -> ()", &masked_moments_cpu);
  m.def("whiten_apply_cpu(Tensor x, Tensor mask, Tensor stats, bool shift_back, Tensor(a!) out) -> ()",
        &whiten_apply_cpu);
  m.def("gae_scan_cpu(Tensor rewards, Tensor values, Tensor mask, Tensor cu_seqlens, float gamma, "
        "Tensor lam_actor, Tensor lam_critic, Tensor(a!) adv, Tensor(b!) ret) -> ()",
        &gae_scan_cpu);
  m.def("token_stats_fwd_cpu(Tensor logits, Tensor labels, float inv_temperature, int ignore_index, "
        "bool compute_entropy, Tensor(a!) logp, Tensor(b!) lse, Tensor(c!) entropy) -> ()",
        &token_stats_fwd_cpu);
  m.def("token_stats_bwd_cpu(Tensor logits, Tensor labels, Tensor logp, Tensor lse, Tensor entropy, "
        "Tensor grad_logp, Tensor grad_entropy, float inv_temperature, int ignore_index, "
        "bool has_entropy_grad, Tensor(a!) grad_logits) -> ()",
        &token_stats_bwd_cpu);
  m.def("policy_loss_fused_cpu(Tensor logits, Tensor labels, Tensor old_logp, Tensor adv, Tensor ref_logp, "
        "Tensor is_weight, Tensor agg_norm, Tensor row_len, Tensor mask, int method, int kl_estimator, float[] knobs, int flags, "
        "float inv_temperature, int ignore_index, bool compute_entropy, Tensor(a!) logp, Tensor(b!) entropy, "
        "Tensor(c!) loss_terms, Tensor(d!) pg_terms, Tensor(e!) grad_logits) -> ()",
        &policy_loss_fused_cpu);
  m.def("distill_fwd_cpu(Tensor student, Tensor teacher, Tensor valid, float inv_temperature, int divergence, "
        "float beta, Tensor(a!) loss, Tensor(b!) stats) -> ()", &distill_fwd_cpu);
  m.def("distill_bwd_cpu(Tensor student, Tensor teacher, Tensor valid, Tensor stats, Tensor grad_loss, "
        "float inv_temperature, int divergence, float beta, Tensor(a!) grad_student) -> ()", &distill_bwd_cpu);
#ifdef ALIGNOPS_WITH_CUDA
  m.def("token_stats_fwd_cuda(Tensor logits, Tensor labels, float inv_temperature, int ignore_index, "
        "bool compute_entropy, Tensor(a!) logp, Tensor(b!) lse, Tensor(c!) entropy, int stream) -> ()",
        &token_stats_fwd_cuda);
  m.def("token_stats_bwd_cuda(Tensor logits, Tensor labels, Tensor logp, Tensor lse, Tensor entropy, "
        "Tensor grad_logp, Tensor grad_entropy, float inv_temperature, int ignore_index, "
        "bool has_entropy_grad, Tensor(a!) grad_logits, int stream) -> ()",
        &token_stats_bwd_cuda);
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("ABI_VERSION") = ALIGNOPS_C_ABI;
  // Attributes, not functions: alignops/_backend.py reads them inside torch.compile tracing.
  const alignops::CpuIsa& isa = alignops::cpu_isa();
  m.attr("CPU_ISA") = isa.chosen;
  m.attr("CPU_ISA_COMPILED") = isa.compiled;
  m.attr("CPU_ISA_REQUESTED") = isa.requested;
  m.attr("CPU_ISA_ERROR") = isa.error;
  m.attr("TORCH_CPU_CAPABILITY") = isa.torch_capability;
#ifdef ALIGNOPS_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
}
