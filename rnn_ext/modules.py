"""Drop-in replacements for torch.nn's recurrent modules.

The cells subclass their torch.nn counterparts and the layers subclass nn.RNNBase (see below),
so constructor, parameters (names, shapes, initialisation), state dicts and argument checks are
exactly torch.nn's; only `forward` is rnn_ext's: it keeps torch.nn's contract (input forms, hx
handling, messages) and runs the recurrence through rnn_ext.functional.

torch.compile traces every forward here into one graph (fullgraph=True, dynamic sequence lengths,
PackedSequence input without an explicit hx).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import functional
from ._kinds import rnn_mode

__all__ = ["RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell"]


# ------------------------------------------------------------------------------------ layers

class _RecurrentForward:
    """forward() shared by RNN, LSTM and GRU (mixed into subclasses of nn.RNNBase)."""

    def _layer_weights(self) -> list[list[Tensor | None]]:
        weights = []
        for layer in range(self.num_layers):
            for direction in range(2 if self.bidirectional else 1):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                weights.append([
                    getattr(self, "weight_ih" + suffix),
                    getattr(self, "weight_hh" + suffix),
                    getattr(self, "bias_ih" + suffix) if self.bias else None,
                    getattr(self, "bias_hh" + suffix) if self.bias else None,
                    getattr(self, "weight_hr" + suffix) if self.proj_size > 0 else None,
                ])
        return weights

    def _zero_state(self, x: Tensor, batch: int, size: int) -> Tensor:
        layers = self.num_layers * (2 if self.bidirectional else 1)
        return torch.zeros(layers, batch, size, dtype=x.dtype, device=x.device)

    def _check_hx_dims(self, hx: Tensor | tuple[Tensor, Tensor], batched: bool) -> None:
        """torch.nn's messages for an hx whose dimensionality does not fit the input's."""
        want = 3 if batched else 2
        form = "batched 3-D" if batched else "unbatched 2-D"
        if self.mode == "LSTM":
            if hx[0].dim() != want or hx[1].dim() != want:
                raise RuntimeError(
                    f"For {form} input, hx and cx should also be {want}-D but got "
                    f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
        elif hx.dim() != want:
            raise RuntimeError(
                f"For {form} input, hx should also be {want}-D but got {hx.dim()}-D tensor")

    def forward(self, input: Tensor | PackedSequence,
                hx: Tensor | tuple[Tensor, Tensor] | None = None
                ) -> tuple[Tensor | PackedSequence, Tensor | tuple[Tensor, Tensor]]:
        lstm = self.mode == "LSTM"
        out_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        packed = isinstance(input, PackedSequence)
        batched = True
        if packed:
            x, batch_sizes, sorted_indices, unsorted_indices = input
            batch = int(batch_sizes[0])
        else:
            if input.dim() not in (2, 3):
                raise ValueError(self._input_dims_message.format(input.dim()))
            batched = input.dim() == 3
            if not batched:
                input = input.unsqueeze(0 if self.batch_first else 1)
            sorted_indices = unsorted_indices = None
            batch_sizes = None
            batch = input.size(0 if self.batch_first else 1)
            x = input

        if hx is None:
            hx = self._zero_state(x, batch, out_size)
            if lstm:
                hx = (hx, self._zero_state(x, batch, self.hidden_size))
            # The states are built to fit: only the input needs checking. (check_forward_args
            # would read batch_sizes[0] again, which torch.compile cannot prove equal to `batch`.)
            self.check_input(x, batch_sizes)
        else:
            if not packed:
                self._check_hx_dims(hx, batched)
                if not batched:
                    hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1)) if lstm else hx.unsqueeze(1)
            hx = self.permute_hidden(hx, sorted_indices)
            self.check_forward_args(x, hx, batch_sizes)
        # Under autocast mixed dtypes are fine (functional runs the autocast dtype), as in torch.nn.
        if x.dtype != self.weight_ih_l0.dtype and functional._autocast_dtype(x) is None:
            raise ValueError(
                f"{type(self).__name__} input dtype ({x.dtype}) does not match weight dtype "
                f"({self.weight_ih_l0.dtype}). Convert input: input.to({self.weight_ih_l0.dtype}),"
                f" or convert model: model.to({x.dtype})")

        if not packed:
            steps = x.transpose(0, 1) if self.batch_first else x  # [T, B, I]
            if steps.size(0) == 0:
                raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
            # on the CPU, as the ops expect, even where torch.set_default_device says otherwise
            batch_sizes = torch.full((steps.size(0),), steps.size(1), dtype=torch.int64,
                                     device="cpu")
            x = steps.reshape(-1, steps.size(2))
        h0, c0 = hx if lstm else (hx, None)
        y, h_n, c_n = functional.rnn(
            self.mode, x, batch_sizes, h0, c0, self._layer_weights(), self.num_layers,
            self.bidirectional, self.dropout, self.training)
        hidden = (h_n, c_n) if lstm else h_n

        if packed:
            return (PackedSequence(y, batch_sizes, sorted_indices, unsorted_indices),
                    self.permute_hidden(hidden, unsorted_indices))
        output = y.view(steps.size(0), steps.size(1), y.size(1))
        if self.batch_first:
            output = output.transpose(0, 1)
        if not batched:
            output = output.squeeze(0 if self.batch_first else 1)
            hidden = (hidden[0].squeeze(1), hidden[1].squeeze(1)) if lstm else hidden.squeeze(1)
        return output, hidden


# The layers subclass nn.RNNBase, which holds torch.nn's whole constructor and parameter
# contract, rather than nn.RNN / nn.LSTM / nn.GRU: Dynamo refuses instances of those three
# (an isinstance check in torch._dynamo), and torch.compile must trace these modules.
# Their mode-specific pieces are taken from them unchanged.

_NO_PROJ_MESSAGE = "proj_size argument is only supported for LSTM, not RNN or GRU"


class RNN(_RecurrentForward, nn.RNNBase):
    """torch.nn.RNN (tanh or relu) with the recurrence fused in C++/CUDA."""

    _input_dims_message = "RNN: Expected input to be 2D or 3D, got {}D tensor instead"

    def __init__(self, *args, **kwargs):
        # torch.nn.RNN's signature: nonlinearity is the fourth positional argument.
        if "proj_size" in kwargs:
            raise ValueError(_NO_PROJ_MESSAGE)
        if len(args) > 3:
            nonlinearity, args = args[3], args[:3] + args[4:]
        else:
            nonlinearity = kwargs.pop("nonlinearity", "tanh")
        mode = rnn_mode(nonlinearity)
        self.nonlinearity = nonlinearity
        super().__init__(mode, *args, **kwargs)


class LSTM(_RecurrentForward, nn.RNNBase):
    """torch.nn.LSTM (with proj_size) with the recurrence fused in C++/CUDA."""

    _input_dims_message = "LSTM: Expected input to be 2D or 3D, got {}D instead"
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    def __init__(self, *args, **kwargs):
        super().__init__("LSTM", *args, **kwargs)


class GRU(_RecurrentForward, nn.RNNBase):
    """torch.nn.GRU with the recurrence fused in C++/CUDA."""

    _input_dims_message = "GRU: Expected input to be 2D or 3D, got {}D instead"

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError(_NO_PROJ_MESSAGE)
        super().__init__("GRU", *args, **kwargs)


# ------------------------------------------------------------------------------------- cells

def _check_cell_args(cell: nn.RNNCellBase, input: Tensor, states: tuple[Tensor, ...]) -> None:
    """torch.nn's cell checks (dims, sizes, dtype), with its messages. Every cell step runs
    this, so each property is read once and messages are built only on failure."""
    dim = input.dim()
    if dim not in (1, 2):
        raise ValueError(f"{type(cell).__name__}: Expected input to be 1D or 2D, got {dim}D "
                         "instead")
    for index, state in enumerate(states):
        state_dim = state.dim()
        if state_dim not in (1, 2):
            label = f"hx[{index}]" if len(states) > 1 else "hidden"
            raise ValueError(f"{type(cell).__name__}: Expected {label} to be 1D or 2D, got "
                             f"{state_dim}D instead")
        if state_dim != dim:
            raise RuntimeError(f"{type(cell).__name__}: Expected input and hidden states to both "
                               f"be {'batched' if dim == 2 else 'unbatched'}, got {dim}D input "
                               f"and {state_dim}D hidden state")
    if input.size(-1) != cell.input_size:
        raise RuntimeError(f"input has inconsistent input_size: got {input.size(-1)} "
                           f"expected {cell.input_size}")
    for index, state in enumerate(states):
        if dim == 2 and state.size(0) != input.size(0):
            raise RuntimeError(f"Input batch size {input.size(0)} doesn't match hidden{index} "
                               f"batch size {state.size(0)}")
        if state.size(-1) != cell.hidden_size:
            raise RuntimeError(f"hidden{index} has inconsistent hidden_size: got "
                               f"{state.size(-1)}, expected {cell.hidden_size}")
    weight_dtype = cell.weight_ih.dtype
    for tensor in (input, *states):
        if tensor.dtype != weight_dtype and functional._autocast_dtype(input) is None:
            raise RuntimeError(f"{type(cell).__name__}: expected dtype {weight_dtype} for the "
                               f"input and hidden states, got {tensor.dtype}")


def _batched(input: Tensor, states: tuple[Tensor, ...], hidden_size: int, count: int
             ) -> tuple[Tensor, tuple[Tensor, ...]]:
    """input as [B, I] and `count` states as [B, H]: zeros where hx was None."""
    if input.dim() == 1:
        input = input.unsqueeze(0)
        states = tuple(s.unsqueeze(0) for s in states)
    if not states:
        zeros = torch.zeros(input.size(0), hidden_size, dtype=input.dtype, device=input.device)
        states = (zeros,) * count
    return input, states


class RNNCell(nn.RNNCell):
    """torch.nn.RNNCell as one fused op per step (rnn_ext.functional.rnn_tanh_cell /
    rnn_relu_cell)."""

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        states = () if hx is None else (hx,)
        _check_cell_args(self, input, states)
        batched = input.dim() == 2
        x, (h,) = _batched(input, states, self.hidden_size, 1)
        if self.nonlinearity == "tanh":
            step = functional.rnn_tanh_cell
        elif self.nonlinearity == "relu":
            step = functional.rnn_relu_cell
        else:
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        out = step(x, h, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        return out if batched else out.squeeze(0)


class LSTMCell(nn.LSTMCell):
    """torch.nn.LSTMCell as one fused op per step (rnn_ext.functional.lstm_cell)."""

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None
                ) -> tuple[Tensor, Tensor]:
        states = () if hx is None else tuple(hx)
        _check_cell_args(self, input, states)
        batched = input.dim() == 2
        x, (h, c) = _batched(input, states, self.hidden_size, 2)
        h, c = functional.lstm_cell(x, (h, c), self.weight_ih, self.weight_hh, self.bias_ih,
                                    self.bias_hh)
        return (h, c) if batched else (h.squeeze(0), c.squeeze(0))


class GRUCell(nn.GRUCell):
    """torch.nn.GRUCell as one fused op per step (rnn_ext.functional.gru_cell)."""

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        states = () if hx is None else (hx,)
        _check_cell_args(self, input, states)
        batched = input.dim() == 2
        x, (h,) = _batched(input, states, self.hidden_size, 1)
        out = functional.gru_cell(x, h, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        return out if batched else out.squeeze(0)
