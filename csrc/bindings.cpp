// guidg_fast._C: the extension's kernels as plain functions, one per op direction, each sending a
// call to the CPU launcher (csrc/cpu) or the CUDA launcher (csrc/cuda) by the device of its
// tensors. The extension declares no dispatcher operators: the op schemas are the torch.library
// custom ops of guidg_fast/ops (one forward and one backward per op, with their fake functions and
// autograd formula), whose `ext` backend calls these functions. A dispatcher key holds one kernel
// per operator, so the per-call choice between these kernels and Triton (GUIDG_FAST_BACKEND,
// ops.use_backend) has to live above the dispatcher, in those custom ops.
#include <torch/extension.h>

#include <initializer_list>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_isa.h"
#include "launchers.h"

namespace guidg_fast {
namespace {

struct NamedTensor {
  const char* name;
  const at::Tensor& tensor;
};

// Whether `op` runs its CUDA launcher: every tensor argument on one device, the CPU or a CUDA device
// this build has kernels for.
bool runs_on_cuda(const char* op, std::initializer_list<NamedTensor> args) {
  const NamedTensor& first = *args.begin();
  const at::Device device = first.tensor.device();
  for (const NamedTensor& arg : args) {
    TORCH_CHECK(arg.tensor.device() == device, op, ": every tensor argument must be on one device, but ", first.name,
                " is on ", device, " and ", arg.name, " on ", arg.tensor.device());
  }
  TORCH_CHECK(device.is_cpu() || device.is_cuda(), op, ": expected CPU or CUDA tensors, got ", first.name, " on ",
              device);
#ifndef GUIDG_FAST_WITH_CUDA
  TORCH_CHECK(device.is_cpu(), op, ": ", first.name, " is a CUDA tensor but guidg_fast._C was built without CUDA "
              "(rebuild it with nvcc on the PATH, or use the triton or eager backend)");
#endif
  return device.is_cuda();
}

// For the CPU-only kernels: every tensor argument on the CPU.
void check_cpu_only(const char* op, std::initializer_list<NamedTensor> args) {
  TORCH_CHECK(!runs_on_cuda(op, args), op, ": has a CPU kernel only, got CUDA tensors (", args.begin()->name, " on ",
              args.begin()->tensor.device(), ")");
}

#ifdef GUIDG_FAST_WITH_CUDA
#define GF_LAUNCH(on_cuda, launcher, ...) ((on_cuda) ? launcher##_cuda(__VA_ARGS__) : launcher##_cpu(__VA_ARGS__))
#else
#define GF_LAUNCH(on_cuda, launcher, ...) ((void)(on_cuda), launcher##_cpu(__VA_ARGS__))
#endif

// --- bma_update_ ---
// In place: averaged[i] <- (averaged[i] + r * tensors[i]) / (1 + r) for every i, one call.
void bma_update_(const std::vector<at::Tensor>& averaged_tensors, const std::vector<at::Tensor>& tensors,
                 double relative_weight) {
  if (averaged_tensors.empty()) {  // nothing to update (the launchers check the lengths match)
    TORCH_CHECK(tensors.empty(), "bma_update_: averaged_tensors and tensors must have the same length, got 0 and ",
                tensors.size());
    return;
  }
  const at::Device device = averaged_tensors[0].device();
  for (const auto* list : {&averaged_tensors, &tensors}) {
    const char* name = list == &tensors ? "tensors" : "averaged_tensors";
    for (size_t i = 0; i < list->size(); ++i) {
      TORCH_CHECK((*list)[i].device() == device, "bma_update_: every tensor must be on one device, but "
                  "averaged_tensors[0] is on ", device, " and ", name, "[", i, "] on ", (*list)[i].device());
    }
  }
  const bool on_cuda = runs_on_cuda("bma_update_", {{"averaged_tensors[0]", averaged_tensors[0]}});
  GF_LAUNCH(on_cuda, bma_update, averaged_tensors, tensors, relative_weight);
}

// --- cmattn ---
// Fused score / softmax over experts / mean over heads of the cross-modal attention.
// q (B, H, D): every head's v-projection; keys (K, H, D): every head's pooled expert key;
// cosine: torch cosine_similarity (eps 1e-8) if true, else q.key / sqrt(D). out (B, K).
at::Tensor cmattn_forward(const at::Tensor& q, const at::Tensor& keys, bool cosine) {
  const bool on_cuda = runs_on_cuda("cmattn_forward", {{"q", q}, {"keys", keys}});
  return GF_LAUNCH(on_cuda, cmattn_forward, q, keys, cosine);
}
// -> (dq (B, H, D), dkey (K, H, D)) for the upstream gradient grad_out (B, K).
Tensor2 cmattn_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& keys, bool cosine) {
  const bool on_cuda = runs_on_cuda("cmattn_backward", {{"grad_out", grad_out}, {"q", q}, {"keys", keys}});
  return GF_LAUNCH(on_cuda, cmattn_backward, grad_out, q, keys, cosine);
}

// --- multi_expert_loss ---
// Forward: (loss, lse (B, K), ce (B, K), o (B, K, D) or empty, pbar (K, C) or empty). o is the
// softmax-weighted expert feature sum_c p_bc T_k[c] (only with need_o and no entropy term); pbar
// the batch-mean probabilities (only with the entropy term). Both feed the backward.
Tensor5 multi_expert_loss_forward(const at::Tensor& f, const at::Tensor& T, const at::Tensor& y, const at::Tensor& w,
                                  double temperature, double margin, double entropy_weight, bool need_o) {
  const bool on_cuda = runs_on_cuda("multi_expert_loss_forward", {{"f", f}, {"T", T}, {"y", y}, {"w", w}});
  return GF_LAUNCH(on_cuda, multi_expert_loss::multi_expert_loss_forward, f, T, y, w, temperature, margin,
                   entropy_weight, need_o);
}
// Backward: (df (B, D), dT (K, C, D), dw like w); a gradient that is not needed comes back empty.
Tensor3 multi_expert_loss_backward(const at::Tensor& grad, const at::Tensor& f, const at::Tensor& T,
                                   const at::Tensor& y, const at::Tensor& w, const at::Tensor& lse,
                                   const at::Tensor& ce, const at::Tensor& o, const at::Tensor& pbar,
                                   double temperature, double margin, double entropy_weight, bool need_f,
                                   bool need_T, bool need_w) {
  const bool on_cuda = runs_on_cuda("multi_expert_loss_backward", {{"grad", grad}, {"f", f}, {"T", T}, {"y", y},
                                    {"w", w}, {"lse", lse}, {"ce", ce}, {"o", o}, {"pbar", pbar}});
  return GF_LAUNCH(on_cuda, multi_expert_loss::multi_expert_loss_backward, grad, f, T, y, w, lse, ce, o, pbar,
                   temperature, margin, entropy_weight, need_f, need_T, need_w);
}

// --- ensemble_logits ---
// out (B, C) = temperature * sum_k w_k f @ T_k^T; w (K,) batch or (B, K) per-sample weights.
at::Tensor ensemble_logits_forward(const at::Tensor& f, const at::Tensor& T, const at::Tensor& w, double temperature) {
  const bool on_cuda = runs_on_cuda("ensemble_logits_forward", {{"f", f}, {"T", T}, {"w", w}});
  return GF_LAUNCH(on_cuda, ensemble_logits_forward, f, T, w, temperature);
}
// (grad_f, grad_T, grad_w); a gradient whose need_* flag is false comes back empty (shape (0,)).
Tensor3 ensemble_logits_backward(const at::Tensor& grad, const at::Tensor& f, const at::Tensor& T, const at::Tensor& w,
                                 double temperature, bool need_f, bool need_T, bool need_w) {
  const bool on_cuda = runs_on_cuda("ensemble_logits_backward", {{"grad", grad}, {"f", f}, {"T", T}, {"w", w}});
  return GF_LAUNCH(on_cuda, ensemble_logits_backward, grad, f, T, w, temperature, need_f, need_T, need_w);
}

// --- prefix_attention ---
// Causal attention of M suffixes per expert over the expert's shared prefix (flash style).
// q, k, v (K, M, S, H, Dh) (any strides, Dh stride 1 preferred); k_prefix, v_prefix (K, P, H, Dh).
// Returns out (K, M, S, H, Dh) and the log-sum-exp of each query's scaled scores, lse (K, M, H, S).
Tensor2 prefix_attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& k_prefix, const at::Tensor& v_prefix, double scale) {
  const bool on_cuda = runs_on_cuda("prefix_attention_forward",
                                    {{"q", q}, {"k", k}, {"v", v}, {"k_prefix", k_prefix}, {"v_prefix", v_prefix}});
  return GF_LAUNCH(on_cuda, prefix_attention_forward, q, k, v, k_prefix, v_prefix, scale);
}
// Returns dq, dk, dv (K, M, S, H, Dh) and dk_prefix, dv_prefix (K, P, H, Dh), summed over the M sequences.
Tensor5 prefix_attention_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                  const at::Tensor& v, const at::Tensor& k_prefix, const at::Tensor& v_prefix,
                                  const at::Tensor& out, const at::Tensor& lse, double scale) {
  const bool on_cuda = runs_on_cuda("prefix_attention_backward",
                                    {{"grad_out", grad_out}, {"q", q}, {"k", k}, {"v", v}, {"k_prefix", k_prefix},
                                     {"v_prefix", v_prefix}, {"out", out}, {"lse", lse}});
  return GF_LAUNCH(on_cuda, prefix_attention_backward, grad_out, q, k, v, k_prefix, v_prefix, out, lse, scale);
}
// Every suffix group of a text pass at once (CPU): qkv (T, 3, H, Dh) the fused QKV projection of
// the T packed suffix tokens, groups = [first token, M, S] per group (back to back, K * M * S
// tokens each). Returns out (T, H, Dh) and lse (T * H,); the backward returns dqkv (T, 3, H, Dh)
// and dk_prefix, dv_prefix summed over all groups.
Tensor2 prefix_attention_packed_forward(const at::Tensor& qkv, const at::Tensor& k_prefix, const at::Tensor& v_prefix,
                                        const std::vector<int64_t>& groups, double scale) {
  check_cpu_only("prefix_attention_packed_forward", {{"qkv", qkv}, {"k_prefix", k_prefix}, {"v_prefix", v_prefix}});
  return prefix_attention_packed_forward_cpu(qkv, k_prefix, v_prefix, groups, scale);
}
Tensor3 prefix_attention_packed_backward(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& k_prefix,
                                         const at::Tensor& v_prefix, const at::Tensor& out, const at::Tensor& lse,
                                         const std::vector<int64_t>& groups, double scale) {
  check_cpu_only("prefix_attention_packed_backward", {{"grad_out", grad_out}, {"qkv", qkv}, {"k_prefix", k_prefix},
                                                      {"v_prefix", v_prefix}, {"out", out}, {"lse", lse}});
  return prefix_attention_packed_backward_cpu(grad_out, qkv, k_prefix, v_prefix, out, lse, groups, scale);
}

// --- eot_project ---
// normalize(layer_norm(x[n, eot_index[n]]) @ proj): returns out (N, D), xhat (N, W) (normalised EOT
// rows before the affine), rstd (N,), inv_norm (N,) = 1 / |z|; the last three are saved for backward.
Tensor4 eot_project_forward(const at::Tensor& x, const at::Tensor& eot_index, const at::Tensor& ln_weight,
                            const at::Tensor& ln_bias, const at::Tensor& proj, double eps) {
  const bool on_cuda = runs_on_cuda("eot_project_forward", {{"x", x}, {"eot_index", eot_index},
                                    {"ln_weight", ln_weight}, {"ln_bias", ln_bias}, {"proj", proj}});
  return GF_LAUNCH(on_cuda, eot_project_forward, x, eot_index, ln_weight, ln_bias, proj, eps);
}
// Returns dx (N, S, W) (zero except the EOT rows), d ln_weight, d ln_bias, d proj.
Tensor4 eot_project_backward(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& inv_norm,
                             const at::Tensor& xhat, const at::Tensor& rstd, const at::Tensor& eot_index,
                             const at::Tensor& x, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
                             const at::Tensor& proj) {
  const bool on_cuda = runs_on_cuda("eot_project_backward",
                                    {{"grad_out", grad_out}, {"out", out}, {"inv_norm", inv_norm}, {"xhat", xhat},
                                     {"rstd", rstd}, {"eot_index", eot_index}, {"x", x}, {"ln_weight", ln_weight},
                                     {"ln_bias", ln_bias}, {"proj", proj}});
  return GF_LAUNCH(on_cuda, eot_project_backward, grad_out, out, inv_norm, xhat, rstd, eot_index, x, ln_weight,
                   ln_bias, proj);
}

// --- randaugment_uint8 (CPU) ---
// RandAugment rounds on uint8 images (B, 3, H, W): op_ids (B, rounds) int64 (torchvision's op order),
// magnitudes (B, rounds) float64 signed magnitudes, source_maps (maps, H * W) int32 (1 + source pixel,
// 0 = fill) for ShearX / ShearY / Rotate, picked per (sample, round) by source_rows (B, rounds) int64;
// fill: 3 levels. Returns a new contiguous uint8 batch (guidg_fast/ops/randaugment.py).
at::Tensor randaugment_uint8(const at::Tensor& images, const at::Tensor& op_ids, const at::Tensor& magnitudes,
                             const at::Tensor& source_maps, const at::Tensor& source_rows,
                             const std::vector<int64_t>& fill) {
  check_cpu_only("randaugment_uint8", {{"images", images}, {"op_ids", op_ids}, {"magnitudes", magnitudes},
                                       {"source_maps", source_maps}, {"source_rows", source_rows}});
  return randaugment_uint8_cpu(images, op_ids, magnitudes, source_maps, source_rows, fill);
}

#undef GF_LAUNCH

}  // namespace
}  // namespace guidg_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  namespace gf = guidg_fast;
  m.doc() = "guidg_fast C++/CUDA kernels";
  // the kernels touch no Python object: other Python threads run meanwhile, as around a torch op
  const auto no_gil = py::call_guard<py::gil_scoped_release>();

  m.def("cpu_isa", [] { return std::string(gf::isa_name(gf::cpu_isa())); },
        "the ISA the CPU row loops use now: avx512, avx2 or baseline");
  // std::invalid_argument (an unknown name) arrives in Python as ValueError
  m.def("set_cpu_isa_cap", [](const std::string& name) { gf::set_cpu_isa_cap(gf::parse_isa(name.c_str())); },
        py::arg("name"), "cap the CPU row loops at avx512, avx2 or baseline (as GUIDG_FAST_CPU_ISA does)");
#ifdef GUIDG_FAST_WITH_CUDA
  m.attr("WITH_CUDA") = 1;
#else
  m.attr("WITH_CUDA") = 0;
#endif

  m.def("bma_update_", &gf::bma_update_, py::arg("averaged_tensors"), py::arg("tensors"), py::arg("relative_weight"),
        no_gil);
  m.def("cmattn_forward", &gf::cmattn_forward, py::arg("q"), py::arg("keys"), py::arg("cosine"), no_gil);
  m.def("cmattn_backward", &gf::cmattn_backward, py::arg("grad_out"), py::arg("q"), py::arg("keys"), py::arg("cosine"),
        no_gil);
  m.def("multi_expert_loss_forward", &gf::multi_expert_loss_forward, py::arg("f"), py::arg("T"), py::arg("y"),
        py::arg("w"), py::arg("temperature"), py::arg("margin"), py::arg("entropy_weight"), py::arg("need_o"), no_gil);
  m.def("multi_expert_loss_backward", &gf::multi_expert_loss_backward, py::arg("grad"), py::arg("f"), py::arg("T"),
        py::arg("y"), py::arg("w"), py::arg("lse"), py::arg("ce"), py::arg("o"), py::arg("pbar"),
        py::arg("temperature"), py::arg("margin"), py::arg("entropy_weight"), py::arg("need_f"), py::arg("need_T"),
        py::arg("need_w"), no_gil);
  m.def("ensemble_logits_forward", &gf::ensemble_logits_forward, py::arg("f"), py::arg("T"), py::arg("w"),
        py::arg("temperature"), no_gil);
  m.def("ensemble_logits_backward", &gf::ensemble_logits_backward, py::arg("grad"), py::arg("f"), py::arg("T"),
        py::arg("w"), py::arg("temperature"), py::arg("need_f"), py::arg("need_T"), py::arg("need_w"), no_gil);
  m.def("prefix_attention_forward", &gf::prefix_attention_forward, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("k_prefix"), py::arg("v_prefix"), py::arg("scale"), no_gil);
  m.def("prefix_attention_backward", &gf::prefix_attention_backward, py::arg("grad_out"), py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("k_prefix"), py::arg("v_prefix"), py::arg("out"), py::arg("lse"), py::arg("scale"),
        no_gil);
  m.def("prefix_attention_packed_forward", &gf::prefix_attention_packed_forward, py::arg("qkv"), py::arg("k_prefix"),
        py::arg("v_prefix"), py::arg("groups"), py::arg("scale"), no_gil);
  m.def("prefix_attention_packed_backward", &gf::prefix_attention_packed_backward, py::arg("grad_out"), py::arg("qkv"),
        py::arg("k_prefix"), py::arg("v_prefix"), py::arg("out"), py::arg("lse"), py::arg("groups"), py::arg("scale"),
        no_gil);
  m.def("eot_project_forward", &gf::eot_project_forward, py::arg("x"), py::arg("eot_index"), py::arg("ln_weight"),
        py::arg("ln_bias"), py::arg("proj"), py::arg("eps"), no_gil);
  m.def("eot_project_backward", &gf::eot_project_backward, py::arg("grad_out"), py::arg("out"), py::arg("inv_norm"),
        py::arg("xhat"), py::arg("rstd"), py::arg("eot_index"), py::arg("x"), py::arg("ln_weight"), py::arg("ln_bias"),
        py::arg("proj"), no_gil);
  m.def("randaugment_uint8", &gf::randaugment_uint8, py::arg("images"), py::arg("op_ids"), py::arg("magnitudes"),
        py::arg("source_maps"), py::arg("source_rows"), py::arg("fill"), no_gil);
}
