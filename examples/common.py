"""What the examples share: where their recurrent modules come from (rnn_ext or torch.nn)."""

from __future__ import annotations

import sys
from pathlib import Path

from torch import nn


def recurrent_modules(backend: str):
    """The namespace the recurrent modules come from: rnn_ext or torch.nn (same class names)."""
    if backend == "torch":
        return nn
    try:
        import rnn_ext
    except ModuleNotFoundError:  # run from a source checkout that was built but not installed
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        import rnn_ext
    return rnn_ext


def backend_description(backend: str) -> str:
    if backend == "torch":
        return "torch.nn"
    return f"rnn_ext ({recurrent_modules(backend).backend()} ops)"
