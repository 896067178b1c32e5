// CUDA driver of mmshiftkv::shiftkv_scores.
//
// 1. row_stats_kernel, one block per query row (every proxy and every last query of every query
//    head): an online softmax over the keys gives the row's shift (max) and 1 / sum.
// 2. group_mass_kernel, one block per (batch, KV head, group or anchor, tile of 256 keys), one
//    thread per key: recomputes the logits of the group's r*g rows for its key, in chunks of rows
//    staged in shared memory, and sums their probabilities. Nothing of size n_proxies x seq_len
//    is stored: the extra memory is the (G + 1) x seq_len float64 sums per KV head, G x seq_len vote
//    bytes, and two doubles per query row.
// 3. vote_kernel, one block per (batch, KV head, group): the tau-coverage cut by threshold search
//    (shiftkv_vote.h), then the votes, ties in index order.
// 4. score_kernel: votes + lambda * anchor.
//
// All arithmetic that decides votes is float64 and every reduction has a fixed order, so results
// are deterministic and match the CPU kernel and the torch reference up to float64 rounding.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "shiftkv_checks.h"
#include "shiftkv_vote.h"

namespace mmshiftkv {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowChunk = 16;  // query rows staged in shared memory at a time (group_mass_kernel)
constexpr int kDimChunk = 32;  // key elements held in registers at a time (group_mass_kernel)
constexpr int64_t kMaxHeadDim = 256;  // keeps kRowChunk rows of float64 within 48 KiB of shared memory
constexpr unsigned kFullMask = 0xffffffffu;

template <typename scalar_t>
__device__ __forceinline__ double to_double(scalar_t value) {
  return static_cast<double>(static_cast<float>(value));
}

// ---------------------------------------------------------------------------------------------
// Fixed-order block reductions: each returns the same value to every thread, whatever the timing.

__device__ __forceinline__ double block_sum(double value, double* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(kFullMask, value, offset);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = value;
  __syncthreads();
  double total = 0.0;
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  __syncthreads();
  return total;
}

__device__ __forceinline__ double block_max(double value, double* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) value = fmax(value, __shfl_down_sync(kFullMask, value, offset));
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = value;
  __syncthreads();
  double result = scratch[0];
  for (int w = 1; w < kWarps; ++w) result = fmax(result, scratch[w]);
  __syncthreads();
  return result;
}

__device__ __forceinline__ long long block_count(long long value, long long* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(kFullMask, value, offset);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = value;
  __syncthreads();
  long long total = 0;
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  __syncthreads();
  return total;
}

// Softmax statistics of part of a row: its max and the sum of exp(logit - max).
struct SoftmaxStats {
  double max;
  double sum;
};

__device__ __forceinline__ SoftmaxStats merge_stats(SoftmaxStats a, SoftmaxStats b) {
  if (b.max == -INFINITY) return a;
  if (a.max == -INFINITY) return b;
  const double max = fmax(a.max, b.max);
  return {max, a.sum * exp(a.max - max) + b.sum * exp(b.max - max)};
}

// ---------------------------------------------------------------------------------------------
// Row index of query row (b, q_head, n): n < n_proxies is a proxy, n == n_proxies the last query.

template <typename scalar_t>
__device__ __forceinline__ const scalar_t* query_row(const scalar_t* proxies, const scalar_t* last_query, int64_t b,
                                                     int64_t q_head, int64_t n, const ScoringShape& s) {
  if (n < s.n_proxies) return proxies + ((b * s.q_heads + q_head) * s.n_proxies + n) * s.head_dim;
  return last_query + (b * s.q_heads + q_head) * s.head_dim;
}

__device__ __forceinline__ int64_t stats_index(int64_t b, int64_t q_head, int64_t n, const ScoringShape& s) {
  return (b * s.q_heads + q_head) * (s.n_proxies + 1) + n;
}

template <typename scalar_t>
__global__ void row_stats_kernel(const scalar_t* __restrict__ proxies, const scalar_t* __restrict__ last_query,
                                 const scalar_t* __restrict__ keys, const bool* __restrict__ key_mask,
                                 ScoringShape s, double scaling, double* __restrict__ row_shift,
                                 double* __restrict__ row_inverse_sum) {
  extern __shared__ double query[];  // head_dim
  __shared__ double scratch_max[kWarps];
  __shared__ double scratch_sum[kWarps];
  const int64_t row = blockIdx.x;
  const int64_t per_batch = s.q_heads * (s.n_proxies + 1);
  const int64_t b = row / per_batch;
  const int64_t q_head = (row % per_batch) / (s.n_proxies + 1);
  const int64_t n = row % (s.n_proxies + 1);
  const int64_t h = q_head / s.heads_per_kv;
  const scalar_t* src = query_row(proxies, last_query, b, q_head, n, s);
  for (int64_t c = threadIdx.x; c < s.head_dim; c += kThreads) query[c] = to_double(src[c]);
  __syncthreads();

  const scalar_t* head_keys = keys + (b * s.kv_heads + h) * s.seq_len * s.head_dim;
  SoftmaxStats stats{-INFINITY, 0.0};
  for (int64_t t = threadIdx.x; t < s.seq_len; t += kThreads) {
    if (key_mask != nullptr && !key_mask[b * s.seq_len + t]) continue;
    const scalar_t* key = head_keys + t * s.head_dim;
    double dot = 0.0;
    for (int64_t c = 0; c < s.head_dim; ++c) dot += query[c] * to_double(key[c]);
    stats = merge_stats(stats, {dot * scaling, 1.0});
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    const SoftmaxStats other{__shfl_down_sync(kFullMask, stats.max, offset),
                             __shfl_down_sync(kFullMask, stats.sum, offset)};
    stats = merge_stats(stats, other);
  }
  if (threadIdx.x % 32 == 0) {
    scratch_max[threadIdx.x / 32] = stats.max;
    scratch_sum[threadIdx.x / 32] = stats.sum;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    SoftmaxStats total{scratch_max[0], scratch_sum[0]};
    for (int w = 1; w < kWarps; ++w) total = merge_stats(total, {scratch_max[w], scratch_sum[w]});
    const int64_t index = stats_index(b, q_head, n, s);
    row_shift[index] = softmax_shift(total.max);
    row_inverse_sum[index] = softmax_inverse_sum(total.sum);
  }
}

// grid: (batch * kv_heads * (n_groups + 1), key tiles); slot n_groups is the anchor (last queries).
template <typename scalar_t>
__global__ void group_mass_kernel(const scalar_t* __restrict__ proxies, const scalar_t* __restrict__ last_query,
                                  const scalar_t* __restrict__ keys, const bool* __restrict__ key_mask,
                                  ScoringShape s, double scaling, bool exclude_last_key,
                                  const double* __restrict__ row_shift, const double* __restrict__ row_inverse_sum,
                                  double* __restrict__ sums) {
  extern __shared__ double rows[];  // kRowChunk x head_dim, then kRowChunk shifts and inverse sums
  double* shift = rows + kRowChunk * s.head_dim;
  double* inverse_sum = shift + kRowChunk;
  const int64_t G = s.n_groups;
  const int64_t slot = blockIdx.x % (G + 1);
  const int64_t head = blockIdx.x / (G + 1);  // b * kv_heads + h
  const int64_t b = head / s.kv_heads;
  const int64_t h = head % s.kv_heads;
  const int64_t t = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  const bool active = t < s.seq_len && (key_mask == nullptr || key_mask[b * s.seq_len + t]);
  const scalar_t* key = keys + (head * s.seq_len + (t < s.seq_len ? t : 0)) * s.head_dim;
  const int64_t n_rows = slot < G ? s.heads_per_kv * s.group_size : s.heads_per_kv;

  double mass = 0.0;
  for (int64_t r0 = 0; r0 < n_rows; r0 += kRowChunk) {
    const int len = static_cast<int>(n_rows - r0 < kRowChunk ? n_rows - r0 : kRowChunk);
    __syncthreads();
    for (int64_t e = threadIdx.x; e < len * s.head_dim; e += kThreads) {
      const int64_t rho = r0 + e / s.head_dim;
      const int64_t q_head = h * s.heads_per_kv + (slot < G ? rho / s.group_size : rho);
      const int64_t n = slot < G ? slot * s.group_size + rho % s.group_size : s.n_proxies;
      rows[e] = to_double(query_row(proxies, last_query, b, q_head, n, s)[e % s.head_dim]);
      if (e % s.head_dim == 0) {
        const int64_t index = stats_index(b, q_head, n, s);
        shift[e / s.head_dim] = row_shift[index];
        inverse_sum[e / s.head_dim] = row_inverse_sum[index];
      }
    }
    __syncthreads();
    if (!active) continue;
    double dot[kRowChunk];
#pragma unroll
    for (int i = 0; i < kRowChunk; ++i) dot[i] = 0.0;
    for (int64_t c0 = 0; c0 < s.head_dim; c0 += kDimChunk) {
      double key_part[kDimChunk];
#pragma unroll
      for (int c = 0; c < kDimChunk; ++c) key_part[c] = c0 + c < s.head_dim ? to_double(key[c0 + c]) : 0.0;
#pragma unroll
      for (int i = 0; i < kRowChunk; ++i) {
        if (i >= len) break;
        const double* row = rows + i * s.head_dim + c0;
#pragma unroll
        for (int c = 0; c < kDimChunk; ++c) {
          if (c0 + c < s.head_dim) dot[i] += row[c] * key_part[c];
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kRowChunk; ++i) {
      if (i < len) mass += exp(dot[i] * scaling - shift[i]) * inverse_sum[i];
    }
  }
  if (t < s.seq_len) {
    // Zeroing the last key after the softmax, without renormalising, is leaving it out of the mass.
    const bool excluded = exclude_last_key && t == s.seq_len - 1;
    sums[(head * (G + 1) + slot) * s.seq_len + t] = excluded ? 0.0 : mass;
  }
}

// grid: batch * kv_heads * n_groups. Turns the group's probability sums into vote masses in place,
// then marks its voted tokens.
__global__ void vote_kernel(double* __restrict__ sums, uint8_t* __restrict__ voted, ScoringShape s, double tau,
                            Coverage coverage, bool anchor_in_groups) {
  __shared__ double scratch[kWarps];
  __shared__ long long scratch_count[kWarps];
  __shared__ int warp_equal[kWarps];
  const int64_t G = s.n_groups;
  const int64_t T = s.seq_len;
  const int64_t head = blockIdx.x / G;
  const int64_t j = blockIdx.x % G;
  double* mass = sums + (head * (G + 1) + j) * T;
  const double* anchor_sum = sums + (head * (G + 1) + G) * T;

  double local_sum = 0.0;
  double local_max = 0.0;
  for (int64_t t = threadIdx.x; t < T; t += kThreads) {
    const double m = vote_mass(mass[t], anchor_sum[t], s.heads_per_kv, s.group_size, anchor_in_groups);
    mass[t] = m;
    local_sum += m;
    local_max = fmax(local_max, m);
  }
  const double total = block_sum(local_sum, scratch);
  const double max_mass = block_max(local_max, scratch);

  auto sum_below = [&](uint64_t bits) {
    const double bound = bits_to_mass(bits);
    double partial = 0.0;
    for (int64_t t = threadIdx.x; t < T; t += kThreads) partial += mass[t] < bound ? mass[t] : 0.0;
    return block_sum(partial, scratch);
  };
  auto count_equal = [&](double value) {
    long long partial = 0;
    for (int64_t t = threadIdx.x; t < T; t += kThreads) partial += mass[t] == value;
    return static_cast<int64_t>(block_count(partial, scratch_count));
  };
  const VoteCut cut = coverage_cut(total, max_mass, tau, coverage, sum_below, count_equal);

  uint8_t* out = voted + blockIdx.x * T;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  int64_t equal_before = 0;  // tokens on the cut in earlier tiles
  for (int64_t t0 = 0; t0 < T; t0 += kThreads) {
    const int64_t t = t0 + threadIdx.x;
    const double m = t < T ? mass[t] : 0.0;
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

__global__ void score_kernel(const double* __restrict__ sums, const uint8_t* __restrict__ voted,
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
  const bool real = key_mask == nullptr || key_mask[(head / s.kv_heads) * T + t];
  scores[index] = shiftkv_score(votes, anchor, anchor_weight, real);
}

at::Tensor shiftkv_scores_cuda(const at::Tensor& proxies, const at::Tensor& keys, const at::Tensor& last_query,
                               const std::optional<at::Tensor>& key_mask, int64_t n_groups, double tau,
                               double scaling, double anchor_weight, bool anchor_in_groups,
                               std::string_view coverage_name, bool exclude_last_key) {
  const ScoringShape s = check_scoring_inputs(proxies, keys, last_query, key_mask, n_groups, tau, scaling,
                                              anchor_weight);
  const Coverage coverage = parse_coverage(coverage_name);
  TORCH_CHECK(s.head_dim <= kMaxHeadDim, "shiftkv_scores (CUDA): head_dim must be at most ", kMaxHeadDim, ", got ",
              s.head_dim);
  const int64_t key_tiles = (s.seq_len + kThreads - 1) / kThreads;
  TORCH_CHECK(key_tiles <= 65535, "shiftkv_scores (CUDA): seq_len ", s.seq_len, " is too long (at most ",
              int64_t{65535} * kThreads, ")");
  const c10::cuda::CUDAGuard guard(proxies.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const at::Tensor p = proxies.contiguous();
  const at::Tensor k = keys.contiguous();
  const at::Tensor q = last_query.contiguous();
  const at::Tensor mask = key_mask.has_value() ? key_mask->contiguous() : at::Tensor();
  const bool* mask_data = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  const auto f64 = proxies.options().dtype(at::kDouble);
  const int64_t n_query_rows = s.batch * s.q_heads * (s.n_proxies + 1);
  at::Tensor row_shift = at::empty({n_query_rows}, f64);
  at::Tensor row_inverse_sum = at::empty({n_query_rows}, f64);
  at::Tensor sums = at::empty({s.batch, s.kv_heads, s.n_groups + 1, s.seq_len}, f64);
  at::Tensor voted = at::empty({s.batch, s.kv_heads, s.n_groups, s.seq_len}, proxies.options().dtype(at::kByte));
  at::Tensor scores = at::empty({s.batch, s.kv_heads, s.seq_len}, proxies.options().dtype(at::kFloat));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "shiftkv_scores_cuda", [&] {
    const size_t stats_smem = static_cast<size_t>(s.head_dim) * sizeof(double);
    row_stats_kernel<scalar_t><<<static_cast<unsigned>(n_query_rows), kThreads, stats_smem, stream>>>(
        p.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), mask_data, s, scaling,
        row_shift.data_ptr<double>(), row_inverse_sum.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const size_t mass_smem = static_cast<size_t>(kRowChunk) * (s.head_dim + 2) * sizeof(double);
    const dim3 grid(static_cast<unsigned>(s.batch * s.kv_heads * (s.n_groups + 1)), static_cast<unsigned>(key_tiles));
    group_mass_kernel<scalar_t><<<grid, kThreads, mass_smem, stream>>>(
        p.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), mask_data, s, scaling,
        exclude_last_key, row_shift.data_ptr<double>(), row_inverse_sum.data_ptr<double>(), sums.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  vote_kernel<<<static_cast<unsigned>(s.batch * s.kv_heads * s.n_groups), kThreads, 0, stream>>>(
      sums.data_ptr<double>(), voted.data_ptr<uint8_t>(), s, tau, coverage, anchor_in_groups);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t n_scores = s.batch * s.kv_heads * s.seq_len;
  score_kernel<<<static_cast<unsigned>((n_scores + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      sums.data_ptr<double>(), voted.data_ptr<uint8_t>(), mask_data, s, anchor_weight, scores.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return scores;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmshiftkv, CUDA, m) { m.impl("shiftkv_scores", &shiftkv_scores_cuda); }

}  // namespace mmshiftkv
