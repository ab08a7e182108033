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
  // Forward: (loss, lse (B, K), ce (B, K), o (B, K, D) or empty, pbar (K, C) or empty). o is the
  // softmax-weighted expert feature sum_c p_bc T_k[c] (only with need_o and no entropy term); pbar
  // the batch-mean probabilities (only with the entropy term). Both feed the backward.
  m.def("multi_expert_loss_forward(Tensor f, Tensor T, Tensor y, Tensor w, float temperature, float margin, "
        "float entropy_weight, bool need_o) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Backward: (df (B, D), dT (K, C, D), dw like w); a gradient that is not needed comes back empty.
  m.def("multi_expert_loss_backward(Tensor grad, Tensor f, Tensor T, Tensor y, Tensor w, Tensor lse, Tensor ce, "
        "Tensor o, Tensor pbar, float temperature, float margin, float entropy_weight, bool need_f, bool need_T, "
        "bool need_w) -> (Tensor, Tensor, Tensor)");

  // --- ensemble_logits ---

  // --- prefix_attention ---

  // --- eot_project ---
}
