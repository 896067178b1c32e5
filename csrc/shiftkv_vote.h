// The arithmetic that decides ShiftKV votes, shared by the CPU and CUDA drivers.
//
// The drivers compute the logits with a float32-accumulating GEMM and the softmax in float32; what
// they hand to this header are float32 probability sums. From there on it mirrors
// mmshiftkv/ops/reference.py step for step: the per-group vote mass, the tau-coverage rule
// evaluated on the uncovered (tail) mass, the tie order (equal masses: lower token index first) and
// the final score. Sums that decide a vote (a group's total, the tail mass below a threshold) are
// accumulated in float64, so they add no rounding of their own to the float32 masses. The drivers
// only supply reductions over a group's masses (lane-blocked loops on the CPU, fixed-order block
// reductions on the GPU), so the CPU tests exercise the same decisions the GPU makes.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define SHIFTKV_HD __host__ __device__ __forceinline__
// coverage_cut is instantiated with __device__ lambdas from kernels; silence the host-side check.
#define SHIFTKV_DEVICE_LAMBDAS_OK _Pragma("nv_exec_check_disable")
#else
#define SHIFTKV_HD inline
#define SHIFTKV_DEVICE_LAMBDAS_OK
#endif

namespace mmshiftkv {

enum class Coverage : int32_t {
  kSmallest = 0,  // paper Eq. 9: the smallest prefix covering tau of the mass
  kWithin = 1,    // authors' code: the largest prefix whose mass stays within tau
};

// ---------------------------------------------------------------------------------------------
// Softmax of one (proxy or last-query) row over the keys.

// A row whose keys are all padding has max -inf; shifting it by 0 keeps every exp at exactly 0.
SHIFTKV_HD float softmax_shift(float row_max) { return row_max == -INFINITY ? 0.0f : row_max; }

// A row with a real key sums to >= 1 (its max contributes exp(0) = 1); an empty row sums to 0 and
// must stay all-zero instead of 0/0.
SHIFTKV_HD float softmax_inverse_sum(double sum_exp) {
  return static_cast<float>(1.0 / (sum_exp < 1.0 ? 1.0 : sum_exp));
}

// ---------------------------------------------------------------------------------------------
// From per-row probability sums to the masses that vote.
//
// group_sum: sum over the r*g rows (query heads x proxies) of a group of one key's probability;
// anchor_sum: sum over the r query heads of the last query's probability of that key.

SHIFTKV_HD double anchor_attention(float anchor_sum, int64_t heads_per_kv) {
  return static_cast<double>(anchor_sum) / static_cast<double>(heads_per_kv);
}

// The float64 arithmetic of vote_mass, on doubles or (CPU kernels) vectors of doubles; members is
// group_size + 1.
template <class Double>
SHIFTKV_HD Double vote_mass_of(const Double& group_sum, const Double& anchor_sum, const Double& heads_per_kv,
                               const Double& members, bool anchor_in_groups) {
  const Double mass = group_sum / heads_per_kv;
  if (!anchor_in_groups) return mass;
  return (mass + anchor_sum / heads_per_kv) / members;
}

// Computed in float64 and rounded once, so the mass carries one float32 rounding beyond its sums.
SHIFTKV_HD float vote_mass(float group_sum, float anchor_sum, int64_t heads_per_kv, int64_t group_size,
                           bool anchor_in_groups) {
  return static_cast<float>(vote_mass_of<double>(group_sum, anchor_sum, static_cast<double>(heads_per_kv),
                                                 static_cast<double>(group_size + 1), anchor_in_groups));
}

// ---------------------------------------------------------------------------------------------
// The tau-coverage vote of one group, found by a threshold search instead of a sort.
//
// Masses are non-negative floats, whose IEEE-754 bit patterns order exactly like their values, so
// a binary search over bit patterns pins an exact mass value in at most 31 halvings, each costing
// one reduction over the group's masses.

SHIFTKV_HD uint32_t mass_to_bits(float mass) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(mass);
#else
  uint32_t bits;
  std::memcpy(&bits, &mass, sizeof bits);
  return bits;
#endif
}

SHIFTKV_HD float bits_to_mass(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float mass;
  std::memcpy(&mass, &bits, sizeof mass);
  return mass;
#endif
}

// Mass that may stay outside the voted set: (1 - tau) * total.
SHIFTKV_HD double uncovered_budget(double total, double tau) { return (1.0 - tau) * total; }

// Whether the first k tokens are enough, given the mass `tail` left outside them.
// smallest: covered >= tau * total  <=>  tail <= budget (first such k is voted).
// within:   covered <= tau * total  <=>  tail >= budget (all such k are voted, so the first k with
//           tail < budget is one past the voted prefix).
SHIFTKV_HD bool tail_fits(double tail, double budget, Coverage coverage) {
  return coverage == Coverage::kSmallest ? tail <= budget : tail < budget;
}

// The voted set of one group: every token with mass > value, plus the first equal_quota tokens
// (in index order) whose mass == value.
struct VoteCut {
  float value;
  int64_t equal_quota;
};

SHIFTKV_HD VoteCut vote_nothing() { return {INFINITY, 0}; }
SHIFTKV_HD VoteCut vote_all_positive() { return {0.0f, 0}; }

SHIFTKV_HD bool above_cut(float mass, const VoteCut& cut) { return mass > cut.value; }
SHIFTKV_HD bool on_cut(float mass, const VoteCut& cut) { return cut.equal_quota > 0 && mass == cut.value; }

// Finds the vote cut of one group.
//
// In descending order, the first k tokens are "enough" (tail_fits) from some k on; call the first
// such k k_fit. smallest votes the first k_fit tokens, within the first k_fit - 1. The token at
// position k_fit has the largest mass value v with tail_fits(sum of masses < v), found by a binary
// search over bit patterns x; the largest fitting x is always the bit pattern of a mass (the sum
// below x only changes where x passes a mass). Inside v's tie block the tail grows by v per token
// given back, in index order.
//
// total:          the group's mass, summed in float64
// sum_below(x):   float64 sum of the group's masses m with m < bits_to_mass(x), x a bit pattern
// count_equal(v): number of the group's masses equal to v
SHIFTKV_DEVICE_LAMBDAS_OK
template <class SumBelow, class CountEqual>
SHIFTKV_HD VoteCut coverage_cut(double total, float max_mass, double tau, Coverage coverage,
                                const SumBelow& sum_below, const CountEqual& count_equal) {
  if (!(total > 0.0)) return vote_nothing();
  const double budget = uncovered_budget(total, tau);
  // Bit pattern 1 is the smallest positive float: only zero masses lie below it.
  if (!tail_fits(0.0, budget, coverage)) return vote_all_positive();  // within at tau == 1
  uint32_t lo = 1;
  uint32_t hi = mass_to_bits(max_mass);
  while (lo < hi) {
    const uint32_t mid = lo + (hi - lo + 1) / 2;
    if (tail_fits(sum_below(mid), budget, coverage)) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const float value = bits_to_mass(lo);
  const int64_t n_equal = count_equal(value);
  double tail = sum_below(lo);
  int64_t taken = n_equal;
  while (taken > 1 && tail_fits(tail + value, budget, coverage)) {
    tail += value;
    --taken;
  }
  return {value, coverage == Coverage::kSmallest ? taken : taken - 1};
}

// ---------------------------------------------------------------------------------------------
// Final score: votes + lambda * last-query attention, -inf for padding keys.

SHIFTKV_HD float shiftkv_score(int64_t votes, double anchor, double anchor_weight, bool real_key) {
  return real_key ? static_cast<float>(static_cast<double>(votes) + anchor_weight * anchor) : -INFINITY;
}

}  // namespace mmshiftkv
