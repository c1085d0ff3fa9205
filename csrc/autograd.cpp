// Autograd of the differentiable ops, in C++ so that a training step pays no Python call, and
// the composite ops that choose between them and the inference ops.
//
// Nodes: one per whole cell step (RnnCell, LstmCell, GruCell: both GEMMs and the pointwise
// forward op; backward runs the pointwise backward op and the GEMMs' gradients) and one per
// recurrence op (RnnRecurrence, ...: backward runs the *_recurrence_backward op). The pointwise
// and inference ops have no node of their own: nothing differentiates through them directly.
//
// One rule decides, in one place (records_graph): the composite ops *_cell and *_layer
// (CompositeImplicitAutograd) run a node where autograd must record a graph, the inference op
// otherwise.
//
// Under create_graph (double backward) the gradient must itself be differentiable. backward then
// calls rnn_ext::differentiable_backward, which rnn_ext/_ops.py implements by differentiating the
// reference formulas, so the math has one copy. Ops are called through the dispatcher, never
// directly, so that fake tensors (torch.compile) and the CUDA key reach their own kernels.
// Shapes and saved values as in registration.cpp.
#include <tuple>

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/add.h>
#include <ATen/ops/linear.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "checks.h"
#include "kernels.h"
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

// ---- what a node keeps for its backward, by name

// A node's saved tensors: a struct that lists its fields once, in fields() (std::tie); save()
// and load() keep them in that order. Undefined fields are absent optional inputs.
template <typename Saved>
void save(AutogradContext* ctx, Saved saved) {
  std::apply([&](auto&... t) { ctx->save_for_backward({t...}); }, saved.fields());
}

template <typename Saved>
Saved load(AutogradContext* ctx) {
  Saved saved;
  const variable_list tensors = ctx->get_saved_variables();
  size_t i = 0;
  std::apply([&](auto&... t) { ((t = tensors[i++]), ...); }, saved.fields());
  return saved;
}

// The cell kind of a node (the RNN's nonlinearity is an argument of its ops).
void save_kind(AutogradContext* ctx, CellKind kind) {
  ctx->saved_data["kind"] = static_cast<int64_t>(kind);
}

CellKind saved_kind(AutogradContext* ctx) {
  return static_cast<CellKind>(ctx->saved_data["kind"].toInt());
}

// The sequence a recurrence node ran over: its batch_sizes and direction.
struct Sequence {
  Tensor batch_sizes;
  bool reverse = false;

  void save(AutogradContext* ctx) const {
    ctx->saved_data["batch_sizes"] = batch_sizes;
    ctx->saved_data["reverse"] = reverse;
  }
  static Sequence load(AutogradContext* ctx) {
    return {ctx->saved_data["batch_sizes"].toTensor(), ctx->saved_data["reverse"].toBool()};
  }
};

// An output's gradient; zeros (of the output's shape `like`) where the loss did not use it
// (materialised gradients are off: the workspace's would be as large as the gates).
Tensor or_zeros(const Tensor& grad, const Tensor& like) {
  return grad.defined() ? grad : at::zeros_like(like);
}

// The gradients, as a graph, of the op ("cell" or "recurrence") of cell `kind` (see
// differentiable_backward) w.r.t. its tensor inputs `inputs` (schema order; undefined where
// absent), followed by `trailing` undefined ones for its other arguments.
variable_list graph_gradients(const char* op, CellKind kind, const variable_list& inputs,
                              const variable_list& grads, size_t trailing,
                              const Sequence& sequence = {}) {
  static const auto differentiable_backward =
      find_op<std::vector<Tensor>(std::string_view, std::string_view,
                                  const c10::List<std::optional<Tensor>>&, at::TensorList,
                                  const OptTensor&, bool)>("rnn_ext::differentiable_backward");
  const Tensor& batch_sizes = sequence.batch_sizes;
  c10::List<std::optional<Tensor>> present;
  for (const Tensor& input : inputs) {
    present.push_back(input.defined() ? OptTensor(input) : std::nullopt);
  }
  const std::vector<Tensor> found = differentiable_backward.call(
      op, mode_name(kind), present, grads,
      batch_sizes.defined() ? OptTensor(batch_sizes) : std::nullopt, sequence.reverse);
  variable_list result;
  for (size_t i = 0; i < inputs.size(); ++i) {
    result.push_back(inputs[i].defined() ? found[i] : Tensor());
  }
  result.resize(inputs.size() + trailing);
  return result;
}


// ---------------------------------------------------------------- cells
// One node for a whole step: xg = input @ w_ihᵀ and hg = hx @ w_hhᵀ, then the pointwise forward
// op; backward runs the pointwise backward op, then the gradients of the GEMMs.

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

// The inputs and the weights of a cell's two GEMMs, and whether each needs a gradient.
struct Projection {
  Tensor input, hx, w_ih, w_hh, b_ih, b_hh;
  bool wants_input, wants_hx, wants_w_ih, wants_w_hh, wants_b_ih, wants_b_hh;
};

struct ProjectionGrads {
  Tensor input, hx, w_ih, w_hh, b_ih, b_hh;
};

// The gradients of the projection's tensors from those of xg and hg, where wanted.
// `grad_hx_direct`, where defined, is the part of hx's gradient that does not pass through hg
// (the GRU's z * dh').
ProjectionGrads projection_grads(const Projection& p, const Tensor& grad_xg,
                                 const Tensor& grad_hg, const Tensor& grad_hx_direct = {}) {
  ProjectionGrads g;
  if (p.wants_input) g.input = at::mm(grad_xg, p.w_ih);
  if (p.wants_hx) {
    g.hx = grad_hx_direct.defined() ? at::addmm(grad_hx_direct, grad_hg, p.w_hh)
                                    : at::mm(grad_hg, p.w_hh);
  }
  if (p.wants_w_ih) g.w_ih = at::mm(grad_xg.t(), p.input);
  if (p.wants_w_hh) g.w_hh = at::mm(grad_hg.t(), p.hx);
  const bool shared = grad_xg.is_same(grad_hg);  // b_ih and b_hh add to the same gates
  if (p.wants_b_ih) g.b_ih = grad_xg.sum(0);
  if (p.wants_b_hh) g.b_hh = shared && g.b_ih.defined() ? g.b_ih : grad_hg.sum(0);
  return g;
}

// Saved: the op's tensor inputs (schema order), then the pointwise op's workspace (the RNN's:
// hy). The RNN and GRU cells save the same.
struct SavedCell {
  Tensor input, hx, w_ih, w_hh, b_ih, b_hh;
  Tensor workspace;
  auto fields() { return std::tie(input, hx, w_ih, w_hh, b_ih, b_hh, workspace); }
  variable_list inputs() const { return {input, hx, w_ih, w_hh, b_ih, b_hh}; }
  Projection projection(AutogradContext* ctx) const {
    const std::vector<bool> n = needing_grad(ctx, inputs());
    return {input, hx, w_ih, w_hh, b_ih, b_hh, n[0], n[1], n[2], n[3], n[4], n[5]};
  }
};

struct SavedLstmCell {
  Tensor input, hx, cx, w_ih, w_hh, b_ih, b_hh;
  Tensor workspace;
  auto fields() { return std::tie(input, hx, cx, w_ih, w_hh, b_ih, b_hh, workspace); }
  variable_list inputs() const { return {input, hx, cx, w_ih, w_hh, b_ih, b_hh}; }
  Projection projection(AutogradContext* ctx) const {
    const std::vector<bool> n = needing_grad(ctx, inputs());
    return {input, hx, w_ih, w_hh, b_ih, b_hh, n[0], n[1], n[3], n[4], n[5], n[6]};
  }
};

struct RnnCell : Function<RnnCell> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const Tensor& hx,
                        const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                        const OptTensor& b_hh, std::string_view nonlinearity) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    save_kind(ctx, rnn_cell_kind("rnn_ext::rnn_cell", nonlinearity));
    const auto [xg, hg] = projections(input, hx, w_ih, w_hh);
    Tensor hy = op<&rnn_pointwise_forward>("rnn_pointwise_forward")
                    .call(xg, hg, b_ih, b_hh, nonlinearity);
    save(ctx, SavedCell{input, hx, w_ih, w_hh, or_none(b_ih), or_none(b_hh), hy});
    return hy;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = load<SavedCell>(ctx);
    const CellKind kind = saved_kind(ctx);
    if (at::GradMode::is_enabled()) return graph_gradients("cell", kind, s.inputs(), grads, 1);
    const Tensor grad = op<&rnn_pointwise_backward>("rnn_pointwise_backward")
                            .call(grads[0], s.workspace, nonlinearity_name(kind));
    const auto g = projection_grads(s.projection(ctx), grad, grad);
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
        op<&lstm_pointwise_forward>("lstm_pointwise_forward").call(xg, hg, b_ih, b_hh, cx);
    save(ctx, SavedLstmCell{input, hx, cx, w_ih, w_hh, or_none(b_ih), or_none(b_hh), workspace});
    ctx->set_materialize_grads(false);
    return {hy, cy};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = load<SavedLstmCell>(ctx);
    const Tensor grad_hy = or_zeros(grads[0], s.cx), grad_cy = or_zeros(grads[1], s.cx);
    if (at::GradMode::is_enabled()) {
      return graph_gradients("cell", CellKind::kLstm, s.inputs(), {grad_hy, grad_cy}, 0);
    }
    auto [grad_gates, grad_cx] = op<&lstm_pointwise_backward>("lstm_pointwise_backward")
                                     .call(grad_hy, grad_cy, s.workspace);
    const auto g = projection_grads(s.projection(ctx), grad_gates, grad_gates);
    return {g.input, g.hx, grad_cx, g.w_ih, g.w_hh, g.b_ih, g.b_hh};
  }
};

struct GruCell : Function<GruCell> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const Tensor& hx,
                        const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                        const OptTensor& b_hh) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const auto [xg, hg] = projections(input, hx, w_ih, w_hh);
    auto [hy, workspace] =
        op<&gru_pointwise_forward>("gru_pointwise_forward").call(xg, hg, b_ih, b_hh, hx);
    save(ctx, SavedCell{input, hx, w_ih, w_hh, or_none(b_ih), or_none(b_hh), workspace});
    return hy;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = load<SavedCell>(ctx);
    if (at::GradMode::is_enabled()) {
      return graph_gradients("cell", CellKind::kGru, s.inputs(), grads, 0);
    }
    auto [grad_xg, grad_hg, grad_hx] =
        op<&gru_pointwise_backward>("gru_pointwise_backward").call(grads[0], s.workspace);
    const auto g = projection_grads(s.projection(ctx), grad_xg, grad_hg, grad_hx);
    return {g.input, g.hx, g.w_ih, g.w_hh, g.b_ih, g.b_hh};
  }
};

// ---------------------------------------------------------------- recurrences
// Saved: the op's tensor inputs but batch_sizes (schema order), then y and the workspace (none
// for the RNN, whose workspace is y); batch_sizes and reverse as a Sequence. The bias gradient
// comes from the backward op; it is dropped where the layer has no bias.

Tensor if_present(const Tensor& grad, const Tensor& input) {
  return input.defined() ? grad : Tensor();
}

struct SavedRecurrence {  // RNN and GRU
  Tensor xg, w_hh, b_hh, h0;
  Tensor y, workspace;
  auto fields() { return std::tie(xg, w_hh, b_hh, h0, y, workspace); }
  variable_list inputs() const { return {xg, w_hh, b_hh, h0}; }
};

struct SavedLstmRecurrence {
  Tensor xg, w_hh, b_hh, w_hr, h0, c0;
  Tensor y, workspace;
  auto fields() { return std::tie(xg, w_hh, b_hh, w_hr, h0, c0, y, workspace); }
  variable_list inputs() const { return {xg, w_hh, b_hh, w_hr, h0, c0}; }
};

struct RnnRecurrence : Function<RnnRecurrence> {
  static variable_list forward(AutogradContext* ctx, const Tensor& xg, const Tensor& w_hh,
                               const OptTensor& b_hh, const Tensor& h0, const Tensor& batch_sizes,
                               bool reverse, std::string_view nonlinearity) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, h_n] = op<&rnn_recurrence>("rnn_recurrence")
                        .call(xg, w_hh, b_hh, h0, batch_sizes, reverse, nonlinearity);
    save(ctx, SavedRecurrence{xg, w_hh, or_none(b_hh), h0, y, Tensor()});
    Sequence{batch_sizes, reverse}.save(ctx);
    save_kind(ctx, rnn_cell_kind("rnn_ext::rnn_recurrence", nonlinearity));
    ctx->set_materialize_grads(false);
    return {y, h_n};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = load<SavedRecurrence>(ctx);
    const Sequence sequence = Sequence::load(ctx);
    const CellKind kind = saved_kind(ctx);
    const Tensor grad_y = or_zeros(grads[0], s.y), grad_h_n = or_zeros(grads[1], s.h0);
    if (at::GradMode::is_enabled()) {
      return graph_gradients("recurrence", kind, s.inputs(), {grad_y, grad_h_n}, 3, sequence);
    }
    auto [g_xg, g_w_hh, g_b_hh, g_h0] =
        op<&rnn_recurrence_backward>("rnn_recurrence_backward")
            .call(grad_y, grad_h_n, s.w_hh, s.h0, s.y, sequence.batch_sizes, sequence.reverse,
                  nonlinearity_name(kind));
    return {g_xg, g_w_hh, if_present(g_b_hh, s.b_hh), g_h0, Tensor(), Tensor(), Tensor()};
  }
};

struct LstmRecurrence : Function<LstmRecurrence> {
  static variable_list forward(AutogradContext* ctx, const Tensor& xg, const Tensor& w_hh,
                               const OptTensor& b_hh, const OptTensor& w_hr, const Tensor& h0,
                               const Tensor& c0, const Tensor& batch_sizes, bool reverse,
                               bool save_workspace) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, h_n, c_n, workspace] =
        op<&lstm_recurrence>("lstm_recurrence")
            .call(xg, w_hh, b_hh, w_hr, h0, c0, batch_sizes, reverse, save_workspace);
    save(ctx,
         SavedLstmRecurrence{xg, w_hh, or_none(b_hh), or_none(w_hr), h0, c0, y, workspace});
    Sequence{batch_sizes, reverse}.save(ctx);
    ctx->mark_non_differentiable({workspace});
    ctx->set_materialize_grads(false);
    return {y, h_n, c_n, workspace};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = load<SavedLstmRecurrence>(ctx);
    const Sequence sequence = Sequence::load(ctx);
    const Tensor grad_y = or_zeros(grads[0], s.y), grad_h_n = or_zeros(grads[1], s.h0),
                 grad_c_n = or_zeros(grads[2], s.c0);
    if (at::GradMode::is_enabled()) {
      return graph_gradients("recurrence", CellKind::kLstm, s.inputs(),
                             {grad_y, grad_h_n, grad_c_n}, 3, sequence);
    }
    auto [g_xg, g_w_hh, g_b_hh, g_h0, g_c0, g_w_hr] =
        op<&lstm_recurrence_backward>("lstm_recurrence_backward")
            .call(grad_y, grad_h_n, grad_c_n, s.w_hh, s.w_hr, s.h0, s.y, s.workspace,
                  sequence.batch_sizes, sequence.reverse);
    return {g_xg, g_w_hh, if_present(g_b_hh, s.b_hh), if_present(g_w_hr, s.w_hr),
            g_h0, g_c0, Tensor(), Tensor(), Tensor()};
  }
};

struct GruRecurrence : Function<GruRecurrence> {
  static variable_list forward(AutogradContext* ctx, const Tensor& xg, const Tensor& w_hh,
                               const OptTensor& b_hh, const Tensor& h0, const Tensor& batch_sizes,
                               bool reverse, bool save_workspace) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, h_n, workspace] = op<&gru_recurrence>("gru_recurrence")
                                   .call(xg, w_hh, b_hh, h0, batch_sizes, reverse, save_workspace);
    save(ctx, SavedRecurrence{xg, w_hh, or_none(b_hh), h0, y, workspace});
    Sequence{batch_sizes, reverse}.save(ctx);
    ctx->mark_non_differentiable({workspace});
    ctx->set_materialize_grads(false);
    return {y, h_n, workspace};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = load<SavedRecurrence>(ctx);
    const Sequence sequence = Sequence::load(ctx);
    const Tensor grad_y = or_zeros(grads[0], s.y), grad_h_n = or_zeros(grads[1], s.h0);
    if (at::GradMode::is_enabled()) {
      return graph_gradients("recurrence", CellKind::kGru, s.inputs(), {grad_y, grad_h_n}, 3,
                             sequence);
    }
    auto [g_xg, g_w_hh, g_b_hh, g_h0] =
        op<&gru_recurrence_backward>("gru_recurrence_backward")
            .call(grad_y, grad_h_n, s.w_hh, s.h0, s.y, s.workspace, sequence.batch_sizes,
                  sequence.reverse);
    return {g_xg, g_w_hh, if_present(g_b_hh, s.b_hh), g_h0, Tensor(), Tensor(), Tensor()};
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

// ---------------------------------------------------------------- composite ops

// The one rule: whether autograd must record a step on these inputs (undefined ones are absent
// optional inputs). Where it must, the composite ops run a node; otherwise the inference op.
bool records_graph(std::initializer_list<Tensor> inputs) {
  if (!at::GradMode::is_enabled()) return false;
  for (const Tensor& t : inputs) {
    if (t.defined() && t.requires_grad()) return true;
  }
  return false;
}

// The grad path checks what its GEMMs would not.
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
  return as_tuple<2>(LstmCell::apply(input, hx, cx, w_ih, w_hh, b_ih, b_hh));
}

Tensor gru_cell(const Tensor& input, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh,
                const OptTensor& b_ih, const OptTensor& b_hh) {
  if (!records_graph({input, hx, w_ih, w_hh, or_none(b_ih), or_none(b_hh)})) {
    return op<&gru_cell_inference>("gru_cell_inference").call(input, hx, w_ih, w_hh, b_ih, b_hh);
  }
  check_cell_step("rnn_ext::gru_cell", 3, input, hx, w_ih, w_hh);
  return GruCell::apply(input, hx, w_ih, w_hh, b_ih, b_hh);
}

// The biases as the layer's ops take them: (the input side's, the hidden side's). The RNN and
// the LSTM add b_ih and b_hh to the same pre-activations, so they are summed once here and
// added by the fused step, which reads a bias anyway (a GEMM with a bias first copies it into
// all N rows of its output). The GRU's b_hn sits inside r * (...), apart from b_in. Both are
// checked against w_hh [G*H, P] first: their sum would broadcast.
std::pair<OptTensor, OptTensor> layer_biases(const char* op, CellKind kind, const Tensor& w_hh,
                                             const OptTensor& b_ih, const OptTensor& b_hh) {
  if (kind == CellKind::kGru || !or_none(b_ih).defined()) return {b_ih, b_hh};
  if (!or_none(b_hh).defined()) return {std::nullopt, b_ih};
  if (w_hh.dim() == 2) {  // else the op raises on w_hh
    const ArgChecker check(op, w_hh);
    check(b_ih, "b_ih", {w_hh.size(0)});
    check(b_hh, "b_hh", {w_hh.size(0)});
  }
  return {std::nullopt, at::add(*b_ih, *b_hh)};
}

// The input side's gate pre-activations of a layer that records a graph: xg = x @ w_ihᵀ + b_ih.
Tensor input_gates(const Tensor& x, const Tensor& w_ih, const OptTensor& b_ih) {
  return at::linear(x, w_ih, b_ih);
}

std::tuple<Tensor, Tensor> rnn_layer(const Tensor& x, const Tensor& w_ih, const OptTensor& b_ih,
                                     const Tensor& w_hh, const OptTensor& b_hh, const Tensor& h0,
                                     const Tensor& batch_sizes, bool reverse,
                                     std::string_view nonlinearity) {
  const bool grad = records_graph({x, w_ih, or_none(b_ih), w_hh, or_none(b_hh), h0});
  const char* name = "rnn_ext::rnn_layer";
  const auto [bias_ih, bias_hh] =
      layer_biases(name, rnn_cell_kind(name, nonlinearity), w_hh, b_ih, b_hh);
  if (!grad) {
    return op<&rnn_layer_inference>("rnn_layer_inference")
        .call(x, w_ih, bias_ih, w_hh, bias_hh, h0, batch_sizes, reverse, nonlinearity);
  }
  return as_tuple<2>(RnnRecurrence::apply(input_gates(x, w_ih, bias_ih), w_hh, bias_hh, h0,
                                          batch_sizes, reverse, nonlinearity));
}

std::tuple<Tensor, Tensor, Tensor> lstm_layer(const Tensor& x, const Tensor& w_ih,
                                              const OptTensor& b_ih, const Tensor& w_hh,
                                              const OptTensor& b_hh, const OptTensor& w_hr,
                                              const Tensor& h0, const Tensor& c0,
                                              const Tensor& batch_sizes, bool reverse) {
  const bool grad =
      records_graph({x, w_ih, or_none(b_ih), w_hh, or_none(b_hh), or_none(w_hr), h0, c0});
  const auto [bias_ih, bias_hh] =
      layer_biases("rnn_ext::lstm_layer", CellKind::kLstm, w_hh, b_ih, b_hh);
  if (!grad) {
    return op<&lstm_layer_inference>("lstm_layer_inference")
        .call(x, w_ih, bias_ih, w_hh, bias_hh, w_hr, h0, c0, batch_sizes, reverse);
  }
  return as_tuple<3>(LstmRecurrence::apply(input_gates(x, w_ih, bias_ih), w_hh, bias_hh, w_hr,
                                           h0, c0, batch_sizes, reverse,
                                           /*save_workspace=*/true));
}

std::tuple<Tensor, Tensor> gru_layer(const Tensor& x, const Tensor& w_ih, const OptTensor& b_ih,
                                     const Tensor& w_hh, const OptTensor& b_hh, const Tensor& h0,
                                     const Tensor& batch_sizes, bool reverse) {
  const bool grad = records_graph({x, w_ih, or_none(b_ih), w_hh, or_none(b_hh), h0});
  const auto [bias_ih, bias_hh] =
      layer_biases("rnn_ext::gru_layer", CellKind::kGru, w_hh, b_ih, b_hh);
  if (!grad) {
    return op<&gru_layer_inference>("gru_layer_inference")
        .call(x, w_ih, bias_ih, w_hh, bias_hh, h0, batch_sizes, reverse);
  }
  return as_tuple<2>(GruRecurrence::apply(input_gates(x, w_ih, bias_ih), w_hh, bias_hh, h0,
                                          batch_sizes, reverse, /*save_workspace=*/true));
}

}  // namespace

TORCH_LIBRARY_IMPL(rnn_ext, CompositeImplicitAutograd, m) {
  m.impl("rnn_cell", &rnn_cell);
  m.impl("lstm_cell", &lstm_cell);
  m.impl("gru_cell", &gru_cell);
  m.impl("rnn_layer", &rnn_layer);
  m.impl("lstm_layer", &lstm_layer);
  m.impl("gru_layer", &gru_layer);
}

TORCH_LIBRARY_IMPL(rnn_ext, Autograd, m) {
  // The forward ops without a node of their own: on inputs that require grad their outputs get
  // a node that raises when reached ("derivative ... is not implemented"). The nodes call them
  // below autograd.
  for (const char* name :
       {"rnn_pointwise_forward", "lstm_pointwise_forward", "gru_pointwise_forward",
        "rnn_cell_inference", "lstm_cell_inference", "gru_cell_inference",
        "rnn_layer_inference", "lstm_layer_inference", "gru_layer_inference"}) {
    m.impl(name, torch::autograd::autogradNotImplementedFallback());
  }
  m.impl("rnn_recurrence", [](const Tensor& xg, const Tensor& w_hh, const OptTensor& b_hh,
                              const Tensor& h0, const Tensor& batch_sizes, bool reverse,
                              std::string_view nonlinearity) {
    return as_tuple<2>(
        RnnRecurrence::apply(xg, w_hh, b_hh, h0, batch_sizes, reverse, nonlinearity));
  });
  m.impl("lstm_recurrence", [](const Tensor& xg, const Tensor& w_hh, const OptTensor& b_hh,
                               const OptTensor& w_hr, const Tensor& h0, const Tensor& c0,
                               const Tensor& batch_sizes, bool reverse, bool save_workspace) {
    return as_tuple<4>(LstmRecurrence::apply(xg, w_hh, b_hh, w_hr, h0, c0, batch_sizes,
                                             reverse, save_workspace));
  });
  m.impl("gru_recurrence", [](const Tensor& xg, const Tensor& w_hh, const OptTensor& b_hh,
                              const Tensor& h0, const Tensor& batch_sizes, bool reverse,
                              bool save_workspace) {
    return as_tuple<3>(
        GruRecurrence::apply(xg, w_hh, b_hh, h0, batch_sizes, reverse, save_workspace));
  });
}

}  // namespace rnn_ext
