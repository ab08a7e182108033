// CPU launcher for bma_update_: every tensor of the list in one parallel_for over fixed chunks.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <vector>

#include "bma_update.h"

namespace guidg_fast {
namespace {

struct ChunkRef {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

void bma_update_cpu(at::TensorList averaged, at::TensorList tensors, double relative_weight) {
  TORCH_CHECK(averaged.size() == tensors.size(), "averaged_tensors and tensors must have the same length, got ",
              averaged.size(), " and ", tensors.size());
  if (averaged.empty()) return;
  const auto dtype = averaged[0].scalar_type();
  std::vector<ChunkRef> chunks;
  for (size_t i = 0; i < averaged.size(); ++i) {
    const auto& a = averaged[i];
    const auto& t = tensors[i];
    TORCH_CHECK(a.device().is_cpu() && t.device().is_cpu(), "bma_update_ (CPU kernel): averaged_tensors[", i,
                "] and tensors[", i, "] must be CPU tensors");
    TORCH_CHECK(a.scalar_type() == dtype && t.scalar_type() == dtype,
                "bma_update_: all tensors of one call must share a dtype (", dtype, "), got ", a.scalar_type(),
                " and ", t.scalar_type(), " at index ", i);
    TORCH_CHECK(a.sizes() == t.sizes(), "bma_update_: averaged_tensors[", i, "] has shape ", a.sizes(),
                " but tensors[", i, "] has shape ", t.sizes());
    TORCH_CHECK(a.is_contiguous() && t.is_contiguous(), "bma_update_: averaged_tensors[", i, "] and tensors[", i,
                "] must be contiguous");
    const int64_t n = a.numel();
    for (int64_t s = 0; s < n; s += kBmaChunk) chunks.push_back({static_cast<int64_t>(i), s, std::min(n, s + kBmaChunk)});
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "bma_update_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BmaStep<acc_t> step{static_cast<acc_t>(relative_weight), static_cast<acc_t>(1.0 + relative_weight)};
    std::vector<scalar_t*> avg_ptrs(averaged.size());
    std::vector<const scalar_t*> val_ptrs(averaged.size());
    for (size_t i = 0; i < averaged.size(); ++i) {
      avg_ptrs[i] = averaged[i].data_ptr<scalar_t>();
      val_ptrs[i] = tensors[i].data_ptr<scalar_t>();
    }
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) {
        const ChunkRef ref = chunks[c];
        scalar_t* avg = avg_ptrs[ref.tensor];
        const scalar_t* val = val_ptrs[ref.tensor];
        for (int64_t j = ref.begin; j < ref.end; ++j) {
          avg[j] = static_cast<scalar_t>(step(static_cast<acc_t>(avg[j]), static_cast<acc_t>(val[j])));
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(guidg_fast, CPU, m) { m.impl("bma_update_", &bma_update_cpu); }

}  // namespace guidg_fast
