"""The Python kernels of torch.ops.rnn_ext: every op's fake (meta) kernel, and
differentiable_backward.

The differentiable ops' autograd is C++ (csrc/autograd.cpp): backward runs the fused backward
op. When the caller asked for a graph of the gradient (create_graph=True: grad mode is on inside
backward), it calls differentiable_backward instead, which differentiates the reference
formulas, so double backward works. The composite ops (*_cell, *_layer) need no fake: they
decompose into the others. Imported by rnn_ext only when the library loaded. Shapes as in
csrc/registration.cpp.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from . import reference
from ._kinds import KINDS


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


# The ops differentiable_backward differentiates, by its `op` argument: rnn_ext::<prefix>_cell
# and rnn_ext::<prefix>_recurrence, the prefix being its mode's (_kinds.KINDS). Their schemas
# say the rest: the tensor inputs, and the differentiable outputs (all but the workspace).
_DIFFERENTIATED = ("cell", "recurrence")


def _reference_fn(op: str, mode: str, batch_sizes: Tensor | None, reverse: bool
                  ) -> Callable[..., Sequence[Tensor | None]]:
    """The math of op `op` of cell `mode` from reference.py: its tensor inputs (schema order,
    batch_sizes left out) to its differentiable outputs."""
    kind = KINDS[mode]
    if op == "recurrence":
        if kind.op == "lstm":
            return lambda xg, w_hh, b_hh, w_hr, h0, c0: reference.layer_recurrence(
                mode, xg, w_hh, b_hh, w_hr, h0, c0, batch_sizes, reverse)
        return lambda xg, w_hh, b_hh, h0: reference.layer_recurrence(
            mode, xg, w_hh, b_hh, None, h0, None, batch_sizes, reverse)[:2]
    if kind.op == "lstm":
        return lambda input, hx, cx, *weights: reference.lstm_cell(input, (hx, cx), *weights)
    cell = {"RNN_TANH": reference.rnn_tanh_cell, "RNN_RELU": reference.rnn_relu_cell,
            "GRU": reference.gru_cell}[mode]
    return lambda *inputs: (cell(*inputs),)


def _overload(op: str, mode: str) -> torch._ops.OpOverload:
    return getattr(torch.ops.rnn_ext, f"{KINDS[mode].op}_{op}").default


def _check_arguments(op: str, mode: str, inputs: list[Tensor | None], grads: list[Tensor],
                     batch_sizes: Tensor | None, reverse: bool) -> None:
    """Raises unless the arguments are those of a valid call of the op and gradients of its
    outputs' shapes: the op checks the inputs, on detached copies."""
    where = "rnn_ext::differentiable_backward"
    if op not in _DIFFERENTIATED:
        raise ValueError(f"{where}: op must be one of {sorted(_DIFFERENTIATED)}, got {op!r}")
    if mode not in KINDS:
        raise ValueError(f"{where}: mode must be one of {list(KINDS)}, got {mode!r}")
    overload = _overload(op, mode)
    schema = overload._schema
    name = schema.name
    tensor_args = [a.name for a in schema.arguments
                   if "Tensor" in str(a.type) and a.name != "batch_sizes"]
    if len(inputs) != len(tensor_args):
        raise ValueError(f"{where}: {name} takes {len(tensor_args)} inputs, got {len(inputs)}")
    if (op == "recurrence") != (batch_sizes is not None):
        raise ValueError(f"{where}: batch_sizes is required for a recurrence and None for a cell")
    kwargs = dict(zip(tensor_args, (None if i is None else i.detach() for i in inputs)))
    names = {a.name for a in schema.arguments}
    if batch_sizes is not None:
        kwargs.update(batch_sizes=batch_sizes, reverse=reverse)
    if "nonlinearity" in names:
        kwargs["nonlinearity"] = KINDS[mode].nonlinearity
    if "save_workspace" in names:
        kwargs["save_workspace"] = False
    with torch.no_grad():
        outputs = overload(**kwargs)
    outputs = (outputs,) if isinstance(outputs, Tensor) else outputs
    outputs = [o for o, r in zip(outputs, schema.returns) if r.name != "workspace"]
    if len(grads) != len(outputs) or any(
            g.shape != o.shape or g.dtype != o.dtype or g.device != o.device
            for g, o in zip(grads, outputs)):
        raise ValueError(f"{where}: grads must be {len(outputs)} tensors like {name}'s "
                         f"outputs {[(tuple(o.shape), o.dtype) for o in outputs]}, got "
                         f"{[(tuple(g.shape), g.dtype) for g in grads]}")


def _differentiable_backward(op: str, mode: str, inputs: list[Tensor | None],
                             grads: list[Tensor], batch_sizes: Tensor | None,
                             reverse: bool) -> list[Tensor]:
    _check_arguments(op, mode, inputs, grads, batch_sizes, reverse)
    found = _differentiate(_reference_fn(op, mode, batch_sizes, reverse), inputs, grads)
    return [g if g is not None else torch.zeros_like(i) if i is not None else grads[0].new_empty(0)
            for g, i in zip(found, inputs)]


# The differentiable ops' autograd is C++ (csrc/autograd.cpp); under create_graph their backward
# calls this op. CompositeImplicitAutograd: it runs on the inputs' own graph, whatever their device.
_library = torch.library.Library("rnn_ext", "IMPL")
_library.impl("differentiable_backward", _differentiable_backward, "CompositeImplicitAutograd")


# ---------------------------------------------------------------- pointwise

@torch.library.register_fake("rnn_ext::rnn_pointwise_forward")
def _(xg, hg, b_ih, b_hh, nonlinearity):
    return xg.new_empty(xg.shape)


@torch.library.register_fake("rnn_ext::rnn_pointwise_backward")
def _(grad_hy, hy, nonlinearity):
    return grad_hy.new_empty(grad_hy.shape)


@torch.library.register_fake("rnn_ext::lstm_pointwise_forward")
def _(xg, hg, b_ih, b_hh, cx):
    return cx.new_empty(cx.shape), cx.new_empty(cx.shape), cx.new_empty(cx.shape[0], 5 * cx.shape[1])


@torch.library.register_fake("rnn_ext::lstm_pointwise_backward")
def _(grad_hy, grad_cy, workspace):
    return grad_hy.new_empty(grad_hy.shape[0], 4 * grad_hy.shape[1]), grad_cy.new_empty(grad_cy.shape)


@torch.library.register_fake("rnn_ext::gru_pointwise_forward")
def _(xg, hg, b_ih, b_hh, hx):
    return hx.new_empty(hx.shape), hx.new_empty(hx.shape[0], 5 * hx.shape[1])


@torch.library.register_fake("rnn_ext::gru_pointwise_backward")
def _(grad_hy, workspace):
    gates = grad_hy.new_empty(grad_hy.shape[0], 3 * grad_hy.shape[1])
    return gates, torch.empty_like(gates), grad_hy.new_empty(grad_hy.shape)


# ---------------------------------------------------------------- recurrence

@torch.library.register_fake("rnn_ext::rnn_recurrence")
def _(xg, w_hh, b_hh, h0, batch_sizes, reverse, nonlinearity):
    return xg.new_empty(xg.shape[0], h0.shape[1]), h0.new_empty(h0.shape)


@torch.library.register_fake("rnn_ext::rnn_recurrence_backward")
def _(grad_y, grad_h_n, w_hh, h0, y, batch_sizes, reverse, nonlinearity):
    return (grad_y.new_empty(grad_y.shape[0], w_hh.shape[0]), w_hh.new_empty(w_hh.shape),
            w_hh.new_empty(w_hh.shape[0]), h0.new_empty(h0.shape))


@torch.library.register_fake("rnn_ext::lstm_recurrence")
def _(xg, w_hh, b_hh, w_hr, h0, c0, batch_sizes, reverse, save_workspace):
    rows = xg.shape[0] if save_workspace else 0
    return (xg.new_empty(xg.shape[0], h0.shape[1]), h0.new_empty(h0.shape), c0.new_empty(c0.shape),
            xg.new_empty(rows, 5 * c0.shape[1]))


@torch.library.register_fake("rnn_ext::lstm_recurrence_backward")
def _(grad_y, grad_h_n, grad_c_n, w_hh, w_hr, h0, y, workspace, batch_sizes, reverse):
    grad_w_hr = w_hr.new_empty(w_hr.shape) if w_hr is not None else w_hh.new_empty(0)
    return (grad_y.new_empty(grad_y.shape[0], w_hh.shape[0]), w_hh.new_empty(w_hh.shape),
            w_hh.new_empty(w_hh.shape[0]), h0.new_empty(h0.shape), grad_c_n.new_empty(grad_c_n.shape),
            grad_w_hr)


@torch.library.register_fake("rnn_ext::gru_recurrence")
def _(xg, w_hh, b_hh, h0, batch_sizes, reverse, save_workspace):
    rows = xg.shape[0] if save_workspace else 0
    return (xg.new_empty(xg.shape[0], h0.shape[1]), h0.new_empty(h0.shape),
            xg.new_empty(rows, 5 * h0.shape[1]))


@torch.library.register_fake("rnn_ext::gru_recurrence_backward")
def _(grad_y, grad_h_n, w_hh, h0, y, workspace, batch_sizes, reverse):
    return (grad_y.new_empty(grad_y.shape[0], w_hh.shape[0]), w_hh.new_empty(w_hh.shape),
            w_hh.new_empty(w_hh.shape[0]), h0.new_empty(h0.shape))


# ---------------------------------------------------------------- inference
# No autograd: csrc/autograd.cpp gives these ops a C++ kernel that makes a backward through them
# raise.

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
