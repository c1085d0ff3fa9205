// CUDA kernels: the pointwise step, one thread per (row, unit), on the current stream; the step
// GEMM is ATen's (cuBLAS).
// Consecutive threads take consecutive units of a row, so every gate column is read coalesced.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../kernels.h"

namespace rnn_ext {
namespace {

constexpr int kThreads = 256;

template <typename Cell, typename acc_t, typename scalar_t>
__global__ void forward_kernel(const ForwardPointers<scalar_t> p) {
  const int64_t units = p.rows * p.hidden;
  for (int64_t u = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; u < units;
       u += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    forward_unit<Cell, acc_t>(p, u / p.hidden, u % p.hidden);
  }
}

template <typename Cell, typename acc_t, typename scalar_t>
__global__ void backward_kernel(const BackwardPointers<scalar_t> p) {
  const int64_t units = p.rows * p.hidden;
  for (int64_t u = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; u < units;
       u += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    backward_unit<Cell, acc_t>(p, u / p.hidden, u % p.hidden);
  }
}

// Enough blocks to cover every unit, capped so that a grid-stride loop takes the rest.
unsigned int blocks_for(int64_t units) {
  const int64_t blocks = (units + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), 65535));
}

void forward_cuda(CellKind kind, DataType type, const ForwardPointers<void>& p) {
  if (p.rows * p.hidden == 0) return;
  const c10::cuda::CUDAGuard guard(type.device);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, type.dtype, "rnn_ext_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto q = typed<scalar_t>(p);
    visit_cell<acc_t>(kind, [&](auto cell) {
      forward_kernel<decltype(cell), acc_t>
          <<<blocks_for(q.rows * q.hidden), kThreads, 0, stream>>>(q);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void backward_cuda(CellKind kind, DataType type, const BackwardPointers<void>& p) {
  if (p.rows * p.hidden == 0) return;
  const c10::cuda::CUDAGuard guard(type.device);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, type.dtype, "rnn_ext_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto q = typed<scalar_t>(p);
    visit_cell<acc_t>(kind, [&](auto cell) {
      backward_kernel<decltype(cell), acc_t>
          <<<blocks_for(q.rows * q.hidden), kThreads, 0, stream>>>(q);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// Device view of a MatrixRef, for ATen's cuBLAS GEMMs.
at::Tensor as_tensor(MatrixRef m, DataType type) {
  return at::from_blob(m.data, {m.rows, m.cols}, {m.stride, 1},
                       at::TensorOptions(type.dtype).device(type.device));
}

void gemm_cuda(DataType type, MatrixRef out, MatrixRef a, MatrixRef b, bool transpose_b,
               double beta) {
  if (out.rows == 0 || out.cols == 0) return;
  const at::Tensor rhs = transpose_b ? as_tensor(b, type).t() : as_tensor(b, type);
  at::Tensor result = as_tensor(out, type);
  if (beta == 0) {
    at::mm_out(result, as_tensor(a, type), rhs);
  } else {
    result.addmm_(as_tensor(a, type), rhs, beta, 1);
  }
}

struct CudaStepWeights final : StepWeights {
  at::Tensor weight;  // [G*H, P]
};

std::unique_ptr<StepWeights> prepare_step_cuda(CellKind, StepPass, const at::Tensor& w_hh,
                                               int64_t) {
  auto prepared = std::make_unique<CudaStepWeights>();
  prepared->weight = w_hh.contiguous();
  return prepared;
}

void forward_steps_cuda(CellKind kind, DataType type, const StepWeights& weights,
                        const ForwardStep* steps, int64_t count) {
  const at::Tensor& w = static_cast<const CudaStepWeights&>(weights).weight;
  const int64_t GH = w.size(0), P = w.size(1);
  for (int64_t i = 0; i < count; ++i) {
    const ForwardPointers<void>& p = steps[i].p;
    gemm_cuda(type, {const_cast<void*>(p.hg), p.rows, GH, GH},
              {const_cast<void*>(steps[i].h_prev), p.rows, P, P}, matrix_of(w), true, 0);
    forward_cuda(kind, type, p);
  }
}

void backward_steps_cuda(CellKind kind, DataType type, const StepWeights& weights,
                         const BackwardStep* steps, int64_t count) {
  const at::Tensor& w = static_cast<const CudaStepWeights&>(weights).weight;
  for (int64_t i = 0; i < count; ++i) {
    backward_cuda(kind, type, steps[i].p);
    gemm_cuda(type, steps[i].dh, steps[i].dgates, matrix_of(w), /*transpose_b=*/false,
              steps[i].beta);
  }
}

const bool registered = register_device_kernels(
    c10::DeviceType::CUDA, {forward_cuda, backward_cuda, gemm_cuda, prepare_step_cuda,
                            forward_steps_cuda, backward_steps_cuda});

}  // namespace
}  // namespace rnn_ext
