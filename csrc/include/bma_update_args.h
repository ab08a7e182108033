// Host-side argument checks of bma_update_, shared by the CPU and CUDA launchers.
#pragma once

#include <ATen/ATen.h>

namespace guidg_fast {
namespace bma_update {

// averaged_tensors and tensors: one length; pair i of one shape; every tensor of one dtype, dense
// and on `device` (kernel names the launcher in the message: "CPU kernel" / "CUDA kernel").
inline void check_inputs(at::TensorList averaged, at::TensorList tensors, const at::Device& device,
                         const char* kernel) {
  TORCH_CHECK(averaged.size() == tensors.size(), "bma_update_: averaged_tensors and tensors must have the same length, "
              "got ", averaged.size(), " and ", tensors.size());
  if (averaged.empty()) return;
  const auto dtype = averaged[0].scalar_type();
  for (size_t i = 0; i < averaged.size(); ++i) {
    const at::Tensor& a = averaged[i];
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(a.device() == device && t.device() == device, "bma_update_ (", kernel, "): averaged_tensors[", i,
                "] and tensors[", i, "] must be on ", device, ", got ", a.device(), " and ", t.device());
    TORCH_CHECK(a.scalar_type() == dtype && t.scalar_type() == dtype,
                "bma_update_: all tensors of one call must share a dtype (", dtype, "), got ", a.scalar_type(),
                " and ", t.scalar_type(), " at index ", i);
    TORCH_CHECK(a.sizes() == t.sizes(), "bma_update_: averaged_tensors[", i, "] has shape ", a.sizes(),
                " but tensors[", i, "] has shape ", t.sizes());
    TORCH_CHECK(a.is_contiguous() && t.is_contiguous(), "bma_update_: averaged_tensors[", i, "] and tensors[", i,
                "] must be contiguous");
  }
}

}  // namespace bma_update
}  // namespace guidg_fast
