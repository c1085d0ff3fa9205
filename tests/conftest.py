"""Shared fixtures: the device to run on (CUDA with TF32 off), the extension guard, one
intra-op thread, and the reference backend. The vocabulary and helpers are in helpers.py."""

import pytest
import torch

import rnn_ext
from helpers import DEVICES, backend, intra_op_threads, require_extension


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """"cpu", and "cuda" (marked `cuda`; skipped, with the reason, without a GPU). On CUDA the
    test runs with TF32 off for cuDNN and for matmuls: the tests compare with float64, the
    reference or torch.nn at float32 tolerances, which TF32's 10-bit mantissa would not meet.
    A test about TF32 turns it on itself."""
    if request.param != "cuda":
        yield request.param
        return
    flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield request.param
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


@pytest.fixture
def extension() -> None:
    require_extension()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny sizes: far below what intra-op threads pay off
    for, and on a small shared machine spinning OpenMP workers slow such tests down many times
    over. Tests of the threaded paths set their own count (helpers.intra_op_threads)."""
    with intra_op_threads(1):
        yield


@pytest.fixture
def reference_backend():
    """The test runs under rnn_ext's reference backend; the previous backend is restored."""
    with backend("reference"):
        assert rnn_ext.backend() == "reference"
        yield
