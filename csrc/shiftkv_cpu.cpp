// CPU driver of mmshiftkv::shiftkv_scores.
//
// Stage 1, per (batch, KV head): the query rows (every group's r*g proxy rows in group order, then
// the r anchor rows) and the keys are converted once to the logits GEMM's type: bfloat16 where the
// inputs are bfloat16 and the CPU has AMX tiles (through ATen's oneDNN brgemm) or native bfloat16
// dot products (AVX512-BF16), float32 otherwise
// (bfloat16 and float16 products are exact in float32, so both GEMMs accumulate the same exact
// products in float32). The keys are packed into panels, then at::parallel_for runs the per-ISA
// kernels (shiftkv_cpu_kernels.h) over blocks of whole groups, the anchor rows being one more block:
// logits, softmax and the group's probability sums, in row blocks whose logits stay in the L2 cache.
// Nothing of size n_proxies x seq_len is ever held: the extra memory is the (G + 1) x seq_len float32
// sums and G x seq_len vote bytes per KV head, one head's converted rows and packed keys, and one
// block of logits per thread (about kBlockFloats floats).
// Stage 2, per (batch, KV head, group): the tau-coverage cut by threshold search (shiftkv_vote.h).
// Stage 3: votes + lambda * anchor.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "shiftkv_checks.h"
#include "shiftkv_cpu_kernels.h"
#include "shiftkv_vote.h"

namespace mmshiftkv {
namespace {

constexpr int64_t kBlockFloats = int64_t{1} << 17;  // 512 KiB of float32 logits per row block
constexpr int64_t kMaxBlockRows = 192;  // a multiple of every kernel's micro-tile rows and of kTileRows
constexpr int64_t kPackGrain = 16;  // panels per packing task
constexpr int64_t kMomentShiftRows = 64;   // rows whose mean is the statistics' shift
constexpr int64_t kMomentChunkRows = 256;  // rows per chunk of partial sums, at least
constexpr int64_t kMaxMomentChunks = 64;
constexpr int64_t kProductGrainRows = 64;  // weight rows per task of weight_products
constexpr int64_t kRotateGrainRows = 256;  // rows per task of rotate_half

// The kernels for ATen's CPU capability (at::get_cpu_capability() honours ATEN_CPU_CAPABILITY).
const cpu::Kernels& cpu_kernels() {
  static const cpu::Kernels& kernels = []() -> const cpu::Kernels& {
    const std::string capability = at::get_cpu_capability();
#if defined(MMSHIFTKV_CPU_AVX512)
    if (capability == "AVX512") return cpu::kernels_AVX512();
#endif
#if defined(MMSHIFTKV_CPU_AVX2)
    if (capability == "AVX512" || capability == "AVX2") return cpu::kernels_AVX2();
#endif
    return cpu::kernels_DEFAULT();
  }();
  return kernels;
}

// Asked at every call: ATen's brgemm runs AMX tiles only while oneDNN is enabled
// (torch.backends.mkldnn) and its effective ISA (ONEDNN_MAX_CPU_ISA) includes AMX.
cpu::LogitType logit_type(const cpu::Kernels& kernels, at::ScalarType dtype) {
  if (dtype != at::kBFloat16) return cpu::LogitType::kFloat;
  if (kernels.has_bf16_tiles && at::native::cpublas::could_pack(at::kBFloat16)) return cpu::LogitType::kBFloat16Tiles;
  return kernels.has_bf16_gemm ? cpu::LogitType::kBFloat16 : cpu::LogitType::kFloat;
}

std::string kernel_name(at::ScalarType dtype) {
  const cpu::Kernels& kernels = cpu_kernels();
  switch (logit_type(kernels, dtype)) {
    case cpu::LogitType::kBFloat16Tiles:
      return std::string(kernels.isa) + "_amx_bf16";
    case cpu::LogitType::kBFloat16:
      return std::string(kernels.isa) + "_bf16";
    default:
      return kernels.isa;
  }
}

int64_t padded_length(const cpu::Kernels& kernels, int64_t seq_len) {
  return (seq_len + kernels.panel_keys - 1) / kernels.panel_keys * kernels.panel_keys;
}

// Rows per block: a multiple of the micro-tile's rows (AMX: of a tile's) whose logits fit in about
// kBlockFloats floats, at least one micro-tile (tile). It depends on the shapes only, not on the thread count.
int64_t block_rows(const cpu::Kernels& kernels, cpu::LogitType type, int64_t padded_len) {
  const int64_t unit = type == cpu::LogitType::kBFloat16Tiles ? cpu::kTileRows : kernels.micro_rows;
  const int64_t rows = kBlockFloats / padded_len / unit * unit;
  return std::clamp(rows, unit, kMaxBlockRows);
}

// (padded_len) float32: 0 for a real key, -inf for a padding key and past seq_len.
at::Tensor key_bias(const bool* real_key, int64_t seq_len, int64_t padded_len) {
  at::Tensor bias = at::full({padded_len}, -std::numeric_limits<float>::infinity(), at::kFloat);
  float* data = bias.data_ptr<float>();
  for (int64_t t = 0; t < seq_len; ++t) {
    if (real_key == nullptr || real_key[t]) data[t] = 0.0f;
  }
  return bias;
}

// The addresses of one KV head's query rows for the GEMM: the rows of each part ((..., head_dim), any
// scoring dtype; rows in the row-major order of its leading dimensions) one after the other. Parts
// already in the GEMM's type with contiguous rows (bfloat16: whole, 4-byte aligned pairs) are read
// in place; the others are copied and converted once into a buffer (bfloat16 rows padded to whole
// pairs with a zero element). AMX tiles read every row from one buffer.
struct GemmRows {
  at::Tensor buffer;    // converted rows, where a part needed them
  std::vector<const void*> addresses;  // of each row
  int64_t depth;        // elements per row the GEMM reads
};

bool readable_in_place(const at::Tensor& part, at::ScalarType type) {
  if (part.scalar_type() != type || part.stride(-1) != 1) return false;
  if (type == at::kFloat) return true;
  // bfloat16 pairs: an even head_dim, even row strides and an even element offset from 4-byte alignment.
  bool even = part.size(-1) % 2 == 0 && reinterpret_cast<uintptr_t>(part.data_ptr()) % 4 == 0;
  for (int64_t d = 0; d + 1 < part.dim(); ++d) even = even && (part.stride(d) % 2 == 0 || part.size(d) == 1);
  return even;
}

// Appends the address of every row of part (its leading dimensions in row-major order).
void append_row_addresses(const at::Tensor& part, int64_t element_size, std::vector<const void*>& out) {
  const int64_t dims = part.dim() - 1;
  const int64_t count = part.numel() / part.size(-1);
  std::vector<int64_t> index(dims, 0);
  const char* base = static_cast<const char*>(part.data_ptr());
  int64_t offset = 0;  // elements
  for (int64_t row = 0; row < count; ++row) {
    out.push_back(base + offset * element_size);
    for (int64_t d = dims - 1; d >= 0; --d) {  // odometer over the leading dimensions
      offset += part.stride(d);
      if (++index[d] < part.size(d)) break;
      offset -= part.stride(d) * part.size(d);
      index[d] = 0;
    }
  }
}

GemmRows gemm_rows(cpu::LogitType type, std::initializer_list<at::Tensor> parts, int64_t head_dim) {
  const bool bf16 = type != cpu::LogitType::kFloat;
  const at::ScalarType dtype = bf16 ? at::kBFloat16 : at::kFloat;
  const int64_t element_size = bf16 ? 2 : 4;
  GemmRows rows;
  bool in_place = type != cpu::LogitType::kBFloat16Tiles;
  int64_t n_rows = 0;
  for (const at::Tensor& part : parts) {
    in_place = in_place && readable_in_place(part, dtype);
    n_rows += part.numel() / head_dim;
  }
  rows.depth = bf16 ? head_dim + head_dim % 2 : head_dim;
  rows.addresses.reserve(n_rows);
  if (in_place) {
    for (const at::Tensor& part : parts) append_row_addresses(part, element_size, rows.addresses);
    return rows;
  }
  rows.buffer = at::empty({n_rows, rows.depth}, parts.begin()->options().dtype(dtype));
  if (rows.depth > head_dim) rows.buffer.select(1, head_dim).zero_();
  int64_t first = 0;
  for (const at::Tensor& part : parts) {
    const int64_t count = part.numel() / head_dim;
    rows.buffer.narrow(0, first, count).narrow(1, 0, head_dim).view(part.sizes()).copy_(part);
    first += count;
  }
  append_row_addresses(rows.buffer, element_size, rows.addresses);
  return rows;
}

// One KV head's rows and keys in the GEMM's type, the keys packed; holds the tensors the view uses.
struct PreparedHead {
  GemmRows rows;
  at::Tensor packed_keys;
  cpu::HeadLogits logits;
};

// rows: from gemm_rows; keys: (seq_len, head_dim), any scoring dtype; bias from key_bias.
PreparedHead prepare_head(const cpu::Kernels& kernels, cpu::LogitType type, GemmRows rows, const at::Tensor& keys,
                          const at::Tensor& bias, double scaling) {
  const int64_t seq_len = keys.size(0);
  const int64_t head_dim = keys.size(1);
  const int64_t padded_len = bias.size(0);
  const int64_t depth = rows.depth;
  PreparedHead head;
  head.rows = std::move(rows);
  // pack_keys reads rows of contiguous elements, any row stride.
  const bool bf16 = type != cpu::LogitType::kFloat;
  const at::ScalarType key_type = bf16 ? at::kBFloat16 : at::kFloat;
  const at::Tensor converted_keys =
      keys.scalar_type() == key_type && keys.stride(1) == 1 ? keys : keys.to(key_type).contiguous();
  const int64_t key_stride = converted_keys.stride(0);
  if (bf16) {
    head.packed_keys = at::empty({padded_len * depth / 2}, keys.options().dtype(at::kInt));
  } else {
    head.packed_keys = at::empty({padded_len * depth}, keys.options().dtype(at::kFloat));
  }
  const void* key_data = converted_keys.data_ptr();
  void* packed = head.packed_keys.data_ptr();
  at::parallel_for(0, padded_len / kernels.panel_keys, kPackGrain, [&](int64_t begin, int64_t end) {
    kernels.pack_keys(type, key_data, key_stride, seq_len, head_dim, begin, end, packed);
  });
  head.logits = {type,    head.rows.addresses.data(), depth, packed, bias.data_ptr<float>(),
                 seq_len, padded_len,                static_cast<float>(scaling)};
  return head;
}

at::Tensor workspace(const cpu::Kernels& kernels, int64_t rows, int64_t padded_len) {
  return at::empty({rows * (padded_len + kernels.workspace_floats_per_row)}, at::kFloat);
}

// Stage 1 for one (batch, KV head). The proxy rows are cut into blocks of whole groups (or one
// group in several row blocks), so no two threads add into one slot, and the cut does not depend on
// the thread count; the anchor's rows are the last block.
void head_probability_sums(const cpu::Kernels& kernels, const cpu::HeadLogits& head, const cpu::HeadSums& out,
                           int64_t n_rows) {
  const int64_t rows = block_rows(kernels, head.type, head.padded_len);
  const int64_t per_group = out.rows_per_group;
  const int64_t groups_per_block = std::max<int64_t>(1, rows / per_group);
  const int64_t group_blocks = (out.n_groups + groups_per_block - 1) / groups_per_block;
  at::parallel_for(0, group_blocks + 1, 1, [&](int64_t begin, int64_t end) {
    at::Tensor space = workspace(kernels, rows, head.padded_len);
    for (int64_t block = begin; block < end; ++block) {
      const int64_t first = std::min(out.n_groups, block * groups_per_block) * per_group;
      const int64_t last = block < group_blocks ? std::min(out.n_groups, (block + 1) * groups_per_block) * per_group
                                                : n_rows;
      kernels.accumulate_softmax(head, out, first, last, rows, space.data_ptr<float>());
    }
  });
}

VoteCut group_vote_cut(const cpu::Kernels& kernels, const float* mass, float max_mass, int64_t seq_len, double tau,
                       Coverage coverage) {
  auto sum_below = [&](uint32_t bits) { return kernels.sum_masses_below(mass, seq_len, bits_to_mass(bits)); };
  auto count_equal = [&](float value) { return static_cast<int64_t>(std::count(mass, mass + seq_len, value)); };
  const double total = kernels.sum_masses_below(mass, seq_len, std::numeric_limits<float>::infinity());
  return coverage_cut(total, max_mass, tau, coverage, sum_below, count_equal);
}

at::Tensor shiftkv_scores_cpu(const at::Tensor& proxies, const at::Tensor& keys, const at::Tensor& last_query,
                              const std::optional<at::Tensor>& key_mask, int64_t n_groups, double tau,
                              double scaling, double anchor_weight, bool anchor_in_groups,
                              std::string_view coverage_name, bool exclude_last_key) {
  const ScoringShape s = check_scoring_inputs(proxies, keys, last_query, key_mask, n_groups, tau, scaling,
                                              anchor_weight);
  const Coverage coverage = parse_coverage(coverage_name);
  const cpu::Kernels& kernels = cpu_kernels();
  const cpu::LogitType type = logit_type(kernels, proxies.scalar_type());
  const int64_t r = s.heads_per_kv;
  const int64_t g = s.group_size;
  const int64_t G = s.n_groups;
  const int64_t T = s.seq_len;
  const int64_t padded = padded_length(kernels, T);

  // Group j's rows are the contiguous r*g rows of grouped[b][h][j].
  const at::Tensor grouped = proxies.reshape({s.batch, s.kv_heads, r, G, g, s.head_dim}).transpose(2, 3);
  const at::Tensor last = last_query.reshape({s.batch, s.kv_heads, r, s.head_dim});
  const at::Tensor mask = key_mask.has_value() ? key_mask->contiguous() : at::Tensor();
  // Slot G of the second-to-last dimension holds the anchor's probability sums; rows padded_len apart.
  at::Tensor sums = at::zeros({s.batch, s.kv_heads, G + 1, padded}, proxies.options().dtype(at::kFloat));
  float* sums_data = sums.data_ptr<float>();

  for (int64_t b = 0; b < s.batch; ++b) {
    const at::Tensor bias = key_bias(mask.defined() ? mask.data_ptr<bool>() + b * T : nullptr, T, padded);
    for (int64_t h = 0; h < s.kv_heads; ++h) {
      const PreparedHead head = prepare_head(kernels, type, gemm_rows(type, {grouped[b][h], last[b][h]}, s.head_dim),
                                             keys[b][h], bias, scaling);
      const cpu::HeadSums out{r * g, G, exclude_last_key, sums_data + (b * s.kv_heads + h) * (G + 1) * padded};
      head_probability_sums(kernels, head.logits, out, static_cast<int64_t>(head.rows.addresses.size()));
    }
  }

  at::Tensor voted = at::zeros({s.batch, s.kv_heads, G, T}, proxies.options().dtype(at::kByte));
  uint8_t* voted_data = voted.data_ptr<uint8_t>();
  at::parallel_for(0, s.batch * s.kv_heads * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> mass(T);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t head = item / G;
      const int64_t j = item % G;
      const float* group_sum = sums_data + (head * (G + 1) + j) * padded;
      const float* anchor_sum = sums_data + (head * (G + 1) + G) * padded;
      const float max_mass = kernels.vote_masses(group_sum, anchor_sum, T, r, g, anchor_in_groups, mass.data());
      const VoteCut cut = group_vote_cut(kernels, mass.data(), max_mass, T, tau, coverage);
      uint8_t* out = voted_data + item * T;
      const float* masses = mass.data();
      for (int64_t t = 0; t < T; ++t) out[t] = above_cut(masses[t], cut);  // vectorised
      // Then the first equal_quota tokens on the cut, in index order.
      for (int64_t t = 0, taken = 0; t < T && taken < cut.equal_quota; ++t) {
        if (on_cut(masses[t], cut)) {
          out[t] = 1;
          ++taken;
        }
      }
    }
  });

  at::Tensor scores = at::empty({s.batch, s.kv_heads, T}, proxies.options().dtype(at::kFloat));
  float* scores_data = scores.data_ptr<float>();
  const bool* mask_data = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  at::parallel_for(0, s.batch * s.kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> votes(T);
    for (int64_t head = begin; head < end; ++head) {
      const int64_t b = head / s.kv_heads;
      std::fill(votes.begin(), votes.end(), 0);
      for (int64_t j = 0; j < G; ++j) {
        const uint8_t* group_votes = voted_data + (head * G + j) * T;
        for (int64_t t = 0; t < T; ++t) votes[t] += group_votes[t];
      }
      const float* anchor_sum = sums_data + (head * (G + 1) + G) * padded;
      for (int64_t t = 0; t < T; ++t) {
        const bool real = mask_data == nullptr || mask_data[b * T + t];
        scores_data[head * T + t] = shiftkv_score(votes[t], anchor_attention(anchor_sum[t], r), anchor_weight, real);
      }
    }
  });
  return scores;
}

// The logits GEMM of the op alone (same kernel, key packing, row blocks and epilogue), reduced to
// each row's maximum: for the logits-floor benchmark and for testing the GEMM's rounding.
at::Tensor shiftkv_logit_max_cpu(const at::Tensor& queries, const at::Tensor& keys, double scaling) {
  TORCH_CHECK(queries.dim() == 2 && keys.dim() == 2 && queries.size(1) == keys.size(1),
              "shiftkv_logit_max: queries (n_rows, head_dim) and keys (seq_len, head_dim) must share head_dim, got ",
              queries.sizes(), " and ", keys.sizes());
  TORCH_CHECK(queries.scalar_type() == keys.scalar_type() &&
                  (keys.scalar_type() == at::kFloat || keys.scalar_type() == at::kBFloat16 ||
                   keys.scalar_type() == at::kHalf),
              "shiftkv_logit_max: queries and keys must share one dtype of float16, bfloat16 or float32, got ",
              queries.scalar_type(), " and ", keys.scalar_type());
  TORCH_CHECK(queries.numel() > 0 && keys.numel() > 0, "shiftkv_logit_max: empty input, queries ", queries.sizes(),
              ", keys ", keys.sizes());
  const cpu::Kernels& kernels = cpu_kernels();
  const int64_t padded = padded_length(kernels, keys.size(0));
  const at::Tensor bias = key_bias(nullptr, keys.size(0), padded);
  const cpu::LogitType type = logit_type(kernels, keys.scalar_type());
  const PreparedHead head =
      prepare_head(kernels, type, gemm_rows(type, {queries}, queries.size(1)), keys, bias, scaling);
  at::Tensor maxima = at::empty({queries.size(0)}, queries.options().dtype(at::kFloat));
  const int64_t rows = block_rows(kernels, type, padded);
  at::parallel_for(0, queries.size(0), rows, [&](int64_t begin, int64_t end) {
    at::Tensor space = workspace(kernels, rows, padded);
    kernels.logit_max(head.logits, begin, end, rows, space.data_ptr<float>(), maxima.data_ptr<float>() + begin);
  });
  return maxima;
}

// The kernels' element type of a float32, bfloat16 or float16 tensor.
cpu::StateType state_type(at::ScalarType dtype) {
  return dtype == at::kFloat ? cpu::StateType::kFloat
         : dtype == at::kBFloat16 ? cpu::StateType::kBFloat16
                                  : cpu::StateType::kHalf;
}

// Mean and unbiased variance (float32) of (tokens, hidden) states: over every element, (1,) each, or
// per column, (hidden,) each. One pass summing float64 deviations from the first rows' mean, in
// fixed row chunks combined in order (the result does not depend on the thread count).
std::tuple<at::Tensor, at::Tensor> prompt_moments_cpu(const at::Tensor& states, bool per_feature) {
  TORCH_CHECK(states.dim() == 2 && states.size(0) > 0 && states.size(1) > 0,
              "prompt_moments: states must be a non-empty (tokens, hidden) matrix, got ", states.sizes());
  const auto dtype = states.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "prompt_moments: states must be float16, bfloat16 or float32, got ", dtype);
  const at::Tensor values = states.contiguous();
  const cpu::StateType type = state_type(dtype);
  const cpu::Kernels& kernels = cpu_kernels();
  const int64_t rows = values.size(0);
  const int64_t cols = values.size(1);
  const int64_t width = per_feature ? cols : 1;
  const void* data = values.data_ptr();

  // The shift: the mean of the first rows (per column, or over their elements).
  const int64_t shift_rows = std::min<int64_t>(rows, kMomentShiftRows);
  std::vector<double> zero(width, 0.0), shift(width, 0.0), unused(width, 0.0);
  kernels.shifted_moments(type, data, cols, 0, shift_rows, zero.data(), per_feature, shift.data(), unused.data());
  const double shift_count = static_cast<double>(per_feature ? shift_rows : shift_rows * cols);
  for (double& value : shift) value /= shift_count;

  const int64_t chunk = std::max(kMomentChunkRows, (rows + kMaxMomentChunks - 1) / kMaxMomentChunks);
  const int64_t n_chunks = (rows + chunk - 1) / chunk;
  std::vector<double> partial(2 * n_chunks * width, 0.0);
  at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double* sums = partial.data() + 2 * c * width;
      kernels.shifted_moments(type, data, cols, c * chunk, std::min(rows, (c + 1) * chunk), shift.data(),
                              per_feature, sums, sums + width);
    }
  });
  const double count = static_cast<double>(per_feature ? rows : rows * cols);
  at::Tensor mean = at::empty({width}, values.options().dtype(at::kFloat));
  at::Tensor variance = at::empty({width}, values.options().dtype(at::kFloat));
  for (int64_t w = 0; w < width; ++w) {
    double first = 0.0;
    double second = 0.0;
    for (int64_t c = 0; c < n_chunks; ++c) {
      first += partial[2 * c * width + w];
      second += partial[(2 * c + 1) * width + w];
    }
    mean.data_ptr<float>()[w] = static_cast<float>(shift[w] + first / count);
    const double spread = (second - first * first / count) / std::max(count - 1.0, 1.0);
    variance.data_ptr<float>()[w] = static_cast<float>(std::max(spread, 0.0));
  }
  return {mean, variance};
}

// (n_vectors, out) float32 products of an (out, in) weight with (n_vectors, in) vectors, each in a fixed
// summation order (cpu::Kernels::weight_products): the same bits at every call, whatever the thread
// count. One read of the weight for all vectors.
at::Tensor weight_products_cpu(const at::Tensor& weight, const at::Tensor& vectors) {
  TORCH_CHECK(weight.dim() == 2 && vectors.dim() == 2 && weight.size(1) == vectors.size(1),
              "weight_products: weight (out, in) and vectors (n, in) must share in, got ", weight.sizes(), " and ",
              vectors.sizes());
  const auto dtype = weight.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "weight_products: weight must be float16, bfloat16 or float32, got ", dtype);
  TORCH_CHECK(vectors.is_floating_point(), "weight_products: vectors must be floating point, got ",
              vectors.scalar_type());
  const at::Tensor values = weight.contiguous();
  const at::Tensor inputs = vectors.to(at::kFloat).contiguous();
  const cpu::StateType type = state_type(dtype);
  const cpu::Kernels& kernels = cpu_kernels();
  const int64_t rows = values.size(0);
  at::Tensor out = at::empty({inputs.size(0), rows}, values.options().dtype(at::kFloat));
  at::parallel_for(0, rows, kProductGrainRows, [&](int64_t begin, int64_t end) {
    kernels.weight_products(type, values.data_ptr(), values.size(1), begin, end, inputs.data_ptr<float>(),
                            inputs.size(0), rows, out.data_ptr<float>());
  });
  return out;
}

// Half-style RoPE of float32 states (batch, heads, n, head_dim) by cos/sin (batch or 1, 1, n, rotary_dim)
// into a new contiguous float32 tensor, in one pass (cpu::Kernels::rotate_half_row per row).
at::Tensor rotate_half_cpu(const at::Tensor& states, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(states.dim() == 4 && states.scalar_type() == at::kFloat && states.stride(3) == 1,
              "rotate_half: states must be float32 (batch, heads, n, head_dim) with contiguous rows, got ",
              states.scalar_type(), " ", states.sizes());
  const int64_t batch = states.size(0), heads = states.size(1), n = states.size(2), dim = states.size(3);
  for (const at::Tensor& table : {cos, sin}) {
    TORCH_CHECK(table.dim() == 4 && table.scalar_type() == at::kFloat && (table.size(0) == batch || table.size(0) == 1) &&
                    table.size(1) == 1 && table.size(2) == n && table.size(3) % 2 == 0 && table.size(3) <= dim,
                "rotate_half: cos and sin must be float32 (batch or 1, 1, n, rotary_dim), rotary_dim even and at "
                "most head_dim, got ",
                table.scalar_type(), " ", table.sizes(), " for states ", states.sizes());
  }
  TORCH_CHECK(cos.sizes() == sin.sizes(), "rotate_half: cos and sin must have one shape, got ", cos.sizes(), " and ",
              sin.sizes());
  const at::Tensor c = cos.contiguous(), s = sin.contiguous();
  const int64_t rotary = c.size(3);
  const int64_t table_batch = c.size(0) == 1 ? 0 : n * rotary;
  at::Tensor out = at::empty({batch, heads, n, dim}, states.options());
  const float* x = states.data_ptr<float>();
  const float* cos_data = c.data_ptr<float>();
  const float* sin_data = s.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  const cpu::Kernels& kernels = cpu_kernels();
  at::parallel_for(0, batch * heads * n, kRotateGrainRows, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / (heads * n), h = row / n % heads, i = row % n;
      const int64_t table = b * table_batch + i * rotary;
      kernels.rotate_half_row(x + b * states.stride(0) + h * states.stride(1) + i * states.stride(2),
                              cos_data + table, sin_data + table, rotary, dim, out_data + row * dim);
    }
  });
  return out;
}

// (batch, heads, n, head_dim) in dtype: half-style RoPE of the query heads of the q_proj outputs
// offset + scale * base, in one pass (ShiftKV's proxies through (W 1, W z): nothing of the float32
// (batch, n, heads * head_dim) products is stored). base (n, heads * head_dim); offset (batch, heads *
// head_dim) and scale (batch) float32; cos/sin (batch or 1, period, rotary_dim) float32, row i of every
// sample rotated by table row i % period.
at::Tensor affine_rotate_half_cpu(const at::Tensor& base, const at::Tensor& offset, const at::Tensor& scale,
                                  const at::Tensor& cos, const at::Tensor& sin, int64_t heads,
                                  at::ScalarType dtype) {
  const auto is_scoring_type = [](at::ScalarType type) {
    return type == at::kFloat || type == at::kBFloat16 || type == at::kHalf;
  };
  TORCH_CHECK(base.dim() == 2 && base.numel() > 0 && is_scoring_type(base.scalar_type()),
              "affine_rotate_half: base must be a non-empty float16, bfloat16 or float32 (n, q_out) matrix, got ",
              base.scalar_type(), " ", base.sizes());
  const int64_t n = base.size(0), width = base.size(1);
  TORCH_CHECK(heads > 0 && width % heads == 0, "affine_rotate_half: q_out ", width, " is not a multiple of heads ",
              heads);
  TORCH_CHECK(offset.dim() == 2 && offset.size(1) == width && offset.scalar_type() == at::kFloat,
              "affine_rotate_half: offset must be float32 (batch, ", width, "), got ", offset.scalar_type(), " ",
              offset.sizes());
  const int64_t batch = offset.size(0);
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == batch && scale.scalar_type() == at::kFloat,
              "affine_rotate_half: scale must be float32 (", batch, "), got ", scale.scalar_type(), " ",
              scale.sizes());
  const int64_t head_dim = width / heads;
  for (const at::Tensor& table : {cos, sin}) {
    TORCH_CHECK(table.dim() == 3 && table.scalar_type() == at::kFloat && (table.size(0) == batch || table.size(0) == 1) &&
                    table.size(1) > 0 && n % table.size(1) == 0 && table.size(2) % 2 == 0 &&
                    table.size(2) <= head_dim,
                "affine_rotate_half: cos and sin must be float32 (batch or 1, period, rotary_dim), period dividing ",
                n, " rows, rotary_dim even and at most head_dim ", head_dim, ", got ", table.scalar_type(), " ",
                table.sizes());
  }
  TORCH_CHECK(cos.sizes() == sin.sizes(), "affine_rotate_half: cos and sin must have one shape, got ", cos.sizes(),
              " and ", sin.sizes());
  TORCH_CHECK(is_scoring_type(dtype), "affine_rotate_half: dtype must be float16, bfloat16 or float32, got ", dtype);
  const at::Tensor rows = base.contiguous(), shift = offset.contiguous(), factor = scale.contiguous();
  const at::Tensor c = cos.contiguous(), s = sin.contiguous();
  const int64_t period = c.size(1), rotary = c.size(2);
  const int64_t table_batch = c.size(0) == 1 ? 0 : period * rotary;
  at::Tensor out = at::empty({batch, heads, n, head_dim}, offset.options().dtype(dtype));
  const cpu::StateType base_type = state_type(rows.scalar_type()), out_type = state_type(dtype);
  const auto* base_bytes = static_cast<const char*>(rows.data_ptr());
  auto* out_bytes = static_cast<char*>(out.data_ptr());
  const int64_t base_size = rows.element_size(), out_size = out.element_size();
  const cpu::Kernels& kernels = cpu_kernels();
  const float* shift_data = shift.data_ptr<float>();
  const float* cos_data = c.data_ptr<float>();
  const float* sin_data = s.data_ptr<float>();
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> workspace(2 * head_dim);
    for (int64_t sample_head = begin; sample_head < end; ++sample_head) {
      const int64_t b = sample_head / heads, h = sample_head % heads;
      const float* row_shift = shift_data + b * width + h * head_dim;
      const float row_scale = factor.data_ptr<float>()[b];
      const int64_t first_table = b * table_batch;
      for (int64_t i = 0, phase = 0; i < n; ++i, phase = phase + 1 == period ? 0 : phase + 1) {
        const int64_t table = first_table + phase * rotary;
        kernels.affine_rotate_half_row(base_type, base_bytes + (i * width + h * head_dim) * base_size, row_shift,
                                       row_scale, cos_data + table, sin_data + table, rotary, head_dim, out_type,
                                       workspace.data(), out_bytes + (sample_head * n + i) * head_dim * out_size);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmshiftkv, m) {
  // Which CPU kernel scores inputs of a dtype: "default", "avx2", "avx512", or "avx512_bf16" (the
  // AVX-512 kernel with the bfloat16 logits GEMM).
  m.def("shiftkv_cpu_kernel(ScalarType dtype) -> str", &kernel_name);
}

TORCH_LIBRARY_IMPL(mmshiftkv, CPU, m) {
  m.impl("shiftkv_scores", &shiftkv_scores_cpu);
  m.impl("shiftkv_logit_max", &shiftkv_logit_max_cpu);
  m.impl("prompt_moments", &prompt_moments_cpu);
  m.impl("weight_products", &weight_products_cpu);
  m.impl("rotate_half", &rotate_half_cpu);
  m.impl("affine_rotate_half", &affine_rotate_half_cpu);
}

}  // namespace mmshiftkv
