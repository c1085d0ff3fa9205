"""rnn_ext: fused C++/CUDA kernels for RNN, LSTM and GRU, as drop-in torch.nn modules."""

from ._backend import backend, extension_available, extension_built_with_cuda, set_backend
from . import reference, functional
from .modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell

if extension_available():
    from . import _ops  # noqa: F401  (fake and autograd registrations)

__version__ = "0.1.0"
__all__ = ["RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell", "backend", "set_backend",
           "extension_available", "extension_built_with_cuda", "functional", "reference", "__version__"]
