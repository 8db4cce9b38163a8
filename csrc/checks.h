// Argument checks shared by the CPU and CUDA kernels: the same ValueError on every device.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>

namespace semgrad {

inline constexpr char kNonFiniteLogits[] = "logits contain NaN or +inf: the model's forward pass is numerically broken";

// Every tensor argument on the first one's device: a CPU index tensor must never reach a CUDA kernel
// as a host pointer.
inline void check_same_device(const char* op, std::initializer_list<const at::Tensor*> tensors) {
  const at::Device device = (*tensors.begin())->device();
  for (const at::Tensor* t : tensors) {
    TORCH_CHECK_VALUE(t->device() == device, op, ": every argument must be on ", device, ", got one on ", t->device());
  }
}

inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(
      at::isFloatingType(t.scalar_type()), op, ": ", name, " must be a floating type, got ", t.scalar_type());
}

// check: also the targets' range (a device synchronization on CUDA; callers that validated the
// token ids on the host pass false).
inline void check_token_stats_args(const at::Tensor& logits, const at::Tensor& targets, bool check) {
  TORCH_CHECK_VALUE(
      logits.dim() == 2 && targets.dim() == 1 && targets.size(0) == logits.size(0),
      "expected logits [N, V] and targets [N], got ", logits.sizes(), " and ", targets.sizes());
  check_same_device("token_stats", {&logits, &targets});
  check_floating("token_stats", "logits", logits);
  TORCH_CHECK_VALUE(targets.scalar_type() == at::kLong, "targets must be int64, got ", targets.scalar_type());
  TORCH_CHECK_VALUE(
      !check || targets.numel() == 0 ||
          (targets.min().item<int64_t>() >= 0 && targets.max().item<int64_t>() < logits.size(1)),
      "target token id outside the vocabulary");
}

inline void check_head_grad_l1_shapes(
    const at::Tensor& nll_grad, const at::Tensor& hidden, const at::Tensor& row_scale, const at::Tensor& offsets) {
  TORCH_CHECK_VALUE(
      nll_grad.dim() == 2 && hidden.dim() == 2 && row_scale.dim() == 1 && offsets.dim() == 1 &&
          hidden.size(0) == nll_grad.size(0) && row_scale.size(0) == nll_grad.size(0) && offsets.size(0) >= 1,
      "expected nll_grad [N, V], hidden [N, d], row_scale [N], offsets [B + 1], got ", nll_grad.sizes(), ", ",
      hidden.sizes(), ", ", row_scale.sizes(), ", ", offsets.sizes());
  check_same_device("head_grad_l1", {&nll_grad, &hidden, &row_scale, &offsets});
  check_floating("head_grad_l1", "nll_grad", nll_grad);
  check_floating("head_grad_l1", "hidden", hidden);
  check_floating("head_grad_l1", "row_scale", row_scale);
  TORCH_CHECK_VALUE(offsets.scalar_type() == at::kLong, "offsets must be int64, got ", offsets.scalar_type());
}

// CPU: also the offsets' values, non-decreasing within [0, N]; returns them contiguous. (The CUDA
// kernel clamps each sequence's rows to [0, N] instead of reading the offsets back to the host.)
inline at::Tensor check_head_grad_l1_args(
    const at::Tensor& nll_grad, const at::Tensor& hidden, const at::Tensor& row_scale, const at::Tensor& offsets) {
  check_head_grad_l1_shapes(nll_grad, hidden, row_scale, offsets);
  at::Tensor host = offsets.contiguous();
  const int64_t* op = host.const_data_ptr<int64_t>();
  const int64_t batch = host.size(0) - 1;
  TORCH_CHECK_VALUE(op[0] >= 0 && op[batch] <= nll_grad.size(0), "offsets must lie in [0, N]");
  for (int64_t b = 0; b < batch; ++b) TORCH_CHECK_VALUE(op[b] <= op[b + 1], "offsets must be non-decreasing");
  return host;
}

inline void check_band_l1_args(const at::Tensor& grads) {
  TORCH_CHECK_VALUE(grads.dim() == 3, "expected grads [n_band, B, d], got ", grads.sizes());
  check_floating("band_l1", "grads", grads);
}

}  // namespace semgrad
