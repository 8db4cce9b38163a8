// Operation 3 on CUDA: one block per (band index, item) sums |grads| over d into its own
// double partial (deterministic, no atomics); cuda/ops.cpp adds the partials per item.
#include "common.cuh"

namespace semgrad::cuda {
namespace {

template <typename T, typename acc_t = acc_type<T>>
__global__ void band_l1_kernel(const T* grads, int64_t batch, int64_t d, double* partial) {
  const int64_t i = blockIdx.x, b = blockIdx.y;
  const T* row = grads + (i * batch + b) * d;
  acc_t sum = 0;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) sum += fabs(to_acc(row[j]));
  sum = block_reduce(sum, Sum{});
  if (threadIdx.x == 0) partial[b * gridDim.x + i] = sum;
}

}  // namespace

cudaError_t launch_band_l1(
    Dtype dtype, const void* grads, int64_t n_band, int64_t batch, int64_t d, double* partial, cudaStream_t stream) {
  if (n_band == 0 || batch == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    band_l1_kernel<T><<<dim3(n_band, batch), kThreads, 0, stream>>>(static_cast<const T*>(grads), batch, d, partial);
    return cudaGetLastError();
  });
}

}  // namespace semgrad::cuda
