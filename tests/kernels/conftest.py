"""Kernel tests: on CPU the Triton kernels run in Triton's interpreter.

TRITON_INTERPRET must be set when the ``@triton.jit`` functions are decorated, so it is set
while this conftest imports the kernel modules and during each test here, and restored
otherwise: it never leaks into other test folders (or the processes they spawn).
"""

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")

if not ON_GPU:
    _previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import vllm_seqkv.kernels.rotation.decode_attention  # noqa: F401  (decorated as interpreted)
        import vllm_seqkv.kernels.rotation.reconstruct  # noqa: F401
        import vllm_seqkv.kernels.decode  # noqa: F401
        import vllm_seqkv.kernels.reconstruct  # noqa: F401
        import vllm_seqkv.kernels.write  # noqa: F401
        import vllm_seqkv.kernels.rotation.write  # noqa: F401
    finally:
        if _previous is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = _previous


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch):
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


@pytest.fixture
def device():
    return DEVICE
