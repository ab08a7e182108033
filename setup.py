"""Builds guidg_fast._C: C++ CPU kernels always, CUDA kernels when torch has CUDA and nvcc exists.

Environment:
  GUIDG_FAST_CUDA=0/1      force the CUDA part off / on (on: a missing nvcc is an error)
  TORCH_CUDA_ARCH_LIST     CUDA architectures (default "8.0;9.0")
  MAX_JOBS                 parallel compile jobs (ninja)
"""
import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = os.path.join(home, "bin", "nvcc")
    if os.path.exists(candidate):
        return home
    found = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(found)) if found else None


def _pip_cuda_include_dirs():
    """Headers of the pip CUDA wheels (cusparse, cublas, ...) that a bare nvcc install may lack."""
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for base in nvidia.__path__:
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return dirs


def _want_cuda(torch):
    flag = os.environ.get("GUIDG_FAST_CUDA", "").strip()
    cuda_home = _find_nvcc()
    if flag == "0":
        return False
    if flag == "1":
        if cuda_home is None:
            raise RuntimeError("GUIDG_FAST_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        return True
    return torch.version.cuda is not None and cuda_home is not None


def _extensions():
    import torch
    from torch.utils import cpp_extension

    sources = ["csrc/bindings.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    cxx_flags = ["-O3", "-fopenmp"]
    if _want_cuda(torch):
        cuda_home = _find_nvcc()
        os.environ.setdefault("CUDA_HOME", cuda_home)
        cpp_extension.CUDA_HOME = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        # -isystem: searched after CUDA_HOME's own -I headers, so they only fill in what it lacks
        fallback = [flag for d in _pip_cuda_include_dirs() for flag in ("-isystem", d)]
        return [
            cpp_extension.CUDAExtension(
                "guidg_fast._C",
                sources,
                include_dirs=include_dirs,
                define_macros=[("GUIDG_FAST_WITH_CUDA", "1")],
                extra_compile_args={
                    "cxx": cxx_flags + fallback,
                    "nvcc": fallback + ["-O3", "-lineinfo"],
                },
                extra_link_args=["-fopenmp"],
            )
        ]
    return [
        cpp_extension.CppExtension(
            "guidg_fast._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(
    packages=[
        "guidg_fast",
        "guidg_fast.ops",
        "guidg_fast.train",
        "guidg_fast.data",
        "guidg_fast.kernels",
        "guidg_fast.bench",
        "guidg_fast.bench.entries",
    ],
    package_dir={"guidg_fast.kernels": "kernels", "guidg_fast.bench": "bench"},
    package_data={"guidg_fast": ["configs/*.json"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": _build_ext()},
)
