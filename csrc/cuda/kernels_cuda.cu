// CUDA kernels: the pointwise step, one thread per (row, unit), on the current stream; the step
// GEMM is ATen's (cuBLAS).
// Consecutive threads take consecutive units of a row, so every gate column is read coalesced.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../kernels.h"

namespace rnn_ext {
namespace {

constexpr int kThreads = 256;

template <typename Cell, typename acc_t, typename scalar_t>
__global__ void forward_kernel(const ForwardPointers<scalar_t> p, int64_t units) {
  for (int64_t u = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; u < units;
       u += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    forward_unit<Cell, acc_t>(p, u / p.hidden, u % p.hidden);
  }
}

template <typename Cell, typename acc_t, typename scalar_t>
__global__ void backward_kernel(const BackwardPointers<scalar_t> p, int64_t units) {
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

void forward_cuda(CellKind kind, const PointwiseForward& a) {
  const c10::cuda::CUDAGuard guard(a.h_new.device());
  const int64_t units = a.h_new.numel();
  if (units == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.h_new.scalar_type(),
                                  "rnn_ext_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto p = pointers_of<scalar_t>(a);
    visit_cell<acc_t>(kind, [&](auto cell) {
      forward_kernel<decltype(cell), acc_t><<<blocks_for(units), kThreads, 0, stream>>>(p, units);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void backward_cuda(CellKind kind, const PointwiseBackward& a) {
  const c10::cuda::CUDAGuard guard(a.grad_h_new.device());
  const int64_t units = a.grad_h_new.numel();
  if (units == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.grad_xg.scalar_type(),
                                  "rnn_ext_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto p = pointers_of<scalar_t>(a);
    visit_cell<acc_t>(kind, [&](auto cell) {
      backward_kernel<decltype(cell), acc_t><<<blocks_for(units), kThreads, 0, stream>>>(p, units);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void gemm_cuda(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool transpose_b,
               double beta) {
  const at::Tensor rhs = transpose_b ? b.t() : b;
  at::Tensor result = out;
  if (beta == 0) {
    at::mm_out(result, a, rhs);
  } else {
    result.addmm_(a, rhs, beta, 1);
  }
}

const bool registered =
    register_device_kernels(c10::DeviceType::CUDA, {forward_cuda, backward_cuda, gemm_cuda});

}  // namespace
}  // namespace rnn_ext
