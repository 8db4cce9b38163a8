// Argument checks shared by the CPU and CUDA kernels: the same ValueError on every device.
#pragma once

#include <ATen/ATen.h>

namespace semgrad {

inline constexpr char kNonFiniteLogits[] = "logits contain NaN or +inf: the model's forward pass is numerically broken";

inline void check_token_stats_args(const at::Tensor& logits, const at::Tensor& targets) {
  TORCH_CHECK_VALUE(
      logits.dim() == 2 && targets.dim() == 1 && targets.size(0) == logits.size(0),
      "expected logits [N, V] and targets [N], got ", logits.sizes(), " and ", targets.sizes());
  TORCH_CHECK_VALUE(targets.scalar_type() == at::kLong, "targets must be int64, got ", targets.scalar_type());
  TORCH_CHECK_VALUE(
      targets.numel() == 0 || (targets.min().item<int64_t>() >= 0 && targets.max().item<int64_t>() < logits.size(1)),
      "target token id outside the vocabulary");
}

// Returns the offsets on the host, checked to be non-decreasing within [0, N].
inline at::Tensor check_head_grad_l1_args(
    const at::Tensor& nll_grad, const at::Tensor& hidden, const at::Tensor& row_scale, const at::Tensor& offsets) {
  TORCH_CHECK_VALUE(
      nll_grad.dim() == 2 && hidden.dim() == 2 && row_scale.dim() == 1 && offsets.dim() == 1 &&
          hidden.size(0) == nll_grad.size(0) && row_scale.size(0) == nll_grad.size(0) && offsets.size(0) >= 1,
      "expected nll_grad [N, V], hidden [N, d], row_scale [N], offsets [B + 1], got ", nll_grad.sizes(), ", ",
      hidden.sizes(), ", ", row_scale.sizes(), ", ", offsets.sizes());
  TORCH_CHECK_VALUE(offsets.scalar_type() == at::kLong, "offsets must be int64, got ", offsets.scalar_type());
  at::Tensor host = offsets.cpu().contiguous();
  const int64_t* op = host.const_data_ptr<int64_t>();
  const int64_t batch = host.size(0) - 1;
  TORCH_CHECK_VALUE(op[0] >= 0 && op[batch] <= nll_grad.size(0), "offsets must lie in [0, N]");
  for (int64_t b = 0; b < batch; ++b) TORCH_CHECK_VALUE(op[b] <= op[b + 1], "offsets must be non-decreasing");
  return host;
}

inline void check_band_l1_args(const at::Tensor& grads) {
  TORCH_CHECK_VALUE(grads.dim() == 3, "expected grads [n_band, B, d], got ", grads.sizes());
}

}  // namespace semgrad
