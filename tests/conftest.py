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
