"""What the benchmarks run, shared by the runner (run.py) and the pytest-benchmark suite.

A case is one module (a layer over T steps or a cell for one step) of one mode (RNN with tanh,
LSTM, GRU) at one shape and dtype, run for inference or for a training step. build_case()
makes the torch.nn module, the rnn_ext module carrying the same weights, and the inputs that
every contender shares; step() runs one inference call or one training step on a module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import rnn_ext

# mode -> (layer class name, cell class name, gates per hidden unit G)
MODES = {
    "rnn": ("RNN", "RNNCell", 1),  # nonlinearity tanh, torch.nn's default
    "lstm": ("LSTM", "LSTMCell", 4),
    "gru": ("GRU", "GRUCell", 3),
}

# shape -> (T steps, B batch, I input size, H hidden size); a cell is one step of the same B, I, H
SHAPES = {
    "small": (50, 8, 64, 64),
    "medium": (100, 32, 256, 256),
    "fastrnns": (100, 64, 512, 512),  # the shape of PyTorch's benchmarks/fastrnns
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

KINDS = ("layer", "cell")
PASSES = ("inference", "training")


@dataclass(frozen=True)
class Case:
    kind: str   # "layer" or "cell"
    mode: str   # key of MODES
    shape: str  # key of SHAPES
    dtype: str  # key of DTYPES
    pass_: str  # "inference" or "training"

    def label(self) -> str:
        return f"{self.kind} {self.mode} {self.shape} {self.dtype} {self.pass_}"


def flops(case: Case) -> float:
    """Floating-point operations of one call: forward 2*T*B*G*H*(I+H) (the input and recurrent
    GEMMs; the pointwise work is negligible beside them), training 3x forward (forward, plus the
    data and weight gradients of both GEMMs). A cell is one step (T = 1)."""
    steps, batch, input_size, hidden = SHAPES[case.shape]
    if case.kind == "cell":
        steps = 1
    forward = 2.0 * steps * batch * MODES[case.mode][2] * hidden * (input_size + hidden)
    return 3.0 * forward if case.pass_ == "training" else forward


def build_case(case: Case, device: torch.device) -> tuple[nn.Module, nn.Module, tuple]:
    """(torch.nn module, rnn_ext module with the same weights, inputs) on `device` in the case's
    dtype. Layers take x [T, B, I] (zero initial state); cells take x [B, I] and a random hx
    [B, H] (LSTM: (h, c)). For training the inputs require grad, so the backward computes the
    input gradients too, as in a stacked or embedded model."""
    layer_name, cell_name, _ = MODES[case.mode]
    name = layer_name if case.kind == "layer" else cell_name
    steps, batch, input_size, hidden = SHAPES[case.shape]
    dtype = DTYPES[case.dtype]
    generator = torch.Generator().manual_seed(0)

    torch.manual_seed(0)
    theirs = getattr(nn, name)(input_size, hidden)
    ours = getattr(rnn_ext, name)(input_size, hidden)
    ours.load_state_dict(theirs.state_dict())
    training = case.pass_ == "training"
    for module in (theirs, ours):
        module.to(device=device, dtype=dtype).train(training)

    def random(*size: int) -> torch.Tensor:
        tensor = torch.randn(*size, generator=generator).to(device=device, dtype=dtype)
        return tensor.requires_grad_(training)

    if case.kind == "layer":
        inputs = (random(steps, batch, input_size),)
    elif case.mode == "lstm":
        inputs = (random(batch, input_size), (random(batch, hidden), random(batch, hidden)))
    else:
        inputs = (random(batch, input_size), random(batch, hidden))
    return theirs, ours, inputs


def _leaves(inputs: tuple) -> list[torch.Tensor]:
    flat = []
    for item in inputs:
        flat.extend(item if isinstance(item, tuple) else (item,))
    return flat


def _loss(kind: str, output) -> torch.Tensor:
    """Sum of the output sequence (layer) or of every returned state (cell)."""
    if kind == "layer":
        return output[0].sum()
    states = output if isinstance(output, tuple) else (output,)
    return sum(state.sum() for state in states)


def step(case: Case, module: nn.Module, inputs: tuple):
    """One call of the case: inference runs the forward under torch.no_grad and returns its
    output; training zeroes the gradients (set_to_none), runs forward and the backward of the
    sum loss, and returns None."""
    if case.pass_ == "inference":
        with torch.no_grad():
            return module(*inputs)
    module.zero_grad(set_to_none=True)
    for tensor in _leaves(inputs):
        tensor.grad = None
    _loss(case.kind, module(*inputs)).backward()
    return None


def first_output(case: Case, output) -> torch.Tensor:
    """The tensor that compares contenders: y for a layer, h' for a cell."""
    if case.kind == "layer" or isinstance(output, tuple):
        return output[0]
    return output
