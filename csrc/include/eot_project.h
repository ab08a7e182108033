// eot_project: EOT row -> layer norm -> projection -> L2 normalisation, per-row math shared by the
// CPU and CUDA launchers. The (N, W) x (W, D) projection and its two backward products are GEMMs
// done by at::matmul between the fused row passes:
//   forward : xhat = (x_eot - mean) * rstd,  y = xhat * w + b,  z = y @ proj,  out = z / |z|
//   backward: gz = (g - out * <g, out>) / |z|,  dproj = y^T gz,  gy = gz proj^T,
//             dw = sum_n gy * xhat,  db = sum_n gy,
//             dx_eot = rstd * (gy*w - mean(gy*w) - xhat * mean(gy*w * xhat))   (other rows: 0)
#pragma once
#include <cmath>
#include <cstdint>

#include "common.h"

namespace guidg_fast {

template <typename acc_t>
GF_HOST_DEVICE acc_t eot_rsqrt(acc_t x) {
  return acc_t(1) / sqrt(x);
}
template <>
GF_HOST_DEVICE float eot_rsqrt<float>(float x) {
  return 1.0f / sqrtf(x);
}

// 1 / sqrt(var + eps) of a row whose mean and sum of squared deviations are known
template <typename acc_t>
GF_HOST_DEVICE acc_t layer_norm_rstd(acc_t sum_sq_dev, int64_t W, acc_t eps) {
  return eot_rsqrt<acc_t>(sum_sq_dev / static_cast<acc_t>(W) + eps);
}

template <typename acc_t>
GF_HOST_DEVICE acc_t layer_norm_affine(acc_t xhat, acc_t w, acc_t b) {
  return xhat * w + b;
}

// gradient of z through out = z / |z|, given <g, out> of the row
template <typename acc_t>
GF_HOST_DEVICE acc_t normalize_backward(acc_t g, acc_t out, acc_t g_dot_out, acc_t inv_norm) {
  return (g - out * g_dot_out) * inv_norm;
}

// gradient of the layer-norm input, given mean(gxhat) and mean(gxhat * xhat) of the row
template <typename acc_t>
GF_HOST_DEVICE acc_t layer_norm_backward(acc_t gxhat, acc_t xhat, acc_t mean_g, acc_t mean_gx, acc_t rstd) {
  return rstd * (gxhat - mean_g - xhat * mean_gx);
}

}  // namespace guidg_fast
