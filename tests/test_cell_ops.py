"""The raw cell ops torch.ops.rnn_ext.{rnn,lstm,gru}_cell_{forward,backward,inference}.

Ground truth: rnn_ext.reference's *_cell_step (plain PyTorch), gradcheck/gradgradcheck in float64
and torch.library.opcheck. Shapes as documented in csrc/registration.cpp.
"""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

from helpers import KIND_NAMES, KINDS, OpRecorder, intra_op_threads, kernels_run, noncontiguous
from rnn_ext import reference

pytestmark = [pytest.mark.usefixtures("extension"), pytest.mark.sanitize]

ops = torch.ops.rnn_ext

SHAPES = [(3, 4), (1, 7), (4, 33), (0, 5)]  # (B, H): small, B=1 with odd H, odd H, zero batch
BIAS_VARIANTS = pytest.mark.parametrize("bias", [True, False, "ih", "hh"],
                                        ids=["bias", "nobias", "b_ih_only", "b_hh_only"])
TOL = {torch.float64: dict(atol=1e-12, rtol=0), torch.float32: dict(atol=1e-5, rtol=1e-5)}


def _randn(gen, shape, dtype, device, requires_grad=False):
    t = torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def make_inputs(kind, B, H, dtype=torch.float64, device="cpu", bias=True, requires_grad=False,
                seed=0):
    """The forward op's arguments: (xg, hg, b_ih, b_hh, nonlinearity | cx | hx)."""
    gen = torch.Generator().manual_seed(seed)
    gh = KINDS[kind].gates * H
    rnd = lambda *shape: _randn(gen, shape, dtype, device, requires_grad)  # noqa: E731
    xg, hg = rnd(B, gh), rnd(B, gh)
    b_ih, b_hh = rnd(gh), rnd(gh)  # bias: True (both), False (neither), "ih" or "hh" (one)
    b_ih = b_ih if bias in (True, "ih") else None
    b_hh = b_hh if bias in (True, "hh") else None
    last = KINDS[kind].nonlinearity if KINDS[kind].is_rnn else rnd(B, H)
    return (xg, hg, b_ih, b_hh, last)


def forward_op(kind):
    return KINDS[kind].op("pointwise_forward")


def run_op(kind, args):
    """The op's state outputs, without the workspace: (hy,), (hy, cy) or (hy,)."""
    out = forward_op(kind)(*args)
    if KINDS[kind].is_rnn:
        return (out,)
    return tuple(out[:2]) if kind == "lstm" else (out[0],)


def run_reference(kind, args):
    if KINDS[kind].is_rnn:
        return (reference.rnn_cell_step(*args),)
    if kind == "lstm":
        return tuple(reference.lstm_cell_step(*args))
    return (reference.gru_cell_step(*args),)


def cast(args, dtype):
    return tuple(a.detach().to(dtype) if isinstance(a, torch.Tensor) else a for a in args)


def tensors(args):
    return [a for a in args if isinstance(a, torch.Tensor)]


# ------------------------------------------------------------------------------------ forward

@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}H{s[1]}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_forward_matches_reference(device, kind, dtype, shape, bias):
    B, H = shape
    args = make_inputs(kind, B, H, dtype, device, bias, seed=B * 100 + H)
    out = run_op(kind, args)
    expected = run_reference(kind, args)
    assert len(out) == len(expected)
    for o, e in zip(out, expected):
        assert o.shape == (B, H) and o.dtype == dtype and o.device.type == device
        torch.testing.assert_close(o, e, **TOL[dtype])


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_forward_workspace_shape(device, kind):
    B, H = 3, 7
    args = make_inputs(kind, B, H, torch.float32, device)
    workspace = forward_op(kind)(*args)[-1]
    assert workspace.shape == (B, 5 * H)
    assert workspace.dtype == torch.float32 and workspace.device.type == device


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}H{s[1]}")
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_forward_bfloat16(device, kind, shape, bias):
    B, H = shape
    args = make_inputs(kind, B, H, torch.bfloat16, device, bias, seed=7)
    out = run_op(kind, args)
    # the float32 reference on the very same (bf16-rounded) values
    expected = run_reference(kind, cast(args, torch.float32))
    for o, e in zip(out, expected):
        assert o.dtype == torch.bfloat16 and o.shape == (B, H)
        torch.testing.assert_close(o.float(), e, atol=2e-2, rtol=2e-2)


@BIAS_VARIANTS
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_forward_one_bias(device, kind, bias):
    args = make_inputs(kind, 3, 7, torch.float64, device, bias, seed=2)
    for o, e in zip(run_op(kind, args), run_reference(kind, args)):
        torch.testing.assert_close(o, e, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_forward_special_values(device, kind, dtype):
    """NaN propagates, +-inf and huge pre-activations saturate, as in the reference."""
    args = list(make_inputs(kind, 4, 5, dtype, device, seed=4))
    xg = args[0].clone()
    xg[0, 0], xg[1, 1], xg[2, 2] = float("nan"), float("inf"), -float("inf")
    xg[3] = 1e4
    args[0] = xg
    out, expected = run_op(kind, args), run_reference(kind, args)
    assert out[0].isnan().any()  # the NaN reached the output
    for o, e in zip(out, expected):
        torch.testing.assert_close(o, e, atol=1e-6, rtol=1e-6, equal_nan=True)


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_many_rows_split_over_threads(device, kind):
    """1500 rows on 2 intra-op threads: the CPU pointwise kernels split the rows into parallel
    chunks (forward and backward ops), and every chunk gives the reference's values."""
    fargs, bargs = backward_op_args(kind, 1500, 33, torch.float32, device, seed=8)
    with intra_op_threads(2):
        got_forward = run_op(kind, fargs)
        got = as_tuple(backward_op(kind)(*bargs))
    for o, e in zip(got_forward, run_reference(kind, fargs)):
        torch.testing.assert_close(o, e, atol=1e-5, rtol=1e-5)
    want, _ = reference_backward(kind, fargs, bargs, torch.float32)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_forward_large_magnitudes_saturate(device, kind):
    """Pre-activations far outside the usual range: no NaN/inf, reference values."""
    args = make_inputs(kind, 4, 6, torch.float32, device, seed=3)
    args = tuple(a * 60 if isinstance(a, torch.Tensor) else a for a in args)
    for o, e in zip(run_op(kind, args), run_reference(kind, args)):
        assert torch.isfinite(o).all()
        torch.testing.assert_close(o, e, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------- autograd
# The pointwise ops have no autograd node of their own: the whole-cell ops' node runs them, and
# their fused backward, so the cells' gradients are checked through the whole-cell ops (the
# helpers below), and the gradcheck / gradgradcheck of every kind and bias variant is
# test_whole_cell_gradcheck's.

@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_gradgradcheck_partial_requires_grad(device, kind):
    """Double backward when only some inputs require grad (the input and the state / the input
    only)."""
    args = inference_args(kind, 3, 4, device=device, seed=13)
    for i in ([0, 1, 2] if kind == "lstm" else [0, 1] if kind == "gru" else [0]):
        args[i].requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda *a: run_cell(kind, a), args)


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_autograd_float32_matches_reference(device, kind):
    """First-order gradients of every input, float32, through a sum loss (whose gradient
    reaches the op as an expanded, stride-0 tensor)."""
    args = inference_args(kind, 5, 33, dtype=torch.float32, device=device, seed=5)
    for a in tensors(args):
        a.requires_grad_(True)
    ref_args = tuple(a.detach().clone().requires_grad_(True) if isinstance(a, torch.Tensor)
                     else a for a in args)
    got = torch.autograd.grad(sum(o.sum() for o in run_cell(kind, args)), tensors(args))
    want = torch.autograd.grad(sum(o.sum() for o in reference_cell(kind, ref_args)),
                               tensors(ref_args))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_autograd_zero_batch(device, kind):
    args = inference_args(kind, 0, 5, device=device)
    for a in tensors(args):
        a.requires_grad_(True)
    grads = torch.autograd.grad(sum(o.sum() for o in run_cell(kind, args)), tensors(args))
    for g, a in zip(grads, tensors(args)):
        assert g.shape == a.shape
        assert (g == 0).all()


@pytest.mark.parametrize("bias", ["ih", False], ids=["b_ih_only", "nobias"])
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_differentiable_backward_matches_fused_backward(device, kind, bias):
    """differentiable_backward (the backward under create_graph) gives the gradients the fused
    backward gives, as a graph; zeros for an input that does not require grad, an empty
    tensor for an absent one."""
    args = inference_args(kind, 3, 4, device=device, bias=bias, seed=23)
    for a in tensors(args)[1:]:
        a.requires_grad_(True)
    outputs = run_cell(kind, args)
    grads = [torch.randn_like(o) for o in outputs]
    present = [a for a in tensors(args) if a.requires_grad]
    fused = iter(torch.autograd.grad(outputs, present, grads))
    inputs = list(args[:7] if kind == "lstm" else args[:6])
    found = ops.differentiable_backward("cell", KINDS[kind].mode, inputs, grads, None, False)
    assert len(found) == len(inputs)
    for got, arg in zip(found, inputs):
        if arg is None:
            assert got.numel() == 0
        elif not arg.requires_grad:
            assert got.shape == arg.shape and (got == 0).all()
        else:
            assert got.requires_grad
            torch.testing.assert_close(got, next(fused), atol=1e-12, rtol=0)


def test_differentiable_backward_validates(device):
    """Bad arguments raise: the op, the mode, the number of inputs, batch_sizes for a cell,
    inputs the op rejects, gradients unlike its outputs."""
    input, hx, cx, w_ih, w_hh, b_ih, b_hh = inference_args("lstm", 3, 4, device=device, seed=24)
    grads = [torch.ones(3, 4, dtype=torch.float64, device=device)] * 2
    inputs = [input, hx, cx, w_ih, w_hh, b_ih, b_hh]
    call = ops.differentiable_backward
    with pytest.raises(ValueError, match="op must be one of"):
        call("lstm_forward", "LSTM", inputs, grads, None, False)
    with pytest.raises(ValueError, match="mode must be one of"):
        call("cell", "lstm", inputs, grads, None, False)
    with pytest.raises(ValueError, match="takes 7 inputs, got 6"):
        call("cell", "LSTM", inputs[:6], grads, None, False)
    with pytest.raises(ValueError, match="batch_sizes is required for a recurrence and None"):
        call("cell", "LSTM", inputs, grads, torch.tensor([3]), False)
    with pytest.raises(RuntimeError, match="b_ih"):
        call("cell", "LSTM", [input, hx, cx, w_ih, w_hh, b_ih[:1], b_hh], grads, None, False)
    with pytest.raises(ValueError, match="grads must be 2 tensors"):
        call("cell", "LSTM", inputs, grads[:1], None, False)
    with pytest.raises(ValueError, match="grads must be 2 tensors"):
        call("cell", "LSTM", inputs, [grads[0], grads[1][:, :3]], None, False)
    with pytest.raises(ValueError, match="grads must be 2 tensors"):
        call("cell", "LSTM", inputs, [grads[0], grads[1].float()], None, False)


# ------------------------------------------------------------------------------------ opcheck

@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_opcheck_forward(device, kind, bias):
    """The pointwise op alone (without grad: it has no autograd node; test_opcheck_whole_cell
    checks the node that runs it)."""
    args = make_inputs(kind, 3, 4, torch.float64, device, bias, seed=31)
    opcheck(forward_op(kind), args)


def backward_op_args(kind, B=3, H=4, dtype=torch.float64, device="cpu", bias=True, seed=41):
    """(forward args, backward op args): the saved tensor comes from a real forward call."""
    args = make_inputs(kind, B, H, dtype, device, bias, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    grad_hy = _randn(gen, (B, H), dtype, device)
    if KINDS[kind].is_rnn:
        return args, (grad_hy, ops.rnn_pointwise_forward(*args), args[4])
    if kind == "lstm":
        grad_cy = _randn(gen, (B, H), dtype, device)
        return args, (grad_hy, grad_cy, ops.lstm_pointwise_forward(*args)[2])
    return args, (grad_hy, ops.gru_pointwise_forward(*args)[1])


def as_tuple(out):
    return (out,) if isinstance(out, torch.Tensor) else tuple(out)


def reference_backward(kind, fargs, bargs, dtype):
    """Autograd through the reference, in `dtype`, for the backward op's outputs:
    rnn (d xg,), lstm (d xg, d cx), gru (d xg, d hg, d hx); also d hg for rnn / lstm."""
    ref_args = tuple(a.detach().to(dtype).requires_grad_(True) if isinstance(a, torch.Tensor)
                     else a for a in fargs)
    outs = run_reference(kind, ref_args)
    grads = [g.to(dtype) for g in (bargs[:2] if kind == "lstm" else bargs[:1])]
    wrt = [ref_args[0], ref_args[1]] + ([] if KINDS[kind].is_rnn else [ref_args[4]])
    d = torch.autograd.grad(outs, wrt, grads)
    if KINDS[kind].is_rnn:
        return (d[0],), d[1]
    if kind == "lstm":
        return (d[0], d[2]), d[1]
    return tuple(d), None


def backward_op(kind):
    return KINDS[kind].op("pointwise_backward")


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_opcheck_backward(device, kind):
    _, bargs = backward_op_args(kind, device=device)
    opcheck(backward_op(kind), bargs)


# ------------------------------------------------------------------- backward ops, called directly

@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}H{s[1]}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_backward_op_matches_reference_autograd(device, kind, dtype, shape, bias):
    B, H = shape
    fargs, bargs = backward_op_args(kind, B, H, dtype, device, bias, seed=51 + H)
    got = as_tuple(backward_op(kind)(*bargs))
    want, want_hg = reference_backward(kind, fargs, bargs, dtype)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == dtype and g.device.type == device and g.shape == w.shape
        torch.testing.assert_close(g, w, **TOL[dtype])
    if want_hg is not None:  # RNN / LSTM: one gradient serves both pre-activations
        torch.testing.assert_close(got[0], want_hg, **TOL[dtype])


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_backward_op_bfloat16(device, kind):
    fargs, bargs = backward_op_args(kind, 4, 33, torch.bfloat16, device, seed=61)
    got = as_tuple(backward_op(kind)(*bargs))
    want, _ = reference_backward(kind, fargs, bargs, torch.float32)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), w, atol=3e-2, rtol=3e-2)


def test_autograd_uses_the_fused_backward_op(device):
    """The whole-cell node runs rnn_ext's pointwise forward and backward ops (not a reference
    fallback)."""
    for kind in KIND_NAMES:
        args = inference_args(kind, 3, 4, dtype=torch.float32, device=device)
        for a in tensors(args):
            a.requires_grad_(True)
        with kernels_run(KINDS[kind].op_name("pointwise_forward"),
                         KINDS[kind].op_name("pointwise_backward")):
            sum(o.sum() for o in run_cell(kind, args)).backward()


# ---------------------------------------------------------------------------------- inference

def inference_args(kind, B, H, I=5, dtype=torch.float64, device="cpu", bias=True, seed=0):
    """The inference op's arguments: (input, hx[, cx], w_ih, w_hh, b_ih, b_hh[, nonlinearity])."""
    gen = torch.Generator().manual_seed(seed)
    gh = KINDS[kind].gates * H
    rnd = lambda *shape: _randn(gen, shape, dtype, device)  # noqa: E731
    states = (rnd(B, H), rnd(B, H)) if kind == "lstm" else (rnd(B, H),)
    b_ih, b_hh = rnd(gh), rnd(gh)
    b_ih = b_ih if bias in (True, "ih") else None
    b_hh = b_hh if bias in (True, "hh") else None
    extra = (kind[len("rnn_"):],) if KINDS[kind].is_rnn else ()
    return (rnd(B, I), *states, rnd(gh, I), rnd(gh, H), b_ih, b_hh, *extra)


def run_inference(kind, args):
    """The inference op's outputs as a tuple: (hy,) or (hy, cy)."""
    out = KINDS[kind].op("cell_inference")(*args)
    return tuple(out) if kind == "lstm" else (out,)


def forward_op_args(kind, args):
    """The forward op's arguments for the same step: the two GEMMs done in ATen."""
    lstm = kind == "lstm"
    x, h = args[0], args[1]
    w_ih, w_hh, b_ih, b_hh = args[3:7] if lstm else args[2:6]
    last = args[2] if lstm else (args[-1] if KINDS[kind].is_rnn else h)
    return (x @ w_ih.t(), h @ w_hh.t(), b_ih, b_hh, last)


@BIAS_VARIANTS
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}H{s[1]}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_inference_matches_forward_op(device, kind, dtype, shape, bias):
    """*_cell_inference(input, hx, ..., w_ih, w_hh, b_ih, b_hh) is the forward op on the two
    GEMMs' results (up to the GEMMs' rounding), on every device, dtype and bias variant."""
    B, H = shape
    args = inference_args(kind, B, H, dtype=dtype, device=device, bias=bias, seed=B + H)
    got = run_inference(kind, args)
    want = run_op(kind, forward_op_args(kind, args))
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == (B, H) and g.dtype == dtype and g.device.type == device
        torch.testing.assert_close(g, w, atol=tol, rtol=tol)


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_inference_noncontiguous(device, kind):
    """A transposed-in-memory w_ih, a strided input and state give the contiguous result."""
    args = list(inference_args(kind, 4, 6, device=device, seed=3))
    w_ih_at = 3 if kind == "lstm" else 2
    dense = tuple(args)
    args[0] = torch.stack([args[0], -args[0]], 2)[:, :, 0]
    args[1] = args[1].t().contiguous().t()
    args[w_ih_at] = args[w_ih_at].t().contiguous().t()
    assert not args[0].is_contiguous() and not args[w_ih_at].is_contiguous()
    for g, w in zip(run_inference(kind, args), run_inference(kind, dense)):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_opcheck_inference(device, kind):
    opcheck(KINDS[kind].op("cell_inference").default, inference_args(kind, 3, 4, device=device))


@pytest.mark.parametrize("kind", ["rnn_tanh", "lstm", "gru"])
def test_inference_has_no_backward(device, kind):
    args = list(inference_args(kind, 3, 4, device=device))
    args[0].requires_grad_(True)
    out = run_inference(kind, args)[0]
    assert out.requires_grad
    with pytest.raises(RuntimeError, match=r"derivative for rnn_ext::\w+_cell_inference is not"):
        out.sum().backward()


# ------------------------------------------------------------------------ whole-cell ops

def run_cell(kind, args):
    """The whole-cell op (rnn_cell, lstm_cell, gru_cell: the inference op's arguments) as a
    tuple: (hy,) or (hy, cy)."""
    out = KINDS[kind].op("cell")(*args)
    return tuple(out) if kind == "lstm" else (out,)


def reference_cell(kind, args):
    if kind == "lstm":
        x, h, c, *weights = args
        return tuple(reference.lstm_cell(x, (h, c), *weights))
    cell = {"rnn_tanh": reference.rnn_tanh_cell, "rnn_relu": reference.rnn_relu_cell,
            "gru": reference.gru_cell}[kind]
    return (cell(*(args[:6])),)


@BIAS_VARIANTS
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_whole_cell_gradcheck(device, kind, bias):
    """The whole-cell ops' one-node backward (both GEMMs' gradients) and double backward."""
    args = inference_args(kind, 3, 4, device=device, bias=bias, seed=41)
    for a in tensors(args):
        a.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda *a: run_cell(kind, a), args)
    assert torch.autograd.gradgradcheck(lambda *a: run_cell(kind, a), args)


@pytest.mark.parametrize("wanted", ["input", "hx", "weights", "biases"])
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_whole_cell_partial_requires_grad(device, kind, wanted):
    """Gradients of a subset of the inputs match the reference's, and the others get none."""
    args = list(inference_args(kind, 5, 6, dtype=torch.float64, device=device, seed=42))
    lstm = kind == "lstm"
    positions = {"input": [0], "hx": [1, 2] if lstm else [1],
                 "weights": [3, 4] if lstm else [2, 3], "biases": [5, 6] if lstm else [4, 5]}
    for i in positions[wanted]:
        args[i].requires_grad_(True)
    leaves = [args[i] for i in positions[wanted]]
    weights = [torch.randn_like(o) for o in run_cell(kind, args)]
    got = torch.autograd.grad([(o * w).sum() for o, w in zip(run_cell(kind, args), weights)],
                              leaves)
    want = torch.autograd.grad(
        [(o * w).sum() for o, w in zip(reference_cell(kind, args), weights)], leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_whole_cell_is_one_node_or_the_inference_op(device, kind):
    """With grad the step is one autograd node over both GEMMs and the fused step; without,
    the inference op runs (the op is CompositeImplicitAutograd)."""
    args = inference_args(kind, 3, 4, dtype=torch.float32, device=device, seed=43)
    args[0].requires_grad_(True)
    out = run_cell(kind, args)[0]
    node = {"rnn_tanh": "RnnCell", "rnn_relu": "RnnCell", "lstm": "LstmCell", "gru": "GruCell"}
    assert out.grad_fn.name().endswith(f"::{node[kind]}>"), out.grad_fn.name()
    assert [f.name() for f, _ in out.grad_fn.next_functions if f is not None] == [
        "torch::autograd::AccumulateGrad"]
    with torch.no_grad(), OpRecorder() as rec:
        run_cell(kind, args)
    assert [f for f, _, _ in rec.calls] == [KINDS[kind].op_name("cell_inference")]


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_opcheck_whole_cell(device, kind):
    args = inference_args(kind, 3, 4, device=device, seed=44)
    opcheck(KINDS[kind].op("cell"), args)
    for a in tensors(args):
        a.requires_grad_(True)
    opcheck(KINDS[kind].op("cell"), args)


# ------------------------------------------------------------------ errors under autograd

@pytest.mark.parametrize("kind", KIND_NAMES)
def test_wrong_arguments_raise_under_autograd(device, kind):
    """The autograd wrapper forwards the op's checks (bias of the wrong length)."""
    args = list(make_inputs(kind, 3, 4, torch.float64, device, requires_grad=True))
    args[2] = torch.zeros(KINDS[kind].gates * 4 + 1, dtype=torch.float64, device=device,
                          requires_grad=True)
    with pytest.raises(RuntimeError, match="b_ih"):
        forward_op(kind)(*args)


# ----------------------------------------------------------------------- non-contiguous inputs

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_noncontiguous_inputs(device, kind, dtype):
    args = make_inputs(kind, 3, 5, dtype, device, seed=71)
    strided = tuple(noncontiguous(a) if isinstance(a, torch.Tensor) else a for a in args)
    want = as_tuple(forward_op(kind)(*args))
    got = as_tuple(forward_op(kind)(*strided))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=0, rtol=0)
    # transposed storage as well
    transposed = tuple(a.t().contiguous().t() if isinstance(a, torch.Tensor) and a.dim() == 2
                       else a for a in args)
    assert not transposed[0].is_contiguous()
    got = as_tuple(forward_op(kind)(*transposed))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=0, rtol=0)
    torch.testing.assert_close(run_op(kind, strided)[0], run_reference(kind, args)[0],
                               **TOL[dtype])

    _, bargs = backward_op_args(kind, 3, 5, dtype, device, seed=72)
    strided_b = tuple(noncontiguous(a) if isinstance(a, torch.Tensor) else a for a in bargs)
    want_b = as_tuple(backward_op(kind)(*bargs))
    got_b = as_tuple(backward_op(kind)(*strided_b))
    for g, w in zip(got_b, want_b):
        torch.testing.assert_close(g, w, atol=0, rtol=0)


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_expanded_bias_and_state(device, kind):
    """Stride-0 (expanded) tensors are read correctly."""
    B, H = 4, 6
    args = list(make_inputs(kind, B, H, torch.float64, device, seed=81))
    args[1] = args[1][:1].expand(B, -1)  # every row's hg the same, stride 0
    if not KINDS[kind].is_rnn:
        args[4] = args[4][:1].expand(B, -1)
    dense = [a.contiguous() if isinstance(a, torch.Tensor) else a for a in args]
    for g, w in zip(run_op(kind, args), run_reference(kind, dense)):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0)
