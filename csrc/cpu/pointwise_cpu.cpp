// CPU kernels of the pointwise step: rows split over threads, units of a row in a loop that
// the compiler vectorises (the gate math is branch-free, see cell_math.h).
#include <algorithm>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "../pointwise.h"

namespace rnn_ext {
namespace {

// Rows per task: enough gate values that a thread's share outweighs waking it.
int64_t grain_rows(int64_t values_per_row) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, values_per_row));
}

template <typename Cell, typename acc_t, int kArgs, typename scalar_t>
void forward_rows(const ForwardPointers<scalar_t> p, int64_t begin, int64_t end) {
  for (int64_t b = begin; b < end; ++b) {
#pragma GCC ivdep
    for (int64_t j = 0; j < p.hidden; ++j) forward_unit<Cell, acc_t, kArgs>(p, b, j);
  }
}

// forward_rows instantiated for the optional arguments present in `p`.
template <typename Cell, typename acc_t, typename scalar_t>
void forward_rows_for(const ForwardPointers<scalar_t>& p, int64_t begin, int64_t end) {
  const int args = (p.b_ih ? kBiasIh : 0) | (p.b_hh ? kBiasHh : 0) | (p.saved ? kSaves : 0);
  switch (args) {
    case 0: return forward_rows<Cell, acc_t, 0>(p, begin, end);
    case kBiasIh: return forward_rows<Cell, acc_t, kBiasIh>(p, begin, end);
    case kBiasHh: return forward_rows<Cell, acc_t, kBiasHh>(p, begin, end);
    case kBiasIh | kBiasHh: return forward_rows<Cell, acc_t, kBiasIh | kBiasHh>(p, begin, end);
    case kSaves: return forward_rows<Cell, acc_t, kSaves>(p, begin, end);
    case kSaves | kBiasIh: return forward_rows<Cell, acc_t, kSaves | kBiasIh>(p, begin, end);
    case kSaves | kBiasHh: return forward_rows<Cell, acc_t, kSaves | kBiasHh>(p, begin, end);
    default: return forward_rows<Cell, acc_t, kSaves | kBiasIh | kBiasHh>(p, begin, end);
  }
}

template <typename Cell, typename acc_t, typename scalar_t>
void backward_rows(const BackwardPointers<scalar_t> p, int64_t begin, int64_t end) {
  for (int64_t b = begin; b < end; ++b) {
#pragma GCC ivdep
    for (int64_t j = 0; j < p.hidden; ++j) backward_unit<Cell, acc_t>(p, b, j);
  }
}

void forward_cpu(CellKind kind, const PointwiseForward& a) {
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, a.h_new.scalar_type(), "rnn_ext_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto p = pointers_of<scalar_t>(a);
    visit_cell<acc_t>(kind, [&](auto cell) {
      using Cell = decltype(cell);
      at::parallel_for(0, a.h_new.size(0), grain_rows(Cell::kGates * p.hidden),
                       [&](int64_t begin, int64_t end) { forward_rows_for<Cell, acc_t>(p, begin, end); });
    });
  });
}

void backward_cpu(CellKind kind, const PointwiseBackward& a) {
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, a.grad_xg.scalar_type(), "rnn_ext_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto p = pointers_of<scalar_t>(a);
    visit_cell<acc_t>(kind, [&](auto cell) {
      using Cell = decltype(cell);
      at::parallel_for(0, a.grad_xg.size(0), grain_rows(Cell::kGates * p.hidden),
                       [&](int64_t begin, int64_t end) { backward_rows<Cell, acc_t>(p, begin, end); });
    });
  });
}

const bool registered = register_device_kernels(c10::DeviceType::CPU, {forward_cpu, backward_cpu});

}  // namespace
}  // namespace rnn_ext
