// Row-major GEMM on raw CPU buffers through the BLAS that torch itself links (sgemm_ / dgemm_ of
// MKL on x86 wheels), without per-call tensor overhead; checked once at first use, and if the
// symbols are missing or misbehave the same call goes through at::mm on the same buffers.
// Host-only: shared by the CPU launchers (multi_expert_loss, cmattn).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <limits>

// Fortran BLAS of the library torch links (MKL on x86 wheels); weak, so a torch without them still
// loads this extension and the GEMMs fall back to at::mm.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace guidg_fast {
namespace cpu_blas {

inline void blas_call(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b, int ldb,
               float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
inline void blas_call(char ta, char tb, int m, int n, int k, double alpha, const double* a, int lda, const double* b, int ldb,
               double beta, double* c, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

// Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
template <typename scalar_t>
void gemm_blas(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, scalar_t alpha, const scalar_t* A,
               int64_t lda, const scalar_t* B, int64_t ldb, scalar_t beta, scalar_t* C, int64_t ldc) {
  blas_call(trans_b ? 'T' : 'N', trans_a ? 'T' : 'N', static_cast<int>(N), static_cast<int>(M), static_cast<int>(K),
            alpha, B, static_cast<int>(ldb), A, static_cast<int>(lda), beta, C, static_cast<int>(ldc));
}

template <typename scalar_t>
void gemm_aten(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, scalar_t alpha, const scalar_t* A,
               int64_t lda, const scalar_t* B, int64_t ldb, scalar_t beta, scalar_t* C, int64_t ldc) {
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  auto view = [&](const scalar_t* p, bool trans, int64_t rows, int64_t cols, int64_t ld) {
    at::Tensor t = at::from_blob(const_cast<scalar_t*>(p), {trans ? cols : rows, trans ? rows : cols}, {ld, 1}, options);
    return trans ? t.t() : t;
  };
  at::Tensor a = view(A, trans_a, M, K, lda);
  at::Tensor b = view(B, trans_b, K, N, ldb);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, options);
  if (beta == scalar_t(0)) {
    at::mm_out(c, a, b);
    if (alpha != scalar_t(1)) c.mul_(alpha);
  } else {
    c.addmm_(a, b, beta, alpha);
  }
}

// Whether the BLAS symbols are present and behave as LP64 Fortran BLAS (a 2x3 by 3x2 check).
inline bool blas_usable() {
  static const bool usable = [] {
    if (sgemm_ == nullptr || dgemm_ == nullptr) return false;
    const float a[6] = {1, 2, 3, 4, 5, 6};
    const float b[6] = {1, 0, 0, 1, 1, 1};
    float c[4] = {0, 0, 0, 0};
    gemm_blas<float>(false, false, 2, 2, 3, 1.0f, a, 3, b, 2, 0.0f, c, 2);
    const double ad[6] = {1, 2, 3, 4, 5, 6};
    const double bd[6] = {1, 0, 0, 1, 1, 1};
    double cd[4] = {0, 0, 0, 0};
    gemm_blas<double>(false, true, 2, 2, 3, 1.0, ad, 3, bd, 3, 0.0, cd, 2);
    // [[1 2 3] [4 5 6]] [[1 0] [0 1] [1 1]] and [[1 2 3] [4 5 6]] [[1 0 0] [1 1 1]]^T
    return c[0] == 4 && c[1] == 5 && c[2] == 10 && c[3] == 11 && cd[0] == 1 && cd[1] == 6 && cd[2] == 4 &&
           cd[3] == 15;
  }();
  return usable;
}

// C (M x N) = alpha op(A) op(B) + beta C on row-major buffers, op(A) M x K, op(B) K x N.
template <typename scalar_t>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, scalar_t alpha, const scalar_t* A, int64_t lda,
          const scalar_t* B, int64_t ldb, scalar_t beta, scalar_t* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  const bool fits = std::max({M, N, K, lda, ldb, ldc}) < std::numeric_limits<int>::max();
  if (fits && blas_usable()) {
    gemm_blas<scalar_t>(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  } else {
    gemm_aten<scalar_t>(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
}

}  // namespace cpu_blas
}  // namespace guidg_fast
