// Operation 1 on CUDA: one block per row, three passes over the logits (max and input
// check, exp sums, softmax − onehot), block sums in a fixed order (deterministic).
#include <cmath>

#include "common.cuh"

namespace semgrad::cuda {
namespace {

template <typename T, typename acc_t = acc_type<T>>
__global__ void token_stats_kernel(
    const T* logits, int64_t stride_row, const int64_t* targets, int64_t v, acc_t* logp, acc_t* entropy,
    acc_t* grad, uint8_t* nonfinite) {
  const int64_t row = blockIdx.x;
  const T* z = logits + row * stride_row;
  acc_t* g = grad + row * v;
  const acc_t inf = INFINITY;

  acc_t m = -inf;
  int bad = 0;
  for (int64_t j = threadIdx.x; j < v; j += blockDim.x) {
    const acc_t x = to_acc(z[j]);
    m = x > m ? x : m;
    bad |= !(x < inf);
  }
  m = block_reduce(m, Max{});
  bad = block_reduce(bad, Max{});
  if (bad) {
    if (threadIdx.x == 0) {
      nonfinite[row] = 1;
      logp[row] = entropy[row] = NAN;
    }
    return;
  }

  // s = Σ exp(z − m), t = Σ exp(z − m)(z − m); −inf entries add 0 to both.
  acc_t s = 0, t = 0;
  for (int64_t j = threadIdx.x; j < v; j += blockDim.x) {
    const acc_t x = to_acc(z[j]) - m;
    const acc_t e = exp(x);
    s += e;
    t += x == -inf ? acc_t(0) : e * x;
  }
  s = block_reduce(s, Sum{});
  t = block_reduce(t, Sum{});
  const acc_t log_s = log(s);
  const int64_t y = targets[row];
  if (threadIdx.x == 0) {
    nonfinite[row] = 0;
    logp[row] = (to_acc(z[y]) - m) - log_s;
    entropy[row] = log_s - t / s;
  }
  for (int64_t j = threadIdx.x; j < v; j += blockDim.x) {
    g[j] = exp((to_acc(z[j]) - m) - log_s) - (j == y ? acc_t(1) : acc_t(0));
  }
}

}  // namespace

cudaError_t launch_token_stats(
    Dtype dtype, const void* logits, int64_t stride_row, const int64_t* targets, int64_t n, int64_t v, void* logp,
    void* entropy, void* grad, uint8_t* nonfinite, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using acc_t = acc_type<T>;
    token_stats_kernel<T><<<n, kThreads, 0, stream>>>(
        static_cast<const T*>(logits), stride_row, targets, v, static_cast<acc_t*>(logp),
        static_cast<acc_t*>(entropy), static_cast<acc_t*>(grad), nonfinite);
    return cudaGetLastError();
  });
}

}  // namespace semgrad::cuda
