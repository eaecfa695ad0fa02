"""The Triton kernel variants that run compile for a real GPU target (sm_90), checked on CPU machines
too (tests/compile_kernels.py derives them from the launchers and Triton's own specialization)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _has_nvidia_backend() -> bool:
    try:
        import triton.backends.nvidia  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has_nvidia_backend(), reason="this triton has no NVIDIA backend")
def test_the_kernel_variants_that_run_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "compile_kernels.py")], capture_output=True,
                          text=True, env=env, timeout=300)
    print(proc.stdout)  # registers and spills of each variant (pytest -s shows them)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ok ")]
    rows = [ln for ln in lines if "_ce_rows_kernel" in ln]
    weights = [ln for ln in lines if "_token_weight_kernel" in ln]
    # one row-kernel variant per staging dtype and mode, the same for every real head (V % 16 == 0):
    # losses only (fp32 logits), then {scalar, per-row coef} x {bf16, fp16, fp32} staging blocks; and
    # for two non-plain heads (softcap; every head option) losses only and {scalar, per-row} bf16
    assert len(rows) == 7 + 2 * 3, proc.stdout
    assert len(weights) == 8, proc.stdout  # {fp32, fp64 rewards} x {none, batch, given stats, group}
    for ln in rows:
        # whole tensors: every pointer 16-byte aligned (vector loads), V divisible by 16
        assert all(f"'{a}'" in ln for a in ("logits_ptr", "grad_ptr", "labels_ptr", "w_ptr", "loss_ptr", "V")), ln
        assert "z_row0" not in ln.split("div16=")[1], ln  # offsets are not specialized
    for ln in lines:
        assert "regs=" in ln and "spill_stores=0B spill_loads=0B" in ln, ln
