// CUDA launchers of prefix_attention (float32; other dtypes are cast in Python).
//
// Forward: one block per (sequence (k, m), head h); each warp owns queries s = warp, warp + W, ...;
// a lane holds Dh / 32 elements of q and of the output accumulator. Keys stream one at a time with
// an online softmax (warp-shuffle dot products), so no score tensor exists; lse is saved.
// Backward: one block per (k, h, m-chunk). The prefix dK/dV of (k, h), summed over the chunk, and
// the suffix dK/dV of the current sequence live in shared memory (shared atomics between warps);
// the prefix sums go to global memory with one atomic add per element per block at the end. When
// the accumulators do not fit in shared memory they are accumulated in global memory directly.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>

#include "prefix_attention.h"
#include "prefix_attention_args.h"
#include "outputs.h"
#include "launchers.h"

namespace guidg_fast {
namespace {

using namespace prefix_attention_args;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

struct Pointers {
  const float* q;
  const float* k;
  const float* v;
  const float* kp;
  const float* vp;
  SuffixStrides sq, sk, sv;
  PrefixStrides skp, svp;
};

__device__ __forceinline__ const float* key_row(const Pointers& in, const PrefixAttentionShape& sh, int64_t k,
                                                int64_t m, int64_t h, int64_t j) {
  return j < sh.P ? in.kp + prefix_offset(in.skp, k, j, h) : in.k + suffix_offset(in.sk, k, m, j - sh.P, h);
}
__device__ __forceinline__ const float* value_row(const Pointers& in, const PrefixAttentionShape& sh, int64_t k,
                                                  int64_t m, int64_t h, int64_t j) {
  return j < sh.P ? in.vp + prefix_offset(in.svp, k, j, h) : in.v + suffix_offset(in.sv, k, m, j - sh.P, h);
}

// DPL: elements of Dh per lane (Dh <= 32 * DPL)
template <int DPL>
__global__ void __launch_bounds__(kThreads) prefix_attention_forward_kernel(Pointers in, PrefixAttentionShape sh,
                                                                          float scale, float* __restrict__ out,
                                                                          float* __restrict__ lse) {
  const int64_t km = blockIdx.x;
  const int64_t h = blockIdx.y;
  const int64_t k = km / sh.M, m = km % sh.M;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t s = warp; s < sh.S; s += kWarps) {
    const float* qrow = in.q + suffix_offset(in.sq, k, m, s, h);
    float q[DPL], acc[DPL];
#pragma unroll
    for (int e = 0; e < DPL; ++e) {
      const int64_t d = lane + 32 * e;
      q[e] = d < sh.Dh ? qrow[d] : 0.f;
      acc[e] = 0.f;
    }
    OnlineSoftmax<float> softmax;
    softmax.init();
    const int64_t n_keys = prefix_attention_num_keys(s, sh.P);
    for (int64_t j = 0; j < n_keys; ++j) {
      const float* krow = key_row(in, sh, k, m, h, j);
      const float* vrow = value_row(in, sh, k, m, h, j);
      float partial = 0.f;
#pragma unroll
      for (int e = 0; e < DPL; ++e) {
        const int64_t d = lane + 32 * e;
        if (d < sh.Dh) partial += q[e] * krow[d];
      }
      const float score = warp_sum(partial) * scale;
      const float alpha = softmax.absorb_max(score);
      const float p = softmax.weight(score);
#pragma unroll
      for (int e = 0; e < DPL; ++e) {
        const int64_t d = lane + 32 * e;
        acc[e] = acc[e] * alpha + (d < sh.Dh ? p * vrow[d] : 0.f);
      }
    }
    const float inv = softmax.inv_sum();
    float* orow = out + dense_row(sh, k, m, s, h) * sh.Dh;
#pragma unroll
    for (int e = 0; e < DPL; ++e) {
      const int64_t d = lane + 32 * e;
      if (d < sh.Dh) orow[d] = acc[e] * inv;
    }
    if (lane == 0) lse[lse_index(sh, k, m, h, s)] = softmax.lse();
  }
}

struct GradPointers {
  const float* grad_out;  // dense
  const float* out;       // dense
  const float* lse;       // dense (K, M, H, S)
  float* dq;              // dense
  float* dk;              // dense
  float* dv;
  float* dkp;  // (K, P, H, Dh), zero-initialised, atomic adds
  float* dvp;
};

// kShared: accumulators in shared memory (else global atomics into zero-initialised dk/dv/dkp/dvp)
template <int DPL, bool kShared>
__global__ void __launch_bounds__(kThreads) prefix_attention_backward_kernel(Pointers in, GradPointers g,
                                                                           PrefixAttentionShape sh, float scale,
                                                                           int64_t m_chunk) {
  extern __shared__ float shared[];
  const int64_t kh = blockIdx.x;
  const int64_t k = kh / sh.H, h = kh % sh.H;
  const int64_t m_begin = blockIdx.y * m_chunk;
  const int64_t m_end = m_begin + m_chunk < sh.M ? m_begin + m_chunk : sh.M;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t Dh = sh.Dh;
  // prefix accumulators [P][Dh] x 2, then suffix accumulators [S][Dh] x 2
  float* pdk = shared;
  float* pdv = pdk + sh.P * Dh;
  float* sdk = pdv + sh.P * Dh;
  float* sdv = sdk + sh.S * Dh;
  if (kShared) {
    for (int64_t i = threadIdx.x; i < 2 * sh.P * Dh; i += kThreads) shared[i] = 0.f;
  }
  for (int64_t m = m_begin; m < m_end; ++m) {
    if (kShared) {
      for (int64_t i = threadIdx.x; i < 2 * sh.S * Dh; i += kThreads) sdk[i] = 0.f;
    }
    __syncthreads();
    for (int64_t s = warp; s < sh.S; s += kWarps) {
      const int64_t row = dense_row(sh, k, m, s, h) * Dh;
      const float* qrow = in.q + suffix_offset(in.sq, k, m, s, h);
      float q[DPL], dout[DPL], dq[DPL];
      float delta_part = 0.f;
#pragma unroll
      for (int e = 0; e < DPL; ++e) {
        const int64_t d = lane + 32 * e;
        const bool ok = d < Dh;
        q[e] = ok ? qrow[d] : 0.f;
        dout[e] = ok ? g.grad_out[row + d] : 0.f;
        delta_part += ok ? dout[e] * g.out[row + d] : 0.f;
        dq[e] = 0.f;
      }
      const float delta = warp_sum(delta_part);
      const float lse = g.lse[lse_index(sh, k, m, h, s)];
      const int64_t n_keys = prefix_attention_num_keys(s, sh.P);
      for (int64_t j = 0; j < n_keys; ++j) {
        const float* krow = key_row(in, sh, k, m, h, j);
        const float* vrow = value_row(in, sh, k, m, h, j);
        float qk = 0.f, dov = 0.f;
#pragma unroll
        for (int e = 0; e < DPL; ++e) {
          const int64_t d = lane + 32 * e;
          if (d < Dh) {
            qk += q[e] * krow[d];
            dov += dout[e] * vrow[d];
          }
        }
        const float p = recompute_probability<float>(warp_sum(qk) * scale, lse);
        const float ds = score_gradient<float>(p, warp_sum(dov), delta);
        float* dk_row;
        float* dv_row;
        if (kShared) {
          dk_row = j < sh.P ? pdk + j * Dh : sdk + (j - sh.P) * Dh;
          dv_row = j < sh.P ? pdv + j * Dh : sdv + (j - sh.P) * Dh;
        } else {
          const int64_t off = j < sh.P ? ((k * sh.P + j) * sh.H + h) * Dh : dense_row(sh, k, m, j - sh.P, h) * Dh;
          dk_row = (j < sh.P ? g.dkp : g.dk) + off;
          dv_row = (j < sh.P ? g.dvp : g.dv) + off;
        }
#pragma unroll
        for (int e = 0; e < DPL; ++e) {
          const int64_t d = lane + 32 * e;
          if (d < Dh) {
            dq[e] += ds * krow[d];
            atomicAdd(dk_row + d, scale * ds * q[e]);
            atomicAdd(dv_row + d, p * dout[e]);
          }
        }
      }
#pragma unroll
      for (int e = 0; e < DPL; ++e) {
        const int64_t d = lane + 32 * e;
        if (d < Dh) g.dq[row + d] = scale * dq[e];
      }
    }
    __syncthreads();
    if (kShared) {
      for (int64_t i = threadIdx.x; i < sh.S * Dh; i += kThreads) {
        const int64_t s = i / Dh, d = i % Dh;
        const int64_t dst = dense_row(sh, k, m, s, h) * Dh + d;
        g.dk[dst] = sdk[i];
        g.dv[dst] = sdv[i];
      }
      __syncthreads();  // the next sequence zeroes these accumulators
    }
  }
  if (kShared) {
    __syncthreads();
    for (int64_t i = threadIdx.x; i < sh.P * Dh; i += kThreads) {
      const int64_t j = i / Dh, d = i % Dh;
      const int64_t dst = ((k * sh.P + j) * sh.H + h) * Dh + d;
      atomicAdd(g.dkp + dst, pdk[i]);
      atomicAdd(g.dvp + dst, pdv[i]);
    }
  }
}

// the shared checks (prefix_attention_args.h), then what the CUDA kernels need
PrefixAttentionShape check_cuda_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& kp, const at::Tensor& vp) {
  const PrefixAttentionShape sh = check_inputs(op, q, k, v, kp, vp);
  TORCH_CHECK(sh.Dh <= 256, op, " (CUDA kernel): head size Dh must be <= 256, got ", sh.Dh);
  for (const at::Tensor* t : {&q, &k, &v, &kp, &vp}) {
    TORCH_CHECK(t->is_cuda(), op, " (CUDA kernel): all inputs must be CUDA tensors, got ", t->device());
    TORCH_CHECK(t->scalar_type() == at::kFloat, op, " (CUDA kernel): inputs must be float32, got ", t->scalar_type());
  }
  return sh;
}

Pointers make_pointers(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kp,
                       const at::Tensor& vp) {
  return {q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), kp.data_ptr<float>(), vp.data_ptr<float>(),
          suffix_strides(q), suffix_strides(k), suffix_strides(v), prefix_strides(kp), prefix_strides(vp)};
}

template <typename Fn>
void with_dpl(int64_t Dh, Fn fn) {
  if (Dh <= 32) fn(std::integral_constant<int, 1>());
  else if (Dh <= 64) fn(std::integral_constant<int, 2>());
  else if (Dh <= 128) fn(std::integral_constant<int, 4>());
  else fn(std::integral_constant<int, 8>());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> prefix_attention_forward_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                                 const at::Tensor& v_in, const at::Tensor& kp_in,
                                                                 const at::Tensor& vp_in, double scale) {
  const PrefixAttentionShape sh = check_cuda_inputs("prefix_attention_forward", q_in, k_in, v_in, kp_in, vp_in);
  c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const at::Tensor kp = unit_last_stride(kp_in), vp = unit_last_stride(vp_in);
  at::Tensor out = new_output({sh.K, sh.M, sh.S, sh.H, sh.Dh}, q.options());
  at::Tensor lse = new_output({sh.K, sh.M, sh.H, sh.S}, q.options());
  if (sh.K * sh.M * sh.H * sh.S == 0) return {out, lse};
  TORCH_CHECK(sh.H <= 65535, "prefix_attention_forward (CUDA kernel): H must be <= 65535");
  const Pointers in = make_pointers(q, k, v, kp, vp);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(sh.K * sh.M), static_cast<unsigned>(sh.H));
  with_dpl(sh.Dh, [&](auto dpl) {
    prefix_attention_forward_kernel<decltype(dpl)::value><<<grid, kThreads, 0, stream>>>(
        in, sh, static_cast<float>(scale), out.data_ptr<float>(), lse.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_attention_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& kp_in, const at::Tensor& vp_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    double scale) {
  const PrefixAttentionShape sh = check_cuda_inputs("prefix_attention_backward", q_in, k_in, v_in, kp_in, vp_in);
  TORCH_CHECK(grad_out_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(),
              "prefix_attention_backward: grad_out and out must have q's shape ", q_in.sizes());
  TORCH_CHECK(lse_in.sizes() == at::IntArrayRef({sh.K, sh.M, sh.H, sh.S}),
              "prefix_attention_backward: lse must have shape (K, M, H, S)");
  for (const at::Tensor* t : {&grad_out_in, &out_in, &lse_in}) {
    TORCH_CHECK(t->device() == q_in.device() && t->scalar_type() == at::kFloat,
                "prefix_attention_backward (CUDA kernel): grad_out, out and lse must be float32 on q's device");
  }
  c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const at::Tensor kp = unit_last_stride(kp_in), vp = unit_last_stride(vp_in);
  const at::Tensor grad_out = grad_out_in.contiguous(), out = out_in.contiguous(), lse = lse_in.contiguous();
  const int64_t shared_bytes = 2 * (sh.P + sh.S) * sh.Dh * static_cast<int64_t>(sizeof(float));
  int device = q.get_device(), max_shared = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const bool use_shared = shared_bytes <= max_shared;
  at::Tensor dq = new_output(q.sizes(), q.options());
  at::Tensor dk = use_shared ? new_output(q.sizes(), q.options()) : at::zeros(q.sizes(), q.options());
  at::Tensor dv = use_shared ? new_output(q.sizes(), q.options()) : at::zeros(q.sizes(), q.options());
  at::Tensor dkp = at::zeros({sh.K, sh.P, sh.H, sh.Dh}, q.options());
  at::Tensor dvp = at::zeros({sh.K, sh.P, sh.H, sh.Dh}, q.options());
  if (sh.K * sh.M * sh.H * sh.S == 0) return {dq, dk, dv, dkp, dvp};
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t kh = sh.K * sh.H;
  const int64_t want_chunks = std::max<int64_t>(1, (4 * static_cast<int64_t>(sms) + kh - 1) / kh);
  const int64_t chunks = std::min<int64_t>(sh.M, std::min<int64_t>(want_chunks, 65535));
  const int64_t m_chunk = (sh.M + chunks - 1) / chunks;
  const int64_t n_chunks = (sh.M + m_chunk - 1) / m_chunk;
  const Pointers in = make_pointers(q, k, v, kp, vp);
  const GradPointers g{grad_out.data_ptr<float>(), out.data_ptr<float>(), lse.data_ptr<float>(),
                       dq.data_ptr<float>(),       dk.data_ptr<float>(),  dv.data_ptr<float>(),
                       dkp.data_ptr<float>(),      dvp.data_ptr<float>()};
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(kh), static_cast<unsigned>(n_chunks));
  with_dpl(sh.Dh, [&](auto dpl) {
    constexpr int DPL = decltype(dpl)::value;
    if (use_shared) {
      auto kernel = prefix_attention_backward_kernel<DPL, true>;
      if (shared_bytes > 48 * 1024) {
        C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(shared_bytes)));
      }
      kernel<<<grid, kThreads, shared_bytes, stream>>>(in, g, sh, static_cast<float>(scale), m_chunk);
    } else {
      prefix_attention_backward_kernel<DPL, false><<<grid, kThreads, 0, stream>>>(in, g, sh, static_cast<float>(scale),
                                                                                   m_chunk);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dq, dk, dv, dkp, dvp};
}

}  // namespace guidg_fast
