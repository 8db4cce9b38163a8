// Device helpers shared by the kernels: dtype dispatch, loads in the accumulation type,
// and a block reduction with a fixed combination order (deterministic, no atomics).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "launchers.h"

namespace semgrad::cuda {

constexpr int kThreads = 256;

template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

__device__ inline float to_acc(float x) { return x; }
__device__ inline double to_acc(double x) { return x; }
__device__ inline float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ inline float to_acc(__half x) { return __half2float(x); }

// Calls f(T{}) with T the C++ type of dtype.
template <typename F>
cudaError_t dispatch(Dtype dtype, F&& f) {
  switch (dtype) {
    case Dtype::kFloat32: return f(float{});
    case Dtype::kFloat64: return f(double{});
    case Dtype::kBFloat16: return f(__nv_bfloat16{});
    case Dtype::kFloat16: return f(__half{});
  }
  return cudaErrorInvalidValue;
}

// op-reduction of x over the block (blockDim.x == kThreads); every thread gets the result.
template <typename T, typename Op>
__device__ T block_reduce(T x, Op op) {
  __shared__ T warp_results[kThreads / 32];
  __shared__ T result;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int offset = 16; offset > 0; offset /= 2) x = op(x, __shfl_down_sync(0xffffffffu, x, offset));
  if (lane == 0) warp_results[warp] = x;
  __syncthreads();
  if (threadIdx.x == 0) {
    T total = warp_results[0];
    for (int w = 1; w < kThreads / 32; ++w) total = op(total, warp_results[w]);
    result = total;
  }
  __syncthreads();
  const T total = result;
  __syncthreads();  // the next call may overwrite the shared buffers
  return total;
}

struct Sum {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a + b; }
};

struct Max {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a > b ? a : b; }
};

}  // namespace semgrad::cuda
