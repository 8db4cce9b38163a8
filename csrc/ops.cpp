// The one schema of the native scoring ops; CPU and CUDA kernels register against it.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(semgrad, m) {
  // logits [N, V], targets [N] -> (logp [N], entropy [N], softmax - onehot [N, V]), float32 or wider.
  // check=False: no error for NaN/+inf logits (their rows get NaN entropy) and no target range check,
  // so that a CUDA caller validates once per batch instead of synchronizing here.
  m.def("token_stats(Tensor logits, Tensor targets, bool check=True) -> (Tensor, Tensor, Tensor)");
  // per sequence b (rows offsets[b]..offsets[b+1]): mean |sum_t row_scale_t nll_grad_t hidden_t^T| -> float64 [B]
  m.def("head_grad_l1(Tensor nll_grad, Tensor hidden, Tensor row_scale, Tensor offsets) -> Tensor");
  // grads [n_band, B, d] -> float64 [B]: sum |grads[:, b, :]| / (n_band d)
  m.def("band_l1(Tensor grads) -> Tensor");
}

// Importing semgrad_serve._C runs the registrations above; the module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
