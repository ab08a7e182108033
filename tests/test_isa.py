"""The one CPU ISA switch: GUIDG_FAST_CPU_ISA caps the extension's row loops (avx512 | avx2 | baseline)."""
import os
import subprocess
import sys

import pytest

from guidg_fast.ops import _backend

pytestmark = pytest.mark.skipif(_backend.load_extension() is None, reason="guidg_fast._C not built")

ORDER = ["baseline", "avx2", "avx512"]


def _capped(name: str, supported: str) -> str:
    return ORDER[min(ORDER.index(name), ORDER.index(supported))]


def test_env_variable_caps_the_row_loops():
    ext = _backend.load_extension()
    env_cap = os.environ.get("GUIDG_FAST_CPU_ISA", "").strip() or "avx512"
    with _backend.cpu_isa_cap("avx512") as supported:
        pass
    assert ext.cpu_isa() == _capped(env_cap, supported)  # the cap set in this process's environment
    for name in ORDER:
        with _backend.cpu_isa_cap(name) as now:
            assert now == _capped(name, supported) == ext.cpu_isa()
    assert ext.cpu_isa() == _capped(env_cap, supported)  # restored


def test_ci_avx2_pass_really_runs_avx2():
    # CI's second pass sets GUIDG_FAST_CPU_ISA=avx2: on an AVX-512 machine the loops must then run AVX2
    if os.environ.get("GUIDG_FAST_CPU_ISA") != "avx2":
        pytest.skip("only in the AVX2 pass (GUIDG_FAST_CPU_ISA=avx2)")
    assert _backend.load_extension().cpu_isa() in ("avx2", "baseline")


def test_unknown_value_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="GUIDG_FAST_CPU_ISA must be avx512, avx2 or baseline, got 'sse9'"):
        with _backend.cpu_isa_cap("sse9"):
            pass
    env = {**os.environ, "GUIDG_FAST_CPU_ISA": "sse9"}
    proc = subprocess.run([sys.executable, "-P", "-c", "import guidg_fast.ops as o; o.extension_status()"],
                          capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=120)
    assert proc.returncode != 0 and "GUIDG_FAST_CPU_ISA must be avx512, avx2 or baseline" in proc.stderr
