// CPU kernels of the distillation losses: the per-token divergence between the student's and the
// teacher's softmax over a row, and the student's gradient. Contract: alignops/distill.py.
//
// Forward reads each pair of rows twice: once for both softmax statistics (row_stats), once for
// the divergence, which for JSD needs log m = log(beta p_t + (1 - beta) p_s) and so both
// normalisers first. Backward reads them once and writes the gradient once.
// log p = (x - max) / T - log s keeps a log-prob near 0 exact for logits near +-1000.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "ops.h"
#include "row_ops.h"

namespace alignops::cpu {
namespace {

constexpr int kForwardKL = 0, kReverseKL = 1;

inline int64_t row_grain(int64_t V) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1)); }

template <typename scalar_t>
inline const scalar_t* row_ptr(const scalar_t* base, int64_t n, int64_t T, int64_t sb, int64_t st) {
  return base + (n / T) * sb + (n % T) * st;
}

// One element: the divergence's term, and p_s, p_t and h = dL/dp_s (reverse KL, JSD; the
// gradient is then p_s (h - sum_u p_s,u h_u), not q - p_s sum q, which would cancel two products of
// p_s for the largest p_s). A probability of 0 contributes exactly 0 (never 0 * inf).
template <typename acc_t>
inline acc_t element(acc_t ls, acc_t lt, int div, acc_t beta, acc_t& ps, acc_t& pt, acc_t& h) {
  ps = std::exp(ls);
  pt = std::exp(lt);
  if (div == kForwardKL) {
    h = 0;
    return pt > 0 ? pt * (lt - ls) : acc_t(0);
  }
  if (div == kReverseKL) {
    h = ps > 0 ? ls - lt : acc_t(0);  // finite where p_s = 0, so that p_s h = 0
    return ps * h;
  }
  const acc_t m = beta * pt + (1 - beta) * ps;
  // m rounds to 0 or a subnormal only where both probabilities are below the smallest normal; there
  // the larger log of the two parts (off by at most log 2) keeps a term p_t (l_t - log m) finite
  const acc_t lm = m >= std::numeric_limits<acc_t>::min() ? std::log(m)
                                                           : std::max(lt + std::log(beta), ls + std::log1p(-beta));
  const acc_t tt = pt > 0 ? pt * (lt - lm) : acc_t(0);
  h = ps > 0 ? (1 - beta) * (ls - lm) : acc_t(0);
  return beta * tt + ps * h;
}

// The same on 8/16 lanes, with the 1-ulp exp and log (exp_u20's 20 ulp showed through the
// cancellation p_s - p_t of forward KL's gradient). exp is floored at -200 (0 in fp32 either way; a
// -inf input is then safe); the terms are masked where their probability is 0.
inline Vec vec_element(const Vec& ls, const Vec& lt, int div, float beta, Vec& ps, Vec& pt, Vec& h) {
  const Vec floor(-200.f), zero(0.f);
  ps = at::vec::maximum(ls, floor).exp();
  pt = at::vec::maximum(lt, floor).exp();
  if (div == kForwardKL) {
    h = zero;
    return Vec::blendv(zero, pt * (lt - ls), pt > zero);
  }
  if (div == kReverseKL) {
    h = Vec::blendv(zero, ls - lt, ps > zero);  // finite where p_s = 0, so that p_s h = 0
    return ps * h;
  }
  const Vec vb(beta), vb1(1.f - beta);
  const Vec m = vb * pt + vb1 * ps;
  const Vec lm = Vec::blendv(m.log(), at::vec::maximum(lt + Vec(std::log(beta)), ls + Vec(std::log1p(-beta))),
                             m < Vec(std::numeric_limits<float>::min()));
  const Vec tt = Vec::blendv(zero, pt * (lt - lm), pt > zero);
  h = Vec::blendv(zero, vb1 * (ls - lm), ps > zero);
  return vb * tt + ps * h;
}

// p_s (h - dot) for reverse KL and JSD, p_s - p_t for forward KL (its dot is -1).
template <typename T>
inline T grad_element(int div, const T& ps, const T& pt, const T& h, const T& dot) {
  if (div == kForwardKL) return ps - pt;
  return ps * (h - dot);
}

struct RowPair {
  float ms, log_ss, mt, log_st;
};

// Visits a row pair block by block with the fp32 log-probs of both: f(ls, lt, len, v0).
template <typename scalar_t, typename F>
void for_blocks(const scalar_t* xs, const scalar_t* xt, int64_t V, float inv, const RowPair& r, float* bs,
                float* bt, F&& f) {
  const Vec vinv(inv), vms(r.ms), vmt(r.mt), vls(r.log_ss), vlt(r.log_st);
  for (int64_t v0 = 0; v0 < V; v0 += kBlock) {
    const int64_t len = std::min(kBlock, V - v0);
    const float* a = block_as_float(xs + v0, len, bs);
    const float* b = block_as_float(xt + v0, len, bt);
    // in place when the buffers already hold the row (bf16/fp16), else written into them
    const int64_t vlen = len - len % Vec::size();
    for (int64_t i = 0; i < vlen; i += Vec::size()) {
      ((Vec::loadu(a + i) - vms) * vinv - vls).store(bs + i);
      ((Vec::loadu(b + i) - vmt) * vinv - vlt).store(bt + i);
    }
    for (int64_t i = vlen; i < len; ++i) {
      bs[i] = (a[i] - r.ms) * inv - r.log_ss;
      bt[i] = (b[i] - r.mt) * inv - r.log_st;
    }
    f(bs, bt, len, v0);
  }
}

template <typename scalar_t>
void fwd_rows(const at::Tensor& student, const at::Tensor& teacher, const bool* valid, float inv, int div,
              float beta, float* loss, float* stats) {
  const int64_t N = student.size(0) * student.size(1), T = student.size(1), V = student.size(2);
  const scalar_t* sbase = student.data_ptr<scalar_t>();
  const scalar_t* tbase = teacher.data_ptr<scalar_t>();
  at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
    alignas(64) float bs[kBlock];
    alignas(64) float bt[kBlock];
    for (int64_t n = begin; n < end; ++n) {
      float* st = stats + 5 * n;
      if (!valid[n]) {
        loss[n] = 0.f;
        std::fill(st, st + 5, 0.f);
        continue;
      }
      const scalar_t* xs = row_ptr(sbase, n, T, student.stride(0), student.stride(1));
      const scalar_t* xt = row_ptr(tbase, n, T, teacher.stride(0), teacher.stride(1));
      const SoftmaxStats<float> a = row_stats(xs, V, inv, bs), b = row_stats(xt, V, inv, bs);
      const RowPair r{a.m, std::log(a.s), b.m, std::log(b.s)};
      // fp32 lanes within a block, fp64 across blocks: a row of 151936 terms summed in fp32 lanes
      // alone lost ~1e-4 of a loss ~30.
      double l = 0, d = 0;
      for_blocks(xs, xt, V, inv, r, bs, bt, [&](const float* ls, const float* lt, int64_t len, int64_t) {
        const int64_t vlen = len - len % Vec::size();
        Vec vl(0.f), vd(0.f), ps, pt, h;
        for (int64_t i = 0; i < vlen; i += Vec::size()) {
          vl = vl + vec_element(Vec::loadu(ls + i), Vec::loadu(lt + i), div, beta, ps, pt, h);
          vd = vd + ps * h;
        }
        float bl = hsum(vl), bd = hsum(vd);
        for (int64_t i = vlen; i < len; ++i) {
          float pi, ti, hi;
          bl += element<float>(ls[i], lt[i], div, beta, pi, ti, hi);
          bd += pi * hi;
        }
        l += bl, d += bd;
      });
      loss[n] = static_cast<float>(l);
      st[0] = r.ms, st[1] = r.log_ss, st[2] = r.mt, st[3] = r.log_st;
      st[4] = div == kForwardKL ? -1.f : static_cast<float>(d);
    }
  });
}

template <typename scalar_t>
void bwd_rows(const at::Tensor& student, const at::Tensor& teacher, const bool* valid, const float* stats,
              const float* grad_loss, float inv, int div, float beta, const at::Tensor& grad) {
  const int64_t N = student.size(0) * student.size(1), T = student.size(1), V = student.size(2);
  const scalar_t* sbase = student.data_ptr<scalar_t>();
  const scalar_t* tbase = teacher.data_ptr<scalar_t>();
  scalar_t* gbase = grad.data_ptr<scalar_t>();
  at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
    alignas(64) float bs[kBlock];
    alignas(64) float bt[kBlock];
    for (int64_t n = begin; n < end; ++n) {
      scalar_t* g = const_cast<scalar_t*>(row_ptr<scalar_t>(gbase, n, T, grad.stride(0), grad.stride(1)));
      if (!valid[n]) {
        std::fill(g, g + V, scalar_t(0));
        continue;
      }
      const scalar_t* xs = row_ptr(sbase, n, T, student.stride(0), student.stride(1));
      const scalar_t* xt = row_ptr(tbase, n, T, teacher.stride(0), teacher.stride(1));
      const float* st = stats + 5 * n;
      const RowPair r{st[0], st[1], st[2], st[3]};
      const float dot = st[4], c = grad_loss[n] * inv;
      const Vec vdot(dot), vc(c);
      // Each block is read whole (into bs/bt) before its gradient is written: g may alias xs.
      for_blocks(xs, xt, V, inv, r, bs, bt, [&](float* ls, const float* lt, int64_t len, int64_t v0) {
        const int64_t vlen = len - len % Vec::size();
        Vec ps, pt, h;
        for (int64_t i = 0; i < vlen; i += Vec::size()) {
          vec_element(Vec::loadu(ls + i), Vec::loadu(lt + i), div, beta, ps, pt, h);
          (grad_element(div, ps, pt, h, vdot) * vc).store(ls + i);
        }
        for (int64_t i = vlen; i < len; ++i) {
          float pi, ti, hi;
          element<float>(ls[i], lt[i], div, beta, pi, ti, hi);
          ls[i] = grad_element(div, pi, ti, hi, dot) * c;
        }
        for (int64_t i = 0; i < len; ++i) g[v0 + i] = static_cast<scalar_t>(ls[i]);
      });
    }
  });
}

// fp64 (gradcheck, oracle comparisons): plain loops, exact exp and log.
struct RowPair64 {
  double ms, log_ss, mt, log_st;
};

template <typename F>
void for_elements64(const double* xs, const double* xt, int64_t V, double inv, const RowPair64& r, F&& f) {
  for (int64_t v = 0; v < V; ++v) f(v, (xs[v] - r.ms) * inv - r.log_ss, (xt[v] - r.mt) * inv - r.log_st);
}

void fwd_rows64(const at::Tensor& student, const at::Tensor& teacher, const bool* valid, double inv, int div,
                double beta, double* loss, double* stats) {
  const int64_t N = student.size(0) * student.size(1), T = student.size(1), V = student.size(2);
  const double* sbase = student.data_ptr<double>();
  const double* tbase = teacher.data_ptr<double>();
  at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      double* st = stats + 5 * n;
      if (!valid[n]) {
        loss[n] = 0;
        std::fill(st, st + 5, 0.0);
        continue;
      }
      const double* xs = row_ptr(sbase, n, T, student.stride(0), student.stride(1));
      const double* xt = row_ptr(tbase, n, T, teacher.stride(0), teacher.stride(1));
      const SoftmaxStats<double> a = row_stats(xs, V, inv, nullptr), b = row_stats(xt, V, inv, nullptr);
      const RowPair64 r{a.m, std::log(a.s), b.m, std::log(b.s)};
      double l = 0, d = 0;
      for_elements64(xs, xt, V, inv, r, [&](int64_t, double ls, double lt) {
        double ps, pt, h;
        l += element<double>(ls, lt, div, beta, ps, pt, h);
        d += ps * h;
      });
      loss[n] = l;
      st[0] = r.ms, st[1] = r.log_ss, st[2] = r.mt, st[3] = r.log_st;
      st[4] = div == kForwardKL ? -1.0 : d;
    }
  });
}

void bwd_rows64(const at::Tensor& student, const at::Tensor& teacher, const bool* valid, const double* stats,
                const double* grad_loss, double inv, int div, double beta, const at::Tensor& grad) {
  const int64_t N = student.size(0) * student.size(1), T = student.size(1), V = student.size(2);
  const double* sbase = student.data_ptr<double>();
  const double* tbase = teacher.data_ptr<double>();
  double* gbase = grad.data_ptr<double>();
  at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      double* g = const_cast<double*>(row_ptr<double>(gbase, n, T, grad.stride(0), grad.stride(1)));
      if (!valid[n]) {
        std::fill(g, g + V, 0.0);
        continue;
      }
      const double* xs = row_ptr(sbase, n, T, student.stride(0), student.stride(1));
      const double* xt = row_ptr(tbase, n, T, teacher.stride(0), teacher.stride(1));
      const double* st = stats + 5 * n;
      const RowPair64 r{st[0], st[1], st[2], st[3]};
      const double dot = st[4], c = grad_loss[n] * inv;
      // element by element, each read before it is written: g may alias xs
      for_elements64(xs, xt, V, inv, r, [&](int64_t v, double ls, double lt) {
        double ps, pt, h;
        element<double>(ls, lt, div, beta, ps, pt, h);
        g[v] = grad_element(div, ps, pt, h, dot) * c;
      });
    }
  });
}

}  // namespace

void distill_fwd(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& valid,
                 double inv_temperature, int64_t divergence, double beta, const at::Tensor& loss,
                 const at::Tensor& stats) {
  const bool* v = valid.data_ptr<bool>();
  if (student.scalar_type() == at::kDouble) {
    fwd_rows64(student, teacher, v, inv_temperature, static_cast<int>(divergence), beta, loss.data_ptr<double>(),
               stats.data_ptr<double>());
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "distill_fwd", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      fwd_rows<scalar_t>(student, teacher, v, static_cast<float>(inv_temperature), static_cast<int>(divergence),
                         static_cast<float>(beta), loss.data_ptr<float>(), stats.data_ptr<float>());
    }
  });
}

void distill_bwd(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& valid,
                 const at::Tensor& stats, const at::Tensor& grad_loss, double inv_temperature, int64_t divergence,
                 double beta, const at::Tensor& grad_student) {
  const bool* v = valid.data_ptr<bool>();
  if (student.scalar_type() == at::kDouble) {
    bwd_rows64(student, teacher, v, stats.data_ptr<double>(), grad_loss.data_ptr<double>(), inv_temperature,
               static_cast<int>(divergence), beta, grad_student);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "distill_bwd", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      bwd_rows<scalar_t>(student, teacher, v, stats.data_ptr<float>(), grad_loss.data_ptr<float>(),
                         static_cast<float>(inv_temperature), static_cast<int>(divergence),
                         static_cast<float>(beta), grad_student);
    }
  });
}

}  // namespace alignops::cpu
