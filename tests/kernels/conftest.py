import pytest

from turbo_kernels.dispatch import interpreting


@pytest.fixture(autouse=True)
def _kernels_run_in_the_interpreter():
    """These tests exercise the Triton kernels on CPU tensors; without the interpreter they would
    silently test the PyTorch references against themselves."""
    if not interpreting():
        pytest.fail("kernel tests need TRITON_INTERPRET=1 before Triton is imported (tests/conftest.py sets it)")
