// CUDA driver of mmshiftkv::shiftkv_scores.
//
// Per step, a chunk of query rows of every (batch, KV head) (all proxies of all groups, then the
// last queries, in that order):
// 1. logits by cuBLAS through ATen's batched GEMM: float16/bfloat16 inputs run on tensor cores with
//    float32 accumulation and float32 output (at::bmm with out_dtype); float32 inputs use float32
//    GEMM (TF32 only if the user enabled it for matmuls, torch's default is off).
// 2. row_stats_kernel, one block per row: the row's max and the float64 sum of exp(logit - max)
//    over the real keys, reduced in a fixed order.
// 3. row_mass_kernel, one thread per (batch, KV head, key): adds each row's probability into its
//    group's float32 sum, rows in order, so results are deterministic.
// Then vote_kernel, one block per (batch, KV head, group): the tau-coverage cut by threshold search
// (shiftkv_vote.h) and the votes, ties in index order; score_kernel: votes + lambda * anchor.
//
// Extra memory: the (G + 1) x seq_len float32 sums and G x seq_len vote bytes per KV head, a
// float32 logit chunk of at most max(G, kLogitElements / (batch * kv_heads * seq_len)) rows per KV
// head, two floats per row of the chunk, and a copy of the query rows (n_proxies + 1 per head).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string_view>

#include "shiftkv_checks.h"
#include "shiftkv_vote.h"

namespace mmshiftkv {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kLogitElements = int64_t{1} << 26;  // 256 MiB of float32 logits per step
constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------------------------
// Fixed-order block reductions: each returns the same value to every thread, whatever the timing.

template <typename T, typename Combine>
__device__ __forceinline__ T block_reduce(T value, T* scratch, Combine combine) {
  for (int offset = 16; offset > 0; offset /= 2) value = combine(value, __shfl_down_sync(kFullMask, value, offset));
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = value;
  __syncthreads();
  T result = scratch[0];
  for (int w = 1; w < kWarps; ++w) result = combine(result, scratch[w]);
  __syncthreads();
  return result;
}

struct Add {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};

struct Max {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

__device__ __forceinline__ bool real_key(const bool* key_mask, int64_t b, int64_t t, int64_t seq_len) {
  return key_mask == nullptr || key_mask[b * seq_len + t];
}

// ---------------------------------------------------------------------------------------------
// Softmax of a chunk of rows. logits: (batch * kv_heads, chunk_rows, seq_len) float32 raw dot
// products; a row's logit of key t is logits[...][t] * scaling.

__global__ void row_stats_kernel(const float* __restrict__ logits, const bool* __restrict__ key_mask, ScoringShape s,
                                 int64_t chunk_rows, float scaling, float* __restrict__ row_shift,
                                 float* __restrict__ row_inverse_sum) {
  __shared__ float scratch_max[kWarps];
  __shared__ double scratch_sum[kWarps];
  const int64_t row = blockIdx.x;  // (b * kv_heads + h) * chunk_rows + i
  const int64_t b = row / chunk_rows / s.kv_heads;
  const float* values = logits + row * s.seq_len;
  float local_max = -INFINITY;
  for (int64_t t = threadIdx.x; t < s.seq_len; t += kThreads) {
    if (real_key(key_mask, b, t, s.seq_len)) local_max = fmaxf(local_max, values[t] * scaling);
  }
  const float shift = softmax_shift(block_reduce(local_max, scratch_max, Max{}));
  double local_sum = 0.0;
  for (int64_t t = threadIdx.x; t < s.seq_len; t += kThreads) {
    if (real_key(key_mask, b, t, s.seq_len)) local_sum += static_cast<double>(expf(values[t] * scaling - shift));
  }
  const double sum = block_reduce(local_sum, scratch_sum, Add{});
  if (threadIdx.x == 0) {
    row_shift[row] = shift;
    row_inverse_sum[row] = softmax_inverse_sum(sum);
  }
}

__device__ __forceinline__ int64_t slot_of_row(int64_t row, int64_t per_group, int64_t n_groups) {
  const int64_t slot = row / per_group;
  return slot < n_groups ? slot : n_groups;
}

// grid: (batch * kv_heads, key tiles). Chunk row i is query row first_row + i of its head; query
// row n belongs to slot min(n / (r * g), G) (slot G: the anchor). sums: (batch * kv_heads, G + 1,
// seq_len) float32, added to in row order.
__global__ void row_mass_kernel(const float* __restrict__ logits, const bool* __restrict__ key_mask, ScoringShape s,
                                int64_t first_row, int64_t chunk_rows, float scaling, bool exclude_last_key,
                                const float* __restrict__ row_shift, const float* __restrict__ row_inverse_sum,
                                float* __restrict__ sums) {
  const int64_t head = blockIdx.x;  // b * kv_heads + h
  const int64_t t = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  // Zeroing the last key after the softmax, without renormalising, is leaving it out of the mass.
  if (t >= s.seq_len || !real_key(key_mask, head / s.kv_heads, t, s.seq_len)) return;
  if (exclude_last_key && t == s.seq_len - 1) return;
  const int64_t per_group = s.heads_per_kv * s.group_size;
  const float* values = logits + head * chunk_rows * s.seq_len + t;
  const float* shift = row_shift + head * chunk_rows;
  const float* inverse_sum = row_inverse_sum + head * chunk_rows;
  float* head_sums = sums + head * (s.n_groups + 1) * s.seq_len + t;
  int64_t slot = slot_of_row(first_row, per_group, s.n_groups);
  float mass = 0.0f;
  for (int64_t i = 0; i < chunk_rows; ++i) {
    const int64_t row_slot = slot_of_row(first_row + i, per_group, s.n_groups);
    if (row_slot != slot) {
      head_sums[slot * s.seq_len] += mass;
      slot = row_slot;
      mass = 0.0f;
    }
    mass += expf(values[i * s.seq_len] * scaling - shift[i]) * inverse_sum[i];
  }
  head_sums[slot * s.seq_len] += mass;
}

// grid: batch * kv_heads * n_groups. Turns the group's probability sums into vote masses in place,
// then marks its voted tokens.
__global__ void vote_kernel(float* __restrict__ sums, uint8_t* __restrict__ voted, ScoringShape s, double tau,
                            Coverage coverage, bool anchor_in_groups) {
  __shared__ double scratch_sum[kWarps];
  __shared__ float scratch_max[kWarps];
  __shared__ long long scratch_count[kWarps];
  __shared__ int warp_equal[kWarps];
  const int64_t G = s.n_groups;
  const int64_t T = s.seq_len;
  const int64_t head = blockIdx.x / G;
  const int64_t j = blockIdx.x % G;
  float* mass = sums + (head * (G + 1) + j) * T;
  const float* anchor_sum = sums + (head * (G + 1) + G) * T;

  double local_sum = 0.0;
  float local_max = 0.0f;
  for (int64_t t = threadIdx.x; t < T; t += kThreads) {
    const float m = vote_mass(mass[t], anchor_sum[t], s.heads_per_kv, s.group_size, anchor_in_groups);
    mass[t] = m;
    local_sum += static_cast<double>(m);
    local_max = fmaxf(local_max, m);
  }
  const double total = block_reduce(local_sum, scratch_sum, Add{});
  const float max_mass = block_reduce(local_max, scratch_max, Max{});

  auto sum_below = [&](uint32_t bits) {
    const float bound = bits_to_mass(bits);
    double partial = 0.0;
    for (int64_t t = threadIdx.x; t < T; t += kThreads) partial += mass[t] < bound ? static_cast<double>(mass[t]) : 0.0;
    return block_reduce(partial, scratch_sum, Add{});
  };
  auto count_equal = [&](float value) {
    long long partial = 0;
    for (int64_t t = threadIdx.x; t < T; t += kThreads) partial += mass[t] == value;
    return static_cast<int64_t>(block_reduce(partial, scratch_count, Add{}));
  };
  const VoteCut cut = coverage_cut(total, max_mass, tau, coverage, sum_below, count_equal);

  uint8_t* out = voted + blockIdx.x * T;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  int64_t equal_before = 0;  // tokens on the cut in earlier tiles
  for (int64_t t0 = 0; t0 < T; t0 += kThreads) {
    const int64_t t = t0 + threadIdx.x;
    const float m = t < T ? mass[t] : 0.0f;
    const bool equal = t < T && on_cut(m, cut);
    const unsigned ballot = __ballot_sync(kFullMask, equal);
    if (lane == 0) warp_equal[warp] = __popc(ballot);
    __syncthreads();
    int64_t rank = equal_before + __popc(ballot & ((1u << lane) - 1u));
    int64_t tile_equal = 0;
    for (int w = 0; w < kWarps; ++w) {
      if (w < warp) rank += warp_equal[w];
      tile_equal += warp_equal[w];
    }
    __syncthreads();
    equal_before += tile_equal;
    if (t < T) out[t] = above_cut(m, cut) || (equal && rank < cut.equal_quota);
  }
}

__global__ void score_kernel(const float* __restrict__ sums, const uint8_t* __restrict__ voted,
                             const bool* __restrict__ key_mask, ScoringShape s, double anchor_weight,
                             float* __restrict__ scores) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t T = s.seq_len;
  const int64_t G = s.n_groups;
  if (index >= s.batch * s.kv_heads * T) return;
  const int64_t head = index / T;
  const int64_t t = index % T;
  int64_t votes = 0;
  for (int64_t j = 0; j < G; ++j) votes += voted[(head * G + j) * T + t];
  const double anchor = anchor_attention(sums[(head * (G + 1) + G) * T + t], s.heads_per_kv);
  scores[index] = shiftkv_score(votes, anchor, anchor_weight, real_key(key_mask, head / s.kv_heads, t, T));
}

at::Tensor shiftkv_scores_cuda(const at::Tensor& proxies, const at::Tensor& keys, const at::Tensor& last_query,
                               const std::optional<at::Tensor>& key_mask, int64_t n_groups, double tau,
                               double scaling, double anchor_weight, bool anchor_in_groups,
                               std::string_view coverage_name, bool exclude_last_key) {
  const ScoringShape s = check_scoring_inputs(proxies, keys, last_query, key_mask, n_groups, tau, scaling,
                                              anchor_weight);
  const Coverage coverage = parse_coverage(coverage_name);
  const int64_t key_tiles = (s.seq_len + kThreads - 1) / kThreads;
  TORCH_CHECK(key_tiles <= 65535, "shiftkv_scores (CUDA): seq_len ", s.seq_len, " is too long (at most ",
              int64_t{65535} * kThreads, ")");
  const c10::cuda::CUDAGuard guard(proxies.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t heads = s.batch * s.kv_heads;
  const int64_t r = s.heads_per_kv;
  const int64_t G = s.n_groups;
  const int64_t T = s.seq_len;
  const float scale = static_cast<float>(scaling);

  // Query rows per head: group j's r*g proxies (query head-major), then the r last queries.
  const at::Tensor grouped = proxies.reshape({s.batch, s.kv_heads, r, G, s.group_size, s.head_dim}).transpose(2, 3);
  const at::Tensor rows = at::cat({grouped.reshape({heads, G * r * s.group_size, s.head_dim}),
                                   last_query.reshape({heads, r, s.head_dim})},
                                  1);
  const at::Tensor keys_t = keys.reshape({heads, T, s.head_dim}).transpose(1, 2);
  const at::Tensor mask = key_mask.has_value() ? key_mask->contiguous() : at::Tensor();
  const bool* mask_data = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  const auto f32 = proxies.options().dtype(at::kFloat);
  const int64_t n_rows = rows.size(1);
  const int64_t chunk_rows = std::min(n_rows, std::max(G, kLogitElements / (heads * T)));
  at::Tensor logit_buffer = at::empty({heads * chunk_rows * T}, f32);
  at::Tensor row_shift = at::empty({heads * chunk_rows}, f32);
  at::Tensor row_inverse_sum = at::empty({heads * chunk_rows}, f32);
  at::Tensor sums = at::zeros({heads, G + 1, T}, f32);
  at::Tensor voted = at::empty({heads, G, T}, proxies.options().dtype(at::kByte));
  at::Tensor scores = at::empty({s.batch, s.kv_heads, T}, f32);

  for (int64_t first = 0; first < n_rows; first += chunk_rows) {
    const int64_t len = std::min(chunk_rows, n_rows - first);
    // (heads, len, T), contiguous also for a short last chunk, as the kernels index it.
    at::Tensor chunk = logit_buffer.narrow(0, 0, heads * len * T).view({heads, len, T});
    if (proxies.scalar_type() == at::kFloat) {
      at::bmm_out(chunk, rows.narrow(1, first, len), keys_t);
    } else {
      at::bmm_out(chunk, rows.narrow(1, first, len), keys_t, at::kFloat);
    }
    row_stats_kernel<<<static_cast<unsigned>(heads * len), kThreads, 0, stream>>>(
        chunk.data_ptr<float>(), mask_data, s, len, scale, row_shift.data_ptr<float>(),
        row_inverse_sum.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const dim3 grid(static_cast<unsigned>(heads), static_cast<unsigned>(key_tiles));
    row_mass_kernel<<<grid, kThreads, 0, stream>>>(chunk.data_ptr<float>(), mask_data, s, first, len, scale,
                                                   exclude_last_key, row_shift.data_ptr<float>(),
                                                   row_inverse_sum.data_ptr<float>(), sums.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  vote_kernel<<<static_cast<unsigned>(heads * G), kThreads, 0, stream>>>(
      sums.data_ptr<float>(), voted.data_ptr<uint8_t>(), s, tau, coverage, anchor_in_groups);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t n_scores = heads * T;
  score_kernel<<<static_cast<unsigned>((n_scores + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      sums.data_ptr<float>(), voted.data_ptr<uint8_t>(), mask_data, s, anchor_weight, scores.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return scores;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmshiftkv, CUDA, m) { m.impl("shiftkv_scores", &shiftkv_scores_cuda); }

}  // namespace mmshiftkv
