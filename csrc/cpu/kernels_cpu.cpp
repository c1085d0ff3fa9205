// CPU kernels. The pointwise step splits rows over threads; the units of a row run in a loop
// that the compiler vectorises (the gate math is branch-free, see cell_math.h). GEMMs call BLAS
// directly (blas.h). A layer's steps, forward and backward, run fused in one parallel region
// (StepSplit says how the threads split the work): each thread multiplies its rows of
// h_prev, or h_prev by its slice of w_hh, and runs the pointwise math of that part while its
// gates are in its cache.
#include <algorithm>
#include <atomic>
#include <exception>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <omp.h>

#include "../kernels.h"
#include "blas.h"

namespace rnn_ext {
namespace {

using at::Tensor;

// Rows per task: enough gate values that a thread's share outweighs waking it.
int64_t grain_rows(int64_t values_per_row) {
  return std::max<int64_t>(1, 8192 / std::max<int64_t>(1, values_per_row));
}

// Rows [b0, b1) x units [j0, j1).
struct Range {
  int64_t b0, b1, j0, j1;
};

template <typename Cell, typename acc_t, int kArgs, typename scalar_t>
void forward_loop(const ForwardPointers<scalar_t> p, Range r) {
  for (int64_t b = r.b0; b < r.b1; ++b) {
#pragma GCC ivdep
    for (int64_t j = r.j0; j < r.j1; ++j) forward_unit<Cell, acc_t, kArgs>(p, b, j);
  }
}

// forward_loop instantiated for the optional arguments present in `p`.
template <typename Cell, typename acc_t, typename scalar_t>
void forward_loop_for(const ForwardPointers<scalar_t>& p, Range r) {
  const int args = (p.b_ih ? kBiasIh : 0) | (p.b_hh ? kBiasHh : 0) | (p.saved ? kSaves : 0);
  switch (args) {
    case 0: return forward_loop<Cell, acc_t, 0>(p, r);
    case kBiasIh: return forward_loop<Cell, acc_t, kBiasIh>(p, r);
    case kBiasHh: return forward_loop<Cell, acc_t, kBiasHh>(p, r);
    case kBiasIh | kBiasHh: return forward_loop<Cell, acc_t, kBiasIh | kBiasHh>(p, r);
    case kSaves: return forward_loop<Cell, acc_t, kSaves>(p, r);
    case kSaves | kBiasIh: return forward_loop<Cell, acc_t, kSaves | kBiasIh>(p, r);
    case kSaves | kBiasHh: return forward_loop<Cell, acc_t, kSaves | kBiasHh>(p, r);
    default: return forward_loop<Cell, acc_t, kSaves | kBiasIh | kBiasHh>(p, r);
  }
}

// The pointwise forward of `p` over one range, on the calling thread.
void forward_range(CellKind kind, at::ScalarType dtype, const ForwardPointers<void>& p, Range r) {
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dtype, "rnn_ext_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto q = typed<scalar_t>(p);
    visit_cell<acc_t>(kind, [&](auto cell) { forward_loop_for<decltype(cell), acc_t>(q, r); });
  });
}

void forward_cpu(CellKind kind, DataType type, const ForwardPointers<void>& p) {
  at::parallel_for(0, p.rows, grain_rows(gates_per_unit(kind) * p.hidden),
                   [&](int64_t b0, int64_t b1) {
                     forward_range(kind, type.dtype, p, {b0, b1, 0, p.hidden});
                   });
}

template <typename Cell, typename acc_t, typename scalar_t>
void backward_loop(const BackwardPointers<scalar_t> p, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
#pragma GCC ivdep
    for (int64_t j = 0; j < p.hidden; ++j) backward_unit<Cell, acc_t>(p, b, j);
  }
}

// The pointwise backward of rows [b0, b1) of `p`, on the calling thread.
void backward_range(CellKind kind, at::ScalarType dtype, const BackwardPointers<void>& p,
                    int64_t b0, int64_t b1) {
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dtype, "rnn_ext_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto q = typed<scalar_t>(p);
    visit_cell<acc_t>(kind, [&](auto cell) { backward_loop<decltype(cell), acc_t>(q, b0, b1); });
  });
}

void backward_cpu(CellKind kind, DataType type, const BackwardPointers<void>& p) {
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, type.dtype, "rnn_ext_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto q = typed<scalar_t>(p);
    visit_cell<acc_t>(kind, [&](auto cell) {
      using Cell = decltype(cell);
      at::parallel_for(0, q.rows, grain_rows(Cell::kGates * q.hidden),
                       [&](int64_t b0, int64_t b1) { backward_loop<Cell, acc_t>(q, b0, b1); });
    });
  });
}

// Row-major view of a MatrixRef, for ATen.
Tensor as_tensor(MatrixRef m, at::ScalarType dtype) {
  return at::from_blob(m.data, {m.rows, m.cols}, {m.stride, 1}, at::TensorOptions(dtype));
}

void gemm_cpu(DataType type, MatrixRef out, MatrixRef a, MatrixRef b, bool transpose_b,
              double beta) {
  if (out.rows == 0 || out.cols == 0) return;
  if (a.cols > 0 && cpu::blas_gemm(type.dtype, out, a, b, transpose_b, beta)) return;
  const Tensor rhs = transpose_b ? as_tensor(b, type.dtype).t() : as_tensor(b, type.dtype);
  Tensor result = as_tensor(out, type.dtype);
  if (beta == 0) {
    at::mm_out(result, as_tensor(a, type.dtype), rhs);
  } else {
    result.addmm_(as_tensor(a, type.dtype), rhs, beta, 1);
  }
}

// ---- fused steps ----

// How a layer's fused steps split the work over threads, each thread with its own part.
enum class StepSplit {
  // No split: each step runs unfused, the whole GEMM, then the pointwise step (each parallel on
  // its own). For a packed sequence's shrinking batch, types without a BLAS, a weight too large
  // for the row split in the backward.
  kUnfused,
  // By rows (forward and backward): batch rows are independent sequences, so each thread runs
  // its `rows_per_part` rows through every step on its own, with no barrier between steps.
  // Where w_hh fits a core's cache.
  kByRows,
  // By units (forward, float32): a thread's units [begin, end) and the G gate rows of w_hh that
  // compute them (rows g*H + [begin, end) for every g), gathered and packed as one
  // [G*units, P] matrix: one GEMM per thread and step writes that block's gates, in a blocked
  // hg layout (see fused_block_step); a barrier ends each step, since the next reads every unit.
  kByUnits,
};

struct CpuStepWeights final : StepWeights {
  Tensor weight;  // [G*H, P], contiguous
  int64_t gates = 0, batch = 0;
  StepSplit split = StepSplit::kUnfused;
  // kByRows: rows per thread, and in float32 the one packed w_hh all threads share (w_hhᵀ for
  // the forward, w_hh for the backward, packed for `rows_per_part` rows); other types call BLAS
  // per part.
  int64_t rows_per_part = 0;
  std::unique_ptr<cpu::PackedWeight> by_rows;
  // kByUnits: each thread's block of units and its packed rows of w_hh.
  struct Block {
    int64_t begin = 0, end = 0;
    std::unique_ptr<cpu::PackedWeight> rows;
  };
  std::vector<Block> blocks;
  // kUnfused backward, float32: w_hh packed for `batch` rows.
  std::unique_ptr<cpu::PackedWeight> backward;
};

// The largest w_hh (bytes) split by rows: every thread reads all of it each step, so it must
// stay in a core's L2 cache (2 MB on the machines this was tuned on) beside the step's data.
constexpr int64_t kRowSplitWeightBytes = int64_t{1} << 20;
// The fewest rows per thread for the row split: fewer make the GEMM bound by reading w_hh.
constexpr int64_t kRowSplitMinRows = 16;

// The row split over `threads` threads, where it pays (see kRowSplitWeightBytes,
// kRowSplitMinRows) and, in float32, its weight packs. Returns whether it was chosen.
bool prepare_row_split(CpuStepWeights& w, StepPass pass, int64_t threads) {
  const int64_t GH = w.weight.size(0), P = w.weight.size(1);
  const bool pays = threads > 1 && w.batch % threads == 0 &&
                    w.batch / threads >= kRowSplitMinRows &&
                    GH * P * w.weight.element_size() <= kRowSplitWeightBytes;
  if (!pays) return false;
  const int64_t rows = w.batch / threads;
  if (w.weight.scalar_type() == at::kFloat) {
    const float* data = w.weight.const_data_ptr<float>();
    w.by_rows = pass == StepPass::kForward
                    ? cpu::PackedWeight::pack(data, GH, P, P, rows, /*transposed=*/true)
                    : cpu::PackedWeight::pack(data, P, GH, P, rows, /*transposed=*/false);
    if (!w.by_rows) return false;
  }
  w.split = StepSplit::kByRows;
  w.rows_per_part = rows;
  return true;
}

// The unit split (float32 forward) over up to `threads` blocks of at least 16 units. Returns
// whether it was chosen (every block's rows packed).
bool prepare_unit_split(CpuStepWeights& w, int64_t threads) {
  const int64_t G = w.gates, H = w.weight.size(0) / G, P = w.weight.size(1);
  const float* data = w.weight.const_data_ptr<float>();
  const int64_t count = std::clamp<int64_t>(threads, 1, std::max<int64_t>(1, H / 16));
  for (int64_t k = 0; k < count; ++k) {
    CpuStepWeights::Block block;
    block.begin = H * k / count;
    block.end = H * (k + 1) / count;
    std::vector<int64_t> gate_rows;  // where each gate's rows of this block start in w_hh
    for (int64_t g = 0; g < G; ++g) gate_rows.push_back(g * H + block.begin);
    block.rows =
        cpu::PackedWeight::pack_slabs(data, gate_rows, block.end - block.begin, P, P, w.batch);
    if (!block.rows) {
      w.blocks.clear();
      return false;
    }
    w.blocks.push_back(std::move(block));
  }
  w.split = StepSplit::kByUnits;
  return true;
}

// Chooses the split of a layer's steps: by rows where it pays, else (float32) by units in the
// forward and a packed weight for the unfused backward, else unfused.
std::unique_ptr<StepWeights> prepare_step_cpu(CellKind kind, StepPass pass, const Tensor& w_hh,
                                              int64_t batch) {
  auto prepared = std::make_unique<CpuStepWeights>();
  CpuStepWeights& w = *prepared;
  w.weight = w_hh.contiguous();
  w.gates = gates_per_unit(kind);
  w.batch = batch;
  const at::ScalarType dtype = w_hh.scalar_type();
  if (batch == 0 || !cpu::blas_supports(dtype)) return prepared;
  const int64_t work = batch * w_hh.size(0) * w_hh.size(1);
  const int64_t threads = work < cpu::kSerialGemmWork ? 1 : at::get_num_threads();
  if (prepare_row_split(w, pass, threads)) return prepared;
  if (dtype != at::kFloat) return prepared;
  if (pass == StepPass::kBackward) {
    const int64_t GH = w_hh.size(0), P = w_hh.size(1);
    w.backward = cpu::PackedWeight::pack(w.weight.const_data_ptr<float>(), P, GH, P, batch,
                                         /*transposed=*/false);
    return prepared;
  }
  prepare_unit_split(w, threads);
  return prepared;
}

// Asks for xg [B, G*H]'s columns g*H + [begin, begin + units) of every row to be brought into
// cache. The fused step issues it before its GEMM, so the loads overlap the GEMM: xg was written
// by the input projection over the whole sequence and has long left the cache, and the pointwise
// step otherwise stalls on it.
void prefetch_gate_columns(const float* xg, int64_t rows, int64_t G, int64_t H, int64_t begin,
                           int64_t units) {
  constexpr int64_t kLine = 64 / sizeof(float);
  for (int64_t b = 0; b < rows; ++b) {
    for (int64_t g = 0; g < G; ++g) {
      const float* run = xg + b * G * H + g * H + begin;
      for (int64_t i = 0; i < units; i += kLine) __builtin_prefetch(run + i, 0, 2);
    }
  }
}

// A step unfused: the whole GEMM, then the pointwise step (each parallel on its own).
void unfused_step(CellKind kind, DataType type, const CpuStepWeights& w, const ForwardStep& step) {
  const ForwardPointers<void>& p = step.p;
  const int64_t GH = w.weight.size(0), P = w.weight.size(1);
  gemm_cpu(type, {const_cast<void*>(p.hg), p.rows, GH, GH},
           {const_cast<void*>(step.h_prev), p.rows, P, P}, matrix_of(w.weight), true, 0);
  forward_cpu(kind, type, p);
}

// Rows [b0, b0 + rows) of a row-major matrix.
MatrixRef part_rows(MatrixRef m, int64_t b0, int64_t rows, DataType type) {
  return {static_cast<char*>(m.data) + b0 * m.stride * c10::elementSize(type.dtype), rows, m.cols,
          m.stride};
}

// A step for rows [b0, b0 + w.rows_per_part) and every unit, on the calling thread.
void fused_rows_step(CellKind kind, DataType type, const CpuStepWeights& w,
                     const ForwardStep& step, int64_t b0) {
  const ForwardPointers<void>& p = step.p;
  const int64_t G = w.gates, H = p.hidden, GH = G * H, P = w.weight.size(1);
  const int64_t rows = w.rows_per_part;
  const MatrixRef hg = part_rows({const_cast<void*>(p.hg), p.rows, GH, GH}, b0, rows, type);
  const MatrixRef h_prev =
      part_rows({const_cast<void*>(step.h_prev), p.rows, P, P}, b0, rows, type);
  if (w.by_rows) {
    prefetch_gate_columns(static_cast<const float*>(p.xg) + b0 * GH, rows, G, H, 0, H);
    w.by_rows->multiply(static_cast<const float*>(h_prev.data), P, static_cast<float*>(hg.data),
                        GH);
  } else {
    gemm_cpu(type, hg, h_prev, matrix_of(w.weight), /*transpose_b=*/true, 0);
  }
  forward_range(kind, type.dtype, p, {b0, b0 + rows, 0, H});
}

// A step for the units of block k, on the calling thread: block k's gates occupy hg columns
// G * begin + [0, G * units) of each row (unit j's gate g at column G * begin + g * units +
// (j - begin)).
void fused_block_step(CellKind kind, DataType type, const CpuStepWeights& w,
                      const ForwardStep& step, int64_t k) {
  const ForwardPointers<void>& p = step.p;
  const auto& block = w.blocks[k];
  const int64_t G = w.gates, H = p.hidden, GH = G * H, P = w.weight.size(1);
  const int64_t units = block.end - block.begin;
  float* hg = static_cast<float*>(const_cast<void*>(p.hg));
  prefetch_gate_columns(static_cast<const float*>(p.xg), p.rows, G, H, block.begin, units);
  block.rows->multiply(static_cast<const float*>(step.h_prev), P, hg + G * block.begin, GH);
  ForwardPointers<void> q = p;
  q.hg = hg + (G - 1) * block.begin;
  q.hg_row = GH;
  q.hg_gate = units;
  forward_range(kind, type.dtype, q, {0, p.rows, block.begin, block.end});
}

// Runs work(part, t) for every part in [0, parts) and step t in [first, last), in one parallel
// region of up to `parts` threads, each with its parts; MKL runs serially inside (each thread
// already has its share). With `barrier_per_step`, all parts finish a step before any starts the
// next; without, a thread runs each of its parts through all the steps. An exception may not
// leave an OpenMP region: the first one thrown stops the work (every thread still passes every
// barrier) and is rethrown here.
template <typename Work>
void run_parts(int64_t parts, int64_t first, int64_t last, bool barrier_per_step,
               const Work& work) {
  std::exception_ptr error;
  std::atomic<bool> failed{false};
  auto guarded = [&](int64_t part, int64_t t) {
    if (failed.load(std::memory_order_relaxed)) return;
    try {
      work(part, t);
    } catch (...) {
#pragma omp critical(rnn_ext_parts_error)
      if (!error) error = std::current_exception();
      failed = true;
    }
  };
#pragma omp parallel num_threads(static_cast<int>(parts))
  {
    const cpu::SerialBlas serial;
    const int64_t team = omp_get_num_threads(), me = omp_get_thread_num();
    if (barrier_per_step) {
      for (int64_t t = first; t < last; ++t) {
        for (int64_t part = me; part < parts; part += team) guarded(part, t);
#pragma omp barrier
      }
    } else {
      for (int64_t part = me; part < parts; part += team) {
        for (int64_t t = first; t < last; ++t) guarded(part, t);
      }
    }
  }
  if (error) std::rethrow_exception(error);
}

// Steps [0, count) in order: each maximal run of steps that `fusable` accepts through
// fused(first, last), the others one at a time through unfused(i).
template <typename Fusable, typename Fused, typename Unfused>
void by_runs(int64_t count, const Fusable& fusable, const Fused& fused, const Unfused& unfused) {
  for (int64_t i = 0; i < count;) {
    if (!fusable(i)) {
      unfused(i++);
      continue;
    }
    int64_t last = i;
    while (last < count && fusable(last)) ++last;
    fused(i, last);
    i = last;
  }
}

// Steps [first, last), all of the batch the weights were prepared for, fused (see
// CpuStepWeights). Split by rows, a part's rows depend only on their own previous step: no
// barriers. Split by units, the next step reads every unit: a barrier per step.
void fused_steps(CellKind kind, DataType type, const CpuStepWeights& w, const ForwardStep* steps,
                 int64_t first, int64_t last) {
  if (w.split == StepSplit::kByRows) {
    return run_parts(w.batch / w.rows_per_part, first, last, false, [&](int64_t part, int64_t t) {
      fused_rows_step(kind, type, w, steps[t], part * w.rows_per_part);
    });
  }
  run_parts(static_cast<int64_t>(w.blocks.size()), first, last, true,
            [&](int64_t k, int64_t t) { fused_block_step(kind, type, w, steps[t], k); });
}

void forward_steps_cpu(CellKind kind, DataType type, const StepWeights& step_weights,
                       const ForwardStep* steps, int64_t count) {
  const auto& w = static_cast<const CpuStepWeights&>(step_weights);
  // The packed weights fit only the batch they were packed for (a packed sequence's later
  // steps shrink it): those steps run unfused.
  by_runs(
      count,
      [&](int64_t i) {
        return w.split != StepSplit::kUnfused && steps[i].p.rows == w.batch;
      },
      [&](int64_t first, int64_t last) { fused_steps(kind, type, w, steps, first, last); },
      [&](int64_t i) { unfused_step(kind, type, w, steps[i]); });
}

// A backward step unfused: the pointwise step, then the whole GEMM (each parallel on its own).
void unfused_backward_step(CellKind kind, DataType type, const CpuStepWeights& w,
                           const BackwardStep& step) {
  backward_cpu(kind, type, step.p);
  if (w.backward && step.dh.rows == w.batch) {
    return w.backward->multiply(static_cast<const float*>(step.dgates.data), step.dgates.stride,
                                static_cast<float*>(step.dh.data), step.dh.stride,
                                static_cast<float>(step.beta));
  }
  gemm_cpu(type, step.dh, step.dgates, matrix_of(w.weight), /*transpose_b=*/false, step.beta);
}

// Backward steps [first, last), all of the batch, split by rows (see CpuStepWeights): each
// thread runs its rows' pointwise step and GEMM through every step, with no barrier.
void fused_backward_steps(CellKind kind, DataType type, const CpuStepWeights& w,
                          const BackwardStep* steps, int64_t first, int64_t last) {
  const int64_t rows = w.rows_per_part;
  run_parts(w.batch / rows, first, last, false, [&](int64_t part, int64_t t) {
    const BackwardStep& step = steps[t];
    const int64_t b0 = part * rows;
    backward_range(kind, type.dtype, step.p, b0, b0 + rows);
    const MatrixRef dh = part_rows(step.dh, b0, rows, type);
    const MatrixRef dgates = part_rows(step.dgates, b0, rows, type);
    if (w.by_rows) {
      w.by_rows->multiply(static_cast<const float*>(dgates.data), dgates.stride,
                          static_cast<float*>(dh.data), dh.stride, static_cast<float>(step.beta));
    } else {
      gemm_cpu(type, dh, dgates, matrix_of(w.weight), /*transpose_b=*/false, step.beta);
    }
  });
}

void backward_steps_cpu(CellKind kind, DataType type, const StepWeights& step_weights,
                        const BackwardStep* steps, int64_t count) {
  const auto& w = static_cast<const CpuStepWeights&>(step_weights);
  by_runs(
      count,
      [&](int64_t i) { return w.split == StepSplit::kByRows && steps[i].p.rows == w.batch; },
      [&](int64_t first, int64_t last) { fused_backward_steps(kind, type, w, steps, first, last); },
      [&](int64_t i) { unfused_backward_step(kind, type, w, steps[i]); });
}

DeviceKernels cpu_kernels() {
  DeviceKernels k;
  k.forward = forward_cpu;
  k.backward = backward_cpu;
  k.gemm = gemm_cpu;
  k.prepare_step = prepare_step_cpu;
  k.forward_steps = forward_steps_cpu;
  k.backward_steps = backward_steps_cpu;
  return k;
}

const bool registered = register_device_kernels(c10::DeviceType::CPU, cpu_kernels());

}  // namespace
}  // namespace rnn_ext
