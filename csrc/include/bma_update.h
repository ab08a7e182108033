// Beta moving average step (CLIPood / GuiDG GeneralMovingAverage), per element:
//   avg <- (avg + r * x) / (1 + r)
// The same expression order as the eager reference, in the accumulation type, so the CPU
// launcher, the CUDA launcher and the reference agree to rounding.
#pragma once
#include "common.h"

namespace guidg_fast {

template <typename acc_t>
struct BmaStep {
  acc_t relative_weight;
  acc_t denominator;  // 1 + relative_weight, rounded once on the host like the reference

  GF_HOST_DEVICE acc_t operator()(acc_t averaged, acc_t value) const {
    return (averaged + relative_weight * value) / denominator;
  }
};

// Work is cut into fixed chunks so one launch (CUDA) or one parallel_for (CPU) covers every
// tensor of a dtype group, whatever their sizes.
constexpr int64_t kBmaChunk = 1 << 16;

}  // namespace guidg_fast
