"""Fake (meta) and autograd registrations of torch.ops.rnn_ext.

Each forward op's backward runs the fused backward op. When the caller asked for a graph of the
gradient (create_graph=True: grad mode is on inside backward), it instead differentiates the
reference formulas, so double backward works. Imported by rnn_ext only when the library loaded.
Shapes as in csrc/registration.cpp.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from . import reference

ops = torch.ops.rnn_ext

_LAYER_MODE = {"tanh": "RNN_TANH", "relu": "RNN_RELU"}


def _bias_grad(grad: Tensor, bias: Tensor | None) -> Tensor | None:
    return None if bias is None else grad.sum(0)


def _differentiate(fn: Callable[..., Sequence[Tensor]], inputs: Sequence[Tensor | None],
                   grads: Sequence[Tensor]) -> list[Tensor | None]:
    """Gradients of fn(*inputs) w.r.t. `inputs`, as a graph (double backward)."""
    outputs = fn(*inputs)
    pairs = [(o, g) for o, g in zip(outputs, grads) if o is not None and o.requires_grad]
    wrt = [i for i in inputs if i is not None and i.requires_grad]
    if not pairs or not wrt:
        return [None] * len(inputs)
    found = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs],
                                     create_graph=True, allow_unused=True))
    return [next(found) if i is not None and i.requires_grad else None for i in inputs]


def _saved(ctx) -> list[Tensor | None]:
    tensors = iter(ctx.saved_tensors)
    return [next(tensors) if present else None for present in ctx.present]


def _save(ctx, *tensors: Tensor | None) -> None:
    ctx.present = [t is not None for t in tensors]
    ctx.save_for_backward(*[t for t in tensors if t is not None])
    # Outputs the loss does not use (the workspace always, often the final states) get None,
    # not a materialised zero tensor: the workspace's would be as large as the gates.
    ctx.set_materialize_grads(False)


def _or_zeros(grad: Tensor | None, like: Tensor) -> Tensor:
    """An output's gradient; zeros (of the output's shape `like`) where the loss did not use it."""
    return torch.zeros_like(like) if grad is None else grad


# ---------------------------------------------------------------- cells

@torch.library.register_fake("rnn_ext::rnn_cell_forward")
def _(xg, hg, b_ih, b_hh, nonlinearity):
    return xg.new_empty(xg.shape)


@torch.library.register_fake("rnn_ext::rnn_cell_backward")
def _(grad_hy, hy, nonlinearity):
    return grad_hy.new_empty(grad_hy.shape)


def _rnn_cell_setup(ctx, inputs, output):
    xg, hg, b_ih, b_hh, ctx.nonlinearity = inputs
    _save(ctx, xg, hg, b_ih, b_hh, output)


def _rnn_cell_backward(ctx, grad_hy):
    xg, hg, b_ih, b_hh, hy = _saved(ctx)
    grad_hy = _or_zeros(grad_hy, hy)
    if torch.is_grad_enabled():
        step = lambda *a: (reference.rnn_cell_step(*a, ctx.nonlinearity),)  # noqa: E731
        return (*_differentiate(step, [xg, hg, b_ih, b_hh], [grad_hy]), None)
    grad = ops.rnn_cell_backward(grad_hy, hy, ctx.nonlinearity)
    return grad, grad, _bias_grad(grad, b_ih), _bias_grad(grad, b_hh), None


torch.library.register_autograd("rnn_ext::rnn_cell_forward", _rnn_cell_backward,
                                setup_context=_rnn_cell_setup)


@torch.library.register_fake("rnn_ext::lstm_cell_forward")
def _(xg, hg, b_ih, b_hh, cx):
    return cx.new_empty(cx.shape), cx.new_empty(cx.shape), cx.new_empty(cx.shape[0], 5 * cx.shape[1])


@torch.library.register_fake("rnn_ext::lstm_cell_backward")
def _(grad_hy, grad_cy, workspace):
    return grad_hy.new_empty(grad_hy.shape[0], 4 * grad_hy.shape[1]), grad_cy.new_empty(grad_cy.shape)


def _lstm_cell_setup(ctx, inputs, output):
    _save(ctx, *inputs, output[2])


def _lstm_cell_backward(ctx, grad_hy, grad_cy, _grad_workspace):
    xg, hg, b_ih, b_hh, cx, workspace = _saved(ctx)
    grad_hy, grad_cy = _or_zeros(grad_hy, cx), _or_zeros(grad_cy, cx)
    if torch.is_grad_enabled():
        return tuple(_differentiate(reference.lstm_cell_step, [xg, hg, b_ih, b_hh, cx],
                                    [grad_hy, grad_cy]))
    grad_gates, grad_cx = ops.lstm_cell_backward(grad_hy, grad_cy, workspace)
    return (grad_gates, grad_gates, _bias_grad(grad_gates, b_ih), _bias_grad(grad_gates, b_hh),
            grad_cx)


torch.library.register_autograd("rnn_ext::lstm_cell_forward", _lstm_cell_backward,
                                setup_context=_lstm_cell_setup)


@torch.library.register_fake("rnn_ext::gru_cell_forward")
def _(xg, hg, b_ih, b_hh, hx):
    return hx.new_empty(hx.shape), hx.new_empty(hx.shape[0], 5 * hx.shape[1])


@torch.library.register_fake("rnn_ext::gru_cell_backward")
def _(grad_hy, workspace):
    gates = grad_hy.new_empty(grad_hy.shape[0], 3 * grad_hy.shape[1])
    return gates, torch.empty_like(gates), grad_hy.new_empty(grad_hy.shape)


def _gru_cell_setup(ctx, inputs, output):
    _save(ctx, *inputs, output[1])


def _gru_cell_backward(ctx, grad_hy, _grad_workspace):
    xg, hg, b_ih, b_hh, hx, workspace = _saved(ctx)
    grad_hy = _or_zeros(grad_hy, hx)
    if torch.is_grad_enabled():
        step = lambda *a: (reference.gru_cell_step(*a),)  # noqa: E731
        return tuple(_differentiate(step, [xg, hg, b_ih, b_hh, hx], [grad_hy]))
    grad_xg, grad_hg, grad_hx = ops.gru_cell_backward(grad_hy, workspace)
    return grad_xg, grad_hg, _bias_grad(grad_xg, b_ih), _bias_grad(grad_hg, b_hh), grad_hx


torch.library.register_autograd("rnn_ext::gru_cell_forward", _gru_cell_backward,
                                setup_context=_gru_cell_setup)


# ---------------------------------------------------------------- layers

def _layer_reference(mode: str, batch_sizes: Tensor, reverse: bool):
    """reference.layer_recurrence over the differentiable inputs, for _differentiate."""
    def run(xg, w_hh, b_hh, w_hr, h0, c0):
        return reference.layer_recurrence(mode, xg, w_hh, b_hh, w_hr, h0, c0, batch_sizes, reverse)
    return run


@torch.library.register_fake("rnn_ext::rnn_layer_forward")
def _(xg, w_hh, b_hh, h0, batch_sizes, reverse, nonlinearity):
    return xg.new_empty(xg.shape[0], h0.shape[1]), h0.new_empty(h0.shape)


@torch.library.register_fake("rnn_ext::rnn_layer_backward")
def _(grad_y, grad_h_n, w_hh, h0, y, batch_sizes, reverse, nonlinearity):
    return (grad_y.new_empty(grad_y.shape[0], w_hh.shape[0]), w_hh.new_empty(w_hh.shape),
            w_hh.new_empty(w_hh.shape[0]), h0.new_empty(h0.shape))


def _rnn_layer_setup(ctx, inputs, output):
    xg, w_hh, b_hh, h0, ctx.batch_sizes, ctx.reverse, ctx.nonlinearity = inputs
    _save(ctx, xg, w_hh, b_hh, h0, output[0])


def _rnn_layer_backward(ctx, grad_y, grad_h_n):
    xg, w_hh, b_hh, h0, y = _saved(ctx)
    grad_y, grad_h_n = _or_zeros(grad_y, y), _or_zeros(grad_h_n, h0)
    if torch.is_grad_enabled():
        run = _layer_reference(_LAYER_MODE[ctx.nonlinearity], ctx.batch_sizes, ctx.reverse)
        g_xg, g_w_hh, g_b_hh, _, g_h0, _ = _differentiate(
            run, [xg, w_hh, b_hh, None, h0, None], [grad_y, grad_h_n])
        return g_xg, g_w_hh, g_b_hh, g_h0, None, None, None
    g_xg, g_w_hh, g_b_hh, g_h0 = ops.rnn_layer_backward(
        grad_y, grad_h_n, w_hh, h0, y, ctx.batch_sizes, ctx.reverse, ctx.nonlinearity)
    return g_xg, g_w_hh, (g_b_hh if b_hh is not None else None), g_h0, None, None, None


torch.library.register_autograd("rnn_ext::rnn_layer_forward", _rnn_layer_backward,
                                setup_context=_rnn_layer_setup)


@torch.library.register_fake("rnn_ext::lstm_layer_forward")
def _(xg, w_hh, b_hh, w_hr, h0, c0, batch_sizes, reverse, save_workspace):
    rows = xg.shape[0] if save_workspace else 0
    return (xg.new_empty(xg.shape[0], h0.shape[1]), h0.new_empty(h0.shape), c0.new_empty(c0.shape),
            xg.new_empty(rows, 5 * c0.shape[1]))


@torch.library.register_fake("rnn_ext::lstm_layer_backward")
def _(grad_y, grad_h_n, grad_c_n, w_hh, w_hr, h0, y, workspace, batch_sizes, reverse):
    grad_w_hr = w_hr.new_empty(w_hr.shape) if w_hr is not None else w_hh.new_empty(0)
    return (grad_y.new_empty(grad_y.shape[0], w_hh.shape[0]), w_hh.new_empty(w_hh.shape),
            w_hh.new_empty(w_hh.shape[0]), h0.new_empty(h0.shape), grad_c_n.new_empty(grad_c_n.shape),
            grad_w_hr)


def _lstm_layer_setup(ctx, inputs, output):
    xg, w_hh, b_hh, w_hr, h0, c0, ctx.batch_sizes, ctx.reverse, _ = inputs
    _save(ctx, xg, w_hh, b_hh, w_hr, h0, c0, output[0], output[3])


def _lstm_layer_backward(ctx, grad_y, grad_h_n, grad_c_n, _grad_workspace):
    xg, w_hh, b_hh, w_hr, h0, c0, y, workspace = _saved(ctx)
    grad_y, grad_h_n = _or_zeros(grad_y, y), _or_zeros(grad_h_n, h0)
    grad_c_n = _or_zeros(grad_c_n, c0)
    if torch.is_grad_enabled():
        run = _layer_reference("LSTM", ctx.batch_sizes, ctx.reverse)
        g_xg, g_w_hh, g_b_hh, g_w_hr, g_h0, g_c0 = _differentiate(
            run, [xg, w_hh, b_hh, w_hr, h0, c0], [grad_y, grad_h_n, grad_c_n])
    else:
        g_xg, g_w_hh, g_b_hh, g_h0, g_c0, g_w_hr = ops.lstm_layer_backward(
            grad_y, grad_h_n, grad_c_n, w_hh, w_hr, h0, y, workspace, ctx.batch_sizes, ctx.reverse)
    return (g_xg, g_w_hh, g_b_hh if b_hh is not None else None,
            g_w_hr if w_hr is not None else None, g_h0, g_c0, None, None, None)


torch.library.register_autograd("rnn_ext::lstm_layer_forward", _lstm_layer_backward,
                                setup_context=_lstm_layer_setup)


@torch.library.register_fake("rnn_ext::gru_layer_forward")
def _(xg, w_hh, b_hh, h0, batch_sizes, reverse, save_workspace):
    rows = xg.shape[0] if save_workspace else 0
    return (xg.new_empty(xg.shape[0], h0.shape[1]), h0.new_empty(h0.shape),
            xg.new_empty(rows, 5 * h0.shape[1]))


@torch.library.register_fake("rnn_ext::gru_layer_backward")
def _(grad_y, grad_h_n, w_hh, h0, y, workspace, batch_sizes, reverse):
    return (grad_y.new_empty(grad_y.shape[0], w_hh.shape[0]), w_hh.new_empty(w_hh.shape),
            w_hh.new_empty(w_hh.shape[0]), h0.new_empty(h0.shape))


def _gru_layer_setup(ctx, inputs, output):
    xg, w_hh, b_hh, h0, ctx.batch_sizes, ctx.reverse, _ = inputs
    _save(ctx, xg, w_hh, b_hh, h0, output[0], output[2])


def _gru_layer_backward(ctx, grad_y, grad_h_n, _grad_workspace):
    xg, w_hh, b_hh, h0, y, workspace = _saved(ctx)
    grad_y, grad_h_n = _or_zeros(grad_y, y), _or_zeros(grad_h_n, h0)
    if torch.is_grad_enabled():
        run = _layer_reference("GRU", ctx.batch_sizes, ctx.reverse)
        g_xg, g_w_hh, g_b_hh, _, g_h0, _ = _differentiate(
            run, [xg, w_hh, b_hh, None, h0, None], [grad_y, grad_h_n])
    else:
        g_xg, g_w_hh, g_b_hh, g_h0 = ops.gru_layer_backward(
            grad_y, grad_h_n, w_hh, h0, y, workspace, ctx.batch_sizes, ctx.reverse)
    return g_xg, g_w_hh, g_b_hh if b_hh is not None else None, g_h0, None, None, None


torch.library.register_autograd("rnn_ext::gru_layer_forward", _gru_layer_backward,
                                setup_context=_gru_layer_setup)


# ---------------------------------------------------------------- inference
# No autograd here: csrc/registration.cpp gives these ops a C++ kernel that makes a backward
# through them raise.

@torch.library.register_fake("rnn_ext::rnn_cell_inference")
def _(input, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity):
    return hx.new_empty(input.shape[0], w_hh.shape[1])


@torch.library.register_fake("rnn_ext::lstm_cell_inference")
def _(input, hx, cx, w_ih, w_hh, b_ih, b_hh):
    return hx.new_empty(input.shape[0], w_hh.shape[1]), cx.new_empty(cx.shape)


@torch.library.register_fake("rnn_ext::gru_cell_inference")
def _(input, hx, w_ih, w_hh, b_ih, b_hh):
    return hx.new_empty(input.shape[0], w_hh.shape[1])


@torch.library.register_fake("rnn_ext::rnn_layer_inference")
def _(x, w_ih, b_ih, w_hh, b_hh, h0, batch_sizes, reverse, nonlinearity):
    return x.new_empty(x.shape[0], h0.shape[1]), h0.new_empty(h0.shape)


@torch.library.register_fake("rnn_ext::lstm_layer_inference")
def _(x, w_ih, b_ih, w_hh, b_hh, w_hr, h0, c0, batch_sizes, reverse):
    return x.new_empty(x.shape[0], h0.shape[1]), h0.new_empty(h0.shape), c0.new_empty(c0.shape)


@torch.library.register_fake("rnn_ext::gru_layer_inference")
def _(x, w_ih, b_ih, w_hh, b_hh, h0, batch_sizes, reverse):
    return x.new_empty(x.shape[0], h0.shape[1]), h0.new_empty(h0.shape)
