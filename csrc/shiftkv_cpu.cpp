// CPU driver of mmshiftkv::shiftkv_scores.
//
// Stage 1, per (batch, KV head): the keys and query rows are converted to float32 once, then
// at::parallel_for runs over blocks of whole groups, and the anchor (the last queries) follows. Rows
// are processed in row blocks: one float32 GEMM (MKL/OpenBLAS through at::mm_out,
// float32 accumulation) gives the block's logits against all keys, and each row is then masked,
// exponentiated (float32), normalised (its sum accumulated in float64) and added to its group's
// float32 mass in a few passes. Nothing of size n_proxies x seq_len is ever held: the extra memory
// is the (G + 1) x seq_len float32 sums and G x seq_len vote bytes per KV head, one head's float32
// keys and query rows, and one row block of logits per thread (kMinBlockRows to kMaxBlockRows rows,
// about kBlockElements floats).
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

constexpr int64_t kBlockElements = int64_t{1} << 22;  // 16 MiB of float32 logits per thread
constexpr int64_t kMinBlockRows = 128;
constexpr int64_t kMaxBlockRows = 256;
constexpr int kLanes = 8;  // independent partial sums: vectorisable, and the same order on every ISA

// exp(x) for x <= 0 (softmax arguments, including -inf) in float32, branch-free so the row loops
// vectorise. Cody-Waite reduction x = k ln2 + r with |r| <= ln2 / 2 (ln 2 split in two so k * hi is
// exact), a degree-7 Taylor polynomial (truncation below 6e-9 relative) and 2^k applied as two
// exact powers of two, so results stay correct down to the subnormal range and exp(-inf) is 0.
// Within a few ulp of a correctly rounded expf.
inline float exp_nonpositive(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;  // 9 significant bits
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRoundShift = 12582912.0f;  // 1.5 * 2^23: x + it rounds x to an integer
  const float clamped = x < -110.0f ? -110.0f : x;  // exp(-110) rounds to 0, as does exp(-inf)
  const float shifted = clamped * kLog2e + kRoundShift;
  const float k = shifted - kRoundShift;
  const float r = (clamped - k * kLn2Hi) - k * kLn2Lo;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t shifted_bits;
  int32_t shift_bits;
  std::memcpy(&shifted_bits, &shifted, sizeof shifted_bits);
  std::memcpy(&shift_bits, &kRoundShift, sizeof shift_bits);
  const int32_t n = shifted_bits - shift_bits;  // k as an integer, in [-159, 0]
  const int32_t half = n / 2;
  const uint32_t scale_a_bits = static_cast<uint32_t>(half + 127) << 23;
  const uint32_t scale_b_bits = static_cast<uint32_t>(n - half + 127) << 23;
  float scale_a;
  float scale_b;
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

// Sets the logits of padding keys to -inf (real_key == nullptr: no padding), returns the row max.
// (real_key is a byte pointer, which may alias anything unless told otherwise.)
SHIFTKV_CPU_CLONES float mask_max(float* __restrict__ row, int64_t n, const uint8_t* __restrict__ real_key) {
  if (real_key != nullptr) {
    for (int64_t t = 0; t < n; ++t) row[t] = real_key[t] != 0 ? row[t] : -INFINITY;
  }
  float lane_max[kLanes];
  std::fill(lane_max, lane_max + kLanes, -INFINITY);
  auto update = [&](int64_t t, int l) { lane_max[l] = row[t] > lane_max[l] ? row[t] : lane_max[l]; };
  for_each_lane(n, update);
  float row_max = -INFINITY;
  for (float v : lane_max) row_max = v > row_max ? v : row_max;
  return row_max;
}

// Replaces a row by exp(row - shift), returns the sum (in float64: it scales every probability).
SHIFTKV_CPU_CLONES double exp_in_place_sum(float* row, int64_t n, float shift) {
  double lane_sum[kLanes] = {};
  auto update = [&](int64_t t, int l) {
    const float e = exp_nonpositive(row[t] - shift);
    row[t] = e;
    lane_sum[l] += static_cast<double>(e);
  };
  for_each_lane(n, update);
  double sum = 0.0;
  for (double v : lane_sum) sum += v;
  return sum;
}

SHIFTKV_CPU_CLONES void add_scaled(float* acc, const float* row, int64_t n, float scale) {
  for (int64_t t = 0; t < n; ++t) acc[t] += row[t] * scale;
}

SHIFTKV_CPU_CLONES double sum_masses_below(const float* mass, int64_t n, float bound) {
  double lane_sum[kLanes] = {};
  auto update = [&](int64_t t, int l) { lane_sum[l] += mass[t] < bound ? static_cast<double>(mass[t]) : 0.0; };
  for_each_lane(n, update);
  double sum = 0.0;
  for (double v : lane_sum) sum += v;
  return sum;
}

// Row blocks of one KV head's query rows against its keys. rows: (n_rows, head_dim) float32, already
// multiplied by the logit scale: every group's r*g proxy rows in group order, then the r anchor
// rows; row i belongs to slot i / rows_per_group (slot G: the anchor). keys_t: the
// (head_dim, seq_len) transposed view of the head's float32 keys. real_key: (seq_len) 0/1 bytes, or
// nullptr without padding. sums: (G + 1, seq_len) float32, slot-major.
struct HeadRows {
  const at::Tensor& rows;
  const at::Tensor& keys_t;
  int64_t rows_per_group;
  int64_t n_groups;
  const uint8_t* real_key;
  bool exclude_last_key;
  float* sums;
};

// Adds the softmax probabilities of rows [row_begin, row_end) into their slots' sums, one GEMM of
// at most logits.size(0) rows at a time. The caller gives every slot to one thread only.
void accumulate_softmax(const HeadRows& head, int64_t row_begin, int64_t row_end, at::Tensor& logits) {
  const int64_t seq_len = head.keys_t.size(1);
  // Zeroing the last key after the softmax, without renormalising, is leaving it out of the mass.
  const int64_t n_summed = head.exclude_last_key ? seq_len - 1 : seq_len;
  for (int64_t r0 = row_begin; r0 < row_end; r0 += logits.size(0)) {
    const int64_t len = std::min(logits.size(0), row_end - r0);
    at::Tensor block = logits.narrow(0, 0, len);
    at::mm_out(block, head.rows.narrow(0, r0, len), head.keys_t);
    float* data = block.data_ptr<float>();
    for (int64_t i = 0; i < len; ++i) {
      float* row = data + i * seq_len;
      const int64_t slot = std::min((r0 + i) / head.rows_per_group, head.n_groups);
      const float shift = softmax_shift(mask_max(row, seq_len, head.real_key));
      const float inverse_sum = softmax_inverse_sum(exp_in_place_sum(row, seq_len, shift));
      add_scaled(head.sums + slot * seq_len, row, n_summed, inverse_sum);
    }
  }
}

// Rows per GEMM: enough that the GEMM runs near its peak (narrow blocks re-pack the keys for little
// work), few enough that a thread's logits stay within max(kBlockElements, kMinBlockRows * seq_len).
int64_t block_rows(int64_t seq_len) {
  return std::clamp(kBlockElements / seq_len, kMinBlockRows, kMaxBlockRows);
}

// Stage 1 for one (batch, KV head). The proxy rows are cut into blocks of whole groups (or one
// group in GEMMs of block_rows rows), so no two threads add into one slot, and the cut does not
// depend on the thread count (a BLAS may round a row differently at another place in a block).
// The anchor's few rows follow on the calling thread.
void head_probability_sums(const HeadRows& head) {
  const int64_t seq_len = head.keys_t.size(1);
  const int64_t G = head.n_groups;
  const int64_t per_group = head.rows_per_group;
  const int64_t max_rows = block_rows(seq_len);
  const int64_t groups_per_block = std::max<int64_t>(1, max_rows / per_group);
  const int64_t n_blocks = (G + groups_per_block - 1) / groups_per_block;
  const int64_t logit_rows = std::min(max_rows, groups_per_block * per_group);
  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    at::Tensor logits = at::empty({logit_rows, seq_len}, head.rows.options());
    for (int64_t block = begin; block < end; ++block) {
      const int64_t last_group = std::min(G, (block + 1) * groups_per_block);
      accumulate_softmax(head, block * groups_per_block * per_group, last_group * per_group, logits);
    }
  });
  at::Tensor anchor_logits = at::empty({head.rows.size(0) - G * per_group, seq_len}, head.rows.options());
  accumulate_softmax(head, G * per_group, head.rows.size(0), anchor_logits);
}

at::Tensor to_float_contiguous(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

VoteCut group_vote_cut(const float* mass, int64_t seq_len, double tau, Coverage coverage) {
  double lane_sum[kLanes] = {};
  float max_mass = 0.0f;
  for (int64_t t = 0; t < seq_len; ++t) {
    lane_sum[t % kLanes] += static_cast<double>(mass[t]);
    max_mass = std::max(max_mass, mass[t]);
  }
  double total = 0.0;
  for (double v : lane_sum) total += v;
  auto sum_below = [&](uint32_t bits) { return sum_masses_below(mass, seq_len, bits_to_mass(bits)); };
  auto count_equal = [&](float value) { return static_cast<int64_t>(std::count(mass, mass + seq_len, value)); };
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

  // Group j's rows are the contiguous r*g rows of grouped[b][h][j].
  const at::Tensor grouped = proxies.reshape({s.batch, s.kv_heads, r, G, g, s.head_dim}).transpose(2, 3);
  const at::Tensor last = last_query.reshape({s.batch, s.kv_heads, r, s.head_dim});
  const at::Tensor mask = key_mask.has_value() ? key_mask->contiguous() : at::Tensor();
  // Slot G of the second-to-last dimension holds the anchor's probability sums.
  at::Tensor sums = at::zeros({s.batch, s.kv_heads, G + 1, T}, proxies.options().dtype(at::kFloat));
  float* sums_data = sums.data_ptr<float>();

  for (int64_t b = 0; b < s.batch; ++b) {
    // bool has no vector type in GCC's vectoriser; its bytes are 0 or 1.
    const uint8_t* real_key =
        mask.defined() ? reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()) + b * T : nullptr;
    for (int64_t h = 0; h < s.kv_heads; ++h) {
      const at::Tensor keys_t = to_float_contiguous(keys[b][h]).t();
      // Scaling the float32 rows costs one rounding, as scaling the logits would.
      const at::Tensor rows =
          at::cat({grouped[b][h].reshape({G * r * g, s.head_dim}), last[b][h]}).to(at::kFloat).mul_(scaling);
      const HeadRows head{rows, keys_t, r * g, G, real_key, exclude_last_key,
                          sums_data + (b * s.kv_heads + h) * (G + 1) * T};
      head_probability_sums(head);
    }
  }

  at::Tensor voted = at::zeros({s.batch, s.kv_heads, G, T}, proxies.options().dtype(at::kByte));
  uint8_t* voted_data = voted.data_ptr<uint8_t>();
  at::parallel_for(0, s.batch * s.kv_heads * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> mass(T);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t head = item / G;
      const int64_t j = item % G;
      const float* group_sum = sums_data + (head * (G + 1) + j) * T;
      const float* anchor_sum = sums_data + (head * (G + 1) + G) * T;
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
  const bool* mask_data = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  at::parallel_for(0, s.batch * s.kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t head = begin; head < end; ++head) {
      const int64_t b = head / s.kv_heads;
      for (int64_t t = 0; t < T; ++t) {
        int64_t votes = 0;
        for (int64_t j = 0; j < G; ++j) votes += voted_data[(head * G + j) * T + t];
        const double anchor = anchor_attention(sums_data[(head * (G + 1) + G) * T + t], r);
        scores_data[head * T + t] = shiftkv_score(votes, anchor, anchor_weight, mask_data == nullptr || mask_data[b * T + t]);
      }
    }
  });
  return scores;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmshiftkv, CPU, m) { m.impl("shiftkv_scores", &shiftkv_scores_cpu); }

}  // namespace mmshiftkv
