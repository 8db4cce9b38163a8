// Operation 3 on CPU: per batch item, Σ|grads[:, b, :]| / (n_band d), items in parallel,
// each summed in a fixed order (deterministic).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "reduce.h"

namespace semgrad::cpu {
namespace {

at::Tensor band_l1_cpu(const at::Tensor& grads) {
  check_band_l1_args(grads);
  const int64_t n_band = grads.size(0), batch = grads.size(1), d = grads.size(2);
  const at::Tensor x = grads.contiguous();
  at::Tensor result = at::empty({batch}, x.options().dtype(at::kDouble));
  double* rp = result.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "semgrad::band_l1", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    // small inputs stay on this thread: a parallel region costs more than it saves there
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, n_band * d));
    at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        double total = 0;
        for (int64_t i = 0; i < n_band; ++i) total += abs_sum(xp + (i * batch + b) * d, d);
        rp[b] = total / (static_cast<double>(n_band) * d);
      }
    });
  });
  return result;
}

}  // namespace
}  // namespace semgrad::cpu

TORCH_LIBRARY_IMPL(semgrad, CPU, m) { m.impl("band_l1", &semgrad::cpu::band_l1_cpu); }
