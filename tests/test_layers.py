"""The drop-in layers rnn_ext.RNN / LSTM / GRU against torch.nn, and the raw layer ops.

Ground truth is torch.nn (same weights through load_state_dict(strict=True)) for the modules, and
rnn_ext.reference.layer_recurrence / finite differences (gradcheck) for the ops in
torch.ops.rnn_ext. Sizes are kept small so that the whole file runs in well under a minute on two
CPU cores.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnn_ext
from conftest import OpRecorder
from rnn_ext import reference

ops = torch.ops.rnn_ext

DEVICES = ["cpu"] + (
    ["cuda"] if torch.cuda.is_available() and rnn_ext.extension_built_with_cuda() else [])

pytestmark = [
    pytest.mark.skipif(not rnn_ext.extension_available(),
                       reason="the compiled extension is not built"),
    # torch.nn's own notice when it runs an LSTM with projections on the CPU
    pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN"),
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The sizes here are far below what intra-op threads pay off for; on a small, shared
    machine the spinning OpenMP workers only slow the file down (x5-10). One test below runs
    with more threads on purpose (test_parallel_rows)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# Small sizes of the exhaustive parity product.
I, H, T, B, P = 3, 4, 5, 3, 3
SORTED_LENGTHS = [5, 3, 2]
UNSORTED_LENGTHS = [3, 5, 2]

# mode name -> (torch.nn class, rnn_ext class, extra constructor kwargs, its forward op)
MODES = {
    "RNN_TANH": (nn.RNN, rnn_ext.RNN, {"nonlinearity": "tanh"}, "rnn_recurrence"),
    "RNN_RELU": (nn.RNN, rnn_ext.RNN, {"nonlinearity": "relu"}, "rnn_recurrence"),
    "LSTM": (nn.LSTM, rnn_ext.LSTM, {}, "lstm_recurrence"),
    "GRU": (nn.GRU, rnn_ext.GRU, {}, "gru_recurrence"),
}
FORMS = ("padded", "unbatched", "packed_sorted", "packed_unsorted")


# ----------------------------------------------------------------------------------- helpers

def make_pair(mode: str, dtype=torch.float64, device="cpu", seed=0, **kwargs):
    """(torch.nn module, rnn_ext module) with identical weights."""
    ref_cls, ext_cls, extra, _ = MODES[mode]
    torch.manual_seed(seed)
    ref = ref_cls(**extra, **kwargs).to(device=device, dtype=dtype)
    ext = ext_cls(**extra, **kwargs).to(device=device, dtype=dtype)
    ext.load_state_dict(ref.state_dict(), strict=True)
    return ref, ext


def autograd_node(op: str) -> str:
    """The name of the autograd node (csrc/autograd.cpp's Function) that op `op` puts in the
    graph: lstm_recurrence -> ...LstmRecurrence>."""
    return "".join(word.capitalize() for word in op.split("_")) + ">"


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


def assert_close(actual, expected, tol, what=""):
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run_module(module, form, x, batch_first, hx):
    """Calls `module` on `x` in input form `form`: (output tensor, packed or None, hidden)."""
    if form.startswith("packed"):
        lengths = SORTED_LENGTHS if form == "packed_sorted" else UNSORTED_LENGTHS
        inp = pack_padded_sequence(x, lengths, batch_first=batch_first,
                                   enforce_sorted=form == "packed_sorted")
        out, hidden = module(inp, hx)
        assert isinstance(out, PackedSequence)
        return out.data, out, hidden
    out, hidden = module(x, hx)
    return out, None, hidden


def hidden_list(hidden):
    return list(hidden) if isinstance(hidden, tuple) else [hidden]


# ------------------------------------------------------------ full float64 parity with torch.nn

def _parity_cases():
    cases = []
    for mode in MODES:
        projs = (0, P) if mode == "LSTM" else (0,)
        for layers, bidir, bf, bias, proj, form, given in itertools.product(
                (1, 2), (False, True), (False, True), (True, False), projs, FORMS, (False, True)):
            cid = (f"{mode}-L{layers}-{'bi' if bidir else 'uni'}-{'bf' if bf else 'tf'}-"
                   f"{'bias' if bias else 'nobias'}-p{proj}-{form}-{'h0' if given else 'noh0'}")
            cases.append(pytest.param(mode, layers, bidir, bf, bias, proj, form, given, id=cid))
    return cases


def check_parity(mode, layers, bidir, batch_first, bias, proj, form, h0_given, device="cpu",
                 expect_ops=True):
    kwargs = dict(input_size=I, hidden_size=H, num_layers=layers, bidirectional=bidir,
                  batch_first=batch_first, bias=bias)
    if proj:
        kwargs["proj_size"] = proj
    ref, ext = make_pair(mode, device=device, **kwargs)
    lstm = mode == "LSTM"
    D = 2 if bidir else 1
    out_size = proj or H
    gen = torch.Generator().manual_seed(1234)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device)

    if form == "unbatched":
        x = rand(T, I)
        state_shape = (layers * D,)
    else:
        x = rand(B, T, I) if batch_first else rand(T, B, I)
        state_shape = (layers * D, B)
    x.requires_grad_(True)
    leaves = [x]
    hx = None
    if h0_given:
        h0 = rand(*state_shape, out_size).requires_grad_(True)
        leaves.append(h0)
        hx = h0
        if lstm:
            c0 = rand(*state_shape, H).requires_grad_(True)
            leaves.append(c0)
            hx = (h0, c0)

    ref_out, ref_packed, ref_hidden = run_module(ref, form, x, batch_first, hx)
    ext_out, ext_packed, ext_hidden = run_module(ext, form, x, batch_first, hx)

    # the fused ops (not the reference) produced the result
    names = graph_node_names(ext_out, *hidden_list(ext_hidden))
    uses_op = any(autograd_node(MODES[mode][3]) in n for n in names)
    assert uses_op == expect_ops, sorted(names)

    assert ext_out.shape == ref_out.shape
    assert_close(ext_out, ref_out, 1e-10, "output")
    if ref_packed is not None:
        assert torch.equal(ext_packed.batch_sizes, ref_packed.batch_sizes)
        for name in ("sorted_indices", "unsorted_indices"):
            a, b = getattr(ext_packed, name), getattr(ref_packed, name)
            assert (a is None) == (b is None), name
            if b is not None:
                assert torch.equal(a, b), name
    ref_states, ext_states = hidden_list(ref_hidden), hidden_list(ext_hidden)
    assert len(ext_states) == len(ref_states) == (2 if lstm else 1)
    for k, (a, b) in enumerate(zip(ext_states, ref_states)):
        assert a.shape == b.shape
        assert_close(a, b, 1e-10, f"state {k}")

    weights = [rand(*ref_out.shape)] + [rand(*s.shape) for s in ref_states]

    def loss(out, states):
        return sum((t * w).sum() for t, w in zip([out, *states], weights))

    ref_params = list(ref.named_parameters())
    ext_params = list(ext.named_parameters())
    assert [n for n, _ in ext_params] == [n for n, _ in ref_params]
    ref_grads = torch.autograd.grad(loss(ref_out, ref_states),
                                    leaves + [p for _, p in ref_params])
    ext_grads = torch.autograd.grad(loss(ext_out, ext_states),
                                    leaves + [p for _, p in ext_params])
    labels = ["input", "h0", "c0"][:len(leaves)] + [n for n, _ in ref_params]
    for label, a, b in zip(labels, ext_grads, ref_grads):
        assert_close(a, b, 1e-10, f"grad {label}")


@pytest.mark.parametrize("mode,layers,bidir,batch_first,bias,proj,form,h0_given", _parity_cases())
def test_float64_parity_with_torch_nn(mode, layers, bidir, batch_first, bias, proj, form,
                                      h0_given):
    assert rnn_ext.backend() == "extension"
    check_parity(mode, layers, bidir, batch_first, bias, proj, form, h0_given)


@pytest.mark.parametrize("mode,layers,bidir,batch_first,bias,proj,form,h0_given", [
    ("RNN_TANH", 2, True, False, True, 0, "padded", True),
    ("RNN_RELU", 1, False, True, False, 0, "unbatched", False),
    ("LSTM", 2, True, True, True, P, "packed_unsorted", True),
    ("LSTM", 1, False, False, False, 0, "packed_sorted", False),
    ("GRU", 2, True, True, True, 0, "packed_unsorted", True),
    ("GRU", 1, False, False, False, 0, "padded", True),
])
def test_float64_parity_reference_backend(mode, layers, bidir, batch_first, bias, proj, form,
                                          h0_given):
    previous = rnn_ext.backend()
    rnn_ext.set_backend("reference")
    try:
        assert rnn_ext.backend() == "reference"
        check_parity(mode, layers, bidir, batch_first, bias, proj, form, h0_given,
                     expect_ops=False)
    finally:
        rnn_ext.set_backend(previous)
    assert rnn_ext.backend() == "extension"


@pytest.mark.parametrize("missing", ["b_ih", "b_hh"])
@pytest.mark.parametrize("mode", list(MODES))
def test_functional_layer_with_one_bias(mode, missing):
    """functional.recurrent_layer with only one of the two biases (the kernels fold b_ih into
    the step's bias for RNN and LSTM): outputs and gradients match the reference backend."""
    G = {"LSTM": 4, "GRU": 3}.get(mode, 1)
    torch.manual_seed(0)
    args = {"x": torch.randn(T * B, I), "h0": torch.randn(B, H), "w_ih": torch.randn(G * H, I),
            "w_hh": torch.randn(G * H, H), "b_ih": torch.randn(G * H), "b_hh": torch.randn(G * H)}
    args = {k: v.double().requires_grad_() for k, v in args.items()}
    args[missing] = None
    c0 = torch.randn(B, H, dtype=torch.float64) if mode == "LSTM" else None
    batch_sizes = torch.full((T,), B, dtype=torch.int64)
    results = {}
    previous = rnn_ext.backend()
    for backend in ("extension", "reference"):
        rnn_ext.set_backend(backend)
        try:
            y, h_n, _ = rnn_ext.functional.recurrent_layer(
                mode, args["x"], batch_sizes, args["h0"], c0, args["w_ih"], args["w_hh"],
                args["b_ih"], args["b_hh"])
        finally:
            rnn_ext.set_backend(previous)
        leaves = [v for v in args.values() if v is not None]
        results[backend] = (y, h_n, *torch.autograd.grad((y.sum() + h_n.sum()), leaves))
    for ours, theirs in zip(results["extension"], results["reference"], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", list(MODES))
def test_parity_on_devices(mode, device):
    check_parity(mode, 2, True, True, True, P if mode == "LSTM" else 0, "packed_unsorted", True,
                 device=device)


@pytest.mark.parametrize("mode", list(MODES))
def test_fused_backward_op_runs(mode):
    """A plain backward goes through the fused *_recurrence_backward op, not the reference."""
    _, ext = make_pair(mode, input_size=I, hidden_size=H, num_layers=2, bidirectional=True)
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    out, _ = ext(x)
    op = MODES[mode][3] + "_backward"
    with OpRecorder() as rec:
        out.sum().backward()
    calls = [n for n in rec.names if op in n]
    assert len(calls) == 4, rec.names  # 2 layers x 2 directions

    with OpRecorder() as rec:
        with torch.no_grad():
            ext(x)
    assert [n for n in rec.names if "recurrence" in n] == [], rec.names
    inference_calls = [n for n in rec.names if MODES[mode][3].replace("recurrence", "layer_inference") in n]
    assert len(inference_calls) == 4, rec.names


@pytest.mark.parametrize("mode", list(MODES))
def test_inference_saves_nothing(mode):
    """Without grad the layer runs as its *_layer_inference op (x projected inside, no
    workspace, no graph); with grad, the differentiable op saves its workspace."""
    _, ext = make_pair(mode, input_size=I, hidden_size=H)
    x = torch.randn(T, B, I, dtype=torch.float64)
    with torch.no_grad(), OpRecorder() as rec:
        out, _ = ext(x)
    inference_op = MODES[mode][3].replace("recurrence", "layer_inference")
    assert [name for name, _, _ in rec.calls] == [f"rnn_ext.{inference_op}.default"]
    assert out.grad_fn is None
    with OpRecorder() as rec:
        ext(x)
    [(name, args, results)] = rec.calls
    assert name == f"rnn_ext.{MODES[mode][3]}.default"
    if mode in ("LSTM", "GRU"):
        assert args[-1] is True and results[-1].shape[0] == T * B


# Sizes whose input projection exceeds the 16 MB that the inference ops project at once
# (InputGates::kChunkBytes; in float64): G*H = 256 or 288 columns, 2 KB or more per row.
CHUNKED_HIDDEN = {"RNN_TANH": 256, "RNN_RELU": 256, "LSTM": 64, "GRU": 96}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", list(MODES))
def test_inference_in_chunks_matches_torch_nn(mode, device):
    """A packed, bidirectional two-layer sequence long enough that the inference op projects the
    input in several chunks of steps (forward in row order, reverse from the end), with biases
    and (LSTM) a projection: outputs and states match torch.nn's and those of the
    differentiable path, which projects the whole input at once."""
    lstm = mode == "LSTM"
    ref, ext = make_pair(mode, device=device, input_size=16, hidden_size=CHUNKED_HIDDEN[mode],
                         num_layers=2, bidirectional=True, **({"proj_size": 48} if lstm else {}))
    torch.manual_seed(0)
    lengths = sorted(torch.randint(90, 151, (80,)).tolist(), reverse=True)
    lengths[0] = 150
    x = pack_padded_sequence(torch.randn(150, 80, 16, dtype=torch.float64, device=device),
                             lengths)
    assert x.data.shape[0] * 256 * 8 > 16 << 20
    with torch.no_grad(), OpRecorder() as rec:
        ext_out, ext_hidden = ext(x)
        ref_out, ref_hidden = ref(x)
    inference_op = MODES[mode][3].replace("recurrence", "layer_inference")
    assert f"rnn_ext.{inference_op}.default" in rec.rnn_ext_ops()
    grad_out, grad_hidden = ext(x)  # the differentiable op: xg whole
    assert_close(ext_out.data, ref_out.data, 1e-10, "output")
    assert_close(ext_out.data, grad_out.data, 1e-12, "output against the grad path")
    for a, b, c in zip(hidden_list(ext_hidden), hidden_list(ref_hidden),
                       hidden_list(grad_hidden)):
        assert_close(a, b, 1e-10, "state")
        assert_close(a, c, 1e-12, "state against the grad path")


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_inference_step_larger_than_a_chunk(mode):
    """A batch whose one step's projection exceeds the chunk size: one step per chunk."""
    ref, ext = make_pair(mode, input_size=8, hidden_size=CHUNKED_HIDDEN[mode])
    x = torch.randn(3, 8400, 8, dtype=torch.float64)
    assert x.shape[1] * 256 * 8 > 16 << 20
    with torch.no_grad():
        ext_out, ext_hidden = ext(x)
        ref_out, ref_hidden = ref(x)
    assert_close(ext_out, ref_out, 1e-10, "output")
    for a, b in zip(hidden_list(ext_hidden), hidden_list(ref_hidden)):
        assert_close(a, b, 1e-10, "state")


def test_double_backward_through_module():
    _, ext = make_pair("LSTM", input_size=2, hidden_size=3, bidirectional=True, proj_size=2)
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 2, 2, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True)

    def fn(x, h0, c0):
        out, (h, c) = ext(x, (h0, c0))
        return out, h, c

    assert torch.autograd.gradgradcheck(fn, (x, h0, c0))


# -------------------------------------------------------------------------------------- dropout

@pytest.mark.parametrize("mode", list(MODES))
def test_dropout(mode):
    ref, ext = make_pair(mode, input_size=I, hidden_size=H, num_layers=3, dropout=0.5,
                         bidirectional=True)
    x = torch.randn(T, B, I, dtype=torch.float64)
    ref.eval()
    ext.eval()
    eval_out, eval_h = ext(x)
    ref_out, ref_h = ref(x)
    assert_close(eval_out, ref_out, 1e-10, "eval output")
    assert_close(hidden_list(eval_h)[0], hidden_list(ref_h)[0], 1e-10, "eval h_n")
    torch.manual_seed(7)
    assert torch.equal(ext(x)[0], eval_out)  # eval ignores the seed

    ext.train()
    torch.manual_seed(1)
    a, ha = ext(x)
    torch.manual_seed(1)
    b, hb = ext(x)
    torch.manual_seed(2)
    c, _ = ext(x)
    assert torch.equal(a, b)
    assert torch.equal(hidden_list(ha)[0], hidden_list(hb)[0])
    assert not torch.allclose(a, eval_out)
    assert not torch.allclose(a, c)
    # dropout sits between layers only: the first layer's final states are unaffected
    D = 2
    assert_close(hidden_list(ha)[0][:D], hidden_list(eval_h)[0][:D], 1e-12, "layer-0 h_n")
    # same mask as torch.nn's native implementation for the same seed (same RNG use)
    ref.train()
    torch.manual_seed(1)
    r, _ = ref(x)
    assert_close(a, r, 1e-10, "train output vs torch.nn")


@pytest.mark.parametrize("mode", list(MODES))
def test_dropout_one_zeroes_inputs_of_later_layers(mode):
    """With p=1 every layer after the first sees zeros: the output equals a one-layer module
    with the last layer's weights run on a zero input."""
    ref, ext = make_pair(mode, input_size=I, hidden_size=H, num_layers=2, dropout=1.0)
    ext.train()
    x = torch.randn(T, B, I, dtype=torch.float64)
    out, _ = ext(x)
    ref_cls, _, extra, _ = MODES[mode]
    last = ref_cls(H, H, **extra).double()
    last.load_state_dict({k.replace("_l1", "_l0"): v for k, v in ref.state_dict().items()
                          if "_l1" in k}, strict=True)
    expected, _ = last(torch.zeros(T, B, H, dtype=torch.float64))
    assert_close(out, expected, 1e-10, "output with dropout=1")


@pytest.mark.parametrize("mode", list(MODES))
def test_dropout_with_one_layer_warns(mode):
    ref_cls, ext_cls, extra, _ = MODES[mode]
    with pytest.warns(UserWarning, match="dropout") as ref_record:
        ref_cls(I, H, num_layers=1, dropout=0.5, **extra)
    with pytest.warns(UserWarning, match="dropout") as ext_record:
        ext_cls(I, H, num_layers=1, dropout=0.5, **extra)
    assert [str(w.message) for w in ext_record] == [str(w.message) for w in ref_record]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ext_cls(I, H, num_layers=2, dropout=0.5, **extra)


# --------------------------------------------------------------------------- constructor contract

CONSTRUCTOR_CONFIGS = [
    ("RNN_TANH", dict(num_layers=2, bidirectional=True)),
    ("RNN_RELU", dict(num_layers=1, bias=False)),
    ("LSTM", dict(num_layers=2, bidirectional=True, proj_size=2)),
    ("LSTM", dict(num_layers=3, bias=False, batch_first=True)),
    ("GRU", dict(num_layers=2, bidirectional=True, bias=False)),
]


@pytest.mark.parametrize("mode,kwargs", CONSTRUCTOR_CONFIGS)
def test_parameters_match_torch_nn(mode, kwargs):
    ref_cls, ext_cls, extra, _ = MODES[mode]
    torch.manual_seed(3)
    ref = ref_cls(I, H, **extra, **kwargs)
    torch.manual_seed(3)
    ext = ext_cls(I, H, **extra, **kwargs)
    assert isinstance(ext, nn.RNNBase)
    assert ext.mode == ref.mode
    ref_named = [(n, p.shape) for n, p in ref.named_parameters()]
    ext_named = [(n, p.shape) for n, p in ext.named_parameters()]
    assert ext_named == ref_named
    # same initialisation from the same seed: U(-1/sqrt(H), 1/sqrt(H))
    for (n, a), (_, b) in zip(ext.named_parameters(), ref.named_parameters()):
        assert torch.equal(a, b), n
        assert a.abs().max() <= H ** -0.5
    for attr in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                 "bidirectional", "proj_size"):
        assert getattr(ext, attr) == getattr(ref, attr), attr
    assert [[w.shape for w in ws] for ws in ext.all_weights] == \
        [[w.shape for w in ws] for ws in ref.all_weights]
    # all_weights holds the module's own parameters, layer by layer
    params = dict(ext.named_parameters())
    for ws, names in zip(ext.all_weights, ext._all_weights):
        assert [id(w) for w in ws] == [id(params[n]) for n in names]
    ext.flatten_parameters()  # exists, works (a no-op on the CPU)


@pytest.mark.parametrize("mode,kwargs", CONSTRUCTOR_CONFIGS)
def test_state_dicts_load_both_ways(mode, kwargs):
    ref_cls, ext_cls, extra, _ = MODES[mode]
    ref = ref_cls(I, H, **extra, **kwargs).double()
    ext = ext_cls(I, H, **extra, **kwargs).double()
    ref.load_state_dict(ext.state_dict(), strict=True)  # rnn_ext -> torch.nn
    x = torch.randn(T, B, I, dtype=torch.float64)
    if kwargs.get("batch_first"):
        x = x.transpose(0, 1)
    assert_close(ext(x)[0], ref(x)[0], 1e-10, "after loading rnn_ext's state into torch.nn")
    ref2 = ref_cls(I, H, **extra, **kwargs).double()
    ext.load_state_dict(ref2.state_dict(), strict=True)  # torch.nn -> rnn_ext
    assert_close(ext(x)[0], ref2(x)[0], 1e-10, "after loading torch.nn's state into rnn_ext")
    ext.flatten_parameters()
    assert_close(ext(x)[0], ref2(x)[0], 1e-10, "after flatten_parameters")
    assert list(ext.state_dict()) == list(ref2.state_dict())


def test_parameter_replacement_is_used():
    """Assigning a new Parameter (as some users do) changes what forward computes."""
    ref, ext = make_pair("GRU", input_size=I, hidden_size=H)
    new = nn.Parameter(torch.randn_like(ref.weight_hh_l0))
    ref.weight_hh_l0 = new
    ext.weight_hh_l0 = nn.Parameter(new.detach().clone())
    x = torch.randn(T, B, I, dtype=torch.float64)
    assert_close(ext(x)[0], ref(x)[0], 1e-10, "after replacing weight_hh_l0")


def test_isinstance():
    # nn.RNNBase, not nn.RNN/LSTM/GRU: Dynamo refuses instances of those three (see modules.py).
    for layer in (rnn_ext.LSTM(I, H), rnn_ext.GRU(I, H), rnn_ext.RNN(I, H)):
        assert isinstance(layer, nn.RNNBase)
        assert not isinstance(layer, (nn.RNN, nn.LSTM, nn.GRU))
    assert rnn_ext.RNN(I, H, nonlinearity="relu").mode == "RNN_RELU"
    assert rnn_ext.RNN(I, H, 1, "relu").nonlinearity == "relu"


CONSTRUCTOR_ERRORS = [
    ("LSTM", dict(proj_size=H)),
    ("LSTM", dict(proj_size=H + 1)),
    ("LSTM", dict(proj_size=-1)),
    ("GRU", dict(proj_size=2)),
    ("RNN_TANH", dict(proj_size=2)),
    ("LSTM", dict(dropout=1.5)),
    ("GRU", dict(dropout=-0.1)),
    ("RNN_TANH", dict(dropout=True)),
    ("LSTM", dict(dropout="0.5")),
    ("RNN_SIGMOID", dict(nonlinearity="sigmoid")),
    ("GRU", dict(hidden_size=0)),
    ("LSTM", dict(num_layers=0)),
    ("RNN_TANH", dict(input_size=0)),
    ("LSTM", dict(hidden_size=4.0)),
    ("GRU", dict(bias=1)),
    ("LSTM", dict(batch_first="yes")),
]


@pytest.mark.parametrize("mode,kwargs", CONSTRUCTOR_ERRORS,
                         ids=[f"{m}-{k}" for m, k in CONSTRUCTOR_ERRORS])
def test_constructor_errors_match_torch_nn(mode, kwargs):
    if mode == "RNN_SIGMOID":
        ref_cls, ext_cls, extra = nn.RNN, rnn_ext.RNN, {}
    else:
        ref_cls, ext_cls, extra, _ = MODES[mode]
    args = dict(input_size=I, hidden_size=H, **extra)
    args.update(kwargs)
    with pytest.raises(Exception) as ref_error:
        ref_cls(**args)
    with pytest.raises(Exception) as ext_error:
        ext_cls(**args)
    assert ext_error.type is ref_error.type
    assert str(ext_error.value) == str(ref_error.value)


# ----------------------------------------------------------------------------- forward errors

def _both_raise(ref, ext, *args, same_message=True):
    with pytest.raises(Exception) as ref_error:
        ref(*args)
    with pytest.raises(Exception) as ext_error:
        ext(*args)
    assert ext_error.type is ref_error.type, (ext_error.value, ref_error.value)
    if same_message:
        assert str(ext_error.value) == str(ref_error.value)
    return ext_error.value


@pytest.mark.parametrize("mode", list(MODES))
def test_input_dims_error_matches_torch_nn(mode):
    ref, ext = make_pair(mode, dtype=torch.float32, input_size=I, hidden_size=H)
    for bad in (torch.randn(2, T, B, I), torch.randn(I)):
        error = _both_raise(ref, ext, bad)
        assert isinstance(error, ValueError)


@pytest.mark.parametrize("mode", list(MODES))
def test_forward_errors_match_torch_nn(mode):
    ref, ext = make_pair(mode, dtype=torch.float32, input_size=I, hidden_size=H, num_layers=2)
    lstm = mode == "LSTM"

    def state(*shape, dtype=torch.float32):
        h = torch.zeros(*shape, dtype=dtype)
        return (h, torch.zeros(*shape, dtype=dtype)) if lstm else h

    x = torch.randn(T, B, I)
    _both_raise(ref, ext, torch.randn(T, B, I + 2))                   # wrong input size
    _both_raise(ref, ext, torch.randn(T, I + 1))                      # unbatched wrong size
    _both_raise(ref, ext, x, state(2, B + 1, H))                      # wrong h0 batch
    _both_raise(ref, ext, x, state(3, B, H))                          # wrong h0 layers
    _both_raise(ref, ext, x, state(2, B, H + 1))                      # wrong h0 size
    _both_raise(ref, ext, x, state(2, H))                             # 2-D hx for 3-D input
    _both_raise(ref, ext, torch.randn(T, I), state(2, 1, H))          # 3-D hx for 2-D input
    _both_raise(ref, ext, torch.randn(T, I), state(2, H + 1))         # unbatched wrong size
    _both_raise(ref, ext, x.double())                                 # float64 into float32
    _both_raise(ref, ext, x.double(), state(2, B, H, dtype=torch.float64))
    # zero-length sequence
    error = _both_raise(ref, ext, torch.randn(0, B, I), same_message=False)
    assert "sequence length" in str(error)
    if lstm:
        h, c = state(2, B, H)
        _both_raise(ref, ext, x, (h, torch.zeros(2, B, H + 1)))      # wrong c0 shape
        _both_raise(ref, ext, x, (h, torch.zeros(2, H)))             # c0 2-D only
    # packed with a wrong h0 batch
    packed = pack_padded_sequence(x, [T, 3, 2], enforce_sorted=True)
    _both_raise(ref, ext, packed, state(2, B + 1, H), same_message=False)


def test_lstm_proj_forward_errors():
    ref, ext = make_pair("LSTM", dtype=torch.float32, input_size=I, hidden_size=H, proj_size=2)
    x = torch.randn(T, B, I)
    # h0 must have proj_size columns, c0 hidden_size
    _both_raise(ref, ext, x, (torch.zeros(1, B, H), torch.zeros(1, B, H)))
    _both_raise(ref, ext, x, (torch.zeros(1, B, 2), torch.zeros(1, B, 2)))


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("mode", list(MODES))
def test_zero_batch(mode, batch_first):
    proj = 2 if mode == "LSTM" else 0
    ref, ext = make_pair(mode, input_size=I, hidden_size=H, num_layers=2, bidirectional=True,
                         batch_first=batch_first, **({"proj_size": proj} if proj else {}))
    x = torch.randn(0, T, I) if batch_first else torch.randn(T, 0, I)
    x = x.double()
    ref_out, ref_hidden = ref(x)
    ext_out, ext_hidden = ext(x)
    assert ext_out.shape == ref_out.shape
    assert ext_out.numel() == 0
    for a, b in zip(hidden_list(ext_hidden), hidden_list(ref_hidden)):
        assert a.shape == b.shape
        assert a.numel() == 0


# ------------------------------------------------------------------- float32 / bfloat16 parity

REALISTIC = [("RNN_TANH", 0), ("RNN_RELU", 0), ("LSTM", 0), ("LSTM", 64), ("GRU", 0)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode,proj", REALISTIC)
def test_float32_parity_realistic(mode, proj, device):
    Tr, Br, Ir, Hr = 20, 16, 64, 128
    kwargs = dict(input_size=Ir, hidden_size=Hr, num_layers=2, bidirectional=True)
    if proj:
        kwargs["proj_size"] = proj
    ref, ext = make_pair(mode, dtype=torch.float32, device=device, **kwargs)
    if mode == "RNN_RELU":  # keep the relu recurrence from blowing up over 20 steps
        with torch.no_grad():
            for m in (ref, ext):
                for n, p in m.named_parameters():
                    if "weight_hh" in n:
                        p.mul_(0.5)
    torch.manual_seed(5)
    x = torch.randn(Tr, Br, Ir, device=device, requires_grad=True)
    out_size = proj or Hr
    h0 = torch.randn(4, Br, out_size, device=device, requires_grad=True)
    leaves = [x, h0]
    hx = h0
    if mode == "LSTM":
        c0 = torch.randn(4, Br, Hr, device=device, requires_grad=True)
        leaves.append(c0)
        hx = (h0, c0)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # cuDNN's TF32 on GPUs
        ref_out, ref_h = ref(x, hx)
    ext_out, ext_h = ext(x, hx)
    assert_close(ext_out, ref_out, 1e-4, "output")
    for a, b in zip(hidden_list(ext_h), hidden_list(ref_h)):
        assert_close(a, b, 1e-4, "state")
    w = torch.randn_like(ref_out)
    vs = [torch.randn_like(s) for s in hidden_list(ref_h)]

    def loss(out, hidden):
        return (out * w).sum() + sum((s * v).sum() for s, v in zip(hidden_list(hidden), vs))

    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        ref_grads = torch.autograd.grad(loss(ref_out, ref_h), leaves + list(ref.parameters()))
    ext_grads = torch.autograd.grad(loss(ext_out, ext_h), leaves + list(ext.parameters()))
    names = ["input", "h0", "c0"][:len(leaves)] + [n for n, _ in ref.named_parameters()]
    for name, a, b in zip(names, ext_grads, ref_grads):
        assert rel_err(a, b) < 1e-3, (name, rel_err(a, b))
        scale = float(b.abs().max())
        assert float((a - b).abs().max()) <= 1e-3 * max(scale, 1.0), name


@pytest.mark.parametrize("mode", list(MODES))
def test_bfloat16_forward_against_float32(mode):
    """bfloat16 on the CPU (computed in float32 inside the kernels) against torch.nn in float32
    on the same bfloat16-representable weights and inputs."""
    kwargs = dict(input_size=16, hidden_size=32, num_layers=2, bidirectional=True)
    ref, ext = make_pair(mode, dtype=torch.float32, **kwargs)
    ext = ext.to(torch.bfloat16)
    ref.load_state_dict({k: v.float() for k, v in ext.state_dict().items()}, strict=True)
    torch.manual_seed(6)
    x = torch.randn(10, 4, 16).to(torch.bfloat16)
    h0 = (0.5 * torch.randn(4, 4, 32)).to(torch.bfloat16)
    hx = (h0, h0) if mode == "LSTM" else h0
    ext_out, ext_h = ext(x, hx)
    assert ext_out.dtype == torch.bfloat16
    node = autograd_node(MODES[mode][3])
    assert node in "".join(graph_node_names(ext_out)) or not ext_out.requires_grad
    hx32 = tuple(h.float() for h in hx) if mode == "LSTM" else hx.float()
    ref_out, ref_h = ref(x.float(), hx32)
    assert_close(ext_out.float(), ref_out, 5e-2, "bfloat16 output")
    for a, b in zip(hidden_list(ext_h), hidden_list(ref_h)):
        assert a.dtype == torch.bfloat16
        assert_close(a.float(), b, 5e-2, "bfloat16 state")


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
def test_bfloat16_backward_runs_and_is_close(mode):
    kwargs = dict(input_size=8, hidden_size=16)
    ref, ext = make_pair(mode, dtype=torch.float32, **kwargs)
    ext = ext.to(torch.bfloat16)
    ref.load_state_dict({k: v.float() for k, v in ext.state_dict().items()}, strict=True)
    x = torch.randn(6, 4, 8).to(torch.bfloat16)
    x32 = x.float().requires_grad_(True)
    x16 = x.clone().requires_grad_(True)
    ext(x16)[0].sum().backward()
    ref(x32)[0].sum().backward()
    assert x16.grad.dtype == torch.bfloat16
    assert rel_err(x16.grad, x32.grad) < 5e-2
    for (n, a), (_, b) in zip(ext.named_parameters(), ref.named_parameters()):
        assert a.grad.dtype == torch.bfloat16
        assert rel_err(a.grad, b.grad) < 5e-2, n


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
def test_parallel_rows(mode):
    """A batch large enough that the CPU pointwise kernels split their rows over threads
    (grain: 32768 gate values per task) gives torch.nn's results, forward and backward."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        # hidden 64: at least 2 tasks of rows for every cell (RNN 512 rows per task)
        ref, ext = make_pair(mode, input_size=8, hidden_size=64)
        x = torch.randn(2, 1100, 8, dtype=torch.float64, requires_grad=True)
        ext_out, _ = ext(x)
        ref_out, _ = ref(x)
        assert_close(ext_out, ref_out, 1e-10, "output")
        w = torch.randn_like(ref_out)
        got = torch.autograd.grad((ext_out * w).sum(), [x, *ext.parameters()])
        want = torch.autograd.grad((ref_out * w).sum(), [x, *ref.parameters()])
        for a, b in zip(got, want):
            assert_close(a, b, 1e-10, "grad")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("batch", [32, 30], ids=["split_by_rows", "split_by_units"])
@pytest.mark.parametrize("mode", list(MODES))
def test_steps_on_two_threads(mode, batch, dtype):
    """The CPU's multi-threaded steps, forward and backward, in both of their work splits (a
    batch of 2 x 16 rows runs each half as its own sequence where w_hh fits a core's cache;
    30 rows split the hidden units in float32, with a barrier per step), over a packed,
    bidirectional input whose later steps shrink the batch (those run unfused) and whose
    reverse direction joins states: outputs and gradients match torch.nn's (in float32 for a
    bfloat16 layer, on the same bfloat16 values)."""
    tol = {torch.float32: 2e-5, torch.float64: 1e-10, torch.bfloat16: 5e-2}[dtype]
    ref_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        # H = 192: every step's GEMM is past the size that runs on one thread
        ref, ext = make_pair(mode, dtype=ref_dtype, input_size=24, hidden_size=192,
                             bidirectional=True)
        ext = ext.to(dtype)
        ref.load_state_dict({k: v.to(ref_dtype) for k, v in ext.state_dict().items()})
        torch.manual_seed(1)
        lengths = [7] * (batch - 4) + [5, 4, 2, 1]
        x = torch.randn(7, batch, 24).to(dtype)
        ext_out, ext_h = ext(pack_padded_sequence(x, lengths))
        ref_out, ref_h = ref(pack_padded_sequence(x.to(ref_dtype), lengths))
        assert ext_out.data.dtype == dtype
        assert_close(ext_out.data.to(ref_dtype), ref_out.data, tol, "output")
        for a, b in zip(hidden_list(ext_h), hidden_list(ref_h)):
            assert_close(a.to(ref_dtype), b, tol, "state")
        w = torch.randn_like(ref_out.data)
        got = torch.autograd.grad((ext_out.data * w.to(dtype)).sum(), list(ext.parameters()))
        want = torch.autograd.grad((ref_out.data * w).sum(), list(ref.parameters()))
        for a, b in zip(got, want):
            assert rel_err(a, b) < tol
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------- non-contiguous inputs

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", list(MODES))
def test_non_contiguous_inputs_and_states(mode, device):
    lstm = mode == "LSTM"
    proj = 2 if lstm else 0
    out_size = proj or H
    ref, ext = make_pair(mode, device=device, input_size=I, hidden_size=H, num_layers=2,
                         bidirectional=True, batch_first=True,
                         **({"proj_size": proj} if proj else {}))
    base = torch.randn(T, B, I, dtype=torch.float64, device=device)
    x = base.transpose(0, 1)                                             # [B, T, I] view
    assert not x.is_contiguous()
    big_h = torch.randn(4, B, 2 * out_size + 1, dtype=torch.float64, device=device)
    h0 = big_h[:, :, 1::2]                                               # strided slice
    assert not h0.is_contiguous()
    hx = h0
    if lstm:
        c0 = torch.randn(H, B, 4, dtype=torch.float64, device=device).permute(2, 1, 0)
        assert not c0.is_contiguous()
        hx = (h0, c0)
    leaves_ext = [t.detach().clone().requires_grad_(True) for t in (base, big_h)]
    leaves_ref = [t.detach().clone().requires_grad_(True) for t in (base, big_h)]

    def call(module, leaves):
        xb, hb = leaves
        h = hb[:, :, 1::2]
        state = (h, c0) if lstm else h
        out, hidden = module(xb.transpose(0, 1), state)
        return out, hidden_list(hidden)

    ext_out, ext_states = call(ext, leaves_ext)
    ref_out, ref_states = call(ref, leaves_ref)
    assert_close(ext_out, ref_out, 1e-10, "output")
    for a, b in zip(ext_states, ref_states):
        assert_close(a, b, 1e-10, "state")
    # and equal to the contiguous call
    contiguous_state = tuple(t.contiguous() for t in hx) if lstm else hx.contiguous()
    out_c, _ = ext(x.contiguous(), contiguous_state)
    assert_close(ext_out, out_c, 0.0, "non-contiguous vs contiguous")
    (ext_out.sum() + ext_states[0].sum()).backward()
    (ref_out.sum() + ref_states[0].sum()).backward()
    for a, b in zip(leaves_ext, leaves_ref):
        assert_close(a.grad, b.grad, 1e-10, "grad")


# --------------------------------------------------------------------------------- raw layer ops

LAYER_KINDS = [
    # (kind, bias, proj)
    ("tanh", True, False),
    ("relu", True, False),
    ("tanh", False, False),
    ("lstm", True, False),
    ("lstm", False, False),
    ("lstm", True, True),
    ("lstm", False, True),
    ("gru", True, False),
    ("gru", False, False),
]
GATES = {"tanh": 1, "relu": 1, "lstm": 4, "gru": 3}
REF_MODE = {"tanh": "RNN_TANH", "relu": "RNN_RELU", "lstm": "LSTM", "gru": "GRU"}
BATCH_SIZES = {"uniform": [3, 3, 3], "packed": [3, 3, 2, 1]}
OP_H, OP_P = 3, 2


def kind_id(case):
    kind, bias, proj = case
    return f"{kind}{'-bias' if bias else '-nobias'}{'-proj' if proj else ''}"


def layer_inputs(kind, bias, proj, batch_sizes, seed=0, dtype=torch.float64, device="cpu"):
    """The differentiable inputs of a layer op: dict of xg, w_hh, b_hh, w_hr, h0, c0."""
    g = torch.Generator().manual_seed(seed)
    G = GATES[kind]
    Bn, N = int(batch_sizes[0]), int(batch_sizes.sum())
    out = OP_P if proj else OP_H

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(
            device=device, dtype=dtype)

    return {
        "xg": rand(N, G * OP_H),
        "w_hh": rand(G * OP_H, out, scale=0.6),
        "b_hh": rand(G * OP_H) if bias else None,
        "w_hr": rand(out, OP_H, scale=0.6) if proj else None,
        "h0": rand(Bn, out),
        "c0": rand(Bn, OP_H) if kind == "lstm" else None,
    }


def call_forward(kind, t, batch_sizes, reverse, save=True):
    """The layer op's differentiable outputs (workspace left out): y, h_n (, c_n)."""
    if kind in ("tanh", "relu"):
        return tuple(ops.rnn_recurrence(t["xg"], t["w_hh"], t["b_hh"], t["h0"], batch_sizes,
                                           reverse, kind))
    if kind == "lstm":
        return tuple(ops.lstm_recurrence(t["xg"], t["w_hh"], t["b_hh"], t["w_hr"], t["h0"],
                                            t["c0"], batch_sizes, reverse, save)[:3])
    return tuple(ops.gru_recurrence(t["xg"], t["w_hh"], t["b_hh"], t["h0"], batch_sizes,
                                       reverse, save)[:2])


NAMES = ("xg", "w_hh", "b_hh", "w_hr", "h0", "c0")


def as_function(kind, batch_sizes, reverse, present):
    def fn(*tensors):
        t = dict(zip(present, tensors))
        return call_forward(kind, {n: t.get(n) for n in NAMES}, batch_sizes, reverse)
    return fn


@pytest.mark.parametrize("bs_name", list(BATCH_SIZES))
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("case", LAYER_KINDS, ids=kind_id)
def test_layer_op_gradcheck(case, reverse, bs_name):
    kind, bias, proj = case
    batch_sizes = torch.tensor(BATCH_SIZES[bs_name])
    t = layer_inputs(kind, bias, proj, batch_sizes)
    present = [n for n in NAMES if t[n] is not None]
    inputs = tuple(t[n].requires_grad_(True) for n in present)
    fn = as_function(kind, batch_sizes, reverse, present)
    # first order: the fused backward op (no create_graph)
    assert torch.autograd.gradcheck(fn, inputs)
    # second order: the differentiable reference formulas
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("case", [c for c in LAYER_KINDS if c[1]], ids=kind_id)
def test_layer_op_full_gradgradcheck(case, reverse):
    """Slow-mode double backward on the packed batch (the uniform one is in fast mode above)."""
    kind, bias, proj = case
    batch_sizes = torch.tensor([3, 2, 1])
    t = layer_inputs(kind, bias, proj, batch_sizes, seed=1)
    present = [n for n in NAMES if t[n] is not None]
    inputs = tuple(t[n].requires_grad_(True) for n in present)
    assert torch.autograd.gradgradcheck(as_function(kind, batch_sizes, reverse, present), inputs)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("case", LAYER_KINDS, ids=kind_id)
def test_differentiable_backward_matches_fused_backward(case, reverse):
    """differentiable_backward (the layer ops' backward under create_graph) gives the fused
    backward op's gradients, as a graph; an empty tensor for an absent input."""
    kind, bias, proj = case
    batch_sizes = torch.tensor([3, 2, 2, 1])
    t = layer_inputs(kind, bias, proj, batch_sizes, seed=2)
    present = [n for n in NAMES if t[n] is not None]
    for n in present:
        t[n].requires_grad_(True)
    outputs = call_forward(kind, t, batch_sizes, reverse)
    grads = [torch.randn_like(o) for o in outputs]
    fused = dict(zip(present, torch.autograd.grad(outputs, [t[n] for n in present], grads)))
    names = [n for n in NAMES if kind == "lstm" or n not in ("w_hr", "c0")]
    mode = {"tanh": "RNN_TANH", "relu": "RNN_RELU"}.get(kind, kind.upper())
    found = ops.differentiable_backward("recurrence", mode, [t[n] for n in names], grads,
                                        batch_sizes, reverse)
    for name, got in zip(names, found, strict=True):
        if t[name] is None:
            assert got.numel() == 0, name
        else:
            assert got.requires_grad, name
            torch.testing.assert_close(got, fused[name], atol=1e-10, rtol=1e-10, msg=name)


def call_backward(kind, t, y, workspace, gy, gh, gc, batch_sizes, reverse):
    """The layer backward op, its results by the name of the input they belong to."""
    if kind in ("tanh", "relu"):
        got = ops.rnn_recurrence_backward(gy, gh, t["w_hh"], t["h0"], y, batch_sizes, reverse, kind)
        return dict(zip(["xg", "w_hh", "b_hh", "h0"], got))
    if kind == "lstm":
        got = ops.lstm_recurrence_backward(gy, gh, gc, t["w_hh"], t["w_hr"], t["h0"], y, workspace,
                                      batch_sizes, reverse)
        return dict(zip(["xg", "w_hh", "b_hh", "h0", "c0", "w_hr"], got))
    got = ops.gru_recurrence_backward(gy, gh, t["w_hh"], t["h0"], y, workspace, batch_sizes, reverse)
    return dict(zip(["xg", "w_hh", "b_hh", "h0"], got))


@pytest.mark.parametrize("case", LAYER_KINDS, ids=kind_id)
def test_layer_backward_ops_accept_inputs_that_require_grad(case):
    """The backward ops are public ops: called directly in grad mode on tensors that require
    grad (e.g. the module's own weights), they must compute the same values as on detached
    tensors instead of raising from an out= ATen call inside the kernel."""
    kind, bias, proj = case
    batch_sizes = torch.tensor([3, 3, 2, 1])
    t = layer_inputs(kind, bias, proj, batch_sizes, seed=5)
    with torch.no_grad():
        outs = call_forward(kind, t, batch_sizes, False)
        workspace = None
        if kind == "lstm":
            workspace = ops.lstm_recurrence(t["xg"], t["w_hh"], t["b_hh"], t["w_hr"],
                                               t["h0"], t["c0"], batch_sizes, False, True)[3]
        elif kind == "gru":
            workspace = ops.gru_recurrence(t["xg"], t["w_hh"], t["b_hh"], t["h0"],
                                              batch_sizes, False, True)[2]
    grads = [torch.randn_like(o) for o in outs] + [None] * (3 - len(outs))
    want = call_backward(kind, t, outs[0], workspace, *grads, batch_sizes, False)
    leaves = {n: None if v is None else v.clone().requires_grad_(True) for n, v in t.items()}
    got = call_backward(kind, leaves, outs[0], workspace, *grads, batch_sizes, False)
    for name in want:
        assert_close(got[name].detach(), want[name], 1e-12, f"grad {name}")


@pytest.mark.parametrize("bs", [[3, 3, 2, 1], [3, 1, 0], [2], [3, 3, 3]],
                         ids=["packed", "trailing-zero", "one-step", "uniform"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("case", LAYER_KINDS, ids=kind_id)
def test_layer_ops_against_reference(case, reverse, bs):
    """Forward op vs reference.layer_recurrence; backward op (called directly) vs autograd
    through reference.layer_recurrence."""
    kind, bias, proj = case
    batch_sizes = torch.tensor(bs)
    t = layer_inputs(kind, bias, proj, batch_sizes, seed=2)
    for v in t.values():
        if v is not None:
            v.requires_grad_(True)
    lstm, gru = kind == "lstm", kind == "gru"

    with torch.no_grad():
        if kind in ("tanh", "relu"):
            y, h_n = ops.rnn_recurrence(t["xg"], t["w_hh"], t["b_hh"], t["h0"], batch_sizes,
                                           reverse, kind)
            c_n = workspace = None
        elif lstm:
            y, h_n, c_n, workspace = ops.lstm_recurrence(
                t["xg"], t["w_hh"], t["b_hh"], t["w_hr"], t["h0"], t["c0"], batch_sizes,
                reverse, True)
            assert workspace.shape == (int(batch_sizes.sum()), 5 * OP_H)
        else:
            y, h_n, workspace = ops.gru_recurrence(t["xg"], t["w_hh"], t["b_hh"], t["h0"],
                                                      batch_sizes, reverse, True)
            c_n = None
            assert workspace.shape == (int(batch_sizes.sum()), 5 * OP_H)

    ry, rh, rc = reference.layer_recurrence(REF_MODE[kind], t["xg"], t["w_hh"], t["b_hh"],
                                            t["w_hr"], t["h0"], t["c0"], batch_sizes, reverse)
    assert_close(y, ry.detach(), 1e-12, "y")
    assert_close(h_n, rh.detach(), 1e-12, "h_n")
    if lstm:
        assert_close(c_n, rc.detach(), 1e-12, "c_n")

    g = torch.Generator().manual_seed(9)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    gh = torch.randn(h_n.shape, generator=g, dtype=torch.float64)
    gc = torch.randn(c_n.shape, generator=g, dtype=torch.float64) if lstm else None

    wrt = [n for n in NAMES if t[n] is not None]
    outs = [ry, rh] + ([rc] if lstm else [])
    grads = [gy, gh] + ([gc] if lstm else [])
    expected = dict(zip(wrt, torch.autograd.grad(outs, [t[n] for n in wrt], grads)))

    got = call_backward(kind, {n: None if v is None else v.detach() for n, v in t.items()},
                        y, workspace, gy, gh, gc, batch_sizes, reverse)
    if lstm and not proj:
        assert got["w_hr"].numel() == 0
    assert got["b_hh"].shape == (GATES[kind] * OP_H,)
    if not gru:
        # RNN / LSTM: the gradient of the hidden-side bias is the gate gradient's column sum
        assert_close(got["b_hh"], got["xg"].sum(0), 1e-12, "b_hh vs xg")
    for name in wrt:
        assert_close(got[name], expected[name], 1e-10, f"grad {name}")


# opcheck: schema, autograd registration, fake tensors, AOT dispatch.

@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("case", LAYER_KINDS, ids=kind_id)
def test_opcheck_layer_forward(case, reverse):
    kind, bias, proj = case
    batch_sizes = torch.tensor([3, 3, 2, 1])
    for requires_grad, save in ((True, True), (False, False)):
        t = layer_inputs(kind, bias, proj, batch_sizes)
        if requires_grad:
            for v in t.values():
                if v is not None:
                    v.requires_grad_(True)
        if kind in ("tanh", "relu"):
            op, args = ops.rnn_recurrence.default, (
                t["xg"], t["w_hh"], t["b_hh"], t["h0"], batch_sizes, reverse, kind)
        elif kind == "lstm":
            op, args = ops.lstm_recurrence.default, (
                t["xg"], t["w_hh"], t["b_hh"], t["w_hr"], t["h0"], t["c0"], batch_sizes,
                reverse, save)
        else:
            op, args = ops.gru_recurrence.default, (
                t["xg"], t["w_hh"], t["b_hh"], t["h0"], batch_sizes, reverse, save)
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("case", LAYER_KINDS, ids=kind_id)
def test_opcheck_layer_backward(case, reverse):
    kind, bias, proj = case
    batch_sizes = torch.tensor([3, 3, 2, 1])
    t = layer_inputs(kind, bias, proj, batch_sizes)
    g = torch.Generator().manual_seed(4)
    if kind in ("tanh", "relu"):
        y, h_n = ops.rnn_recurrence(t["xg"], t["w_hh"], t["b_hh"], t["h0"], batch_sizes,
                                       reverse, kind)
        args = (torch.randn(y.shape, generator=g, dtype=y.dtype),
                torch.randn(h_n.shape, generator=g, dtype=y.dtype),
                t["w_hh"], t["h0"], y, batch_sizes, reverse, kind)
        torch.library.opcheck(ops.rnn_recurrence_backward.default, args)
    elif kind == "lstm":
        y, h_n, c_n, ws = ops.lstm_recurrence(t["xg"], t["w_hh"], t["b_hh"], t["w_hr"],
                                                 t["h0"], t["c0"], batch_sizes, reverse, True)
        args = (torch.randn(y.shape, generator=g, dtype=y.dtype),
                torch.randn(h_n.shape, generator=g, dtype=y.dtype),
                torch.randn(c_n.shape, generator=g, dtype=y.dtype),
                t["w_hh"], t["w_hr"], t["h0"], y, ws, batch_sizes, reverse)
        torch.library.opcheck(ops.lstm_recurrence_backward.default, args)
    else:
        y, h_n, ws = ops.gru_recurrence(t["xg"], t["w_hh"], t["b_hh"], t["h0"], batch_sizes,
                                           reverse, True)
        args = (torch.randn(y.shape, generator=g, dtype=y.dtype),
                torch.randn(h_n.shape, generator=g, dtype=y.dtype),
                t["w_hh"], t["h0"], y, ws, batch_sizes, reverse)
        torch.library.opcheck(ops.gru_recurrence_backward.default, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", LAYER_KINDS, ids=kind_id)
def test_layer_ops_non_contiguous_arguments(case, device):
    """Strided views for every tensor argument give the same results as contiguous copies."""
    kind, bias, proj = case
    batch_sizes = torch.tensor([3, 3, 2, 1])
    t = layer_inputs(kind, bias, proj, batch_sizes, seed=3, device=device)

    def strided(v):
        if v is None:
            return None
        if v.dim() == 1:
            return torch.stack([v, torch.zeros_like(v)], 1)[:, 0]
        return v.t().contiguous().t()  # same values, column-major strides

    s = {n: strided(v) for n, v in t.items()}
    assert not s["xg"].is_contiguous() and not s["w_hh"].is_contiguous()
    for reverse in (False, True):
        want = call_forward(kind, t, batch_sizes, reverse)
        got = call_forward(kind, s, batch_sizes, reverse)
        for a, b in zip(got, want):
            assert_close(a, b, 1e-12, "forward with strided arguments")
        # backward with non-contiguous incoming gradients
        present = [n for n in NAMES if t[n] is not None]
        grads_c = None
        for args in (t, s):
            leaves = {n: args[n].detach().clone() if args[n].is_contiguous()
                      else strided(args[n].detach().contiguous()) for n in present}
            for v in leaves.values():
                v.requires_grad_(True)
            outs = call_forward(kind, {n: leaves.get(n) for n in NAMES}, batch_sizes, reverse)
            g = torch.Generator().manual_seed(11)
            gouts = [torch.randn(o.shape, generator=g, dtype=o.dtype).to(device) for o in outs]
            if args is s:
                gouts = [strided(x.contiguous()) for x in gouts]
            grads = torch.autograd.grad(outs, [leaves[n] for n in present], gouts)
            if grads_c is None:
                grads_c = grads
            else:
                for n, a, b in zip(present, grads, grads_c):
                    assert_close(a, b, 1e-12, f"grad {n} with strided arguments")


def inference_inputs(kind, bias, proj, batch_sizes, seed=3):
    """An inference op's arguments (reverse and nonlinearity aside) in schema order: those of
    layer_inputs, with x [N, 2], w_ih and b_ih in place of xg."""
    t = layer_inputs(kind, bias, proj, batch_sizes, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    G, N = GATES[kind], int(batch_sizes.sum())
    a = dict(x=torch.randn(N, 2, generator=g, dtype=torch.float64),
             w_ih=torch.randn(G * OP_H, 2, generator=g, dtype=torch.float64),
             b_ih=torch.randn(G * OP_H, generator=g, dtype=torch.float64) if bias else None,
             w_hh=t["w_hh"], b_hh=t["b_hh"])
    if kind == "lstm":
        a.update(w_hr=t["w_hr"], h0=t["h0"], c0=t["c0"])
    else:
        a["h0"] = t["h0"]
    a["batch_sizes"] = batch_sizes
    return a


def call_inference(kind, a, reverse):
    if kind in ("tanh", "relu"):
        return ops.rnn_layer_inference(*a.values(), reverse, kind)
    if kind == "lstm":
        return ops.lstm_layer_inference(*a.values(), reverse)
    return ops.gru_layer_inference(*a.values(), reverse)


@pytest.mark.parametrize("bs", [[3, 3, 2, 1], [3, 1, 0], [2], [3, 3, 3]],
                         ids=["packed", "trailing-zero", "one-step", "uniform"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("case", LAYER_KINDS, ids=kind_id)
def test_layer_inference_ops_against_forward_ops(case, reverse, bs):
    """*_layer_inference(x, w_ih, b_ih, ...) gives what *_recurrence gives on
    xg = x @ w_ihᵀ + b_ih (the inference op's pointwise step adds b_ih instead)."""
    kind, bias, proj = case
    a = inference_inputs(kind, bias, proj, torch.tensor(bs))
    got = call_inference(kind, a, reverse)
    t = {n: a.get(n) for n in NAMES if n != "xg"}
    t["xg"] = torch.nn.functional.linear(a["x"], a["w_ih"], a["b_ih"])
    want = call_forward(kind, t, a["batch_sizes"], reverse)
    assert len(got) == len(want)
    for name, g, w in zip(("y", "h_n", "c_n"), got, want):
        assert_close(g, w, 1e-12, name)


@pytest.mark.parametrize("kind", ["tanh", "lstm", "gru"])
def test_layer_inference_ops_have_no_backward(kind):
    a = inference_inputs(kind, True, False, torch.tensor([3, 3, 2, 1]))
    a["x"].requires_grad_(True)
    y = call_inference(kind, a, False)[0]
    with pytest.raises(RuntimeError, match=r"derivative for rnn_ext::\w+_layer_inference is not"):
        y.sum().backward()


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("case", LAYER_KINDS, ids=kind_id)
def test_opcheck_layer_inference(case, reverse):
    kind, bias, proj = case
    a = inference_inputs(kind, bias, proj, torch.tensor([3, 3, 2, 1]))
    op = {"tanh": ops.rnn_layer_inference, "relu": ops.rnn_layer_inference,
          "lstm": ops.lstm_layer_inference, "gru": ops.gru_layer_inference}[kind].default
    extra = (kind,) if kind in ("tanh", "relu") else ()
    torch.library.opcheck(op, (*a.values(), reverse, *extra))


# ------------------------------------------------------------------------ raw-op validation

def _valid_lstm():
    bs = torch.tensor([3, 3, 2, 1])
    t = layer_inputs("lstm", True, True, bs)
    return t, bs


def _lstm_fwd(**override):
    t, bs = _valid_lstm()
    args = dict(xg=t["xg"], w_hh=t["w_hh"], b_hh=t["b_hh"], w_hr=t["w_hr"], h0=t["h0"],
                c0=t["c0"], batch_sizes=bs, reverse=False, save_workspace=True)
    args.update(override)
    return lambda: ops.lstm_recurrence(*args.values())


def _rnn_fwd(**override):
    bs = torch.tensor([3, 3, 2, 1])
    t = layer_inputs("tanh", True, False, bs)
    args = dict(xg=t["xg"], w_hh=t["w_hh"], b_hh=t["b_hh"], h0=t["h0"], batch_sizes=bs,
                reverse=False, nonlinearity="tanh")
    args.update(override)
    return lambda: ops.rnn_recurrence(*args.values())


def _gru_fwd(**override):
    bs = torch.tensor([3, 3, 2, 1])
    t = layer_inputs("gru", True, False, bs)
    args = dict(xg=t["xg"], w_hh=t["w_hh"], b_hh=t["b_hh"], h0=t["h0"], batch_sizes=bs,
                reverse=False, save_workspace=True)
    args.update(override)
    return lambda: ops.gru_recurrence(*args.values())


def _inference(kind="lstm", **override):
    a = inference_inputs(kind, True, kind == "lstm", torch.tensor([3, 3, 2, 1]))
    a.update(override)
    return lambda: call_inference(kind, a, False)


def _inference_cases():
    a = inference_inputs("lstm", True, True, torch.tensor([3, 3, 2, 1]))
    return {
        "inference-w_ih-cols": (_inference(w_ih=a["w_ih"][:, :1]), "w_ih"),
        # x as wide as xg must not run as xg when w_ih is missing
        "inference-no-w_ih": (_inference("gru", x=torch.zeros(9, 9, dtype=torch.float64),
                                         w_ih=None), "w_ih is undefined"),
        "inference-w_ih-rows": (_inference(w_ih=a["w_ih"][:-1]), "w_ih"),
        "inference-b_ih-size": (_inference(b_ih=a["b_ih"][:-1]), "b_ih"),
        "inference-x-1d": (_inference(x=a["x"].flatten()), "x must have shape"),
        "inference-x-rows": (_inference(x=a["x"][:-1]), "sum"),
        "inference-dtype-w_ih": (_inference(w_ih=a["w_ih"].float()), "dtype"),
        "inference-dtype-b_ih": (_inference(b_ih=a["b_ih"].float()), "dtype"),
        "inference-int-x": (_inference(x=a["x"].long()), "floating"),
        "inference-c0-shape": (_inference(c0=a["c0"][:, :2]), "c0"),
        "inference-gru-w_ih-rows": (_inference("gru", w_ih=torch.zeros(6, 2, dtype=torch.float64)),
                                    "w_ih"),
        "inference-rnn-bad-nonlinearity": (
            lambda: ops.rnn_layer_inference(*inference_inputs("tanh", True, False, torch.tensor(
                [3, 3, 2, 1])).values(), False, "sigmoid"), "sigmoid"),
    }


def _backward_calls():
    bs = torch.tensor([3, 3, 2, 1])
    t = layer_inputs("lstm", True, True, bs)
    y, h_n, c_n, ws = ops.lstm_recurrence(t["xg"], t["w_hh"], t["b_hh"], t["w_hr"], t["h0"],
                                             t["c0"], bs, False, True)
    base = dict(grad_y=torch.ones_like(y), grad_h_n=torch.ones_like(h_n),
                grad_c_n=torch.ones_like(c_n), w_hh=t["w_hh"], w_hr=t["w_hr"], h0=t["h0"], y=y,
                workspace=ws, batch_sizes=bs, reverse=False)

    def lstm_bwd(**override):
        args = dict(base)
        args.update(override)
        return lambda: ops.lstm_recurrence_backward(*args.values())

    g = layer_inputs("gru", True, False, bs)
    gy, gh, gws = ops.gru_recurrence(g["xg"], g["w_hh"], g["b_hh"], g["h0"], bs, False, True)

    def gru_bwd(**override):
        args = dict(grad_y=torch.ones_like(gy), grad_h_n=torch.ones_like(gh), w_hh=g["w_hh"],
                    h0=g["h0"], y=gy, workspace=gws, batch_sizes=bs, reverse=False)
        args.update(override)
        return lambda: ops.gru_recurrence_backward(*args.values())

    r = layer_inputs("relu", True, False, bs)
    ry, rh = ops.rnn_recurrence(r["xg"], r["w_hh"], r["b_hh"], r["h0"], bs, False, "relu")

    def rnn_bwd(**override):
        args = dict(grad_y=torch.ones_like(ry), grad_h_n=torch.ones_like(rh), w_hh=r["w_hh"],
                    h0=r["h0"], y=ry, batch_sizes=bs, reverse=False, nonlinearity="relu")
        args.update(override)
        return lambda: ops.rnn_recurrence_backward(*args.values())

    return {
        "lstm_bwd-bad-workspace": (lstm_bwd(workspace=ws[:, :-1]), "workspace"),
        "lstm_bwd-no-workspace": (lstm_bwd(workspace=ws[:0]), "workspace"),
        "lstm_bwd-bad-grad_y": (lstm_bwd(grad_y=torch.ones(y.size(0) - 1, y.size(1),
                                                           dtype=y.dtype)), "grad_y"),
        "lstm_bwd-bad-grad_h_n": (lstm_bwd(grad_h_n=torch.ones(2, h_n.size(1), dtype=y.dtype)),
                                  "grad_h_n"),
        "lstm_bwd-bad-grad_c_n": (lstm_bwd(grad_c_n=torch.ones(3, 5, dtype=y.dtype)), "grad_c_n"),
        "lstm_bwd-bad-w_hr": (lstm_bwd(w_hr=t["w_hr"].t().contiguous()), "w_hr"),
        "lstm_bwd-missing-w_hr": (lstm_bwd(w_hr=None), "h0"),
        "lstm_bwd-float-grad": (lstm_bwd(grad_y=torch.ones_like(y).float()), "dtype"),
        "lstm_bwd-bad-batch_sizes": (lstm_bwd(batch_sizes=torch.tensor([3, 3, 2])),
                                     "batch_sizes"),
        "gru_bwd-bad-workspace": (gru_bwd(workspace=gws[:, :-1]), "workspace"),
        "gru_bwd-bad-y": (gru_bwd(y=gy[:-1]), "grad_y"),
        "gru_bwd-int-batch_sizes": (gru_bwd(batch_sizes=torch.tensor([3, 3, 2, 1],
                                                                     dtype=torch.int32)),
                                    "batch_sizes"),
        "rnn_bwd-bad-nonlinearity": (rnn_bwd(nonlinearity="sigmoid"), "sigmoid"),
        "rnn_bwd-bad-h0": (rnn_bwd(h0=r["h0"][:2]), "grad_h_n"),
        "rnn_bwd-bad-w_hh": (rnn_bwd(w_hh=r["w_hh"][:, :2]), "w_hh"),
    }


def _validation_cases():
    t, bs = _valid_lstm()
    x = t["xg"]
    cases = {
        "increasing-batch_sizes": (_lstm_fwd(batch_sizes=torch.tensor([2, 3, 3, 1])),
                                   "batch_sizes"),
        "first-not-B": (_lstm_fwd(batch_sizes=torch.tensor([2, 2, 2, 2, 1])), "batch_sizes"),
        "increase-mid": (_lstm_fwd(batch_sizes=torch.tensor([3, 2, 3, 1])), "non-increasing"),
        "negative": (_lstm_fwd(batch_sizes=torch.tensor([3, 3, 4, -1])), "non-increasing"),
        "wrong-sum": (_lstm_fwd(batch_sizes=torch.tensor([3, 3, 2])), "sum"),
        "wrong-sum-more": (_lstm_fwd(batch_sizes=torch.tensor([3, 3, 2, 1, 1])), "sum"),
        "int32-batch_sizes": (_lstm_fwd(batch_sizes=torch.tensor([3, 3, 2, 1],
                                                                 dtype=torch.int32)),
                              "batch_sizes"),
        "float-batch_sizes": (_lstm_fwd(batch_sizes=torch.tensor([3.0, 3.0, 2.0, 1.0])),
                              "batch_sizes"),
        "2d-batch_sizes": (_lstm_fwd(batch_sizes=torch.tensor([[3, 3, 2, 1]])), "batch_sizes"),
        "empty-batch_sizes": (_lstm_fwd(xg=x[:0], batch_sizes=torch.tensor([], dtype=torch.long)),
                              "at least one step"),
        "w_hh-cols": (_lstm_fwd(w_hh=t["w_hh"][:, :1]), "w_hh"),
        "w_hh-rows-not-4H": (_lstm_fwd(w_hh=t["w_hh"][:-1]), "w_hh"),
        "w_hh-3d": (_lstm_fwd(w_hh=t["w_hh"][None]), "w_hh"),
        "xg-cols": (_lstm_fwd(xg=x[:, :-4]), "xg"),
        "xg-1d": (_lstm_fwd(xg=x.flatten()), "xg"),
        "b_hh-size": (_lstm_fwd(b_hh=t["b_hh"][:-1]), "b_hh"),
        "h0-3d": (_lstm_fwd(h0=t["h0"][None]), "h0"),
        "h0-batch": (_lstm_fwd(h0=t["h0"][:2], c0=t["c0"][:2]), "batch_sizes"),
        "c0-shape": (_lstm_fwd(c0=t["c0"][:, :2]), "c0"),
        "c0-batch": (_lstm_fwd(c0=t["c0"][:2]), "c0"),
        "w_hr-shape": (_lstm_fwd(w_hr=t["w_hr"].t().contiguous()), "w_hr"),
        "w_hr-missing": (_lstm_fwd(w_hr=None), "h0"),
        "dtype-w_hh": (_lstm_fwd(w_hh=t["w_hh"].float()), "dtype"),
        "dtype-h0": (_lstm_fwd(h0=t["h0"].float()), "dtype"),
        "dtype-c0": (_lstm_fwd(c0=t["c0"].float()), "dtype"),
        "dtype-b_hh": (_lstm_fwd(b_hh=t["b_hh"].float()), "dtype"),
        "dtype-w_hr": (_lstm_fwd(w_hr=t["w_hr"].float()), "dtype"),
        "int-xg": (_lstm_fwd(xg=x.long()), "floating"),
        "rnn-bad-nonlinearity": (_rnn_fwd(nonlinearity="sigmoid"), "sigmoid"),
        "rnn-w_hh-shape": (_rnn_fwd(w_hh=torch.zeros(3, 4, dtype=torch.float64)), "w_hh"),
        "rnn-dtype-xg": (_rnn_fwd(xg=torch.zeros(9, 3)), "dtype"),
        "rnn-increasing": (_rnn_fwd(batch_sizes=torch.tensor([1, 2, 3, 3])), "batch_sizes"),
        "gru-w_hh-rows": (_gru_fwd(w_hh=torch.zeros(8, 3, dtype=torch.float64)), "w_hh"),
        "gru-h0-cols": (_gru_fwd(h0=torch.zeros(3, 2, dtype=torch.float64)), "w_hh"),
        "gru-wrong-sum": (_gru_fwd(batch_sizes=torch.tensor([3, 3, 3, 1])), "sum"),
    }
    cases.update(_backward_calls())
    cases.update(_inference_cases())
    return cases


VALIDATION = _validation_cases()


@pytest.mark.parametrize("name", list(VALIDATION))
def test_layer_op_validation(name):
    call, fragment = VALIDATION[name]
    with pytest.raises(RuntimeError, match=fragment) as error:
        call()
    assert "rnn_ext" in str(error.value) or "sigmoid" in str(error.value)


def test_validation_baseline_calls_succeed():
    """The unmodified calls of the validation cases run, so each case fails for its one change."""
    _lstm_fwd()()
    _rnn_fwd()()
    _gru_fwd()()
    _inference()()
    _inference("gru")()
    _inference("tanh")()
    bs = torch.tensor([3, 3, 2, 1])
    t = layer_inputs("lstm", True, True, bs)
    y, h_n, c_n, ws = ops.lstm_recurrence(t["xg"], t["w_hh"], t["b_hh"], t["w_hr"], t["h0"],
                                             t["c0"], bs, False, True)
    ops.lstm_recurrence_backward(torch.ones_like(y), torch.ones_like(h_n), torch.ones_like(c_n),
                            t["w_hh"], t["w_hr"], t["h0"], y, ws, bs, False)
