"""rnn_ext in the PyTorch ecosystem: torch.compile, torch.autocast, DistributedDataParallel and
serialization of the drop-in modules.

Ground truth is the same rnn_ext model run eagerly (compile, DDP, serialization), float32
(autocast) and torch.nn with the same weights. Every test compares values. Sizes are tiny; the
one inductor compile dominates the file's time (a C++ compile per graph when its cache is cold).
"""

from __future__ import annotations

import copy
import io
import os
import pickle
import socket
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnn_ext
from helpers import CUDA_ONLY, OpRecorder, flatten, make_pair

pytestmark = [
    pytest.mark.usefixtures("extension", "one_thread"),
    # torch.nn's own notice when it runs an LSTM with projections on the CPU
    pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN"),
]

I, H, B, T = 3, 4, 3, 5
# the modules by class name: (kind, cell)
CLASSES = {"LSTM": ("lstm", False), "GRU": ("gru", False), "RNN": ("rnn_tanh", False),
           "LSTMCell": ("lstm", True), "GRUCell": ("gru", True), "RNNCell": ("rnn_tanh", True)}


# ----------------------------------------------------------------------------------- helpers

def rnn_ext_ops(fn, *args) -> set[str]:
    """The rnn_ext ops that fn(*args) dispatches (eagerly)."""
    with OpRecorder() as recorder:
        fn(*args)
    return {name for name in recorder.names if name.startswith("rnn_ext.")}


def forward_backward(fn, model: nn.Module, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """fn(x)'s output tensors, and the gradients of a fixed function of them w.r.t. x and every
    parameter of `model` (its .grad is cleared before and after)."""
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    outputs = flatten(fn(x))
    sum(o.float().sin().sum() for o in outputs).backward()
    grads = [x.grad] + [p.grad for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return [o.detach() for o in outputs], grads


def assert_all_close(actual: list[Tensor], expected: list[Tensor], tol: float, what: str) -> None:
    assert len(actual) == len(expected), what
    for k, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, atol=tol, rtol=tol, msg=lambda m: f"{what} [{k}]: {m}")


def pair(name: str, dtype=torch.float32, **kwargs) -> tuple[nn.Module, nn.Module]:
    """(torch.nn module, rnn_ext module) of class `name` with identical weights."""
    kind, cell = CLASSES[name]
    return make_pair(kind, I, H, cell=cell, dtype=dtype, **kwargs)


def sample_input(name: str, dtype=torch.float32, device="cpu") -> Tensor:
    torch.manual_seed(1)
    shape = (B, I) if name.endswith("Cell") else (T, B, I)
    return torch.randn(shape, dtype=dtype, device=device)


# ------------------------------------------------------------------------------ torch.compile

class RecordingBackend:
    """A torch.compile backend that keeps the graphs Dynamo hands it (one per compile; a graph
    break would make two per call), then compiles them with `inner`."""

    def __init__(self, inner="aot_eager"):
        from torch._dynamo.backends.registry import lookup_backend
        self.inner = lookup_backend(inner) if isinstance(inner, str) else inner
        self._seen: list[torch.fx.GraphModule] = []

    def __call__(self, gm, example_inputs):
        self._seen.append(gm)
        return self.inner(gm, example_inputs)

    @property
    def graphs(self) -> list[torch.fx.GraphModule]:
        # Dynamo may restart an analysis after calling the backend (with dynamic=True, to
        # specialise a float such as `dropout`); the abandoned graph is left empty.
        return [g for g in self._seen if any(n.op == "call_function" for n in g.graph.nodes)]

    def ops(self, graph: int = -1) -> set[str]:
        """The rnn_ext ops called in one of the graphs."""
        return {str(n.target) for n in self.graphs[graph].graph.nodes
                if n.op == "call_function" and str(n.target).startswith("rnn_ext.")}


def lowering_backend() -> tuple[RecordingBackend, list[set[str]]]:
    """A RecordingBackend through AOTAutograd, and the list it fills with the rnn_ext ops of
    each graph AOTAutograd compiles (forward graphs and backward graphs, in order)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    lowered: list[set[str]] = []

    def record(gm, example_inputs):
        lowered.append({str(n.target) for n in gm.graph.nodes
                        if n.op == "call_function" and str(n.target).startswith("rnn_ext.")})
        return make_boxed_func(gm.forward)

    return RecordingBackend(aot_autograd(fw_compiler=record, bw_compiler=record)), lowered


@pytest.fixture
def dynamo():
    """A clean Dynamo cache (no configuration: the layers compile with Dynamo's defaults)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


LAYERS = {
    "LSTM-2layers-bidir-batch_first": (
        lambda: rnn_ext.LSTM(I, H, num_layers=2, bidirectional=True, batch_first=True),
        "rnn_ext.lstm_layer"),
    "LSTM-proj": (lambda: rnn_ext.LSTM(I, H, proj_size=2), "rnn_ext.lstm_layer"),
    "GRU-2layers-bidir": (lambda: rnn_ext.GRU(I, H, num_layers=2, bidirectional=True),
                          "rnn_ext.gru_layer"),
    "RNN-relu": (lambda: rnn_ext.RNN(I, H, nonlinearity="relu"),
                 "rnn_ext.rnn_layer"),
}


@pytest.mark.parametrize("case", LAYERS)
def test_compile_layers_fullgraph_with_automatic_dynamic_shapes(dynamo, case):
    """fullgraph compile (no graph break), forward and backward equal to eager; a second sequence
    length recompiles once with a dynamic length, which serves a third without recompiling."""
    make, op = LAYERS[case]
    torch.manual_seed(0)
    model = make()
    backend = RecordingBackend()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    for steps in (5, 7, 9):
        x = torch.randn(steps, B, I)
        if model.batch_first:
            x = x.transpose(0, 1).contiguous()
        got = forward_backward(compiled, model, x)
        want = forward_backward(model, model, x)
        assert_all_close(got[0], want[0], 1e-6, f"outputs, T={steps}")
        assert_all_close(got[1], want[1], 1e-5, f"gradients, T={steps}")
    assert len(backend.graphs) == 2, "expected one static and one dynamic-length graph"
    assert op in backend.ops(0) and op in backend.ops(1)


def test_compile_dynamic_true_and_no_grad(dynamo):
    """dynamic=True: one graph serves every length; under no_grad (no workspace saved) a second
    graph, with the same values. Dynamo's graphs hold the layer op; AOTAutograd lowers it to
    the recurrence op and its backward op with grad, to the inference op without."""
    torch.manual_seed(0)
    model = rnn_ext.LSTM(I, H, num_layers=2)
    backend, lowered = lowering_backend()
    compiled = torch.compile(model, fullgraph=True, backend=backend, dynamic=True)
    for steps in (4, 11):
        x = torch.randn(steps, B, I)
        got, want = forward_backward(compiled, model, x), forward_backward(model, model, x)
        assert_all_close(got[0] + got[1], want[0] + want[1], 1e-5, f"T={steps}")
    assert len(backend.graphs) == 1
    with torch.no_grad():
        x = torch.randn(6, B, I)
        assert_all_close(flatten(compiled(x)), flatten(model(x)), 1e-6, "no_grad")
    assert len(backend.graphs) == 2
    assert backend.ops(0) == backend.ops(1) == {"rnn_ext.lstm_layer"}
    assert lowered == [{"rnn_ext.lstm_recurrence.default"},
                       {"rnn_ext.lstm_recurrence_backward.default"},
                       {"rnn_ext.lstm_layer_inference.default"}]


def test_compile_packed_sequence(dynamo):
    """A PackedSequence (unsorted lengths) into a fullgraph-compiled bidirectional LSTM."""
    torch.manual_seed(0)
    model = rnn_ext.LSTM(I, H, bidirectional=True)
    compiled = torch.compile(model, fullgraph=True, backend=RecordingBackend())
    x = torch.randn(T, B, I)
    for lengths in ([3, 5, 2], [4, 1, 4]):
        def run(inp, module):
            out = module(pack_padded_sequence(inp, lengths, enforce_sorted=False))
            assert isinstance(out[0], PackedSequence)
            return out
        got = forward_backward(lambda inp: run(inp, compiled), model, x)
        want = forward_backward(lambda inp: run(inp, model), model, x)
        assert_all_close(got[0] + got[1], want[0] + want[1], 1e-5, f"lengths {lengths}")


def test_compile_cells_in_a_python_loop():
    """Cells need no flag (Dynamo's refusal covers the layers only); the loop unrolls into one
    graph with the fused cell ops."""
    torch._dynamo.reset()

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = rnn_ext.LSTMCell(I, H)
            self.gru = rnn_ext.GRUCell(H, H)
            self.rnn = rnn_ext.RNNCell(H, H)

        def forward(self, x):
            state, h, outputs = None, None, []
            for t in range(x.size(0)):
                state = self.lstm(x[t], state)
                h = self.gru(state[0], h)
                outputs.append(self.rnn(h))
            return torch.stack(outputs)

    torch.manual_seed(0)
    model = Stack()
    backend, lowered = lowering_backend()
    x = torch.randn(T, B, I)
    got = forward_backward(torch.compile(model, fullgraph=True, backend=backend), model, x)
    want = forward_backward(model, model, x)
    assert_all_close(got[0] + got[1], want[0] + want[1], 1e-5, "cells")
    assert len(backend.graphs) == 1
    cells = {"rnn_ext.lstm_cell", "rnn_ext.gru_cell", "rnn_ext.rnn_cell"}
    assert backend.ops() == cells
    # lowered to the fused forward ops, and a backward graph of the fused backward ops
    assert lowered == [{f"rnn_ext.{k}_pointwise_forward.default" for k in ("lstm", "gru", "rnn")},
                       {f"rnn_ext.{k}_pointwise_backward.default" for k in ("lstm", "gru", "rnn")}]
    with torch.no_grad():  # a graph of the inference ops, with the same values
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        assert_all_close([compiled(x)], [model(x)], 1e-6, "cells, no_grad")
    assert backend.ops() == cells
    assert lowered[2:] == [{f"rnn_ext.{k}_cell_inference.default" for k in ("lstm", "gru", "rnn")}]
    torch._dynamo.reset()


def test_compile_follows_the_backend_switch(dynamo):
    """The backend is chosen while tracing; switching it recompiles (a guard), not stale code."""
    torch.manual_seed(0)
    model = rnn_ext.GRU(I, H)
    backend = RecordingBackend("eager")  # the graphs are the point; AOT adds only time here
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    x = torch.randn(3, B, I)  # short: the reference's loop unrolls into the graph
    compiled(x)
    rnn_ext.set_backend("reference")
    try:
        assert_all_close(flatten(compiled(x)), flatten(model(x)), 1e-6, "reference backend")
    finally:
        rnn_ext.set_backend("extension")
    assert_all_close(flatten(compiled(x)), flatten(model(x)), 1e-6, "extension backend")
    assert len(backend.graphs) == 2
    assert backend.ops(0) == {"rnn_ext.gru_layer"} and backend.ops(1) == set()


def test_compile_under_autocast(dynamo):
    """The autocast casts in rnn_ext.functional trace like any other op: bfloat16 out, as eager."""
    torch.manual_seed(0)
    model = rnn_ext.LSTM(I, H)
    compiled = torch.compile(model, fullgraph=True, backend=RecordingBackend())
    x = torch.randn(T, B, I)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = flatten(compiled(x)), flatten(model(x))
    assert all(t.dtype == torch.bfloat16 for t in got)
    assert_all_close(got, want, 1e-2, "compiled vs eager under autocast")


@pytest.mark.slow
def test_compile_inductor_forward_backward(dynamo):
    """inductor (C++ codegen on the CPU) around the rnn_ext ops, every layer kind and a cell,
    dynamic=True: forward and backward equal to eager for two lengths."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = rnn_ext.LSTM(I, H, num_layers=2, bidirectional=True, batch_first=True)
            self.gru = rnn_ext.GRU(2 * H, H)
            self.rnn = rnn_ext.RNN(H, H, nonlinearity="relu")
            self.cell = rnn_ext.GRUCell(H, H)
            self.head = nn.Linear(H, 2)

        def forward(self, x):
            y, _ = self.lstm(x)
            y, _ = self.gru(y.transpose(0, 1))
            y, h = self.rnn(y)
            h = h[0]
            for t in range(2):
                h = self.cell(y[t], h)
            return self.head(h)

    torch.manual_seed(0)
    model = Net()
    backend = RecordingBackend("inductor")
    from torch._inductor import config as inductor_config
    # compile_threads=1: no pool of compile workers to start on a small machine
    with inductor_config.patch(compile_threads=1):
        compiled = torch.compile(model, fullgraph=True, backend=backend, dynamic=True)
        for steps in (5, 8):
            x = torch.randn(B, steps, I)
            got, want = forward_backward(compiled, model, x), forward_backward(model, model, x)
            assert_all_close(got[0] + got[1], want[0] + want[1], 1e-5, f"T={steps}")
    assert len(backend.graphs) == 1
    assert {"rnn_ext.lstm_layer", "rnn_ext.gru_layer",
            "rnn_ext.rnn_layer", "rnn_ext.gru_cell"} <= backend.ops()


def test_torch_nn_lstm_breaks_the_graph_where_rnn_ext_compiles():
    """Dynamo refuses torch.nn.LSTM under fullgraph=True (it would graph-break); the drop-in
    compiles with Dynamo's default configuration."""
    torch._dynamo.reset()
    x = torch.randn(T, B, I)
    with pytest.raises(torch._dynamo.exc.Unsupported):
        torch.compile(nn.LSTM(I, H), fullgraph=True, backend="eager")(x)
    model = rnn_ext.LSTM(I, H)
    torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="eager")(x)[0],
                               model(x)[0])
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- torch.autocast

MODULES = list(CLASSES)


def _autocast_check(name: str, device: str, dtype: torch.dtype, backend: str) -> None:
    """Under autocast: every output in `dtype`, close to float32; parameter gradients float32 and
    close to float32's; and close to torch.nn under the same autocast where torch.nn runs (its
    CPU LSTM fails under float16 autocast here, in oneDNN)."""
    ref, ext = pair(name)
    ref, ext = ref.to(device), ext.to(device)
    x = sample_input(name, device=device)
    rnn_ext.set_backend(backend)
    try:
        want_out, want_grads = forward_backward(ext, ext, x)
        with torch.autocast(device, dtype=dtype):
            got_out, got_grads = forward_backward(ext, ext, x)
            ops = rnn_ext_ops(ext, x)
            try:
                nn_out = [o.detach().float() for o in flatten(ref(x))]
            except RuntimeError as error:
                nn_out = None
                assert "oneDNN" in str(error) or "primitive" in str(error), error
    finally:
        rnn_ext.set_backend("extension")
    assert [o.dtype for o in got_out] == [dtype] * len(want_out)
    assert [g.dtype for g in got_grads] == [torch.float32] * len(want_grads)
    lo = [o.float() for o in got_out]
    assert_all_close(lo, want_out, 3e-2, "autocast vs float32")
    if nn_out is not None:
        assert_all_close(lo, nn_out, 3e-2, "autocast vs torch.nn's autocast")
    for k, (g, w) in enumerate(zip(got_grads, want_grads)):
        assert (g - w).norm() <= 5e-2 * w.norm() + 1e-3, f"gradient {k}"
    kernels = backend == "extension" and (device == "cuda" or dtype == torch.bfloat16)
    assert bool(ops) == kernels, ops


@pytest.mark.parametrize("backend", ["extension", "reference"])
@pytest.mark.parametrize("name", MODULES)
def test_cpu_autocast_bfloat16(name, backend):
    _autocast_check(name, "cpu", torch.bfloat16, backend)


@pytest.mark.parametrize("name", ["LSTM", "GRUCell"])
def test_cpu_autocast_float16_takes_the_reference_path(name):
    """CPU float16 has no kernels: the reference runs, in float16."""
    _autocast_check(name, "cpu", torch.float16, "extension")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=CUDA_ONLY)], indirect=True)
def test_cuda_autocast(device, name, dtype):
    _autocast_check(name, "cuda", dtype, "extension")


def test_mixed_dtypes_only_under_autocast():
    """bfloat16 input with float32 weights and states (a preceding autocast op's output) runs
    under autocast; outside it, the dtype checks still raise."""
    lstm, cell = rnn_ext.LSTM(I, H), rnn_ext.GRUCell(I, H)
    x = torch.randn(T, B, I, dtype=torch.bfloat16)
    state = torch.zeros(1, B, H)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lstm(x, (state, state))[0].dtype == torch.bfloat16
        assert cell(x[0], state[0]).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        lstm(x)
    with pytest.raises(RuntimeError, match="dtype"):
        cell(x[0], state[0])


# ------------------------------------------------------------------ DistributedDataParallel

class _Tagger(nn.Module):
    """A 2-layer bidirectional rnn_ext LSTM and a linear head on its outputs' mean over time
    (every weight gets a gradient; the last step alone would leave out W_hh of the reverse
    direction, whose last output is its first step)."""

    def __init__(self):
        super().__init__()
        self.lstm = rnn_ext.LSTM(I, H, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(2 * H, 2)

    def forward(self, x):
        return self.head(self.lstm(x)[0].mean(1))


DDP_STEPS, DDP_BATCH = 3, 8


def _ddp_data() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(3)
    return (torch.randn(DDP_BATCH, T, I, generator=generator, dtype=torch.float64),
            torch.randn(DDP_BATCH, 2, generator=generator, dtype=torch.float64))


def _train(model: nn.Module, x: Tensor, target: Tensor) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(DDP_STEPS):
        optimizer.zero_grad()
        F.mse_loss(model(x), target).backward()
        optimizer.step()


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    """One process of the DDP run: trains on its half of the batch, saves its weights."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        assert rnn_ext.backend() == "extension"
        torch.manual_seed(0)
        model = DistributedDataParallel(_Tagger().double())
        x, target = _ddp_data()
        share = DDP_BATCH // world
        _train(model, x[rank * share:(rank + 1) * share], target[rank * share:(rank + 1) * share])
        torch.save(model.module.state_dict(), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_match_single_process_training(tmp_path):
    """DDP on 2 CPU processes (gloo), half the batch each, equals one process on the whole batch
    (DDP averages the gradients; the loss is a mean over equal halves). float64."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "weights")
    mp.spawn(_ddp_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    torch.manual_seed(0)
    model = _Tagger().double()
    initial = copy.deepcopy(model.state_dict())
    _train(model, *_ddp_data())
    want = model.state_dict()
    for rank in range(2):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=1e-12, rtol=1e-12,
                                       msg=lambda m: f"rank {rank}, {key}: {m}")
    assert all(not torch.equal(want[key], initial[key]) for key in want), "a weight did not train"


# ---------------------------------------------------------------- serialization, dtypes, devices

SERIALIZED = {
    "LSTM-2layers-bidir-proj": ("LSTM", dict(num_layers=2, bidirectional=True, proj_size=2)),
    "GRU-batch_first": ("GRU", dict(batch_first=True)),
    "RNN-relu": ("RNN", dict(nonlinearity="relu")),
    "LSTMCell": ("LSTMCell", {}),
    "GRUCell": ("GRUCell", {}),
    "RNNCell-relu": ("RNNCell", dict(nonlinearity="relu")),
}


def _round_trips(module: nn.Module) -> dict[str, nn.Module]:
    saved = io.BytesIO()
    torch.save(module, saved)
    saved.seek(0)
    return {
        "torch.save": torch.load(saved, weights_only=False),
        "deepcopy": copy.deepcopy(module),
        "pickle": pickle.loads(pickle.dumps(module)),
    }


@pytest.mark.parametrize("case", SERIALIZED)
def test_whole_module_round_trips(case):
    """torch.save/torch.load, copy.deepcopy and pickle give an rnn_ext module that runs the fused
    ops and computes exactly what the original does, with parameters of its own."""
    name, kwargs = SERIALIZED[case]
    _, original = pair(name, **kwargs)
    x = sample_input(name)
    want = flatten(original(x))
    for how, copied in _round_trips(original).items():
        assert type(copied) is type(original), how
        assert copied.state_dict().keys() == original.state_dict().keys(), how
        got = flatten(copied(x))
        assert all(torch.equal(g, w) for g, w in zip(got, want)), how
        assert rnn_ext_ops(copied, x), f"{how}: the copy does not run rnn_ext's ops"
        with torch.no_grad():
            next(copied.parameters()).add_(1.0)
        assert all(torch.equal(g, w) for g, w in zip(flatten(original(x)), want)), \
            f"{how}: the copy shares parameters with the original"


@pytest.mark.parametrize("case", SERIALIZED)
def test_state_dict_round_trip_both_ways(case):
    """A saved state dict (weights_only=True) loads into a fresh rnn_ext module and into torch.nn's
    (and torch.nn's into rnn_ext's): same outputs, float64."""
    name, kwargs = SERIALIZED[case]
    ref, ext = pair(name, torch.float64, **kwargs)
    x = sample_input(name, torch.float64)
    saved = io.BytesIO()
    torch.save(ext.state_dict(), saved)
    saved.seek(0)
    state = torch.load(saved, weights_only=True)
    torch.manual_seed(5)
    fresh_ext = getattr(rnn_ext, name)(I, H, **kwargs).double()
    fresh_ref = getattr(nn, name)(I, H, **kwargs).double()
    fresh_ext.load_state_dict(state, strict=True)
    fresh_ref.load_state_dict(state, strict=True)
    assert_all_close(flatten(fresh_ext(x)), flatten(ext(x)), 0, "rnn_ext -> rnn_ext")
    assert_all_close(flatten(fresh_ref(x)), flatten(ext(x)), 1e-10, "rnn_ext -> torch.nn")
    fresh_ext.load_state_dict(ref.state_dict(), strict=True)
    assert_all_close(flatten(fresh_ext(x)), flatten(ref(x)), 1e-10, "torch.nn -> rnn_ext")


@pytest.mark.parametrize("name", MODULES)
def test_dtype_and_device_conversions(name):
    """.double() / .to(float64) match torch.nn's at float64; .to("cpu") changes nothing; .half()
    (CPU float16: the reference path) runs in float16 near float32 and torch.nn's .half();
    .float() after .double() restores float32."""
    ref, ext = pair(name)
    x = sample_input(name)
    want32 = flatten(ext(x))
    assert ext.to("cpu") is ext and all(torch.equal(g, w) for g, w in zip(flatten(ext(x)), want32))

    for convert in (lambda m: m.double(), lambda m: m.to(torch.float64)):
        ref64, ext64 = convert(copy.deepcopy(ref)), convert(copy.deepcopy(ext))
        assert all(p.dtype == torch.float64 for p in ext64.parameters())
        assert_all_close(flatten(ext64(x.double())), flatten(ref64(x.double())), 1e-10, "float64")
        assert rnn_ext_ops(ext64, x.double())

    ext16, ref16 = copy.deepcopy(ext).half(), copy.deepcopy(ref).half()
    assert all(p.dtype == torch.float16 for p in ext16.parameters())
    got16 = flatten(ext16(x.half()))
    assert all(t.dtype == torch.float16 for t in got16)
    assert_all_close([t.float() for t in got16], want32, 2e-2, "float16 vs float32")
    assert_all_close(got16, flatten(ref16(x.half())), 2e-2, "float16 vs torch.nn's float16")

    back = copy.deepcopy(ext).double().float()
    assert all(torch.equal(g, w) for g, w in zip(flatten(back(x)), want32))


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=CUDA_ONLY)], indirect=True)
def test_to_cuda_and_back(device, name):
    """.to("cuda") runs the CUDA kernels with the CPU module's results (TF32 off), and .to("cpu")
    brings back the CPU module exactly."""
    _, ext = pair(name)
    x = sample_input(name)
    want32 = flatten(ext(x))
    on_gpu = copy.deepcopy(ext).to(device)
    assert_all_close([t.cpu() for t in flatten(on_gpu(x.to(device)))], want32, 1e-5, device)
    assert rnn_ext_ops(on_gpu, x.to(device))
    assert all(torch.equal(g, w) for g, w in zip(flatten(on_gpu.to("cpu")(x)), want32))


def test_default_device_leaves_batch_sizes_on_the_cpu():
    """Under a default device (torch.device context, set_default_device: "cuda" on a GPU machine;
    "meta" stands in here) the module still hands the ops a CPU batch_sizes, and computes the
    same values."""
    model = rnn_ext.LSTM(I, H)
    x = torch.randn(T, B, I)
    want = flatten(model(x))
    with torch.device("meta"):
        got = flatten(model(x))
    assert_all_close(got, want, 0, "under torch.device('meta')")
