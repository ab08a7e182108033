"""Backend choice for the fused ops: Triton (CUDA, or CPU under TRITON_INTERPRET=1), the C++/CUDA
extension guidg_fast._C, or the eager reference.

Default order: ext, triton, eager on CUDA tensors; ext, eager on CPU tensors. On CUDA the compiled
kernels come first because they measured faster than the Triton ones for every op at the real GuiDG
shapes (H100, 2026-11-26: e.g. cmattn + multi_expert_loss fwd+bwd 0.75 vs 1.77 ms at C = 200,
measured when the extension still had whole-op C++ autograd nodes); Triton takes over where the extension was built without CUDA. The choice is explicit and
overridable with GUIDG_FAST_BACKEND=triton|ext|eager (or ``use_backend``); a forced backend that
cannot run an op raises instead of silently falling back.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field

import torch

BACKENDS = ("triton", "ext", "eager")
_forced: str | None = None
_extension = None
_extension_error: str | None = None
_extension_loaded = False
_warned: set = set()


def _warn_once(key, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def load_extension():
    """guidg_fast._C, or None (with a one-time warning) when it was not built."""
    global _extension, _extension_error, _extension_loaded
    if not _extension_loaded:
        _extension_loaded = True
        try:
            from .. import _C

            _extension = _C
            isa = os.environ.get("GUIDG_FAST_CPU_ISA", "").strip()
            if isa:
                _C.set_cpu_isa_cap(isa)  # ValueError naming GUIDG_FAST_CPU_ISA for an unknown value
        except ImportError as exc:
            _extension_error = str(exc)
            _warn_once(
                "no-extension",
                f"guidg_fast._C is not built ({exc}); ops fall back to Triton or the eager reference. "
                "Reinstall with `pip install --no-build-isolation .` to build the C++/CUDA kernels.",
            )
    return _extension


def extension_status() -> dict:
    ext = load_extension()
    return {
        "built": ext is not None,
        "with_cuda": bool(ext is not None and getattr(ext, "WITH_CUDA", 0)),
        "cpu_isa": ext.cpu_isa() if ext is not None else None,
        "error": _extension_error,
    }


@contextlib.contextmanager
def cpu_isa_cap(name: str):
    """Caps the extension's CPU row loops at ``name`` (avx512 | avx2 | baseline) inside the block, as
    GUIDG_FAST_CPU_ISA does for a whole process; the tests use it to run every ISA path."""
    ext = load_extension()
    if ext is None:
        raise RuntimeError(f"guidg_fast._C is not built ({_extension_error}): no CPU ISA paths to choose")
    before = ext.cpu_isa()  # the effective level: as a cap it restores exactly what ran before
    ext.set_cpu_isa_cap(name)
    try:
        yield ext.cpu_isa()
    finally:
        ext.set_cpu_isa_cap(before)


def ext_has_kernels(op_names, device_type: str) -> bool:
    """Whether guidg_fast._C has every function in ``op_names`` and, for CUDA tensors, CUDA kernels
    (the functions pick the CPU or CUDA launcher per call; there is nothing in the dispatcher to ask)."""
    ext = load_extension()
    if ext is None or not all(callable(getattr(ext, name, None)) for name in op_names):
        return False
    return device_type == "cpu" or (device_type == "cuda" and bool(getattr(ext, "WITH_CUDA", 0)))


def triton_runnable(device_type: str) -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if device_type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET", "0") == "1" and interpreter_problem() is None


_interpreter_checked = False
_interpreter_error: str | None = None


def interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter cannot run these kernels here (None: it can). Checked once per
    process with one tiny kernel (guidg_fast.kernels._probe); a failure warns once."""
    global _interpreter_checked, _interpreter_error
    if not _interpreter_checked:
        _interpreter_checked = True
        try:
            from ..kernels import _probe
        except ImportError as exc:  # the kernels are not installed: not the interpreter's fault
            _interpreter_error = f"guidg_fast.kernels cannot be imported ({exc})"
        else:
            try:
                problem = None if _probe.interpreter_runs_loops() else "a loop's count came out wrong"
            except Exception as exc:  # the interpreter's own error, whatever its type
                problem = f"{type(exc).__name__}: {exc}"
            if problem is not None:
                import numpy
                import triton

                _interpreter_error = (
                    f"Triton's CPU interpreter (triton {triton.__version__}, numpy {numpy.__version__}) cannot run "
                    f"a loop over a runtime bound ({problem}); triton < 3.6 needs numpy < 2.4 "
                    "(triton-lang/triton#9171)"
                )
        if _interpreter_error is not None:
            _warn_once("triton-interpreter", f"{_interpreter_error}: Triton is not used on CPU tensors.")
    return _interpreter_error


@dataclass
class OpSpec:
    name: str
    ext_ops: tuple = ()  # functions of guidg_fast._C this op's ext backend calls (empty: no ext kernel yet)
    triton: bool = False  # has Triton kernels in guidg_fast.kernels
    notes: dict = field(default_factory=dict)
    parts: tuple = ()  # a composition of these ops (no kernels of its own): each part's backend applies


REGISTRY: dict[str, OpSpec] = {}


def register(spec: OpSpec) -> OpSpec:
    REGISTRY[spec.name] = spec
    return spec


_available_cache: dict = {}


def available(name: str, device_type: str) -> list[str]:
    """Backends that can run op ``name`` on ``device_type``, fastest first (cached: the answer only
    changes with TRITON_INTERPRET, which is part of the key)."""
    key = (name, device_type, os.environ.get("TRITON_INTERPRET", "0"), load_extension() is not None)
    found = _available_cache.get(key)
    if found is None:
        found = _available_cache[key] = _find_available(name, device_type)
    return list(found)


def _find_available(name: str, device_type: str) -> list[str]:
    spec = REGISTRY[name]
    found = []
    if spec.triton and triton_runnable(device_type):
        found.append("triton")
    if spec.ext_ops and ext_has_kernels(spec.ext_ops, device_type):
        found.append("ext")
    found.append("eager")
    return found


def forced_backend() -> str | None:
    value = _forced or os.environ.get("GUIDG_FAST_BACKEND", "").strip().lower() or None
    if value is not None and value not in BACKENDS:
        raise ValueError(f"GUIDG_FAST_BACKEND must be one of {BACKENDS}, got {value!r}")
    return value


def _why_not(spec: OpSpec, backend: str, device_type: str) -> str:
    if backend == "triton":
        if not spec.triton:
            return "it has no Triton kernel"
        if device_type != "cuda":
            if os.environ.get("TRITON_INTERPRET", "0") == "1" and interpreter_problem() is not None:
                return interpreter_problem()
            return "Triton runs on CPU tensors only with TRITON_INTERPRET=1"
        return "triton is not installed"
    if not spec.ext_ops:
        return "it has no C++/CUDA kernel"
    status = extension_status()
    if not status["built"]:
        return f"guidg_fast._C is not built ({status['error']})"
    if device_type == "cuda" and not status["with_cuda"]:
        return "guidg_fast._C was built without CUDA"
    return f"guidg_fast._C has no {device_type} kernel for it"


def choose(name: str, device: torch.device) -> str:
    """The backend that runs op ``name`` on ``device``."""
    spec = REGISTRY[name]
    device_type = torch.device(device).type
    avail = available(name, device_type)
    forced = forced_backend()
    if forced is not None:
        if forced not in avail:
            raise RuntimeError(
                f"backend {forced!r} was forced (GUIDG_FAST_BACKEND / use_backend) but cannot run {name} on "
                f"{device_type}: {_why_not(spec, forced, device_type)}"
            )
        return forced
    order = ("ext", "triton", "eager") if device_type == "cuda" else ("ext", "eager")
    for backend in order:
        if backend in avail:
            if backend == "eager" and (spec.ext_ops or spec.triton):
                _warn_once(
                    (name, device_type),
                    f"{name} falls back to the eager reference on {device_type}: "
                    f"{_why_not(spec, 'ext', device_type)}",
                )
            return backend
    return "eager"


@torch.compiler.assume_constant_result
def backend_for(name: str, device_type: str) -> str:
    """``choose`` for the op entry points: the one backend chooser every op calls. A constant for
    torch.compile (it reads the environment and guidg_fast._C, not tensors); eagerly cached (with
    ``available``'s answers, so clearing that cache clears these) per state of everything it reads,
    so a call costs a dict lookup."""
    key = ("chosen", name, device_type, _forced, os.environ.get("GUIDG_FAST_BACKEND"),
           os.environ.get("TRITON_INTERPRET"), _extension_loaded)
    backend = _available_cache.get(key)
    if backend is None:
        backend = _available_cache[key] = choose(name, torch.device(device_type))
    return backend


def kernel_dtype(dtype: torch.dtype, backend: str, device: torch.device) -> torch.dtype:
    """The dtype a fused kernel computes in: the ext CPU kernels run float32 and float64; the CUDA
    kernels and Triton run float32 (fp32 accumulation), so everything else is cast to float32."""
    return dtype if (dtype == torch.float64 and backend == "ext" and device.type == "cpu") else torch.float32


def describe(name: str, device_type: str) -> str:
    """What ``info`` prints: the backend used by default, without needing such a device."""
    spec = REGISTRY[name]
    if spec.parts:
        return " + ".join(f"{part}: {describe(part, device_type)}" for part in spec.parts)
    if device_type == "cuda":
        status = extension_status()
        if spec.ext_ops and status["built"] and status["with_cuda"] and ext_has_kernels(spec.ext_ops, "cuda"):
            return "ext"
        if spec.triton and triton_runnable("cuda"):
            return "triton"
    elif spec.ext_ops and ext_has_kernels(spec.ext_ops, "cpu"):
        return "ext"
    if not spec.ext_ops and not spec.triton:
        return "eager (no fused kernel yet)"
    return "eager (fallback)"


@contextlib.contextmanager
def use_backend(backend: str | None):
    """Force one backend for the ops called inside the block (None: automatic choice)."""
    global _forced
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    previous, _forced = _forced, backend
    try:
        yield
    finally:
        _forced = previous
