// Autograd of the differentiable ops, in C++ so that a training step pays no Python call: a
// forward op's node saves what its backward op reads, and backward runs that fused backward op.
// The whole-cell ops (rnn_cell, lstm_cell, gru_cell) are CompositeImplicitAutograd: one node
// per step around both GEMMs and the pointwise ops, or the inference op where no gradient is
// wanted.
//
// Under create_graph (double backward) the gradient must itself be differentiable. backward then
// calls rnn_ext::differentiable_backward, which rnn_ext/_ops.py implements by differentiating the
// reference formulas, so the math has one copy. Ops are called through the dispatcher, never
// directly, so that fake tensors (torch.compile) and the CUDA key reach their own kernels.
// Shapes and saved values as in registration.cpp.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "checks.h"
#include "ops.h"

namespace rnn_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::Function;
using torch::autograd::variable_list;

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// The dispatcher's handle of op rnn_ext::<name>, whose C++ signature is that of its
// implementation Fn (rnn_ext::<name> too).
template <auto Fn>
const auto& op(const char* name) {
  static const auto handle =
      find_op<std::remove_pointer_t<decltype(Fn)>>((std::string("rnn_ext::") + name).c_str());
  return handle;
}

Tensor or_none(const OptTensor& tensor) { return tensor.value_or(Tensor()); }

// An RNN node's nonlinearity ("tanh" or "relu"), which its backward op and step name need.
void save_nonlinearity(AutogradContext* ctx, std::string_view nonlinearity) {
  ctx->saved_data["nonlinearity"] = std::string(nonlinearity);
}

std::string saved_nonlinearity(AutogradContext* ctx) {
  return ctx->saved_data["nonlinearity"].toStringRef();
}

// The RNN cell's pointwise step (below autograd), its nonlinearity saved for the backward.
Tensor rnn_pointwise_forward(AutogradContext* ctx, const Tensor& xg, const Tensor& hg,
                             const OptTensor& b_ih, const OptTensor& b_hh,
                             std::string_view nonlinearity) {
  save_nonlinearity(ctx, nonlinearity);
  return op<&rnn_cell_forward>("rnn_cell_forward").call(xg, hg, b_ih, b_hh, nonlinearity);
}

// The gradient of the RNN cell's gate pre-activations from that of its output hy.
Tensor rnn_pointwise_backward(AutogradContext* ctx, const Tensor& grad_hy, const Tensor& hy) {
  return op<&rnn_cell_backward>("rnn_cell_backward").call(grad_hy, hy, saved_nonlinearity(ctx));
}

// An output's gradient; zeros (of the output's shape `like`) where the loss did not use it
// (materialised gradients are off: the workspace's would be as large as the gates).
Tensor or_zeros(const Tensor& grad, const Tensor& like) {
  return grad.defined() ? grad : at::zeros_like(like);
}

// The gradients of b_ih and b_hh where both are added to the same gate pre-activations,
// whose gradient is `grad_gates`: one sum, shared.
std::pair<Tensor, Tensor> bias_grads(const Tensor& grad_gates, const Tensor& b_ih,
                                     const Tensor& b_hh) {
  if (!b_ih.defined() && !b_hh.defined()) return {};
  const Tensor sum = grad_gates.sum(0);
  return {b_ih.defined() ? sum : Tensor(), b_hh.defined() ? sum : Tensor()};
}

Tensor bias_grad(const Tensor& grad_gates, const Tensor& bias) {
  return bias.defined() ? grad_gates.sum(0) : Tensor();
}

// The gradients, as a graph, of op `step` ("lstm_cell_forward", "rnn_tanh_layer_forward", ...:
// see differentiable_backward) w.r.t. its tensor inputs `inputs` (schema order; undefined where
// absent), followed by `trailing` undefined ones for its other arguments.
variable_list graph_gradients(const std::string& step, const variable_list& inputs,
                              const variable_list& grads, size_t trailing,
                              const Tensor& batch_sizes = {}, bool reverse = false) {
  static const auto differentiable_backward =
      find_op<std::vector<Tensor>(std::string_view, const c10::List<std::optional<Tensor>>&,
                                  at::TensorList, const OptTensor&, bool)>(
          "rnn_ext::differentiable_backward");
  c10::List<std::optional<Tensor>> present;
  for (const Tensor& input : inputs) {
    present.push_back(input.defined() ? OptTensor(input) : std::nullopt);
  }
  const std::vector<Tensor> found = differentiable_backward.call(
      step, present, grads, batch_sizes.defined() ? OptTensor(batch_sizes) : std::nullopt,
      reverse);
  variable_list result;
  for (size_t i = 0; i < inputs.size(); ++i) {
    result.push_back(inputs[i].defined() ? found[i] : Tensor());
  }
  result.resize(inputs.size() + trailing);
  return result;
}

// ---------------------------------------------------------------- cells
// Saved: the forward's tensor inputs, then its workspace (the RNN's: hy).

struct RnnCellForward : Function<RnnCellForward> {
  static Tensor forward(AutogradContext* ctx, const Tensor& xg, const Tensor& hg,
                        const OptTensor& b_ih, const OptTensor& b_hh,
                        std::string_view nonlinearity) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Tensor hy = rnn_pointwise_forward(ctx, xg, hg, b_ih, b_hh, nonlinearity);
    ctx->save_for_backward({xg, hg, or_none(b_ih), or_none(b_hh), hy});
    return hy;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    if (at::GradMode::is_enabled()) {
      return graph_gradients("rnn_" + saved_nonlinearity(ctx) + "_cell_forward",
                             {saved.begin(), saved.begin() + 4}, grads, 1);
    }
    const Tensor grad = rnn_pointwise_backward(ctx, grads[0], saved[4]);
    auto [grad_b_ih, grad_b_hh] = bias_grads(grad, saved[2], saved[3]);
    return {grad, grad, grad_b_ih, grad_b_hh, Tensor()};
  }
};

struct LstmCellForward : Function<LstmCellForward> {
  static variable_list forward(AutogradContext* ctx, const Tensor& xg, const Tensor& hg,
                               const OptTensor& b_ih, const OptTensor& b_hh, const Tensor& cx) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [hy, cy, workspace] =
        op<&lstm_cell_forward>("lstm_cell_forward").call(xg, hg, b_ih, b_hh, cx);
    ctx->save_for_backward({xg, hg, or_none(b_ih), or_none(b_hh), cx, workspace});
    ctx->mark_non_differentiable({workspace});
    ctx->set_materialize_grads(false);
    return {hy, cy, workspace};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor grad_hy = or_zeros(grads[0], saved[4]), grad_cy = or_zeros(grads[1], saved[4]);
    if (at::GradMode::is_enabled()) {
      return graph_gradients("lstm_cell_forward", {saved.begin(), saved.begin() + 5},
                             {grad_hy, grad_cy}, 0);
    }
    auto [grad_gates, grad_cx] =
        op<&lstm_cell_backward>("lstm_cell_backward").call(grad_hy, grad_cy, saved[5]);
    auto [grad_b_ih, grad_b_hh] = bias_grads(grad_gates, saved[2], saved[3]);
    return {grad_gates, grad_gates, grad_b_ih, grad_b_hh, grad_cx};
  }
};

struct GruCellForward : Function<GruCellForward> {
  static variable_list forward(AutogradContext* ctx, const Tensor& xg, const Tensor& hg,
                               const OptTensor& b_ih, const OptTensor& b_hh, const Tensor& hx) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [hy, workspace] = op<&gru_cell_forward>("gru_cell_forward").call(xg, hg, b_ih, b_hh, hx);
    ctx->save_for_backward({xg, hg, or_none(b_ih), or_none(b_hh), hx, workspace});
    ctx->mark_non_differentiable({workspace});
    ctx->set_materialize_grads(false);
    return {hy, workspace};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor grad_hy = or_zeros(grads[0], saved[4]);
    if (at::GradMode::is_enabled()) {
      return graph_gradients("gru_cell_forward", {saved.begin(), saved.begin() + 5}, {grad_hy}, 0);
    }
    auto [grad_xg, grad_hg, grad_hx] =
        op<&gru_cell_backward>("gru_cell_backward").call(grad_hy, saved[5]);
    return {grad_xg, grad_hg, bias_grad(grad_xg, saved[2]), bias_grad(grad_hg, saved[3]),
            grad_hx};
  }
};

// ---------------------------------------------------------------- whole cells
// One node for a whole step: xg = input @ w_ihᵀ and hg = hx @ w_hhᵀ, then the pointwise forward
// op; backward runs the pointwise backward op, then the gradients of the GEMMs. Saved: the
// op's tensor inputs (schema order), then the pointwise op's workspace (the RNN's: hy).

// The gate pre-activations' GEMMs: xg = input @ w_ihᵀ [B, G*H] and hg = hx @ w_hhᵀ [B, G*H].
std::pair<Tensor, Tensor> projections(const Tensor& input, const Tensor& hx, const Tensor& w_ih,
                                      const Tensor& w_hh) {
  return {at::mm(input, w_ih.t()), at::mm(hx, w_hh.t())};
}

// Which of the tensor arguments `inputs` (in order, undefined where absent) need a gradient.
// The context counts its edges over the tensors present only.
std::vector<bool> needing_grad(AutogradContext* ctx, const variable_list& inputs) {
  std::vector<bool> needed;
  size_t edge = 0;
  for (const Tensor& input : inputs) {
    needed.push_back(input.defined() && ctx->needs_input_grad(edge++));
  }
  return needed;
}

struct ProjectionGrads {
  Tensor input, hx, w_ih, w_hh, b_ih, b_hh;
};

// The gradients of input, hx, w_ih, w_hh, b_ih and b_hh from those of xg and hg, where
// `needed` (in that order). `grad_hx_direct`, where defined, is the part of hx's gradient that
// does not pass through hg (the GRU's z * dh').
ProjectionGrads projection_grads(const std::array<bool, 6>& needed, const Tensor& grad_xg,
                                 const Tensor& grad_hg, const Tensor& input, const Tensor& hx,
                                 const Tensor& w_ih, const Tensor& w_hh,
                                 const Tensor& grad_hx_direct = {}) {
  ProjectionGrads g;
  if (needed[0]) g.input = at::mm(grad_xg, w_ih);
  if (needed[1]) {
    g.hx = grad_hx_direct.defined() ? at::addmm(grad_hx_direct, grad_hg, w_hh)
                                    : at::mm(grad_hg, w_hh);
  }
  if (needed[2]) g.w_ih = at::mm(grad_xg.t(), input);
  if (needed[3]) g.w_hh = at::mm(grad_hg.t(), hx);
  const bool shared = grad_xg.is_same(grad_hg);  // b_ih and b_hh add to the same gates
  if (needed[4]) g.b_ih = grad_xg.sum(0);
  if (needed[5]) g.b_hh = shared && g.b_ih.defined() ? g.b_ih : grad_hg.sum(0);
  return g;
}

struct RnnCell : Function<RnnCell> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const Tensor& hx,
                        const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                        const OptTensor& b_hh, std::string_view nonlinearity) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const auto [xg, hg] = projections(input, hx, w_ih, w_hh);
    Tensor hy = rnn_pointwise_forward(ctx, xg, hg, b_ih, b_hh, nonlinearity);
    ctx->save_for_backward({input, hx, w_ih, w_hh, or_none(b_ih), or_none(b_hh), hy});
    return hy;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    if (at::GradMode::is_enabled()) {
      return graph_gradients("rnn_" + saved_nonlinearity(ctx) + "_cell",
                             {saved.begin(), saved.begin() + 6}, grads, 1);
    }
    const Tensor grad = rnn_pointwise_backward(ctx, grads[0], saved[6]);
    const auto n = needing_grad(ctx, {saved.begin(), saved.begin() + 6});
    const auto g = projection_grads({n[0], n[1], n[2], n[3], n[4], n[5]}, grad, grad, saved[0],
                                    saved[1], saved[2], saved[3]);
    return {g.input, g.hx, g.w_ih, g.w_hh, g.b_ih, g.b_hh, Tensor()};
  }
};

struct LstmCell : Function<LstmCell> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& hx,
                               const Tensor& cx, const Tensor& w_ih, const Tensor& w_hh,
                               const OptTensor& b_ih, const OptTensor& b_hh) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const auto [xg, hg] = projections(input, hx, w_ih, w_hh);
    auto [hy, cy, workspace] =
        op<&lstm_cell_forward>("lstm_cell_forward").call(xg, hg, b_ih, b_hh, cx);
    ctx->save_for_backward({input, hx, cx, w_ih, w_hh, or_none(b_ih), or_none(b_hh), workspace});
    ctx->set_materialize_grads(false);
    return {hy, cy};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor grad_hy = or_zeros(grads[0], saved[2]), grad_cy = or_zeros(grads[1], saved[2]);
    if (at::GradMode::is_enabled()) {
      return graph_gradients("lstm_cell", {saved.begin(), saved.begin() + 7}, {grad_hy, grad_cy},
                             0);
    }
    auto [grad_gates, grad_cx] =
        op<&lstm_cell_backward>("lstm_cell_backward").call(grad_hy, grad_cy, saved[7]);
    const auto n = needing_grad(ctx, {saved.begin(), saved.begin() + 7});
    const auto g = projection_grads({n[0], n[1], n[3], n[4], n[5], n[6]}, grad_gates, grad_gates,
                                    saved[0], saved[1], saved[3], saved[4]);
    return {g.input, g.hx, grad_cx, g.w_ih, g.w_hh, g.b_ih, g.b_hh};
  }
};

struct GruCell : Function<GruCell> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const Tensor& hx,
                        const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                        const OptTensor& b_hh) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const auto [xg, hg] = projections(input, hx, w_ih, w_hh);
    auto [hy, workspace] = op<&gru_cell_forward>("gru_cell_forward").call(xg, hg, b_ih, b_hh, hx);
    ctx->save_for_backward({input, hx, w_ih, w_hh, or_none(b_ih), or_none(b_hh), workspace});
    return hy;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    if (at::GradMode::is_enabled()) {
      return graph_gradients("gru_cell", {saved.begin(), saved.begin() + 6}, grads, 0);
    }
    auto [grad_xg, grad_hg, grad_hx] =
        op<&gru_cell_backward>("gru_cell_backward").call(grads[0], saved[6]);
    const auto n = needing_grad(ctx, {saved.begin(), saved.begin() + 6});
    const auto g = projection_grads({n[0], n[1], n[2], n[3], n[4], n[5]}, grad_xg, grad_hg,
                                    saved[0], saved[1], saved[2], saved[3], grad_hx);
    return {g.input, g.hx, g.w_ih, g.w_hh, g.b_ih, g.b_hh};
  }
};

// Whether autograd must record a step on these inputs (undefined ones are absent biases).
bool records_graph(std::initializer_list<Tensor> inputs) {
  if (!at::GradMode::is_enabled()) return false;
  for (const Tensor& t : inputs) {
    if (t.defined() && t.requires_grad()) return true;
  }
  return false;
}

// The whole-cell ops (CompositeImplicitAutograd): the node above where a gradient is wanted,
// the inference op otherwise. The grad path checks what its GEMMs would not.
Tensor rnn_cell(const Tensor& input, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh,
                const OptTensor& b_ih, const OptTensor& b_hh, std::string_view nonlinearity) {
  if (!records_graph({input, hx, w_ih, w_hh, or_none(b_ih), or_none(b_hh)})) {
    return op<&rnn_cell_inference>("rnn_cell_inference")
        .call(input, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity);
  }
  check_cell_step("rnn_ext::rnn_cell", 1, input, hx, w_ih, w_hh);
  return RnnCell::apply(input, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity);
}

std::tuple<Tensor, Tensor> lstm_cell(const Tensor& input, const Tensor& hx, const Tensor& cx,
                                     const Tensor& w_ih, const Tensor& w_hh,
                                     const OptTensor& b_ih, const OptTensor& b_hh) {
  if (!records_graph({input, hx, cx, w_ih, w_hh, or_none(b_ih), or_none(b_hh)})) {
    return op<&lstm_cell_inference>("lstm_cell_inference")
        .call(input, hx, cx, w_ih, w_hh, b_ih, b_hh);
  }
  check_cell_step("rnn_ext::lstm_cell", 4, input, hx, w_ih, w_hh);
  const variable_list out = LstmCell::apply(input, hx, cx, w_ih, w_hh, b_ih, b_hh);
  return {out[0], out[1]};
}

Tensor gru_cell(const Tensor& input, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh,
                const OptTensor& b_ih, const OptTensor& b_hh) {
  if (!records_graph({input, hx, w_ih, w_hh, or_none(b_ih), or_none(b_hh)})) {
    return op<&gru_cell_inference>("gru_cell_inference").call(input, hx, w_ih, w_hh, b_ih, b_hh);
  }
  check_cell_step("rnn_ext::gru_cell", 3, input, hx, w_ih, w_hh);
  return GruCell::apply(input, hx, w_ih, w_hh, b_ih, b_hh);
}

// ---------------------------------------------------------------- layers
// Saved: the forward's tensor inputs but batch_sizes, then y and the workspace (none for the
// RNN, whose workspace is y). The layer's bias gradient comes from the backward op; it is
// dropped where the layer has no bias.

Tensor if_present(const Tensor& grad, const Tensor& input) {
  return input.defined() ? grad : Tensor();
}

struct RnnLayerForward : Function<RnnLayerForward> {
  static variable_list forward(AutogradContext* ctx, const Tensor& xg, const Tensor& w_hh,
                               const OptTensor& b_hh, const Tensor& h0, const Tensor& batch_sizes,
                               bool reverse, std::string_view nonlinearity) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, h_n] = op<&rnn_layer_forward>("rnn_layer_forward")
                        .call(xg, w_hh, b_hh, h0, batch_sizes, reverse, nonlinearity);
    ctx->save_for_backward({xg, w_hh, or_none(b_hh), h0, y});
    ctx->saved_data["batch_sizes"] = batch_sizes;
    ctx->saved_data["reverse"] = reverse;
    save_nonlinearity(ctx, nonlinearity);
    ctx->set_materialize_grads(false);
    return {y, h_n};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor batch_sizes = ctx->saved_data["batch_sizes"].toTensor();
    const bool reverse = ctx->saved_data["reverse"].toBool();
    const std::string nonlinearity = saved_nonlinearity(ctx);
    const Tensor grad_y = or_zeros(grads[0], saved[4]), grad_h_n = or_zeros(grads[1], saved[3]);
    if (at::GradMode::is_enabled()) {
      return graph_gradients("rnn_" + nonlinearity + "_layer_forward",
                             {saved.begin(), saved.begin() + 4}, {grad_y, grad_h_n}, 3,
                             batch_sizes, reverse);
    }
    auto [g_xg, g_w_hh, g_b_hh, g_h0] = op<&rnn_layer_backward>("rnn_layer_backward").call(
        grad_y, grad_h_n, saved[1], saved[3], saved[4], batch_sizes, reverse, nonlinearity);
    return {g_xg, g_w_hh, if_present(g_b_hh, saved[2]), g_h0, Tensor(), Tensor(), Tensor()};
  }
};

struct LstmLayerForward : Function<LstmLayerForward> {
  static variable_list forward(AutogradContext* ctx, const Tensor& xg, const Tensor& w_hh,
                               const OptTensor& b_hh, const OptTensor& w_hr, const Tensor& h0,
                               const Tensor& c0, const Tensor& batch_sizes, bool reverse,
                               bool save_workspace) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, h_n, c_n, workspace] =
        op<&lstm_layer_forward>("lstm_layer_forward")
            .call(xg, w_hh, b_hh, w_hr, h0, c0, batch_sizes, reverse, save_workspace);
    ctx->save_for_backward({xg, w_hh, or_none(b_hh), or_none(w_hr), h0, c0, y, workspace});
    ctx->saved_data["batch_sizes"] = batch_sizes;
    ctx->saved_data["reverse"] = reverse;
    ctx->mark_non_differentiable({workspace});
    ctx->set_materialize_grads(false);
    return {y, h_n, c_n, workspace};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor batch_sizes = ctx->saved_data["batch_sizes"].toTensor();
    const bool reverse = ctx->saved_data["reverse"].toBool();
    const Tensor grad_y = or_zeros(grads[0], saved[6]), grad_h_n = or_zeros(grads[1], saved[4]),
                 grad_c_n = or_zeros(grads[2], saved[5]);
    if (at::GradMode::is_enabled()) {
      return graph_gradients("lstm_layer_forward", {saved.begin(), saved.begin() + 6},
                             {grad_y, grad_h_n, grad_c_n}, 3, batch_sizes, reverse);
    }
    auto [g_xg, g_w_hh, g_b_hh, g_h0, g_c0, g_w_hr] =
        op<&lstm_layer_backward>("lstm_layer_backward")
            .call(grad_y, grad_h_n, grad_c_n, saved[1], saved[3], saved[4], saved[6], saved[7],
                  batch_sizes, reverse);
    return {g_xg, g_w_hh, if_present(g_b_hh, saved[2]), if_present(g_w_hr, saved[3]),
            g_h0, g_c0, Tensor(), Tensor(), Tensor()};
  }
};

struct GruLayerForward : Function<GruLayerForward> {
  static variable_list forward(AutogradContext* ctx, const Tensor& xg, const Tensor& w_hh,
                               const OptTensor& b_hh, const Tensor& h0, const Tensor& batch_sizes,
                               bool reverse, bool save_workspace) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, h_n, workspace] = op<&gru_layer_forward>("gru_layer_forward")
                                   .call(xg, w_hh, b_hh, h0, batch_sizes, reverse, save_workspace);
    ctx->save_for_backward({xg, w_hh, or_none(b_hh), h0, y, workspace});
    ctx->saved_data["batch_sizes"] = batch_sizes;
    ctx->saved_data["reverse"] = reverse;
    ctx->mark_non_differentiable({workspace});
    ctx->set_materialize_grads(false);
    return {y, h_n, workspace};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor batch_sizes = ctx->saved_data["batch_sizes"].toTensor();
    const bool reverse = ctx->saved_data["reverse"].toBool();
    const Tensor grad_y = or_zeros(grads[0], saved[4]), grad_h_n = or_zeros(grads[1], saved[3]);
    if (at::GradMode::is_enabled()) {
      return graph_gradients("gru_layer_forward", {saved.begin(), saved.begin() + 4},
                             {grad_y, grad_h_n}, 3, batch_sizes, reverse);
    }
    auto [g_xg, g_w_hh, g_b_hh, g_h0] = op<&gru_layer_backward>("gru_layer_backward").call(
        grad_y, grad_h_n, saved[1], saved[3], saved[4], saved[5], batch_sizes, reverse);
    return {g_xg, g_w_hh, if_present(g_b_hh, saved[2]), g_h0, Tensor(), Tensor(), Tensor()};
  }
};

template <size_t... I>
auto tuple_of(const variable_list& outputs, std::index_sequence<I...>) {
  return std::make_tuple(outputs[I]...);
}

// A Function's outputs as the op's tuple of N tensors.
template <size_t N>
auto as_tuple(const variable_list& outputs) {
  return tuple_of(outputs, std::make_index_sequence<N>{});
}

}  // namespace

TORCH_LIBRARY_IMPL(rnn_ext, CompositeImplicitAutograd, m) {
  m.impl("rnn_cell", &rnn_cell);
  m.impl("lstm_cell", &lstm_cell);
  m.impl("gru_cell", &gru_cell);
}

TORCH_LIBRARY_IMPL(rnn_ext, Autograd, m) {
  // The inference ops have no backward: on inputs that require grad their outputs get a node
  // that raises when reached ("derivative ... is not implemented").
  for (const char* name : {"rnn_cell_inference", "lstm_cell_inference", "gru_cell_inference",
                           "rnn_layer_inference", "lstm_layer_inference", "gru_layer_inference"}) {
    m.impl(name, torch::autograd::autogradNotImplementedFallback());
  }
  m.impl("rnn_cell_forward", [](const Tensor& xg, const Tensor& hg, const OptTensor& b_ih,
                                const OptTensor& b_hh, std::string_view nonlinearity) {
    return RnnCellForward::apply(xg, hg, b_ih, b_hh, nonlinearity);
  });
  m.impl("lstm_cell_forward", [](const Tensor& xg, const Tensor& hg, const OptTensor& b_ih,
                                 const OptTensor& b_hh, const Tensor& cx) {
    return as_tuple<3>(LstmCellForward::apply(xg, hg, b_ih, b_hh, cx));
  });
  m.impl("gru_cell_forward", [](const Tensor& xg, const Tensor& hg, const OptTensor& b_ih,
                                const OptTensor& b_hh, const Tensor& hx) {
    return as_tuple<2>(GruCellForward::apply(xg, hg, b_ih, b_hh, hx));
  });
  m.impl("rnn_layer_forward", [](const Tensor& xg, const Tensor& w_hh, const OptTensor& b_hh,
                                 const Tensor& h0, const Tensor& batch_sizes, bool reverse,
                                 std::string_view nonlinearity) {
    return as_tuple<2>(
        RnnLayerForward::apply(xg, w_hh, b_hh, h0, batch_sizes, reverse, nonlinearity));
  });
  m.impl("lstm_layer_forward", [](const Tensor& xg, const Tensor& w_hh, const OptTensor& b_hh,
                                  const OptTensor& w_hr, const Tensor& h0, const Tensor& c0,
                                  const Tensor& batch_sizes, bool reverse, bool save_workspace) {
    return as_tuple<4>(LstmLayerForward::apply(xg, w_hh, b_hh, w_hr, h0, c0, batch_sizes,
                                               reverse, save_workspace));
  });
  m.impl("gru_layer_forward", [](const Tensor& xg, const Tensor& w_hh, const OptTensor& b_hh,
                                 const Tensor& h0, const Tensor& batch_sizes, bool reverse,
                                 bool save_workspace) {
    return as_tuple<3>(
        GruLayerForward::apply(xg, w_hh, b_hh, h0, batch_sizes, reverse, save_workspace));
  });
}

}  // namespace rnn_ext
