"""The computations of rnn_ext in plain PyTorch, written from torch.nn's equations.

The ground truth of the tests, the fallback backend, and the differentiable formulas that the
double backward uses. Gate order is torch.nn's: LSTM i, f, g, o; GRU r, z, n.

Shapes: B batch, I input, H hidden, G gates per unit (RNN 1, LSTM 4, GRU 3), P output size
(proj_size or H), N rows of a time-major packed sequence, T steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._kinds import KINDS


def _add_bias(gates: Tensor, bias: Tensor | None) -> Tensor:
    return gates if bias is None else gates + bias


# ---- one step from the gate pre-activations (xg = W_ih x, hg = W_hh h: [B, G*H]) ----

def rnn_cell_step(xg: Tensor, hg: Tensor, b_ih: Tensor | None, b_hh: Tensor | None,
                  nonlinearity: str) -> Tensor:
    pre = _add_bias(xg, b_ih) + _add_bias(hg, b_hh)
    if nonlinearity == "tanh":
        return torch.tanh(pre)
    if nonlinearity == "relu":
        return torch.relu(pre)
    raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")


def lstm_cell_step(xg: Tensor, hg: Tensor, b_ih: Tensor | None, b_hh: Tensor | None,
                   cx: Tensor) -> tuple[Tensor, Tensor]:
    i, f, g, o = (_add_bias(xg, b_ih) + _add_bias(hg, b_hh)).chunk(4, dim=1)
    c = torch.sigmoid(f) * cx + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def gru_cell_step(xg: Tensor, hg: Tensor, b_ih: Tensor | None, b_hh: Tensor | None,
                  hx: Tensor) -> Tensor:
    x_r, x_z, x_n = _add_bias(xg, b_ih).chunk(3, dim=1)
    h_r, h_z, h_n = _add_bias(hg, b_hh).chunk(3, dim=1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)  # b_hn stays inside r * (.)
    return n + z * (hx - n)


# ---- torch.nn-style cells: input [B, I], hx [B, H] ----

def rnn_tanh_cell(input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor,
                  b_ih: Tensor | None = None, b_hh: Tensor | None = None) -> Tensor:
    return rnn_cell_step(F.linear(input, w_ih), F.linear(hx, w_hh), b_ih, b_hh, "tanh")


def rnn_relu_cell(input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor,
                  b_ih: Tensor | None = None, b_hh: Tensor | None = None) -> Tensor:
    return rnn_cell_step(F.linear(input, w_ih), F.linear(hx, w_hh), b_ih, b_hh, "relu")


def lstm_cell(input: Tensor, hx: tuple[Tensor, Tensor], w_ih: Tensor, w_hh: Tensor,
              b_ih: Tensor | None = None, b_hh: Tensor | None = None) -> tuple[Tensor, Tensor]:
    return lstm_cell_step(F.linear(input, w_ih), F.linear(hx[0], w_hh), b_ih, b_hh, hx[1])


def gru_cell(input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor,
             b_ih: Tensor | None = None, b_hh: Tensor | None = None) -> Tensor:
    return gru_cell_step(F.linear(input, w_ih), F.linear(hx, w_hh), b_ih, b_hh, hx)


# ---- one direction of one layer over a time-major packed sequence ----

def layer_recurrence(mode: str, xg: Tensor, w_hh: Tensor, b_hh: Tensor | None,
                     w_hr: Tensor | None, h0: Tensor, c0: Tensor | None, batch_sizes: Tensor,
                     reverse: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """mode: 'RNN_TANH', 'RNN_RELU', 'LSTM' or 'GRU' (see _kinds.KINDS). xg: [N, G*H] input-side pre-activations (b_ih included); w_hh: [G*H, P]; b_hh: [G*H];
    w_hr: [P, H] or None; h0: [B, P]; c0: [B, H] (LSTM) or None; batch_sizes: [T] int64.
    Returns y [N, P], h_n [B, P], c_n [B, H] (LSTM) or None."""
    kind = KINDS[mode]
    sizes = [int(b) for b in batch_sizes]
    offsets = [sum(sizes[:t]) for t in range(len(sizes))]
    h, c = h0, c0
    outputs: list[Tensor | None] = [None] * len(sizes)
    for t in (reversed(range(len(sizes))) if reverse else range(len(sizes))):
        n, off = sizes[t], offsets[t]
        x_t, h_t = xg[off:off + n], h[:n]
        hg = F.linear(h_t, w_hh)
        if kind.op == "lstm":
            h_t, c_t = lstm_cell_step(x_t, hg, None, b_hh, c[:n])
            if w_hr is not None:
                h_t = F.linear(h_t, w_hr)
            c = torch.cat([c_t, c[n:]])
        elif kind.op == "gru":
            h_t = gru_cell_step(x_t, hg, None, b_hh, h_t)
        else:
            h_t = rnn_cell_step(x_t, hg, None, b_hh, kind.nonlinearity)
        h = torch.cat([h_t, h[n:]])
        outputs[t] = h_t
    return torch.cat(outputs), h, c  # type: ignore[arg-type]
