"""The raw layer ops torch.ops.rnn_ext.{rnn,lstm,gru}_layer_{forward,backward,inference}.

Ground truth: rnn_ext.reference.layer_recurrence, gradcheck / gradgradcheck in float64 and
torch.library.opcheck, on every device (batch_sizes stays on the CPU, as PackedSequence's).
"""

from __future__ import annotations

import functools
import re

import pytest
import torch

from helpers import KINDS, assert_close
from rnn_ext import reference

pytestmark = [pytest.mark.usefixtures("extension", "one_thread"), pytest.mark.sanitize]

ops = torch.ops.rnn_ext

LAYER_KINDS = [
    # (kind, bias, proj)
    ("rnn_tanh", True, False),
    ("rnn_relu", True, False),
    ("rnn_tanh", False, False),
    ("lstm", True, False),
    ("lstm", False, False),
    ("lstm", True, True),
    ("lstm", False, True),
    ("gru", True, False),
    ("gru", False, False),
]
BATCH_SIZES = {"uniform": [3, 3, 3], "packed": [3, 3, 2, 1]}
OP_H, OP_P = 3, 2


def kind_id(case):
    kind, bias, proj = case
    return f"{kind}{'-bias' if bias else '-nobias'}{'-proj' if proj else ''}"


def layer_inputs(kind, bias, proj, batch_sizes, seed=0, dtype=torch.float64, device="cpu"):
    """The differentiable inputs of a layer op: dict of xg, w_hh, b_hh, w_hr, h0, c0."""
    g = torch.Generator().manual_seed(seed)
    G = KINDS[kind].gates
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
    if KINDS[kind].is_rnn:
        return tuple(ops.rnn_recurrence(t["xg"], t["w_hh"], t["b_hh"], t["h0"], batch_sizes,
                                           reverse, KINDS[kind].nonlinearity))
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
def test_layer_op_gradcheck(device, case, reverse, bs_name):
    kind, bias, proj = case
    batch_sizes = torch.tensor(BATCH_SIZES[bs_name])
    t = layer_inputs(kind, bias, proj, batch_sizes, device=device)
    present = [n for n in NAMES if t[n] is not None]
    inputs = tuple(t[n].requires_grad_(True) for n in present)
    fn = as_function(kind, batch_sizes, reverse, present)
    # first order: the fused backward op (no create_graph)
    assert torch.autograd.gradcheck(fn, inputs)
    # second order: the differentiable reference formulas
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("case", [c for c in LAYER_KINDS if c[1]], ids=kind_id)
def test_layer_op_full_gradgradcheck(device, case, reverse):
    """Slow-mode double backward on the packed batch (the uniform one is in fast mode above)."""
    kind, bias, proj = case
    batch_sizes = torch.tensor([3, 2, 1])
    t = layer_inputs(kind, bias, proj, batch_sizes, seed=1, device=device)
    present = [n for n in NAMES if t[n] is not None]
    inputs = tuple(t[n].requires_grad_(True) for n in present)
    assert torch.autograd.gradgradcheck(as_function(kind, batch_sizes, reverse, present), inputs)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("case", LAYER_KINDS, ids=kind_id)
def test_differentiable_backward_matches_fused_backward(device, case, reverse):
    """differentiable_backward (the layer ops' backward under create_graph) gives the fused
    backward op's gradients, as a graph; an empty tensor for an absent input."""
    kind, bias, proj = case
    batch_sizes = torch.tensor([3, 2, 2, 1])
    t = layer_inputs(kind, bias, proj, batch_sizes, seed=2, device=device)
    present = [n for n in NAMES if t[n] is not None]
    for n in present:
        t[n].requires_grad_(True)
    outputs = call_forward(kind, t, batch_sizes, reverse)
    grads = [torch.randn_like(o) for o in outputs]
    fused = dict(zip(present, torch.autograd.grad(outputs, [t[n] for n in present], grads)))
    names = [n for n in NAMES if kind == "lstm" or n not in ("w_hr", "c0")]
    found = ops.differentiable_backward("recurrence", KINDS[kind].mode, [t[n] for n in names],
                                        grads, batch_sizes, reverse)
    for name, got in zip(names, found, strict=True):
        if t[name] is None:
            assert got.numel() == 0, name
        else:
            assert got.requires_grad, name
            torch.testing.assert_close(got, fused[name], atol=1e-10, rtol=1e-10, msg=name)


def call_backward(kind, t, y, workspace, gy, gh, gc, batch_sizes, reverse):
    """The layer backward op, its results by the name of the input they belong to."""
    if KINDS[kind].is_rnn:
        got = ops.rnn_recurrence_backward(gy, gh, t["w_hh"], t["h0"], y, batch_sizes, reverse,
                                     KINDS[kind].nonlinearity)
        return dict(zip(["xg", "w_hh", "b_hh", "h0"], got))
    if kind == "lstm":
        got = ops.lstm_recurrence_backward(gy, gh, gc, t["w_hh"], t["w_hr"], t["h0"], y, workspace,
                                      batch_sizes, reverse)
        return dict(zip(["xg", "w_hh", "b_hh", "h0", "c0", "w_hr"], got))
    got = ops.gru_recurrence_backward(gy, gh, t["w_hh"], t["h0"], y, workspace, batch_sizes, reverse)
    return dict(zip(["xg", "w_hh", "b_hh", "h0"], got))


@pytest.mark.parametrize("case", LAYER_KINDS, ids=kind_id)
def test_layer_backward_ops_accept_inputs_that_require_grad(device, case):
    """The backward ops are public ops: called directly in grad mode on tensors that require
    grad (e.g. the module's own weights), they must compute the same values as on detached
    tensors instead of raising from an out= ATen call inside the kernel."""
    kind, bias, proj = case
    batch_sizes = torch.tensor([3, 3, 2, 1])
    t = layer_inputs(kind, bias, proj, batch_sizes, seed=5, device=device)
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
def test_layer_ops_against_reference(device, case, reverse, bs):
    """Forward op vs reference.layer_recurrence; backward op (called directly) vs autograd
    through reference.layer_recurrence."""
    kind, bias, proj = case
    batch_sizes = torch.tensor(bs)
    t = layer_inputs(kind, bias, proj, batch_sizes, seed=2, device=device)
    for v in t.values():
        if v is not None:
            v.requires_grad_(True)
    lstm, gru = kind == "lstm", kind == "gru"

    with torch.no_grad():
        if KINDS[kind].is_rnn:
            y, h_n = ops.rnn_recurrence(t["xg"], t["w_hh"], t["b_hh"], t["h0"], batch_sizes,
                                           reverse, KINDS[kind].nonlinearity)
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

    ry, rh, rc = reference.layer_recurrence(KINDS[kind].mode, t["xg"], t["w_hh"], t["b_hh"],
                                            t["w_hr"], t["h0"], t["c0"], batch_sizes, reverse)
    assert_close(y, ry.detach(), 1e-12, "y")
    assert_close(h_n, rh.detach(), 1e-12, "h_n")
    if lstm:
        assert_close(c_n, rc.detach(), 1e-12, "c_n")

    g = torch.Generator().manual_seed(9)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(device)
    gh = torch.randn(h_n.shape, generator=g, dtype=torch.float64).to(device)
    gc = torch.randn(c_n.shape, generator=g, dtype=torch.float64).to(device) if lstm else None

    wrt = [n for n in NAMES if t[n] is not None]
    outs = [ry, rh] + ([rc] if lstm else [])
    grads = [gy, gh] + ([gc] if lstm else [])
    expected = dict(zip(wrt, torch.autograd.grad(outs, [t[n] for n in wrt], grads)))

    got = call_backward(kind, {n: None if v is None else v.detach() for n, v in t.items()},
                        y, workspace, gy, gh, gc, batch_sizes, reverse)
    if lstm and not proj:
        assert got["w_hr"].numel() == 0
    assert got["b_hh"].shape == (KINDS[kind].gates * OP_H,)
    if not gru:
        # RNN / LSTM: the gradient of the hidden-side bias is the gate gradient's column sum
        assert_close(got["b_hh"], got["xg"].sum(0), 1e-12, "b_hh vs xg")
    for name in wrt:
        assert_close(got[name], expected[name], 1e-10, f"grad {name}")


# opcheck: schema, autograd registration, fake tensors, AOT dispatch.

@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("case", LAYER_KINDS, ids=kind_id)
def test_opcheck_layer_forward(device, case, reverse):
    kind, bias, proj = case
    batch_sizes = torch.tensor([3, 3, 2, 1])
    for requires_grad, save in ((True, True), (False, False)):
        t = layer_inputs(kind, bias, proj, batch_sizes, device=device)
        if requires_grad:
            for v in t.values():
                if v is not None:
                    v.requires_grad_(True)
        if KINDS[kind].is_rnn:
            op, args = ops.rnn_recurrence.default, (
                t["xg"], t["w_hh"], t["b_hh"], t["h0"], batch_sizes, reverse,
                KINDS[kind].nonlinearity)
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
def test_opcheck_layer_backward(device, case, reverse):
    kind, bias, proj = case
    batch_sizes = torch.tensor([3, 3, 2, 1])
    t = layer_inputs(kind, bias, proj, batch_sizes, device=device)
    g = torch.Generator().manual_seed(4)
    if KINDS[kind].is_rnn:
        y, h_n = ops.rnn_recurrence(t["xg"], t["w_hh"], t["b_hh"], t["h0"], batch_sizes,
                                       reverse, KINDS[kind].nonlinearity)
        args = (torch.randn(y.shape, generator=g, dtype=y.dtype).to(device),
                torch.randn(h_n.shape, generator=g, dtype=y.dtype).to(device),
                t["w_hh"], t["h0"], y, batch_sizes, reverse, KINDS[kind].nonlinearity)
        torch.library.opcheck(ops.rnn_recurrence_backward.default, args)
    elif kind == "lstm":
        y, h_n, c_n, ws = ops.lstm_recurrence(t["xg"], t["w_hh"], t["b_hh"], t["w_hr"],
                                                 t["h0"], t["c0"], batch_sizes, reverse, True)
        args = (torch.randn(y.shape, generator=g, dtype=y.dtype).to(device),
                torch.randn(h_n.shape, generator=g, dtype=y.dtype).to(device),
                torch.randn(c_n.shape, generator=g, dtype=y.dtype).to(device),
                t["w_hh"], t["w_hr"], t["h0"], y, ws, batch_sizes, reverse)
        torch.library.opcheck(ops.lstm_recurrence_backward.default, args)
    else:
        y, h_n, ws = ops.gru_recurrence(t["xg"], t["w_hh"], t["b_hh"], t["h0"], batch_sizes,
                                           reverse, True)
        args = (torch.randn(y.shape, generator=g, dtype=y.dtype).to(device),
                torch.randn(h_n.shape, generator=g, dtype=y.dtype).to(device),
                t["w_hh"], t["h0"], y, ws, batch_sizes, reverse)
        torch.library.opcheck(ops.gru_recurrence_backward.default, args)


@pytest.mark.parametrize("case", LAYER_KINDS, ids=kind_id)
def test_layer_ops_non_contiguous_arguments(device, case):
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


def inference_inputs(kind, bias, proj, batch_sizes, seed=3, device="cpu"):
    """An inference op's arguments (reverse and nonlinearity aside) in schema order: those of
    layer_inputs, with x [N, 2], w_ih and b_ih in place of xg."""
    t = layer_inputs(kind, bias, proj, batch_sizes, seed=seed, device=device)
    g = torch.Generator().manual_seed(seed + 100)
    G, N = KINDS[kind].gates, int(batch_sizes.sum())
    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device)

    a = dict(x=rand(N, 2), w_ih=rand(G * OP_H, 2), b_ih=rand(G * OP_H) if bias else None,
             w_hh=t["w_hh"], b_hh=t["b_hh"])
    if kind == "lstm":
        a.update(w_hr=t["w_hr"], h0=t["h0"], c0=t["c0"])
    else:
        a["h0"] = t["h0"]
    a["batch_sizes"] = batch_sizes
    return a


def call_inference(kind, a, reverse):
    if KINDS[kind].is_rnn:
        return ops.rnn_layer_inference(*a.values(), reverse, KINDS[kind].nonlinearity)
    if kind == "lstm":
        return ops.lstm_layer_inference(*a.values(), reverse)
    return ops.gru_layer_inference(*a.values(), reverse)


@pytest.mark.parametrize("bs", [[3, 3, 2, 1], [3, 1, 0], [2], [3, 3, 3]],
                         ids=["packed", "trailing-zero", "one-step", "uniform"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("case", LAYER_KINDS, ids=kind_id)
def test_layer_inference_ops_against_forward_ops(device, case, reverse, bs):
    """*_layer_inference(x, w_ih, b_ih, ...) gives what *_recurrence gives on
    xg = x @ w_ihᵀ + b_ih (the inference op's pointwise step adds b_ih instead)."""
    kind, bias, proj = case
    a = inference_inputs(kind, bias, proj, torch.tensor(bs), device=device)
    got = call_inference(kind, a, reverse)
    t = {n: a.get(n) for n in NAMES if n != "xg"}
    t["xg"] = torch.nn.functional.linear(a["x"], a["w_ih"], a["b_ih"])
    want = call_forward(kind, t, a["batch_sizes"], reverse)
    assert len(got) == len(want)
    for name, g, w in zip(("y", "h_n", "c_n"), got, want):
        assert_close(g, w, 1e-12, name)


@pytest.mark.parametrize("kind", ["rnn_tanh", "lstm", "gru"])
def test_layer_inference_ops_have_no_backward(device, kind):
    a = inference_inputs(kind, True, False, torch.tensor([3, 3, 2, 1]), device=device)
    a["x"].requires_grad_(True)
    y = call_inference(kind, a, False)[0]
    with pytest.raises(RuntimeError, match=r"derivative for rnn_ext::\w+_layer_inference is not"):
        y.sum().backward()


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("case", LAYER_KINDS, ids=kind_id)
def test_opcheck_layer_inference(device, case, reverse):
    kind, bias, proj = case
    a = inference_inputs(kind, bias, proj, torch.tensor([3, 3, 2, 1]), device=device)
    op = KINDS[kind].op("layer_inference").default
    extra = (KINDS[kind].nonlinearity,) if KINDS[kind].is_rnn else ()
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
    t = layer_inputs("rnn_tanh", True, False, bs)
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
            lambda: ops.rnn_layer_inference(*inference_inputs(
                "rnn_tanh", True, False, torch.tensor([3, 3, 2, 1])).values(), False, "sigmoid"),
            "sigmoid"),
    }


def _backward_calls():
    """Backward-op calls, each with one argument broken; the forward results they need are
    computed on the first call (collection runs no op)."""
    bs = torch.tensor([3, 3, 2, 1])

    @functools.cache
    def lstm():
        t = layer_inputs("lstm", True, True, bs)
        y, h_n, c_n, ws = ops.lstm_recurrence(t["xg"], t["w_hh"], t["b_hh"], t["w_hr"],
                                                 t["h0"], t["c0"], bs, False, True)
        return dict(grad_y=torch.ones_like(y), grad_h_n=torch.ones_like(h_n),
                    grad_c_n=torch.ones_like(c_n), w_hh=t["w_hh"], w_hr=t["w_hr"], h0=t["h0"],
                    y=y, workspace=ws, batch_sizes=bs, reverse=False)

    @functools.cache
    def gru():
        g = layer_inputs("gru", True, False, bs)
        gy, gh, gws = ops.gru_recurrence(g["xg"], g["w_hh"], g["b_hh"], g["h0"], bs, False,
                                            True)
        return dict(grad_y=torch.ones_like(gy), grad_h_n=torch.ones_like(gh), w_hh=g["w_hh"],
                    h0=g["h0"], y=gy, workspace=gws, batch_sizes=bs, reverse=False)

    @functools.cache
    def rnn():
        r = layer_inputs("rnn_relu", True, False, bs)
        ry, rh = ops.rnn_recurrence(r["xg"], r["w_hh"], r["b_hh"], r["h0"], bs, False, "relu")
        return dict(grad_y=torch.ones_like(ry), grad_h_n=torch.ones_like(rh), w_hh=r["w_hh"],
                    h0=r["h0"], y=ry, batch_sizes=bs, reverse=False, nonlinearity="relu")

    def call(op, valid, **override):
        """op on valid()'s arguments, each of `override` replaced by its function of them."""
        def run():
            args = dict(valid())
            args.update({k: f(args) for k, f in override.items()})
            return op(*args.values())
        return run

    def lstm_bwd(**override):
        return call(lambda *args: ops.lstm_recurrence_backward(*args), lstm, **override)

    def gru_bwd(**override):
        return call(lambda *args: ops.gru_recurrence_backward(*args), gru, **override)

    def rnn_bwd(**override):
        return call(lambda *args: ops.rnn_recurrence_backward(*args), rnn, **override)

    return {
        "lstm_bwd-bad-workspace": (lstm_bwd(workspace=lambda a: a["workspace"][:, :-1]),
                                   "workspace"),
        "lstm_bwd-no-workspace": (lstm_bwd(workspace=lambda a: a["workspace"][:0]), "workspace"),
        "lstm_bwd-bad-grad_y": (lstm_bwd(grad_y=lambda a: a["y"][:-1].clone()), "grad_y"),
        "lstm_bwd-bad-grad_h_n": (lstm_bwd(grad_h_n=lambda a: torch.ones(
            2, a["grad_h_n"].size(1), dtype=a["y"].dtype)), "grad_h_n"),
        "lstm_bwd-bad-grad_c_n": (lstm_bwd(grad_c_n=lambda a: torch.ones(
            3, 5, dtype=a["y"].dtype)), "grad_c_n"),
        "lstm_bwd-bad-w_hr": (lstm_bwd(w_hr=lambda a: a["w_hr"].t().contiguous()), "w_hr"),
        "lstm_bwd-missing-w_hr": (lstm_bwd(w_hr=lambda a: None), "h0"),
        "lstm_bwd-float-grad": (lstm_bwd(grad_y=lambda a: a["grad_y"].float()), "dtype"),
        "lstm_bwd-bad-batch_sizes": (lstm_bwd(batch_sizes=lambda a: torch.tensor([3, 3, 2])),
                                     "batch_sizes"),
        "gru_bwd-bad-workspace": (gru_bwd(workspace=lambda a: a["workspace"][:, :-1]),
                                  "workspace"),
        "gru_bwd-bad-y": (gru_bwd(y=lambda a: a["y"][:-1]), "grad_y"),
        "gru_bwd-int-batch_sizes": (gru_bwd(batch_sizes=lambda a: a["batch_sizes"].int()),
                                    "batch_sizes"),
        "rnn_bwd-bad-nonlinearity": (rnn_bwd(nonlinearity=lambda a: "sigmoid"), "sigmoid"),
        "rnn_bwd-bad-h0": (rnn_bwd(h0=lambda a: a["h0"][:2]), "grad_h_n"),
        "rnn_bwd-bad-w_hh": (rnn_bwd(w_hh=lambda a: a["w_hh"][:, :2]), "w_hh"),
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


VALIDATION = _validation_cases()  # (runs no op: each case's call is built when it runs)


@pytest.mark.parametrize("name", list(VALIDATION))
def test_layer_op_validation(name):
    """Each malformed call raises the op's own RuntimeError ("rnn_ext::OP: ..."), not a generic
    dispatch error, and the message names the argument (or the rule) that is broken."""
    call, fragment = VALIDATION[name]
    with pytest.raises(RuntimeError, match=fragment) as error:
        call()
    assert re.match(r"rnn_ext::\w+: ", str(error.value)), str(error.value)


def test_validation_baseline_calls_succeed():
    """The unmodified calls of the validation cases run, so each case fails for its one change."""
    _lstm_fwd()()
    _rnn_fwd()()
    _gru_fwd()()
    _inference()()
    _inference("gru")()
    _inference("rnn_tanh")()
    bs = torch.tensor([3, 3, 2, 1])
    t = layer_inputs("lstm", True, True, bs)
    y, h_n, c_n, ws = ops.lstm_recurrence(t["xg"], t["w_hh"], t["b_hh"], t["w_hr"], t["h0"],
                                             t["c0"], bs, False, True)
    ops.lstm_recurrence_backward(torch.ones_like(y), torch.ones_like(h_n), torch.ones_like(c_n),
                            t["w_hh"], t["w_hr"], t["h0"], y, ws, bs, False)
