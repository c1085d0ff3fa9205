// The two kernels of a recurrent step, as seen by the device-agnostic code: the step GEMM and the
// fused pointwise step of a cell (one call updates B rows of H units). Each device (cpu/, cuda/)
// registers its kernels in a table at load time, so the ops and the recurrence never branch on
// the device or on how the library was built.
#pragma once

#include <string_view>

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include "cell_math.h"

namespace rnn_ext {

enum class CellKind { kRnnTanh, kRnnRelu, kLstm, kGru };

int64_t gates_per_unit(CellKind kind);  // G: 1, 1, 4, 3
int64_t saved_per_unit(CellKind kind);  // S: 1, 1, 5, 5
// The RNN cell of a nonlinearity name, 'tanh' or 'relu'; `op` names the caller in errors.
CellKind rnn_cell_kind(const char* op, std::string_view nonlinearity);

// All tensors contiguous, one dtype. Undefined = absent.
struct PointwiseForward {
  at::Tensor xg;      // [B, G*H] input-side gate pre-activations
  at::Tensor hg;      // [B, G*H] hidden-side gate pre-activations
  at::Tensor b_ih;    // [G*H] or undefined (already inside xg)
  at::Tensor b_hh;    // [G*H] or undefined (already inside hg)
  at::Tensor h_prev;  // [B, H] previous hidden state (GRU)
  at::Tensor c_prev;  // [B, H] previous cell state (LSTM)
  at::Tensor h_new;   // [B, H] out; may alias h_prev
  at::Tensor c_new;   // [B, H] out (LSTM); may alias c_prev
  at::Tensor saved;   // [B, S*H] out, or undefined when the backward will not run
};

struct PointwiseBackward {
  at::Tensor grad_h_new;   // [B, H] gradient w.r.t. h_new
  at::Tensor grad_c_new;   // [B, H] gradient w.r.t. c_new (LSTM)
  at::Tensor saved;        // [B, S*H] the forward's workspace
  at::Tensor grad_xg;      // [B, G*H] out: gradient of both pre-activations (RNN, LSTM), of xg (GRU)
  at::Tensor grad_hg;      // [B, G*H] out (GRU): gradient of hg
  at::Tensor grad_h_prev;  // [B, H] out (GRU): h_prev's direct path; may alias grad_h_new
  at::Tensor grad_c_prev;  // [B, H] out (LSTM); may alias grad_c_new
};

// out [M, N] = beta * out + a [M, K] @ (transpose_b ? bᵀ : b), b being [N, K] or [K, N].
// All row-major and contiguous, one dtype; beta 0 ignores out's contents (NaN included).
// The recurrence calls it twice a step, so the CPU skips ATen's dispatch and calls BLAS.
using GemmKernel = void (*)(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                            bool transpose_b, double beta);

struct DeviceKernels {
  void (*forward)(CellKind, const PointwiseForward&) = nullptr;
  void (*backward)(CellKind, const PointwiseBackward&) = nullptr;
  GemmKernel gemm = nullptr;
};

// Called once per device from a static initialiser in that device's source file.
bool register_device_kernels(c10::DeviceType device, DeviceKernels kernels);
// Raises when this build has no kernels for `device`.
const DeviceKernels& device_kernels(c10::DeviceType device);

// Calls fn(Cell<acc_t>{}) for the cell math of `kind`.
template <typename acc_t, typename Fn>
void visit_cell(CellKind kind, Fn&& fn) {
  switch (kind) {
    case CellKind::kRnnTanh: return fn(RnnCellMath<acc_t, false>{});
    case CellKind::kRnnRelu: return fn(RnnCellMath<acc_t, true>{});
    case CellKind::kLstm: return fn(LstmCellMath<acc_t>{});
    case CellKind::kGru: return fn(GruCellMath<acc_t>{});
  }
}

// Raw pointers of the arguments, nullptr where undefined.
template <typename scalar_t>
ForwardPointers<scalar_t> pointers_of(const PointwiseForward& a) {
  auto in = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr; };
  auto out = [](const at::Tensor& t) { return t.defined() ? t.mutable_data_ptr<scalar_t>() : nullptr; };
  return {in(a.xg),      in(a.hg),      in(a.b_ih),    in(a.b_hh),   in(a.h_prev),
          in(a.c_prev),  out(a.h_new),  out(a.c_new),  out(a.saved), a.h_new.size(1)};
}

template <typename scalar_t>
BackwardPointers<scalar_t> pointers_of(const PointwiseBackward& a) {
  auto in = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr; };
  auto out = [](const at::Tensor& t) { return t.defined() ? t.mutable_data_ptr<scalar_t>() : nullptr; };
  return {in(a.grad_h_new),  in(a.grad_c_new),  in(a.saved),
          out(a.grad_xg),    out(a.grad_hg),    out(a.grad_h_prev),
          out(a.grad_c_prev), a.grad_h_new.size(1)};
}

}  // namespace rnn_ext
