"""Reliability of the modules: edge cases against torch.nn, double backward, property tests,
leaks, threads and determinism (the raw-op fuzzer is tests/fuzz.py, run by test_fuzz.py).

1. Edge cases against torch.nn: zero batch, zero-length sequences, non-contiguous arguments,
   NaN / inf propagation, saturation, refused dtypes, a second backward, gradients through hx
   only, no saved workspace without grad.
2. gradcheck and gradgradcheck through every module in float64.
3. hypothesis property tests: extension == reference backend == torch.nn, outputs and gradients.
4. Memory stays flat over training steps; Python threads; bitwise determinism.
"""

from __future__ import annotations

import ctypes
import gc
import os
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch.nn.utils.rnn import pack_padded_sequence

import rnn_ext
from helpers import (CELL_CASES, KIND_NAMES, KINDS, LAYER_CASES, MODULE_CASES, OpRecorder,
                     assert_close, backend, flatten, intra_op_threads, kernels_run, leaf,
                     make_case_pair, make_pair)

ops = torch.ops.rnn_ext

pytestmark = [
    pytest.mark.usefixtures("extension", "one_thread"),
    # torch.nn's own notice when it runs an LSTM with projections on the CPU
    pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN"),
]


# =============================================================================================
# Helpers of the module tests
# =============================================================================================

def _is_cell_module(module) -> bool:  # (by duck type: rnn_ext's classes need not subclass)
    return not hasattr(module, "num_layers")


def _is_lstm_module(module) -> bool:  # nn.LSTM, nn.LSTMCell and rnn_ext's
    return "LSTM" in type(module).__name__


def state_sizes(module) -> list[tuple[int, ...]]:
    """Shapes of hx without the batch: [(L*D, P)] (+ [(L*D, H)] for an LSTM); cells [(H,)]."""
    if _is_cell_module(module):
        return [(module.hidden_size,)] * (2 if _is_lstm_module(module) else 1)
    layers = module.num_layers * (2 if module.bidirectional else 1)
    out = module.proj_size or module.hidden_size
    sizes = [(layers, out)]
    if _is_lstm_module(module):
        sizes.append((layers, module.hidden_size))
    return sizes


def make_input(module, T, B, dtype=torch.float64, device="cpu", gen=None, scale=1.0):
    """x ([T, B, I] for layers (batch_first respected), [B, I] for cells) and hx (batch B)."""
    gen = gen or torch.Generator().manual_seed(1)

    def rnd(*shape):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device,
                                                                                     dtype)

    if _is_cell_module(module):
        x = rnd(B, module.input_size)
        states = [rnd(B, *s) for s in state_sizes(module)]
    else:
        x = rnd(B, T, module.input_size) if module.batch_first else rnd(T, B, module.input_size)
        states = [rnd(s[0], B, s[1]) for s in state_sizes(module)]
    return x, (tuple(states) if len(states) == 2 else states[0])


def run(module, x, hx, grad_x=True, grad_hx=True, params=True, seed=5, wrap=None):
    """Forward on fresh leaf copies of x and hx (`wrap` turns the x leaf into the module's
    input, e.g. packs it), then the gradient of a fixed random projection of every output
    w.r.t. the leaves that require grad. Returns (outputs, grads), grads ordered x, hx...,
    parameters (None for a leaf that does not require grad)."""
    x = leaf(x, grad_x)
    states = None if hx is None else [leaf(h, grad_hx) for h in flatten(hx)]
    hx_arg = None if states is None else (tuple(states) if isinstance(hx, tuple) else states[0])
    outs = flatten(module(wrap(x) if wrap else x, hx_arg))
    leaves = [x] + (states or []) + ([p for p in module.parameters()] if params else [])
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o) for o in outs]
    wanted = [t for t in leaves if t.requires_grad]
    loss = sum((o * w).sum() for o, w in zip(outs, weights))
    found = iter(torch.autograd.grad(loss, wanted, allow_unused=True)) if wanted else iter(())
    grads = [next(found) if t.requires_grad else None for t in leaves]
    return [o.detach() for o in outs], grads


def assert_same_nan(a, b, what):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    assert torch.equal(a.isnan(), b.isnan()), (
        f"{what}: NaN at {a.isnan().nonzero().tolist()} but torch.nn has "
        f"{b.isnan().nonzero().tolist()}")


# =============================================================================================
# 1. Edge cases, against torch.nn
# =============================================================================================

@pytest.mark.parametrize("name,batch_first", [(n, bf) for n in LAYER_CASES for bf in (False, True)]
                         + [(n, False) for n in CELL_CASES])
def test_zero_batch(device, name, batch_first):
    """B = 0 runs forward and backward and gives torch.nn's shapes (and zero gradients)."""
    kw = ({} if MODULE_CASES[name].cell
          else dict(num_layers=2, bidirectional=True, batch_first=batch_first))
    ref, ext = make_case_pair(name, device=device, **kw)
    x, hx = make_input(ref, 3, 0, device=device)
    for given in (hx, None):
        want_out, want_grads = run(ref, x, given)
        got_out, got_grads = run(ext, x, given)
        assert [o.shape for o in got_out] == [o.shape for o in want_out]
        for i, (a, b) in enumerate(zip(got_grads, want_grads)):
            assert (a is None) == (b is None), i
            if a is not None:
                assert a.shape == b.shape and torch.equal(a, b), f"grad {i}"


@pytest.mark.parametrize("form", ["time_major", "batch_first", "unbatched"])
@pytest.mark.parametrize("name", LAYER_CASES)
def test_zero_length_sequence_raises_like_torch_nn(name, form):
    ref, ext = make_case_pair(name, batch_first=form == "batch_first")
    x = {"time_major": torch.zeros(0, 2, 3), "batch_first": torch.zeros(2, 0, 3),
         "unbatched": torch.zeros(0, 3)}[form].double()
    with pytest.raises(RuntimeError) as want:
        ref(x)
    with pytest.raises(RuntimeError) as got:
        ext(x)
    assert str(got.value) == str(want.value)


@pytest.mark.parametrize("name", list(MODULE_CASES))
def test_non_contiguous_inputs_and_states(device, name):
    """Transposed inputs, strided and stride-0 (expanded) states: torch.nn's results, and the
    values of the same call on contiguous copies."""
    kw = ({} if MODULE_CASES[name].cell
          else dict(num_layers=2, bidirectional=True, batch_first=True))
    ref, ext = make_case_pair(name, device=device, **kw)
    B = 3
    x, hx = make_input(ref, 4, B, device=device)
    if MODULE_CASES[name].cell:
        x_nc = x.t().contiguous().t()                                   # column-major [B, I]
    else:
        x_nc = x.transpose(0, 1).contiguous().transpose(0, 1)           # [B, T, I], T-major
    states = flatten(hx)
    odd = [torch.cat([s, s], -1)[..., ::2] for s in states[:1]]          # strided
    odd += [s.narrow(-2, 0, 1).expand(s.shape) for s in states[1:]]     # expanded (stride 0)
    if MODULE_CASES[name].cell and len(states) == 1:
        odd = [states[0][:1].expand(states[0].shape)]
    assert not x_nc.is_contiguous() and not any(s.is_contiguous() for s in odd)
    hx_nc = tuple(odd) if isinstance(hx, tuple) else odd[0]
    hx_c = (tuple(s.contiguous() for s in odd) if isinstance(hx, tuple)
            else odd[0].contiguous())
    want_out, want_grads = run(ref, x_nc.contiguous(), hx_c)
    with kernels_run():
        got_out, got_grads = run(ext, x_nc, hx_nc)
    for i, (a, b) in enumerate(zip(got_out, want_out)):
        assert_close(a, b, 1e-10, f"output {i}")
    for i, (a, b) in enumerate(zip(got_grads, want_grads)):
        assert_close(a, b, 1e-10, f"grad {i}")
    contiguous_out, _ = run(ext, x_nc.contiguous(), hx_c)
    for i, (a, b) in enumerate(zip(got_out, contiguous_out)):
        assert_close(a, b, 0.0, f"output {i} against the contiguous call")


def _poison(x, hx, value, cell):
    """x and hx with `value` at a few positions (a row/time step each)."""
    x = x.clone()
    if cell:
        x[0, 1] = value
    else:
        x[1, 0, 1] = value
        x[3, 2, 0] = -value if value == float("inf") else value
    states = [s.clone() for s in flatten(hx)]
    states[0][..., 1, 0] = value if value != float("inf") else 0.5  # batch row 1 of hx
    return x, (tuple(states) if isinstance(hx, tuple) else states[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(MODULE_CASES))
def test_nan_and_inf_propagate_like_torch_nn(device, name, dtype):
    """NaN in the input and in hx: outputs and all gradients are NaN exactly where torch.nn's
    are, and equal elsewhere. inf in the input: the outputs' NaN positions and finite values
    match (gradients run; where 0 * inf meets a GEMM their NaN positions are the BLAS's)."""
    kw = {} if MODULE_CASES[name].cell else dict(num_layers=2, bidirectional=True)
    ref, ext = make_case_pair(name, dtype=dtype, device=device, **kw)
    x, hx = make_input(ref, 5, 3, dtype=dtype, device=device)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    x_nan, hx_nan = _poison(x, hx, float("nan"), MODULE_CASES[name].cell)
    want_out, want_grads = run(ref, x_nan, hx_nan)
    with kernels_run():
        got_out, got_grads = run(ext, x_nan, hx_nan)
    assert any(o.isnan().any() for o in want_out)
    for i, (a, b) in enumerate(zip(got_out, want_out)):
        assert_same_nan(a, b, f"output {i}")
        assert_close(a, b, tol, f"output {i}", equal_nan=True)
    for i, (a, b) in enumerate(zip(got_grads, want_grads)):
        assert_same_nan(a, b, f"grad {i}")
        assert_close(a, b, tol, f"grad {i}", equal_nan=True)

    x_inf, hx_inf = _poison(x, hx, float("inf"), MODULE_CASES[name].cell)
    want_out, _ = run(ref, x_inf, hx_inf)
    got_out, got_grads = run(ext, x_inf, hx_inf)
    for i, (a, b) in enumerate(zip(got_out, want_out)):
        assert_same_nan(a, b, f"output {i} (inf input)")
        assert_close(a, b, tol, f"output {i} (inf input)", equal_nan=True)
    assert all(g is not None for g in got_grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_relu_backward_passes_gradient_through_nan_like_torch(device, dtype):
    """torch's relu backward is threshold_backward(grad, y, 0): `y <= 0 ? 0 : grad`, so a NaN
    activation passes its gradient on. The fused RNN relu backward must do the same, or every
    gradient upstream of a NaN differs from torch.nn's (finite there, zero here)."""
    hy = torch.tensor([[float("nan"), 1.0, 0.0, -1.0, float("inf"), -float("inf")]],
                      dtype=dtype, device=device)
    grad = torch.tensor([[2.0, 3.0, 4.0, 5.0, 6.0, 7.0]], dtype=dtype, device=device)
    want = torch.ops.aten.threshold_backward(grad, hy, 0)
    assert_close(ops.rnn_pointwise_backward(grad, hy, "relu"), want, 0, "rnn_pointwise_backward relu")
    g_xg = ops.rnn_recurrence_backward(grad, torch.zeros_like(grad), torch.eye(6, dtype=dtype,
                                  device=device), torch.zeros_like(grad), hy,
                                  torch.tensor([1]), False, "relu")[0]
    assert_close(g_xg, want, 0, "rnn_recurrence_backward relu")


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e4), (torch.float64, 1e30)],
                         ids=["f32-1e4", "f64-1e30"])
@pytest.mark.parametrize("name", list(MODULE_CASES))
def test_saturating_inputs_like_torch_nn(device, name, dtype, scale):
    """Huge inputs and states: finite wherever torch.nn's results are, and equal to them."""
    kw = {} if MODULE_CASES[name].cell else dict(num_layers=2, bidirectional=True)
    ref, ext = make_case_pair(name, dtype=dtype, device=device, **kw)
    x, hx = make_input(ref, 4, 3, dtype=dtype, device=device, scale=scale)
    want_out, want_grads = run(ref, x, hx)
    with kernels_run():
        got_out, got_grads = run(ext, x, hx)
    rel = 1e-10 if dtype == torch.float64 else 1e-4
    for what, got, want in (("output", got_out, want_out), ("grad", got_grads, want_grads)):
        for i, (a, b) in enumerate(zip(got, want)):
            finite = b.isfinite()
            assert finite.any(), f"{what} {i}: torch.nn has no finite value to compare"
            assert a[finite].isfinite().all(), f"{what} {i}: non-finite where torch.nn is finite"
            # saturated values are exact; the rest scale with the inputs
            atol = rel * max(1.0, float(b[finite].abs().max()))
            torch.testing.assert_close(a[finite], b[finite], atol=atol, rtol=rel,
                                       msg=lambda m: f"{what} {i}: {m}")


def _bad_dtype_cases(name):
    ref, _ = make_case_pair(name)
    x, hx = make_input(ref, 2, 2)
    f32_states = tuple(s.float() for s in flatten(hx))
    return {
        "int64-input": (x.long(), hx),
        "int32-input": (x.int(), hx),
        "bool-input": (x > 0, hx),
        "float32-input": (x.float(), hx),
        "float16-input": (x.half(), hx),
        "float32-hx": (x, f32_states if isinstance(hx, tuple) else f32_states[0]),
        "int-hx": (x, tuple(s.long() for s in flatten(hx)) if isinstance(hx, tuple)
                   else hx.long()),
    }


@pytest.mark.parametrize("case", ["int64-input", "int32-input", "bool-input", "float32-input",
                                  "float16-input", "float32-hx", "int-hx"])
@pytest.mark.parametrize("name", list(MODULE_CASES))
def test_integer_and_mismatched_dtypes_refused(name, case):
    """A float64 module refuses integer / bool inputs and inputs or states of another dtype,
    with torch.nn's exception type."""
    ref, ext = make_case_pair(name)
    x, hx = _bad_dtype_cases(name)[case]
    with pytest.raises(Exception) as want:
        ref(x, hx)
    with pytest.raises((RuntimeError, ValueError, TypeError)) as got:
        ext(x, hx)
    assert type(got.value) is type(want.value), (got.value, want.value)


@pytest.mark.parametrize("name", list(MODULE_CASES))
def test_second_backward_raises_like_torch_nn(device, name):
    """A second backward through freed buffers raises torch.nn's error; with retain_graph the
    second backward accumulates the same gradients again."""
    kw = {} if MODULE_CASES[name].cell else dict(num_layers=2, bidirectional=True)
    ref, ext = make_case_pair(name, device=device, **kw)
    x, hx = make_input(ref, 3, 2, device=device)
    messages = []
    for module in (ref, ext):
        loss = sum(o.sum() for o in flatten(module(leaf(x), hx)))
        loss.backward()
        with pytest.raises(RuntimeError, match="backward through the graph a second time") as e:
            loss.backward()
        messages.append(str(e.value))
    assert messages[0] == messages[1]

    grads = []
    for module in (ref, ext):
        module.zero_grad()
        xl = leaf(x)
        loss = sum(o.sum() for o in flatten(module(xl, hx)))
        loss.backward(retain_graph=True)
        once = [xl.grad.clone()] + [p.grad.clone() for p in module.parameters()]
        loss.backward()
        twice = [xl.grad] + [p.grad for p in module.parameters()]
        for a, b in zip(twice, once):
            assert_close(a, 2 * b, 1e-12, "second backward with retain_graph")
        grads.append(twice)
    for a, b in zip(*grads):
        assert_close(a, b, 1e-10, "accumulated grads vs torch.nn")


@pytest.mark.parametrize("which", ["all_states", "first_state"])
@pytest.mark.parametrize("name", list(MODULE_CASES))
def test_gradients_flow_when_only_hx_requires_grad(device, name, which):
    """Frozen parameters, an input without grad: the gradient of h0 (or of c0 alone) is
    torch.nn's."""
    kw = {} if MODULE_CASES[name].cell else dict(num_layers=2, bidirectional=True)
    ref, ext = make_case_pair(name, device=device, **kw)
    for module in (ref, ext):
        module.requires_grad_(False)
    x, hx = make_input(ref, 3, 2, device=device)
    results = []
    for module in (ref, ext):
        states = [leaf(s, which == "all_states" or i == 0) for i, s in enumerate(flatten(hx))]
        if which == "first_state" and len(states) == 2:  # an LSTM: c alone
            states = [leaf(states[0], False), leaf(states[1], True)]
        outs = flatten(module(x, tuple(states) if isinstance(hx, tuple) else states[0]))
        assert all(o.requires_grad for o in outs)
        wanted = [s for s in states if s.requires_grad]
        results.append(torch.autograd.grad(sum((o * o).sum() for o in outs), wanted))
    for a, b in zip(*results):
        assert b.abs().sum() > 0
        assert_close(a, b, 1e-10, "grad of hx")


@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "nothing_requires_grad"])
@pytest.mark.parametrize("name", list(MODULE_CASES))
def test_no_saved_state_without_grad(device, name, context):
    """Without grad the modules run the *_inference ops, which save nothing and have no
    backward, and no output carries a graph; with grad the layers' *_recurrence ops save
    their workspace."""
    kw = {} if MODULE_CASES[name].cell else dict(num_layers=2, bidirectional=True)
    _, ext = make_case_pair(name, device=device, **kw)
    x, hx = make_input(ext, 3, 2, device=device)
    if context == "nothing_requires_grad":
        ext.requires_grad_(False)
        guard = torch.enable_grad()
    else:
        guard = torch.no_grad() if context == "no_grad" else torch.inference_mode()
    with guard, OpRecorder() as rec:
        outs = flatten(ext(x, hx))
    assert all(o.grad_fn is None and not o.requires_grad for o in outs)
    if context == "inference_mode":
        assert all(o.is_inference() for o in outs)
    ops_called = [f for f, _, _ in rec.calls]
    assert len(ops_called) == (1 if MODULE_CASES[name].cell else 4), ops_called
    if context == "inference_mode":
        # Inference mode skips the autograd keys, so the dispatch mode sees the composite op
        # before it decomposes (into the inference op: grad mode is off, as under no_grad).
        assert all(f.endswith(("_cell.default", "_layer.default")) for f in ops_called), ops_called
    else:
        assert all("_inference" in f for f in ops_called), ops_called

    ext.requires_grad_(True)
    with OpRecorder() as rec:
        outs = flatten(ext(x, hx))
    assert all(o.grad_fn is not None for o in outs)
    for func, args, result in rec.calls:
        if "recurrence" in func and ("lstm" in func or "gru" in func):
            assert args[-1] is True and result[-1].shape[0] == result[0].shape[0], func


# =============================================================================================
# 2. Double backward through every module
# =============================================================================================

@pytest.mark.parametrize("name", list(MODULE_CASES))
def test_gradgradcheck_modules(device, name):
    """gradgradcheck in float64 w.r.t. the input, hx and every parameter."""
    kw = {} if MODULE_CASES[name].cell else dict(bidirectional=True)
    hidden_size = 3 if MODULE_CASES[name].proj_size else 2
    _, ext = make_case_pair(name, input_size=2, hidden_size=hidden_size, device=device,
                            **kw)
    x, hx = make_input(ext, 2, 2, device=device)
    states = flatten(hx)
    names = [n for n, _ in ext.named_parameters()]
    params = [leaf(p) for p in ext.parameters()]
    inputs = [leaf(x)] + [leaf(s) for s in states] + params

    def fn(x, *rest):
        hs, ps = rest[:len(states)], rest[len(states):]
        h = tuple(hs) if isinstance(hx, tuple) else hs[0]
        result = torch.func.functional_call(ext, dict(zip(names, ps)), (x, h))
        return tuple(flatten(result))

    with kernels_run():
        fn(*inputs)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


# =============================================================================================
# 3. Property tests: extension == reference backend == torch.nn
# =============================================================================================

PROPERTY_SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                             suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                    HealthCheck.too_slow])


@st.composite
def layer_configs(draw):
    kind = draw(st.sampled_from(KIND_NAMES))
    hidden = draw(st.integers(1, 4))
    kwargs = dict(input_size=draw(st.integers(1, 3)), hidden_size=hidden,
                  num_layers=draw(st.integers(1, 2)), bidirectional=draw(st.booleans()),
                  batch_first=draw(st.booleans()), bias=draw(st.booleans()))
    if kind == "lstm":
        kwargs["proj_size"] = draw(st.integers(0, hidden - 1))
    form = draw(st.sampled_from(["padded", "packed", "unbatched"]))
    T = draw(st.integers(1, 4))
    B = draw(st.integers(1 if form == "packed" else 0, 3))
    lengths = draw(st.lists(st.integers(1, T), min_size=B, max_size=B)) if form == "packed" \
        else None
    return dict(kind=kind, kwargs=kwargs, form=form, T=T, B=B, lengths=lengths,
                with_hx=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 16)))


def _layer_case(cfg):
    """(torch.nn module, rnn_ext module, x, hx, wrap) for a layer_configs example."""
    ref, ext = make_pair(cfg["kind"], seed=cfg["seed"], **cfg["kwargs"])
    batch = 1 if cfg["form"] == "unbatched" else cfg["B"]
    x, hx = make_input(ref, cfg["T"], batch, gen=torch.Generator().manual_seed(cfg["seed"]))
    wrap = None
    if cfg["form"] == "unbatched":
        x = x[0] if ref.batch_first else x[:, 0]
        hx = tuple(h[:, 0] for h in hx) if isinstance(hx, tuple) else hx[:, 0]
    elif cfg["form"] == "packed":
        def wrap(x):
            return pack_padded_sequence(x, cfg["lengths"], batch_first=ref.batch_first,
                                        enforce_sorted=False)
    return ref, ext, x, (hx if cfg["with_hx"] else None), wrap


def _assert_all_close(got, want, what):
    (go, gg), (wo, wg) = got, want
    assert len(go) == len(wo)
    for i, (a, b) in enumerate(zip(go, wo)):
        assert_close(a, b, 1e-10, f"{what}: output {i}")
    assert len(gg) == len(wg)
    for i, (a, b) in enumerate(zip(gg, wg)):
        assert (a is None) == (b is None), f"{what}: grad {i}"
        if a is not None:
            assert_close(a, b, 1e-10, f"{what}: grad {i}")


@PROPERTY_SETTINGS
@given(cfg=layer_configs())
def test_property_layers_match_reference_and_torch_nn(cfg):
    ref, ext, x, hx, wrap = _layer_case(cfg)
    want = run(ref, x, hx, wrap=wrap)
    with OpRecorder() as rec:
        got = run(ext, x, hx, wrap=wrap)
    if cfg["B"] > 0 or cfg["form"] == "unbatched":  # the fused ops ran
        assert KINDS[cfg["kind"]].op_name("recurrence") in rec.rnn_ext_ops()
    _assert_all_close(got, want, "extension vs torch.nn")
    with OpRecorder() as rec, backend("reference"):
        got_ref = run(ext, x, hx, wrap=wrap)
    assert not rec.calls, "the reference backend ran rnn_ext ops"
    _assert_all_close(got_ref, want, "reference backend vs torch.nn")


@st.composite
def cell_configs(draw):
    return dict(kind=draw(st.sampled_from(KIND_NAMES)), input_size=draw(st.integers(1, 4)),
                hidden_size=draw(st.integers(1, 4)), bias=draw(st.booleans()),
                B=draw(st.one_of(st.none(), st.integers(0, 3))), with_hx=draw(st.booleans()),
                seed=draw(st.integers(0, 2 ** 16)))


@PROPERTY_SETTINGS
@given(cfg=cell_configs())
def test_property_cells_match_reference_and_torch_nn(cfg):
    ref, ext = make_pair(cfg["kind"], cfg["input_size"], cfg["hidden_size"], cell=True,
                         seed=cfg["seed"], bias=cfg["bias"])
    x, hx = make_input(ref, 1, cfg["B"] or 1, gen=torch.Generator().manual_seed(cfg["seed"]))
    if cfg["B"] is None:  # unbatched
        x, hx = x[0], (tuple(h[0] for h in hx) if isinstance(hx, tuple) else hx[0])
    hx = hx if cfg["with_hx"] else None
    want = run(ref, x, hx)
    with kernels_run(KINDS[cfg["kind"]].op_name("pointwise_forward")):
        got = run(ext, x, hx)
    _assert_all_close(got, want, "extension vs torch.nn")
    with OpRecorder() as rec, backend("reference"):
        got_ref = run(ext, x, hx)
    assert not rec.calls, "the reference backend ran rnn_ext ops"
    _assert_all_close(got_ref, want, "reference backend vs torch.nn")


# =============================================================================================
# 4. Leaks, threads, determinism
# =============================================================================================

def _heap_bytes() -> int | None:
    """Bytes the C heap has handed out (glibc mallinfo2), or None where unavailable."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        info = libc.mallinfo2
    except (OSError, AttributeError):
        return None

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]

    info.restype = MallInfo2
    m = info()
    return int(m.uordblks + m.hblkhd)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _live_tensors() -> int:
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


@pytest.mark.slow
def test_memory_stays_flat_over_training_steps():
    """1000 training steps of a small LSTM (and a few hundred of a GRU and an LSTMCell): after
    warm-up the C heap, the RSS and the number of live tensors stay flat. One leaked workspace
    per step would add megabytes; one leaked small allocation per op call a few hundred KB."""
    torch.manual_seed(0)
    lstm = rnn_ext.LSTM(4, 8, num_layers=2, proj_size=4)
    gru = rnn_ext.GRU(4, 8)
    cell = rnn_ext.LSTMCell(4, 8)
    params = [*lstm.parameters(), *gru.parameters(), *cell.parameters()]
    opt = torch.optim.SGD(params, lr=1e-4)
    x = torch.randn(6, 4, 4)
    h0 = torch.zeros(2, 4, 4, requires_grad=True)
    c0 = torch.zeros(2, 4, 8)

    def step(i):
        out, (h, c) = lstm(x, (h0, c0))
        loss = out.square().mean() + h.sum() + c.sum()
        if i % 4 == 0:
            y, _ = gru(x)
            hc = cell(x[0])
            loss = loss + y.mean() + hc[0].mean() + hc[1].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        h0.grad = None

    for i in range(100):
        step(i)
    gc.collect()
    heap0, rss0, tensors0 = _heap_bytes(), _rss_bytes(), _live_tensors()
    for i in range(1000):
        step(i)
    gc.collect()
    heap1, rss1, tensors1 = _heap_bytes(), _rss_bytes(), _live_tensors()
    assert tensors1 <= tensors0, f"live tensors grew from {tensors0} to {tensors1}"
    assert rss1 - rss0 < 16 << 20, f"RSS grew by {(rss1 - rss0) >> 10} KiB over 1000 steps"
    if heap0 is not None:
        assert heap1 - heap0 < 64 << 10, f"C heap grew by {(heap1 - heap0) >> 10} KiB"


def _thread_workload(device):
    """Modules and a function computing every output and gradient of one input seed."""
    torch.manual_seed(0)
    modules = {
        "LSTM": rnn_ext.LSTM(5, 12, num_layers=2, bidirectional=True, proj_size=6),
        "GRU": rnn_ext.GRU(5, 12, batch_first=True),
        "RNN": rnn_ext.RNN(5, 12, nonlinearity="relu"),
        "LSTMCell": rnn_ext.LSTMCell(5, 12),
        "GRUCell": rnn_ext.GRUCell(5, 12),
    }
    for m in modules.values():
        m.double().to(device)

    def compute(seed):
        results = []
        for name, module in modules.items():
            gen = torch.Generator().manual_seed(seed)
            x, hx = make_input(module, 7, 6, device=device, gen=gen)
            packed = name == "LSTM" and seed % 2 == 0
            wrap = (lambda t: pack_padded_sequence(t, [7, 6, 6, 3, 2, 1])) if packed else None
            outs, grads = run(module, x, hx, seed=seed, wrap=wrap)
            results += outs + grads
        return results

    return compute


def test_threads_give_single_threaded_results(device):
    """Forward and backward from 4 Python threads at once, on shared modules: each thread's
    outputs and gradients equal the single-threaded ones bitwise."""
    compute = _thread_workload(device)
    seeds = list(range(8))
    expected = {seed: compute(seed) for seed in seeds}
    barrier = threading.Barrier(4)
    errors: list[str] = []

    def worker(k):
        try:
            barrier.wait()
            for rep in range(6):
                seed = seeds[(k + rep) % len(seeds)]
                got = compute(seed)
                for i, (a, b) in enumerate(zip(got, expected[seed])):
                    if not torch.equal(a, b):
                        errors.append(f"thread {k} seed {seed} tensor {i}: max diff "
                                      f"{(a - b).abs().max().item():.3g}")
        except Exception as e:  # noqa: BLE001
            errors.append(f"thread {k}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, "\n".join(errors[:10])


@pytest.mark.sanitize
@pytest.mark.parametrize("form", ["padded", "packed"])
@pytest.mark.parametrize("name", ["RNN-tanh", "LSTM", "GRU"])
def test_threaded_float32_step_matches_torch_nn(name, form):
    """float32 steps of over 2^20 multiply-adds on 2 intra-op threads, with a batch of 121
    rows, which 2 threads cannot split by rows: each step splits by units (2 blocks of 48
    units, one packed GEMM and pointwise kernel per thread, a barrier per step); a packed
    sequence's shrinking (forward) and growing (reverse) steps take the unfused path. Outputs
    and gradients are torch.nn's."""
    # RNN: 121 * 96 * 96 multiply-adds a step (GRU x3, LSTM x4)
    ref, ext = make_case_pair(name, dtype=torch.float32, input_size=8, hidden_size=96,
                              bidirectional=True)
    x, hx = make_input(ref, 3, 121, dtype=torch.float32)
    wrap = None
    if form == "packed":
        def wrap(t):
            return pack_padded_sequence(t, [3] * 41 + [2] * 40 + [1] * 40)
    want_out, want_grads = run(ref, x, hx, wrap=wrap)
    with intra_op_threads(2), kernels_run():
        got_out, got_grads = run(ext, x, hx, wrap=wrap)
    for what, got, want in (("output", got_out, want_out), ("grad", got_grads, want_grads)):
        for i, (a, b) in enumerate(zip(got, want)):
            scale = max(1.0, float(b.abs().max()))
            torch.testing.assert_close(a, b, atol=2e-5 * scale, rtol=1e-4,
                                       msg=lambda m: f"{what} {i}: {m}")


def _run_modules(names, device, dtype, batch, hidden, steps, **layer_kwargs):
    """Outputs and gradients of fresh seeded modules `names` on seeded inputs, in one list."""
    results = []
    for name in names:
        kw = {} if MODULE_CASES[name].cell else layer_kwargs
        _, ext = make_case_pair(name, dtype=dtype, device=device, seed=7, input_size=8,
                                hidden_size=hidden, **kw)
        x, hx = make_input(ext, steps, batch, dtype=dtype, device=device,
                           gen=torch.Generator().manual_seed(3))
        outs, grads = run(ext, x, hx)
        results += outs + grads
    return results


@pytest.mark.slow
def test_bitwise_deterministic_run_to_run(device):
    """Two runs with the same seed give identical outputs and gradients (torch.equal): every
    module, packed into 2 bidirectional layers, in float32 and float64; then with 2 intra-op
    threads and a batch large enough that the CPU kernels split their rows over them."""
    def once():
        torch.manual_seed(123)
        results = []
        for dtype in (torch.float32, torch.float64):
            results += _run_modules(list(MODULE_CASES), device, dtype, 5, 6, 4, num_layers=2,
                                    bidirectional=True)
        with intra_op_threads(2):  # hidden 64: 32 (LSTM) to 128 (RNN) rows per task
            results += _run_modules(["LSTM-proj", "GRU", "RNN-tanh", "LSTMCell", "GRUCell"],
                                    device, torch.float32, 520, 64, 1, bidirectional=True)
        return results

    first, second = once(), once()
    assert len(first) == len(second) > 50
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"tensor {i} differs between runs"
