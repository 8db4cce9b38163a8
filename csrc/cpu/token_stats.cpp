// Operation 1 on CPU: per row, the target's log-prob, the entropy and softmax − onehot,
// in three streaming passes over the row (max and input check, exp sums, normalize).
// Rows run in parallel; each row's sums have a fixed order, so results are deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <limits>
#include <vector>

#include "../checks.h"
#include "reduce.h"

namespace semgrad::cpu {
namespace {

// exp() arguments below this count as −inf (float: exp is under the smallest normal there).
template <typename acc_t>
constexpr acc_t kExpFloor = sizeof(acc_t) == 4 ? acc_t(-87) : acc_t(-708);

// exp(x) for kExpFloor <= x <= 0: Cephes-style range reduction and polynomial
// (~1 ulp); unlike std::exp it vectorizes.
inline float exp_core(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kRound = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  const float n = (x * kLog2e + kRound) - kRound;
  const float r = x - n * kLn2Hi - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline double exp_core(double x) { return std::exp(x); }

// One row; returns false if it holds NaN or +inf.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
bool token_stats_row(const scalar_t* z, int64_t V, int64_t y, acc_t* grad, acc_t* logp, acc_t* entropy) {
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  constexpr acc_t kFloor = kExpFloor<acc_t>;

  acc_t mx[kLanes];
  int bad[kLanes] = {};
  for (int k = 0; k < kLanes; ++k) mx[k] = -kInf;
  int64_t j = 0;
  for (; j + kLanes <= V; j += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const acc_t v = static_cast<acc_t>(z[j + k]);
      mx[k] = v > mx[k] ? v : mx[k];
      bad[k] |= !(v < kInf);
    }
  }
  for (; j < V; ++j) {
    const acc_t v = static_cast<acc_t>(z[j]);
    mx[0] = v > mx[0] ? v : mx[0];
    bad[0] |= !(v < kInf);
  }
  acc_t m = -kInf;
  for (int k = 0; k < kLanes; ++k) {
    if (bad[k]) return false;
    m = mx[k] > m ? mx[k] : m;
  }

  // s = Σ exp(z − m), t = Σ exp(z − m)(z − m); −inf entries add 0 to both.
  double s = 0, t = 0;
  for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const int64_t b1 = std::min(V, b0 + kBlock);
    acc_t sl[kLanes] = {}, tl[kLanes] = {};
    auto step = [&](int64_t i, int k) {
      const acc_t x = static_cast<acc_t>(z[i]) - m;
      const acc_t xc = x < kFloor ? kFloor : x;
      const acc_t e = x < kFloor ? acc_t(0) : exp_core(xc);
      grad[i] = e;
      sl[k] += e;
      tl[k] += e * xc;
    };
    int64_t i = b0;
    for (; i + kLanes <= b1; i += kLanes) {
      for (int k = 0; k < kLanes; ++k) step(i + k, k);
    }
    for (; i < b1; ++i) step(i, 0);
    for (int k = 0; k < kLanes; ++k) {
      s += sl[k];
      t += tl[k];
    }
  }

  const double log_s = std::log(s);
  *logp = static_cast<acc_t>(static_cast<double>(z[y]) - m - log_s);
  *entropy = static_cast<acc_t>(log_s - t / s);
  const acc_t inv_s = static_cast<acc_t>(1 / s);
  for (int64_t i = 0; i < V; ++i) grad[i] *= inv_s;
  grad[y] -= 1;
  return true;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_stats_cpu(
    const at::Tensor& logits, const at::Tensor& targets, bool check) {
  check_token_stats_args(logits, targets, /*check=*/true);  // the range check costs nothing on CPU
  const int64_t n = logits.size(0), v = logits.size(1);
  const at::Tensor z = logits.contiguous(), y = targets.contiguous();
  const int64_t* yp = y.const_data_ptr<int64_t>();
  const auto opts = z.options().dtype(at::toOpMathType(z.scalar_type()));
  at::Tensor logp = at::empty({n}, opts), entropy = at::empty({n}, opts), grad = at::empty({n, v}, opts);
  std::vector<char> ok(n);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "semgrad::token_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    acc_t *lp = logp.data_ptr<acc_t>(), *ep = entropy.data_ptr<acc_t>(), *gp = grad.data_ptr<acc_t>();
    // small inputs stay on this thread: a parallel region costs more than it saves there
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, v));
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        ok[r] = token_stats_row(zp + r * v, v, yp[r], gp + r * v, lp + r, ep + r);
      }
    });
  });
  for (int64_t r = 0; r < n; ++r) {
    TORCH_CHECK_VALUE(ok[r] || !check, kNonFiniteLogits);
    if (!ok[r]) {  // unchecked: the row's NaN entropy tells the caller
      entropy[r].fill_(std::numeric_limits<double>::quiet_NaN());
      logp[r].fill_(std::numeric_limits<double>::quiet_NaN());
    }
  }
  return {logp, entropy, grad};
}

}  // namespace
}  // namespace semgrad::cpu

TORCH_LIBRARY_IMPL(semgrad, CPU, m) { m.impl("token_stats", &semgrad::cpu::token_stats_cpu); }
