// CPU launchers of eot_project: fused row passes (gather + layer norm; normalisation; their
// backward) in at::parallel_for over rows, the projection GEMMs through at::matmul.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
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

// GUIDG_FAST_POISON=1 (tests): outputs start as NaN, so an element a kernel forgets to write shows.
// Rows per parallel_for task: a row pass costs a few flops per element, so below ~1M elements one
// thread finishes sooner than a parallel region can wake the others (which, on a busy machine, can
// cost milliseconds).
constexpr int64_t kSerialElements = int64_t(1) << 20;
int64_t row_grain(int64_t row_elems) { return std::max<int64_t>(1, kSerialElements / std::max<int64_t>(row_elems, 1)); }

void check_eot_inputs(const char* op, const at::Tensor& x, const at::Tensor& eot_index, const at::Tensor& w,
                      const at::Tensor& b, const at::Tensor& proj) {
  TORCH_CHECK(x.device().is_cpu(), op, " (CPU kernel): x must be a CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              " (CPU kernel): x must be float32 or float64, got ", x.scalar_type());
  eot_project::check_inputs(op, x, eot_index, w, b, proj);
}

template <typename scalar_t>
void gather_layer_norm(const at::Tensor& x, const int64_t* eot, const scalar_t* w, const scalar_t* b, double eps,
                       scalar_t* xhat, scalar_t* y, scalar_t* rstd_out) {
  using acc_t = scalar_t;
  const int64_t N = x.size(0), S = x.size(1), W = x.size(2);
  const int64_t sn = x.stride(0), ss = x.stride(1);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  at::parallel_for(0, N, row_grain(W), [&](int64_t lo, int64_t hi) {
    for (int64_t n = lo; n < hi; ++n) {
      const int64_t row = eot[n];
      TORCH_CHECK(row >= 0 && row < S, "eot_project: eot_index[", n, "] = ", row, " is outside [0, ", S, ")");
      const scalar_t* r = xp + n * sn + row * ss;
      acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < W; ++c) sum += r[c];
      const acc_t mean = sum / static_cast<acc_t>(W);
      acc_t sq = 0;
#pragma omp simd reduction(+ : sq)
      for (int64_t c = 0; c < W; ++c) sq += (r[c] - mean) * (r[c] - mean);
      const acc_t rstd = layer_norm_rstd<acc_t>(sq, W, static_cast<acc_t>(eps));
      rstd_out[n] = rstd;
      scalar_t* xh = xhat + n * W;
      scalar_t* yy = y + n * W;
#pragma omp simd
      for (int64_t c = 0; c < W; ++c) {
        xh[c] = (r[c] - mean) * rstd;
        yy[c] = layer_norm_affine<acc_t>(xh[c], w[c], b[c]);
      }
    }
  });
}

template <typename scalar_t>
void normalize_rows(const scalar_t* zp, int64_t N, int64_t D, scalar_t* op, scalar_t* inv) {
  at::parallel_for(0, N, row_grain(D), [&](int64_t lo, int64_t hi) {
    for (int64_t n = lo; n < hi; ++n) {
      const scalar_t* zr = zp + n * D;
      scalar_t sq = 0;
#pragma omp simd reduction(+ : sq)
      for (int64_t c = 0; c < D; ++c) sq += zr[c] * zr[c];
      const scalar_t r = scalar_t(1) / std::sqrt(sq);
      inv[n] = r;
#pragma omp simd
      for (int64_t c = 0; c < D; ++c) op[n * D + c] = zr[c] * r;
    }
  });
}

// gz = d out / d z per row, and y = xhat * w + b recomputed for the dproj GEMM
template <typename scalar_t>
void backward_rows(const scalar_t* gp, const scalar_t* op, const scalar_t* inv, const scalar_t* xh, const scalar_t* wp,
                   const scalar_t* bp, int64_t N, int64_t W, int64_t D, scalar_t* gzp, scalar_t* yp) {
  at::parallel_for(0, N, row_grain(W + D), [&](int64_t lo, int64_t hi) {
    for (int64_t n = lo; n < hi; ++n) {
      const scalar_t* gr = gp + n * D;
      const scalar_t* orow = op + n * D;
      scalar_t c = 0;
#pragma omp simd reduction(+ : c)
      for (int64_t d = 0; d < D; ++d) c += gr[d] * orow[d];
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) gzp[n * D + d] = normalize_backward<scalar_t>(gr[d], orow[d], c, inv[n]);
#pragma omp simd
      for (int64_t i = 0; i < W; ++i) yp[n * W + i] = layer_norm_affine<scalar_t>(xh[n * W + i], wp[i], bp[i]);
    }
  });
}

// layer-norm backward of each EOT row, written into the zeroed dx; dw, db as column sums
template <typename scalar_t>
void layer_norm_backward_rows(const scalar_t* gyp, const scalar_t* xh, const scalar_t* wp, const scalar_t* rs,
                              const int64_t* e, int64_t N, int64_t S, int64_t W, scalar_t* dxp, scalar_t* dwp,
                              scalar_t* dbp) {
  using acc_t = scalar_t;
  at::parallel_for(0, N, row_grain(W), [&](int64_t lo, int64_t hi) {
    for (int64_t n = lo; n < hi; ++n) {
      const scalar_t* gr = gyp + n * W;
      const scalar_t* xr = xh + n * W;
      acc_t sg = 0, sgx = 0;
#pragma omp simd reduction(+ : sg, sgx)
      for (int64_t i = 0; i < W; ++i) {
        const acc_t gx = gr[i] * wp[i];
        sg += gx;
        sgx += gx * xr[i];
      }
      const acc_t mean_g = sg / static_cast<acc_t>(W), mean_gx = sgx / static_cast<acc_t>(W);
      scalar_t* dr = dxp + (n * S + e[n]) * W;
#pragma omp simd
      for (int64_t i = 0; i < W; ++i) dr[i] = layer_norm_backward<acc_t>(gr[i] * wp[i], xr[i], mean_g, mean_gx, rs[n]);
    }
  });
  // each column chunk belongs to one task: no two tasks write one dw / db element
  at::parallel_for(0, W, std::max<int64_t>(64, row_grain(N)), [&](int64_t lo, int64_t hi) {
    std::fill(dwp + lo, dwp + hi, scalar_t(0));
    std::fill(dbp + lo, dbp + hi, scalar_t(0));
    for (int64_t n = 0; n < N; ++n) {
#pragma omp simd
      for (int64_t i = lo; i < hi; ++i) {
        dwp[i] += gyp[n * W + i] * xh[n * W + i];
        dbp[i] += gyp[n * W + i];
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> eot_project_forward_cpu(const at::Tensor& x_in,
                                                                                   const at::Tensor& eot_index,
                                                                                   const at::Tensor& ln_weight,
                                                                                   const at::Tensor& ln_bias,
                                                                                   const at::Tensor& proj,
                                                                                   double eps) {
  check_eot_inputs("eot_project_forward", x_in, eot_index, ln_weight, ln_bias, proj);
  const at::Tensor x = x_in.stride(2) == 1 ? x_in : x_in.contiguous();
  const at::Tensor eot = eot_index.contiguous(), w = ln_weight.contiguous(), b = ln_bias.contiguous();
  const int64_t N = x.size(0), W = x.size(2), D = proj.size(1);
  at::Tensor xhat = new_output({N, W}, x.options());
  at::Tensor y = new_output({N, W}, x.options());
  at::Tensor rstd = new_output({N}, x.options());
  at::Tensor inv_norm = new_output({N}, x.options());
  at::Tensor out = new_output({N, D}, x.options());
  if (N == 0) return {out, xhat, rstd, inv_norm};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "eot_project_forward_cpu", [&] {
    gather_layer_norm<scalar_t>(x, eot.data_ptr<int64_t>(), w.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), eps,
                                xhat.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>());
  });
  const at::Tensor z = at::matmul(y, proj).contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "eot_project_normalize_cpu", [&] {
    normalize_rows<scalar_t>(z.data_ptr<scalar_t>(), N, D, out.data_ptr<scalar_t>(), inv_norm.data_ptr<scalar_t>());
  });
  return {out, xhat, rstd, inv_norm};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> eot_project_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& out_in, const at::Tensor& inv_norm_in, const at::Tensor& xhat_in,
    const at::Tensor& rstd_in, const at::Tensor& eot_index, const at::Tensor& x, const at::Tensor& ln_weight,
    const at::Tensor& ln_bias, const at::Tensor& proj) {
  check_eot_inputs("eot_project_backward", x, eot_index, ln_weight, ln_bias, proj);
  const int64_t N = x.size(0), S = x.size(1), W = x.size(2), D = proj.size(1);
  TORCH_CHECK(grad_out_in.sizes() == at::IntArrayRef({N, D}) && out_in.sizes() == grad_out_in.sizes(),
              "eot_project_backward: grad_out and out must have shape (N, D) = (", N, ", ", D, ")");
  TORCH_CHECK(xhat_in.sizes() == at::IntArrayRef({N, W}), "eot_project_backward: xhat must have shape (N, W)");
  TORCH_CHECK(rstd_in.numel() == N && inv_norm_in.numel() == N,
              "eot_project_backward: rstd and inv_norm must have N = ", N, " values");
  const at::Tensor g = grad_out_in.contiguous(), out = out_in.contiguous(), inv_norm = inv_norm_in.contiguous();
  const at::Tensor xhat = xhat_in.contiguous(), rstd = rstd_in.contiguous(), eot = eot_index.contiguous();
  const at::Tensor w = ln_weight.contiguous(), b = ln_bias.contiguous();
  at::Tensor gz = new_output({N, D}, g.options());
  at::Tensor y = new_output({N, W}, g.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "eot_project_backward_rows_cpu", [&] {
    backward_rows<scalar_t>(g.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), inv_norm.data_ptr<scalar_t>(),
                            xhat.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), N, W, D,
                            gz.data_ptr<scalar_t>(), y.data_ptr<scalar_t>());
  });
  at::Tensor dproj = at::matmul(y.t(), gz);
  const at::Tensor gy = at::matmul(gz, proj.t()).contiguous();
  at::Tensor dx = at::zeros({N, S, W}, x.options());
  at::Tensor dw = new_output({W}, x.options());
  at::Tensor db = new_output({W}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "eot_project_backward_ln_cpu", [&] {
    layer_norm_backward_rows<scalar_t>(gy.data_ptr<scalar_t>(), xhat.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                                       rstd.data_ptr<scalar_t>(), eot.data_ptr<int64_t>(), N, S, W,
                                       dx.data_ptr<scalar_t>(), dw.data_ptr<scalar_t>(), db.data_ptr<scalar_t>());
  });
  return {dx, dw, db, dproj};
}

}  // namespace guidg_fast
