// CPU kernels: the pointwise step (rows split over threads, units of a row in a loop that the
// compiler vectorises: the gate math is branch-free, see cell_math.h) and the step GEMM.
#include <algorithm>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/mm.h>

#include "../kernels.h"

namespace rnn_ext {
namespace {

using at::Tensor;

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

}  // namespace
}  // namespace rnn_ext

// The Fortran BLAS that torch's CPU library carries (MKL or OpenBLAS). Weak, so a torch
// without them still loads this library, and the GEMM then goes through ATen.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace rnn_ext {
namespace {

template <typename scalar_t, typename Blas>
void blas_gemm(Blas* blas, const Tensor& out, const Tensor& a, const Tensor& b, bool transpose_b,
               double beta) {
  // Column-major BLAS: row-major out = a @ op(b) is column-major outᵀ = op(b)ᵀ @ aᵀ.
  const int M = static_cast<int>(a.size(0)), K = static_cast<int>(a.size(1));
  const int N = static_cast<int>(out.size(1));
  const int ldb = transpose_b ? K : N;
  const char op_b = transpose_b ? 'T' : 'N', op_a = 'N';
  const scalar_t alpha_v = 1, beta_v = static_cast<scalar_t>(beta);
  blas(&op_b, &op_a, &N, &M, &K, &alpha_v, b.const_data_ptr<scalar_t>(), &ldb,
       a.const_data_ptr<scalar_t>(), &K, &beta_v, out.mutable_data_ptr<scalar_t>(), &N);
}

// Straight to BLAS where it can (a few microseconds less per call than ATen's mm, which the
// recurrence calls twice a step), else ATen.
void gemm_cpu(const Tensor& out, const Tensor& a, const Tensor& b, bool transpose_b, double beta) {
  if (out.numel() == 0) return;
  const bool int_sizes = std::max({a.size(0), a.size(1), out.size(1)}) < (int64_t{1} << 31);
  if (int_sizes && a.size(1) > 0 && out.scalar_type() == at::kFloat && sgemm_ != nullptr) {
    return blas_gemm<float>(sgemm_, out, a, b, transpose_b, beta);
  }
  if (int_sizes && a.size(1) > 0 && out.scalar_type() == at::kDouble && dgemm_ != nullptr) {
    return blas_gemm<double>(dgemm_, out, a, b, transpose_b, beta);
  }
  const Tensor rhs = transpose_b ? b.t() : b;
  Tensor result = out;
  if (beta == 0) {
    at::mm_out(result, a, rhs);
  } else {
    result.addmm_(a, rhs, beta, 1);
  }
}

const bool registered =
    register_device_kernels(c10::DeviceType::CPU, {forward_cpu, backward_cpu, gemm_cpu});

}  // namespace
}  // namespace rnn_ext
