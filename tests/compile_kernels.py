"""Compile the Triton kernel variants that refit_fast launches, for Hopper (sm_90), without a GPU.

The interpreter that runs the CPU tests accepts code the real compiler rejects (loop-carried type
changes, unsupported casts, ...); this lowers each kernel through Triton to PTX and runs ptxas on it,
so such errors show up on a CPU machine.

Which variants: the launchers' own argument builders (`kernels.ce_rows_launch`,
`kernels.token_weights_launch`) are called with meta tensors in the shapes and dtypes the driver
uses at real model sizes, and Triton's launch-time specialization (the same binder a launch uses:
16-byte alignment of pointers, divisibility of integers by 16, integers equal to 1) turns each call
into the signature, constants and attributes a launch on the GPU would compile. Distinct results
are compiled once each; so what compiles here is what runs (alignment and stride specializations
included), not a scalar-load variant no real shape launches. Each line prints the registers and
spills ptxas reports.

Needs TRITON_INTERPRET unset (the test runs it in a subprocess).
Usage: python tests/compile_kernels.py  -> one line per variant, exit 1 on a failure.
"""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_kernels: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

kernels = importlib.import_module("refit_fast.ops.kernels")
chunking = importlib.import_module("refit_fast.ops.chunking")

TARGET = GPUTarget("cuda", 90, 32)
# (D, V) of real heads: Llama-3, Gemma-2, Qwen2.5, Llama-2, SmolLM2
HEADS = ((4096, 128256), (2304, 256000), (3584, 152064), (4096, 32000), (576, 49152))
N_TRAINED = 8192  # trained tokens of a step (the row kernel does not depend on it)
N_CONVERSATIONS = 64  # conversations of a step (the weight kernel's BLOCK_B depends on it)



def _t(shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


class _Ptr:
    """What Triton's binder reads of a tensor argument: its dtype and an aligned data_ptr (a torch
    CUDA allocation; the launchers never pass slices)."""

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype

    @staticmethod
    def data_ptr():
        return 0


def row_kernel_launches():
    """The `_ce_rows_kernel` launches of the chunk loop, for each head and weight dtype."""
    for D, V in HEADS:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            plan = chunking.plan_chunks(N_TRAINED, D, V, dtype=dtype)  # on CUDA the GEMMs take dtype operands
            zbuf = _t((plan.sub_rows, V), torch.float32)
            stage = _t((plan.stage_rows, V), dtype)
            labels, w, loss = _t(N_TRAINED, torch.int64), _t(N_TRAINED, torch.float32), _t(N_TRAINED, torch.float32)
            in_place = dtype == torch.float32
            z = stage if in_place else zbuf
            yield kernels._ce_rows_kernel, kernels.ce_rows_launch(zbuf, 0, None, 0, plan.sub_rows, labels, w, None, loss, 0)
            for coef in (_t((), torch.float32), _t(N_TRAINED, torch.float32)):  # "sum"/"mean"; "none" backward
                yield kernels._ce_rows_kernel, kernels.ce_rows_launch(
                    z, plan.sub_rows, stage, plan.sub_rows, plan.sub_rows, labels, w, coef, loss, 3 * plan.sub_rows)
    # non-plain heads (weighted_ce's softcap / logit_scale / z_loss / label_smoothing) on a bf16 model:
    # Gemma 2's softcap alone, and every option at once
    D, V = HEADS[1]
    plan = chunking.plan_chunks(N_TRAINED, D, V, dtype=torch.bfloat16)
    zbuf, stage = _t((plan.sub_rows, V), torch.float32), _t((plan.stage_rows, V), torch.bfloat16)
    labels, w, loss = _t(N_TRAINED, torch.int64), _t(N_TRAINED, torch.float32), _t(N_TRAINED, torch.float32)
    for head in ((1.0, 30.0, 0.0, 0.0), (0.5, 30.0, 1e-4, 0.1)):
        yield kernels._ce_rows_kernel, kernels.ce_rows_launch(zbuf, 0, None, 0, plan.sub_rows, labels, w, None, loss, 0,
                                                              head)
        for coef in (_t((), torch.float32), _t(N_TRAINED, torch.float32)):
            yield kernels._ce_rows_kernel, kernels.ce_rows_launch(
                zbuf, 0, stage, plan.sub_rows, plan.sub_rows, labels, w, coef, loss, 3 * plan.sub_rows, head)


def weight_kernel_launches():
    """The `_token_weight_kernel` launches of token_weights_triton (float32 and float64 rewards)."""
    sid, out = _t(N_TRAINED, torch.int64), _t(N_TRAINED, torch.float32)
    for r_dtype in (torch.float32, torch.float64):
        rewards = _t(N_CONVERSATIONS, r_dtype)
        groups = _t(N_CONVERSATIONS, torch.int64)
        for mode, stats in (("none", None), ("batch", None), ("batch", _t(2, torch.float64)), ("group", None)):
            yield kernels._token_weight_kernel, kernels.token_weights_launch(
                rewards, sid, out, standardize=mode, eps=1e-6, stats=stats, groups=groups)


def specialize(fn, launch):
    """Triton's own launch-time specialization of `fn` for these arguments:
    (signature, constexprs, attrs, options) as `JITFunction.run` computes them."""
    _, args, kwargs = launch
    backend = make_backend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    wrapped = [_Ptr(a) if isinstance(a, torch.Tensor) else a for a in args]
    bound_args, specialization, options = binder(*wrapped, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options


def ptxas_usage(ptx: str) -> tuple[int, int, int]:
    """(registers, spill stores, spill loads) that ptxas reports for sm_90a."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", src, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True, check=True)
    log = res.stdout + res.stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return regs, int(spills.group(1)), int(spills.group(2))


def variants():
    """Distinct (kernel, signature, constexprs, attrs, options) of every launch above."""
    seen = {}
    for fn, launch in [*row_kernel_launches(), *weight_kernel_launches()]:
        signature, constexprs, attrs, options = specialize(fn, launch)
        key = (fn.__name__, tuple(signature.items()), tuple(sorted(constexprs.items())),
               tuple(sorted((k, str(v)) for k, v in attrs.items())), options.num_warps)
        seen.setdefault(key, (fn, signature, constexprs, attrs, options))
    return list(seen.values())


def main() -> int:
    failed = 0
    for fn, signature, constexprs, attrs, options in variants():
        names = fn.arg_names
        const = {names[k[0]]: v for k, v in constexprs.items()}
        ptrs = ",".join(f"{k}={v}" for k, v in signature.items() if v.startswith("*"))
        aligned = sorted(names[k[0]] for k, v in attrs.items() if "tt.divisibility" in str(v))
        name = f"{fn.__name__} {const} {ptrs} div16={aligned}"
        try:
            kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET,
                                    options=dict(num_warps=options.num_warps))
            regs, st, ld = ptxas_usage(kernel.asm["ptx"])
            print(f"ok   {name}  regs={regs} spill_stores={st}B spill_loads={ld}B shared={kernel.metadata.shared}B")
        except Exception as exc:  # report every variant, then fail
            failed += 1
            print(f"FAIL {name}: {type(exc).__name__}: {str(exc)[:400]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
