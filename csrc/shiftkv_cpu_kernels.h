// Interface between the CPU driver of mmshiftkv::shiftkv_scores (shiftkv_cpu.cpp) and its per-ISA
// kernels (shiftkv_cpu_kernels.cpp). setup.py compiles the kernels once per CPU capability, with
// ATen's CPU_CAPABILITY macros and compiler flags, as ATen compiles its own kernels; the driver picks
// one at run time from at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY.
//
// Layouts (padded_len = seq_len rounded up to panel_keys):
// * rows: one pointer per query row of one KV head, to depth contiguous elements: float32, or
//   bfloat16 with the head dimension rounded up to even (zero-padded), read as 32-bit pairs (each
//   row 4-byte aligned); for kBFloat16Tiles the rows of one head are one buffer, depth elements apart.
// * packed keys (pack_keys): panels of panel_keys keys, each (depth, panel_keys) float32 or
//   (depth / 2, panel_keys) bfloat16 pairs (the VNNI layout AMX tiles read); keys past seq_len are zero.
// * key_bias: (padded_len) float32, 0 for a real key, -inf for a padding key and for t >= seq_len;
//   added to every logit, so masked logits are -inf and take no attention.
// * sums: (n_groups + 1, padded_len) float32 probability sums, slot-major (slot n_groups: anchor).
#pragma once

#include <cstdint>

namespace mmshiftkv::cpu {

enum class LogitType : int32_t {
  kFloat = 0,     // float32 rows and keys, float32 GEMM
  kBFloat16 = 1,  // bfloat16 rows and keys, bfloat16 GEMM with float32 accumulation
  kBFloat16Tiles = 2,  // the same on AMX tiles, through ATen's oneDNN brgemm
};

// Row blocks of kBFloat16Tiles are a multiple of an AMX tile's rows.
constexpr int64_t kTileRows = 16;

// Element types of the prompt states whose moments the kernels sum, of weights (weight_products) and of
// the affine rows and rotated queries of affine_rotate_half_row.
enum class StateType : int32_t { kFloat = 0, kBFloat16 = 1, kHalf = 2 };

struct HeadLogits {
  LogitType type;
  const void* const* rows;  // n_rows pointers, one per query row
  int64_t depth;       // head_dim (bfloat16: rounded up to even)
  const void* packed_keys;
  const float* key_bias;
  int64_t seq_len;
  int64_t padded_len;
  float scaling;  // applied to each float32 dot product before the bias
};

struct HeadSums {
  int64_t rows_per_group;  // query row n adds into slot min(n / rows_per_group, n_groups)
  int64_t n_groups;
  bool exclude_last_key;  // key seq_len - 1 counts in every row's normaliser but adds no mass
  float* sums;
};

struct Kernels {
  const char* isa;         // "default", "avx2", "avx512"
  bool has_bf16_gemm;      // LogitType::kBFloat16 is supported (the CPU has native bfloat16 dot products)
  bool has_bf16_tiles;     // LogitType::kBFloat16Tiles is compiled in (the driver asks ATen whether it runs)
  int64_t panel_keys;      // keys per packed panel; padded_len is a multiple of it
  int64_t micro_rows;      // rows per GEMM micro-tile; row blocks are best a multiple of it
  int64_t workspace_floats_per_row;  // per block row, beyond padded_len logits

  // Packs keys [panel_begin, panel_end) panels of one head's (seq_len, head_dim) keys, rows key_stride
  // elements apart (float32 for kFloat, bfloat16 bits for kBFloat16).
  void (*pack_keys)(LogitType type, const void* keys, int64_t key_stride, int64_t seq_len, int64_t head_dim,
                    int64_t panel_begin, int64_t panel_end, void* packed);

  // Adds the softmax probabilities of query rows [row_begin, row_end) into their slots' sums, in
  // blocks of block_rows rows. workspace: block_rows * (padded_len + workspace_floats_per_row) floats.
  // The caller gives every slot to one thread only.
  void (*accumulate_softmax)(const HeadLogits& head, const HeadSums& out, int64_t row_begin, int64_t row_end,
                             int64_t block_rows, float* workspace);

  // The largest (scaled, biased) logit of each of rows [row_begin, row_end): the GEMM stage of
  // accumulate_softmax alone (same tiles and blocks). max_out: (row_end - row_begin) floats.
  void (*logit_max)(const HeadLogits& head, int64_t row_begin, int64_t row_end, int64_t block_rows,
                    float* workspace, float* max_out);

  // float64 sum of the masses m < bound (in a fixed order, so it grows with bound).
  double (*sum_masses_below)(const float* mass, int64_t n, float bound);

  // mass[t] = vote_mass(group_sum[t], anchor_sum[t], heads_per_kv, group_size, anchor_in_groups)
  // (shiftkv_vote.h) for t < n (n >= 1), with the same float64 operations; returns the largest mass.
  float (*vote_masses)(const float* group_sum, const float* anchor_sum, int64_t n, int64_t heads_per_kv,
                       int64_t group_size, bool anchor_in_groups, float* mass);

  // Adds the float64 sums of d = x - shift and d^2 over rows [row_begin, row_end) of a row-major
  // (rows, cols) matrix: per column into sums[c], squares[c] with shift[c] (per_column), else over
  // every element into sums[0], squares[0] with shift[0]. d is exact (computed in float64).
  void (*shifted_moments)(StateType type, const void* states, int64_t cols, int64_t row_begin, int64_t row_end,
                          const double* shift, bool per_column, double* sums, double* squares);

  // out[v * out_stride + o] = sum_c weight[o][c] * vectors[v][c] in float32, for rows o in [row_begin,
  // row_end) of a row-major (rows, cols) weight and n_vectors float32 vectors of cols elements. Each
  // product is summed in one fixed order that depends on cols only (not on the other vectors, the
  // rows asked for or memory alignment), so it is the same bits at every call.
  void (*weight_products)(StateType type, const void* weight, int64_t cols, int64_t row_begin, int64_t row_end,
                          const float* vectors, int64_t n_vectors, int64_t out_stride, float* out);

  // One float32 row of head_dim features rotated half-style over its first rotary_dim (even):
  // out = (x1 cos1 - x2 sin1, x2 cos2 + x1 sin2) for x = (x1, x2) and cos/sin (rotary_dim) in halves,
  // each as two products and one sum; features past rotary_dim copied.
  void (*rotate_half_row)(const float* x, const float* cos, const float* sin, int64_t rotary_dim,
                          int64_t head_dim, float* out);

  // One row of head_dim features, rotate_half_row of x = offset + scale * base (one float32
  // multiply-add per feature; base of base_type), rounded to out_type (to nearest even).
  // workspace: 2 * head_dim floats.
  void (*affine_rotate_half_row)(StateType base_type, const void* base, const float* offset, float scale,
                                 const float* cos, const float* sin, int64_t rotary_dim, int64_t head_dim,
                                 StateType out_type, float* workspace, void* out);
};

const Kernels& kernels_DEFAULT();
#if defined(MMSHIFTKV_CPU_AVX2)
const Kernels& kernels_AVX2();
#endif
#if defined(MMSHIFTKV_CPU_AVX512)
const Kernels& kernels_AVX512();
#endif

}  // namespace mmshiftkv::cpu
