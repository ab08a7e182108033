// CUDA launchers of eot_project (float32; other dtypes are cast in Python). One block per row for
// the fused row passes (gather + layer norm, normalisation, their backward), at::matmul for the
// projection GEMMs, one thread per column for the ln_weight / ln_bias gradients (no atomics).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>

#include "eot_project.h"
#include "eot_project_args.h"
#include "outputs.h"
#include "launchers.h"

namespace guidg_fast {
namespace {

constexpr int kThreads = 256;

// sum over the block; every thread gets the result. ``scratch`` holds kThreads / 32 floats.
__device__ __forceinline__ float block_sum(float x, float* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < kThreads / 32; ++w) total += scratch[w];
  return total;
}

__global__ void __launch_bounds__(kThreads) eot_gather_layer_norm_kernel(
    const float* __restrict__ x, int64_t sx_n, int64_t sx_s, const int64_t* __restrict__ eot, int64_t S, int64_t W,
    const float* __restrict__ w, const float* __restrict__ b, float eps, float* __restrict__ xhat,
    float* __restrict__ y, float* __restrict__ rstd_out) {
  __shared__ float scratch[kThreads / 32];
  const int64_t n = blockIdx.x;
  int64_t row = eot[n];
  row = row < 0 ? 0 : (row >= S ? S - 1 : row);  // the host checked the range; never read out of bounds
  const float* r = x + n * sx_n + row * sx_s;
  float sum = 0.f;
  for (int64_t c = threadIdx.x; c < W; c += kThreads) sum += r[c];
  const float mean = block_sum(sum, scratch) / static_cast<float>(W);
  float sq = 0.f;
  for (int64_t c = threadIdx.x; c < W; c += kThreads) sq += (r[c] - mean) * (r[c] - mean);
  const float rstd = layer_norm_rstd<float>(block_sum(sq, scratch), W, eps);
  for (int64_t c = threadIdx.x; c < W; c += kThreads) {
    const float xh = (r[c] - mean) * rstd;
    xhat[n * W + c] = xh;
    y[n * W + c] = layer_norm_affine<float>(xh, w[c], b[c]);
  }
  if (threadIdx.x == 0) rstd_out[n] = rstd;
}

__global__ void __launch_bounds__(kThreads) eot_normalize_kernel(const float* __restrict__ z, int64_t D,
                                                                 float* __restrict__ out, float* __restrict__ inv_norm) {
  __shared__ float scratch[kThreads / 32];
  const int64_t n = blockIdx.x;
  float sq = 0.f;
  for (int64_t c = threadIdx.x; c < D; c += kThreads) sq += z[n * D + c] * z[n * D + c];
  const float inv = 1.f / sqrtf(block_sum(sq, scratch));
  for (int64_t c = threadIdx.x; c < D; c += kThreads) out[n * D + c] = z[n * D + c] * inv;
  if (threadIdx.x == 0) inv_norm[n] = inv;
}

__global__ void __launch_bounds__(kThreads) eot_normalize_backward_kernel(
    const float* __restrict__ g, const float* __restrict__ out, const float* __restrict__ inv_norm, int64_t D,
    const float* __restrict__ xhat, const float* __restrict__ w, const float* __restrict__ b, int64_t W,
    float* __restrict__ gz, float* __restrict__ y) {
  __shared__ float scratch[kThreads / 32];
  const int64_t n = blockIdx.x;
  float dot = 0.f;
  for (int64_t c = threadIdx.x; c < D; c += kThreads) dot += g[n * D + c] * out[n * D + c];
  dot = block_sum(dot, scratch);
  const float inv = inv_norm[n];
  for (int64_t c = threadIdx.x; c < D; c += kThreads)
    gz[n * D + c] = normalize_backward<float>(g[n * D + c], out[n * D + c], dot, inv);
  for (int64_t c = threadIdx.x; c < W; c += kThreads) y[n * W + c] = layer_norm_affine<float>(xhat[n * W + c], w[c], b[c]);
}

__global__ void __launch_bounds__(kThreads) eot_layer_norm_backward_kernel(
    const float* __restrict__ gy, const float* __restrict__ xhat, const float* __restrict__ w,
    const float* __restrict__ rstd, const int64_t* __restrict__ eot, int64_t S, int64_t W, float* __restrict__ dx) {
  __shared__ float scratch[kThreads / 32];
  const int64_t n = blockIdx.x;
  float sg = 0.f, sgx = 0.f;
  for (int64_t c = threadIdx.x; c < W; c += kThreads) {
    const float gx = gy[n * W + c] * w[c];
    sg += gx;
    sgx += gx * xhat[n * W + c];
  }
  const float mean_g = block_sum(sg, scratch) / static_cast<float>(W);
  const float mean_gx = block_sum(sgx, scratch) / static_cast<float>(W);
  int64_t row = eot[n];
  row = row < 0 ? 0 : (row >= S ? S - 1 : row);
  float* dr = dx + (n * S + row) * W;
  for (int64_t c = threadIdx.x; c < W; c += kThreads)
    dr[c] = layer_norm_backward<float>(gy[n * W + c] * w[c], xhat[n * W + c], mean_g, mean_gx, rstd[n]);
}

__global__ void eot_param_grad_kernel(const float* __restrict__ gy, const float* __restrict__ xhat, int64_t N,
                                      int64_t W, float* __restrict__ dw, float* __restrict__ db) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= W) return;
  float sw = 0.f, sb = 0.f;
  for (int64_t n = 0; n < N; ++n) {
    sw += gy[n * W + c] * xhat[n * W + c];
    sb += gy[n * W + c];
  }
  dw[c] = sw;
  db[c] = sb;
}

void check_eot_inputs(const char* op, const at::Tensor& x, const at::Tensor& eot_index, const at::Tensor& w,
                      const at::Tensor& b, const at::Tensor& proj) {
  TORCH_CHECK(x.is_cuda(), op, " (CUDA kernel): all inputs must be on a CUDA device, got x on ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, " (CUDA kernel): x, ln_weight, ln_bias and proj must be float32");
  eot_project::check_inputs(op, x, eot_index, w, b, proj);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> eot_project_forward_cuda(
    const at::Tensor& x_in, const at::Tensor& eot_index, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
    const at::Tensor& proj, double eps) {
  check_eot_inputs("eot_project_forward", x_in, eot_index, ln_weight, ln_bias, proj);
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.stride(2) == 1 ? x_in : x_in.contiguous();
  const at::Tensor eot = eot_index.contiguous(), w = ln_weight.contiguous(), b = ln_bias.contiguous();
  const int64_t N = x.size(0), S = x.size(1), W = x.size(2), D = proj.size(1);
  at::Tensor xhat = new_output({N, W}, x.options());
  at::Tensor y = new_output({N, W}, x.options());
  at::Tensor rstd = new_output({N}, x.options());
  at::Tensor inv_norm = new_output({N}, x.options());
  at::Tensor out = new_output({N, D}, x.options());
  if (N == 0) return {out, xhat, rstd, inv_norm};
  auto stream = c10::cuda::getCurrentCUDAStream();
  eot_gather_layer_norm_kernel<<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
      x.data_ptr<float>(), x.stride(0), x.stride(1), eot.data_ptr<int64_t>(), S, W, w.data_ptr<float>(),
      b.data_ptr<float>(), static_cast<float>(eps), xhat.data_ptr<float>(), y.data_ptr<float>(), rstd.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor z = at::matmul(y, proj).contiguous();
  eot_normalize_kernel<<<static_cast<unsigned>(N), kThreads, 0, stream>>>(z.data_ptr<float>(), D, out.data_ptr<float>(),
                                                                          inv_norm.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, xhat, rstd, inv_norm};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> eot_project_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& out_in, const at::Tensor& inv_norm_in, const at::Tensor& xhat_in,
    const at::Tensor& rstd_in, const at::Tensor& eot_index, const at::Tensor& x, const at::Tensor& ln_weight,
    const at::Tensor& ln_bias, const at::Tensor& proj) {
  check_eot_inputs("eot_project_backward", x, eot_index, ln_weight, ln_bias, proj);
  const int64_t N = x.size(0), S = x.size(1), W = x.size(2), D = proj.size(1);
  TORCH_CHECK(grad_out_in.sizes() == at::IntArrayRef({N, D}) && out_in.sizes() == grad_out_in.sizes(),
              "eot_project_backward: grad_out and out must have shape (N, D)");
  TORCH_CHECK(xhat_in.sizes() == at::IntArrayRef({N, W}) && rstd_in.numel() == N && inv_norm_in.numel() == N,
              "eot_project_backward: xhat must be (N, W), rstd and inv_norm (N,)");
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor g = grad_out_in.contiguous(), out = out_in.contiguous(), inv_norm = inv_norm_in.contiguous();
  const at::Tensor xhat = xhat_in.contiguous(), rstd = rstd_in.contiguous(), eot = eot_index.contiguous();
  const at::Tensor w = ln_weight.contiguous(), b = ln_bias.contiguous();
  at::Tensor gz = new_output({N, D}, g.options());
  at::Tensor y = new_output({N, W}, g.options());
  at::Tensor dx = at::zeros({N, S, W}, x.options());
  at::Tensor dw = new_output({W}, x.options());
  at::Tensor db = new_output({W}, x.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (N == 0) {
    dw.zero_();
    db.zero_();
    return {dx, dw, db, at::zeros_like(proj)};
  }
  eot_normalize_backward_kernel<<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
      g.data_ptr<float>(), out.data_ptr<float>(), inv_norm.data_ptr<float>(), D, xhat.data_ptr<float>(),
      w.data_ptr<float>(), b.data_ptr<float>(), W, gz.data_ptr<float>(), y.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor dproj = at::matmul(y.t(), gz);
  const at::Tensor gy = at::matmul(gz, proj.t()).contiguous();
  eot_layer_norm_backward_kernel<<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
      gy.data_ptr<float>(), xhat.data_ptr<float>(), w.data_ptr<float>(), rstd.data_ptr<float>(),
      eot.data_ptr<int64_t>(), S, W, dx.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  eot_param_grad_kernel<<<static_cast<unsigned>((W + 127) / 128), 128, 0, stream>>>(
      gy.data_ptr<float>(), xhat.data_ptr<float>(), N, W, dw.data_ptr<float>(), db.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dx, dw, db, dproj};
}

}  // namespace guidg_fast
