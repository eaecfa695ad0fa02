"""Compile every Triton kernel variant of refit_fast for Hopper (sm_90) without a GPU.

The interpreter that runs the CPU tests accepts code the real compiler rejects (loop-carried type
changes, unsupported casts, ...); this lowers each kernel through Triton to PTX and runs ptxas on it,
so such errors show up on a CPU machine. Needs TRITON_INTERPRET unset (the test runs it in a
subprocess). Usage: python tests/compile_kernels.py  -> one line per variant, exit 1 on a failure.
"""
from __future__ import annotations

import importlib
import itertools
import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_kernels: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

wce = importlib.import_module("refit_fast.ops.weighted_ce")


def variants():
    rows = dict(logits_ptr="*fp32", stride_z="i64", grad_ptr=None, stride_g="i64", labels_ptr="*i64",
                w_ptr="*fp32", coef_ptr="*fp32", loss_ptr="*fp32", V="i32",
                COEF_PER_ROW="constexpr", COMPUTE_GRAD="constexpr", BLOCK_V="constexpr")
    for grad_ty, per_row, grad in itertools.product(("*fp32", "*bf16", "*fp16"), (False, True), (False, True)):
        yield wce._ce_rows_kernel, dict(rows, grad_ptr=grad_ty), dict(COEF_PER_ROW=per_row, COMPUTE_GRAD=grad, BLOCK_V=4096), 8
    weights = dict(rewards_ptr=None, n_rewards="i32", stats_ptr="*fp64", groups_ptr="*i64", seq_ptr="*i64",
                   out_ptr="*fp32", n_tokens="i32", eps="fp32", STANDARDIZE="constexpr", HAS_STATS="constexpr",
                   GROUPED="constexpr", BLOCK_B="constexpr", BLOCK_N="constexpr")
    # (STANDARDIZE, HAS_STATS, GROUPED, BLOCK_B, BLOCK_N) as token_weights_triton launches them
    modes = ((False, False, False, 1024, 1024), (True, False, False, 1024, 1024), (True, True, False, 1024, 1024),
             (True, False, True, 64, 64))
    for r_ty, (std, stats, grouped, bb, bn) in itertools.product(("*fp32", "*fp64"), modes):
        yield wce._token_weight_kernel, dict(weights, rewards_ptr=r_ty), dict(
            STANDARDIZE=std, HAS_STATS=stats, GROUPED=grouped, BLOCK_B=bb, BLOCK_N=bn), 4


def main() -> int:
    target = GPUTarget("cuda", 90, 32)
    failed = 0
    for fn, sig, const, warps in variants():
        name = f"{fn.__name__} {const} {sig.get('grad_ptr') or sig.get('rewards_ptr') or ''}".strip()
        try:
            src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
            kernel = triton.compile(src, target=target, options={"num_warps": warps})
            print(f"ok   {name}  shared={kernel.metadata.shared}B")
        except Exception as exc:  # report every variant, then fail
            failed += 1
            print(f"FAIL {name}: {type(exc).__name__}: {str(exc)[:400]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
