"""Test set-up. Without CUDA the Triton kernels run under the interpreter, which must be switched on
before any `@triton.jit` function is defined, i.e. before refit_fast is imported."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
