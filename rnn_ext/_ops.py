"""The Python kernels of torch.ops.rnn_ext: every op's fake (meta) kernel, and
differentiable_backward.

The differentiable ops' autograd is C++ (csrc/autograd.cpp): backward runs the fused backward
op. When the caller asked for a graph of the gradient (create_graph=True: grad mode is on inside
backward), it calls differentiable_backward instead, which differentiates the reference
formulas, so double backward works. Imported by rnn_ext only when the library loaded. Shapes as
in csrc/registration.cpp.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from . import reference

_LAYER_MODE = {"tanh": "RNN_TANH", "relu": "RNN_RELU"}


def _differentiate(fn: Callable[..., Sequence[Tensor | None]], inputs: Sequence[Tensor | None],
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


# differentiable_backward's steps: the ops it differentiates, by name with an RNN op's
# nonlinearity in it -> (the op, its nonlinearity, how many tensor inputs it takes, how many of
# its outputs are differentiable: all but the workspace).
_STEPS = {
    "rnn_tanh_cell_forward": ("rnn_cell_forward", "tanh", 4, 1),
    "rnn_relu_cell_forward": ("rnn_cell_forward", "relu", 4, 1),
    "lstm_cell_forward": ("lstm_cell_forward", None, 5, 2),
    "gru_cell_forward": ("gru_cell_forward", None, 5, 1),
    "rnn_tanh_cell": ("rnn_cell", "tanh", 6, 1),
    "rnn_relu_cell": ("rnn_cell", "relu", 6, 1),
    "lstm_cell": ("lstm_cell", None, 7, 2),
    "gru_cell": ("gru_cell", None, 6, 1),
    "rnn_tanh_layer_forward": ("rnn_layer_forward", "tanh", 4, 2),
    "rnn_relu_layer_forward": ("rnn_layer_forward", "relu", 4, 2),
    "lstm_layer_forward": ("lstm_layer_forward", None, 6, 3),
    "gru_layer_forward": ("gru_layer_forward", None, 4, 2),
}


def _reference_step(step: str, batch_sizes: Tensor | None, reverse: bool
                    ) -> Callable[..., Sequence[Tensor | None]]:
    """The math of op `step` from reference.py: its tensor inputs (schema order, batch_sizes
    left out) to its differentiable outputs."""
    op, nonlinearity = _STEPS[step][:2]
    if op == "rnn_cell_forward":
        return lambda *inputs: (reference.rnn_cell_step(*inputs, nonlinearity),)
    if op == "lstm_cell_forward":
        return reference.lstm_cell_step
    if op == "gru_cell_forward":
        return lambda *inputs: (reference.gru_cell_step(*inputs),)
    if op == "rnn_cell":
        cell = reference.rnn_tanh_cell if nonlinearity == "tanh" else reference.rnn_relu_cell
        return lambda *inputs: (cell(*inputs),)
    if op == "lstm_cell":
        return lambda input, hx, cx, *weights: reference.lstm_cell(input, (hx, cx), *weights)
    if op == "gru_cell":
        return lambda *inputs: (reference.gru_cell(*inputs),)
    if op == "lstm_layer_forward":
        return lambda xg, w_hh, b_hh, w_hr, h0, c0: reference.layer_recurrence(
            "LSTM", xg, w_hh, b_hh, w_hr, h0, c0, batch_sizes, reverse)
    mode = "GRU" if op == "gru_layer_forward" else _LAYER_MODE[nonlinearity]
    return lambda xg, w_hh, b_hh, h0: reference.layer_recurrence(
        mode, xg, w_hh, b_hh, None, h0, None, batch_sizes, reverse)[:2]


def _check_step_arguments(step: str, inputs: list[Tensor | None], grads: list[Tensor],
                          batch_sizes: Tensor | None, reverse: bool) -> None:
    """Raises unless the arguments are those of a valid call of op `step` and gradients of its
    outputs' shapes: the op checks the inputs, on detached copies."""
    where = "rnn_ext::differentiable_backward"
    if step not in _STEPS:
        raise ValueError(f"{where}: step must be one of {sorted(_STEPS)}, got {step!r}")
    op, nonlinearity, input_count, output_count = _STEPS[step]
    layer = "_layer_" in step
    if len(inputs) != input_count:
        raise ValueError(f"{where}: {step} takes {input_count} inputs, got {len(inputs)}")
    if layer != (batch_sizes is not None):
        raise ValueError(f"{where}: batch_sizes is required for a layer and None for a cell")
    args = [None if i is None else i.detach() for i in inputs]
    if layer:
        args += [batch_sizes, reverse, nonlinearity if nonlinearity is not None else False]
    elif nonlinearity is not None:
        args.append(nonlinearity)
    with torch.no_grad():
        outputs = getattr(torch.ops.rnn_ext, op)(*args)
    outputs = (outputs,) if isinstance(outputs, Tensor) else outputs[:output_count]
    if len(grads) != output_count or any(
            g.shape != o.shape or g.dtype != o.dtype or g.device != o.device
            for g, o in zip(grads, outputs)):
        raise ValueError(f"{where}: grads must be {output_count} tensors like {op}'s "
                         f"outputs {[(tuple(o.shape), o.dtype) for o in outputs]}, got "
                         f"{[(tuple(g.shape), g.dtype) for g in grads]}")


def _differentiable_backward(step: str, inputs: list[Tensor | None], grads: list[Tensor],
                             batch_sizes: Tensor | None, reverse: bool) -> list[Tensor]:
    _check_step_arguments(step, inputs, grads, batch_sizes, reverse)
    found = _differentiate(_reference_step(step, batch_sizes, reverse), inputs, grads)
    return [g if g is not None else torch.zeros_like(i) if i is not None else grads[0].new_empty(0)
            for g, i in zip(found, inputs)]


# The differentiable ops' autograd is C++ (csrc/autograd.cpp); under create_graph their backward
# calls this op. CompositeImplicitAutograd: it runs on the inputs' own graph, whatever their device.
_library = torch.library.Library("rnn_ext", "IMPL")
_library.impl("differentiable_backward", _differentiable_backward, "CompositeImplicitAutograd")


# ---------------------------------------------------------------- cells

@torch.library.register_fake("rnn_ext::rnn_cell_forward")
def _(xg, hg, b_ih, b_hh, nonlinearity):
    return xg.new_empty(xg.shape)


@torch.library.register_fake("rnn_ext::rnn_cell_backward")
def _(grad_hy, hy, nonlinearity):
    return grad_hy.new_empty(grad_hy.shape)


@torch.library.register_fake("rnn_ext::lstm_cell_forward")
def _(xg, hg, b_ih, b_hh, cx):
    return cx.new_empty(cx.shape), cx.new_empty(cx.shape), cx.new_empty(cx.shape[0], 5 * cx.shape[1])


@torch.library.register_fake("rnn_ext::lstm_cell_backward")
def _(grad_hy, grad_cy, workspace):
    return grad_hy.new_empty(grad_hy.shape[0], 4 * grad_hy.shape[1]), grad_cy.new_empty(grad_cy.shape)


@torch.library.register_fake("rnn_ext::gru_cell_forward")
def _(xg, hg, b_ih, b_hh, hx):
    return hx.new_empty(hx.shape), hx.new_empty(hx.shape[0], 5 * hx.shape[1])


@torch.library.register_fake("rnn_ext::gru_cell_backward")
def _(grad_hy, workspace):
    gates = grad_hy.new_empty(grad_hy.shape[0], 3 * grad_hy.shape[1])
    return gates, torch.empty_like(gates), grad_hy.new_empty(grad_hy.shape)


# ---------------------------------------------------------------- layers

@torch.library.register_fake("rnn_ext::rnn_layer_forward")
def _(xg, w_hh, b_hh, h0, batch_sizes, reverse, nonlinearity):
    return xg.new_empty(xg.shape[0], h0.shape[1]), h0.new_empty(h0.shape)


@torch.library.register_fake("rnn_ext::rnn_layer_backward")
def _(grad_y, grad_h_n, w_hh, h0, y, batch_sizes, reverse, nonlinearity):
    return (grad_y.new_empty(grad_y.shape[0], w_hh.shape[0]), w_hh.new_empty(w_hh.shape),
            w_hh.new_empty(w_hh.shape[0]), h0.new_empty(h0.shape))


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


@torch.library.register_fake("rnn_ext::gru_layer_forward")
def _(xg, w_hh, b_hh, h0, batch_sizes, reverse, save_workspace):
    rows = xg.shape[0] if save_workspace else 0
    return (xg.new_empty(xg.shape[0], h0.shape[1]), h0.new_empty(h0.shape),
            xg.new_empty(rows, 5 * h0.shape[1]))


@torch.library.register_fake("rnn_ext::gru_layer_backward")
def _(grad_y, grad_h_n, w_hh, h0, y, workspace, batch_sizes, reverse):
    return (grad_y.new_empty(grad_y.shape[0], w_hh.shape[0]), w_hh.new_empty(w_hh.shape),
            w_hh.new_empty(w_hh.shape[0]), h0.new_empty(h0.shape))


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
