// Pointwise and cell inference ops: check the arguments, allocate the outputs, run the device's
// kernels.
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>

#include "checks.h"
#include "ops.h"
#include "kernels.h"

using at::Tensor;

namespace rnn_ext {
namespace {

// A cell step's tensors: the inputs made contiguous and the outputs it allocates.
struct CellForward {
  Tensor xg, hg, b_ih, b_hh, h_prev, c_prev;  // inputs
  Tensor h_new, c_new, saved;                 // outputs
};

// One forward step. `h_prev` / `c_prev` are undefined for the cells that do not read them;
// without `save` there is no workspace.
CellForward run_cell_forward(const char* op, CellKind kind, const Tensor& xg, const Tensor& hg,
                             const OptTensor& b_ih, const OptTensor& b_hh, const Tensor& h_prev,
                             const Tensor& c_prev, bool save = true) {
  const int64_t G = gates_per_unit(kind);
  const int64_t H = units_of(op, xg, G);
  const int64_t B = xg.size(0);
  const ArgChecker check(op, xg);
  check(hg, "hg", {B, G * H});
  check(b_ih, "b_ih", {G * H});
  check(b_hh, "b_hh", {G * H});
  if (kind == CellKind::kGru) check(h_prev, "hx", {B, H});
  if (kind == CellKind::kLstm) check(c_prev, "cx", {B, H});
  const c10::DeviceGuard guard(xg.device());
  const auto& kernels = device_kernels(xg.device().type());

  CellForward t;
  t.xg = xg.contiguous();
  t.hg = hg.contiguous();
  t.b_ih = optional_contiguous(b_ih);
  t.b_hh = optional_contiguous(b_hh);
  if (h_prev.defined()) t.h_prev = h_prev.contiguous();
  if (c_prev.defined()) t.c_prev = c_prev.contiguous();
  t.h_new = at::empty({B, H}, xg.options());
  if (kind == CellKind::kLstm) t.c_new = at::empty({B, H}, xg.options());
  // The RNN cell's workspace is its output h_new, so it saves nothing of its own.
  if (save && has_workspace(kind)) {
    t.saved = at::empty({B, saved_per_unit(kind) * H}, xg.options());
  }
  ForwardPointers<void> p;
  p.xg = row_pointer(t.xg);
  p.hg = row_pointer(t.hg);
  p.b_ih = row_pointer(t.b_ih);
  p.b_hh = row_pointer(t.b_hh);
  p.h_prev = row_pointer(t.h_prev);
  p.c_prev = row_pointer(t.c_prev);
  p.h_new = row_pointer(t.h_new);
  p.c_new = row_pointer(t.c_new);
  p.saved = row_pointer(t.saved);
  p.rows = B;
  p.hidden = H;
  kernels.forward(kind, data_type_of(xg), p);
  return t;
}

// One step from the cell's input [B, I] and state hx [B, H] (cx [B, H]): the two GEMMs, then the
// pointwise step, with no workspace (inference).
CellForward run_cell_inference(const char* op, CellKind kind, const Tensor& input,
                               const Tensor& hx, const Tensor& cx, const Tensor& w_ih,
                               const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh) {
  const int64_t G = gates_per_unit(kind), B = input.size(0);
  const int64_t H = check_cell_step(op, G, input, hx, w_ih, w_hh);
  const c10::DeviceGuard guard(input.device());
  const auto& kernels = device_kernels(input.device().type());
  const DataType type = data_type_of(input);
  const Tensor xg = at::empty({B, G * H}, input.options());
  const Tensor hg = at::empty({B, G * H}, input.options());
  kernels.gemm(type, matrix_of(xg), matrix_of(input.contiguous()), matrix_of(w_ih.contiguous()),
               /*transpose_b=*/true, 0);
  kernels.gemm(type, matrix_of(hg), matrix_of(hx.contiguous()), matrix_of(w_hh.contiguous()),
               /*transpose_b=*/true, 0);
  return run_cell_forward(op, kind, xg, hg, b_ih, b_hh, kind == CellKind::kGru ? hx : Tensor(),
                          cx, /*save=*/false);
}

struct CellBackward {
  Tensor grad_h_new, grad_c_new, saved;             // inputs
  Tensor grad_xg, grad_hg, grad_h_prev, grad_c_prev;  // outputs
};

// One backward step from the gradient of h_new (and c_new) and the forward's workspace.
CellBackward run_cell_backward(const char* op, CellKind kind, const Tensor& grad_h_new,
                               const Tensor& grad_c_new, const Tensor& saved) {
  const ArgChecker check(op, grad_h_new);
  check(grad_h_new, "grad_hy", {-1, -1});
  const int64_t B = grad_h_new.size(0), H = grad_h_new.size(1);
  const int64_t G = gates_per_unit(kind);
  check(saved, has_workspace(kind) ? "workspace" : "hy",
        {B, saved_per_unit(kind) * H});
  if (kind == CellKind::kLstm) check(grad_c_new, "grad_cy", {B, H});
  const c10::DeviceGuard guard(grad_h_new.device());
  const auto& kernels = device_kernels(grad_h_new.device().type());

  CellBackward t;
  t.grad_h_new = grad_h_new.contiguous();
  if (grad_c_new.defined()) t.grad_c_new = grad_c_new.contiguous();
  t.saved = saved.contiguous();
  t.grad_xg = at::empty({B, G * H}, grad_h_new.options());
  if (kind == CellKind::kGru) {
    t.grad_hg = at::empty({B, G * H}, grad_h_new.options());
    t.grad_h_prev = at::empty({B, H}, grad_h_new.options());
  }
  if (kind == CellKind::kLstm) t.grad_c_prev = at::empty({B, H}, grad_h_new.options());
  BackwardPointers<void> p;
  p.grad_h_new = row_pointer(t.grad_h_new);
  p.grad_c_new = row_pointer(t.grad_c_new);
  p.saved = row_pointer(t.saved);
  p.grad_xg = row_pointer(t.grad_xg);
  p.grad_hg = row_pointer(t.grad_hg);
  p.grad_h_prev = row_pointer(t.grad_h_prev);
  p.grad_c_prev = row_pointer(t.grad_c_prev);
  p.rows = B;
  p.hidden = H;
  kernels.backward(kind, data_type_of(grad_h_new), p);
  return t;
}

}  // namespace

Tensor rnn_pointwise_forward(const Tensor& xg, const Tensor& hg, const OptTensor& b_ih,
                             const OptTensor& b_hh, std::string_view nonlinearity) {
  const char* op = "rnn_ext::rnn_pointwise_forward";
  return run_cell_forward(op, rnn_cell_kind(op, nonlinearity), xg, hg, b_ih, b_hh, {}, {}).h_new;
}

Tensor rnn_pointwise_backward(const Tensor& grad_hy, const Tensor& hy,
                              std::string_view nonlinearity) {
  const char* op = "rnn_ext::rnn_pointwise_backward";
  return run_cell_backward(op, rnn_cell_kind(op, nonlinearity), grad_hy, {}, hy).grad_xg;
}

std::tuple<Tensor, Tensor, Tensor> lstm_pointwise_forward(const Tensor& xg, const Tensor& hg,
                                                          const OptTensor& b_ih,
                                                          const OptTensor& b_hh,
                                                          const Tensor& cx) {
  auto a = run_cell_forward("rnn_ext::lstm_pointwise_forward", CellKind::kLstm, xg, hg, b_ih,
                            b_hh, {}, cx);
  return {a.h_new, a.c_new, a.saved};
}

std::tuple<Tensor, Tensor> lstm_pointwise_backward(const Tensor& grad_hy, const Tensor& grad_cy,
                                                   const Tensor& workspace) {
  auto a = run_cell_backward("rnn_ext::lstm_pointwise_backward", CellKind::kLstm, grad_hy,
                             grad_cy, workspace);
  return {a.grad_xg, a.grad_c_prev};
}

std::tuple<Tensor, Tensor> gru_pointwise_forward(const Tensor& xg, const Tensor& hg,
                                                 const OptTensor& b_ih, const OptTensor& b_hh,
                                                 const Tensor& hx) {
  auto a = run_cell_forward("rnn_ext::gru_pointwise_forward", CellKind::kGru, xg, hg, b_ih, b_hh,
                            hx, {});
  return {a.h_new, a.saved};
}

std::tuple<Tensor, Tensor, Tensor> gru_pointwise_backward(const Tensor& grad_hy,
                                                          const Tensor& workspace) {
  auto a = run_cell_backward("rnn_ext::gru_pointwise_backward", CellKind::kGru, grad_hy, {},
                             workspace);
  return {a.grad_xg, a.grad_hg, a.grad_h_prev};
}

Tensor rnn_cell_inference(const Tensor& input, const Tensor& hx, const Tensor& w_ih,
                          const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                          std::string_view nonlinearity) {
  const char* op = "rnn_ext::rnn_cell_inference";
  return run_cell_inference(op, rnn_cell_kind(op, nonlinearity), input, hx, {}, w_ih, w_hh, b_ih,
                            b_hh).h_new;
}

std::tuple<Tensor, Tensor> lstm_cell_inference(const Tensor& input, const Tensor& hx,
                                               const Tensor& cx, const Tensor& w_ih,
                                               const Tensor& w_hh, const OptTensor& b_ih,
                                               const OptTensor& b_hh) {
  auto a = run_cell_inference("rnn_ext::lstm_cell_inference", CellKind::kLstm, input, hx, cx,
                              w_ih, w_hh, b_ih, b_hh);
  return {a.h_new, a.c_new};
}

Tensor gru_cell_inference(const Tensor& input, const Tensor& hx, const Tensor& w_ih,
                          const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh) {
  return run_cell_inference("rnn_ext::gru_cell_inference", CellKind::kGru, input, hx, {}, w_ih,
                            w_hh, b_ih, b_hh).h_new;
}

namespace {
void register_cell_ops(torch::Library& m) {
  m.impl("rnn_pointwise_forward", &rnn_pointwise_forward);
  m.impl("rnn_pointwise_backward", &rnn_pointwise_backward);
  m.impl("lstm_pointwise_forward", &lstm_pointwise_forward);
  m.impl("lstm_pointwise_backward", &lstm_pointwise_backward);
  m.impl("gru_pointwise_forward", &gru_pointwise_forward);
  m.impl("gru_pointwise_backward", &gru_pointwise_backward);
  m.impl("rnn_cell_inference", &rnn_cell_inference);
  m.impl("lstm_cell_inference", &lstm_cell_inference);
  m.impl("gru_cell_inference", &gru_cell_inference);
}
}  // namespace

RNN_EXT_REGISTER_DEVICE_KERNELS(register_cell_ops)

}  // namespace rnn_ext
