"""Shared test settings: the devices to run on and the guard that the compiled ops are in use."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rnn_ext

# CPU always; CUDA where a GPU is present and the extension was built with its kernels.
DEVICES = ["cpu"] + (
    ["cuda"] if torch.cuda.is_available() and rnn_ext.extension_built_with_cuda() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def require_extension() -> None:
    """Skips (with the reason) when the compiled library is not built; otherwise asserts that
    the extension backend is the active one, so an op test never silently runs the reference."""
    if not rnn_ext.extension_available():
        pytest.skip("rnn_ext's compiled extension (rnn_ext/_C*.so) is not built or failed to "
                    "load; build it with `python setup.py build_ext --inplace`")
    assert rnn_ext.backend() == "extension", (
        f"rnn_ext.backend() is {rnn_ext.backend()!r} although the extension is built "
        "(is RNN_EXT_BACKEND=reference set, or did a test leave set_backend('reference')?)")


@pytest.fixture
def extension() -> None:
    require_extension()


class OpRecorder(TorchDispatchMode):
    """Records the ops that reach the dispatcher: every op's name in `names`, and each rnn_ext
    op's (name, args, outputs) in `calls`."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []
        self.calls: list[tuple[str, tuple, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        name = str(func)
        self.names.append(name)
        if name.startswith("rnn_ext."):
            self.calls.append((name, args, result if isinstance(result, tuple) else (result,)))
        return result

    def rnn_ext_ops(self) -> set[str]:
        return {name for name, _, _ in self.calls}
