"""Session-wide test setup.

TRITON_INTERPRET=1 is set here, before anything imports Triton, so every Triton kernel in the
session is defined for the CPU interpreter: the kernel tests (tests/kernels) run the real kernels
on CPU tensors, and model tests that pick a Triton attention backend on float32/float16 CPU tensors
run it too (bfloat16 CPU tensors always take the PyTorch references, see turbo_kernels.dispatch).
Triton fixes the mode when a kernel is defined, so setting it later (e.g. in tests/kernels'
conftest) would depend on which test module happened to import turbo_kernels first.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
