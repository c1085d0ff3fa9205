"""Which implementation runs: the compiled ops (torch.ops.rnn_ext) or the pure-PyTorch reference.

This module is the one place that decides. The compiled library loads on import; if it cannot,
rnn_ext warns once and every call takes the reference path. RNN_EXT_BACKEND=reference forces the
reference; set_backend() switches at run time (tests and benchmarks compare the two)."""

from __future__ import annotations

import os
import warnings

import torch

BACKENDS = ("extension", "reference")

_library = None
_load_error: Exception | None = None
try:
    from . import _C as _library  # registers torch.ops.rnn_ext
except ImportError as error:  # not built, or built against another torch
    _load_error = error

_requested = os.environ.get("RNN_EXT_BACKEND", "extension")
if _requested not in BACKENDS:
    raise ValueError(f"RNN_EXT_BACKEND must be one of {BACKENDS}, got {_requested!r}")
if _requested == "extension" and _library is None:
    warnings.warn(
        f"rnn_ext: the compiled extension could not be loaded ({_load_error}); using the "
        "pure-PyTorch reference. Build it with `python setup.py build_ext --inplace` "
        "(or `pip install --no-build-isolation -e .`).",
        RuntimeWarning,
        stacklevel=2,
    )
_active = "extension" if (_requested == "extension" and _library is not None) else "reference"


def backend() -> str:
    """'extension' when the compiled ops are in use, else 'reference'."""
    return _active


def set_backend(name: str) -> None:
    """Selects 'extension' (raises if it is not built) or 'reference' for later calls."""
    global _active
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "extension" and _library is None:
        raise RuntimeError(f"rnn_ext: the compiled extension is not available ({_load_error})")
    _active = name


def extension_available() -> bool:
    """Whether the compiled library loaded (whichever backend is selected)."""
    return _library is not None


def extension_built_with_cuda() -> bool:
    return _library is not None and bool(getattr(_library, "with_cuda", 0))


def uses_kernels(tensor: torch.Tensor) -> bool:
    """Whether a computation on `tensor` runs the compiled kernels: the extension is active and
    has kernels for its device and dtype; everything else takes the reference path."""
    if _active != "extension":
        return False
    device = tensor.device.type
    if device == "cpu":
        return tensor.dtype in (torch.float32, torch.float64, torch.bfloat16)
    if device == "cuda":
        return extension_built_with_cuda() and tensor.dtype in (
            torch.float32, torch.float64, torch.float16, torch.bfloat16)
    return device == "meta"
