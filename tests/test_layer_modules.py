"""The drop-in layers rnn_ext.RNN / LSTM / GRU against torch.nn.

Ground truth is torch.nn with the same weights (load_state_dict(strict=True)), and rnn_ext's
reference backend. Sizes are kept small so that the file runs in well under a minute on two CPU
cores.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnn_ext
from helpers import (CUDA_ONLY, KIND_NAMES, KINDS, OpRecorder, assert_close, autograd_node,
                     backend, graph_node_names, hidden_list, intra_op_threads, kernels_run,
                     make_pair, rel_err)

pytestmark = [
    pytest.mark.usefixtures("extension", "one_thread"),
    # torch.nn's own notice when it runs an LSTM with projections on the CPU
    pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN"),
]

# Small sizes of the exhaustive parity product.
I, H, T, B, P = 3, 4, 5, 3, 3
SORTED_LENGTHS = [5, 3, 2]
UNSORTED_LENGTHS = [3, 5, 2]
FORMS = ("padded", "unbatched", "packed_sorted", "packed_unsorted")


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


# ------------------------------------------------------------ full float64 parity with torch.nn

def _parity_cases():
    cases = []
    for kind in KIND_NAMES:
        projs = (0, P) if kind == "lstm" else (0,)
        for layers, bidir, bf, bias, proj, form, given in itertools.product(
                (1, 2), (False, True), (False, True), (True, False), projs, FORMS, (False, True)):
            cid = (f"{kind}-L{layers}-{'bi' if bidir else 'uni'}-{'bf' if bf else 'tf'}-"
                   f"{'bias' if bias else 'nobias'}-p{proj}-{form}-{'h0' if given else 'noh0'}")
            cases.append(pytest.param(kind, layers, bidir, bf, bias, proj, form, given, id=cid))
    return cases


def check_parity(kind, layers, bidir, batch_first, bias, proj, form, h0_given, device="cpu",
                 expect_ops=True):
    kwargs = dict(input_size=I, hidden_size=H, num_layers=layers, bidirectional=bidir,
                  batch_first=batch_first, bias=bias)
    if proj:
        kwargs["proj_size"] = proj
    ref, ext = make_pair(kind, device=device, **kwargs)
    lstm = kind == "lstm"
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
    uses_op = any(autograd_node(KINDS[kind].op_base("recurrence")) in n for n in names)
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


@pytest.mark.parametrize("kind,layers,bidir,batch_first,bias,proj,form,h0_given", _parity_cases())
def test_float64_parity_with_torch_nn(kind, layers, bidir, batch_first, bias, proj, form,
                                      h0_given):
    assert rnn_ext.backend() == "extension"
    check_parity(kind, layers, bidir, batch_first, bias, proj, form, h0_given)


@pytest.mark.parametrize("kind,layers,bidir,batch_first,bias,proj,form,h0_given", [
    ("rnn_tanh", 2, True, False, True, 0, "padded", True),
    ("rnn_relu", 1, False, True, False, 0, "unbatched", False),
    ("lstm", 2, True, True, True, P, "packed_unsorted", True),
    ("lstm", 1, False, False, False, 0, "packed_sorted", False),
    ("gru", 2, True, True, True, 0, "packed_unsorted", True),
    ("gru", 1, False, False, False, 0, "padded", True),
])
def test_float64_parity_reference_backend(kind, layers, bidir, batch_first, bias, proj, form,
                                          h0_given):
    with backend("reference"):
        check_parity(kind, layers, bidir, batch_first, bias, proj, form, h0_given,
                     expect_ops=False)


@pytest.mark.parametrize("missing", ["b_ih", "b_hh"])
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_functional_layer_with_one_bias(device, kind, missing):
    """functional.recurrent_layer with only one of the two biases (the kernels fold b_ih into
    the step's bias for RNN and LSTM): outputs and gradients match the reference backend."""
    G = KINDS[kind].gates
    torch.manual_seed(0)
    args = {"x": torch.randn(T * B, I), "h0": torch.randn(B, H), "w_ih": torch.randn(G * H, I),
            "w_hh": torch.randn(G * H, H), "b_ih": torch.randn(G * H), "b_hh": torch.randn(G * H)}
    args = {k: v.to(device, torch.float64).requires_grad_() for k, v in args.items()}
    args[missing] = None
    c0 = torch.randn(B, H, dtype=torch.float64, device=device) if kind == "lstm" else None
    batch_sizes = torch.full((T,), B, dtype=torch.int64)
    leaves = [v for v in args.values() if v is not None]

    def run():
        y, h_n, _ = rnn_ext.functional.recurrent_layer(
            KINDS[kind].mode, args["x"], batch_sizes, args["h0"], c0, args["w_ih"],
            args["w_hh"], args["b_ih"], args["b_hh"])
        return (y, h_n, *torch.autograd.grad((y.sum() + h_n.sum()), leaves))

    with kernels_run(KINDS[kind].op_name("recurrence"), KINDS[kind].op_name("recurrence_backward")):
        extension = run()
    with backend("reference"):
        reference = run()
    for ours, theirs in zip(extension, reference, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", KIND_NAMES)
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=CUDA_ONLY)], indirect=True)
def test_parity_on_cuda(device, kind):
    """One configuration of the float64 parity product above (two bidirectional layers, packed
    and unsorted, h0 given, a projection for the LSTM) on CUDA."""
    check_parity(kind, 2, True, True, True, P if kind == "lstm" else 0, "packed_unsorted", True,
                 device=device)


@pytest.mark.sanitize
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_fused_backward_op_runs(device, kind):
    """A plain backward goes through the fused *_recurrence_backward op, not the reference."""
    _, ext = make_pair(kind, input_size=I, hidden_size=H, num_layers=2, bidirectional=True,
                       device=device)
    x = torch.randn(T, B, I, dtype=torch.float64, device=device, requires_grad=True)
    out, _ = ext(x)
    op = KINDS[kind].op_base("recurrence_backward")
    with OpRecorder() as rec:
        out.sum().backward()
    calls = [n for n in rec.names if op in n]
    assert len(calls) == 4, rec.names  # 2 layers x 2 directions

    with OpRecorder() as rec:
        with torch.no_grad():
            ext(x)
    assert [n for n in rec.names if "recurrence" in n] == [], rec.names
    inference_calls = [n for n in rec.names if KINDS[kind].op_base("layer_inference") in n]
    assert len(inference_calls) == 4, rec.names


@pytest.mark.sanitize
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_inference_saves_nothing(device, kind):
    """Without grad the layer runs as its *_layer_inference op (x projected inside, no
    workspace, no graph); with grad, the differentiable op saves its workspace."""
    _, ext = make_pair(kind, input_size=I, hidden_size=H, device=device)
    x = torch.randn(T, B, I, dtype=torch.float64, device=device)
    with torch.no_grad(), OpRecorder() as rec:
        out, _ = ext(x)
    inference_op = KINDS[kind].op_base("layer_inference")
    assert [name for name, _, _ in rec.calls] == [KINDS[kind].op_name("layer_inference")]
    assert out.grad_fn is None
    with OpRecorder() as rec:
        ext(x)
    [(name, args, results)] = rec.calls
    assert name == KINDS[kind].op_name("recurrence")
    if kind in ("lstm", "gru"):
        assert args[-1] is True and results[-1].shape[0] == T * B


# Sizes whose input projection exceeds the 16 MB that the inference ops project at once
# (InputGates::kChunkBytes; in float64): G*H = 256 or 288 columns, 2 KB or more per row.
CHUNKED_HIDDEN = {"rnn_tanh": 256, "rnn_relu": 256, "lstm": 64, "gru": 96}


@pytest.mark.sanitize
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_inference_in_chunks_matches_torch_nn(device, kind):
    """A packed, bidirectional two-layer sequence long enough that the inference op projects the
    input in several chunks of steps (forward in row order, reverse from the end), with biases
    and (LSTM) a projection: outputs and states match torch.nn's and those of the
    differentiable path, which projects the whole input at once."""
    lstm = kind == "lstm"
    ref, ext = make_pair(kind, device=device, input_size=16, hidden_size=CHUNKED_HIDDEN[kind],
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
    inference_op = KINDS[kind].op_base("layer_inference")
    assert KINDS[kind].op_name("layer_inference") in rec.rnn_ext_ops()
    grad_out, grad_hidden = ext(x)  # the differentiable op: xg whole
    assert_close(ext_out.data, ref_out.data, 1e-10, "output")
    assert_close(ext_out.data, grad_out.data, 1e-12, "output against the grad path")
    for a, b, c in zip(hidden_list(ext_hidden), hidden_list(ref_hidden),
                       hidden_list(grad_hidden)):
        assert_close(a, b, 1e-10, "state")
        assert_close(a, c, 1e-12, "state against the grad path")


@pytest.mark.sanitize
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_inference_step_larger_than_a_chunk(kind):
    """A batch whose one step's projection exceeds the chunk size: one step per chunk."""
    ref, ext = make_pair(kind, input_size=8, hidden_size=CHUNKED_HIDDEN[kind])
    x = torch.randn(3, 8400, 8, dtype=torch.float64)
    assert x.shape[1] * 256 * 8 > 16 << 20
    with torch.no_grad():
        ext_out, ext_hidden = ext(x)
        ref_out, ref_hidden = ref(x)
    assert_close(ext_out, ref_out, 1e-10, "output")
    for a, b in zip(hidden_list(ext_hidden), hidden_list(ref_hidden)):
        assert_close(a, b, 1e-10, "state")


def test_double_backward_through_module(device):
    _, ext = make_pair("lstm", input_size=2, hidden_size=3, bidirectional=True, proj_size=2,
                       device=device)
    x = torch.randn(3, 2, 2, dtype=torch.float64, device=device, requires_grad=True)
    h0 = torch.randn(2, 2, 2, dtype=torch.float64, device=device, requires_grad=True)
    c0 = torch.randn(2, 2, 3, dtype=torch.float64, device=device, requires_grad=True)

    def fn(x, h0, c0):
        out, (h, c) = ext(x, (h0, c0))
        return out, h, c

    assert torch.autograd.gradgradcheck(fn, (x, h0, c0))


# -------------------------------------------------------------------------------------- dropout

@pytest.mark.parametrize("kind", KIND_NAMES)
def test_dropout(kind):
    ref, ext = make_pair(kind, input_size=I, hidden_size=H, num_layers=3, dropout=0.5,
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


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_dropout_one_zeroes_inputs_of_later_layers(kind):
    """With p=1 every layer after the first sees zeros: the output equals a one-layer module
    with the last layer's weights run on a zero input."""
    ref, ext = make_pair(kind, input_size=I, hidden_size=H, num_layers=2, dropout=1.0)
    ext.train()
    x = torch.randn(T, B, I, dtype=torch.float64)
    out, _ = ext(x)
    ref_cls, extra = KINDS[kind].nn_layer, KINDS[kind].module_kwargs
    last = ref_cls(H, H, **extra).double()
    last.load_state_dict({k.replace("_l1", "_l0"): v for k, v in ref.state_dict().items()
                          if "_l1" in k}, strict=True)
    expected, _ = last(torch.zeros(T, B, H, dtype=torch.float64))
    assert_close(out, expected, 1e-10, "output with dropout=1")


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_dropout_with_one_layer_warns(kind):
    ref_cls, ext_cls, extra = KINDS[kind].nn_layer, KINDS[kind].layer, KINDS[kind].module_kwargs
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
    ("rnn_tanh", dict(num_layers=2, bidirectional=True)),
    ("rnn_relu", dict(num_layers=1, bias=False)),
    ("lstm", dict(num_layers=2, bidirectional=True, proj_size=2)),
    ("lstm", dict(num_layers=3, bias=False, batch_first=True)),
    ("gru", dict(num_layers=2, bidirectional=True, bias=False)),
]


@pytest.mark.parametrize("kind,kwargs", CONSTRUCTOR_CONFIGS)
def test_parameters_match_torch_nn(kind, kwargs):
    ref_cls, ext_cls, extra = KINDS[kind].nn_layer, KINDS[kind].layer, KINDS[kind].module_kwargs
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


@pytest.mark.parametrize("kind,kwargs", CONSTRUCTOR_CONFIGS)
def test_state_dicts_load_both_ways(kind, kwargs):
    ref_cls, ext_cls, extra = KINDS[kind].nn_layer, KINDS[kind].layer, KINDS[kind].module_kwargs
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
    ref, ext = make_pair("gru", input_size=I, hidden_size=H)
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
    ("lstm", dict(proj_size=H)),
    ("lstm", dict(proj_size=H + 1)),
    ("lstm", dict(proj_size=-1)),
    ("gru", dict(proj_size=2)),
    ("rnn_tanh", dict(proj_size=2)),
    ("lstm", dict(dropout=1.5)),
    ("gru", dict(dropout=-0.1)),
    ("rnn_tanh", dict(dropout=True)),
    ("lstm", dict(dropout="0.5")),
    ("rnn_sigmoid", dict(nonlinearity="sigmoid")),
    ("gru", dict(hidden_size=0)),
    ("lstm", dict(num_layers=0)),
    ("rnn_tanh", dict(input_size=0)),
    ("lstm", dict(hidden_size=4.0)),
    ("gru", dict(bias=1)),
    ("lstm", dict(batch_first="yes")),
]


@pytest.mark.parametrize("kind,kwargs", CONSTRUCTOR_ERRORS,
                         ids=[f"{m}-{k}" for m, k in CONSTRUCTOR_ERRORS])
def test_constructor_errors_match_torch_nn(kind, kwargs):
    if kind == "rnn_sigmoid":  # no such kind: the nonlinearity is the error
        ref_cls, ext_cls, extra = nn.RNN, rnn_ext.RNN, {}
    else:
        k = KINDS[kind]
        ref_cls, ext_cls, extra = k.nn_layer, k.layer, k.module_kwargs
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


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_input_dims_error_matches_torch_nn(kind):
    ref, ext = make_pair(kind, dtype=torch.float32, input_size=I, hidden_size=H)
    for bad in (torch.randn(2, T, B, I), torch.randn(I)):
        error = _both_raise(ref, ext, bad)
        assert isinstance(error, ValueError)


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_forward_errors_match_torch_nn(kind):
    ref, ext = make_pair(kind, dtype=torch.float32, input_size=I, hidden_size=H, num_layers=2)
    lstm = kind == "lstm"

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
    ref, ext = make_pair("lstm", dtype=torch.float32, input_size=I, hidden_size=H, proj_size=2)
    x = torch.randn(T, B, I)
    # h0 must have proj_size columns, c0 hidden_size
    _both_raise(ref, ext, x, (torch.zeros(1, B, H), torch.zeros(1, B, H)))
    _both_raise(ref, ext, x, (torch.zeros(1, B, 2), torch.zeros(1, B, 2)))


# ------------------------------------------------------------------- float32 / bfloat16 parity

REALISTIC = [("rnn_tanh", 0), ("rnn_relu", 0), ("lstm", 0), ("lstm", 64), ("gru", 0)]


@pytest.mark.parametrize("kind,proj", REALISTIC)
def test_float32_parity_realistic(device, kind, proj):
    Tr, Br, Ir, Hr = 20, 16, 64, 128
    kwargs = dict(input_size=Ir, hidden_size=Hr, num_layers=2, bidirectional=True)
    if proj:
        kwargs["proj_size"] = proj
    ref, ext = make_pair(kind, dtype=torch.float32, device=device, **kwargs)
    if kind == "rnn_relu":  # keep the relu recurrence from blowing up over 20 steps
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
    if kind == "lstm":
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


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_bfloat16_forward_against_float32(kind):
    """bfloat16 on the CPU (computed in float32 inside the kernels) against torch.nn in float32
    on the same bfloat16-representable weights and inputs."""
    kwargs = dict(input_size=16, hidden_size=32, num_layers=2, bidirectional=True)
    ref, ext = make_pair(kind, dtype=torch.float32, **kwargs)
    ext = ext.to(torch.bfloat16)
    ref.load_state_dict({k: v.float() for k, v in ext.state_dict().items()}, strict=True)
    torch.manual_seed(6)
    x = torch.randn(10, 4, 16).to(torch.bfloat16)
    h0 = (0.5 * torch.randn(4, 4, 32)).to(torch.bfloat16)
    hx = (h0, h0) if kind == "lstm" else h0
    ext_out, ext_h = ext(x, hx)
    assert ext_out.dtype == torch.bfloat16
    node = autograd_node(KINDS[kind].op_base("recurrence"))
    assert node in "".join(graph_node_names(ext_out)) or not ext_out.requires_grad
    hx32 = tuple(h.float() for h in hx) if kind == "lstm" else hx.float()
    ref_out, ref_h = ref(x.float(), hx32)
    assert_close(ext_out.float(), ref_out, 5e-2, "bfloat16 output")
    for a, b in zip(hidden_list(ext_h), hidden_list(ref_h)):
        assert a.dtype == torch.bfloat16
        assert_close(a.float(), b, 5e-2, "bfloat16 state")


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_bfloat16_backward_runs_and_is_close(kind):
    kwargs = dict(input_size=8, hidden_size=16)
    ref, ext = make_pair(kind, dtype=torch.float32, **kwargs)
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


@pytest.mark.sanitize
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_parallel_rows(kind):
    """On 2 intra-op threads, a float64 batch of 1100 rows: the CPU pointwise kernels split
    their rows into tasks (8192 gate values per task, with hidden 64: 128 rows per task for
    RNN, 42 for GRU, 32 for LSTM) and the steps split the batch by rows (2 x 550 rows, w_hh far
    below the cache bound). Forward and backward give torch.nn's results."""
    ref, ext = make_pair(kind, input_size=8, hidden_size=64)
    x = torch.randn(2, 1100, 8, dtype=torch.float64, requires_grad=True)
    with intra_op_threads(2), kernels_run(KINDS[kind].op_name("recurrence"),
                                          KINDS[kind].op_name("recurrence_backward")):
        ext_out, _ = ext(x)
        w = torch.randn_like(ext_out)
        got = torch.autograd.grad((ext_out * w).sum(), [x, *ext.parameters()])
    ref_out, _ = ref(x)
    assert_close(ext_out, ref_out, 1e-10, "output")
    want = torch.autograd.grad((ref_out * w).sum(), [x, *ref.parameters()])
    for a, b in zip(got, want):
        assert_close(a, b, 1e-10, "grad")


@pytest.mark.sanitize
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("batch", [32, 30], ids=["split_by_rows", "split_by_units"])
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_steps_on_two_threads(kind, batch, dtype):
    """The CPU's multi-threaded steps, forward and backward, in both of their work splits (a
    batch of 2 x 16 rows runs each half as its own sequence where w_hh fits a core's cache;
    30 rows split the hidden units in float32, with a barrier per step), over a packed,
    bidirectional input whose later steps shrink the batch (those run unfused) and whose
    reverse direction joins states: outputs and gradients match torch.nn's (in float32 for a
    bfloat16 layer, on the same bfloat16 values)."""
    tol = {torch.float32: 2e-5, torch.float64: 1e-10, torch.bfloat16: 5e-2}[dtype]
    ref_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    with intra_op_threads(2):
        # H = 192: every step's GEMM is past the size that runs on one thread
        ref, ext = make_pair(kind, dtype=ref_dtype, input_size=24, hidden_size=192,
                             bidirectional=True)
        ext = ext.to(dtype)
        ref.load_state_dict({k: v.to(ref_dtype) for k, v in ext.state_dict().items()})
        torch.manual_seed(1)
        lengths = [7] * (batch - 4) + [5, 4, 2, 1]
        x = torch.randn(7, batch, 24).to(dtype)
        with kernels_run(KINDS[kind].op_name("recurrence")):
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
