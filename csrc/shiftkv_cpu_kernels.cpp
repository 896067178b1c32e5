// Per-ISA CPU kernels of mmshiftkv::shiftkv_scores (interface: shiftkv_cpu_kernels.h).
//
// setup.py compiles this file once per CPU capability (DEFAULT, AVX2, AVX512) with ATen's
// CPU_CAPABILITY macros and flags; at::vec::Vectorized makes the same code 16 float lanes wide on
// AVX-512, 8 on AVX2 and plain scalar loops on DEFAULT. Per block of query rows (sized so its logits
// stay in the L2 cache):
// 1. logits: a register-blocked GEMM of the rows against one head's packed keys (float32 FMAs, or on
//    CPUs with AVX512-BF16 bfloat16 dot products with float32 accumulation; on CPUs with AMX, AMX tiles
//    through ATen's oneDNN brgemm), scaled and masked in the tile epilogue, which also keeps each row's
//    running maximum;
// 2. one pass per row: exp(logit - max) in place, the row sum in float64;
// 3. one pass per slot: the probability sum over the slot's rows, column tiles in registers.
#include "shiftkv_cpu_kernels.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#if defined(CPU_CAPABILITY_AVX512)
#include <ATen/native/CPUBlas.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>

#include "shiftkv_vote.h"

#define MMSHIFTKV_PASTE_(a, b) a##b
#define MMSHIFTKV_PASTE(a, b) MMSHIFTKV_PASTE_(a, b)

namespace mmshiftkv::cpu {
namespace {

using Vec = at::vec::Vectorized<float>;
using IntVec = at::vec::Vectorized<int32_t>;
constexpr int kLanes = Vec::size();

// GEMM micro-tile: kMicroRows rows x kMicroVectors vectors of keys, the accumulators held in
// registers (AVX-512: 24 of 32, AVX2: 12 of 16).
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kMicroRows = 6;
constexpr int kMicroVectors = 4;
#elif defined(CPU_CAPABILITY_AVX2)
constexpr int kMicroRows = 6;
constexpr int kMicroVectors = 2;
#else
constexpr int kMicroRows = 4;
constexpr int kMicroVectors = 2;
#endif
constexpr int kPanelKeys = kMicroVectors * kLanes;
constexpr int kMassVectors = 8;  // column tile of the mass pass, in vectors
constexpr int64_t kMaxProductVectors = 4;  // vectors per pass of weight_products over the weight
// Weight rows read together by weight_products (their accumulators: 2 x rows x vectors registers).
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kProductRows = 4;
#else
constexpr int kProductRows = 2;
#endif
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------------
// Elementwise pieces.

// exp(x) for x <= 0 (and -inf) in float32, within 3.4 * 2^-24 relative of exp. Results below
// 2^-126 (x < -87) are flushed to zero: they are probabilities under the stated ZERO_FLOOR (2^-100).
// Cody-Waite reduction x = k ln2 + r, |r| <= ln2 / 2 (ln 2 split so k * hi is exact; k rounded by
// adding 1.5 * 2^23, whose low mantissa bits then hold k), a degree-5 minimax polynomial for e^r
// (1.3 * 2^-24 relative) and 2^k added to its exponent bits.
constexpr float kExpLowest = -87.0f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kRoundShift = 12582912.0f;  // 1.5 * 2^23
constexpr float kLn2High = 0.693359375f;    // ln 2 to 9 significant bits
constexpr float kLn2Low = -2.12194440e-4f;
constexpr float kExpPoly[6] = {1.00000007f, 0.999999692f, 0.499988949f, 0.166675747f, 0.041915382f, 0.0082976552f};

#if defined(CPU_CAPABILITY_AVX512)
// AVX-512: two fewer multiply-adds (6), within 2.76 * 2^-24 (every float in [-87, 0] checked against
// float64 exp): x = (32 k + j) ln2 / 32 + r, |r| <= ln2 / 64, a degree-2 minimax polynomial
// 1 + q(r) for e^r (0.9 * 2^-24 relative), and e^x = P + P q with P = 2^(j / 32) from a 32-entry
// table (one two-register permute) times 2^k (added to its exponent bits): one rounding of P q + P,
// whose q carries its own roundings scaled by |q| <= 0.011.
constexpr float kExp2Table[32] = {
    1.0f,        1.0218972f,  1.04427373f, 1.06714046f, 1.09050775f, 1.1143868f,  1.13878858f, 1.1637249f,
    1.18920708f, 1.21524739f, 1.24185777f, 1.26905096f, 1.29683959f, 1.32523668f, 1.35425556f, 1.38390994f,
    1.41421354f, 1.44518077f, 1.47682619f, 1.50916445f, 1.54221082f, 1.5759809f,  1.61049032f, 1.64575553f,
    1.68179286f, 1.71861935f, 1.75625217f, 1.79470909f, 1.8340081f,  1.87416768f, 1.91520655f, 1.95714414f};
constexpr float kTablePoly[2] = {1.0000146627426147f, 0.4999963343143463f};  // q(r) = (c1 + c2 r) r

inline Vec exp_nonpositive(const Vec& v) {
  const __m512 x = v;
  const __mmask16 kept = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpLowest), _CMP_GE_OQ);
  const __m512 shift = _mm512_set1_ps(kRoundShift);
  // n = 32 k + j, rounded; its low bits are t's low mantissa bits.
  const __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(32.0f * kLog2e), shift);
  const __m512 n = _mm512_sub_ps(t, shift);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2High / 32.0f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Low / 32.0f), r);
  const __m512 q =
      _mm512_mul_ps(_mm512_fmadd_ps(_mm512_set1_ps(kTablePoly[1]), r, _mm512_set1_ps(kTablePoly[0])), r);
  const __m512i bits = _mm512_castps_si512(t);
  const __m512 power = _mm512_permutex2var_ps(_mm512_loadu_ps(kExp2Table), bits, _mm512_loadu_ps(kExp2Table + 16));
  // 2^k added to the exponent: k = floor(n / 32) = (t's bits >> 5) up to multiples of 2^9 that the
  // shift by 23 drops. P stays normal: x >= -87 gives k >= -126, and k = -126 only with j >= 15.
  const __m512i exponent = _mm512_slli_epi32(_mm512_srai_epi32(bits, 5), 23);
  const __m512 scaled = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(power), exponent));
  return _mm512_maskz_fmadd_ps(kept, scaled, q, scaled);  // x < -87, -inf and NaN: 0
}
#elif defined(CPU_CAPABILITY_AVX2)
inline Vec exp_nonpositive(const Vec& v) {
  const __m256 x = v;
  const __m256 kept = _mm256_cmp_ps(x, _mm256_set1_ps(kExpLowest), _CMP_GE_OQ);
  const __m256 shift = _mm256_set1_ps(kRoundShift);
  const __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(kLog2e), shift);
  const __m256 k = _mm256_sub_ps(t, shift);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(kLn2High), x);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(kLn2Low), r);
  __m256 p = _mm256_set1_ps(kExpPoly[5]);
  for (int i = 4; i >= 0; --i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[i]));
  const __m256i scaled = _mm256_add_epi32(_mm256_castps_si256(p), _mm256_slli_epi32(_mm256_castps_si256(t), 23));
  return _mm256_and_ps(_mm256_castsi256_ps(scaled), kept);
}
#else
inline Vec exp_nonpositive(const Vec& x) {
  const Vec shift(kRoundShift);
  const Vec t = at::vec::fmadd(x, Vec(kLog2e), shift);
  const Vec k = t - shift;
  Vec r = at::vec::fnmadd(k, Vec(kLn2High), x);
  r = at::vec::fnmadd(k, Vec(kLn2Low), r);
  Vec p(kExpPoly[5]);
  for (int i = 4; i >= 0; --i) p = at::vec::fmadd(p, r, Vec(kExpPoly[i]));
  const IntVec scaled = at::vec::cast<int32_t>(p) + (at::vec::cast<int32_t>(t) << IntVec(23));
  return at::vec::cast<float>(scaled) & (x >= Vec(kExpLowest));
}
#endif

// float32 <-> float64 vectors: a float vector is two double vectors (low and high lanes).
using DoubleVec = at::vec::Vectorized<double>;
static_assert(DoubleVec::size() * 2 == kLanes, "a float vector converts to two double vectors");

#if defined(CPU_CAPABILITY_AVX512)
inline void to_doubles(const Vec& v, DoubleVec& low, DoubleVec& high) {
  const __m512 values = v;
  low = _mm512_cvtps_pd(_mm512_castps512_ps256(values));
  high = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(values), 1)));
}
inline Vec to_floats(const DoubleVec& low, const DoubleVec& high) {
  const __m256 low_floats = _mm512_cvtpd_ps(low);
  const __m256 high_floats = _mm512_cvtpd_ps(high);
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(low_floats)),
                                             _mm256_castps_pd(high_floats), 1));
}
#elif defined(CPU_CAPABILITY_AVX2)
inline void to_doubles(const Vec& v, DoubleVec& low, DoubleVec& high) {
  const __m256 values = v;
  low = _mm256_cvtps_pd(_mm256_castps256_ps128(values));
  high = _mm256_cvtps_pd(_mm256_extractf128_ps(values, 1));
}
inline Vec to_floats(const DoubleVec& low, const DoubleVec& high) {
  return _mm256_set_m128(_mm256_cvtpd_ps(high), _mm256_cvtpd_ps(low));
}
#else
inline void to_doubles(const Vec& v, DoubleVec& low, DoubleVec& high) {
  alignas(64) float values[kLanes];
  alignas(64) double doubles[kLanes];
  v.store(values);
  for (int l = 0; l < kLanes; ++l) doubles[l] = static_cast<double>(values[l]);
  low = DoubleVec::loadu(doubles);
  high = DoubleVec::loadu(doubles + DoubleVec::size());
}
inline Vec to_floats(const DoubleVec& low, const DoubleVec& high) {
  alignas(64) double doubles[kLanes];
  alignas(64) float values[kLanes];
  low.store(doubles);
  high.store(doubles + DoubleVec::size());
  for (int l = 0; l < kLanes; ++l) values[l] = static_cast<float>(doubles[l]);
  return Vec::loadu(values);
}
#endif

// A float64 sum of float vectors, lane by lane in a fixed order (so it only grows when a summand
// grows, and gives the same result at every thread count).
struct DoubleSum {
  DoubleVec low{0.0};
  DoubleVec high{0.0};
  void add(const Vec& v) {
    DoubleVec v_low, v_high;
    to_doubles(v, v_low, v_high);
    low = low + v_low;
    high = high + v_high;
  }
  double total() const {
    alignas(64) double lanes[kLanes];
    low.store(lanes);
    high.store(lanes + DoubleVec::size());
    double sum = 0.0;
    for (double lane : lanes) sum += lane;
    return sum;
  }
};

float horizontal_max(const Vec& v) {
  alignas(64) float values[kLanes];
  v.store(values);
  return *std::max_element(values, values + kLanes);
}

// ---------------------------------------------------------------------------------------------
// 1. Logits: one micro-tile at a time, into a block of full rows (ld = padded_len floats apart).

// Epilogue: logit = dot * scaling + key_bias (one rounding, as dot * scaling: the bias is 0 or
// -inf), stored, and folded into the rows' running maxima (Rows x kLanes floats).
template <int Rows>
inline void store_tile(Vec (&acc)[Rows][kMicroVectors], const float* bias, float scaling, float* out,
                       int64_t ld, float* row_max) {
  Vec key_bias[kMicroVectors];
#pragma GCC unroll 4
  for (int j = 0; j < kMicroVectors; ++j) key_bias[j] = Vec::loadu(bias + j * kLanes);
  const Vec scale(scaling);
#pragma GCC unroll 16
  for (int i = 0; i < Rows; ++i) {
    Vec running = Vec::loadu(row_max + i * kLanes);
#pragma GCC unroll 4
    for (int j = 0; j < kMicroVectors; ++j) {
      const Vec logit = at::vec::fmadd(acc[i][j], scale, key_bias[j]);
      logit.store(out + i * ld + j * kLanes);
      running = at::vec::maximum(running, logit);
    }
    running.store(row_max + i * kLanes);
  }
}

// rows: Rows float32 rows, panel: (depth, kPanelKeys) float32.
template <int Rows>
void float_tile(const void* const* rows, const float* panel, int64_t depth, const float* bias, float scaling,
                float* out, int64_t ld, float* row_max) {
  const float* query_rows[Rows];
#pragma GCC unroll 16
  for (int i = 0; i < Rows; ++i) query_rows[i] = static_cast<const float*>(rows[i]);
  Vec acc[Rows][kMicroVectors];
#pragma GCC unroll 16
  for (int i = 0; i < Rows; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < kMicroVectors; ++j) acc[i][j] = Vec(0.0f);
  }
  for (int64_t k = 0; k < depth; ++k) {
    Vec keys[kMicroVectors];
#pragma GCC unroll 4
    for (int j = 0; j < kMicroVectors; ++j) keys[j] = Vec::loadu(panel + k * kPanelKeys + j * kLanes);
#pragma GCC unroll 16
    for (int i = 0; i < Rows; ++i) {
      const Vec query(query_rows[i][k]);
#pragma GCC unroll 4
      for (int j = 0; j < kMicroVectors; ++j) acc[i][j] = at::vec::fmadd(query, keys[j], acc[i][j]);
    }
  }
  store_tile<Rows>(acc, bias, scaling, out, ld, row_max);
}

#if defined(CPU_CAPABILITY_AVX512)
// rows: Rows rows of bfloat16 pairs, panel: (depth / 2, kPanelKeys) pairs. Each VDPBF16PS adds two
// exact bfloat16 products into a float32 accumulator (denormals flushed).
template <int Rows>
__attribute__((target("avx512bf16"))) void bfloat16_tile(const void* const* rows, const uint32_t* panel,
                                                         int64_t pairs, const float* bias, float scaling,
                                                         float* out, int64_t ld, float* row_max) {
  const uint32_t* query_rows[Rows];
#pragma GCC unroll 16
  for (int i = 0; i < Rows; ++i) query_rows[i] = static_cast<const uint32_t*>(rows[i]);
  __m512 acc[Rows][kMicroVectors];
#pragma GCC unroll 16
  for (int i = 0; i < Rows; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < kMicroVectors; ++j) acc[i][j] = _mm512_setzero_ps();
  }
#pragma GCC unroll 4
  for (int64_t k = 0; k < pairs; ++k) {
    __m512bh keys[kMicroVectors];
#pragma GCC unroll 4
    for (int j = 0; j < kMicroVectors; ++j) {
      keys[j] = (__m512bh)_mm512_loadu_si512(panel + k * kPanelKeys + j * kLanes);
    }
#pragma GCC unroll 16
    for (int i = 0; i < Rows; ++i) {
      const __m512bh query = (__m512bh)_mm512_set1_epi32(static_cast<int>(query_rows[i][k]));
#pragma GCC unroll 4
      for (int j = 0; j < kMicroVectors; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], query, keys[j]);
    }
  }
  Vec logits[Rows][kMicroVectors];
#pragma GCC unroll 16
  for (int i = 0; i < Rows; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < kMicroVectors; ++j) logits[i][j] = Vec(acc[i][j]);
  }
  store_tile<Rows>(logits, bias, scaling, out, ld, row_max);
}

bool cpu_has_avx512_bf16() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") != 0;
  }();
  return has;
}
#endif

// One micro-tile of `rows` (1..kMicroRows) rows; the row count picks a fully unrolled instance.
template <int Rows = kMicroRows>
void logits_tile(const HeadLogits& head, int64_t rows, int64_t first_row, int64_t panel, float* out,
                 int64_t ld, float* row_max) {
  if constexpr (Rows > 1) {
    if (rows < Rows) return logits_tile<Rows - 1>(head, rows, first_row, panel, out, ld, row_max);
  }
  const float* bias = head.key_bias + panel * kPanelKeys;
  const void* const* queries = head.rows + first_row;
#if defined(CPU_CAPABILITY_AVX512)
  if (head.type == LogitType::kBFloat16) {
    const int64_t pairs = head.depth / 2;
    const auto* keys = static_cast<const uint32_t*>(head.packed_keys) + panel * pairs * kPanelKeys;
    return bfloat16_tile<Rows>(queries, keys, pairs, bias, head.scaling, out, ld, row_max);
  }
#endif
  const auto* keys = static_cast<const float*>(head.packed_keys) + panel * head.depth * kPanelKeys;
  float_tile<Rows>(queries, keys, head.depth, bias, head.scaling, out, ld, row_max);
}

#if defined(CPU_CAPABILITY_AVX512)
// kBFloat16Tiles: each panel's (rows x kPanelKeys) dot products by one brgemm call on AMX tiles (the
// packed panel is its VNNI operand), then the float path's epilogue row by row while they are in L1.
void tile_block_logits(const HeadLogits& head, int64_t first_row, int64_t rows, float* logits, float* row_max) {
  const int64_t ld = head.padded_len;
  const auto* queries = static_cast<const at::BFloat16*>(head.rows[first_row]);
  for (int64_t panel = 0; panel * kPanelKeys < ld; ++panel) {
    const auto* keys = static_cast<const at::BFloat16*>(head.packed_keys) + panel * head.depth * kPanelKeys;
    float* out = logits + panel * kPanelKeys;
    at::native::cpublas::brgemm(rows, kPanelKeys, head.depth, head.depth, kPanelKeys, ld, false, queries, keys, out,
                                true);
    const float* bias = head.key_bias + panel * kPanelKeys;
    for (int64_t i = 0; i < rows; ++i) {
      Vec dots[1][kMicroVectors];
#pragma GCC unroll 4
      for (int j = 0; j < kMicroVectors; ++j) dots[0][j] = Vec::loadu(out + i * ld + j * kLanes);
      store_tile<1>(dots, bias, head.scaling, out + i * ld, ld, row_max + i * kLanes);
    }
  }
}
#endif

// The AMX state a thread configured for kBFloat16Tiles, given back when its rows are done.
void release_tiles([[maybe_unused]] const HeadLogits& head) {
#if defined(CPU_CAPABILITY_AVX512)
  if (head.type == LogitType::kBFloat16Tiles) at::native::cpublas::brgemm_release(true);
#endif
}

// Logits of rows [first_row, first_row + rows) into logits (rows x padded_len), and each row's
// running maximum (rows x kLanes floats). Panels outermost: a panel stays in L1 across the block.
void block_logits(const HeadLogits& head, int64_t first_row, int64_t rows, float* logits, float* row_max) {
  std::fill(row_max, row_max + rows * kLanes, kNegInf);
#if defined(CPU_CAPABILITY_AVX512)
  if (head.type == LogitType::kBFloat16Tiles) return tile_block_logits(head, first_row, rows, logits, row_max);
#endif
  const int64_t ld = head.padded_len;
  for (int64_t panel = 0; panel * kPanelKeys < head.padded_len; ++panel) {
    for (int64_t i = 0; i < rows; i += kMicroRows) {
      logits_tile(head, std::min<int64_t>(kMicroRows, rows - i), first_row + i, panel,
                  logits + i * ld + panel * kPanelKeys, ld, row_max + i * kLanes);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// 2. Softmax numerators in place; returns the row's 1 / sum.

// padded_len is a multiple of kPanelKeys: whole groups of kMicroVectors vectors, summed in float32
// (two roundings at most) before the float64 sum.
float exponentiate_row(float* row, int64_t padded_len, float row_max) {
  static_assert(kMicroVectors == 2 || kMicroVectors == 4, "the float32 partial sums pair vectors");
  const Vec shift(softmax_shift(row_max));
  DoubleSum sum;
  for (int64_t t = 0; t < padded_len; t += kPanelKeys) {
    Vec e[kMicroVectors];
#pragma GCC unroll 4
    for (int v = 0; v < kMicroVectors; ++v) {
      e[v] = exp_nonpositive(Vec::loadu(row + t + v * kLanes) - shift);
      e[v].store(row + t + v * kLanes);
    }
    Vec partial = e[0] + e[1];
    if constexpr (kMicroVectors == 4) partial = partial + (e[2] + e[3]);
    sum.add(partial);
  }
  return softmax_inverse_sum(sum.total());
}

// ---------------------------------------------------------------------------------------------
// 3. Slot sums: sums[t] += sum over rows of row[t] * weight[row], a column tile at a time.

template <int Vectors>
inline void add_weighted_tile(const float* rows, int64_t n_rows, int64_t ld, const float* weights, float* sums) {
  Vec acc[Vectors];
#pragma GCC unroll 8
  for (int v = 0; v < Vectors; ++v) acc[v] = Vec::loadu(sums + v * kLanes);
  for (int64_t i = 0; i < n_rows; ++i) {
    const Vec weight(weights[i]);
#pragma GCC unroll 8
    for (int v = 0; v < Vectors; ++v) acc[v] = at::vec::fmadd(Vec::loadu(rows + i * ld + v * kLanes), weight, acc[v]);
  }
#pragma GCC unroll 8
  for (int v = 0; v < Vectors; ++v) acc[v].store(sums + v * kLanes);
}

void add_weighted_rows(const float* rows, int64_t n_rows, int64_t ld, const float* weights, float* sums) {
  int64_t t = 0;
  for (; t + kMassVectors * kLanes <= ld; t += kMassVectors * kLanes) {
    add_weighted_tile<kMassVectors>(rows + t, n_rows, ld, weights, sums + t);
  }
  for (; t < ld; t += kLanes) add_weighted_tile<1>(rows + t, n_rows, ld, weights, sums + t);
}

// ---------------------------------------------------------------------------------------------
// Kernel entry points.

void pack_keys(LogitType type, const void* keys, int64_t key_stride, int64_t seq_len, int64_t head_dim,
               int64_t panel_begin, int64_t panel_end, void* packed) {
  if (type != LogitType::kFloat) {
    // (pairs, kPanelKeys) 32-bit pairs per panel: key t's elements 2p (low half) and 2p + 1.
    const auto* source = static_cast<const uint16_t*>(keys);
    const int64_t pairs = (head_dim + 1) / 2;
    auto* out = static_cast<uint32_t*>(packed);
    const int64_t whole_pairs = head_dim / 2;
    for (int64_t panel = panel_begin; panel < panel_end; ++panel) {
      uint32_t* panel_out = out + panel * pairs * kPanelKeys;
      for (int64_t j = 0; j < kPanelKeys; ++j) {
        const int64_t t = panel * kPanelKeys + j;
        uint32_t* column = panel_out + j;
        if (t >= seq_len) {
          for (int64_t p = 0; p < pairs; ++p) column[p * kPanelKeys] = 0;
          continue;
        }
        const uint16_t* key = source + t * key_stride;
        for (int64_t p = 0; p < whole_pairs; ++p) {
          column[p * kPanelKeys] = key[2 * p] | (static_cast<uint32_t>(key[2 * p + 1]) << 16);
        }
        if (whole_pairs < pairs) column[whole_pairs * kPanelKeys] = key[head_dim - 1];
      }
    }
    return;
  }
  const auto* source = static_cast<const float*>(keys);
  auto* out = static_cast<float*>(packed);
  for (int64_t panel = panel_begin; panel < panel_end; ++panel) {
    float* panel_out = out + panel * head_dim * kPanelKeys;
    for (int64_t j = 0; j < kPanelKeys; ++j) {
      const int64_t t = panel * kPanelKeys + j;
      for (int64_t k = 0; k < head_dim; ++k) {
        panel_out[k * kPanelKeys + j] = t < seq_len ? source[t * key_stride + k] : 0.0f;
      }
    }
  }
}

int64_t slot_of(int64_t row, const HeadSums& out) { return std::min(row / out.rows_per_group, out.n_groups); }

void accumulate_softmax(const HeadLogits& head, const HeadSums& out, int64_t row_begin, int64_t row_end,
                        int64_t block_rows, float* workspace) {
  const int64_t ld = head.padded_len;
  float* logits = workspace;
  float* row_max = logits + block_rows * ld;
  float* weights = row_max + block_rows * kLanes;
  for (int64_t r0 = row_begin; r0 < row_end; r0 += block_rows) {
    const int64_t rows = std::min(block_rows, row_end - r0);
    block_logits(head, r0, rows, logits, row_max);
    for (int64_t i = 0; i < rows; ++i) {
      float* row = logits + i * ld;
      weights[i] = exponentiate_row(row, ld, horizontal_max(Vec::loadu(row_max + i * kLanes)));
      // Zeroing the last key after the softmax, without renormalising, is leaving it out of the mass.
      if (out.exclude_last_key) row[head.seq_len - 1] = 0.0f;
    }
    for (int64_t i = 0; i < rows;) {
      const int64_t slot = slot_of(r0 + i, out);
      int64_t end = i + 1;
      while (end < rows && slot_of(r0 + end, out) == slot) ++end;
      add_weighted_rows(logits + i * ld, end - i, ld, weights + i, out.sums + slot * ld);
      i = end;
    }
  }
  release_tiles(head);
}

void logit_max(const HeadLogits& head, int64_t row_begin, int64_t row_end, int64_t block_rows, float* workspace,
               float* max_out) {
  float* logits = workspace;
  float* row_max = logits + block_rows * head.padded_len;
  for (int64_t r0 = row_begin; r0 < row_end; r0 += block_rows) {
    const int64_t rows = std::min(block_rows, row_end - r0);
    block_logits(head, r0, rows, logits, row_max);
    for (int64_t i = 0; i < rows; ++i) max_out[r0 - row_begin + i] = horizontal_max(Vec::loadu(row_max + i * kLanes));
  }
  release_tiles(head);
}

// Pairs of vectors are added in float32 first: one rounding, and the sum still grows with bound.
double sum_masses_below(const float* mass, int64_t n, float bound) {
  const Vec limit(bound);
  DoubleSum sum;
  auto below = [&](int64_t t) {
    // Past n, loadu fills zeros, which add nothing.
    const Vec m = Vec::loadu(mass + t, static_cast<int>(std::clamp<int64_t>(n - t, 0, kLanes)));
    return m & (m < limit);
  };
  for (int64_t t = 0; t < n; t += 2 * kLanes) sum.add(below(t) + below(t + kLanes));
  return sum.total();
}

// mass[t] = vote_mass(group_sum[t], anchor_sum[t], ...) (shiftkv_vote.h), a vector at a time, and
// their maximum (masses are finite and >= +0: the lanes past n, zero, do not change it).
float vote_masses(const float* group_sum, const float* anchor_sum, int64_t n, int64_t heads_per_kv,
                  int64_t group_size, bool anchor_in_groups, float* mass) {
  const DoubleVec heads(static_cast<double>(heads_per_kv));
  const DoubleVec members(static_cast<double>(group_size + 1));
  Vec largest(0.0f);
  for (int64_t t = 0; t < n; t += kLanes) {
    const int count = static_cast<int>(std::min<int64_t>(kLanes, n - t));
    DoubleVec sum_low, sum_high, anchor_low, anchor_high;
    to_doubles(Vec::loadu(group_sum + t, count), sum_low, sum_high);
    to_doubles(Vec::loadu(anchor_sum + t, count), anchor_low, anchor_high);
    const DoubleVec low = vote_mass_of(sum_low, anchor_low, heads, members, anchor_in_groups);
    const DoubleVec high = vote_mass_of(sum_high, anchor_high, heads, members, anchor_in_groups);
    const Vec masses = to_floats(low, high);
    masses.store(mass + t, count);
    largest = at::vec::maximum(largest, masses);
  }
  return horizontal_max(largest);
}

// count (1..kLanes) elements as floats; the rest of the vector is zero.
template <typename T>
inline Vec load_floats(const T* data, int64_t count) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(data, static_cast<int>(count));
  } else {
    Vec out;
    if (count == kLanes) {
      at::vec::load_to_float(data, out);
      return out;
    }
    T padded[kLanes] = {};
    std::copy(data, data + count, padded);
    at::vec::load_to_float(padded, out);
    return out;
  }
}

// Deviations from the shift in float64 (exact), added into the running sums and squares.
struct DeviationSums {
  DoubleVec sum_low{0.0}, sum_high{0.0}, square_low{0.0}, square_high{0.0};
  void add(const DoubleVec& d_low, const DoubleVec& d_high) {
    sum_low = sum_low + d_low;
    sum_high = sum_high + d_high;
    square_low = at::vec::fmadd(d_low, d_low, square_low);
    square_high = at::vec::fmadd(d_high, d_high, square_high);
  }
};

template <typename T>
void shifted_moments_of(const T* states, int64_t cols, int64_t row_begin, int64_t row_end, const double* shift,
                        bool per_column, double* sums, double* squares) {
  constexpr int kHalf = DoubleVec::size();
  if (!per_column) {
    const DoubleVec offset(shift[0]);
    DeviationSums acc;
    for (int64_t row = row_begin; row < row_end; ++row) {
      const T* values = states + row * cols;
      int64_t c = 0;
      for (; c + kLanes <= cols; c += kLanes) {
        DoubleVec low, high;
        to_doubles(load_floats(values + c, kLanes), low, high);
        acc.add(low - offset, high - offset);
      }
      if (c < cols) {  // the row's tail: lanes past it hold 0 - shift, masked out
        const int count = static_cast<int>(cols - c);
        DoubleVec low, high;
        to_doubles(load_floats(values + c, count), low, high);
        const DoubleVec zero(0.0);
        acc.add(DoubleVec::set(zero, low - offset, std::min(count, kHalf)),
                DoubleVec::set(zero, high - offset, std::max(count - kHalf, 0)));
      }
    }
    alignas(64) double lanes[2 * kHalf];
    (acc.sum_low + acc.sum_high).store(lanes);
    (acc.square_low + acc.square_high).store(lanes + kHalf);
    for (int l = 0; l < kHalf; ++l) {
      sums[0] += lanes[l];
      squares[0] += lanes[kHalf + l];
    }
    return;
  }
  for (int64_t row = row_begin; row < row_end; ++row) {
    const T* values = states + row * cols;
    for (int64_t c = 0; c < cols; c += kLanes) {
      const int count = static_cast<int>(std::min<int64_t>(kLanes, cols - c));
      DoubleVec low, high;
      to_doubles(load_floats(values + c, count), low, high);
      for (const auto& [half, first] : {std::pair{low, c}, std::pair{high, c + kHalf}}) {
        const int n = static_cast<int>(std::clamp<int64_t>(c + count - first, 0, kHalf));
        if (n == 0) continue;
        const DoubleVec d = half - DoubleVec::loadu(shift + first, n);
        (DoubleVec::loadu(sums + first, n) + d).store(sums + first, n);
        at::vec::fmadd(d, d, DoubleVec::loadu(squares + first, n)).store(squares + first, n);
      }
    }
  }
}

void shifted_moments(StateType type, const void* states, int64_t cols, int64_t row_begin, int64_t row_end,
                     const double* shift, bool per_column, double* sums, double* squares) {
  switch (type) {
    case StateType::kBFloat16:
      return shifted_moments_of(static_cast<const c10::BFloat16*>(states), cols, row_begin, row_end, shift,
                                per_column, sums, squares);
    case StateType::kHalf:
      return shifted_moments_of(static_cast<const c10::Half*>(states), cols, row_begin, row_end, shift, per_column,
                                sums, squares);
    case StateType::kFloat:
      return shifted_moments_of(static_cast<const float*>(states), cols, row_begin, row_end, shift, per_column,
                                sums, squares);
  }
}

// out[v * out_stride + o] = sum_c weight[o][c] * vectors[v][c] for the kRows rows o from row and
// kVectors vectors: float32 FMAs in one fixed order per (row, vector) (two vector accumulators over
// column blocks, the tail in the second, lanes added in order), so a product depends on its row and
// vector only, not on how many are computed together. The accumulators stay in registers.
template <int kRows, int kVectors, typename T>
void weight_rows_times(const T* weight, int64_t cols, int64_t row, int64_t last_row, const float* vectors,
                       int64_t out_stride, float* out) {
  Vec acc[kRows][kVectors][2];
  for (int i = 0; i < kRows; ++i)
    for (int v = 0; v < kVectors; ++v) acc[i][v][0] = acc[i][v][1] = Vec(0.0f);
  int64_t c = 0;
  for (; c + 2 * kLanes <= cols; c += 2 * kLanes) {
    Vec low[kRows], high[kRows];
    for (int i = 0; i < kRows; ++i) {
      // The next rows' same columns: more of the weight in flight than the hardware prefetcher keeps.
      __builtin_prefetch(weight + std::min(row + kRows + i, last_row) * cols + c);
      low[i] = load_floats(weight + (row + i) * cols + c, kLanes);
      high[i] = load_floats(weight + (row + i) * cols + c + kLanes, kLanes);
    }
    for (int v = 0; v < kVectors; ++v) {
      const Vec x_low = Vec::loadu(vectors + v * cols + c);
      const Vec x_high = Vec::loadu(vectors + v * cols + c + kLanes);
      for (int i = 0; i < kRows; ++i) {
        acc[i][v][0] = at::vec::fmadd(low[i], x_low, acc[i][v][0]);
        acc[i][v][1] = at::vec::fmadd(high[i], x_high, acc[i][v][1]);
      }
    }
  }
  for (; c < cols; c += kLanes) {
    const int n = static_cast<int>(std::min<int64_t>(kLanes, cols - c));
    for (int v = 0; v < kVectors; ++v) {
      const Vec x = Vec::loadu(vectors + v * cols + c, n);
      for (int i = 0; i < kRows; ++i) {
        acc[i][v][1] = at::vec::fmadd(load_floats(weight + (row + i) * cols + c, n), x, acc[i][v][1]);
      }
    }
  }
  for (int i = 0; i < kRows; ++i) {
    for (int v = 0; v < kVectors; ++v) {
      alignas(64) float lanes[kLanes];
      (acc[i][v][0] + acc[i][v][1]).store(lanes);
      float sum = 0.0f;
      for (int l = 0; l < kLanes; ++l) sum += lanes[l];
      out[v * out_stride + row + i] = sum;
    }
  }
}

template <int kVectors, typename T>
void weight_block_times(const T* weight, int64_t cols, int64_t row_begin, int64_t row_end, const float* vectors,
                        int64_t out_stride, float* out) {
  int64_t row = row_begin;
  for (; row + kProductRows <= row_end; row += kProductRows) {
    weight_rows_times<kProductRows, kVectors>(weight, cols, row, row_end - 1, vectors, out_stride, out);
  }
  for (; row < row_end; ++row) {
    weight_rows_times<1, kVectors>(weight, cols, row, row_end - 1, vectors, out_stride, out);
  }
}

// weight_block_times over every vector, up to kMaxProductVectors per pass over the rows.
template <typename T>
void weight_products_of(const T* weight, int64_t cols, int64_t row_begin, int64_t row_end, const float* vectors,
                        int64_t n_vectors, int64_t out_stride, float* out) {
  for (int64_t first = 0; first < n_vectors; first += kMaxProductVectors) {
    const float* chunk = vectors + first * cols;
    float* chunk_out = out + first * out_stride;
    switch (std::min<int64_t>(kMaxProductVectors, n_vectors - first)) {
      case 1:
        weight_block_times<1>(weight, cols, row_begin, row_end, chunk, out_stride, chunk_out);
        break;
      case 2:
        weight_block_times<2>(weight, cols, row_begin, row_end, chunk, out_stride, chunk_out);
        break;
      case 3:
        weight_block_times<3>(weight, cols, row_begin, row_end, chunk, out_stride, chunk_out);
        break;
      default:
        weight_block_times<4>(weight, cols, row_begin, row_end, chunk, out_stride, chunk_out);
    }
  }
}

void weight_products(StateType type, const void* weight, int64_t cols, int64_t row_begin, int64_t row_end,
                     const float* vectors, int64_t n_vectors, int64_t out_stride, float* out) {
  switch (type) {
    case StateType::kBFloat16:
      return weight_products_of(static_cast<const c10::BFloat16*>(weight), cols, row_begin, row_end, vectors,
                                n_vectors, out_stride, out);
    case StateType::kHalf:
      return weight_products_of(static_cast<const c10::Half*>(weight), cols, row_begin, row_end, vectors,
                                n_vectors, out_stride, out);
    case StateType::kFloat:
      return weight_products_of(static_cast<const float*>(weight), cols, row_begin, row_end, vectors, n_vectors,
                                out_stride, out);
  }
}

// out = (x1 cos1 - x2 sin1, x2 cos2 + x1 sin2) over the first rotary_dim features of a float32 row
// (x = (x1, x2) in halves, cos/sin rotary_dim long), the rest copied: two products and one sum each,
// as torch computes rotate-half RoPE.
void rotate_half_row(const float* x, const float* cos, const float* sin, int64_t rotary_dim, int64_t head_dim,
                     float* out) {
  const int64_t half = rotary_dim / 2;
  for (int64_t c = 0; c < half; c += kLanes) {
    const int n = static_cast<int>(std::min<int64_t>(kLanes, half - c));
    const Vec x1 = Vec::loadu(x + c, n);
    const Vec x2 = Vec::loadu(x + half + c, n);
    (x1 * Vec::loadu(cos + c, n) - x2 * Vec::loadu(sin + c, n)).store(out + c, n);
    (x2 * Vec::loadu(cos + half + c, n) + x1 * Vec::loadu(sin + half + c, n)).store(out + half + c, n);
  }
  std::copy(x + rotary_dim, x + head_dim, out + rotary_dim);
}

// float32 values stored as T, rounded to nearest even (ATen's conversion, as Tensor.to rounds).
template <typename T>
void store_floats(const float* values, int64_t n, T* out) {
  if constexpr (std::is_same_v<T, float>) {
    std::copy(values, values + n, out);
  } else {
    at::vec::convert(values, out, n);
  }
}

// out = offset + scale * base in float32, one multiply-add (one rounding) per feature.
template <typename T>
void affine_row(const T* base, const float* offset, float scale, int64_t n, float* out) {
  const Vec factor(scale);
  for (int64_t c = 0; c < n; c += kLanes) {
    const int count = static_cast<int>(std::min<int64_t>(kLanes, n - c));
    at::vec::fmadd(factor, load_floats(base + c, count), Vec::loadu(offset + c, count)).store(out + c, count);
  }
}

void store_row(StateType type, const float* values, int64_t n, void* out) {
  switch (type) {
    case StateType::kBFloat16:
      return store_floats(values, n, static_cast<c10::BFloat16*>(out));
    case StateType::kHalf:
      return store_floats(values, n, static_cast<c10::Half*>(out));
    case StateType::kFloat:
      return store_floats(values, n, static_cast<float*>(out));
  }
}

void affine_rotate_half_row(StateType base_type, const void* base, const float* offset, float scale,
                            const float* cos, const float* sin, int64_t rotary_dim, int64_t head_dim,
                            StateType out_type, float* workspace, void* out) {
  float* affine = workspace;
  float* rotated = workspace + head_dim;
  switch (base_type) {
    case StateType::kBFloat16:
      affine_row(static_cast<const c10::BFloat16*>(base), offset, scale, head_dim, affine);
      break;
    case StateType::kHalf:
      affine_row(static_cast<const c10::Half*>(base), offset, scale, head_dim, affine);
      break;
    case StateType::kFloat:
      affine_row(static_cast<const float*>(base), offset, scale, head_dim, affine);
      break;
  }
  rotate_half_row(affine, cos, sin, rotary_dim, head_dim, rotated);
  store_row(out_type, rotated, head_dim, out);
}

}  // namespace

#define MMSHIFTKV_ISA_NAME_DEFAULT "default"
#define MMSHIFTKV_ISA_NAME_AVX2 "avx2"
#define MMSHIFTKV_ISA_NAME_AVX512 "avx512"

const Kernels& MMSHIFTKV_PASTE(kernels_, CPU_CAPABILITY)() {
  static const Kernels kernels = {
      MMSHIFTKV_PASTE(MMSHIFTKV_ISA_NAME_, CPU_CAPABILITY),
#if defined(CPU_CAPABILITY_AVX512)
      cpu_has_avx512_bf16(),
      true,
#else
      false,
      false,
#endif
      kPanelKeys,
      kMicroRows,
      kLanes + 1,
      &pack_keys,
      &accumulate_softmax,
      &logit_max,
      &sum_masses_below,
      &vote_masses,
      &shifted_moments,
      &weight_products,
      &rotate_half_row,
      &affine_rotate_half_row,
  };
  return kernels;
}

}  // namespace mmshiftkv::cpu
