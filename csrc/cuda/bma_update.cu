// CUDA launcher for bma_update_: one launch per call walks a table of (tensor, chunk) pairs
// (multi-tensor apply), so a whole vision encoder is averaged with a single kernel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <vector>

#include "bma_update.h"
#include "bma_update_args.h"
#include "launchers.h"

namespace guidg_fast {
namespace {

template <typename scalar_t, typename acc_t>
__global__ void bma_update_kernel(scalar_t* const* avg_ptrs, const scalar_t* const* val_ptrs,
                                  const int64_t* numels, const int32_t* chunk_tensor,
                                  const int64_t* chunk_begin, BmaStep<acc_t> step) {
  const int32_t t = chunk_tensor[blockIdx.x];
  const int64_t begin = chunk_begin[blockIdx.x];
  const int64_t end = min(numels[t], begin + kBmaChunk);
  scalar_t* avg = avg_ptrs[t];
  const scalar_t* val = val_ptrs[t];
  for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
    avg[j] = static_cast<scalar_t>(step(static_cast<acc_t>(avg[j]), static_cast<acc_t>(val[j])));
  }
}

}  // namespace

void bma_update_cuda(at::TensorList averaged, at::TensorList tensors, double relative_weight) {
  const at::Device device = averaged.empty() ? at::Device(at::kCUDA) : averaged[0].device();
  TORCH_CHECK(device.is_cuda(), "bma_update_ (CUDA kernel): averaged_tensors[0] must be a CUDA tensor, got ", device);
  bma_update::check_inputs(averaged, tensors, device, "CUDA kernel");
  if (averaged.empty()) return;
  const auto dtype = averaged[0].scalar_type();
  const int64_t n_tensors = static_cast<int64_t>(averaged.size());
  // Host table: [avg ptrs | val ptrs | numels] as int64, then chunk tables.
  std::vector<int64_t> table(3 * n_tensors);
  std::vector<int32_t> chunk_tensor;
  std::vector<int64_t> chunk_begin;
  for (int64_t i = 0; i < n_tensors; ++i) {
    const auto& a = averaged[i];
    const auto& t = tensors[i];
    table[i] = reinterpret_cast<int64_t>(a.data_ptr());
    table[n_tensors + i] = reinterpret_cast<int64_t>(t.data_ptr());
    table[2 * n_tensors + i] = a.numel();
    for (int64_t s = 0; s < a.numel(); s += kBmaChunk) {
      chunk_tensor.push_back(static_cast<int32_t>(i));
      chunk_begin.push_back(s);
    }
  }
  if (chunk_tensor.empty()) return;
  const int64_t n_chunks = static_cast<int64_t>(chunk_tensor.size());
  c10::cuda::CUDAGuard guard(device);
  auto cpu_opts = at::TensorOptions().dtype(at::kLong).pinned_memory(true);
  auto host = at::empty({3 * n_tensors + n_chunks * 2}, cpu_opts);
  int64_t* h = host.data_ptr<int64_t>();
  std::copy(table.begin(), table.end(), h);
  std::copy(chunk_begin.begin(), chunk_begin.end(), h + 3 * n_tensors);
  int32_t* h_chunk_tensor = reinterpret_cast<int32_t*>(h + 3 * n_tensors + n_chunks);
  std::copy(chunk_tensor.begin(), chunk_tensor.end(), h_chunk_tensor);
  // A non-blocking copy from pinned memory records an event, so the staging buffer is not reused
  // before the transfer has finished.
  auto dev = host.to(device, /*non_blocking=*/true);
  const int64_t* d = dev.data_ptr<int64_t>();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "bma_update_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BmaStep<acc_t> step{static_cast<acc_t>(relative_weight), static_cast<acc_t>(1.0 + relative_weight)};
    bma_update_kernel<scalar_t, acc_t><<<static_cast<unsigned>(n_chunks), 512, 0, stream>>>(
        reinterpret_cast<scalar_t* const*>(d), reinterpret_cast<const scalar_t* const*>(d + n_tensors),
        d + 2 * n_tensors, reinterpret_cast<const int32_t*>(d + 3 * n_tensors + n_chunks), d + 3 * n_tensors, step);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace guidg_fast
