// The operators of torch.ops.rnn_ext. Schemas, with every argument's shape, are in
// registration.cpp; the cell ops live in cell_ops.cpp, the layer (recurrence) ops in
// recurrence.cpp. B batch rows, H hidden units, G gates per unit (RNN 1, LSTM 4, GRU 3).
#pragma once

#include <optional>
#include <string_view>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace rnn_ext {

using at::Tensor;
using OptTensor = std::optional<at::Tensor>;

// ---- cells: one step from the two GEMM results ----
Tensor rnn_cell_forward(const Tensor& xg, const Tensor& hg, const OptTensor& b_ih,
                        const OptTensor& b_hh, std::string_view nonlinearity);
Tensor rnn_cell_backward(const Tensor& grad_hy, const Tensor& hy, std::string_view nonlinearity);

std::tuple<Tensor, Tensor, Tensor> lstm_cell_forward(const Tensor& xg, const Tensor& hg,
                                                     const OptTensor& b_ih, const OptTensor& b_hh,
                                                     const Tensor& cx);
std::tuple<Tensor, Tensor> lstm_cell_backward(const Tensor& grad_hy, const Tensor& grad_cy,
                                              const Tensor& workspace);

std::tuple<Tensor, Tensor> gru_cell_forward(const Tensor& xg, const Tensor& hg,
                                            const OptTensor& b_ih, const OptTensor& b_hh,
                                            const Tensor& hx);
std::tuple<Tensor, Tensor, Tensor> gru_cell_backward(const Tensor& grad_hy,
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

// ---- layers: the recurrence over a whole (packed) sequence in one direction ----
std::tuple<Tensor, Tensor> rnn_layer_forward(const Tensor& xg, const Tensor& w_hh,
                                             const OptTensor& b_hh, const Tensor& h0,
                                             const Tensor& batch_sizes, bool reverse,
                                             std::string_view nonlinearity);
std::tuple<Tensor, Tensor, Tensor, Tensor> rnn_layer_backward(
    const Tensor& grad_y, const Tensor& grad_h_n, const Tensor& w_hh, const Tensor& h0,
    const Tensor& y, const Tensor& batch_sizes, bool reverse, std::string_view nonlinearity);

std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_layer_forward(
    const Tensor& xg, const Tensor& w_hh, const OptTensor& b_hh, const OptTensor& w_hr,
    const Tensor& h0, const Tensor& c0, const Tensor& batch_sizes, bool reverse,
    bool save_workspace);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer_backward(
    const Tensor& grad_y, const Tensor& grad_h_n, const Tensor& grad_c_n, const Tensor& w_hh,
    const OptTensor& w_hr, const Tensor& h0, const Tensor& y, const Tensor& workspace,
    const Tensor& batch_sizes, bool reverse);

std::tuple<Tensor, Tensor, Tensor> gru_layer_forward(const Tensor& xg, const Tensor& w_hh,
                                                     const OptTensor& b_hh, const Tensor& h0,
                                                     const Tensor& batch_sizes, bool reverse,
                                                     bool save_workspace);
std::tuple<Tensor, Tensor, Tensor, Tensor> gru_layer_backward(
    const Tensor& grad_y, const Tensor& grad_h_n, const Tensor& w_hh, const Tensor& h0,
    const Tensor& y, const Tensor& workspace, const Tensor& batch_sizes, bool reverse);

// ---- layers in inference (no backward): as the forward ops, from the layer's input x [N, I]
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
