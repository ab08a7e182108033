// Operator schemas of guidg_fast._C, declared once. CPU kernels register in csrc/cpu, CUDA kernels
// in csrc/cuda; fake (meta) and autograd formulas are registered from Python (guidg_fast/ops).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing guidg_fast._C loads this library, which runs the TORCH_LIBRARY registrations below.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "guidg_fast C++/CUDA kernels", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef GUIDG_FAST_WITH_CUDA
  PyModule_AddIntConstant(module, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(module, "WITH_CUDA", 0);
#endif
  return module;
}
}

// One block per op, in the order of DESIGN.md; keep a blank line between blocks.
TORCH_LIBRARY(guidg_fast, m) {
  // --- bma_update_ ---
  // In place: averaged[i] <- (averaged[i] + r * tensors[i]) / (1 + r) for every i, one call.
  m.def("bma_update_(Tensor(a!)[] averaged_tensors, Tensor[] tensors, float relative_weight) -> ()");

  // --- cmattn ---

  // --- multi_expert_loss ---

  // --- ensemble_logits ---
  // out (B, C) = temperature * sum_k w_k f @ T_k^T; w (K,) batch or (B, K) per-sample weights.
  m.def("ensemble_logits_forward(Tensor f, Tensor T, Tensor w, float temperature) -> Tensor");
  // (grad_f, grad_T, grad_w); a gradient whose need_* flag is false comes back empty (shape (0,)).
  m.def(
      "ensemble_logits_backward(Tensor grad, Tensor f, Tensor T, Tensor w, float temperature, bool need_f, "
      "bool need_T, bool need_w) -> (Tensor, Tensor, Tensor)");

  // --- prefix_attention ---

  // --- eot_project ---
}
