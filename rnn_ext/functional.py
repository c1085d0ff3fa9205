"""The functional API. Each function picks the backend (see _backend.py) and nothing else does.

Cells take torch's arguments (input, hx, w_ih, w_hh, b_ih, b_hh): input [B, I], hx [B, H]
(LSTM: a pair (h, c)), and run as one rnn_ext::*_cell op: both GEMMs and the fused step, one
autograd node where a gradient is wanted, the *_cell_inference op where none is.

`recurrent_layer` runs one direction of one layer over a time-major packed sequence as one
rnn_ext::*_layer op (with a gradient to compute, the input projection and the recurrence's
autograd node; without, the *_layer_inference op, which projects the input itself), and `rnn` is
the multi-layer, bidirectional stack that the modules call. The ops choose between the two paths
(csrc/autograd.cpp), not this module.

Under torch.autocast every function here runs in the autocast dtype (see `_autocast`), on either
backend; outside it, all tensors of a call must share one dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference
from ._backend import uses_kernels
from ._kinds import KINDS

_compiled_ops = torch.ops.rnn_ext


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype torch.autocast gives lower-precision ops on x's device; None outside autocast."""
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def _autocast(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """`tensors` as torch.autocast's lower-precision ops take them: inside an autocast region for
    their device, floating tensors other than float64 are cast to the autocast dtype, so that the
    op (whose kernels compute the gates in float32) sees one dtype and returns that dtype; outside
    one, unchanged. The casts are differentiable: parameter gradients keep their dtype.

    Cast here rather than with torch.library.register_autocast, which pins one dtype per device,
    while autocast's dtype is the caller's (CUDA: float16 or bfloat16); this also covers the
    reference backend (CPU float16, for one, runs there)."""
    dtype = _autocast_dtype(tensors[0])
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t is not None and t.is_floating_point()
                 and t.dtype != torch.float64 else t for t in tensors)


def rnn_tanh_cell(input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor,
                  b_ih: Tensor | None = None, b_hh: Tensor | None = None) -> Tensor:
    """h' = tanh(W_ih x + b_ih + W_hh h + b_hh); returns h' [B, H]."""
    input, hx, w_ih, w_hh, b_ih, b_hh = _autocast(input, hx, w_ih, w_hh, b_ih, b_hh)
    if not uses_kernels(input):
        return reference.rnn_tanh_cell(input, hx, w_ih, w_hh, b_ih, b_hh)
    return _compiled_ops.rnn_cell(input, hx, w_ih, w_hh, b_ih, b_hh, "tanh")


def rnn_relu_cell(input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor,
                  b_ih: Tensor | None = None, b_hh: Tensor | None = None) -> Tensor:
    """h' = relu(W_ih x + b_ih + W_hh h + b_hh); returns h' [B, H]."""
    input, hx, w_ih, w_hh, b_ih, b_hh = _autocast(input, hx, w_ih, w_hh, b_ih, b_hh)
    if not uses_kernels(input):
        return reference.rnn_relu_cell(input, hx, w_ih, w_hh, b_ih, b_hh)
    return _compiled_ops.rnn_cell(input, hx, w_ih, w_hh, b_ih, b_hh, "relu")


def lstm_cell(input: Tensor, hx: tuple[Tensor, Tensor], w_ih: Tensor, w_hh: Tensor,
              b_ih: Tensor | None = None, b_hh: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One LSTM step; hx = (h [B, H], c [B, H]); returns (h', c')."""
    input, h, c, w_ih, w_hh, b_ih, b_hh = _autocast(input, *hx, w_ih, w_hh, b_ih, b_hh)
    if not uses_kernels(input):
        return reference.lstm_cell(input, (h, c), w_ih, w_hh, b_ih, b_hh)
    return _compiled_ops.lstm_cell(input, h, c, w_ih, w_hh, b_ih, b_hh)


def gru_cell(input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor,
             b_ih: Tensor | None = None, b_hh: Tensor | None = None) -> Tensor:
    """One GRU step; returns h' [B, H]."""
    input, hx, w_ih, w_hh, b_ih, b_hh = _autocast(input, hx, w_ih, w_hh, b_ih, b_hh)
    if not uses_kernels(input):
        return reference.gru_cell(input, hx, w_ih, w_hh, b_ih, b_hh)
    return _compiled_ops.gru_cell(input, hx, w_ih, w_hh, b_ih, b_hh)


def recurrent_layer(mode: str, x: Tensor, batch_sizes: Tensor, h0: Tensor, c0: Tensor | None,
                    w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None,
                    w_hr: Tensor | None = None, reverse: bool = False
                    ) -> tuple[Tensor, Tensor, Tensor | None]:
    """One direction of one layer. mode: 'RNN_TANH', 'RNN_RELU', 'LSTM' or 'GRU'.

    x: [N, I] time-major packed rows; batch_sizes: [T] int64 CPU; h0: [B, P]; c0: [B, H] (LSTM);
    w_ih: [G*H, I]; w_hh: [G*H, P]; b_ih, b_hh: [G*H] or None; w_hr: [P, H] or None.
    Returns y [N, P], h_n [B, P], c_n [B, H] (LSTM, else None)."""
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = _autocast(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    if not uses_kernels(x):
        xg = F.linear(x, w_ih, b_ih)
        return reference.layer_recurrence(mode, xg, w_hh, b_hh, w_hr, h0, c0, batch_sizes, reverse)
    kind = KINDS[mode]
    if kind.op == "lstm":
        return _compiled_ops.lstm_layer(x, w_ih, b_ih, w_hh, b_hh, w_hr, h0, c0, batch_sizes,
                                        reverse)
    if kind.op == "gru":
        y, h_n = _compiled_ops.gru_layer(x, w_ih, b_ih, w_hh, b_hh, h0, batch_sizes, reverse)
    else:
        y, h_n = _compiled_ops.rnn_layer(x, w_ih, b_ih, w_hh, b_hh, h0, batch_sizes, reverse,
                                         kind.nonlinearity)
    return y, h_n, None


def rnn(mode: str, x: Tensor, batch_sizes: Tensor, h0: Tensor, c0: Tensor | None,
        weights: list[list[Tensor | None]], num_layers: int, bidirectional: bool,
        dropout: float = 0.0, training: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """The stack of layers and directions over a time-major packed sequence.

    x: [N, I]; h0: [L*D, B, P]; c0: [L*D, B, H] (LSTM); weights[layer*D + direction] =
    [w_ih, w_hh, b_ih, b_hh, w_hr] (None where absent). Dropout applies to every layer's output
    but the last, in training only. Returns y [N, D*P], h_n [L*D, B, P], c_n [L*D, B, H]."""
    directions = 2 if bidirectional else 1
    h_n, c_n = [], []
    layer_input = x
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            k = layer * directions + direction
            w_ih, w_hh, b_ih, b_hh, w_hr = weights[k]
            y, h, c = recurrent_layer(mode, layer_input, batch_sizes, h0[k],
                                      None if c0 is None else c0[k], w_ih, w_hh, b_ih, b_hh,
                                      w_hr, reverse=direction == 1)
            outputs.append(y)
            h_n.append(h)
            c_n.append(c)
        layer_input = outputs[0] if directions == 1 else torch.cat(outputs, dim=1)
        if dropout > 0 and training and layer < num_layers - 1:
            layer_input = F.dropout(layer_input, p=dropout, training=True)
    return layer_input, torch.stack(h_n), (torch.stack(c_n) if c0 is not None else None)
