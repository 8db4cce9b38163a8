// Raw-pointer launchers of the CUDA kernels. Only CUDA runtime types appear here, so the
// .cu files build with plain nvcc (no torch headers); cuda/ops.cpp binds them to the ops.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace semgrad::cuda {

enum class Dtype { kFloat32, kFloat64, kBFloat16, kFloat16 };

// Accumulation ("acc") buffers are double for kFloat64 input, float otherwise.

// Operation 1, one block per row of logits [n, v] (row stride stride_row): logp, entropy [n]
// and grad = softmax − onehot [n, v] (contiguous), all acc; nonfinite[r] = 1 if row r holds NaN/+inf
// (its logp and entropy are then NaN).
cudaError_t launch_token_stats(
    Dtype dtype, const void* logits, int64_t stride_row, const int64_t* targets, int64_t n, int64_t v, void* logp,
    void* entropy, void* grad, uint8_t* nonfinite, cudaStream_t stream);

// Operation 2: number of V×d tiles of one sequence.
int64_t head_grad_l1_tiles(int64_t v, int64_t d);

// Operation 2: grad [N, v] (row stride stride_grad) and scaled hidden [N, d] (contiguous), both acc
// of type acc (kFloat32 or kFloat64); partial[b, tile] = Σ|tile of Σ_t grad_t hidden_tᵀ| over the
// rows offsets[b]..offsets[b+1] of sequence b (device offsets, clamped to [0, n]), in double.
cudaError_t launch_head_grad_l1(
    Dtype acc, const void* grad, int64_t stride_grad, const void* hidden, const int64_t* offsets, int64_t batch,
    int64_t n, int64_t v, int64_t d, double* partial, cudaStream_t stream);

// Operation 3: grads [n_band, batch, d] (contiguous) → partial[b, i] = Σ_j |grads[i, b, j]| in double.
cudaError_t launch_band_l1(
    Dtype dtype, const void* grads, int64_t n_band, int64_t batch, int64_t d, double* partial, cudaStream_t stream);

}  // namespace semgrad::cuda
