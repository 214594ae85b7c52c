"""Test configuration.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is defined, so it is set here, before any
kernel module is imported, unless the caller chose otherwise (a GPU run sets MSDDA_TEST_GPU=1 to test the
compiled kernels instead).
"""
import os

if os.environ.get("MSDDA_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import pytest  # noqa: E402

# MSDDA_TEST_GPU=1: the kernel tests run on CUDA tensors, i.e. on the compiled kernels.
GPU = os.environ.get("MSDDA_TEST_GPU") == "1"
DEV = "cuda" if GPU else "cpu"


@pytest.fixture(autouse=True, scope="module")
def default_device_fixture():
    import torch

    if GPU:
        torch.set_default_device("cuda")
    yield
    if GPU:
        torch.set_default_device("cpu")
