// Per-pixel math of RandAugment on uint8 images, as torchvision's tensor kernels compute it.
//
// torchvision blends in float32 with torch's add(alpha=...), which is one fused multiply-add:
// out = fma(b, alpha, a). Here b * alpha is formed in double, where it is exact (an 8- or 9-bit
// integer times a float's 24-bit mantissa), and the sum too (blend_is_exact_in_double bounds the
// exponent span), so rounding the double sum to float rounds once, exactly as the fma does, without
// needing an FMA instruction (and an FMA contraction of these expressions changes nothing).
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace guidg_fast {
namespace randaugment {

// Op ids: the order of torchvision's RandAugment op space (guidg_fast.data.augment.RANDAUGMENT_OPS).
enum Op : int64_t {
  kIdentity = 0,
  kShearX,
  kShearY,
  kTranslateX,
  kTranslateY,
  kRotate,
  kBrightness,
  kColor,
  kContrast,
  kSharpness,
  kPosterize,
  kSolarize,
  kAutoContrast,
  kEqualize,
  kNumOps
};

// floor(r * 0.2989 + g * 0.587 + b * 0.114) in torchvision's order: a float multiply, then two
// fused multiply-adds (all terms are >= 0, so the truncating cast is the floor).
GF_HOST_DEVICE int grayscale_floor(int r, int g, int b) {
  const float red = static_cast<float>(r) * 0.2989f;
  const float rg = static_cast<float>(static_cast<double>(red) + static_cast<double>(g) * static_cast<double>(0.587f));
  return static_cast<int>(static_cast<float>(static_cast<double>(rg) + static_cast<double>(b) * static_cast<double>(0.114f)));
}

// a + b * alpha rounds exactly in double when a's and b * alpha's lowest bits are at most 2^52 below
// their largest possible sum: true for integer levels b in [-255, 255], a = level * ratio, and factors
// of magnitude in [2^-19, 2] (or 0), which covers every RandAugment magnitude bin.
inline bool blend_factor_is_exact(float factor) {
  const float magnitude = std::fabs(factor);
  return magnitude == 0.0f || (magnitude >= 0x1p-19f && magnitude <= 2.0f);
}

// fma(b, alpha, a) for the factors above.
GF_HOST_DEVICE float fma_exact(float b, float alpha, float a) {
  return static_cast<float>(static_cast<double>(a) + static_cast<double>(b) * static_cast<double>(alpha));
}

// A float level in [0, 255] -> uint8 as torch's .clamp_(0, 255).to(torch.uint8) does (truncation).
GF_HOST_DEVICE uint8_t clamp_to_level(float v) {
  v = v < 0.0f ? 0.0f : v;
  v = v > 255.0f ? 255.0f : v;
  return static_cast<uint8_t>(static_cast<int>(v));
}

}  // namespace randaugment
}  // namespace guidg_fast
