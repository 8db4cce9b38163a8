// Operation 2 on CUDA: one block per (64×64 tile of the V×d head gradient, sequence).
// The block accumulates Σ_t grad_t hidden_tᵀ over the sequence's rows through shared
// memory (4×4 outputs per thread), then abs-sums the tile into its own double partial:
// the V×d matrix is never stored and no atomics are used (deterministic).
#include "common.cuh"

namespace semgrad::cuda {
namespace {

constexpr int kTile = 64;  // tile edge, over V and over d
constexpr int kRows = 16;  // rows of the sequence staged in shared memory per step
constexpr int kSub = kTile / 16;  // outputs per thread along each edge (16×16 threads)
static_assert(kThreads == 256, "16x16 threads per tile");

template <typename acc_t>
__global__ void head_grad_l1_kernel(
    const acc_t* grad, int64_t stride_grad, const acc_t* hidden, const int64_t* offsets, int64_t n, int64_t v,
    int64_t d, int64_t tiles_d, double* partial) {
  __shared__ acc_t gs[kRows][kTile];
  __shared__ acc_t hs[kRows][kTile];
  const int64_t tile = blockIdx.x, b = blockIdx.y;
  const int64_t v0 = tile / tiles_d * kTile, d0 = tile % tiles_d * kTile;
  const int64_t start = min(max(offsets[b], int64_t{0}), n), end = min(max(offsets[b + 1], start), n);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;

  acc_t acc[kSub][kSub] = {};
  for (int64_t t0 = start; t0 < end; t0 += kRows) {
    for (int k = threadIdx.x; k < kRows * kTile; k += kThreads) {
      const int r = k / kTile, c = k % kTile;
      const int64_t t = t0 + r;
      gs[r][c] = t < end && v0 + c < v ? grad[t * stride_grad + v0 + c] : acc_t(0);
      hs[r][c] = t < end && d0 + c < d ? hidden[t * d + d0 + c] : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      acc_t a[kSub], h[kSub];
#pragma unroll
      for (int i = 0; i < kSub; ++i) {
        a[i] = gs[r][ty + 16 * i];
        h[i] = hs[r][tx + 16 * i];
      }
#pragma unroll
      for (int i = 0; i < kSub; ++i) {
#pragma unroll
        for (int j = 0; j < kSub; ++j) acc[i][j] += a[i] * h[j];
      }
    }
    __syncthreads();
  }
  acc_t sum = 0;  // entries outside V×d are 0
#pragma unroll
  for (int i = 0; i < kSub; ++i) {
#pragma unroll
    for (int j = 0; j < kSub; ++j) sum += fabs(acc[i][j]);
  }
  sum = block_reduce(sum, Sum{});
  if (threadIdx.x == 0) partial[b * gridDim.x + tile] = sum;
}

}  // namespace

int64_t head_grad_l1_tiles(int64_t v, int64_t d) { return ((v + kTile - 1) / kTile) * ((d + kTile - 1) / kTile); }

cudaError_t launch_head_grad_l1(
    Dtype acc, const void* grad, int64_t stride_grad, const void* hidden, const int64_t* offsets, int64_t batch,
    int64_t n, int64_t v, int64_t d, double* partial, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  const dim3 grid(head_grad_l1_tiles(v, d), batch);
  const int64_t tiles_d = (d + kTile - 1) / kTile;
  if (acc == Dtype::kFloat64) {
    head_grad_l1_kernel<double><<<grid, kThreads, 0, stream>>>(
        static_cast<const double*>(grad), stride_grad, static_cast<const double*>(hidden), offsets, n, v, d, tiles_d,
        partial);
  } else if (acc == Dtype::kFloat32) {
    head_grad_l1_kernel<float><<<grid, kThreads, 0, stream>>>(
        static_cast<const float*>(grad), stride_grad, static_cast<const float*>(hidden), offsets, n, v, d, tiles_d,
        partial);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace semgrad::cuda
