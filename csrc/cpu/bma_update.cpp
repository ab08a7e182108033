// CPU launcher for bma_update_: every tensor of the list in one parallel_for over fixed chunks.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <vector>

#include "bma_update.h"
#include "bma_update_args.h"
#include "launchers.h"

namespace guidg_fast {
namespace {

struct ChunkRef {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

}  // namespace

void bma_update_cpu(at::TensorList averaged, at::TensorList tensors, double relative_weight) {
  bma_update::check_inputs(averaged, tensors, at::Device(at::kCPU), "CPU kernel");
  if (averaged.empty()) return;
  const auto dtype = averaged[0].scalar_type();
  std::vector<ChunkRef> chunks;
  for (size_t i = 0; i < averaged.size(); ++i) {
    const int64_t n = averaged[i].numel();
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

}  // namespace guidg_fast
