// CPU kernels of the advantage estimators: group statistics + advantages, masked moments and
// whitening, and the GAE scan. Contract: alignops/advantages/__init__.py (module docstring).
//
// All statistics accumulate in double whatever the input dtype. Work is split into fixed chunks
// whose partial results are combined in chunk order, so results do not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "ops.h"

namespace alignops::cpu {
namespace {

constexpr int64_t kMomentChunk = 1 << 12;
// Elements of work per parallel task. Below this a second thread costs more than it saves (and on
// a loaded machine a descheduled OpenMP thread stalls the whole call).
constexpr int64_t kGrainElements = 1 << 16;

template <typename scalar_t>
void group_advantages_impl(const at::Tensor& rewards, const at::Tensor& order, const at::Tensor& offsets,
                           int64_t mode, double std_eps, bool singleton_raw, const at::Tensor& adv,
                           const at::Tensor& count, const at::Tensor& mean, const at::Tensor& std_out) {
  const scalar_t* r = rewards.data_ptr<scalar_t>();
  const int64_t* ord = order.data_ptr<int64_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  scalar_t* a = adv.data_ptr<scalar_t>();
  scalar_t* cnt_out = count.data_ptr<scalar_t>();
  scalar_t* mean_out = mean.data_ptr<scalar_t>();
  scalar_t* sd_out = std_out.data_ptr<scalar_t>();
  const int64_t num_groups = offsets.numel() - 1;
  const int64_t rows_per_group = std::max<int64_t>(1, rewards.numel() / std::max<int64_t>(num_groups, 1));
  at::parallel_for(0, num_groups, std::max<int64_t>(1, kGrainElements / rows_per_group), [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t s = off[g], e = off[g + 1];
      double sum = 0.0, n = 0.0;
      double lo = std::numeric_limits<double>::infinity(), hi = -lo;
      for (int64_t j = s; j < e; ++j) {
        const double x = static_cast<double>(r[ord[j]]);
        if (std::isnan(x)) continue;
        sum += x;
        n += 1.0;
        lo = std::min(lo, x);
        hi = std::max(hi, x);
      }
      const double mu = n > 0 ? sum / n : 0.0;
      // Equal rewards (or fewer than two) have exactly zero spread: their advantages are exactly 0
      // instead of rounding noise divided by eps.
      const bool flat = n <= 1 || lo == hi;
      // Corrected two-pass (Chan, Golub & LeVeque): `corr` is the mean of the deviations from the
      // rounded mean. Without it the centred rewards of [1000, 1000, 1000, 1000 + 1e-6] sum to
      // ~1e-13 instead of 0, which scaling by 1 / (std + eps) ~ 1e6 turns into 1e-7.
      double m2 = 0.0, dsum = 0.0;
      if (!flat) {
        for (int64_t j = s; j < e; ++j) {
          const double x = static_cast<double>(r[ord[j]]);
          if (std::isnan(x)) continue;
          m2 += (x - mu) * (x - mu);
          dsum += x - mu;
        }
      }
      const double corr = flat ? 0.0 : dsum / n;
      m2 = flat ? 0.0 : std::max(0.0, m2 - dsum * corr);
      const double sd = flat ? 0.0 : std::sqrt(m2 / (n - 1.0));
      for (int64_t j = s; j < e; ++j) {
        const int64_t i = ord[j];
        const double x = static_cast<double>(r[i]);
        double out = 0.0;
        if (std::isnan(x)) {
          out = 0.0;
        } else if (n == 1) {
          out = singleton_raw ? x : 0.0;
        } else if (!flat) {
          const double c = (x - mu) - corr;
          if (mode == 1) out = c / (sd + std_eps);
          else if (mode == 2) out = c * n / (n - 1.0);
          else out = c;
        }
        a[i] = static_cast<scalar_t>(out);
      }
      cnt_out[g] = static_cast<scalar_t>(n);
      mean_out[g] = static_cast<scalar_t>(mu + corr);
      sd_out[g] = static_cast<scalar_t>(sd);
    }
  });
}

// (count, mean, M2) per fixed chunk with two passes over the cache-resident chunk, then Chan's
// pairwise merge in chunk order. Sum and sum of squares would lose everything for data like
// 1000 +- 1e-3 (M2 = sumsq - sum^2/n cancels 12 digits).
template <typename scalar_t>
void masked_moments_impl(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& out) {
  const scalar_t* px = x.data_ptr<scalar_t>();
  const bool* pm = mask.data_ptr<bool>();
  const int64_t n = x.numel();
  const int64_t chunks = (n + kMomentChunk - 1) / kMomentChunk;
  std::vector<double> part(3 * std::max<int64_t>(chunks, 1), 0.0);
  at::parallel_for(0, chunks, kGrainElements / kMomentChunk, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b = c * kMomentChunk, e = std::min(n, b + kMomentChunk);
      double s = 0.0, k = 0.0;
      for (int64_t i = b; i < e; ++i) {
        if (!pm[i]) continue;
        s += static_cast<double>(px[i]);
        k += 1.0;
      }
      const double mu = k > 0 ? s / k : 0.0;
      double m2 = 0.0;
      for (int64_t i = b; i < e; ++i) {
        if (!pm[i]) continue;
        const double d = static_cast<double>(px[i]) - mu;
        m2 += d * d;
      }
      part[3 * c] = k;
      part[3 * c + 1] = mu;
      part[3 * c + 2] = m2;
    }
  });
  double k = 0.0, mu = 0.0, m2 = 0.0;
  for (int64_t c = 0; c < chunks; ++c) {
    const double kc = part[3 * c];
    if (kc == 0) continue;
    const double tot = k + kc;
    const double delta = part[3 * c + 1] - mu;
    mu += delta * kc / tot;
    m2 += part[3 * c + 2] + delta * delta * k * kc / tot;
    k = tot;
  }
  double* po = out.data_ptr<double>();
  po[0] = k;
  po[1] = mu;
  po[2] = m2;
}

template <typename scalar_t>
void whiten_apply_impl(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& stats,
                       bool shift_back, const at::Tensor& out) {
  const scalar_t* px = x.data_ptr<scalar_t>();
  const bool* pm = mask.data_ptr<bool>();
  scalar_t* po = out.data_ptr<scalar_t>();
  const double mu = stats.data_ptr<double>()[0];
  const double inv = stats.data_ptr<double>()[1];
  const double back = shift_back ? mu : 0.0;
  at::parallel_for(0, x.numel(), kGrainElements, [&](int64_t i0, int64_t i1) {
    // Branch-free select so the loop vectorises; NaN in masked-out x is computed and discarded.
    for (int64_t i = i0; i < i1; ++i) {
      const double y = (static_cast<double>(px[i]) - mu) * inv + back;
      po[i] = pm[i] ? static_cast<scalar_t>(y) : static_cast<scalar_t>(0);
    }
  });
}

template <typename scalar_t>
void gae_scan_impl(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask,
                   const at::Tensor& cu_seqlens, double gamma, const at::Tensor& lam_actor,
                   const at::Tensor& lam_critic, const at::Tensor& adv, const at::Tensor& ret) {
  const scalar_t* pr = rewards.data_ptr<scalar_t>();
  const scalar_t* pv = values.data_ptr<scalar_t>();
  const bool* pm = mask.data_ptr<bool>();
  const int64_t* cu = cu_seqlens.data_ptr<int64_t>();
  const scalar_t* la = lam_actor.data_ptr<scalar_t>();
  const scalar_t* lc = lam_critic.data_ptr<scalar_t>();
  scalar_t* pa = adv.data_ptr<scalar_t>();
  scalar_t* pt = ret.data_ptr<scalar_t>();
  const int64_t rows = cu_seqlens.numel() - 1;
  const int64_t row_len = std::max<int64_t>(1, rewards.numel() / std::max<int64_t>(rows, 1));
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / row_len), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const double gl_a = gamma * static_cast<double>(la[b]);
      const double gl_c = gamma * static_cast<double>(lc[b]);
      double next_value = 0.0, run_a = 0.0, run_c = 0.0;
      // Masked positions are transparent: they neither read their reward/value nor break the
      // recurrence; the running values carry across them to the previous valid position.
      for (int64_t i = cu[b + 1] - 1; i >= cu[b]; --i) {
        if (!pm[i]) {
          pa[i] = static_cast<scalar_t>(0);
          pt[i] = static_cast<scalar_t>(0);
          continue;
        }
        const double v = static_cast<double>(pv[i]);
        const double delta = static_cast<double>(pr[i]) + gamma * next_value - v;
        run_a = delta + gl_a * run_a;
        run_c = delta + gl_c * run_c;
        next_value = v;
        pa[i] = static_cast<scalar_t>(run_a);
        pt[i] = static_cast<scalar_t>(run_c + v);
      }
    }
  });
}

}  // namespace

void group_advantages(const at::Tensor& rewards, const at::Tensor& order, const at::Tensor& offsets,
                      int64_t mode, double std_eps, bool singleton_raw, const at::Tensor& adv,
                      const at::Tensor& count, const at::Tensor& mean, const at::Tensor& std_out) {
  AT_DISPATCH_FLOATING_TYPES(rewards.scalar_type(), "alignops_group_advantages", [&] {
    group_advantages_impl<scalar_t>(rewards, order, offsets, mode, std_eps, singleton_raw, adv, count,
                                    mean, std_out);
  });
}

void masked_moments(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "alignops_masked_moments", [&] {
    masked_moments_impl<scalar_t>(x, mask, out);
  });
}

void whiten_apply(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& stats, bool shift_back,
                  const at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "alignops_whiten_apply", [&] {
    whiten_apply_impl<scalar_t>(x, mask, stats, shift_back, out);
  });
}

void gae_scan(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask,
              const at::Tensor& cu_seqlens, double gamma, const at::Tensor& lam_actor,
              const at::Tensor& lam_critic, const at::Tensor& adv, const at::Tensor& ret) {
  AT_DISPATCH_FLOATING_TYPES(rewards.scalar_type(), "alignops_gae_scan", [&] {
    gae_scan_impl<scalar_t>(rewards, values, mask, cu_seqlens, gamma, lam_actor, lam_critic, adv, ret);
  });
}

}  // namespace alignops::cpu
