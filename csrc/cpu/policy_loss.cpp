// CPU kernel of the one-launch policy loss: per row of logits, the softmax statistics, logp and
// entropy, the per-token policy epilogue (csrc/common/policy_math.h) and then at once the gradient
// row dL/dz. Contract: alignops/policy/one_launch.py.
//
// The row is read twice (statistics, then gradient) but the second read hits cache for any
// vocabulary that fits in L2 per thread (151936 fp32 = 600 KB), so memory sees one read of the
// logits and one write of the gradient, against two reads and one write for forward + backward.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "../common/policy_math.h"
#include "ops.h"
#include "row_ops.h"

namespace alignops::cpu {
namespace {

template <typename scalar_t, typename acc_t>
void fused_impl(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& old_logp,
                const at::Tensor& adv, const at::Tensor& ref_logp, const at::Tensor& is_weight,
                const at::Tensor& agg_norm, const at::Tensor& row_len, const at::Tensor& mask, const PolicyParams& params, double inv_temperature,
                int64_t ignore_index, bool compute_entropy, const at::Tensor& logp_out,
                const at::Tensor& entropy_out, const at::Tensor& loss_out, const at::Tensor& pg_out,
                const at::Tensor& grad_logits) {
  const int64_t N = labels.numel(), T = logits.size(1), V = logits.size(2);
  const int64_t sb = logits.stride(0), st = logits.stride(1);
  const int64_t gsb = grad_logits.stride(0), gst = grad_logits.stride(1);
  const scalar_t* base = logits.data_ptr<scalar_t>();
  scalar_t* gbase = grad_logits.data_ptr<scalar_t>();
  const int64_t* y = labels.data_ptr<int64_t>();
  const acc_t* old_p = old_logp.data_ptr<acc_t>();
  const acc_t* adv_p = adv.data_ptr<acc_t>();
  const acc_t* ref_p = ref_logp.data_ptr<acc_t>();
  const acc_t* isw_p = is_weight.data_ptr<acc_t>();
  const acc_t* norm_p = agg_norm.data_ptr<acc_t>();
  const acc_t* len_p = row_len.data_ptr<acc_t>();
  const bool* mask_p = mask.data_ptr<bool>();
  acc_t* logp_o = logp_out.data_ptr<acc_t>();
  acc_t* ent_o = entropy_out.data_ptr<acc_t>();
  acc_t* loss_o = loss_out.data_ptr<acc_t>();
  acc_t* pg_o = pg_out.data_ptr<acc_t>();
  const acc_t inv_temp = static_cast<acc_t>(inv_temperature);
  const bool need_entropy = compute_entropy || params.entropy_coef != 0.0;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1));

  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    alignas(64) float buf[kBlock];
    for (int64_t n = begin; n < end; ++n) {
      const int64_t label = y[n];
      const scalar_t* x = base + (n / T) * sb + (n % T) * st;
      scalar_t* g = gbase + (n / T) * gsb + (n % T) * gst;
      const bool ignored = label == ignore_index;
      const bool in_range = label >= 0 && label < V;
      // An ignored row is not read (token_stats contract): logp = H = 0, which the policy math
      // still sees when the caller's mask keeps the token (as the two-pass path does).
      acc_t lp = 0, lse = 0, h = 0;
      if (!ignored) {
        const SoftmaxStats<acc_t> s = row_stats(x, V, inv_temp, buf);
        lse = row_lse(s, inv_temp);
        lp = in_range ? row_logp(static_cast<acc_t>(x[label]), s, inv_temp) : std::numeric_limits<acc_t>::quiet_NaN();
        h = need_entropy ? stats_entropy(s) : acc_t(0);
      }
      const TokenEpilogue<acc_t> e = policy_epilogue<acc_t>(lp, h, old_p[n], adv_p[n], ref_p[n], isw_p[n],
                                                            norm_p[n], len_p[n], mask_p[n], params);
      logp_o[n] = lp;
      if (compute_entropy) ent_o[n] = h;
      loss_o[n] = e.loss_term;
      pg_o[n] = e.pg_term;
      if (ignored || !in_range) {
        std::fill(g, g + V, scalar_t(0));
        continue;
      }
      grad_row<scalar_t, acc_t>(x, g, V, label, inv_temp, lp, lse, h, e.a * inv_temp, e.b * inv_temp, buf);
    }
  });
}

}  // namespace

void policy_loss_fused(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& old_logp,
                       const at::Tensor& adv, const at::Tensor& ref_logp, const at::Tensor& is_weight,
                       const at::Tensor& agg_norm, const at::Tensor& row_len, const at::Tensor& mask, int64_t method, int64_t kl_estimator,
                       const std::vector<double>& knobs, int64_t flags, double inv_temperature,
                       int64_t ignore_index, bool compute_entropy, const at::Tensor& logp,
                       const at::Tensor& entropy, const at::Tensor& loss_terms, const at::Tensor& pg_terms,
                       const at::Tensor& grad_logits) {
  TORCH_CHECK(knobs.size() == kPolicyKnobCount, "policy_loss_fused: expected ", kPolicyKnobCount, " knobs");
  TORCH_CHECK(method >= 0 && method < kPolicyMethodCount, "policy_loss_fused: unknown method code ",
              method);
  TORCH_CHECK(kl_estimator >= 0 && kl_estimator < kKlCount, "policy_loss_fused: unknown KL code ",
              kl_estimator);
  const PolicyParams params = make_policy_params(static_cast<int>(method), static_cast<int>(kl_estimator),
                                                 knobs.data(), flags);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "policy_loss_fused", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    for (auto* t : {&old_logp, &adv, &ref_logp, &is_weight, &agg_norm, &row_len, &logp, &entropy, &loss_terms, &pg_terms}) {
      TORCH_CHECK(t->scalar_type() == acc, "policy_loss_fused: per-token tensors must be ", acc);
    }
    TORCH_CHECK(grad_logits.scalar_type() == logits.scalar_type(), "policy_loss_fused: grad dtype");
    fused_impl<scalar_t, acc_t>(logits, labels, old_logp, adv, ref_logp, is_weight, agg_norm, row_len, mask, params,
                                inv_temperature, ignore_index, compute_entropy, logp, entropy, loss_terms,
                                pg_terms, grad_logits);
  });
}

}  // namespace alignops::cpu
