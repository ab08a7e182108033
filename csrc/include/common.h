// Shared helpers for the CPU and CUDA launchers of guidg_fast._C.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define GF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define GF_HOST_DEVICE inline
#endif

// Argument checks used at every C++ entry point: each message names the argument.
#define GF_CHECK_CONTIGUOUS(x, name) \
  TORCH_CHECK((x).is_contiguous(), name " must be contiguous, got strides ", (x).strides())
#define GF_CHECK_FLOATING(x, name)                                                      \
  TORCH_CHECK(at::isFloatingType((x).scalar_type()), name " must be a floating tensor, got ", \
              (x).scalar_type())
#define GF_CHECK_DIM(x, d, name) \
  TORCH_CHECK((x).dim() == (d), name " must have ", d, " dims, got shape ", (x).sizes())
#define GF_CHECK_SAME_DEVICE(x, y, xname, yname)                                          \
  TORCH_CHECK((x).device() == (y).device(), xname " and " yname " must be on one device, got ", \
              (x).device(), " and ", (y).device())
