"""The tests' shared vocabulary and helpers: the cell kinds, the devices, module pairs with equal
weights, comparisons, layouts, and the check that rnn_ext's kernels (not the reference) ran.

Nothing here calls a compiled op at import, so that collection works without the extension.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence
from torch.utils._python_dispatch import TorchDispatchMode

import rnn_ext


# ---------------------------------------------------------------------------------- the kinds

@dataclass(frozen=True)
class Kind:
    """One cell kind: its torch.nn and rnn_ext classes, torch.nn's mode string, the RNN
    nonlinearity (None for LSTM / GRU), its number of gates and the prefix of its ops."""
    name: str
    mode: str
    nonlinearity: str | None
    gates: int
    nn_layer: type
    nn_cell: type
    layer: type
    cell: type
    prefix: str   # 'rnn', 'lstm' or 'gru': torch.ops.rnn_ext.<prefix>_<role>

    @property
    def module_kwargs(self) -> dict:
        """The constructor keywords that select this kind: nonlinearity for RNN / RNNCell."""
        return {"nonlinearity": self.nonlinearity} if self.nonlinearity else {}

    @property
    def is_rnn(self) -> bool:
        return self.nonlinearity is not None

    def op_base(self, role: str) -> str:
        """The name of this kind's op for `role`: one of "pointwise_forward",
        "pointwise_backward", "cell", "cell_inference", "recurrence", "recurrence_backward",
        "layer", "layer_inference"."""
        assert role in OP_ROLES, role
        return f"{self.prefix}_{role}"

    def op(self, role: str):
        """The op overload packet of `role`."""
        return getattr(torch.ops.rnn_ext, self.op_base(role))

    def op_name(self, role: str) -> str:
        """The name a dispatch mode records for `role`'s default overload."""
        return f"rnn_ext.{self.op_base(role)}.default"


OP_ROLES = ("pointwise_forward", "pointwise_backward", "cell", "cell_inference",
            "recurrence", "recurrence_backward", "layer", "layer_inference")

KINDS = {k.name: k for k in (
    Kind("rnn_tanh", "RNN_TANH", "tanh", 1, nn.RNN, nn.RNNCell, rnn_ext.RNN, rnn_ext.RNNCell,
         "rnn"),
    Kind("rnn_relu", "RNN_RELU", "relu", 1, nn.RNN, nn.RNNCell, rnn_ext.RNN, rnn_ext.RNNCell,
         "rnn"),
    Kind("lstm", "LSTM", None, 4, nn.LSTM, nn.LSTMCell, rnn_ext.LSTM, rnn_ext.LSTMCell, "lstm"),
    Kind("gru", "GRU", None, 3, nn.GRU, nn.GRUCell, rnn_ext.GRU, rnn_ext.GRUCell, "gru"),
)}
KIND_NAMES = list(KINDS)


@dataclass(frozen=True)
class ModuleCase:
    """A module configuration of the module-level tests: a kind, a layer or a cell, and (LSTM
    layers) a projection size."""
    kind: str
    cell: bool = False
    proj_size: int = 0


# the module configurations the edge-case tests run, by test id
MODULE_CASES = {
    "RNN-tanh": ModuleCase("rnn_tanh"),
    "RNN-relu": ModuleCase("rnn_relu"),
    "LSTM": ModuleCase("lstm"),
    "LSTM-proj": ModuleCase("lstm", proj_size=2),
    "GRU": ModuleCase("gru"),
    "RNNCell-tanh": ModuleCase("rnn_tanh", cell=True),
    "RNNCell-relu": ModuleCase("rnn_relu", cell=True),
    "LSTMCell": ModuleCase("lstm", cell=True),
    "GRUCell": ModuleCase("gru", cell=True),
}
LAYER_CASES = [name for name, case in MODULE_CASES.items() if not case.cell]
CELL_CASES = [name for name, case in MODULE_CASES.items() if case.cell]


# -------------------------------------------------------------------------------- the devices

HAS_CUDA = torch.cuda.is_available() and rnn_ext.extension_built_with_cuda()
NO_CUDA = "no CUDA device here, or rnn_ext was built without its CUDA kernels"
# CPU always; CUDA as a variant that skips, with the reason, where it cannot run
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda,
                                              pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)])]
CUDA_ONLY = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)]

NOT_BUILT = ("rnn_ext's compiled extension (rnn_ext/_C*.so) is not built or failed to load; "
             "build it with `python setup.py build_ext --inplace`")


def require_extension() -> None:
    """Skips (with the reason) when the compiled library is not built; otherwise asserts that
    the extension backend is the active one, so an op test never silently runs the reference."""
    if not rnn_ext.extension_available():
        pytest.skip(NOT_BUILT)
    assert rnn_ext.backend() == "extension", (
        f"rnn_ext.backend() is {rnn_ext.backend()!r} although the extension is built "
        "(is RNN_EXT_BACKEND=reference set, or did a test leave set_backend('reference')?)")


# ------------------------------------------------------------------- which ops ran, and where

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


@contextlib.contextmanager
def kernels_run(*expected: str):
    """Asserts that the code in the block ran rnn_ext's compiled ops: at least one, and each of
    `expected` (names as recorded, e.g. KINDS["lstm"].op_name("pointwise_forward")). A test about
    the kernels uses it so that a path falling back to rnn_ext.reference cannot pass it."""
    with OpRecorder() as recorder:
        yield recorder
    ran = recorder.rnn_ext_ops()
    assert ran, "no rnn_ext op ran: the reference path computed these results"
    missing = [name for name in expected if name not in ran]
    assert not missing, f"{missing} did not run; the rnn_ext ops that ran: {sorted(ran)}"


def graph_node_names(*tensors) -> set[str]:
    """Names of every autograd node reachable from `tensors`."""
    names, seen = set(), set()
    stack = [t.grad_fn for t in tensors if t is not None and t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(node.name())
        stack.extend(f for f, _ in node.next_functions)
    return names


def autograd_node(op: str) -> str:
    """The name's tail of the autograd node (csrc/autograd.cpp's Function) that op `op` puts in
    the graph: lstm_recurrence -> ...LstmRecurrence>."""
    return "".join(word.capitalize() for word in op.split("_")) + ">"


@contextlib.contextmanager
def backend(name: str):
    """Runs the block under rnn_ext's backend `name` and restores the previous one."""
    previous = rnn_ext.backend()
    rnn_ext.set_backend(name)
    try:
        yield
    finally:
        rnn_ext.set_backend(previous)


@contextlib.contextmanager
def intra_op_threads(count: int):
    """Runs the block with `count` intra-op threads (the CPU kernels' parallel splits depend on
    it) and restores the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --------------------------------------------------------------------------- modules in pairs

def make_pair(kind: str, input_size: int, hidden_size: int, *, cell: bool = False,
              dtype=torch.float64, device="cpu", seed: int = 0, direction: str = "nn_to_ext",
              **kwargs) -> tuple[nn.Module, nn.Module]:
    """(torch.nn module, rnn_ext module) of kind `kind` (a layer, or a cell) with equal weights,
    copied with load_state_dict(strict=True) from the one to the other (`direction`), after an
    initialisation that differs (so that the load is what makes them equal)."""
    k = KINDS[kind]
    nn_cls, ext_cls = (k.nn_cell, k.cell) if cell else (k.nn_layer, k.layer)
    kwargs = {**k.module_kwargs, **kwargs}
    torch.manual_seed(seed)
    source = (nn_cls if direction == "nn_to_ext" else ext_cls)(input_size, hidden_size, **kwargs)
    torch.manual_seed(seed + 1)
    target = (ext_cls if direction == "nn_to_ext" else nn_cls)(input_size, hidden_size, **kwargs)
    before = [p.detach().clone() for p in target.parameters()]
    result = target.load_state_dict(source.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert any(not torch.equal(b, p) for b, p in zip(before, target.parameters()))
    ref, ext = (source, target) if direction == "nn_to_ext" else (target, source)
    assert type(ref) is nn_cls and type(ext) is ext_cls
    return ref.to(device=device, dtype=dtype), ext.to(device=device, dtype=dtype)


def make_case_pair(case: str, *, input_size: int = 3, hidden_size: int = 4, **kwargs):
    """make_pair for a MODULE_CASES entry."""
    c = MODULE_CASES[case]
    if c.proj_size:
        kwargs["proj_size"] = c.proj_size
    return make_pair(c.kind, input_size, hidden_size, cell=c.cell, **kwargs)


# ------------------------------------------------------------------------- values and layouts

def assert_close(actual, expected, tol: float, what: str = "", equal_nan: bool = False) -> None:
    """assert_close with atol = rtol = tol, naming `what` on failure."""
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol, equal_nan=equal_nan,
                               msg=lambda m: f"{what}: {m}")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in a strided (every other element) layout."""
    out = torch.empty(t.shape + (2,), dtype=t.dtype, device=t.device)[..., 0]
    out.copy_(t)
    assert not out.is_contiguous()
    return out


def leaf(t: torch.Tensor, requires_grad: bool = True) -> torch.Tensor:
    return t.detach().clone().requires_grad_(requires_grad)


def flatten(obj) -> list[torch.Tensor]:
    """The tensors of a module's output: (output, hidden), (h, c), PackedSequence, ..."""
    if isinstance(obj, PackedSequence):
        return [obj.data]
    if isinstance(obj, torch.Tensor):
        return [obj]
    return [t for item in obj for t in flatten(item)]


def hidden_list(hidden) -> list[torch.Tensor]:
    return list(hidden) if isinstance(hidden, tuple) else [hidden]
