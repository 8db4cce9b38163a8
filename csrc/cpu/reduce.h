// Σ|x| written for compiler auto-vectorization: fixed-width lane arrays, so the
// summation order (and the result) never depends on the vector width.
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace semgrad::cpu {

constexpr int kLanes = 16;
// Sums accumulate kBlock elements in opmath lanes, then add the block into a double.
constexpr int64_t kBlock = 4096;

template <typename scalar_t>
double abs_sum(const scalar_t* x, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  double total = 0;
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t b1 = std::min(n, b0 + kBlock);
    acc_t lanes[kLanes] = {};
    int64_t i = b0;
    for (; i + kLanes <= b1; i += kLanes) {
      for (int k = 0; k < kLanes; ++k) lanes[k] += std::abs(static_cast<acc_t>(x[i + k]));
    }
    for (; i < b1; ++i) lanes[0] += std::abs(static_cast<acc_t>(x[i]));
    acc_t block = 0;
    for (int k = 0; k < kLanes; ++k) block += lanes[k];
    total += block;
  }
  return total;
}

}  // namespace semgrad::cpu
