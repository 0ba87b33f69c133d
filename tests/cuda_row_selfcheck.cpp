// Host-side check of csrc/cuda/token_stats_row.cuh: the per-thread row split, visiting order and
// math of the CUDA token-statistics kernels, run on the CPU by simulating every thread of a block.
// Built and run by tests/test_cuda_kernels.py (needs only a C++ compiler, no GPU).
//
// Checks, for many (V, element size, row misalignment, threads per block, logits pattern):
//   - every element of a row is read exactly once (forward) / read then written once (backward);
//   - the merged statistics match float64 math on z = x * inv_temp (z itself never rounded);
//   - NaN logits poison the row, -inf logits contribute nothing;
//   - the in-place backward (gradient buffer = logits buffer) equals the out-of-place one bit for
//     bit, and both match float64 math.
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <random>
#include <string>
#include <vector>

#include "cuda/token_stats_row.cuh"

using namespace alignops;
using namespace alignops::cuda_row;

static int failures = 0;

#define CHECK(cond, ...)                                  \
  do {                                                    \
    if (!(cond)) {                                        \
      if (++failures <= 20) {                             \
        std::printf("FAIL %s:%d: ", __FILE__, __LINE__);  \
        std::printf(__VA_ARGS__);                         \
        std::printf("\n");                                \
      }                                                   \
    }                                                     \
  } while (0)

template <int kVec>
struct HostLoader {
  const float* row;
  int64_t head;
  int* reads;
  float scalar(int64_t v) const {
    ++reads[v];
    return row[v];
  }
  void vector(int64_t j, float* out) const {
    for (int i = 0; i < kVec; ++i) {
      const int64_t v = head + j * kVec + i;
      ++reads[v];
      out[i] = row[v];
    }
  }
};

template <int kVec>
struct HostIO {
  const float* x;
  float* g;
  int64_t head;
  int* reads;
  int* writes;
  float scalar_load(int64_t v) const {
    CHECK(writes[v] == 0, "element %lld read after it was written", (long long)v);
    ++reads[v];
    return x[v];
  }
  void scalar_store(int64_t v, float value) const {
    ++writes[v];
    g[v] = value;
  }
  void vector_load(int64_t j, float* out) const {
    for (int i = 0; i < kVec; ++i) out[i] = scalar_load(head + j * kVec + i);
  }
  void vector_store(int64_t j, const float* value) const {
    for (int i = 0; i < kVec; ++i) scalar_store(head + j * kVec + i, value[i]);
  }
};

struct Ref {
  double lse, logp, entropy;
};

// float64 math on z = x * inv_temp computed in float64 (the kernel never rounds z itself).
static Ref reference(const std::vector<double>& z, int64_t label) {
  double m = -INFINITY;
  for (double v : z) m = std::max(m, v);
  double s = 0, pz = 0;
  for (double v : z) {
    if (v == -INFINITY) continue;
    const double e = std::exp(v - m);
    s += e;
    pz += e * (v - m);
  }
  return {m + std::log(s), (z[label] - m) - std::log(s), std::log(s) - pz / s};
}

static bool close(double got, double want, double scale, double rel) {
  return std::fabs(got - want) <= rel * std::max(1.0, scale);
}

static std::string describe(int64_t V, int kVec, int misalign, int nthreads, const char* pattern) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "V=%lld vec=%d misalign=%d threads=%d pattern=%s", (long long)V, kVec, misalign,
                nthreads, pattern);
  return buf;
}

template <int kVec, int kUnroll>
static void check_row(const std::vector<float>& x, int64_t label, float inv_temp, int misalign, int nthreads,
                      const char* pattern, double ga, double gb, bool has_b) {
  const int64_t V = static_cast<int64_t>(x.size());
  const int elem_bytes = 16 / kVec;
  const std::string what = describe(V, kVec, misalign, nthreads, pattern);
  // Emulated row address: 16-byte aligned base plus `misalign` elements.
  const uint64_t addr = 4096 + uint64_t(misalign) * elem_bytes;
  const RowSplit sp = split_row(addr, addr, V, elem_bytes);
  CHECK(sp.head >= 0 && sp.head <= V && sp.tail <= V && sp.head + sp.nvec * kVec == sp.tail, "%s: bad split",
        what.c_str());
  CHECK((addr + uint64_t(sp.head) * elem_bytes) % 16 == 0 || sp.nvec == 0, "%s: vectors not aligned", what.c_str());

  // ---- forward: per-thread statistics, then merged (any order is exact up to rounding)
  std::vector<int> reads(V, 0);
  SoftmaxStats<float> total = stats_empty<float>();
  for (int tid = 0; tid < nthreads; ++tid) {
    StatsVisitor<kVec, HostLoader<kVec>> vis{{x.data(), sp.head, reads.data()}, inv_temp, stats_empty<float>()};
    visit_thread_share<kUnroll>(sp, V, tid, nthreads, vis);
    total = stats_merge<float>(total, vis.st, inv_temp);
  }
  for (int64_t v = 0; v < V; ++v) CHECK(reads[v] == 1, "%s: element %lld read %d times", what.c_str(), (long long)v, reads[v]);

  std::vector<double> z(V);
  bool has_nan = false;
  for (int64_t v = 0; v < V; ++v) {
    z[v] = double(x[v]) * double(inv_temp);
    has_nan |= std::isnan(x[v]);
  }
  // As the forward kernel finishes a row (csrc/cuda/token_stats.cu).
  const float log_s = std::log(total.s);
  const float lse = mul_rn(total.m, inv_temp) + log_s;
  const float logp = mul_rn(x[label] - total.m, inv_temp) - log_s;
  const float entropy = stats_entropy<float>(total);
  if (has_nan) {
    CHECK(std::isnan(lse) && std::isnan(logp) && std::isnan(entropy), "%s: NaN logit not propagated (lse %g)",
          what.c_str(), lse);
    return;
  }
  const Ref ref = reference(z, label);
  CHECK(close(lse, ref.lse, std::fabs(ref.lse), 1e-5), "%s: lse %.9g vs %.9g", what.c_str(), lse, ref.lse);
  CHECK(close(logp, ref.logp, std::fabs(ref.logp), 1e-5), "%s: logp %.9g vs %.9g", what.c_str(), logp, ref.logp);
  CHECK(close(entropy, ref.entropy, std::fabs(ref.entropy), 1e-5), "%s: entropy %.9g vs %.9g", what.c_str(), entropy,
        ref.entropy);

  // ---- backward: out of place, then in place; each element read before it is written
  const GradCoeffs c = make_grad_coeffs(x[label], logp, lse, entropy, float(ga), float(gb), has_b, inv_temp, label);
  std::vector<float> out(V, 12345.f), inplace = x;
  std::vector<int> r1(V, 0), w1(V, 0), r2(V, 0), w2(V, 0);
  for (int tid = 0; tid < nthreads; ++tid) {
    GradVisitor<kVec, HostIO<kVec>> vis{{x.data(), out.data(), sp.head, r1.data(), w1.data()}, c, sp.head};
    visit_thread_share<kUnroll>(sp, V, tid, nthreads, vis);
  }
  for (int tid = 0; tid < nthreads; ++tid) {
    GradVisitor<kVec, HostIO<kVec>> vis{{inplace.data(), inplace.data(), sp.head, r2.data(), w2.data()}, c, sp.head};
    visit_thread_share<kUnroll>(sp, V, tid, nthreads, vis);
  }
  const double a = ga * inv_temp, b = has_b ? gb * inv_temp : 0.0;
  for (int64_t v = 0; v < V; ++v) {
    CHECK(r1[v] == 1 && w1[v] == 1 && r2[v] == 1 && w2[v] == 1, "%s: element %lld visited r%d w%d", what.c_str(),
          (long long)v, r1[v], w1[v]);
    CHECK(std::memcmp(&out[v], &inplace[v], sizeof(float)) == 0, "%s: in-place differs at %lld (%g vs %g)",
          what.c_str(), (long long)v, inplace[v], out[v]);
    const double lp = z[v] - ref.lse;
    const double p = std::exp(lp);
    double want = (v == label ? a : 0.0) - a * p;
    if (p > 0) want -= b * p * (lp + ref.entropy);
    CHECK(std::isfinite(out[v]) && close(out[v], want, std::fabs(a) + std::fabs(b), 1e-5),
          "%s: grad[%lld] %.9g vs %.9g", what.c_str(), (long long)v, out[v], want);
  }

  // ---- ignored row: zeros everywhere, nothing read
  std::vector<float> zeros(V, 7.f);
  std::vector<int> r3(V, 0), w3(V, 0);
  for (int tid = 0; tid < nthreads; ++tid) {
    ZeroVisitor<kVec, HostIO<kVec>> vis{{x.data(), zeros.data(), sp.head, r3.data(), w3.data()}};
    visit_thread_share<kUnroll>(sp, V, tid, nthreads, vis);
  }
  for (int64_t v = 0; v < V; ++v)
    CHECK(zeros[v] == 0.f && r3[v] == 0 && w3[v] == 1, "%s: zero row at %lld: %g (r%d w%d)", what.c_str(),
          (long long)v, zeros[v], r3[v], w3[v]);
}

static std::vector<float> make_row(int64_t V, const std::string& pattern, std::mt19937_64& rng, int64_t* label) {
  std::normal_distribution<float> normal(0.f, 2.f);
  std::vector<float> x(V);
  for (auto& v : x) v = normal(rng);
  *label = int64_t(rng() % uint64_t(V));
  if (pattern == "peaked") x[rng() % V] += 50.f;
  if (pattern == "shifted_up")
    for (auto& v : x) v += 1000.f;
  if (pattern == "shifted_down")
    for (auto& v : x) v -= 1000.f;
  if (pattern == "neginf" || pattern == "neginf_nan") {
    // Long runs of -inf, so that whole vectors and whole thread shares hold nothing but -inf.
    for (int64_t v = 0; v < V; ++v)
      if (v != *label && (rng() % 4 != 0 || (v / 16) % 3 == 1)) x[v] = -INFINITY;
  }
  if (pattern == "neginf_nan") {
    // A NaN inside an otherwise all -inf stretch: stats_merge must not drop it as "empty".
    int64_t spot = -1;
    for (int64_t v = 0; v < V; ++v)
      if (x[v] == -INFINITY) spot = v;
    x[spot >= 0 ? spot : 0] = NAN;
  }
  if (pattern == "nan") x[rng() % V] = NAN;
  return x;
}

// The launch grid and the row offsets past 2^31 elements (int64 throughout; the same functions the
// kernels call). Offsets are compared with 128-bit arithmetic.
static int check_grid_and_offsets() {
  int cases = 0;
  const int64_t ns[] = {1, 2, 1000, kMaxBlocks - 1, kMaxBlocks, kMaxBlocks + 1, 3 * kMaxBlocks + 5,
                        (1LL << 31) - 1, 1LL << 31, 1LL << 40};
  for (int64_t N : ns) {
    const int64_t g = grid_for(N);
    CHECK(g >= 1 && g <= kMaxBlocks && g <= 2147483647LL && g == std::min(N, kMaxBlocks), "grid_for(%lld) = %lld",
          (long long)N, (long long)g);
    ++cases;
  }
  // The kernels' loop (row = block; row < N; row += grid) visits every row once when N > grid.
  const int64_t N = 2 * kMaxBlocks + 12345;
  std::vector<uint8_t> seen(N, 0);
  const int64_t g = grid_for(N);
  for (int64_t block = 0; block < g; ++block)
    for (int64_t row = block; row < N; row += g) ++seen[row];
  CHECK(std::all_of(seen.begin(), seen.end(), [](uint8_t c) { return c == 1; }), "grid-stride rows not once each");
  ++cases;
  struct View { int64_t T, stride_b, stride_t, row; };
  const int64_t V = 151936;
  const View views[] = {
      {16384, 16384 * V, V, 14135},            // [1, N, V]: the first row that starts past 2^31
      {16384, 16384 * V, V, 16383},
      {5000, 5000 * V + 64, V, 3 * 5000 + 7},  // [B, T, V] with padded batch stride
      {3, (1LL << 31) + 12345, V, 5},          // a batch stride alone past 2^31
      {1, 3 * V, 3 * V, 5000},                 // [N, 1, V] view of every third row
      {7, 1LL << 33, 1LL << 30, 7 * 3 + 6},    // strides of a sliced view of a huge buffer
  };
  for (const View& w : views) {
    const __int128 want = (__int128)(w.row / w.T) * w.stride_b + (__int128)(w.row % w.T) * w.stride_t;
    const int64_t got = row_offset(w.row, w.T, w.stride_b, w.stride_t);
    CHECK((__int128)got == want && want > INT32_MAX, "row_offset(%lld) = %lld", (long long)w.row, (long long)got);
    ++cases;
  }
  return cases;
}

int main() {
  std::mt19937_64 rng(20240611);
  const int64_t vocabs[] = {1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 257, 1031, 4099, 129920, 151936};
  const char* patterns[] = {"normal", "peaked", "shifted_up", "shifted_down", "neginf", "neginf_nan", "nan"};
  const int threads[] = {1, 3, 32, 256, 1024};
  const float temps[] = {1.f, 0.7f, 1.9f};
  int cases = 0;
  for (int64_t V : vocabs) {
    for (const char* pattern : patterns) {
      if (V == 1 && std::string(pattern).find("neginf") == 0) continue;  // the label is the only logit
      for (int nthreads : threads) {
        if (V >= 100000 && nthreads < 256) continue;  // keeps the run short; small V covers tiny blocks
        for (int misalign = 0; misalign < 8; misalign += (V >= 100000 ? 3 : 1)) {
          int64_t label;
          std::vector<float> x = make_row(V, pattern, rng, &label);
          const float inv_temp = 1.f / temps[cases % 3];
          const bool has_b = cases % 4 != 3;
          const double ga = std::normal_distribution<double>(0, 1)(rng);
          const double gb = std::normal_distribution<double>(0, 1)(rng);
          if (misalign < 4) check_row<4, 4>(x, label, inv_temp, misalign, nthreads, pattern, ga, gb, has_b);
          check_row<8, 2>(x, label, inv_temp, misalign, nthreads, pattern, ga, gb, has_b);
          ++cases;
        }
      }
    }
  }
  // Pointers whose alignments differ (gradient and logits) must fall back to scalar access.
  const RowSplit mixed = split_row(4096 + 2, 4096 + 4, 100, 2);
  CHECK(mixed.head == 100 && mixed.nvec == 0 && mixed.tail == 100, "mixed alignment must be all scalar");
  const RowSplit odd = split_row(4096 + 1, 4096 + 1, 100, 2);
  CHECK(odd.nvec == 0, "an address that is not a multiple of the element size must be all scalar");
  cases += check_grid_and_offsets();
  std::printf("%d cases, %d failures\n", cases, failures);
  return failures == 0 ? 0 : 1;
}
