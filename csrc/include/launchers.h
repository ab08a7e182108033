// Per-device launchers of guidg_fast._C's kernels: csrc/cpu/<op>.cpp defines the *_cpu ones,
// csrc/cuda/<op>.cu the *_cuda ones (compiled only with GUIDG_FAST_WITH_CUDA). bindings.cpp picks
// one per call from the tensors' device; what each op computes is documented there, next to the
// function guidg_fast/ops calls.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace guidg_fast {

using Tensor2 = std::tuple<at::Tensor, at::Tensor>;
using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Tensor4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Tensor5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The launchers of one op on one device; the arguments are those of the _C function of that name.
#define GF_DECLARE_LAUNCHERS(dev)                                                                             \
  void bma_update_##dev(at::TensorList averaged, at::TensorList tensors, double relative_weight);            \
  at::Tensor cmattn_forward_##dev(const at::Tensor& q, const at::Tensor& keys, bool cosine);                 \
  Tensor2 cmattn_backward_##dev(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& keys,     \
                                bool cosine);                                                                \
  at::Tensor ensemble_logits_forward_##dev(const at::Tensor& f, const at::Tensor& T, const at::Tensor& w,    \
                                           double temperature);                                              \
  Tensor3 ensemble_logits_backward_##dev(const at::Tensor& grad, const at::Tensor& f, const at::Tensor& T,   \
                                         const at::Tensor& w, double temperature, bool need_f, bool need_T,  \
                                         bool need_w);                                                       \
  Tensor2 prefix_attention_forward_##dev(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,      \
                                         const at::Tensor& k_prefix, const at::Tensor& v_prefix,             \
                                         double scale);                                                      \
  Tensor5 prefix_attention_backward_##dev(const at::Tensor& grad_out, const at::Tensor& q,                   \
                                          const at::Tensor& k, const at::Tensor& v,                          \
                                          const at::Tensor& k_prefix, const at::Tensor& v_prefix,            \
                                          const at::Tensor& out, const at::Tensor& lse, double scale);       \
  Tensor4 eot_project_forward_##dev(const at::Tensor& x, const at::Tensor& eot_index,                        \
                                    const at::Tensor& ln_weight, const at::Tensor& ln_bias,                  \
                                    const at::Tensor& proj, double eps);                                     \
  Tensor4 eot_project_backward_##dev(const at::Tensor& grad_out, const at::Tensor& out,                      \
                                     const at::Tensor& inv_norm, const at::Tensor& xhat,                     \
                                     const at::Tensor& rstd, const at::Tensor& eot_index,                    \
                                     const at::Tensor& x, const at::Tensor& ln_weight,                       \
                                     const at::Tensor& ln_bias, const at::Tensor& proj);                     \
  namespace multi_expert_loss {                                                                              \
  Tensor5 multi_expert_loss_forward_##dev(const at::Tensor& f, const at::Tensor& T, const at::Tensor& y,     \
                                          const at::Tensor& w, double temperature, double margin,            \
                                          double entropy_weight, bool need_o);                               \
  Tensor3 multi_expert_loss_backward_##dev(const at::Tensor& grad, const at::Tensor& f, const at::Tensor& T, \
                                           const at::Tensor& y, const at::Tensor& w, const at::Tensor& lse,  \
                                           const at::Tensor& ce, const at::Tensor& o, const at::Tensor& pbar, \
                                           double temperature, double margin, double entropy_weight,         \
                                           bool need_f, bool need_T, bool need_w);                           \
  }

GF_DECLARE_LAUNCHERS(cpu)
#ifdef GUIDG_FAST_WITH_CUDA
GF_DECLARE_LAUNCHERS(cuda)
#endif
#undef GF_DECLARE_LAUNCHERS

// CPU only: the packed text-pass layout and the data workers' RandAugment.
Tensor2 prefix_attention_packed_forward_cpu(const at::Tensor& qkv, const at::Tensor& k_prefix,
                                            const at::Tensor& v_prefix, at::IntArrayRef groups, double scale);
Tensor3 prefix_attention_packed_backward_cpu(const at::Tensor& grad_out, const at::Tensor& qkv,
                                             const at::Tensor& k_prefix, const at::Tensor& v_prefix,
                                             const at::Tensor& out, const at::Tensor& lse, at::IntArrayRef groups,
                                             double scale);
at::Tensor randaugment_uint8_cpu(const at::Tensor& images, const at::Tensor& op_ids, const at::Tensor& magnitudes,
                                 const at::Tensor& source_maps, const at::Tensor& source_rows, at::IntArrayRef fill);

}  // namespace guidg_fast
