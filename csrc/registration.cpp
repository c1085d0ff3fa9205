// torch.ops.rnn_ext: every schema, with every argument's shape. The device kernels register
// themselves beside their code (cell_ops.cpp, recurrence.cpp; device-agnostic: the GEMMs and
// pointwise kernels of the device table in kernels.h, so CPU and CUDA share them); autograd
// nodes and the composite ops are in autograd.cpp; fake (meta) kernels and
// differentiable_backward's kernel are registered from Python (rnn_ext/_ops.py).
//
// Four families, by what they compute:
//   *_pointwise_forward / _backward  one cell step from precomputed GEMM results (xg, hg): the
//                                    fused per-element kernel, and its backward
//   *_cell_inference, *_cell         a whole cell step from the input and weights (both GEMMs
//                                    and the pointwise step), as torch.nn's cells
//   *_recurrence / _backward         one direction of one layer over a sequence, from xg
//   *_layer_inference, *_layer       one direction of one layer, from the layer's input x
// The *_cell and *_layer ops are what rnn_ext.functional calls: they run the differentiable
// node (autograd.cpp) when a gradient is wanted and the inference op otherwise.
//
// Shapes: B batch rows, H hidden units, G gates per unit (RNN 1, LSTM 4, GRU 3), S saved values
// per unit (LSTM 5: i, f, g, o, c; GRU 5: r, z, n, W_hn h + b_hn, h), P the output size
// (proj_size, or H), N the rows of a packed sequence, T its steps.
//   x: [N, I]         a layer's input;  w_ih: [G*H, I] its input weights
//   input: [B, I]     a cell's input
//   xg: [B or N, G*H] input-side gate pre-activations  W_ih x (+ b_ih)
//   hg: [B, G*H]      hidden-side gate pre-activations W_hh h
//   b_ih, b_hh: [G*H] biases, None when the layer has no bias
//   hx, cx: [B, H]    previous hidden / cell state of a cell
//   w_hh: [G*H, P]    recurrent weights;  w_hr: [P, H] LSTM projection, None without proj_size
//   h0: [B, P], c0: [B, H]  initial states of a layer
//   batch_sizes: [T] int64 CPU, non-increasing, sum N, batch_sizes[0] = B (PackedSequence's)
//   reverse: run the steps from last to first (the reverse direction of a bidirectional layer)
//   nonlinearity: the RNN's, 'tanh' or 'relu'
//   y: [N, P] the layer's output, h_n: [B, P], c_n: [B, H] its final states
//   workspace: [B or N, S*H] what the backward reads ([0, S*H] when save_workspace is False);
//              the RNN's workspace is its output (hy, or y).
//   grad_<name>: the gradient of <name>, of its shape
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(rnn_ext, m) {
  // ---- pointwise
  m.def("rnn_pointwise_forward(Tensor xg, Tensor hg, Tensor? b_ih, Tensor? b_hh,"
        " str nonlinearity) -> Tensor hy");
  m.def("rnn_pointwise_backward(Tensor grad_hy, Tensor hy, str nonlinearity)"
        " -> Tensor grad_gates");
  m.def("lstm_pointwise_forward(Tensor xg, Tensor hg, Tensor? b_ih, Tensor? b_hh, Tensor cx)"
        " -> (Tensor hy, Tensor cy, Tensor workspace)");
  m.def("lstm_pointwise_backward(Tensor grad_hy, Tensor grad_cy, Tensor workspace)"
        " -> (Tensor grad_gates, Tensor grad_cx)");
  m.def("gru_pointwise_forward(Tensor xg, Tensor hg, Tensor? b_ih, Tensor? b_hh, Tensor hx)"
        " -> (Tensor hy, Tensor workspace)");
  m.def("gru_pointwise_backward(Tensor grad_hy, Tensor workspace)"
        " -> (Tensor grad_xg, Tensor grad_hg, Tensor grad_hx)");

  // ---- cells. Inference (no backward): both GEMMs and the pointwise step, no workspace.
  m.def("rnn_cell_inference(Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor? b_ih,"
        " Tensor? b_hh, str nonlinearity) -> Tensor hy");
  m.def("lstm_cell_inference(Tensor input, Tensor hx, Tensor cx, Tensor w_ih, Tensor w_hh,"
        " Tensor? b_ih, Tensor? b_hh) -> (Tensor hy, Tensor cy)");
  m.def("gru_cell_inference(Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor? b_ih,"
        " Tensor? b_hh) -> Tensor hy");
  // Differentiable whole cell steps (the torch.nn cells' math, as aten::lstm_cell and its
  // kind), with the inference ops' arguments. With a gradient to compute, the two GEMMs, the
  // pointwise forward op, and in backward the pointwise backward op and the GEMMs' gradients,
  // in one autograd node; without, the inference op. CompositeImplicitAutograd (autograd.cpp).
  m.def("rnn_cell(Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh,"
        " str nonlinearity) -> Tensor hy");
  m.def("lstm_cell(Tensor input, Tensor hx, Tensor cx, Tensor w_ih, Tensor w_hh, Tensor? b_ih,"
        " Tensor? b_hh) -> (Tensor hy, Tensor cy)");
  m.def("gru_cell(Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor? b_ih,"
        " Tensor? b_hh) -> Tensor hy");

  // ---- recurrence: differentiable (one autograd node each, autograd.cpp), from xg
  m.def("rnn_recurrence(Tensor xg, Tensor w_hh, Tensor? b_hh, Tensor h0, Tensor batch_sizes,"
        " bool reverse, str nonlinearity) -> (Tensor y, Tensor h_n)");
  m.def("rnn_recurrence_backward(Tensor grad_y, Tensor grad_h_n, Tensor w_hh, Tensor h0,"
        " Tensor y, Tensor batch_sizes, bool reverse, str nonlinearity)"
        " -> (Tensor grad_xg, Tensor grad_w_hh, Tensor grad_b_hh, Tensor grad_h0)");
  m.def("lstm_recurrence(Tensor xg, Tensor w_hh, Tensor? b_hh, Tensor? w_hr, Tensor h0,"
        " Tensor c0, Tensor batch_sizes, bool reverse, bool save_workspace)"
        " -> (Tensor y, Tensor h_n, Tensor c_n, Tensor workspace)");
  m.def("lstm_recurrence_backward(Tensor grad_y, Tensor grad_h_n, Tensor grad_c_n, Tensor w_hh,"
        " Tensor? w_hr, Tensor h0, Tensor y, Tensor workspace, Tensor batch_sizes, bool reverse)"
        " -> (Tensor grad_xg, Tensor grad_w_hh, Tensor grad_b_hh, Tensor grad_h0,"
        " Tensor grad_c0, Tensor grad_w_hr)");
  m.def("gru_recurrence(Tensor xg, Tensor w_hh, Tensor? b_hh, Tensor h0, Tensor batch_sizes,"
        " bool reverse, bool save_workspace) -> (Tensor y, Tensor h_n, Tensor workspace)");
  m.def("gru_recurrence_backward(Tensor grad_y, Tensor grad_h_n, Tensor w_hh, Tensor h0,"
        " Tensor y, Tensor workspace, Tensor batch_sizes, bool reverse)"
        " -> (Tensor grad_xg, Tensor grad_w_hh, Tensor grad_b_hh, Tensor grad_h0)");

  // ---- layers. Inference: the recurrence ops' outputs (no workspace, no backward), from x and
  // w_ih, which they project a chunk of steps at a time.
  m.def("rnn_layer_inference(Tensor x, Tensor w_ih, Tensor? b_ih, Tensor w_hh, Tensor? b_hh,"
        " Tensor h0, Tensor batch_sizes, bool reverse, str nonlinearity)"
        " -> (Tensor y, Tensor h_n)");
  m.def("lstm_layer_inference(Tensor x, Tensor w_ih, Tensor? b_ih, Tensor w_hh, Tensor? b_hh,"
        " Tensor? w_hr, Tensor h0, Tensor c0, Tensor batch_sizes, bool reverse)"
        " -> (Tensor y, Tensor h_n, Tensor c_n)");
  m.def("gru_layer_inference(Tensor x, Tensor w_ih, Tensor? b_ih, Tensor w_hh, Tensor? b_hh,"
        " Tensor h0, Tensor batch_sizes, bool reverse) -> (Tensor y, Tensor h_n)");
  // One direction of one layer with the inference ops' arguments. With a gradient to compute,
  // xg = linear(x, w_ih, b_ih), then the recurrence op (one autograd node); without, the
  // inference op. CompositeImplicitAutograd (autograd.cpp).
  m.def("rnn_layer(Tensor x, Tensor w_ih, Tensor? b_ih, Tensor w_hh, Tensor? b_hh, Tensor h0,"
        " Tensor batch_sizes, bool reverse, str nonlinearity) -> (Tensor y, Tensor h_n)");
  m.def("lstm_layer(Tensor x, Tensor w_ih, Tensor? b_ih, Tensor w_hh, Tensor? b_hh,"
        " Tensor? w_hr, Tensor h0, Tensor c0, Tensor batch_sizes, bool reverse)"
        " -> (Tensor y, Tensor h_n, Tensor c_n)");
  m.def("gru_layer(Tensor x, Tensor w_ih, Tensor? b_ih, Tensor w_hh, Tensor? b_hh, Tensor h0,"
        " Tensor batch_sizes, bool reverse) -> (Tensor y, Tensor h_n)");

  // The gradients of a differentiable op as a graph, from the reference formulas: the backward
  // of the autograd nodes under create_graph (double backward). op: "cell" (the *_cell ops) or
  // "recurrence" (the *_recurrence ops); mode: the cell, as torch.nn names it ('RNN_TANH',
  // 'RNN_RELU', 'LSTM', 'GRU'); inputs: the op's tensor inputs in schema order, batch_sizes
  // left out, None where absent; grads: the gradients of its outputs but the workspace;
  // batch_sizes (recurrence only) and reverse: the op's. One gradient per input: zeros where it
  // does not require grad, an empty tensor where it is absent.
  m.def("differentiable_backward(str op, str mode, Tensor?[] inputs, Tensor[] grads,"
        " Tensor? batch_sizes, bool reverse) -> Tensor[]");
}
