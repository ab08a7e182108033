// CUDA launcher for multi_expert_loss (math: csrc/include/multi_expert_loss.h; pass structure:
// guidg_fast/ops/multi_expert_loss.py). fp32 and fp64, accumulation in the input type.
//
// Kernels and their blocks (256 threads = 8 warps; a warp computes one logit at a time as a dot
// product over D, lanes striding D, so the (B, K, C) logits are never stored):
//   forward_rows      block (b, k): the margin-shifted row g_b in shared memory; classes in steps of
//                     32 (4 per warp); online log-sum-exp (every thread keeps the same running max
//                     and sum, from the same shared tile values), o accumulated per thread-owned d.
//   forward_entropy   block (class tile of 32, k) over all rows: p from lse, column sums -> pbar,
//                     and the tile's partial of mean_b H(p_b) - H(pbar_k) (fixed-order sums).
//   finalize          one block: loss = sum a CE + entropy_weight * sum(partials), tree-reduced.
//   backward_rows     block b, looping over k: q_bk (from o when the forward kept it, else one class
//                     sweep), df_b = tau sum_k q_bk, per-sample dw.
//   weight_grad       one block: batch-weight dw_k = grad sum_b CE_bk / B.
//   backward_experts  block (8 classes, k) over all rows: dT rows of those classes, each element
//                     owned by one thread across the row loop (no atomics), including the margin path
//                     through T_k[y_b].
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>

#include "multi_expert_loss.h"
#include "multi_expert_loss_args.h"
#include "outputs.h"
#include "launchers.h"

namespace guidg_fast {
namespace multi_expert_loss {
namespace {

constexpr size_t kMaxSharedBytes = 48 * 1024;

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;  // complete in lane 0
}

// Sum over the block in a fixed tree order (deterministic); the result is valid in thread 0.
template <typename acc_t>
__device__ acc_t block_sum(acc_t v, acc_t* scratch) {
  scratch[threadIdx.x] = v;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) scratch[threadIdx.x] += scratch[threadIdx.x + stride];
    __syncthreads();
  }
  return scratch[0];
}

// g_b = f_b - margin T_k[y_b] into shared memory (all threads), followed by a barrier.
template <typename scalar_t, typename acc_t>
__device__ void load_shifted_row(acc_t* g, const scalar_t* f_row, const scalar_t* t_target, int64_t D, acc_t margin) {
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    g[d] = shifted_feature<acc_t>(static_cast<acc_t>(f_row[d]), static_cast<acc_t>(t_target[d]), margin);
  }
  __syncthreads();
}

// Warp `warp` computes tau * g . T_k[c0 + j] for j = warp, warp + 8, ... < count into z[j].
template <typename scalar_t, typename acc_t>
__device__ void tile_logits(acc_t* z, const acc_t* g, const scalar_t* tile, int count, int64_t D, acc_t tau) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  for (int j = warp; j < count; j += kCudaWarps) {
    const scalar_t* tc = tile + j * D;
    acc_t s = 0;
    for (int64_t d = lane; d < D; d += 32) s += g[d] * static_cast<acc_t>(tc[d]);
    s = warp_sum(s);
    if (lane == 0) z[j] = tau * s;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void forward_rows_kernel(const scalar_t* __restrict__ f, const scalar_t* __restrict__ T,
                                    const int64_t* __restrict__ y, scalar_t* lse_out, scalar_t* ce_out,
                                    scalar_t* o_out, int64_t K, int64_t C, int64_t D, acc_t tau, acc_t margin,
                                    bool need_o) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* g = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* o = g + D;
  __shared__ acc_t z[kCudaClassTile];
  const int64_t b = blockIdx.x;
  const int64_t k = blockIdx.y;
  const scalar_t* tk = T + k * C * D;
  const int64_t yb = y[b];
  CUDA_KERNEL_ASSERT(yb >= 0 && yb < C);
  if (need_o) {
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) o[d] = acc_t(0);
  }
  load_shifted_row<scalar_t, acc_t>(g, f + b * D, tk + yb * D, D, margin);
  OnlineLse<acc_t> state;
  state.init();
  acc_t target = 0;
  for (int64_t c0 = 0; c0 < C; c0 += kCudaClassTile) {
    const int ct = static_cast<int>(C - c0 < kCudaClassTile ? C - c0 : kCudaClassTile);
    const scalar_t* tile = tk + c0 * D;
    tile_logits<scalar_t, acc_t>(z, g, tile, ct, D, tau);
    __syncthreads();
    acc_t tile_max = static_cast<acc_t>(-INFINITY);
    for (int j = 0; j < ct; ++j) tile_max = z[j] > tile_max ? z[j] : tile_max;
    if (yb >= c0 && yb < c0 + ct) target = z[yb - c0];
    const acc_t alpha = state.rescale(tile_max);
    __syncthreads();  // every thread has read the logits before they become exp(z - max)
    if (threadIdx.x < ct) z[threadIdx.x] = exp_acc<acc_t>(z[threadIdx.x] - state.max);
    __syncthreads();
    for (int j = 0; j < ct; ++j) state.sum += z[j];
    if (need_o) {
      for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
        acc_t v = o[d] * alpha;
        for (int j = 0; j < ct; ++j) v += z[j] * static_cast<acc_t>(tile[j * D + d]);
        o[d] = v;
      }
    }
    __syncthreads();  // z is rewritten by the next tile
  }
  const acc_t lse = state.lse();
  if (threadIdx.x == 0) {
    lse_out[b * K + k] = static_cast<scalar_t>(lse);
    ce_out[b * K + k] = static_cast<scalar_t>(lse - target);
  }
  if (need_o) {
    const acc_t inv_sum = acc_t(1) / state.sum;
    scalar_t* dst = o_out + (b * K + k) * D;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) dst[d] = static_cast<scalar_t>(o[d] * inv_sum);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void forward_entropy_kernel(const scalar_t* __restrict__ f, const scalar_t* __restrict__ T,
                                       const int64_t* __restrict__ y, const scalar_t* __restrict__ lse,
                                       scalar_t* pbar_out, scalar_t* partial_out, int64_t B, int64_t K, int64_t C,
                                       int64_t D, acc_t tau, acc_t margin) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* g = reinterpret_cast<acc_t*>(smem_raw);
  __shared__ acc_t z[kCudaClassTile];
  __shared__ acc_t scratch[kCudaThreads];
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kCudaClassTile;
  const int64_t k = blockIdx.y;
  const int ct = static_cast<int>(C - c0 < kCudaClassTile ? C - c0 : kCudaClassTile);
  const scalar_t* tk = T + k * C * D;
  const acc_t inv_batch = acc_t(1) / static_cast<acc_t>(B);
  // thread j < ct owns class c0 + j
  acc_t colsum = 0, row_entropy = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t yb = y[b];
    CUDA_KERNEL_ASSERT(yb >= 0 && yb < C);
    load_shifted_row<scalar_t, acc_t>(g, f + b * D, tk + yb * D, D, margin);
    tile_logits<scalar_t, acc_t>(z, g, tk + c0 * D, ct, D, tau);
    __syncthreads();
    if (threadIdx.x < ct) {
      const acc_t p = exp_acc<acc_t>(z[threadIdx.x] - static_cast<acc_t>(lse[b * K + k]));
      colsum += p;
      row_entropy += entropy_term(p);
    }
    __syncthreads();  // g and z are rewritten for the next row
  }
  acc_t mine = 0;
  if (threadIdx.x < ct) {
    const acc_t pb = colsum * inv_batch;
    pbar_out[k * C + c0 + threadIdx.x] = static_cast<scalar_t>(pb);
    mine = row_entropy * inv_batch - entropy_term(pb);
  }
  const acc_t total = block_sum(mine, scratch);
  if (threadIdx.x == 0) partial_out[k * gridDim.x + blockIdx.x] = static_cast<scalar_t>(total);
}

template <typename scalar_t, typename acc_t>
__global__ void finalize_kernel(const scalar_t* __restrict__ ce, const scalar_t* __restrict__ w,
                                const scalar_t* __restrict__ partial, scalar_t* loss, int64_t B, int64_t K,
                                bool per_sample, int64_t n_partial, acc_t entropy_weight) {
  __shared__ acc_t scratch[kCudaThreads];
  const acc_t inv_batch = acc_t(1) / static_cast<acc_t>(B);
  acc_t s = 0;
  for (int64_t i = threadIdx.x; i < B * K; i += blockDim.x) {
    s += sample_weight<acc_t>(w, per_sample, i / K, i % K, K, inv_batch) * static_cast<acc_t>(ce[i]);
  }
  acc_t total = block_sum(s, scratch);
  __syncthreads();
  acc_t e = 0;
  for (int64_t i = threadIdx.x; i < n_partial; i += blockDim.x) e += static_cast<acc_t>(partial[i]);
  const acc_t ent = block_sum(e, scratch);
  if (threadIdx.x == 0) *loss = static_cast<scalar_t>(total + entropy_weight * ent);
}

template <typename scalar_t, typename acc_t>
__global__ void backward_rows_kernel(const scalar_t* __restrict__ grad_ptr, const scalar_t* __restrict__ f,
                                     const scalar_t* __restrict__ T, const int64_t* __restrict__ y,
                                     const scalar_t* __restrict__ w, const scalar_t* __restrict__ lse,
                                     const scalar_t* __restrict__ ce, const scalar_t* __restrict__ o,
                                     const scalar_t* __restrict__ pbar, scalar_t* q_out, scalar_t* r_out,
                                     scalar_t* df_out, scalar_t* dw_out, int64_t B, int64_t K, int64_t C, int64_t D,
                                     acc_t tau, acc_t margin, acc_t entropy_weight, bool per_sample, bool need_rows,
                                     bool need_f, bool need_w) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* df = reinterpret_cast<acc_t*>(smem_raw);  // thread-owned elements
  acc_t* g = df + D;                                 // entropy sweep only: g, A, O
  acc_t* acc_a = g + D;
  acc_t* acc_o = acc_a + D;
  __shared__ acc_t z[kCudaClassTile];
  __shared__ acc_t coef_a[kCudaClassTile];
  __shared__ acc_t pu[kCudaClassTile];
  const int64_t b = blockIdx.x;
  const acc_t grad = static_cast<acc_t>(*grad_ptr);
  const acc_t inv_batch = acc_t(1) / static_cast<acc_t>(B);
  const bool entropy = entropy_weight != acc_t(0);
  const int64_t yb = y[b];
  CUDA_KERNEL_ASSERT(yb >= 0 && yb < C);
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) df[d] = acc_t(0);
  for (int64_t k = 0; k < K; ++k) {
    const acc_t a = sample_weight<acc_t>(w, per_sample, b, k, K, inv_batch);
    const int64_t bk = b * K + k;
    if (need_w && per_sample && threadIdx.x == 0) dw_out[bk] = static_cast<scalar_t>(grad * static_cast<acc_t>(ce[bk]) * inv_batch);
    if (!need_rows) continue;
    const scalar_t* tk = T + k * C * D;
    const scalar_t* ty = tk + yb * D;
    if (o != nullptr) {
      // CE only, o kept by the forward: sum_c dz_bc T_c = grad a (o_bk - T_k[y_b])
      for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
        const acc_t q = grad * a * (static_cast<acc_t>(o[bk * D + d]) - static_cast<acc_t>(ty[d]));
        if (q_out != nullptr) q_out[bk * D + d] = static_cast<scalar_t>(q);
        df[d] += q;
      }
      continue;
    }
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      acc_a[d] = acc_t(0);
      acc_o[d] = acc_t(0);
    }
    load_shifted_row<scalar_t, acc_t>(g, f + b * D, ty, D, margin);
    const acc_t l = static_cast<acc_t>(lse[bk]);
    acc_t r = 0;  // the same value in every thread
    for (int64_t c0 = 0; c0 < C; c0 += kCudaClassTile) {
      const int ct = static_cast<int>(C - c0 < kCudaClassTile ? C - c0 : kCudaClassTile);
      const scalar_t* tile = tk + c0 * D;
      tile_logits<scalar_t, acc_t>(z, g, tile, ct, D, tau);
      __syncthreads();
      if (threadIdx.x < ct) {
        const acc_t p = exp_acc<acc_t>(z[threadIdx.x] - l);
        acc_t pu_j = 0;
        if (entropy) {
          const acc_t hbar = entropy_term_grad<acc_t>(static_cast<acc_t>(pbar[k * C + c0 + threadIdx.x]));
          pu_j = p * entropy_prob_grad<acc_t>(p, hbar, inv_batch);
        }
        pu[threadIdx.x] = pu_j;
        coef_a[threadIdx.x] = a * p + entropy_weight * pu_j;
        z[threadIdx.x] = p;
      }
      __syncthreads();
      for (int j = 0; j < ct; ++j) r += pu[j];
      for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
        acc_t va = acc_a[d], vo = acc_o[d];
        for (int j = 0; j < ct; ++j) {
          const acc_t t = static_cast<acc_t>(tile[j * D + d]);
          va += coef_a[j] * t;
          vo += z[j] * t;
        }
        acc_a[d] = va;
        acc_o[d] = vo;
      }
      __syncthreads();
    }
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      const acc_t q = grad * (acc_a[d] - a * static_cast<acc_t>(ty[d]) - entropy_weight * r * acc_o[d]);
      if (q_out != nullptr) q_out[bk * D + d] = static_cast<scalar_t>(q);
      df[d] += q;
    }
    if (r_out != nullptr && threadIdx.x == 0) r_out[bk] = static_cast<scalar_t>(r);
    __syncthreads();  // g is rewritten for the next expert
  }
  if (need_f) {
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) df_out[b * D + d] = static_cast<scalar_t>(tau * df[d]);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void weight_grad_kernel(const scalar_t* __restrict__ grad_ptr, const scalar_t* __restrict__ ce,
                                   scalar_t* dw_out, int64_t B, int64_t K) {
  const acc_t grad = static_cast<acc_t>(*grad_ptr);
  const acc_t inv_batch = acc_t(1) / static_cast<acc_t>(B);
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    acc_t s = 0;
    for (int64_t b = 0; b < B; ++b) s += static_cast<acc_t>(ce[b * K + k]);
    dw_out[k] = static_cast<scalar_t>(grad * s * inv_batch);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void backward_experts_kernel(const scalar_t* __restrict__ grad_ptr, const scalar_t* __restrict__ f,
                                        const scalar_t* __restrict__ T, const int64_t* __restrict__ y,
                                        const scalar_t* __restrict__ w, const scalar_t* __restrict__ lse,
                                        const scalar_t* __restrict__ pbar, const scalar_t* __restrict__ q,
                                        const scalar_t* __restrict__ r, scalar_t* dT, int64_t B, int64_t K, int64_t C,
                                        int64_t D, acc_t tau, acc_t margin, acc_t entropy_weight, bool per_sample) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* g = reinterpret_cast<acc_t*>(smem_raw);
  __shared__ acc_t z[kCudaExpertGradClasses];
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kCudaExpertGradClasses;
  const int64_t k = blockIdx.y;
  const int ct = static_cast<int>(C - c0 < kCudaExpertGradClasses ? C - c0 : kCudaExpertGradClasses);
  const scalar_t* tk = T + k * C * D;
  scalar_t* out = dT + (k * C + c0) * D;
  const acc_t grad = static_cast<acc_t>(*grad_ptr);
  const acc_t inv_batch = acc_t(1) / static_cast<acc_t>(B);
  const bool entropy = entropy_weight != acc_t(0);
  // one class per warp for the logits; dT elements (c, d) owned by thread d % blockDim
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  acc_t pbar_grad = 0;
  if (entropy && warp < ct) pbar_grad = entropy_term_grad<acc_t>(static_cast<acc_t>(pbar[k * C + c0 + warp]));
  for (int c = 0; c < ct; ++c) {
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) out[c * D + d] = scalar_t(0);
  }
  for (int64_t b = 0; b < B; ++b) {
    const int64_t yb = y[b];
    CUDA_KERNEL_ASSERT(yb >= 0 && yb < C);
    const int64_t bk = b * K + k;
    load_shifted_row<scalar_t, acc_t>(g, f + b * D, tk + yb * D, D, margin);
    if (warp < ct) {
      const scalar_t* tc = tk + (c0 + warp) * D;
      acc_t s = 0;
      for (int64_t d = lane; d < D; d += 32) s += g[d] * static_cast<acc_t>(tc[d]);
      s = warp_sum(s);
      if (lane == 0) {
        const acc_t p = exp_acc<acc_t>(tau * s - static_cast<acc_t>(lse[bk]));
        const acc_t a = sample_weight<acc_t>(w, per_sample, b, k, K, inv_batch);
        const acc_t u = entropy ? entropy_prob_grad<acc_t>(p, pbar_grad, inv_batch) : acc_t(0);
        const acc_t rb = entropy ? static_cast<acc_t>(r[bk]) : acc_t(0);
        z[warp] = grad * logit_grad<acc_t>(a, p, yb == c0 + warp, entropy_weight, u, rb);
      }
    }
    __syncthreads();
    const int target = (margin != acc_t(0) && yb >= c0 && yb < c0 + ct) ? static_cast<int>(yb - c0) : -1;
    for (int c = 0; c < ct; ++c) {
      const acc_t dz = z[c];
      for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
        acc_t v = static_cast<acc_t>(out[c * D + d]) + tau * dz * g[d];
        // the path through the gathered T_k[y_b]
        if (c == target) v -= margin * tau * static_cast<acc_t>(q[bk * D + d]);
        out[c * D + d] = static_cast<scalar_t>(v);
      }
    }
    __syncthreads();  // g and z are rewritten for the next row
  }
}

Shapes check_inputs_cuda(const at::Tensor& f, const at::Tensor& T, const at::Tensor& y, const at::Tensor& w) {
  TORCH_CHECK(f.is_cuda(), "f must be a CUDA tensor for the CUDA kernel");
  const Shapes s = check_inputs(f, T, y, w);  // the checks shared with the CPU launcher
  TORCH_CHECK(s.K <= 65535, "multi_expert_loss (CUDA): at most 65535 experts, got K = ", s.K);
  return s;
}

void check_shared(size_t bytes, int64_t D) {
  TORCH_CHECK(bytes <= kMaxSharedBytes, "multi_expert_loss (CUDA): feature width D = ", D,
              " needs more shared memory than the kernel's 48 KiB (use float32 or the Triton backend)");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> multi_expert_loss_forward_cuda(
    const at::Tensor& f, const at::Tensor& T, const at::Tensor& y, const at::Tensor& w, double temperature,
    double margin, double entropy_weight, bool need_o) {
  const Shapes s = check_inputs_cuda(f, T, y, w);
  TORCH_CHECK(temperature > 0, "temperature must be positive, got ", temperature);
  c10::cuda::CUDAGuard guard(f.device());
  const auto options = f.options();
  const bool entropy = entropy_weight != 0.0;
  need_o = need_o && !entropy;
  at::Tensor loss = new_output({}, options);
  at::Tensor lse = new_output({s.B, s.K}, options);
  at::Tensor ce = new_output({s.B, s.K}, options);
  at::Tensor o = need_o ? new_output({s.B, s.K, s.D}, options) : at::empty({0}, options);
  at::Tensor pbar = entropy ? new_output({s.K, s.C}, options) : at::empty({0}, options);
  const int64_t n_tiles = (s.C + kCudaClassTile - 1) / kCudaClassTile;
  at::Tensor partial = entropy ? new_output({s.K * n_tiles}, options) : at::empty({0}, options);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "multi_expert_loss_forward_cuda", [&] {
    using acc_t = scalar_t;
    const acc_t tau = static_cast<acc_t>(temperature);
    const acc_t m = static_cast<acc_t>(margin);
    const size_t row_smem = (need_o ? 2 : 1) * s.D * sizeof(acc_t);
    check_shared(row_smem, s.D);
    forward_rows_kernel<scalar_t, acc_t><<<dim3(static_cast<unsigned>(s.B), static_cast<unsigned>(s.K)), kCudaThreads,
                                           row_smem, stream>>>(
        f.data_ptr<scalar_t>(), T.data_ptr<scalar_t>(), y.data_ptr<int64_t>(), lse.data_ptr<scalar_t>(),
        ce.data_ptr<scalar_t>(), need_o ? o.data_ptr<scalar_t>() : nullptr, s.K, s.C, s.D, tau, m, need_o);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (entropy) {
      forward_entropy_kernel<scalar_t, acc_t><<<dim3(static_cast<unsigned>(n_tiles), static_cast<unsigned>(s.K)),
                                                kCudaThreads, s.D * sizeof(acc_t), stream>>>(
          f.data_ptr<scalar_t>(), T.data_ptr<scalar_t>(), y.data_ptr<int64_t>(), lse.data_ptr<scalar_t>(),
          pbar.data_ptr<scalar_t>(), partial.data_ptr<scalar_t>(), s.B, s.K, s.C, s.D, tau, m);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    finalize_kernel<scalar_t, acc_t><<<1, kCudaThreads, 0, stream>>>(
        ce.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), entropy ? partial.data_ptr<scalar_t>() : nullptr,
        loss.data_ptr<scalar_t>(), s.B, s.K, s.per_sample, entropy ? partial.numel() : 0,
        static_cast<acc_t>(entropy_weight));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, lse, ce, o, pbar};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_expert_loss_backward_cuda(
    const at::Tensor& grad, const at::Tensor& f, const at::Tensor& T, const at::Tensor& y, const at::Tensor& w,
    const at::Tensor& lse, const at::Tensor& ce, const at::Tensor& o, const at::Tensor& pbar, double temperature,
    double margin, double entropy_weight, bool need_f, bool need_T, bool need_w) {
  const Shapes s = check_inputs_cuda(f, T, y, w);
  const bool entropy = entropy_weight != 0.0;
  TORCH_CHECK(grad.numel() == 1 && grad.device() == f.device() && grad.scalar_type() == f.scalar_type(),
              "grad must be one value of f's dtype on f's device, got shape ", grad.sizes());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({s.B, s.K}) && ce.sizes() == at::IntArrayRef({s.B, s.K}) &&
                  lse.is_contiguous() && ce.is_contiguous(),
              "lse and ce must be contiguous with shape (B, K) = (", s.B, ", ", s.K, ")");
  const bool need_rows = need_f || (need_T && (margin != 0.0 || entropy));
  // o from the forward (CE only) saves the backward a class sweep; empty: the backward sweeps
  const bool have_o = !entropy && o.numel() > 0;
  if (have_o) {
    TORCH_CHECK(o.sizes() == at::IntArrayRef({s.B, s.K, s.D}) && o.is_contiguous() && o.scalar_type() == f.scalar_type(),
                "o must be empty or the (B, K, D) softmax-weighted expert features of the forward pass, got shape ",
                o.sizes());
  }
  if (entropy) {
    TORCH_CHECK(pbar.sizes() == at::IntArrayRef({s.K, s.C}) && pbar.is_contiguous(),
                "pbar must have shape (K, C) = (", s.K, ", ", s.C, ") when entropy_weight != 0, got ", pbar.sizes());
  }
  c10::cuda::CUDAGuard guard(f.device());
  const auto options = f.options();
  at::Tensor df = need_f ? new_output({s.B, s.D}, options) : at::empty({0}, options);
  at::Tensor dT = need_T ? new_output({s.K, s.C, s.D}, options) : at::empty({0}, options);
  at::Tensor dw = need_w ? new_output(w.sizes(), options) : at::empty({0}, options);
  const bool store_q = need_T && margin != 0.0;
  const bool store_r = need_T && entropy;
  at::Tensor q = store_q ? at::empty({s.B, s.K, s.D}, options) : at::Tensor();
  at::Tensor r = store_r ? at::empty({s.B, s.K}, options) : at::Tensor();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "multi_expert_loss_backward_cuda", [&] {
    using acc_t = scalar_t;
    const acc_t tau = static_cast<acc_t>(temperature);
    const acc_t m = static_cast<acc_t>(margin);
    const acc_t ew = static_cast<acc_t>(entropy_weight);
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    if (need_rows || (need_w && s.per_sample)) {
      const size_t smem = (!have_o && need_rows ? 4 : 1) * s.D * sizeof(acc_t);
      check_shared(smem, s.D);
      backward_rows_kernel<scalar_t, acc_t><<<static_cast<unsigned>(s.B), kCudaThreads, smem, stream>>>(
          gp, f.data_ptr<scalar_t>(), T.data_ptr<scalar_t>(), y.data_ptr<int64_t>(), w.data_ptr<scalar_t>(),
          lse.data_ptr<scalar_t>(), ce.data_ptr<scalar_t>(),
          have_o ? o.data_ptr<scalar_t>() : nullptr, entropy ? pbar.data_ptr<scalar_t>() : nullptr,
          store_q ? q.data_ptr<scalar_t>() : nullptr, store_r ? r.data_ptr<scalar_t>() : nullptr,
          need_f ? df.data_ptr<scalar_t>() : nullptr, need_w ? dw.data_ptr<scalar_t>() : nullptr, s.B, s.K, s.C, s.D,
          tau, m, ew, s.per_sample, need_rows, need_f, need_w);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (need_w && !s.per_sample) {
      weight_grad_kernel<scalar_t, acc_t><<<1, kCudaThreads, 0, stream>>>(gp, ce.data_ptr<scalar_t>(),
                                                                          dw.data_ptr<scalar_t>(), s.B, s.K);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (need_T) {
      const int64_t blocks = (s.C + kCudaExpertGradClasses - 1) / kCudaExpertGradClasses;
      check_shared(s.D * sizeof(acc_t), s.D);
      backward_experts_kernel<scalar_t, acc_t><<<dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(s.K)),
                                                 kCudaThreads, s.D * sizeof(acc_t), stream>>>(
          gp, f.data_ptr<scalar_t>(), T.data_ptr<scalar_t>(), y.data_ptr<int64_t>(), w.data_ptr<scalar_t>(),
          lse.data_ptr<scalar_t>(), entropy ? pbar.data_ptr<scalar_t>() : nullptr,
          store_q ? q.data_ptr<scalar_t>() : nullptr, store_r ? r.data_ptr<scalar_t>() : nullptr,
          dT.data_ptr<scalar_t>(), s.B, s.K, s.C, s.D, tau, m, ew, s.per_sample);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {df, dT, dw};
}

}  // namespace multi_expert_loss

}  // namespace guidg_fast
