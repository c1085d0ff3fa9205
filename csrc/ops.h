// The device kernels of torch.ops.rnn_ext's ops, as C++ functions (the signatures the
// dispatcher calls them with). Schemas, with every argument's shape, are in registration.cpp;
// the pointwise and cell inference ops live in cell_ops.cpp, the recurrence and layer inference
// ops in recurrence.cpp, and each file registers its own. The autograd nodes and the composite
// ops (rnn_cell, ..., lstm_layer, ...) are in autograd.cpp. B batch rows, H hidden units, G gates
// per unit (RNN 1, LSTM 4, GRU 3).
#pragma once

#include <optional>
#include <string_view>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <torch/library.h>

namespace rnn_ext {

using at::Tensor;
using OptTensor = std::optional<at::Tensor>;

// Registers a file's device kernels, `register_fn(torch::Library&)`, for the CPU and CUDA keys.
// CUDA is registered even in a CPU-only build: the ops then raise a clear "no kernels for device
// type cuda" error from kernels.cpp instead of the dispatcher's generic one.
#define RNN_EXT_REGISTER_DEVICE_KERNELS(register_fn)              \
  TORCH_LIBRARY_IMPL(rnn_ext, CPU, m) { register_fn(m); }         \
  TORCH_LIBRARY_IMPL(rnn_ext, CUDA, m) { register_fn(m); }

// ---- pointwise: one cell step from the two GEMM results, and its backward ----
Tensor rnn_pointwise_forward(const Tensor& xg, const Tensor& hg, const OptTensor& b_ih,
                        const OptTensor& b_hh, std::string_view nonlinearity);
Tensor rnn_pointwise_backward(const Tensor& grad_hy, const Tensor& hy,
                              std::string_view nonlinearity);

std::tuple<Tensor, Tensor, Tensor> lstm_pointwise_forward(const Tensor& xg, const Tensor& hg,
                                                     const OptTensor& b_ih, const OptTensor& b_hh,
                                                     const Tensor& cx);
std::tuple<Tensor, Tensor> lstm_pointwise_backward(const Tensor& grad_hy, const Tensor& grad_cy,
                                              const Tensor& workspace);

std::tuple<Tensor, Tensor> gru_pointwise_forward(const Tensor& xg, const Tensor& hg,
                                            const OptTensor& b_ih, const OptTensor& b_hh,
                                            const Tensor& hx);
std::tuple<Tensor, Tensor, Tensor> gru_pointwise_backward(const Tensor& grad_hy,
                                                     const Tensor& workspace);

// ---- cells in inference (no backward): one step from input [B, I], hx [B, H] (cx [B, H]) and
// the weights w_ih [G*H, I], w_hh [G*H, H]: both GEMMs and the pointwise step, no workspace ----
Tensor rnn_cell_inference(const Tensor& input, const Tensor& hx, const Tensor& w_ih,
                          const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                          std::string_view nonlinearity);
std::tuple<Tensor, Tensor> lstm_cell_inference(const Tensor& input, const Tensor& hx,
                                               const Tensor& cx, const Tensor& w_ih,
                                               const Tensor& w_hh, const OptTensor& b_ih,
                                               const OptTensor& b_hh);
Tensor gru_cell_inference(const Tensor& input, const Tensor& hx, const Tensor& w_ih,
                          const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh);

// ---- recurrence: one direction of one layer over a whole (packed) sequence, from the input
// side's gate pre-activations xg [N, G*H], and its backward ----
std::tuple<Tensor, Tensor> rnn_recurrence(const Tensor& xg, const Tensor& w_hh,
                                             const OptTensor& b_hh, const Tensor& h0,
                                             const Tensor& batch_sizes, bool reverse,
                                             std::string_view nonlinearity);
std::tuple<Tensor, Tensor, Tensor, Tensor> rnn_recurrence_backward(
    const Tensor& grad_y, const Tensor& grad_h_n, const Tensor& w_hh, const Tensor& h0,
    const Tensor& y, const Tensor& batch_sizes, bool reverse, std::string_view nonlinearity);

std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_recurrence(
    const Tensor& xg, const Tensor& w_hh, const OptTensor& b_hh, const OptTensor& w_hr,
    const Tensor& h0, const Tensor& c0, const Tensor& batch_sizes, bool reverse,
    bool save_workspace);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_recurrence_backward(
    const Tensor& grad_y, const Tensor& grad_h_n, const Tensor& grad_c_n, const Tensor& w_hh,
    const OptTensor& w_hr, const Tensor& h0, const Tensor& y, const Tensor& workspace,
    const Tensor& batch_sizes, bool reverse);

std::tuple<Tensor, Tensor, Tensor> gru_recurrence(const Tensor& xg, const Tensor& w_hh,
                                                     const OptTensor& b_hh, const Tensor& h0,
                                                     const Tensor& batch_sizes, bool reverse,
                                                     bool save_workspace);
std::tuple<Tensor, Tensor, Tensor, Tensor> gru_recurrence_backward(
    const Tensor& grad_y, const Tensor& grad_h_n, const Tensor& w_hh, const Tensor& h0,
    const Tensor& y, const Tensor& workspace, const Tensor& batch_sizes, bool reverse);

// ---- layers in inference (no backward): as the recurrence ops, from the layer's input x [N, I]
// and w_ih [G*H, I] (b_ih [G*H]) instead of xg, which they compute a chunk of steps at a time ----
std::tuple<Tensor, Tensor> rnn_layer_inference(const Tensor& x, const Tensor& w_ih,
                                               const OptTensor& b_ih, const Tensor& w_hh,
                                               const OptTensor& b_hh, const Tensor& h0,
                                               const Tensor& batch_sizes, bool reverse,
                                               std::string_view nonlinearity);
std::tuple<Tensor, Tensor, Tensor> lstm_layer_inference(
    const Tensor& x, const Tensor& w_ih, const OptTensor& b_ih, const Tensor& w_hh,
    const OptTensor& b_hh, const OptTensor& w_hr, const Tensor& h0, const Tensor& c0,
    const Tensor& batch_sizes, bool reverse);
std::tuple<Tensor, Tensor> gru_layer_inference(const Tensor& x, const Tensor& w_ih,
                                               const OptTensor& b_ih, const Tensor& w_hh,
                                               const OptTensor& b_hh, const Tensor& h0,
                                               const Tensor& batch_sizes, bool reverse);

}  // namespace rnn_ext
