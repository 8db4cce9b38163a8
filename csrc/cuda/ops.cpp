// CUDA implementations of the semgrad ops: argument checks, dtype handling and output
// allocation with ATen, kernels through the raw-pointer launchers (launchers.h).
// Built only when torch has CUDA (see setup.py).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
#include "launchers.h"

namespace semgrad::cuda {
namespace {

Dtype dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dtype::kFloat32;
    case at::kDouble: return Dtype::kFloat64;
    case at::kBFloat16: return Dtype::kBFloat16;
    case at::kHalf: return Dtype::kFloat16;
    default: TORCH_CHECK_VALUE(false, "unsupported dtype ", t.scalar_type(), " (expected a floating type)");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_stats_cuda(
    const at::Tensor& logits, const at::Tensor& targets, bool check) {
  check_token_stats_args(logits, targets, check);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor z = logits.stride(1) == 1 ? logits : logits.contiguous();
  const at::Tensor y = targets.contiguous();
  const int64_t n = z.size(0), v = z.size(1);
  const auto opts = z.options().dtype(at::toOpMathType(z.scalar_type()));
  at::Tensor logp = at::empty({n}, opts), entropy = at::empty({n}, opts), grad = at::empty({n, v}, opts);
  at::Tensor nonfinite = at::empty({n}, z.options().dtype(at::kByte));
  C10_CUDA_CHECK(launch_token_stats(
      dtype_of(z), z.const_data_ptr(), z.stride(0), y.const_data_ptr<int64_t>(), n, v, logp.data_ptr(),
      entropy.data_ptr(), grad.data_ptr(), nonfinite.data_ptr<uint8_t>(), c10::cuda::getCurrentCUDAStream()));
  // Unchecked, a NaN/+inf row's NaN entropy tells the caller, with no synchronization here.
  TORCH_CHECK_VALUE(!check || n == 0 || !nonfinite.any().item<bool>(), kNonFiniteLogits);
  return {logp, entropy, grad};
}

at::Tensor head_grad_l1_cuda(
    const at::Tensor& nll_grad, const at::Tensor& hidden, const at::Tensor& row_scale, const at::Tensor& offsets) {
  check_head_grad_l1_shapes(nll_grad, hidden, row_scale, offsets);
  const c10::cuda::CUDAGuard guard(nll_grad.device());
  const auto acc = at::toOpMathType(hidden.scalar_type());
  at::Tensor g = nll_grad.to(acc);
  if (g.stride(1) != 1) g = g.contiguous();
  const at::Tensor h = (hidden.to(acc) * row_scale.to(acc).unsqueeze(1)).contiguous();
  const at::Tensor off = offsets.contiguous();
  const int64_t v = g.size(1), d = h.size(1), batch = off.size(0) - 1;
  at::Tensor partial = at::zeros({batch, head_grad_l1_tiles(v, d)}, g.options().dtype(at::kDouble));
  C10_CUDA_CHECK(launch_head_grad_l1(
      acc == at::kDouble ? Dtype::kFloat64 : Dtype::kFloat32, g.const_data_ptr(), g.stride(0), h.const_data_ptr(),
      off.const_data_ptr<int64_t>(), batch, g.size(0), v, d, partial.data_ptr<double>(),
      c10::cuda::getCurrentCUDAStream()));
  return partial.sum(1) / (static_cast<double>(v) * d);
}

at::Tensor band_l1_cuda(const at::Tensor& grads) {
  check_band_l1_args(grads);
  const c10::cuda::CUDAGuard guard(grads.device());
  const at::Tensor x = grads.contiguous();
  const int64_t n_band = x.size(0), batch = x.size(1), d = x.size(2);
  at::Tensor partial = at::zeros({batch, n_band}, x.options().dtype(at::kDouble));
  C10_CUDA_CHECK(launch_band_l1(
      dtype_of(x), x.const_data_ptr(), n_band, batch, d, partial.data_ptr<double>(),
      c10::cuda::getCurrentCUDAStream()));
  return partial.sum(1) / (static_cast<double>(n_band) * d);
}

}  // namespace
}  // namespace semgrad::cuda

TORCH_LIBRARY_IMPL(semgrad, CUDA, m) {
  m.impl("token_stats", &semgrad::cuda::token_stats_cuda);
  m.impl("head_grad_l1", &semgrad::cuda::head_grad_l1_cuda);
  m.impl("band_l1", &semgrad::cuda::band_l1_cuda);
}
