// CPU kernel of RandAugment on uint8 images (guidg_fast.data.augment.BatchedRandAugment.apply).
//
// One task per sample (at::parallel_for): its rounds run back to back on two per-sample buffers (the
// output slice and a scratch image), point ops in place through 256-entry lookup tables, so there is
// no full-batch copy per round. Per-pixel math follows torchvision's tensor kernels (randaugment.h);
// the affine ops gather through source-index maps the caller builds with torchvision's own grid
// (augment.py's cached _source_indices), so they pick the same pixels.
//
// Measured on the shared 2-core dev box (one core, torch.set_num_threads(1), 36 x 3 x 224 x 224,
// RandAugment(2, 9), medians of 21 alternating runs, three repeats): RandAugment alone 7.5-9.3 ms
// per batch here vs 12.5-17 ms for the batched torch ops (the Color blend alone 0.09-0.2 ms per
// image); with normalize_uint8 into a reused staging buffer 13-21 ms vs 60-72 ms for torchvision's
// PIL RandAugment + ToTensor + Normalize, 3.5-4.7x (normalising into a fresh 22 MB tensor adds its
// page faults: 2.7-3.6x). Bit-exact with torchvision's tensor kernels for all 14 ops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "common.h"
#include "cpu_isa.h"
#include "outputs.h"
#include "randaugment.h"
#include "launchers.h"

namespace guidg_fast {
namespace {

using namespace randaugment;

struct Image {
  int64_t height, width;
  int64_t pixels() const { return height * width; }
};

struct Affine {
  const int32_t* maps;  // (num_maps, H * W): 1 + source pixel, 0 = fill
  int64_t num_maps;
};

GF_ISA_INLINE void apply_luts(const uint8_t* src, uint8_t* dst, const uint8_t (*luts)[256], int64_t pixels) {
  for (int c = 0; c < 3; ++c) {
    const uint8_t* lut = luts[c];
    const uint8_t* s = src + c * pixels;
    uint8_t* d = dst + c * pixels;
    for (int64_t i = 0; i < pixels; ++i) d[i] = lut[s[i]];
  }
}

GF_ISA_INLINE void apply_lut(const uint8_t* src, uint8_t* dst, const uint8_t* lut, int64_t pixels) {
  for (int64_t i = 0; i < 3 * pixels; ++i) dst[i] = lut[src[i]];
}

GF_ISA_INLINE void warp(const uint8_t* src, uint8_t* dst, const int32_t* sources, const uint8_t* fill,
                        int64_t pixels) {
  for (int c = 0; c < 3; ++c) {
    const uint8_t* s = src + c * pixels - 1;  // sources are 1-based
    uint8_t* d = dst + c * pixels;
    const uint8_t f = fill[c];
    for (int64_t i = 0; i < pixels; ++i) {
      const int32_t k = sources[i];
      d[i] = k == 0 ? f : s[k];
    }
  }
}

// torchvision truncates the translation to whole pixels, and its grid for a whole-pixel shift picks
// exactly the shifted pixel (augment.py's _translate): a shift with the fill coming in.
GF_ISA_INLINE void translate(const uint8_t* src, uint8_t* dst, int64_t dx, int64_t dy, const uint8_t* fill,
                             const Image& im) {
  const int64_t H = im.height, W = im.width;
  for (int c = 0; c < 3; ++c) {
    const uint8_t* s = src + c * im.pixels();
    uint8_t* d = dst + c * im.pixels();
    for (int64_t y = 0; y < H; ++y) {
      uint8_t* row = d + y * W;
      const int64_t sy = y - dy;
      if (sy < 0 || sy >= H || dx >= W || -dx >= W) {
        std::memset(row, fill[c], W);
        continue;
      }
      const int64_t lo = std::max<int64_t>(dx, 0), hi = W + std::min<int64_t>(dx, 0);  // dst columns from src
      std::memset(row, fill[c], lo);
      std::memcpy(row + lo, s + sy * W + (lo - dx), hi - lo);
      std::memset(row + hi, fill[c], W - hi);
    }
  }
}

// Blend factors as torchvision forms them from the signed magnitude: ratio = 1 + m (a Python double,
// rounded to float32 by the multiply) and alpha = 1 - ratio (double, then float32).
struct Factors {
  float ratio, complement;
};
inline Factors factors(double magnitude) {
  const double ratio = 1.0 + magnitude;
  return {static_cast<float>(ratio), static_cast<float>(1.0 - ratio)};
}

GF_ISA_INLINE void brightness(const uint8_t* src, uint8_t* dst, double magnitude, int64_t pixels) {
  const float ratio = factors(magnitude).ratio;
  uint8_t lut[256];
  for (int v = 0; v < 256; ++v) lut[v] = clamp_to_level(static_cast<float>(v) * ratio);
  apply_lut(src, dst, lut, pixels);
}

// Straight-line float / double arithmetic (no table loads) on restrict pointers so the loop
// vectorises (5-10x faster than the scalar loop); gray * alpha is exact in double and shared by the
// three channels.
GF_ISA_INLINE void color_exact(const uint8_t* __restrict r, const uint8_t* __restrict g,
                               const uint8_t* __restrict b, uint8_t* __restrict dr, uint8_t* __restrict dg,
                               uint8_t* __restrict db, float ratio, float complement, int64_t pixels) {
  const double alpha = complement;
  for (int64_t i = 0; i < pixels; ++i) {
    const double gray_alpha = static_cast<double>(grayscale_floor(r[i], g[i], b[i])) * alpha;
    const float sr = static_cast<float>(r[i]) * ratio, sg = static_cast<float>(g[i]) * ratio;
    const float sb = static_cast<float>(b[i]) * ratio;
    dr[i] = clamp_to_level(static_cast<float>(static_cast<double>(sr) + gray_alpha));
    dg[i] = clamp_to_level(static_cast<float>(static_cast<double>(sg) + gray_alpha));
    db[i] = clamp_to_level(static_cast<float>(static_cast<double>(sb) + gray_alpha));
  }
}

GF_ISA_INLINE void color(const uint8_t* src, uint8_t* dst, double magnitude, int64_t pixels, uint8_t* scratch) {
  const Factors f = factors(magnitude);
  if (blend_factor_is_exact(f.ratio) && blend_factor_is_exact(f.complement)) {
    // restrict needs distinct buffers: in place, the input goes to scratch first
    if (src == dst) {
      std::memcpy(scratch, src, 3 * pixels);
      src = scratch;
    }
    color_exact(src, src + pixels, src + 2 * pixels, dst, dst + pixels, dst + 2 * pixels, f.ratio, f.complement,
                pixels);
    return;
  }
  const uint8_t *r = src, *g = src + pixels, *b = src + 2 * pixels;
  uint8_t *dr = dst, *dg = dst + pixels, *db = dst + 2 * pixels;
  for (int64_t i = 0; i < pixels; ++i) {
    const float gray = static_cast<float>(grayscale_floor(r[i], g[i], b[i]));
    dr[i] = clamp_to_level(std::fmaf(gray, f.complement, static_cast<float>(r[i]) * f.ratio));
    dg[i] = clamp_to_level(std::fmaf(gray, f.complement, static_cast<float>(g[i]) * f.ratio));
    db[i] = clamp_to_level(std::fmaf(gray, f.complement, static_cast<float>(b[i]) * f.ratio));
  }
}

GF_ISA_INLINE void contrast(const uint8_t* src, uint8_t* dst, double magnitude, int64_t pixels) {
  const Factors f = factors(magnitude);
  const uint8_t *r = src, *g = src + pixels, *b = src + 2 * pixels;
  int64_t sum = 0;
  for (int64_t i = 0; i < pixels; ++i) sum += grayscale_floor(r[i], g[i], b[i]);
  // torch sums the floored float levels (exact while the sum stays below 2^24: images up to 65793
  // pixels) and divides by the count in float32.
  const float mean = static_cast<float>(sum) / static_cast<float>(pixels);
  uint8_t lut[256];
  for (int v = 0; v < 256; ++v) lut[v] = clamp_to_level(std::fmaf(mean, f.complement, static_cast<float>(v) * f.ratio));
  apply_lut(src, dst, lut, pixels);
}

// torchvision: blurred = round(conv2d(x, [1 1 1; 1 5 1; 1 1 1] / 13)) on the interior, then
// x + (blurred - x) * (1 - ratio) as one fma; the border keeps its levels. The 3x3 sums are exact
// integers S and S / 13 is never a rounding tie, so blurred = (2 S + 13) div 26 whatever order the
// convolution accumulates in.
GF_ISA_INLINE void sharpness(const uint8_t* src, uint8_t* dst, double magnitude, const Image& im) {
  const int64_t H = im.height, W = im.width, P = im.pixels();
  if (H <= 2 || W <= 2) {
    if (src != dst) std::memcpy(dst, src, 3 * P);
    return;
  }
  const float alpha = factors(magnitude).complement;
  const bool exact = blend_factor_is_exact(alpha);
  std::vector<int32_t> column_sums(W);
  for (int c = 0; c < 3; ++c) {
    const uint8_t* s = src + c * P;
    uint8_t* d = dst + c * P;
    std::memcpy(d, s, W);
    std::memcpy(d + (H - 1) * W, s + (H - 1) * W, W);
    for (int64_t y = 1; y < H - 1; ++y) {
      const uint8_t *up = s + (y - 1) * W, *mid = s + y * W, *down = s + (y + 1) * W;
      uint8_t* out = d + y * W;
      for (int64_t x = 0; x < W; ++x) column_sums[x] = up[x] + mid[x] + down[x];
      out[0] = mid[0];
      out[W - 1] = mid[W - 1];
      for (int64_t x = 1; x < W - 1; ++x) {
        const int32_t box = column_sums[x - 1] + column_sums[x] + column_sums[x + 1] + 4 * mid[x];
        const int32_t blurred = (2 * box + 13) / 26;
        const float level = static_cast<float>(mid[x]);
        const float delta = static_cast<float>(blurred - mid[x]);
        out[x] = clamp_to_level(exact ? fma_exact(delta, alpha, level) : std::fmaf(delta, alpha, level));
      }
    }
  }
}

GF_ISA_INLINE void posterize(const uint8_t* src, uint8_t* dst, double magnitude, int64_t pixels) {
  const int bits = static_cast<int>(magnitude);
  const uint8_t mask = bits == 8 ? 255 : static_cast<uint8_t>(((1 << bits) - 1) << (8 - bits));
  for (int64_t i = 0; i < 3 * pixels; ++i) dst[i] = src[i] & mask;
}

GF_ISA_INLINE void solarize(const uint8_t* src, uint8_t* dst, double magnitude, int64_t pixels) {
  // torchvision compares level >= 255 * magnitude in float32
  const float threshold = static_cast<float>(255.0 * magnitude);
  uint8_t lut[256];
  for (int v = 0; v < 256; ++v) lut[v] = static_cast<float>(v) >= threshold ? static_cast<uint8_t>(255 - v) : static_cast<uint8_t>(v);
  apply_lut(src, dst, lut, pixels);
}

GF_ISA_INLINE void autocontrast(const uint8_t* src, uint8_t* dst, int64_t pixels) {
  uint8_t luts[3][256];
  for (int c = 0; c < 3; ++c) {
    const uint8_t* s = src + c * pixels;
    uint8_t lo = 255, hi = 0;
    for (int64_t i = 0; i < pixels; ++i) {
      lo = std::min(lo, s[i]);
      hi = std::max(hi, s[i]);
    }
    float minimum = lo, inv_scale = (static_cast<float>(hi) - static_cast<float>(lo)) * static_cast<float>(1.0 / 255);
    if (hi == lo) minimum = 0.0f, inv_scale = 1.0f;
    for (int v = 0; v < 256; ++v) luts[c][v] = clamp_to_level((static_cast<float>(v) - minimum) / inv_scale);
  }
  apply_luts(src, dst, luts, pixels);
}

// PIL's scheme as torchvision implements it: step = (pixels not at the top level) // 255,
// lut[k] = (cum_hist[k - 1] + step // 2) // step, identity where step == 0.
GF_ISA_INLINE void equalize(const uint8_t* src, uint8_t* dst, int64_t pixels) {
  uint8_t luts[3][256];
  for (int c = 0; c < 3; ++c) {
    const uint8_t* s = src + c * pixels;
    // four interleaved histograms: consecutive equal levels would otherwise serialise on one counter
    int64_t hist4[4][256] = {};
    int64_t i = 0;
    for (; i + 4 <= pixels; i += 4) {
      ++hist4[0][s[i]];
      ++hist4[1][s[i + 1]];
      ++hist4[2][s[i + 2]];
      ++hist4[3][s[i + 3]];
    }
    for (; i < pixels; ++i) ++hist4[0][s[i]];
    int64_t hist[256];
    int top = 0;
    for (int v = 0; v < 256; ++v) {
      hist[v] = hist4[0][v] + hist4[1][v] + hist4[2][v] + hist4[3][v];
      if (hist[v] != 0) top = v;
    }
    const int64_t step = (pixels - hist[top]) / 255;
    uint8_t* lut = luts[c];
    if (step == 0) {
      for (int v = 0; v < 256; ++v) lut[v] = static_cast<uint8_t>(v);
      continue;
    }
    int64_t cumulative = 0;
    lut[0] = 0;
    for (int v = 1; v < 256; ++v) {
      cumulative += hist[v - 1];
      lut[v] = static_cast<uint8_t>(std::min<int64_t>((cumulative + step / 2) / step, 255));
    }
  }
  apply_luts(src, dst, luts, pixels);
}

// Runs one sample's rounds: src (the input sample, read only) -> out, with scratch as the second
// buffer for the ops that cannot work in place.
GF_ISA_INLINE void run_sample_body(const uint8_t* src, uint8_t* out, uint8_t* scratch, Image im, const int64_t* ops,
                                   const double* magnitudes, const int64_t* map_rows, int64_t rounds, Affine affine,
                                   const uint8_t* fill) {
  const int64_t P = im.pixels();
  const uint8_t* current = src;
  for (int64_t r = 0; r < rounds; ++r) {
    const int64_t op = ops[r];
    const double m = magnitudes[r];
    if (op == kIdentity) continue;
    const bool in_place = !(op == kShearX || op == kShearY || op == kRotate || op == kTranslateX ||
                            op == kTranslateY || op == kSharpness);
    uint8_t* target = in_place ? (current == src ? out : const_cast<uint8_t*>(current))
                               : (current == out ? scratch : out);
    switch (op) {
      case kShearX:
      case kShearY:
      case kRotate:
        warp(current, target, affine.maps + map_rows[r] * P, fill, P);
        break;
      case kTranslateX:
        translate(current, target, static_cast<int64_t>(m), 0, fill, im);
        break;
      case kTranslateY:
        translate(current, target, 0, static_cast<int64_t>(m), fill, im);
        break;
      case kBrightness: brightness(current, target, m, P); break;
      case kColor: color(current, target, m, P, current == out ? scratch : out); break;
      case kContrast: contrast(current, target, m, P); break;
      case kSharpness: sharpness(current, target, m, im); break;
      case kPosterize: posterize(current, target, m, P); break;
      case kSolarize: solarize(current, target, m, P); break;
      case kAutoContrast: autocontrast(current, target, P); break;
      case kEqualize: equalize(current, target, P); break;
      default: break;  // op ids are checked before the kernel runs
    }
    current = target;
  }
  if (current != out) std::memcpy(out, current, 3 * P);
}

GF_ISA_DISPATCH(void, run_sample,
                (const uint8_t* src, uint8_t* out, uint8_t* scratch, Image im, const int64_t* ops,
                 const double* magnitudes, const int64_t* map_rows, int64_t rounds, Affine affine,
                 const uint8_t* fill),
                (src, out, scratch, im, ops, magnitudes, map_rows, rounds, affine, fill))

}  // namespace

at::Tensor randaugment_uint8_cpu(const at::Tensor& images_in, const at::Tensor& op_ids_in,
                                 const at::Tensor& magnitudes_in, const at::Tensor& source_maps_in,
                                 const at::Tensor& source_rows_in, at::IntArrayRef fill_in) {
  const char* op = "randaugment_uint8";
  TORCH_CHECK(images_in.device().is_cpu(), op, " (CPU kernel): images must be a CPU tensor, got ", images_in.device());
  TORCH_CHECK(images_in.scalar_type() == at::kByte, op, ": images must be uint8, got ", images_in.scalar_type());
  TORCH_CHECK(images_in.dim() == 4 && images_in.size(1) == 3, op, ": images must have shape (B, 3, H, W), got ",
              images_in.sizes());
  const int64_t B = images_in.size(0), H = images_in.size(2), W = images_in.size(3);
  TORCH_CHECK(op_ids_in.scalar_type() == at::kLong && op_ids_in.dim() == 2 && op_ids_in.size(0) == B, op,
              ": op_ids must be int64 of shape (B, rounds) with B = ", B, ", got ", op_ids_in.scalar_type(), " ",
              op_ids_in.sizes());
  const int64_t rounds = op_ids_in.size(1);
  TORCH_CHECK(magnitudes_in.scalar_type() == at::kDouble && magnitudes_in.sizes() == op_ids_in.sizes(), op,
              ": magnitudes must be float64 of op_ids' shape ", op_ids_in.sizes(), ", got ",
              magnitudes_in.scalar_type(), " ", magnitudes_in.sizes());
  TORCH_CHECK(source_rows_in.scalar_type() == at::kLong && source_rows_in.sizes() == op_ids_in.sizes(), op,
              ": source_rows must be int64 of op_ids' shape ", op_ids_in.sizes(), ", got ",
              source_rows_in.scalar_type(), " ", source_rows_in.sizes());
  TORCH_CHECK(source_maps_in.scalar_type() == at::kInt && source_maps_in.dim() == 2 &&
                  (source_maps_in.size(0) == 0 || source_maps_in.size(1) == H * W),
              op, ": source_maps must be int32 of shape (maps, H * W) with H * W = ", H * W, ", got ",
              source_maps_in.scalar_type(), " ", source_maps_in.sizes());
  TORCH_CHECK(fill_in.size() == 3, op, ": fill must hold 3 levels, got ", fill_in.size());
  uint8_t fill[3];
  for (int c = 0; c < 3; ++c) {
    TORCH_CHECK(fill_in[c] >= 0 && fill_in[c] <= 255, op, ": fill levels must lie in [0, 255], got ", fill_in);
    fill[c] = static_cast<uint8_t>(fill_in[c]);
  }
  for (const at::Tensor* t : {&op_ids_in, &magnitudes_in, &source_maps_in, &source_rows_in}) {
    TORCH_CHECK(t->device().is_cpu(), op, ": op_ids, magnitudes, source_maps and source_rows must be CPU tensors");
  }
  const at::Tensor images = images_in.contiguous(), op_ids = op_ids_in.contiguous();
  const at::Tensor magnitudes = magnitudes_in.contiguous(), source_rows = source_rows_in.contiguous();
  const at::Tensor source_maps = source_maps_in.contiguous();
  const int64_t* ops = op_ids.data_ptr<int64_t>();
  const double* mags = magnitudes.data_ptr<double>();
  const int64_t* rows = source_rows.data_ptr<int64_t>();
  const int64_t num_maps = source_maps.size(0);
  for (int64_t i = 0; i < B * rounds; ++i) {
    TORCH_CHECK(ops[i] >= 0 && ops[i] < kNumOps, op, ": op_ids must lie in [0, ", int64_t(kNumOps), "), got ", ops[i]);
    if (ops[i] == kShearX || ops[i] == kShearY || ops[i] == kRotate) {
      TORCH_CHECK(rows[i] >= 0 && rows[i] < num_maps, op, ": source_rows[", i / rounds, ", ", i % rounds,
                  "] must index one of the ", num_maps, " source_maps for an affine op, got ", rows[i]);
    }
    if (ops[i] == kPosterize) {
      TORCH_CHECK(mags[i] >= 0 && mags[i] < 9, op, ": magnitudes: Posterize needs 0..8 bits, got ", mags[i]);
    }
    if (ops[i] == kTranslateX || ops[i] == kTranslateY) {
      TORCH_CHECK(std::isfinite(mags[i]), op, ": magnitudes: a translation must be finite, got ", mags[i]);
    }
  }
  if (num_maps > 0) {
    const auto [lo, hi] = at::aminmax(source_maps);
    TORCH_CHECK(lo.item<int32_t>() >= 0 && hi.item<int32_t>() <= H * W, op,
                ": source_maps must hold 0 (fill) or 1 + a pixel index in [1, ", H * W, "]");
  }

  at::Tensor out = at::empty({B, 3, H, W}, images.options());
  if (poison_requested()) out.fill_(0xA5);  // uint8 has no NaN: a sentinel level for a forgotten write
  if (B == 0) return out;
  const uint8_t* in = images.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  const int64_t image_bytes = 3 * H * W;
  const Image im{H, W};
  const Affine affine{source_maps.data_ptr<int32_t>(), num_maps};
  at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
    std::unique_ptr<uint8_t[]> scratch(new uint8_t[image_bytes]);
    for (int64_t b = lo; b < hi; ++b) {
      run_sample(in + b * image_bytes, dst + b * image_bytes, scratch.get(), im, ops + b * rounds, mags + b * rounds,
                 rows + b * rounds, rounds, affine, fill);
    }
  });
  return out;
}

}  // namespace guidg_fast
