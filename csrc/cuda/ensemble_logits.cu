// CUDA launcher for ensemble_logits: out (B, C) = tau * sum_k w_k f @ T_k^T (float32).
//
// Same plan as the CPU launcher: batch weights mix the experts once, M = tau * sum_k w_k T_k, then
// one cuBLAS GEMM f @ M^T; per-sample weights run one GEMM against all experts, Y = f @ T_flat^T,
// then one mixing kernel. Backward: mix / row-dot / scale kernels around cuBLAS GEMMs; grad_w never
// builds a (B, K, C) tensor. The per-element math is csrc/include/ensemble_logits.h.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>

#include "ensemble_logits.h"
#include "ensemble_logits_args.h"
#include "outputs.h"
#include "launchers.h"

namespace guidg_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;

unsigned ensemble_blocks(int64_t n) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, 65535)));
}

// out[r, j] = scale * sum_k weights[r * weight_row + k * weight_k] * values[r * value_row + k * value_k + j]
__global__ void ensemble_mix_kernel(float* out, const float* values, int64_t value_row, int64_t value_k,
                                    const float* weights, int64_t weight_row, int64_t weight_k, int64_t K,
                                    float scale, int64_t R, int64_t J) {
  const int64_t n = R * J;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / J, j = i - r * J;
    out[i] = ensemble_mix<float, float>(values + r * value_row + j, value_k, weights + r * weight_row, weight_k, K,
                                        scale);
  }
}

// dots[k, r] = scale * <a[k * a_k + r * a_row : + n], b[k * b_k + r * b_row : + n]>, one warp per (k, r)
__global__ void ensemble_rowdot_kernel(float* dots, const float* a, int64_t a_k, int64_t a_row, const float* b,
                                       int64_t b_k, int64_t b_row, int64_t K, int64_t R, int64_t n, float scale) {
  const int lane = threadIdx.x & 31;
  const int64_t rows = K * R;
  for (int64_t row = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + (threadIdx.x >> 5); row < rows;
       row += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    const int64_t k = row / R, r = row - k * R;
    const float* pa = a + k * a_k + r * a_row;
    const float* pb = b + k * b_k + r * b_row;
    float s = 0.f;
    for (int64_t j = lane; j < n; j += 32) s += pa[j] * pb[j];
    for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_down_sync(0xffffffffu, s, offset);
    if (lane == 0) dots[row] = scale * s;
  }
}

// out[k, r, j] = (tau * weights[r * weight_row + k * weight_k]) * values[r, j]
__global__ void ensemble_scale_kernel(float* out, const float* values, const float* weights, int64_t weight_row,
                                      int64_t weight_k, float tau, int64_t K, int64_t R, int64_t J) {
  const int64_t n = K * R * J;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = i % J, kr = i / J, r = kr % R, k = kr / R;
    out[i] = ensemble_scale_factor<float>(weights[r * weight_row + k * weight_k], tau) * values[r * J + j];
  }
}

void ensemble_check_cuda(const at::Tensor& f, const at::Tensor& T, const at::Tensor& w) {
  TORCH_CHECK(f.is_cuda(), "ensemble_logits (CUDA kernel): f must be a CUDA tensor, got ", f.device());
  TORCH_CHECK(f.scalar_type() == at::kFloat, "ensemble_logits (CUDA kernel): f, T and w must be float32, got ",
              f.scalar_type());
  ensemble_logits::check_inputs(f, T, w);
}

void launch_mix(at::Tensor& out, const at::Tensor& values, int64_t value_row, int64_t value_k, const at::Tensor& weights,
                int64_t weight_row, int64_t weight_k, int64_t K, double scale, int64_t R, int64_t J) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  ensemble_mix_kernel<<<ensemble_blocks(R * J), kThreads, 0, stream>>>(
      out.data_ptr<float>(), values.data_ptr<float>(), value_row, value_k, weights.data_ptr<float>(), weight_row,
      weight_k, K, static_cast<float>(scale), R, J);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_rowdot(at::Tensor& dots, const at::Tensor& a, int64_t a_k, int64_t a_row, const at::Tensor& b, int64_t b_k,
                   int64_t b_row, int64_t K, int64_t R, int64_t n, double scale) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t rows = K * R;
  const unsigned blocks =
      static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock, 65535)));
  ensemble_rowdot_kernel<<<blocks, kThreads, 0, stream>>>(dots.data_ptr<float>(), a.data_ptr<float>(), a_k, a_row,
                                                           b.data_ptr<float>(), b_k, b_row, K, R, n,
                                                           static_cast<float>(scale));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_scale(at::Tensor& out, const at::Tensor& values, const at::Tensor& weights, int64_t weight_row,
                  int64_t weight_k, double tau, int64_t K, int64_t R, int64_t J) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  ensemble_scale_kernel<<<ensemble_blocks(K * R * J), kThreads, 0, stream>>>(
      out.data_ptr<float>(), values.data_ptr<float>(), weights.data_ptr<float>(), weight_row, weight_k,
      static_cast<float>(tau), K, R, J);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor ensemble_logits_forward_cuda(const at::Tensor& f, const at::Tensor& T, const at::Tensor& w,
                                        double temperature) {
  ensemble_check_cuda(f, T, w);
  c10::cuda::CUDAGuard guard(f.device());
  const int64_t B = f.size(0), D = f.size(1), K = T.size(0), C = T.size(1);
  auto out = new_output({B, C}, f.options());
  if (w.dim() == 1) {
    auto M = at::empty({C, D}, T.options());
    launch_mix(M, T, D, C * D, w, 0, 1, K, temperature, C, D);
    at::mm_out(out, f, M.t());
    return out;
  }
  const auto Y = at::mm(f, T.view({K * C, D}).t());  // (B, K*C)
  launch_mix(out, Y, K * C, C, w, K, 1, K, temperature, B, C);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ensemble_logits_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& f, const at::Tensor& T, const at::Tensor& w, double temperature,
    bool need_f, bool need_T, bool need_w) {
  ensemble_check_cuda(f, T, w);
  c10::cuda::CUDAGuard guard(f.device());
  const int64_t B = f.size(0), D = f.size(1), K = T.size(0), C = T.size(1);
  ensemble_logits::check_grad(grad_in, f, T);
  const auto grad = grad_in.contiguous();
  at::Tensor grad_f = at::empty({0}, f.options()), grad_T = at::empty({0}, f.options()),
             grad_w = at::empty({0}, f.options());

  if (w.dim() == 1) {
    if (need_f) {
      auto M = at::empty({C, D}, T.options());
      launch_mix(M, T, D, C * D, w, 0, 1, K, temperature, C, D);
      grad_f = new_output({B, D}, f.options());
      at::mm_out(grad_f, grad, M);
    }
    if (need_T || need_w) {
      const auto G = at::mm(grad.t(), f);  // (C, D)
      if (need_T) {
        grad_T = new_output({K, C, D}, T.options());
        launch_scale(grad_T, G, w, 0, 1, temperature, K, C, D);
      }
      if (need_w) {
        auto dots = at::empty({K, C}, f.options());
        launch_rowdot(dots, T, C * D, D, G, 0, D, K, C, D, temperature);
        grad_w = dots.sum(1);
      }
    }
    return {grad_f, grad_T, grad_w};
  }

  if (need_f || need_w) {
    const auto H = at::matmul(grad.unsqueeze(0).expand({K, B, C}), T).contiguous();  // (K, B, D)
    if (need_f) {
      grad_f = new_output({B, D}, f.options());
      launch_mix(grad_f, H, D, B * D, w, K, 1, K, temperature, B, D);
    }
    if (need_w) {
      auto dots = at::empty({K, B}, f.options());
      launch_rowdot(dots, f, 0, D, H, B * D, D, K, B, D, temperature);
      grad_w = dots.t().contiguous();
    }
  }
  if (need_T) {
    auto gw = at::empty({K, B, C}, f.options());
    launch_scale(gw, grad, w, K, 1, temperature, K, B, C);
    grad_T = new_output({K, C, D}, T.options());
    at::bmm_out(grad_T, gw.transpose(1, 2), f.unsqueeze(0).expand({K, B, D}));
  }
  return {grad_f, grad_T, grad_w};
}

}  // namespace guidg_fast
