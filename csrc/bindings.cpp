// Operator schemas of guidg_fast._C, declared once: each op's forward and backward kernels, one CPU
// implementation (csrc/cpu) and one CUDA implementation (csrc/cuda) each. They are the `ext` backend
// of the op's torch.library custom op in guidg_fast/ops, which holds the fake function and the
// autograd formula and calls these inside; prefix_attention_packed (CPU only, no other backend)
// takes its fake and autograd formula on these operators directly.
#include <Python.h>
#include <torch/library.h>

#include "cpu_isa.h"

namespace {

// _C.cpu_isa() -> "avx512" | "avx2" | "baseline": what the CPU row loops run now
PyObject* py_cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(guidg_fast::isa_name(guidg_fast::cpu_isa())); }

// _C.set_cpu_isa_cap(name): caps the CPU row loops as GUIDG_FAST_CPU_ISA does (tests run every path)
PyObject* py_set_cpu_isa_cap(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  try {
    guidg_fast::set_cpu_isa_cap(guidg_fast::parse_isa(name));
  } catch (const std::invalid_argument& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyMethodDef module_methods[] = {
    {"cpu_isa", py_cpu_isa, METH_NOARGS, "the ISA the CPU row loops use now"},
    {"set_cpu_isa_cap", py_set_cpu_isa_cap, METH_O, "cap the CPU row loops at avx512, avx2 or baseline"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
// Importing guidg_fast._C loads this library, which runs the TORCH_LIBRARY registrations below.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "guidg_fast C++/CUDA kernels", -1,
                                          module_methods};
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

// One block per op, in the order of docs/design.md; keep a blank line between blocks.
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
  // out (B, C) = temperature * sum_k w_k f @ T_k^T; w (K,) batch or (B, K) per-sample weights.
  m.def("ensemble_logits_forward(Tensor f, Tensor T, Tensor w, float temperature) -> Tensor");
  // (grad_f, grad_T, grad_w); a gradient whose need_* flag is false comes back empty (shape (0,)).
  m.def(
      "ensemble_logits_backward(Tensor grad, Tensor f, Tensor T, Tensor w, float temperature, bool need_f, "
      "bool need_T, bool need_w) -> (Tensor, Tensor, Tensor)");

  // --- prefix_attention ---
  // Causal attention of M suffixes per expert over the expert's shared prefix (flash style).
  // q, k, v (K, M, S, H, Dh) (any strides, Dh stride 1 preferred); k_prefix, v_prefix (K, P, H, Dh).
  // Returns out (K, M, S, H, Dh) and the log-sum-exp of each query's scaled scores, lse (K, M, H, S).
  m.def("prefix_attention_forward(Tensor q, Tensor k, Tensor v, Tensor k_prefix, Tensor v_prefix, float scale) -> (Tensor, Tensor)");
  // Returns dq, dk, dv (K, M, S, H, Dh) and dk_prefix, dv_prefix (K, P, H, Dh), summed over the M sequences.
  m.def("prefix_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor k_prefix, Tensor v_prefix, Tensor out, Tensor lse, float scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Every suffix group of a text pass at once (CPU): qkv (T, 3, H, Dh) the fused QKV projection of
  // the T packed suffix tokens, groups = [first token, M, S] per group (back to back, K * M * S
  // tokens each). Returns out (T, H, Dh) and lse (T * H,); the backward returns dqkv (T, 3, H, Dh)
  // and dk_prefix, dv_prefix summed over all groups.
  m.def("prefix_attention_packed_forward(Tensor qkv, Tensor k_prefix, Tensor v_prefix, int[] groups, float scale) -> (Tensor, Tensor)");
  m.def("prefix_attention_packed_backward(Tensor grad_out, Tensor qkv, Tensor k_prefix, Tensor v_prefix, Tensor out, Tensor lse, int[] groups, float scale) -> (Tensor, Tensor, Tensor)");

  // --- eot_project ---
  // normalize(layer_norm(x[n, eot_index[n]]) @ proj): returns out (N, D), xhat (N, W) (normalised EOT
  // rows before the affine), rstd (N,), inv_norm (N,) = 1 / |z|; the last three are saved for backward.
  m.def("eot_project_forward(Tensor x, Tensor eot_index, Tensor ln_weight, Tensor ln_bias, Tensor proj, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  // Returns dx (N, S, W) (zero except the EOT rows), d ln_weight, d ln_bias, d proj.
  m.def("eot_project_backward(Tensor grad_out, Tensor out, Tensor inv_norm, Tensor xhat, Tensor rstd, Tensor eot_index, Tensor x, Tensor ln_weight, Tensor ln_bias, Tensor proj) -> (Tensor, Tensor, Tensor, Tensor)");
}

// --- randaugment_uint8 (CPU) ---
// RandAugment rounds on uint8 images (B, 3, H, W): op_ids (B, rounds) int64 (torchvision's op order),
// magnitudes (B, rounds) float64 signed magnitudes, source_maps (maps, H * W) int32 (1 + source pixel,
// 0 = fill) for ShearX / ShearY / Rotate, picked per (sample, round) by source_rows (B, rounds) int64;
// fill: 3 levels. Returns a new contiguous uint8 batch (guidg_fast/ops/randaugment.py).
TORCH_LIBRARY_FRAGMENT(guidg_fast, m) {
  m.def("randaugment_uint8(Tensor images, Tensor op_ids, Tensor magnitudes, Tensor source_maps, Tensor source_rows, int[] fill) -> Tensor");
}
