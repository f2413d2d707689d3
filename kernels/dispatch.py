"""When a kernel entry point runs its Triton kernel and when its PyTorch reference.

One rule for every module here, so the tiny model serves on a plain CPU and the same code runs the
real kernels on the GPU:

- CUDA tensors run the Triton kernels.
- CPU tensors run the Triton kernels under Triton's interpreter when ``TRITON_INTERPRET=1`` was
  set before the kernels were defined (that is how the tests check kernels without a GPU), except
  bfloat16: the interpreter's ``tl.dot`` multiplies bfloat16's raw bits (triton-lang/triton#11584),
  so bfloat16 on the CPU always takes the reference.
- Any other CPU tensor takes the PyTorch reference.
"""

from __future__ import annotations

import numpy as np
import torch
import triton


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return bool(triton.knobs.runtime.interpret)


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether an entry point given ``tensors`` should launch its Triton kernels."""
    if all(t.is_cuda for t in tensors):
        return True
    if not interpreting():
        return False
    return all(t.device.type == "cpu" and t.dtype != torch.bfloat16 for t in tensors)


def _fix_interpreter_scalar_index() -> None:
    """Let the interpreter use scalar tensors as loop bounds again under numpy >= 2.4.

    triton 3.6's interpreter converts a scalar with ``int(ndarray_of_shape_1)``, which numpy 2.4
    turned into a TypeError, so every ``range(n)`` over a kernel argument fails
    (triton-lang/triton#9171, fixed upstream by #9172). This re-points ``__index__`` at the one
    element after the interpreter's own patching; a no-op where numpy still converts.
    """
    try:
        int(np.ones(1, dtype=np.int32))
        return
    except TypeError:
        pass
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_turbo_kernels_fixed", False):
        return

    def patch_lang_tensor(tensor, scope):  # noqa: ANN001 - the interpreter's own signature
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor._turbo_kernels_fixed = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if interpreting():
    _fix_interpreter_scalar_index()
