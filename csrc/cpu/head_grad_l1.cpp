// Operation 2 on CPU: per sequence, mean |Σ_t c_t g_t h_tᵀ| over V×d without forming V×d.
// The vocabulary is cut into tiles of tile_rows(d) rows; each tile's Gᵀ block is one small
// matrix multiply (ATen/BLAS, single-threaded inside the parallel loop) of the transposed
// gradient [V, N] (copied once, O(N·V)) into a per-thread buffer that stays in cache,
// abs-summed in the epilogue into that tile's double partial.
// Partials are combined in tile order: deterministic, independent of the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "reduce.h"

namespace semgrad::cpu {
namespace {

// Elements of one tile's Gᵀ block (1 MiB of float32): small enough for L2.
constexpr int64_t kTileElems = int64_t{1} << 18;

int64_t tile_rows(int64_t d) { return std::max<int64_t>(16, kTileElems / std::max<int64_t>(d, 1) / 16 * 16); }

at::Tensor head_grad_l1_cpu(
    const at::Tensor& nll_grad, const at::Tensor& hidden, const at::Tensor& row_scale, const at::Tensor& offsets) {
  const at::Tensor off = check_head_grad_l1_args(nll_grad, hidden, row_scale, offsets);
  const int64_t* op = off.const_data_ptr<int64_t>();
  const int64_t v = nll_grad.size(1), d = hidden.size(1), batch = off.size(0) - 1;

  const auto acc = at::toOpMathType(hidden.scalar_type());
  const at::Tensor g_t = nll_grad.to(acc).t().contiguous();
  const at::Tensor h = (hidden.to(acc) * row_scale.to(acc).unsqueeze(1)).contiguous();
  const int64_t rows = tile_rows(d), tiles = (v + rows - 1) / rows;
  std::vector<double> partial(batch * tiles, 0.0);
  AT_DISPATCH_FLOATING_TYPES(acc, "semgrad::head_grad_l1", [&] {
    at::parallel_for(0, batch * tiles, 1, [&](int64_t begin, int64_t end) {
      at::Tensor buf = at::empty({rows, d}, h.options());
      for (int64_t i = begin; i < end; ++i) {
        // tile-major order: each thread's share mixes the sequences (balanced for ragged batches)
        const int64_t tile = i / batch, b = i % batch, v0 = tile * rows, v1 = std::min(v, v0 + rows);
        if (op[b] == op[b + 1]) continue;
        at::Tensor out = buf.narrow(0, 0, v1 - v0);
        at::mm_out(out, g_t.slice(0, v0, v1).slice(1, op[b], op[b + 1]), h.slice(0, op[b], op[b + 1]));
        partial[b * tiles + tile] = abs_sum(out.const_data_ptr<scalar_t>(), out.numel());
      }
    });
  });
  at::Tensor result = at::empty({batch}, nll_grad.options().dtype(at::kDouble));
  double* rp = result.data_ptr<double>();
  for (int64_t b = 0; b < batch; ++b) {
    double total = 0;
    for (int64_t t = 0; t < tiles; ++t) total += partial[b * tiles + t];
    rp[b] = total / (static_cast<double>(v) * d);
  }
  return result;
}

}  // namespace
}  // namespace semgrad::cpu

TORCH_LIBRARY_IMPL(semgrad, CPU, m) { m.impl("head_grad_l1", &semgrad::cpu::head_grad_l1_cpu); }
