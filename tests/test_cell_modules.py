"""rnn_ext.RNNCell / LSTMCell / GRUCell against torch.nn's cells, the functional cell API, and
the backend switch."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import _VF, nn

import rnn_ext
from rnn_ext import functional, reference

from helpers import (KIND_NAMES, KINDS, OpRecorder, kernels_run, leaf, make_pair,
                     require_extension)

REPO = Path(__file__).resolve().parents[1]
F64 = dict(atol=1e-10, rtol=0)


def make_inputs(kind, batch, input_size, hidden_size, dtype, device, with_hx=True, seed=0):
    """input and hx (a pair for LSTM, None without hx); shapes [B, I] / [B, H], or 1-D when
    batch is None."""
    gen = torch.Generator().manual_seed(seed)
    lead = () if batch is None else (batch,)

    def rnd(*shape):
        return torch.randn(lead + shape, generator=gen, dtype=torch.float64).to(device, dtype)

    x = rnd(input_size)
    if not with_hx:
        return x, None
    hx = (rnd(hidden_size), rnd(hidden_size)) if kind == "lstm" else rnd(hidden_size)
    return x, hx


def run_and_grad(cell, x, hx, out_grads_seed=99):
    """Forward with fresh leaves; backward of a random projection of every output. Returns
    (outputs, grad of x, grads of the hx tensors, {param name: grad})."""
    x = leaf(x)
    if hx is None:
        states = []
        out = cell(x)
    else:
        states = [leaf(h) for h in (hx if isinstance(hx, tuple) else (hx,))]
        out = cell(x, tuple(states) if isinstance(hx, tuple) else states[0])
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(out_grads_seed)
    weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o) for o in outs]
    sum((o * w).sum() for o, w in zip(outs, weights)).backward()
    return (tuple(o.detach() for o in outs), x.grad, [s.grad for s in states],
            {n: p.grad for n, p in cell.named_parameters()})


def assert_cells_agree(nn_cell, ext_cell, x, hx, **tol):
    out_nn, gx_nn, gh_nn, gp_nn = run_and_grad(nn_cell, x, hx)
    out_ext, gx_ext, gh_ext, gp_ext = run_and_grad(ext_cell, x, hx)
    assert len(out_ext) == len(out_nn)
    for a, b in zip(out_ext, out_nn):
        assert a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
        torch.testing.assert_close(a, b, **tol)
    torch.testing.assert_close(gx_ext, gx_nn, **tol)
    assert len(gh_ext) == len(gh_nn)
    for a, b in zip(gh_ext, gh_nn):
        torch.testing.assert_close(a, b, **tol)
    assert gp_ext.keys() == gp_nn.keys() and len(gp_nn) > 0
    for name in gp_nn:
        assert gp_ext[name] is not None, name
        torch.testing.assert_close(gp_ext[name], gp_nn[name], **tol, msg=lambda m: f"{name}: {m}")


# --------------------------------------------------------------------- agreement with torch.nn

@pytest.mark.parametrize("direction", ["nn_to_ext", "ext_to_nn"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_matches_torch_nn_float64(extension, device, kind, bias, direction):
    nn_cell, ext_cell = make_pair(kind, 6, 7, cell=True, bias=bias, device=device,
                                  direction=direction)
    x, hx = make_inputs(kind, 5, 6, 7, torch.float64, device)
    with kernels_run(KINDS[kind].op_name("pointwise_forward"), KINDS[kind].op_name("pointwise_backward")):
        assert_cells_agree(nn_cell, ext_cell, x, hx, **F64)


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_matches_torch_nn_hx_none(extension, device, kind):
    nn_cell, ext_cell = make_pair(kind, 6, 7, cell=True, device=device)
    x, _ = make_inputs(kind, 5, 6, 7, torch.float64, device, with_hx=False)
    with kernels_run(KINDS[kind].op_name("pointwise_forward")):
        assert_cells_agree(nn_cell, ext_cell, x, None, **F64)


@pytest.mark.parametrize("with_hx", [True, False], ids=["hx", "no_hx"])
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_matches_torch_nn_unbatched(extension, device, kind, with_hx):
    nn_cell, ext_cell = make_pair(kind, 6, 7, cell=True, device=device)
    x, hx = make_inputs(kind, None, 6, 7, torch.float64, device, with_hx=with_hx)
    assert x.dim() == 1
    out = ext_cell(x, hx) if with_hx else ext_cell(x)
    for o in (out if isinstance(out, tuple) else (out,)):
        assert o.shape == (7,)
    with kernels_run(KINDS[kind].op_name("pointwise_forward")):
        assert_cells_agree(nn_cell, ext_cell, x, hx, **F64)


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_matches_torch_nn_float32_realistic(extension, device, kind):
    nn_cell, ext_cell = make_pair(kind, 64, 128, cell=True, dtype=torch.float32,
                                  device=device)
    x, hx = make_inputs(kind, 16, 64, 128, torch.float32, device)
    assert_cells_agree(nn_cell, ext_cell, x, hx, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_matches_torch_nn_bfloat16(extension, device, kind):
    nn_cell, ext_cell = make_pair(kind, 16, 24, cell=True, dtype=torch.bfloat16,
                                  device=device)
    x, hx = make_inputs(kind, 4, 16, 24, torch.bfloat16, device)
    out_nn = nn_cell(x, hx)
    out_ext = ext_cell(x, hx)
    for a, b in zip(out_ext if kind == "lstm" else (out_ext,),
                    out_nn if kind == "lstm" else (out_nn,)):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2)


# --------------------------------------------------------------------- parameters and type

@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_parameters_match_torch_nn(kind, bias):
    nn_cls, ext_cls, kw = KINDS[kind].nn_cell, KINDS[kind].cell, KINDS[kind].module_kwargs
    nn_cell, ext_cell = nn_cls(5, 9, bias=bias, **kw), ext_cls(5, 9, bias=bias, **kw)
    expected = [(n, tuple(p.shape), p.dtype) for n, p in nn_cell.named_parameters()]
    assert [(n, tuple(p.shape), p.dtype) for n, p in ext_cell.named_parameters()] == expected
    assert list(ext_cell.state_dict()) == list(nn_cell.state_dict())
    gates = KINDS[kind].gates
    assert ext_cell.weight_ih.shape == (gates * 9, 5)
    assert ext_cell.weight_hh.shape == (gates * 9, 9)
    if bias:
        assert ext_cell.bias_ih.shape == ext_cell.bias_hh.shape == (gates * 9,)
    else:
        assert ext_cell.bias_ih is None and ext_cell.bias_hh is None


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_initialisation_uniform(kind):
    nn_cls, ext_cls, kw = KINDS[kind].nn_cell, KINDS[kind].cell, KINDS[kind].module_kwargs
    hidden = 64
    bound = 1 / math.sqrt(hidden)
    torch.manual_seed(1234)
    cell = ext_cls(32, hidden, **kw)
    for name, p in cell.named_parameters():
        assert p.abs().max() <= bound, name
        # spread over the whole interval, not a narrower or degenerate one
        assert p.max() > 0.8 * bound and p.min() < -0.8 * bound, name
        assert abs(p.mean().item()) < 0.15 * bound, name
        assert abs(p.std().item() - bound / math.sqrt(3)) < 0.15 * bound, name
    # and exactly torch.nn's values for the same seed
    torch.manual_seed(1234)
    twin = nn_cls(32, hidden, **kw)
    for (name, a), b in zip(cell.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name


def test_isinstance_of_torch_nn():
    assert isinstance(rnn_ext.LSTMCell(3, 4), nn.LSTMCell)
    assert isinstance(rnn_ext.GRUCell(3, 4), nn.GRUCell)
    assert isinstance(rnn_ext.RNNCell(3, 4), nn.RNNCell)
    assert isinstance(rnn_ext.RNNCell(3, 4, nonlinearity="relu"), nn.RNNCellBase)
    assert not isinstance(rnn_ext.GRUCell(3, 4), nn.LSTMCell)


# --------------------------------------------------------------------------------- bad inputs

def _states(kind, batch_shape, hidden, dtype=torch.float32, cx_shape=None):
    h = torch.zeros(batch_shape + (hidden,), dtype=dtype)
    if kind != "lstm":
        return h
    c = torch.zeros((cx_shape or batch_shape) + (hidden,), dtype=dtype)
    return (h, c)


# case -> function(kind) returning (input, hx); the cells are (6 -> 7), float32
BAD_INPUTS = {
    "3d_input": lambda k: (torch.randn(1, 3, 6), None),
    "0d_input": lambda k: (torch.tensor(1.0), None),
    "3d_input_with_hx": lambda k: (torch.randn(1, 3, 6), _states(k, (3,), 7)),
    "3d_hx": lambda k: (torch.randn(3, 6), _states(k, (1, 3), 7)),
    "0d_hx": lambda k: (torch.randn(3, 6), (torch.tensor(0.0), torch.zeros(3, 7))
                        if k == "lstm" else torch.tensor(0.0)),
    "wrong_input_size": lambda k: (torch.randn(3, 5), None),
    "wrong_input_size_unbatched": lambda k: (torch.randn(5), None),
    "batch_mismatch_hx": lambda k: (torch.randn(3, 6), _states(k, (4,), 7)),
    "hidden_size_mismatch": lambda k: (torch.randn(3, 6), _states(k, (3,), 8)),
    "float64_input": lambda k: (torch.randn(3, 6, dtype=torch.float64), None),
    "float64_input_and_hx": lambda k: (torch.randn(3, 6, dtype=torch.float64),
                                       _states(k, (3,), 7, torch.float64)),
    "float64_hx": lambda k: (torch.randn(3, 6), _states(k, (3,), 7, torch.float64)),
    "integer_input": lambda k: (torch.ones(3, 6, dtype=torch.int64), None),
    "batched_input_unbatched_hx": lambda k: (torch.randn(3, 6), _states(k, (), 7)),
    "unbatched_input_batched_hx": lambda k: (torch.randn(6), _states(k, (1,), 7)),
}
LSTM_BAD_INPUTS = {
    "3d_cx": lambda k: (torch.randn(3, 6), _states(k, (3,), 7, cx_shape=(1, 3))),
    "batch_mismatch_cx": lambda k: (torch.randn(3, 6), _states(k, (3,), 7, cx_shape=(4,))),
}

# RuntimeErrors whose text rnn_ext reproduces exactly (torch.nn raises them in its C++ checks)
SAME_MESSAGE = {"wrong_input_size", "wrong_input_size_unbatched", "batch_mismatch_hx",
                "hidden_size_mismatch", "batch_mismatch_cx"}


def _outcome(cell, x, hx):
    try:
        cell(x) if hx is None else cell(x, hx)
    except Exception as error:  # noqa: BLE001 - the type is what is compared
        return error
    return None


@pytest.mark.parametrize("kind, case", [(k, c) for k in KIND_NAMES for c in BAD_INPUTS]
                         + [("lstm", c) for c in LSTM_BAD_INPUTS])
def test_bad_inputs_raise_like_torch_nn(extension, kind, case):
    x, hx = {**BAD_INPUTS, **LSTM_BAD_INPUTS}[case](kind)
    nn_cell, ext_cell = make_pair(kind, 6, 7, cell=True, dtype=torch.float32)
    expected = _outcome(nn_cell, x, hx)
    assert expected is not None, f"torch.nn accepted the {case} input; the case is wrong"
    got = _outcome(ext_cell, x, hx)
    assert got is not None, f"rnn_ext accepted the {case} input that torch.nn rejects " \
                            f"({type(expected).__name__}: {expected})"
    assert type(got) is type(expected), (got, expected)
    if isinstance(expected, ValueError) or case in SAME_MESSAGE:
        # torch.nn's Python dim checks, and its C++ cell size checks, which rnn_ext's modules
        # repeat with the same words before any kernel runs
        assert str(got) == str(expected)


def test_unknown_nonlinearity_like_torch_nn():
    x = torch.randn(2, 3)
    expected = _outcome(nn.RNNCell(3, 4, nonlinearity="sigmoid"), x, None)
    got = _outcome(rnn_ext.RNNCell(3, 4, nonlinearity="sigmoid"), x, None)
    assert expected is not None and got is not None
    assert type(got) is type(expected) and "sigmoid" in str(got)


# ------------------------------------------------------------------------------ functional API

# rnn_ext.functional's (and torch._VF's) cell functions, and their kinds
FUNCTIONS = {"rnn_tanh_cell": "rnn_tanh", "rnn_relu_cell": "rnn_relu", "lstm_cell": "lstm",
             "gru_cell": "gru"}


def functional_args(name, device, bias, B=5, I=6, H=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(s, generator=gen, dtype=torch.float64).to(device)  # noqa: E731
    g = KINDS[FUNCTIONS[name]].gates
    hx = (rnd(B, H), rnd(B, H)) if name == "lstm_cell" else rnd(B, H)
    b = (rnd(g * H), rnd(g * H)) if bias else (None, None)
    return [rnd(B, I), hx, rnd(g * H, I), rnd(g * H, H), *b]


def _leaves(args):
    out = []
    for a in args:
        if isinstance(a, tuple):
            out.append(tuple(leaf(t) for t in a))
        else:
            out.append(None if a is None else leaf(a))
    return out


def _flat(args):
    return [t for a in args for t in (a if isinstance(a, tuple) else (a,)) if t is not None]


def _call_with_grads(fn, args):
    args = _leaves(args)
    out = fn(*args)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(5)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype).to(o.device)).sum()
               for o in outs)
    return outs, torch.autograd.grad(loss, _flat(args))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_functional_matches_reference_and_torch(extension, device, name, bias):
    args = functional_args(name, device, bias)
    kind = KINDS[FUNCTIONS[name]]
    with kernels_run(kind.op_name("pointwise_forward"), kind.op_name("pointwise_backward")):
        outs, grads = _call_with_grads(getattr(functional, name), args)
    for expected_fn in (getattr(reference, name), getattr(_VF, name)):
        ref_outs, ref_grads = _call_with_grads(expected_fn, args)
        assert len(outs) == len(ref_outs)
        for a, b in zip(outs, ref_outs):
            torch.testing.assert_close(a, b, **F64)
        assert len(grads) == len(ref_grads)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, **F64)


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_modules_run_the_extension_ops(extension, kind):
    """With the extension backend the cells run the fused ops, forward and backward."""
    _, ext_cell = make_pair(kind, 6, 7, cell=True, dtype=torch.float32)
    x, hx = make_inputs(kind, 3, 6, 7, torch.float32, "cpu")
    with OpRecorder() as record:
        run_and_grad(ext_cell, x, hx)
    assert record.rnn_ext_ops() == {KINDS[kind].op_name("pointwise_forward"),
                                    KINDS[kind].op_name("pointwise_backward")}


# -------------------------------------------------------------------------------- backend switch

@pytest.mark.parametrize("kind", KIND_NAMES)
def test_reference_backend_matches_torch_nn(reference_backend, device, kind):
    assert rnn_ext.backend() == "reference"
    nn_cell, ext_cell = make_pair(kind, 6, 7, cell=True, device=device)
    x, hx = make_inputs(kind, 5, 6, 7, torch.float64, device)
    with OpRecorder() as record:
        assert_cells_agree(nn_cell, ext_cell, x, hx, **F64)
    assert record.rnn_ext_ops() == set(), "the reference backend ran compiled ops"
    # unbatched and hx None through the reference as well
    x1, _ = make_inputs(kind, None, 6, 7, torch.float64, device, with_hx=False)
    assert_cells_agree(nn_cell, ext_cell, x1, None, **F64)


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_reference_backend_functional(reference_backend, name):
    args = functional_args(name, "cpu", True)
    with OpRecorder() as record:
        outs, grads = _call_with_grads(getattr(functional, name), args)
    assert record.rnn_ext_ops() == set()
    ref_outs, ref_grads = _call_with_grads(getattr(_VF, name), args)
    for a, b in zip(list(outs) + list(grads), list(ref_outs) + list(ref_grads)):
        torch.testing.assert_close(a, b, **F64)


def test_set_backend_round_trip():
    require_extension()
    try:
        rnn_ext.set_backend("reference")
        assert rnn_ext.backend() == "reference"
        rnn_ext.set_backend("extension")
        assert rnn_ext.backend() == "extension"
        with pytest.raises(ValueError):
            rnn_ext.set_backend("cuda")
        assert rnn_ext.backend() == "extension"
    finally:
        rnn_ext.set_backend("extension")


@pytest.mark.slow
def test_backend_environment_variable():
    env = {**os.environ, "RNN_EXT_BACKEND": "reference",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", "import rnn_ext; print(rnn_ext.backend())"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "reference"
