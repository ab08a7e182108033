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
  // Fused score / softmax over experts / mean over heads of the cross-modal attention.
  // q (B, H, D): every head's v-projection; keys (K, H, D): every head's pooled expert key;
  // cosine: torch cosine_similarity (eps 1e-8) if true, else q.key / sqrt(D). out (B, K).
  m.def("cmattn_forward(Tensor q, Tensor keys, bool cosine) -> Tensor");
  // -> (dq (B, H, D), dkey (K, H, D)) for the upstream gradient grad_out (B, K).
  m.def("cmattn_backward(Tensor grad_out, Tensor q, Tensor keys, bool cosine) -> (Tensor, Tensor)");

  // --- multi_expert_loss ---

  // --- ensemble_logits ---

  // --- prefix_attention ---

  // --- eot_project ---
}
