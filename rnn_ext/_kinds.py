"""The four cells' names, in one table: torch.nn's mode, the prefix of their ops in
torch.ops.rnn_ext, the RNN's nonlinearity and the gates per unit. (C++ has its own, in
csrc/kernels.cpp.)"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Kind:
    mode: str                 # torch.nn's: 'RNN_TANH', 'RNN_RELU', 'LSTM' or 'GRU'
    op: str                   # the ops' prefix: 'rnn' (rnn_ext::rnn_layer, ...), 'lstm', 'gru'
    nonlinearity: str | None  # the RNN's, 'tanh' or 'relu' (an argument of its ops); else None
    gates: int                # G, gates per unit


KINDS: dict[str, Kind] = {kind.mode: kind for kind in (
    Kind("RNN_TANH", "rnn", "tanh", 1),
    Kind("RNN_RELU", "rnn", "relu", 1),
    Kind("LSTM", "lstm", None, 4),
    Kind("GRU", "gru", None, 3),
)}


def rnn_mode(nonlinearity: str) -> str:
    """The mode of the RNN with `nonlinearity`; torch.nn's error for an unknown one."""
    for kind in KINDS.values():
        if kind.nonlinearity is not None and kind.nonlinearity == nonlinearity:
            return kind.mode
    raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
