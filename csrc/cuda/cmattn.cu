// CUDA launchers for cmattn: the fused score / softmax-over-experts / mean-over-heads step of the
// cross-modal attention. q (B, H, D), keys (K, H, D); the projections are GEMMs done by the caller.
//   forward : one block per sample b (all heads, all experts) -> out[b, :]
//   backward: one block per (b, h) row -> dq row + per-row coefficients; then one block per
//             (k, h) key sums the coefficients over the batch in a fixed order (no atomics).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>
#include <tuple>

#include "cmattn.h"
#include "cmattn_args.h"
#include "outputs.h"
#include "launchers.h"

namespace guidg_fast {
namespace {

constexpr int kThreads = 128;
constexpr int kMaxExperts = 512;   // per-row scratch lives in shared memory

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block, returned to every thread; red needs 32 slots. Fixed order: deterministic.
template <typename T>
__device__ T block_sum(T v, T* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // the previous call's readers are done with red
  if (lane == 0) red[warp] = v;
  __syncthreads();
  T total = 0;
  const int n_warps = (blockDim.x + 31) >> 5;
  for (int w = 0; w < n_warps; ++w) total += red[w];
  return total;
}

// Squared norm of x and dot(x, y) over D, shared by every thread of the block.
template <typename scalar_t, typename acc_t>
__device__ acc_t block_dot(const scalar_t* x, const scalar_t* y, int64_t D, acc_t* red) {
  acc_t part = 0;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) part += static_cast<acc_t>(x[d]) * static_cast<acc_t>(y[d]);
  return block_sum(part, red);
}

// Probabilities of row (b, h) into s (thread 0), dots into dot, key norms into kn; returns ||q||.
template <typename scalar_t, typename acc_t>
__device__ acc_t row_probabilities(bool cosine, const scalar_t* qrow, const scalar_t* keys, int64_t K, int64_t H,
                                   int64_t h, int64_t D, acc_t sqrt_d, acc_t* red, acc_t* dot, acc_t* kn, acc_t* s) {
  const acc_t q_norm = sqrt(block_dot<scalar_t, acc_t>(qrow, qrow, D, red));
  for (int64_t k = 0; k < K; ++k) {
    const scalar_t* krow = keys + (k * H + h) * D;
    const acc_t dk = block_dot<scalar_t, acc_t>(qrow, krow, D, red);
    const acc_t nk = sqrt(block_dot<scalar_t, acc_t>(krow, krow, D, red));
    if (threadIdx.x == 0) {
      dot[k] = dk;
      kn[k] = nk;
      s[k] = cmattn_score(cosine, dk, cmattn_clamp_norm(q_norm), cmattn_clamp_norm(nk), sqrt_d);
    }
  }
  if (threadIdx.x == 0) cmattn_softmax(s, K);
  __syncthreads();
  return q_norm;
}

template <typename scalar_t, typename acc_t>
__global__ void cmattn_forward_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ keys,
                                      scalar_t* __restrict__ out, int64_t K, int64_t H, int64_t D, bool cosine,
                                      acc_t sqrt_d) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* red = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* s = red + 32;
  acc_t* dot = s + K;
  acc_t* kn = dot + K;
  acc_t* acc = kn + K;
  const int64_t b = blockIdx.x;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) acc[k] = 0;
  __syncthreads();
  for (int64_t h = 0; h < H; ++h) {
    row_probabilities<scalar_t, acc_t>(cosine, q + (b * H + h) * D, keys, K, H, h, D, sqrt_d, red, dot, kn, s);
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) acc[k] += s[k];
    __syncthreads();
  }
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) out[b * K + k] = static_cast<scalar_t>(acc[k] / static_cast<acc_t>(H));
}

template <typename scalar_t, typename acc_t>
__global__ void cmattn_backward_rows_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ q,
                                            const scalar_t* __restrict__ keys, scalar_t* __restrict__ dq,
                                            acc_t* __restrict__ coef, acc_t* __restrict__ key_term, int64_t K,
                                            int64_t H, int64_t D, bool cosine, acc_t sqrt_d) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* red = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* a = red + 32;
  acc_t* dot = a + K;
  acc_t* kn = dot + K;
  acc_t* g = kn + K;
  acc_t* ds = g + K;
  acc_t* c = ds + K;
  acc_t* q_weight = c + K;  // one slot
  const int64_t row = blockIdx.x;  // b * H + h
  const int64_t b = row / H, h = row % H;
  const scalar_t* qrow = q + row * D;
  const acc_t q_norm = row_probabilities<scalar_t, acc_t>(cosine, qrow, keys, K, H, h, D, sqrt_d, red, dot, kn, a);
  if (threadIdx.x == 0) {
    for (int64_t k = 0; k < K; ++k) g[k] = static_cast<acc_t>(grad_out[b * K + k]) / static_cast<acc_t>(H);
    cmattn_softmax_backward(a, g, ds, K);
    q_weight[0] = cmattn_row_backward(cosine, ds, dot, kn, q_norm, sqrt_d, K, c, key_term + row * K);
    for (int64_t k = 0; k < K; ++k) coef[row * K + k] = c[k];
  }
  __syncthreads();
  const acc_t qw = q_weight[0];
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    acc_t v = qw * static_cast<acc_t>(qrow[d]);
    for (int64_t k = 0; k < K; ++k) v += c[k] * static_cast<acc_t>(keys[(k * H + h) * D + d]);
    dq[row * D + d] = static_cast<scalar_t>(v);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void cmattn_backward_keys_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ keys,
                                            const acc_t* __restrict__ coef, const acc_t* __restrict__ key_term,
                                            scalar_t* __restrict__ dkey, int64_t B, int64_t K, int64_t H, int64_t D,
                                            bool cosine) {
  __shared__ acc_t red[32];
  const int64_t kh = blockIdx.x;  // k * H + h
  const int64_t k = kh / H, h = kh % H;
  const scalar_t* krow = keys + kh * D;
  const acc_t key_norm = sqrt(block_dot<scalar_t, acc_t>(krow, krow, D, red));
  acc_t part = 0;
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) part += key_term[(b * H + h) * K + k];
  const acc_t self_weight = cmattn_key_self_weight(cosine, block_sum(part, red), key_norm);
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    acc_t v = self_weight * static_cast<acc_t>(krow[d]);
    for (int64_t b = 0; b < B; ++b) v += coef[(b * H + h) * K + k] * static_cast<acc_t>(q[(b * H + h) * D + d]);
    dkey[kh * D + d] = static_cast<scalar_t>(v);
  }
}

void check_inputs(const at::Tensor& q, const at::Tensor& keys, const char* op) {
  TORCH_CHECK(q.is_cuda(), op, " (CUDA kernel): q and keys must be CUDA tensors");
  cmattn::check_inputs(q, keys, op);
  TORCH_CHECK(keys.size(0) <= kMaxExperts, op, ": at most ", kMaxExperts, " experts, got K = ", keys.size(0));
}

}  // namespace

at::Tensor cmattn_forward_cuda(const at::Tensor& q, const at::Tensor& keys, bool cosine) {
  check_inputs(q, keys, "cmattn_forward");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), K = keys.size(0);
  c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = new_output({B, K}, q.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "cmattn_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t smem = (32 + 4 * K) * sizeof(acc_t);
    cmattn_forward_kernel<scalar_t, acc_t><<<static_cast<unsigned>(B), kThreads, smem, stream>>>(
        q.data_ptr<scalar_t>(), keys.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), K, H, D, cosine,
        static_cast<acc_t>(std::sqrt(static_cast<double>(D))));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> cmattn_backward_cuda(const at::Tensor& grad_out, const at::Tensor& q,
                                                         const at::Tensor& keys, bool cosine) {
  check_inputs(q, keys, "cmattn_backward");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), K = keys.size(0);
  cmattn::check_grad_out(grad_out, q, keys);
  c10::cuda::CUDAGuard guard(q.device());
  at::Tensor dq = new_output(q.sizes(), q.options());
  at::Tensor dkey = new_output(keys.sizes(), keys.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "cmattn_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto scratch_options = q.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    at::Tensor coef = at::empty({B, H, K}, scratch_options);
    at::Tensor key_term = at::empty({B, H, K}, scratch_options);
    const acc_t sqrt_d = static_cast<acc_t>(std::sqrt(static_cast<double>(D)));
    const size_t smem = (32 + 6 * K + 1) * sizeof(acc_t);
    cmattn_backward_rows_kernel<scalar_t, acc_t><<<static_cast<unsigned>(B * H), kThreads, smem, stream>>>(
        grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), keys.data_ptr<scalar_t>(), dq.data_ptr<scalar_t>(),
        coef.data_ptr<acc_t>(), key_term.data_ptr<acc_t>(), K, H, D, cosine, sqrt_d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    cmattn_backward_keys_kernel<scalar_t, acc_t><<<static_cast<unsigned>(K * H), kThreads, 0, stream>>>(
        q.data_ptr<scalar_t>(), keys.data_ptr<scalar_t>(), coef.data_ptr<acc_t>(), key_term.data_ptr<acc_t>(),
        dkey.data_ptr<scalar_t>(), B, K, H, D, cosine);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dq, dkey};
}

}  // namespace guidg_fast
