// Registers the C++ and CUDA kernels as torch ops (torch.ops.alignops_C.*). The autograd,
// fake kernels and backend choice live in Python (alignops/); these ops only run kernels into
// outputs the caller allocated.
#include <torch/extension.h>

#include "cpu/ops.h"
#include "cuda/launchers.h"

namespace {

void check_rows(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK(logits.dim() == 3, "alignops_C: logits must be [B, T, V], got ", logits.sizes());
  TORCH_CHECK(logits.stride(2) == 1, "alignops_C: logits need unit stride over V");
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.is_contiguous() &&
                  labels.numel() == logits.size(0) * logits.size(1),
              "alignops_C: labels must be contiguous int64 [B*T]");
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
  alignops::cpu::token_stats_fwd(logits, labels, inv_temperature, ignore_index, compute_entropy,
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
  alignops::cpu::token_stats_bwd(logits, labels, logp, lse, entropy, grad_logp, grad_entropy,
                                 inv_temperature, ignore_index, has_entropy_grad, grad_logits);
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

}  // namespace

TORCH_LIBRARY(alignops_C, m) {
  m.def("token_stats_fwd_cpu(Tensor logits, Tensor labels, float inv_temperature, int ignore_index, "
        "bool compute_entropy, Tensor(a!) logp, Tensor(b!) lse, Tensor(c!) entropy) -> ()",
        &token_stats_fwd_cpu);
  m.def("token_stats_bwd_cpu(Tensor logits, Tensor labels, Tensor logp, Tensor lse, Tensor entropy, "
        "Tensor grad_logp, Tensor grad_entropy, float inv_temperature, int ignore_index, "
        "bool has_entropy_grad, Tensor(a!) grad_logits) -> ()",
        &token_stats_bwd_cpu);
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
  m.def("abi_version", [] { return ALIGNOPS_C_ABI; });
  m.def("with_cuda", [] {
#ifdef ALIGNOPS_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
