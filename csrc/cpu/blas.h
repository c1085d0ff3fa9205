// The BLAS inside torch's CPU library (MKL on x86 wheels), called directly: the recurrence runs
// two small GEMMs a step, where ATen's dispatch costs as much as the arithmetic. Every entry
// point is a weak symbol, so a torch built without them still loads rnn_ext; callers then fall
// back to ATen (each function below says how it reports that).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include <c10/core/ScalarType.h>

#include "../kernels.h"

namespace rnn_ext::cpu {

// Products of fewer multiply-adds than this run on the calling thread: waking a second thread
// costs more than it saves. (MKL would otherwise thread any call made outside a parallel region.)
constexpr int64_t kSerialGemmWork = int64_t{1} << 20;

// While one lives (and `active`), MKL runs the calling thread's calls on that thread alone; the
// thread's previous setting returns after. Inside a parallel region every thread already has
// its share of the work: MKL threading a call there only adds synchronisation.
class SerialBlas {
 public:
  explicit SerialBlas(bool active = true);
  ~SerialBlas();
  SerialBlas(const SerialBlas&) = delete;
  SerialBlas& operator=(const SerialBlas&) = delete;

 private:
  bool active_;
  int previous_;
};

// Whether blas_gemm has a routine for `dtype` in this torch build.
bool blas_supports(at::ScalarType dtype);

// out [M, N] = beta * out + a [M, K] @ (transpose_b ? bᵀ : b); row-major with row strides.
// Returns false (and does nothing) where no BLAS routine fits: the caller uses ATen.
bool blas_gemm(at::ScalarType dtype, MatrixRef out, MatrixRef a, MatrixRef b, bool transpose_b,
               double beta);

// A float32 row-major matrix packed once for many products x [M, K] @ B with the same M (MKL's
// packed GEMM: for RNNs, the recurrent weight reused every step). B is wᵀ for w [N, K]
// (`transposed`), else w [K, N] itself.
class PackedWeight {
 public:
  // Null where packed GEMM is unavailable or does not apply (sizes past int).
  static std::unique_ptr<PackedWeight> pack(const float* w, int64_t n, int64_t k, int64_t ldw,
                                            int64_t m, bool transposed);
  // B = wᵀ for the matrix w [S*R, K] made of S slabs of R rows (row stride ldw), slab s
  // starting at row slab_rows[s] of `w`: several row ranges of a weight packed as one.
  static std::unique_ptr<PackedWeight> pack_slabs(const float* w, const std::vector<int64_t>& slab_rows,
                                                  int64_t rows_per_slab, int64_t k, int64_t ldw,
                                                  int64_t m);
  ~PackedWeight();
  PackedWeight(const PackedWeight&) = delete;
  PackedWeight& operator=(const PackedWeight&) = delete;

  // out [m, n] (row stride ldo) = beta * out + x [m, k] (row stride ldx) @ B, for the m it was
  // packed for.
  void multiply(const float* x, int64_t ldx, float* out, int64_t ldo, float beta = 0) const;

 private:
  PackedWeight(float* buffer, size_t bytes, int64_t m, int64_t n, int64_t k)
      : buffer_(buffer), bytes_(bytes), m_(m), n_(n), k_(k) {}
  float* buffer_;
  size_t bytes_;
  int64_t m_, n_, k_;
};

}  // namespace rnn_ext::cpu
