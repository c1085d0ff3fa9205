// The two kernels of a recurrent step, as the device-agnostic code sees them: the step GEMM and
// the fused pointwise step of a cell (one call updates B rows of H units). Each device (cpu/,
// cuda/) registers its kernels in a table at load time, so the ops and the recurrence never
// branch on the device or on how the library was built.
//
// Arguments are raw pointers (cell_math.h's ForwardPointers / BackwardPointers, type-erased)
// plus dtype and device: the recurrence calls these a few times per time step, and building
// tensor views for every call would cost as much as the work at small sizes.
#pragma once

#include <memory>
#include <string_view>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include "cell_math.h"

namespace rnn_ext {

// The four cells. kernels.cpp holds the one table of their names: torch.nn's mode
// ('RNN_TANH', 'RNN_RELU', 'LSTM', 'GRU') and the RNN's nonlinearity ('tanh', 'relu'), as
// rnn_ext/_kinds.py does for Python.
enum class CellKind { kRnnTanh, kRnnRelu, kLstm, kGru };

int64_t gates_per_unit(CellKind kind);  // G: 1, 1, 4, 3
int64_t saved_per_unit(CellKind kind);  // S: 1, 1, 5, 5
// Whether the cell writes a workspace of its own (LSTM, GRU); the RNN's workspace is its output.
bool has_workspace(CellKind kind);
const char* mode_name(CellKind kind);          // torch.nn's mode: "RNN_TANH", ..., "GRU"
const char* nonlinearity_name(CellKind kind);  // "tanh" or "relu"; raises for LSTM and GRU
// The RNN cell of a nonlinearity name, 'tanh' or 'relu'; `op` names the caller in errors.
CellKind rnn_cell_kind(const char* op, std::string_view nonlinearity);

// Where the data lives and what it is: every pointer of one call shares these.
struct DataType {
  at::ScalarType dtype;
  c10::Device device;
};

// A row-major matrix: rows x cols, `stride` elements from one row to the next.
struct MatrixRef {
  void* data;
  int64_t rows, cols, stride;
};

// A layer's recurrent weight w_hh [G*H, P], prepared once per layer call for the steps of its
// forward (forward_steps) or of its backward (backward_steps): the CPU packs it for BLAS
// (see cpu/kernels_cpu.cpp: CpuStepWeights); CUDA keeps the tensor.
struct StepWeights {
  virtual ~StepWeights() = default;
};
enum class StepPass { kForward, kBackward };

// One forward step: p.hg = h_prev [p.rows, P] (contiguous) @ w_hhᵀ, then the pointwise forward
// of p (p.hg is its scratch).
struct ForwardStep {
  const void* h_prev;
  ForwardPointers<void> p;
};

// One backward step: the pointwise backward of p (dgates), then the step's GEMM
// dh [p.rows, P] = beta * dh + dgates [p.rows, G*H] @ w_hh.
struct BackwardStep {
  BackwardPointers<void> p;
  MatrixRef dh, dgates;
  double beta;
};

struct DeviceKernels {
  // The pointwise forward / backward of B rows (cell_math.h documents every pointer).
  void (*forward)(CellKind, DataType, const ForwardPointers<void>&) = nullptr;
  void (*backward)(CellKind, DataType, const BackwardPointers<void>&) = nullptr;
  // out = beta * out + a @ (transpose_b ? bᵀ : b); beta 0 ignores out's contents (NaN too).
  void (*gemm)(DataType, MatrixRef out, MatrixRef a, MatrixRef b, bool transpose_b,
               double beta) = nullptr;
  // w_hh: [G*H, P] contiguous; batch: the rows of the steps to come (B).
  std::unique_ptr<StepWeights> (*prepare_step)(CellKind, StepPass, const at::Tensor& w_hh,
                                               int64_t batch) = nullptr;
  // Consecutive forward steps, in order (see ForwardStep); each reads what the one before it
  // wrote.
  void (*forward_steps)(CellKind, DataType, const StepWeights&, const ForwardStep* steps,
                        int64_t count) = nullptr;
  // Consecutive backward steps, in order (see BackwardStep); each reads what the one before it
  // wrote.
  void (*backward_steps)(CellKind, DataType, const StepWeights&, const BackwardStep* steps,
                         int64_t count) = nullptr;
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

// ---- building and reading the type-erased arguments ----

inline DataType data_type_of(const at::Tensor& t) { return {t.scalar_type(), t.device()}; }

// Row `row` of a row-major tensor, or null for an undefined one.
inline void* row_pointer(const at::Tensor& t, int64_t row = 0) {
  if (!t.defined()) return nullptr;
  return static_cast<char*>(t.data_ptr()) + row * t.stride(0) * t.element_size();
}

// Rows [row, row + rows) of a row-major 2-D tensor.
inline MatrixRef matrix_rows(const at::Tensor& t, int64_t row, int64_t rows) {
  return {row_pointer(t, row), rows, t.size(1), t.stride(0)};
}
inline MatrixRef matrix_of(const at::Tensor& t) { return matrix_rows(t, 0, t.size(0)); }

template <typename scalar_t>
ForwardPointers<scalar_t> typed(const ForwardPointers<void>& p) {
  auto in = [](const void* q) { return static_cast<const scalar_t*>(q); };
  auto out = [](void* q) { return static_cast<scalar_t*>(q); };
  ForwardPointers<scalar_t> t;
  t.xg = in(p.xg);
  t.hg = in(p.hg);
  t.b_ih = in(p.b_ih);
  t.b_hh = in(p.b_hh);
  t.h_prev = in(p.h_prev);
  t.c_prev = in(p.c_prev);
  t.h_new = out(p.h_new);
  t.c_new = out(p.c_new);
  t.saved = out(p.saved);
  t.rows = p.rows;
  t.hidden = p.hidden;
  t.hg_row = p.hg_row;
  t.hg_gate = p.hg_gate;
  return t;
}

template <typename scalar_t>
BackwardPointers<scalar_t> typed(const BackwardPointers<void>& p) {
  auto in = [](const void* q) { return static_cast<const scalar_t*>(q); };
  auto out = [](void* q) { return static_cast<scalar_t*>(q); };
  BackwardPointers<scalar_t> t;
  t.grad_h_new = in(p.grad_h_new);
  t.grad_h_add = in(p.grad_h_add);
  t.grad_c_new = in(p.grad_c_new);
  t.saved = in(p.saved);
  t.grad_xg = out(p.grad_xg);
  t.grad_hg = out(p.grad_hg);
  t.grad_h_prev = out(p.grad_h_prev);
  t.grad_c_prev = out(p.grad_c_prev);
  t.rows = p.rows;
  t.hidden = p.hidden;
  return t;
}

}  // namespace rnn_ext
