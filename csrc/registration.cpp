// torch.ops.rnn_ext: schemas and their CPU / CUDA implementations. The ops are device-agnostic
// (the GEMMs and pointwise kernels of the device table in kernels.h), so both keys share them.
// Autograd kernels, and the whole-cell ops' composite ones, are in autograd.cpp; fake (meta)
// kernels and differentiable_backward's are registered from Python (rnn_ext/_ops.py).
//
// Shapes: B batch rows, H hidden units, G gates per unit (RNN 1, LSTM 4, GRU 3), S saved values
// per unit (LSTM 5: i, f, g, o, c; GRU 5: r, z, n, W_hn h + b_hn, h), P the output size
// (proj_size, or H), N the rows of a packed sequence, T its steps.
//   x: [N, I]         a layer's input;  w_ih: [G*H, I] its input weights
//   xg: [B or N, G*H] input-side gate pre-activations  W_ih x (+ b_ih)
//   hg: [B, G*H]      hidden-side gate pre-activations W_hh h
//   b_ih, b_hh: [G*H] biases, None when the layer has no bias
//   hx, cx: [B, H]    previous hidden / cell state of a cell
//   w_hh: [G*H, P]    recurrent weights;  w_hr: [P, H] LSTM projection, None without proj_size
//   h0: [B, P], c0: [B, H]  initial states of a layer
//   batch_sizes: [T] int64 CPU, non-increasing, sum N, batch_sizes[0] = B (PackedSequence's)
//   reverse: run the steps from last to first (the reverse direction of a bidirectional layer)
//   y: [N, P] the layer's output, h_n: [B, P], c_n: [B, H] its final states
//   workspace: [B or N, S*H] what the backward reads ([0, S*H] when save_workspace is False);
//              the RNN's workspace is its output (hy, or y).
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(rnn_ext, m) {
  m.def("rnn_cell_forward(Tensor xg, Tensor hg, Tensor? b_ih, Tensor? b_hh, str nonlinearity)"
        " -> Tensor hy");
  m.def("rnn_cell_backward(Tensor grad_hy, Tensor hy, str nonlinearity) -> Tensor grad_gates");
  m.def("lstm_cell_forward(Tensor xg, Tensor hg, Tensor? b_ih, Tensor? b_hh, Tensor cx)"
        " -> (Tensor hy, Tensor cy, Tensor workspace)");
  m.def("lstm_cell_backward(Tensor grad_hy, Tensor grad_cy, Tensor workspace)"
        " -> (Tensor grad_gates, Tensor grad_cx)");
  m.def("gru_cell_forward(Tensor xg, Tensor hg, Tensor? b_ih, Tensor? b_hh, Tensor hx)"
        " -> (Tensor hy, Tensor workspace)");
  m.def("gru_cell_backward(Tensor grad_hy, Tensor workspace)"
        " -> (Tensor grad_xg, Tensor grad_hg, Tensor grad_hx)");
  // Inference (no backward): the GEMMs too, from the cell's input and weights, as torch's cells.
  m.def("rnn_cell_inference(Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor? b_ih,"
        " Tensor? b_hh, str nonlinearity) -> Tensor hy");
  m.def("lstm_cell_inference(Tensor input, Tensor hx, Tensor cx, Tensor w_ih, Tensor w_hh,"
        " Tensor? b_ih, Tensor? b_hh) -> (Tensor hy, Tensor cy)");
  m.def("gru_cell_inference(Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor? b_ih,"
        " Tensor? b_hh) -> Tensor hy");

  // Differentiable whole cell steps (the torch.nn cells' math, as aten::lstm_cell and its
  // kind): the arguments of the inference ops. With a gradient to compute, the two GEMMs, the
  // pointwise forward op, and in backward the pointwise backward op and the GEMMs' gradients,
  // in one autograd node; without, the inference op. CompositeImplicitAutograd (autograd.cpp).
  m.def("rnn_cell(Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh,"
        " str nonlinearity) -> Tensor hy");
  m.def("lstm_cell(Tensor input, Tensor hx, Tensor cx, Tensor w_ih, Tensor w_hh, Tensor? b_ih,"
        " Tensor? b_hh) -> (Tensor hy, Tensor cy)");
  m.def("gru_cell(Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor? b_ih,"
        " Tensor? b_hh) -> Tensor hy");

  m.def("rnn_layer_forward(Tensor xg, Tensor w_hh, Tensor? b_hh, Tensor h0, Tensor batch_sizes,"
        " bool reverse, str nonlinearity) -> (Tensor y, Tensor h_n)");
  m.def("rnn_layer_backward(Tensor grad_y, Tensor grad_h_n, Tensor w_hh, Tensor h0, Tensor y,"
        " Tensor batch_sizes, bool reverse, str nonlinearity)"
        " -> (Tensor grad_xg, Tensor grad_w_hh, Tensor grad_b_hh, Tensor grad_h0)");
  m.def("lstm_layer_forward(Tensor xg, Tensor w_hh, Tensor? b_hh, Tensor? w_hr, Tensor h0,"
        " Tensor c0, Tensor batch_sizes, bool reverse, bool save_workspace)"
        " -> (Tensor y, Tensor h_n, Tensor c_n, Tensor workspace)");
  m.def("lstm_layer_backward(Tensor grad_y, Tensor grad_h_n, Tensor grad_c_n, Tensor w_hh,"
        " Tensor? w_hr, Tensor h0, Tensor y, Tensor workspace, Tensor batch_sizes, bool reverse)"
        " -> (Tensor grad_xg, Tensor grad_w_hh, Tensor grad_b_hh, Tensor grad_h0,"
        " Tensor grad_c0, Tensor grad_w_hr)");
  m.def("gru_layer_forward(Tensor xg, Tensor w_hh, Tensor? b_hh, Tensor h0, Tensor batch_sizes,"
        " bool reverse, bool save_workspace) -> (Tensor y, Tensor h_n, Tensor workspace)");
  m.def("gru_layer_backward(Tensor grad_y, Tensor grad_h_n, Tensor w_hh, Tensor h0, Tensor y,"
        " Tensor workspace, Tensor batch_sizes, bool reverse)"
        " -> (Tensor grad_xg, Tensor grad_w_hh, Tensor grad_b_hh, Tensor grad_h0)");
  // Inference: the forward ops' outputs (no workspace, no backward), from x and w_ih.
  m.def("rnn_layer_inference(Tensor x, Tensor w_ih, Tensor? b_ih, Tensor w_hh, Tensor? b_hh,"
        " Tensor h0, Tensor batch_sizes, bool reverse, str nonlinearity)"
        " -> (Tensor y, Tensor h_n)");
  m.def("lstm_layer_inference(Tensor x, Tensor w_ih, Tensor? b_ih, Tensor w_hh, Tensor? b_hh,"
        " Tensor? w_hr, Tensor h0, Tensor c0, Tensor batch_sizes, bool reverse)"
        " -> (Tensor y, Tensor h_n, Tensor c_n)");
  m.def("gru_layer_inference(Tensor x, Tensor w_ih, Tensor? b_ih, Tensor w_hh, Tensor? b_hh,"
        " Tensor h0, Tensor batch_sizes, bool reverse) -> (Tensor y, Tensor h_n)");
  // The gradients of op `step` as a graph, from the reference formulas: the backward of the
  // differentiable ops under create_graph (double backward). step: the name of a
  // *_cell_forward, *_layer_forward or whole-cell op, with an RNN op's nonlinearity in it
  // ("rnn_tanh_cell_forward", "lstm_layer_forward", "rnn_relu_cell", "gru_cell", ...);
  // inputs: its tensor inputs in schema order, batch_sizes left out, None where absent; grads:
  // the gradients of its outputs but the workspace; batch_sizes (layers only) and reverse: the
  // op's. One gradient per input: zeros where it does not require grad, an empty tensor where
  // it is absent.
  m.def("differentiable_backward(str step, Tensor?[] inputs, Tensor[] grads,"
        " Tensor? batch_sizes, bool reverse) -> Tensor[]");
}

namespace {
void register_impls(torch::Library& m) {
  m.impl("rnn_cell_forward", &rnn_ext::rnn_cell_forward);
  m.impl("rnn_cell_backward", &rnn_ext::rnn_cell_backward);
  m.impl("lstm_cell_forward", &rnn_ext::lstm_cell_forward);
  m.impl("lstm_cell_backward", &rnn_ext::lstm_cell_backward);
  m.impl("gru_cell_forward", &rnn_ext::gru_cell_forward);
  m.impl("gru_cell_backward", &rnn_ext::gru_cell_backward);
  m.impl("rnn_cell_inference", &rnn_ext::rnn_cell_inference);
  m.impl("lstm_cell_inference", &rnn_ext::lstm_cell_inference);
  m.impl("gru_cell_inference", &rnn_ext::gru_cell_inference);
  m.impl("rnn_layer_forward", &rnn_ext::rnn_layer_forward);
  m.impl("rnn_layer_backward", &rnn_ext::rnn_layer_backward);
  m.impl("lstm_layer_forward", &rnn_ext::lstm_layer_forward);
  m.impl("lstm_layer_backward", &rnn_ext::lstm_layer_backward);
  m.impl("gru_layer_forward", &rnn_ext::gru_layer_forward);
  m.impl("gru_layer_backward", &rnn_ext::gru_layer_backward);
  m.impl("rnn_layer_inference", &rnn_ext::rnn_layer_inference);
  m.impl("lstm_layer_inference", &rnn_ext::lstm_layer_inference);
  m.impl("gru_layer_inference", &rnn_ext::gru_layer_inference);
}
}  // namespace

// CUDA is registered even in a CPU-only build: the ops then raise a clear "no kernels for
// device type cuda" error from kernels.cpp instead of the dispatcher's generic one.
TORCH_LIBRARY_IMPL(rnn_ext, CPU, m) { register_impls(m); }
TORCH_LIBRARY_IMPL(rnn_ext, CUDA, m) { register_impls(m); }
