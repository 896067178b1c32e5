// Input validation of mmshiftkv::shiftkv_scores, shared by the CPU and CUDA drivers: bad input must
// raise a clear error (RuntimeError in Python), never reach a kernel.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <string_view>

#include "shiftkv_vote.h"

namespace mmshiftkv {

struct ScoringShape {
  int64_t batch;
  int64_t q_heads;
  int64_t kv_heads;
  int64_t n_proxies;
  int64_t head_dim;
  int64_t seq_len;
  int64_t n_groups;
  int64_t group_size;    // g = n_proxies / n_groups
  int64_t heads_per_kv;  // r = q_heads / kv_heads
};

inline Coverage parse_coverage(std::string_view coverage) {
  TORCH_CHECK(coverage == "smallest" || coverage == "within",
              "shiftkv_scores: coverage must be 'smallest' or 'within', got '", std::string(coverage), "'");
  return coverage == "smallest" ? Coverage::kSmallest : Coverage::kWithin;
}

inline ScoringShape check_scoring_inputs(const at::Tensor& proxies, const at::Tensor& keys,
                                         const at::Tensor& last_query, const std::optional<at::Tensor>& key_mask,
                                         int64_t n_groups, double tau, double scaling, double anchor_weight) {
  TORCH_CHECK(proxies.dim() == 4, "shiftkv_scores: proxies must be (batch, q_heads, n_proxies, head_dim), got ",
              proxies.sizes());
  TORCH_CHECK(keys.dim() == 4, "shiftkv_scores: keys must be (batch, kv_heads, seq_len, head_dim), got ",
              keys.sizes());
  TORCH_CHECK(last_query.dim() == 3, "shiftkv_scores: last_query must be (batch, q_heads, head_dim), got ",
              last_query.sizes());
  const auto dtype = proxies.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat,
              "shiftkv_scores: inputs must be float16, bfloat16 or float32, got ", dtype);
  TORCH_CHECK(keys.scalar_type() == dtype && last_query.scalar_type() == dtype,
              "shiftkv_scores: proxies, keys and last_query must share one dtype, got ", dtype, ", ",
              keys.scalar_type(), ", ", last_query.scalar_type());
  TORCH_CHECK(keys.device() == proxies.device() && last_query.device() == proxies.device(),
              "shiftkv_scores: proxies, keys and last_query must be on one device, got ", proxies.device(), ", ",
              keys.device(), ", ", last_query.device());

  ScoringShape s{};
  s.batch = proxies.size(0);
  s.q_heads = proxies.size(1);
  s.n_proxies = proxies.size(2);
  s.head_dim = proxies.size(3);
  s.kv_heads = keys.size(1);
  s.seq_len = keys.size(2);
  s.n_groups = n_groups;
  TORCH_CHECK(keys.size(0) == s.batch && keys.size(3) == s.head_dim, "shiftkv_scores: keys ", keys.sizes(),
              " do not match proxies ", proxies.sizes(), " in batch or head_dim");
  TORCH_CHECK(last_query.size(0) == s.batch && last_query.size(1) == s.q_heads && last_query.size(2) == s.head_dim,
              "shiftkv_scores: last_query must be (batch, q_heads, head_dim) matching proxies ", proxies.sizes(),
              ", got ", last_query.sizes());
  TORCH_CHECK(s.batch > 0 && s.q_heads > 0 && s.n_proxies > 0 && s.head_dim > 0 && s.kv_heads > 0,
              "shiftkv_scores: empty input, proxies ", proxies.sizes(), ", keys ", keys.sizes());
  TORCH_CHECK(s.seq_len > 0, "shiftkv_scores: keys are empty (seq_len == 0), there is nothing to score");
  TORCH_CHECK(s.q_heads % s.kv_heads == 0, "shiftkv_scores: q_heads (", s.q_heads,
              ") must be a multiple of kv_heads (", s.kv_heads, ")");
  TORCH_CHECK(n_groups > 0, "shiftkv_scores: n_groups must be positive, got ", n_groups);
  TORCH_CHECK(s.n_proxies % n_groups == 0, "shiftkv_scores: n_proxies (", s.n_proxies,
              ") must be divisible by n_groups (", n_groups, ")");
  TORCH_CHECK(tau > 0.0 && tau <= 1.0, "shiftkv_scores: tau must be in (0, 1], got ", tau);
  TORCH_CHECK(std::isfinite(scaling) && scaling > 0.0, "shiftkv_scores: scaling must be finite and positive, got ",
              scaling);
  TORCH_CHECK(std::isfinite(anchor_weight), "shiftkv_scores: anchor_weight must be finite, got ", anchor_weight);
  if (key_mask.has_value()) {
    const at::Tensor& mask = *key_mask;
    TORCH_CHECK(mask.scalar_type() == at::kBool, "shiftkv_scores: key_mask must be bool, got ", mask.scalar_type());
    TORCH_CHECK(mask.dim() == 2 && mask.size(0) == s.batch && mask.size(1) == s.seq_len,
                "shiftkv_scores: key_mask must be (batch, seq_len) = (", s.batch, ", ", s.seq_len, "), got ",
                mask.sizes());
    TORCH_CHECK(mask.device() == keys.device(), "shiftkv_scores: key_mask is on ", mask.device(),
                " but keys are on ", keys.device());
  }
  s.group_size = s.n_proxies / n_groups;
  s.heads_per_kv = s.q_heads / s.kv_heads;
  return s;
}

}  // namespace mmshiftkv
