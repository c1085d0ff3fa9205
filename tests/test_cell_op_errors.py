"""The raw cell ops refuse malformed arguments with their own error, which names the op and the
argument: wrong dims, sizes, dtypes, widths, nonlinearities and devices."""

from __future__ import annotations

import re

import pytest
import torch

from helpers import CUDA_ONLY

pytestmark = [pytest.mark.usefixtures("extension"), pytest.mark.sanitize]

ops = torch.ops.rnn_ext


def _t(*shape, dtype=torch.float64, device="cpu"):
    if dtype.is_floating_point:
        return torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype)
    return torch.ones(shape, dtype=dtype, device=device)


B_, H_ = 3, 4

ERROR_CASES = {
    # wrong dims
    "rnn_xg_3d": lambda d: ops.rnn_pointwise_forward(_t(1, B_, H_, device=d), _t(1, B_, H_, device=d),
                                                None, None, "tanh"),
    "rnn_xg_1d": lambda d: ops.rnn_pointwise_forward(_t(H_, device=d), _t(H_, device=d), None, None,
                                                "tanh"),
    "lstm_hg_1d": lambda d: ops.lstm_pointwise_forward(_t(B_, 4 * H_, device=d), _t(4 * H_, device=d),
                                                  None, None, _t(B_, H_, device=d)),
    "gru_hx_3d": lambda d: ops.gru_pointwise_forward(_t(B_, 3 * H_, device=d), _t(B_, 3 * H_, device=d),
                                                None, None, _t(1, B_, H_, device=d)),
    "lstm_bias_2d": lambda d: ops.lstm_pointwise_forward(
        _t(B_, 4 * H_, device=d), _t(B_, 4 * H_, device=d), _t(1, 4 * H_, device=d), None,
        _t(B_, H_, device=d)),
    # wrong sizes
    "rnn_hg_rows": lambda d: ops.rnn_pointwise_forward(_t(B_, H_, device=d), _t(B_ + 1, H_, device=d),
                                                  None, None, "tanh"),
    "rnn_hg_cols": lambda d: ops.rnn_pointwise_forward(_t(B_, H_, device=d), _t(B_, H_ + 1, device=d),
                                                  None, None, "relu"),
    "lstm_hg_cols": lambda d: ops.lstm_pointwise_forward(
        _t(B_, 4 * H_, device=d), _t(B_, 3 * H_, device=d), None, None, _t(B_, H_, device=d)),
    "gru_hg_rows": lambda d: ops.gru_pointwise_forward(
        _t(B_, 3 * H_, device=d), _t(B_ - 1, 3 * H_, device=d), None, None, _t(B_, H_, device=d)),
    "rnn_b_ih_len": lambda d: ops.rnn_pointwise_forward(_t(B_, H_, device=d), _t(B_, H_, device=d),
                                                   _t(H_ + 1, device=d), None, "tanh"),
    "lstm_b_hh_len": lambda d: ops.lstm_pointwise_forward(
        _t(B_, 4 * H_, device=d), _t(B_, 4 * H_, device=d), None, _t(H_, device=d),
        _t(B_, H_, device=d)),
    "gru_b_ih_len": lambda d: ops.gru_pointwise_forward(
        _t(B_, 3 * H_, device=d), _t(B_, 3 * H_, device=d), _t(4 * H_, device=d), None,
        _t(B_, H_, device=d)),
    "lstm_cx_shape": lambda d: ops.lstm_pointwise_forward(
        _t(B_, 4 * H_, device=d), _t(B_, 4 * H_, device=d), None, None, _t(B_, H_ + 1, device=d)),
    "lstm_cx_rows": lambda d: ops.lstm_pointwise_forward(
        _t(B_, 4 * H_, device=d), _t(B_, 4 * H_, device=d), None, None, _t(B_ + 1, H_, device=d)),
    "gru_hx_shape": lambda d: ops.gru_pointwise_forward(
        _t(B_, 3 * H_, device=d), _t(B_, 3 * H_, device=d), None, None, _t(B_, 4 * H_, device=d)),
    "lstm_workspace_shape": lambda d: ops.lstm_pointwise_backward(
        _t(B_, H_, device=d), _t(B_, H_, device=d), _t(B_, 4 * H_, device=d)),
    "lstm_workspace_rows": lambda d: ops.lstm_pointwise_backward(
        _t(B_, H_, device=d), _t(B_, H_, device=d), _t(B_ + 1, 5 * H_, device=d)),
    "lstm_grad_cy_shape": lambda d: ops.lstm_pointwise_backward(
        _t(B_, H_, device=d), _t(B_, H_ + 1, device=d), _t(B_, 5 * H_, device=d)),
    "gru_workspace_shape": lambda d: ops.gru_pointwise_backward(_t(B_, H_, device=d),
                                                           _t(B_, 3 * H_, device=d)),
    "gru_workspace_1d": lambda d: ops.gru_pointwise_backward(_t(B_, H_, device=d),
                                                        _t(5 * H_, device=d)),
    "rnn_backward_hy_shape": lambda d: ops.rnn_pointwise_backward(_t(B_, H_, device=d),
                                                             _t(B_, H_ + 1, device=d), "tanh"),
    "rnn_backward_grad_1d": lambda d: ops.rnn_pointwise_backward(_t(H_, device=d), _t(H_, device=d),
                                                            "relu"),
    # mismatched dtypes
    "rnn_hg_dtype": lambda d: ops.rnn_pointwise_forward(
        _t(B_, H_, device=d), _t(B_, H_, dtype=torch.float32, device=d), None, None, "tanh"),
    "lstm_bias_dtype": lambda d: ops.lstm_pointwise_forward(
        _t(B_, 4 * H_, device=d), _t(B_, 4 * H_, device=d),
        _t(4 * H_, dtype=torch.float32, device=d), None, _t(B_, H_, device=d)),
    "lstm_cx_dtype": lambda d: ops.lstm_pointwise_forward(
        _t(B_, 4 * H_, device=d), _t(B_, 4 * H_, device=d), None, None,
        _t(B_, H_, dtype=torch.float32, device=d)),
    "gru_hx_dtype": lambda d: ops.gru_pointwise_forward(
        _t(B_, 3 * H_, dtype=torch.float32, device=d), _t(B_, 3 * H_, dtype=torch.float32,
                                                          device=d), None, None,
        _t(B_, H_, device=d)),
    "gru_workspace_dtype": lambda d: ops.gru_pointwise_backward(
        _t(B_, H_, device=d), _t(B_, 5 * H_, dtype=torch.float32, device=d)),
    "lstm_grad_cy_dtype": lambda d: ops.lstm_pointwise_backward(
        _t(B_, H_, device=d), _t(B_, H_, dtype=torch.bfloat16, device=d),
        _t(B_, 5 * H_, device=d)),
    # integer dtypes (every argument integer, so only the dtype is wrong)
    "rnn_int64": lambda d: ops.rnn_pointwise_forward(_t(B_, H_, dtype=torch.int64, device=d),
                                                _t(B_, H_, dtype=torch.int64, device=d),
                                                None, None, "tanh"),
    "lstm_int32": lambda d: ops.lstm_pointwise_forward(
        _t(B_, 4 * H_, dtype=torch.int32, device=d), _t(B_, 4 * H_, dtype=torch.int32, device=d),
        None, None, _t(B_, H_, dtype=torch.int32, device=d)),
    "gru_int64_backward": lambda d: ops.gru_pointwise_backward(
        _t(B_, H_, dtype=torch.int64, device=d), _t(B_, 5 * H_, dtype=torch.int64, device=d)),
    "rnn_bool_backward": lambda d: ops.rnn_pointwise_backward(
        _t(B_, H_, dtype=torch.bool, device=d), _t(B_, H_, dtype=torch.bool, device=d), "tanh"),
    # widths that are not a multiple of G (or are zero)
    "lstm_width_not_multiple": lambda d: ops.lstm_pointwise_forward(
        _t(B_, 4 * H_ + 1, device=d), _t(B_, 4 * H_ + 1, device=d), None, None,
        _t(B_, H_, device=d)),
    "gru_width_not_multiple": lambda d: ops.gru_pointwise_forward(
        _t(B_, 3 * H_ + 2, device=d), _t(B_, 3 * H_ + 2, device=d), None, None,
        _t(B_, H_, device=d)),
    "lstm_width_zero": lambda d: ops.lstm_pointwise_forward(
        _t(B_, 0, device=d), _t(B_, 0, device=d), None, None, _t(B_, 0, device=d)),
    "rnn_width_zero": lambda d: ops.rnn_pointwise_forward(_t(B_, 0, device=d), _t(B_, 0, device=d),
                                                     None, None, "tanh"),
    # unknown nonlinearity
    "rnn_forward_sigmoid": lambda d: ops.rnn_pointwise_forward(_t(B_, H_, device=d),
                                                          _t(B_, H_, device=d), None, None,
                                                          "sigmoid"),
    "rnn_backward_sigmoid": lambda d: ops.rnn_pointwise_backward(_t(B_, H_, device=d),
                                                            _t(B_, H_, device=d), "sigmoid"),
    "rnn_forward_empty_nonlinearity": lambda d: ops.rnn_pointwise_forward(
        _t(B_, H_, device=d), _t(B_, H_, device=d), None, None, ""),
    # inference ops (input [B, 2], w_ih [G*H, 2])
    "rnn_inference_w_ih_cols": lambda d: ops.rnn_cell_inference(
        _t(B_, 2, device=d), _t(B_, H_, device=d), _t(H_, 3, device=d), _t(H_, H_, device=d),
        None, None, "tanh"),
    "rnn_inference_no_w_ih": lambda d: ops.rnn_cell_inference(
        _t(B_, H_, device=d), _t(B_, H_, device=d), None, _t(H_, H_, device=d), None, None,
        "tanh"),
    "rnn_inference_hx_rows": lambda d: ops.rnn_cell_inference(
        _t(B_, 2, device=d), _t(B_ + 1, H_, device=d), _t(H_, 2, device=d),
        _t(H_, H_, device=d), None, None, "tanh"),
    "rnn_inference_sigmoid": lambda d: ops.rnn_cell_inference(
        _t(B_, 2, device=d), _t(B_, H_, device=d), _t(H_, 2, device=d), _t(H_, H_, device=d),
        None, None, "sigmoid"),
    "lstm_inference_w_hh_rows": lambda d: ops.lstm_cell_inference(
        _t(B_, 2, device=d), _t(B_, H_, device=d), _t(B_, H_, device=d),
        _t(4 * H_, 2, device=d), _t(3 * H_, H_, device=d), None, None),
    "lstm_inference_cx_cols": lambda d: ops.lstm_cell_inference(
        _t(B_, 2, device=d), _t(B_, H_, device=d), _t(B_, H_ + 1, device=d),
        _t(4 * H_, 2, device=d), _t(4 * H_, H_, device=d), None, None),
    "lstm_inference_b_hh_len": lambda d: ops.lstm_cell_inference(
        _t(B_, 2, device=d), _t(B_, H_, device=d), _t(B_, H_, device=d),
        _t(4 * H_, 2, device=d), _t(4 * H_, H_, device=d), None, _t(H_, device=d)),
    "gru_inference_input_1d": lambda d: ops.gru_cell_inference(
        _t(2, device=d), _t(B_, H_, device=d), _t(3 * H_, 2, device=d),
        _t(3 * H_, H_, device=d), None, None),
    "gru_inference_w_ih_dtype": lambda d: ops.gru_cell_inference(
        _t(B_, 2, device=d), _t(B_, H_, device=d), _t(3 * H_, 2, dtype=torch.float32, device=d),
        _t(3 * H_, H_, device=d), None, None),
    "gru_inference_int": lambda d: ops.gru_cell_inference(
        _t(B_, 2, dtype=torch.int64, device=d), _t(B_, H_, dtype=torch.int64, device=d),
        _t(3 * H_, 2, dtype=torch.int64, device=d), _t(3 * H_, H_, dtype=torch.int64, device=d),
        None, None),
}


# the op's words for each case (the start of its message)
ERROR_WORDS = {
    "rnn_xg_3d": "rnn_ext::rnn_pointwise_forward: gate pre-activations must be 2-D [B, 1*H], got 3-D",
    "rnn_xg_1d": "rnn_ext::rnn_pointwise_forward: gate pre-activations must be 2-D [B, 1*H], got 1-D",
    "lstm_hg_1d": "rnn_ext::lstm_pointwise_forward: hg must have shape [3, 16], got [16]",
    "gru_hx_3d": "rnn_ext::gru_pointwise_forward: hx must have shape [3, 4], got [1, 3, 4]",
    "lstm_bias_2d": "rnn_ext::lstm_pointwise_forward: b_ih must have shape [16], got [1, 16]",
    "rnn_hg_rows": "rnn_ext::rnn_pointwise_forward: hg must have shape [3, 4], got [4, 4]",
    "rnn_hg_cols": "rnn_ext::rnn_pointwise_forward: hg must have shape [3, 4], got [3, 5]",
    "lstm_hg_cols": "rnn_ext::lstm_pointwise_forward: hg must have shape [3, 16], got [3, 12]",
    "gru_hg_rows": "rnn_ext::gru_pointwise_forward: hg must have shape [3, 12], got [2, 12]",
    "rnn_b_ih_len": "rnn_ext::rnn_pointwise_forward: b_ih must have shape [4], got [5]",
    "lstm_b_hh_len": "rnn_ext::lstm_pointwise_forward: b_hh must have shape [16], got [4]",
    "gru_b_ih_len": "rnn_ext::gru_pointwise_forward: b_ih must have shape [12], got [16]",
    "lstm_cx_shape": "rnn_ext::lstm_pointwise_forward: cx must have shape [3, 4], got [3, 5]",
    "lstm_cx_rows": "rnn_ext::lstm_pointwise_forward: cx must have shape [3, 4], got [4, 4]",
    "gru_hx_shape": "rnn_ext::gru_pointwise_forward: hx must have shape [3, 4], got [3, 16]",
    "lstm_workspace_shape":
        "rnn_ext::lstm_pointwise_backward: workspace must have shape [3, 20], got [3, 16]",
    "lstm_workspace_rows":
        "rnn_ext::lstm_pointwise_backward: workspace must have shape [3, 20], got [4, 20]",
    "lstm_grad_cy_shape":
        "rnn_ext::lstm_pointwise_backward: grad_cy must have shape [3, 4], got [3, 5]",
    "gru_workspace_shape":
        "rnn_ext::gru_pointwise_backward: workspace must have shape [3, 20], got [3, 12]",
    "gru_workspace_1d": "rnn_ext::gru_pointwise_backward: workspace must have shape [3, 20], got [20]",
    "rnn_backward_hy_shape": "rnn_ext::rnn_pointwise_backward: hy must have shape [3, 4], got [3, 5]",
    "rnn_backward_grad_1d": "rnn_ext::rnn_pointwise_backward: grad_hy must have shape [*, *], got [4]",
    "rnn_hg_dtype": "rnn_ext::rnn_pointwise_forward: hg has dtype Float but expected Double",
    "lstm_bias_dtype": "rnn_ext::lstm_pointwise_forward: b_ih has dtype Float but expected Double",
    "lstm_cx_dtype": "rnn_ext::lstm_pointwise_forward: cx has dtype Float but expected Double",
    "gru_hx_dtype": "rnn_ext::gru_pointwise_forward: hx has dtype Double but expected Float",
    "gru_workspace_dtype":
        "rnn_ext::gru_pointwise_backward: workspace has dtype Float but expected Double",
    "lstm_grad_cy_dtype":
        "rnn_ext::lstm_pointwise_backward: grad_cy has dtype BFloat16 but expected Double",
    "rnn_int64": "rnn_ext::rnn_pointwise_forward: expected a floating-point tensor, got Long",
    "lstm_int32": "rnn_ext::lstm_pointwise_forward: expected a floating-point tensor, got Int",
    "gru_int64_backward": "rnn_ext::gru_pointwise_backward: expected a floating-point tensor, got Long",
    "rnn_bool_backward": "rnn_ext::rnn_pointwise_backward: expected a floating-point tensor, got Bool",
    "lstm_width_not_multiple":
        "rnn_ext::lstm_pointwise_forward: gate pre-activations must have 4*H columns, got 17",
    "gru_width_not_multiple":
        "rnn_ext::gru_pointwise_forward: gate pre-activations must have 3*H columns, got 14",
    "lstm_width_zero":
        "rnn_ext::lstm_pointwise_forward: gate pre-activations must have 4*H columns, got 0",
    "rnn_width_zero":
        "rnn_ext::rnn_pointwise_forward: gate pre-activations must have 1*H columns, got 0",
    "rnn_forward_sigmoid":
        "rnn_ext::rnn_pointwise_forward: unknown nonlinearity 'sigmoid', expected 'tanh' or 'relu'",
    "rnn_backward_sigmoid":
        "rnn_ext::rnn_pointwise_backward: unknown nonlinearity 'sigmoid', expected 'tanh' or 'relu'",
    "rnn_forward_empty_nonlinearity":
        "rnn_ext::rnn_pointwise_forward: unknown nonlinearity '', expected 'tanh' or 'relu'",
    "rnn_inference_w_ih_cols":
        "rnn_ext::rnn_cell_inference: w_ih must have shape [4, 2], got [4, 3]",
    "rnn_inference_no_w_ih": "rnn_ext::rnn_cell_inference: w_ih is undefined",
    "rnn_inference_hx_rows": "rnn_ext::rnn_cell_inference: hx must have shape [3, 4], got [4, 4]",
    "rnn_inference_sigmoid":
        "rnn_ext::rnn_cell_inference: unknown nonlinearity 'sigmoid', expected 'tanh' or 'relu'",
    "lstm_inference_w_hh_rows": "rnn_ext::lstm_cell_inference: w_hh must be [4*H, H], got [12, 4]",
    "lstm_inference_cx_cols":
        "rnn_ext::lstm_cell_inference: cx must have shape [3, 4], got [3, 5]",
    "lstm_inference_b_hh_len": "rnn_ext::lstm_cell_inference: b_hh must have shape [16], got [4]",
    "gru_inference_input_1d": "rnn_ext::gru_cell_inference: input must have shape [*, *], got [2]",
    "gru_inference_w_ih_dtype":
        "rnn_ext::gru_cell_inference: w_ih has dtype Float but expected Double",
    "gru_inference_int": "rnn_ext::gru_cell_inference: expected a floating-point tensor, got Long",
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_wrong_arguments_raise(device, case):
    """Each malformed call raises the op's own RuntimeError, which names the op and the
    argument (not a generic dispatch error)."""
    with pytest.raises(RuntimeError, match=re.escape(ERROR_WORDS[case])):
        ERROR_CASES[case](device)


# The meta device stands in for a second device type on the CPU-only machine.
MIXED_DEVICE_UNCHECKED = pytest.mark.xfail(
    strict=True, reason="the CPU kernel and the meta (fake) implementation of lstm_pointwise_forward "
    "accept a cx on another device than xg: the first returns uninitialised values")


@pytest.mark.parametrize("xg_device, cx_device", [
    pytest.param("cpu", "meta", marks=MIXED_DEVICE_UNCHECKED),
    pytest.param("meta", "cpu", marks=MIXED_DEVICE_UNCHECKED),
    pytest.param("cuda", "cpu", marks=CUDA_ONLY),
    pytest.param("cpu", "cuda", marks=CUDA_ONLY),
])
def test_device_mismatch_raises(xg_device, cx_device):
    """Arguments on two devices raise the op's own error naming the argument and its device."""
    xg = torch.randn(3, 16, device=xg_device)
    with pytest.raises(RuntimeError, match=r"rnn_ext::lstm_pointwise_forward: \w+ is on"):
        ops.lstm_pointwise_forward(xg, xg.clone(), None, None, torch.randn(3, 4, device=cx_device))
