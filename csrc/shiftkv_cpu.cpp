// CPU driver of mmshiftkv::shiftkv_scores.
//
// Stage 1, per (batch, KV head): the keys are converted to float64 once, then at::parallel_for runs
// over the G groups plus the anchor (the last queries). A group's r*g proxy rows are processed in
// row blocks: one float64 GEMM (MKL/OpenBLAS through at::mm_out) gives the block's logits against
// all keys, and each row is then masked, exponentiated, normalised and added to the group's mass in
// a few cache-resident passes. Nothing of size n_proxies x seq_len is ever held: the extra memory is
// the (G + 1) x seq_len masses per KV head, one head's float64 keys and proxies, and one row block
// of logits per thread (at most max(kBlockElements, kMinBlockRows * seq_len) doubles).
// Stage 2, per (batch, KV head, group): the tau-coverage cut by threshold search (shiftkv_vote.h).
// Stage 3: votes + lambda * anchor.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "shiftkv_checks.h"
#include "shiftkv_vote.h"

// The row loops are written for auto-vectorisation; cloning them per ISA lets one x86-64 build use
// AVX2/AVX-512 where the machine has it (the code is the same, so results are too: the build
// disables FMA contraction).
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define SHIFTKV_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SHIFTKV_CPU_CLONES
#endif

namespace mmshiftkv {
namespace {

constexpr int64_t kBlockElements = int64_t{1} << 20;  // 8 MiB of float64 logits per thread
constexpr int64_t kMinBlockRows = 8;
constexpr int kLanes = 8;  // independent partial sums: vectorisable, and the same order on every ISA

// exp(x) for x <= 0 (softmax arguments, including -inf), branch-free so the row loops vectorise.
// Cody-Waite reduction x = k ln2 + r with |r| <= ln2 / 2, a degree-13 Taylor polynomial (truncation
// below 1e-17 relative) and 2^k applied as two exact powers of two, so results stay correct down to
// the subnormal range. Within ~2 ulp of a correctly rounded exp.
inline double exp_nonpositive(double x) {
  constexpr double kLog2e = 1.4426950408889634;
  constexpr double kLn2Hi = 6.93147180369123816490e-01;  // high bits of ln 2: k * kLn2Hi is exact
  constexpr double kLn2Lo = 1.90821492927058770002e-10;
  constexpr double kRoundShift = 6755399441055744.0;  // 1.5 * 2^52: x + it rounds x to an integer
  const double clamped = x < -746.0 ? -746.0 : x;     // exp(-746) rounds to 0, as does exp(-inf)
  const double shifted = clamped * kLog2e + kRoundShift;
  const double k = shifted - kRoundShift;
  const double r = (clamped - k * kLn2Hi) - k * kLn2Lo;
  double p = 1.0 / 6227020800.0;  // 1/13!
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  int64_t shifted_bits;
  int64_t shift_bits;
  std::memcpy(&shifted_bits, &shifted, sizeof shifted_bits);
  std::memcpy(&shift_bits, &kRoundShift, sizeof shift_bits);
  const int64_t n = shifted_bits - shift_bits;  // k as an integer, in [-1077, 0]
  const int64_t half = n / 2;
  const uint64_t scale_a_bits = static_cast<uint64_t>(half + 1023) << 52;
  const uint64_t scale_b_bits = static_cast<uint64_t>(n - half + 1023) << 52;
  double scale_a;
  double scale_b;
  std::memcpy(&scale_a, &scale_a_bits, sizeof scale_a);
  std::memcpy(&scale_b, &scale_b_bits, sizeof scale_b);
  return p * scale_a * scale_b;
}

// Calls update(t, t % kLanes) for t = 0..n-1, a block of kLanes at a time, so per-lane partial
// results vectorise and are combined in the same order on every ISA.
template <class Update>
inline void for_each_lane(int64_t n, Update&& update) {
  int64_t t0 = 0;
  for (; t0 + kLanes <= n; t0 += kLanes) {
    for (int l = 0; l < kLanes; ++l) update(t0 + l, l);
  }
  for (int l = 0; t0 + l < n; ++l) update(t0 + l, l);
}

// Scales a row of raw dot products in place, sets padding keys to -inf, returns the row max.
// (real_key is a byte pointer, which may alias anything unless told otherwise.)
SHIFTKV_CPU_CLONES double scale_mask_max(double* __restrict__ row, int64_t n, double scaling,
                                         const uint8_t* __restrict__ real_key) {
  for (int64_t t = 0; t < n; ++t) row[t] = real_key[t] != 0 ? row[t] * scaling : -INFINITY;
  double lane_max[kLanes];
  std::fill(lane_max, lane_max + kLanes, -INFINITY);
  auto update = [&](int64_t t, int l) { lane_max[l] = row[t] > lane_max[l] ? row[t] : lane_max[l]; };
  for_each_lane(n, update);
  double row_max = -INFINITY;
  for (double v : lane_max) row_max = v > row_max ? v : row_max;
  return row_max;
}

// Replaces a row by exp(row - shift), returns the sum.
SHIFTKV_CPU_CLONES double exp_in_place_sum(double* row, int64_t n, double shift) {
  double lane_sum[kLanes] = {};
  auto update = [&](int64_t t, int l) {
    const double e = exp_nonpositive(row[t] - shift);
    row[t] = e;
    lane_sum[l] += e;
  };
  for_each_lane(n, update);
  double sum = 0.0;
  for (double v : lane_sum) sum += v;
  return sum;
}

SHIFTKV_CPU_CLONES void add_scaled(double* acc, const double* row, int64_t n, double scale) {
  for (int64_t t = 0; t < n; ++t) acc[t] += row[t] * scale;
}

SHIFTKV_CPU_CLONES double sum_masses_below(const double* mass, int64_t n, double bound) {
  double lane_sum[kLanes] = {};
  auto update = [&](int64_t t, int l) { lane_sum[l] += mass[t] < bound ? mass[t] : 0.0; };
  for_each_lane(n, update);
  double sum = 0.0;
  for (double v : lane_sum) sum += v;
  return sum;
}

// One group's (or the anchor's) query rows against one head's keys: adds each row's softmax
// probabilities into `mass` (length seq_len). rows: (n_rows, head_dim) float64, keys_t: the
// (head_dim, seq_len) transposed view of the head's float64 keys.
void accumulate_row_softmax(const at::Tensor& rows, const at::Tensor& keys_t, double scaling, const uint8_t* real_key,
                            bool exclude_last_key, double* mass) {
  const int64_t n_rows = rows.size(0);
  const int64_t seq_len = keys_t.size(1);
  const int64_t block_rows = std::min(n_rows, std::max(kMinBlockRows, kBlockElements / seq_len));
  at::Tensor logits = at::empty({block_rows, seq_len}, rows.options());
  // Zeroing the last key after the softmax, without renormalising, is leaving it out of the mass.
  const int64_t n_summed = exclude_last_key ? seq_len - 1 : seq_len;
  for (int64_t r0 = 0; r0 < n_rows; r0 += block_rows) {
    const int64_t len = std::min(block_rows, n_rows - r0);
    at::Tensor block = logits.narrow(0, 0, len);
    at::mm_out(block, rows.narrow(0, r0, len), keys_t);
    double* data = block.data_ptr<double>();
    for (int64_t i = 0; i < len; ++i) {
      double* row = data + i * seq_len;
      const double shift = softmax_shift(scale_mask_max(row, seq_len, scaling, real_key));
      const double inverse_sum = softmax_inverse_sum(exp_in_place_sum(row, seq_len, shift));
      add_scaled(mass, row, n_summed, inverse_sum);
    }
  }
}

at::Tensor to_double_contiguous(const at::Tensor& t) {
  return at::empty(t.sizes(), t.options().dtype(at::kDouble)).copy_(t);
}

VoteCut group_vote_cut(const double* mass, int64_t seq_len, double tau, Coverage coverage) {
  double lane_sum[kLanes] = {};
  double max_mass = 0.0;
  for (int64_t t = 0; t < seq_len; ++t) {
    lane_sum[t % kLanes] += mass[t];
    max_mass = std::max(max_mass, mass[t]);
  }
  double total = 0.0;
  for (double v : lane_sum) total += v;
  auto sum_below = [&](uint64_t bits) { return sum_masses_below(mass, seq_len, bits_to_mass(bits)); };
  auto count_equal = [&](double value) {
    return static_cast<int64_t>(std::count(mass, mass + seq_len, value));
  };
  return coverage_cut(total, max_mass, tau, coverage, sum_below, count_equal);
}

at::Tensor shiftkv_scores_cpu(const at::Tensor& proxies, const at::Tensor& keys, const at::Tensor& last_query,
                              const std::optional<at::Tensor>& key_mask, int64_t n_groups, double tau,
                              double scaling, double anchor_weight, bool anchor_in_groups,
                              std::string_view coverage_name, bool exclude_last_key) {
  const ScoringShape s = check_scoring_inputs(proxies, keys, last_query, key_mask, n_groups, tau, scaling,
                                              anchor_weight);
  const Coverage coverage = parse_coverage(coverage_name);
  const int64_t r = s.heads_per_kv;
  const int64_t g = s.group_size;
  const int64_t G = s.n_groups;
  const int64_t T = s.seq_len;

  // Row blocks of group j are the contiguous r*g rows of grouped[b][h][j].
  const at::Tensor grouped = proxies.reshape({s.batch, s.kv_heads, r, G, g, s.head_dim}).transpose(2, 3);
  const at::Tensor last = last_query.reshape({s.batch, s.kv_heads, r, s.head_dim});
  // An all-true mask keeps the row loops branch-free when there is no padding.
  const at::Tensor mask = key_mask.has_value() ? key_mask->contiguous()
                                               : at::ones({s.batch, T}, keys.options().dtype(at::kBool));
  // Slot G of the second-to-last dimension holds the anchor's probability sums.
  at::Tensor sums = at::zeros({s.batch, s.kv_heads, G + 1, T}, proxies.options().dtype(at::kDouble));
  double* sums_data = sums.data_ptr<double>();

  for (int64_t b = 0; b < s.batch; ++b) {
    // bool has no vector type in GCC's vectoriser; its bytes are 0 or 1.
    const uint8_t* real_key = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()) + b * T;
    for (int64_t h = 0; h < s.kv_heads; ++h) {
      const at::Tensor keys_t = to_double_contiguous(keys[b][h]).t();
      const at::Tensor rows = to_double_contiguous(grouped[b][h]).view({G, r * g, s.head_dim});
      const at::Tensor anchor_rows = to_double_contiguous(last[b][h]);
      double* head_sums = sums_data + (b * s.kv_heads + h) * (G + 1) * T;
      at::parallel_for(0, G + 1, 1, [&](int64_t begin, int64_t end) {
        for (int64_t slot = begin; slot < end; ++slot) {
          const at::Tensor& slot_rows = slot < G ? rows[slot] : anchor_rows;
          accumulate_row_softmax(slot_rows, keys_t, scaling, real_key, exclude_last_key, head_sums + slot * T);
        }
      });
    }
  }

  at::Tensor voted = at::zeros({s.batch, s.kv_heads, G, T}, proxies.options().dtype(at::kByte));
  uint8_t* voted_data = voted.data_ptr<uint8_t>();
  at::parallel_for(0, s.batch * s.kv_heads * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> mass(T);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t head = item / G;
      const int64_t j = item % G;
      const double* group_sum = sums_data + (head * (G + 1) + j) * T;
      const double* anchor_sum = sums_data + (head * (G + 1) + G) * T;
      for (int64_t t = 0; t < T; ++t) {
        mass[t] = vote_mass(group_sum[t], anchor_sum[t], r, g, anchor_in_groups);
      }
      const VoteCut cut = group_vote_cut(mass.data(), T, tau, coverage);
      uint8_t* out = voted_data + item * T;
      int64_t equal_taken = 0;
      for (int64_t t = 0; t < T; ++t) {
        const bool take_equal = on_cut(mass[t], cut) && equal_taken < cut.equal_quota;
        equal_taken += take_equal;
        out[t] = above_cut(mass[t], cut) || take_equal;
      }
    }
  });

  at::Tensor scores = at::empty({s.batch, s.kv_heads, T}, proxies.options().dtype(at::kFloat));
  float* scores_data = scores.data_ptr<float>();
  const bool* mask_data = mask.data_ptr<bool>();
  at::parallel_for(0, s.batch * s.kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t head = begin; head < end; ++head) {
      const int64_t b = head / s.kv_heads;
      for (int64_t t = 0; t < T; ++t) {
        int64_t votes = 0;
        for (int64_t j = 0; j < G; ++j) votes += voted_data[(head * G + j) * T + t];
        const double anchor = anchor_attention(sums_data[(head * (G + 1) + G) * T + t], r);
        scores_data[head * T + t] = shiftkv_score(votes, anchor, anchor_weight, mask_data[b * T + t]);
      }
    }
  });
  return scores;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmshiftkv, CPU, m) { m.impl("shiftkv_scores", &shiftkv_scores_cpu); }

}  // namespace mmshiftkv
