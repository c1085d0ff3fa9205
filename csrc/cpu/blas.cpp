#include "blas.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>


// Fortran BLAS and MKL's packed-GEMM API, as exported by libtorch_cpu.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));

// MKL's CBLAS enums (mkl_cblas.h), for the three packed-GEMM entry points.
enum { kCblasRowMajor = 101, kCblasNoTrans = 111, kCblasTrans = 112, kCblasBMatrix = 162,
       kCblasPacked = 151 };
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha,
                      const float* src, int ld, float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a,
                         int lda, const float* b, int ldb, float beta, float* c, int ldc)
    __attribute__((weak));
// bfloat16 inputs, float32 accumulation and output (MKL_BF16 is a uint16_t).
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                            const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta,
                            float* c, int ldc) __attribute__((weak));
// The C entry point (mkl_service.h maps mkl_set_num_threads_local to it; the lower-case symbol
// is the Fortran one, which takes a pointer).
int MKL_Set_Num_Threads_Local(int threads) __attribute__((weak));
}

namespace rnn_ext::cpu {
namespace {

bool fits_int(std::initializer_list<int64_t> sizes) {
  return std::all_of(sizes.begin(), sizes.end(), [](int64_t s) {
    return s > 0 && s <= std::numeric_limits<int>::max();
  });
}

template <typename scalar_t, typename Routine>
void column_major_gemm(Routine* routine, MatrixRef out, MatrixRef a, MatrixRef b, bool transpose_b,
                       double beta) {
  // Row-major out = a @ op(b) is column-major outᵀ = op(b)ᵀ @ aᵀ.
  const int M = static_cast<int>(a.rows), K = static_cast<int>(a.cols);
  const int N = static_cast<int>(out.cols);
  const int lda = static_cast<int>(a.stride), ldb = static_cast<int>(b.stride);
  const int ldc = static_cast<int>(out.stride);
  const char op_b = transpose_b ? 'T' : 'N', op_a = 'N';
  const scalar_t alpha_v = 1, beta_v = static_cast<scalar_t>(beta);
  routine(&op_b, &op_a, &N, &M, &K, &alpha_v, static_cast<const scalar_t*>(b.data), &ldb,
          static_cast<const scalar_t*>(a.data), &lda, &beta_v, static_cast<scalar_t*>(out.data),
          &ldc);
}

// Packed buffers are allocated per layer call, megabytes each: fresh pages would cost a page
// fault apiece every call. Freed buffers wait here, by size, for the next call of that shape.
class BufferPool {
 public:
  static BufferPool& instance() {
    static BufferPool* pool = new BufferPool();  // never destroyed: buffers may outlive exit
    return *pool;
  }

  float* acquire(size_t bytes) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      const auto it = free_.find(bytes);
      if (it != free_.end()) {
        float* buffer = it->second;
        free_.erase(it);
        cached_ -= bytes;
        return buffer;
      }
    }
    return static_cast<float*>(std::aligned_alloc(64, bytes));
  }

  void release(float* buffer, size_t bytes) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      if (cached_ + bytes <= kMaxCachedBytes) {
        free_.emplace(bytes, buffer);
        cached_ += bytes;
        return;
      }
    }
    std::free(buffer);
  }

 private:
  static constexpr size_t kMaxCachedBytes = size_t{256} << 20;
  std::mutex mutex_;
  std::multimap<size_t, float*> free_;
  size_t cached_ = 0;
};

// out [M, N] (bfloat16) = beta * out + a @ op(b), through a float32 accumulator: MKL's bfloat16
// GEMM (AMX or AVX512-BF16) accumulates and writes float32; each result is rounded once, as
// ATen's bfloat16 matmul does. ATen's call costs tens of microseconds in dispatch at step sizes.
void bf16_gemm(MatrixRef out, MatrixRef a, MatrixRef b, bool transpose_b, double beta) {
  const int64_t M = a.rows, N = out.cols;
  const size_t bytes = (static_cast<size_t>(M * N) * sizeof(float) + 63) / 64 * 64;
  float* acc = BufferPool::instance().acquire(bytes);
  TORCH_CHECK(acc != nullptr, "rnn_ext: out of memory for a ", M, "x", N, " GEMM accumulator");
  auto* c = static_cast<c10::BFloat16*>(out.data);
  if (beta != 0) {
    for (int64_t i = 0; i < M; ++i) {
      for (int64_t j = 0; j < N; ++j) acc[i * N + j] = static_cast<float>(c[i * out.stride + j]);
    }
  }
  cblas_gemm_bf16bf16f32(kCblasRowMajor, kCblasNoTrans, transpose_b ? kCblasTrans : kCblasNoTrans,
                         static_cast<int>(M), static_cast<int>(N), static_cast<int>(a.cols), 1.0f,
                         static_cast<const uint16_t*>(a.data), static_cast<int>(a.stride),
                         static_cast<const uint16_t*>(b.data), static_cast<int>(b.stride),
                         static_cast<float>(beta), acc, static_cast<int>(N));
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < N; ++j) c[i * out.stride + j] = c10::BFloat16(acc[i * N + j]);
  }
  BufferPool::instance().release(acc, bytes);
}

}  // namespace

bool blas_supports(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return sgemm_ != nullptr;
    case at::kDouble: return dgemm_ != nullptr;
    case at::kBFloat16: return cblas_gemm_bf16bf16f32 != nullptr;
    default: return false;
  }
}

bool blas_gemm(at::ScalarType dtype, MatrixRef out, MatrixRef a, MatrixRef b, bool transpose_b,
               double beta) {
  if (!fits_int({a.rows, a.cols, out.cols, a.stride, b.stride, out.stride})) return false;
  const SerialBlas serial(a.rows * a.cols * out.cols < kSerialGemmWork);
  if (dtype == at::kFloat && sgemm_ != nullptr) {
    column_major_gemm<float>(sgemm_, out, a, b, transpose_b, beta);
    return true;
  }
  if (dtype == at::kBFloat16 && cblas_gemm_bf16bf16f32 != nullptr) {
    bf16_gemm(out, a, b, transpose_b, beta);
    return true;
  }
  if (dtype == at::kDouble && dgemm_ != nullptr) {
    column_major_gemm<double>(dgemm_, out, a, b, transpose_b, beta);
    return true;
  }
  return false;
}

SerialBlas::SerialBlas(bool active)
    : active_(active && MKL_Set_Num_Threads_Local != nullptr),
      previous_(active_ ? MKL_Set_Num_Threads_Local(1) : 0) {}

SerialBlas::~SerialBlas() {
  if (active_) MKL_Set_Num_Threads_Local(previous_);  // 0: back to the global setting
}

std::unique_ptr<PackedWeight> PackedWeight::pack(const float* w, int64_t n, int64_t k,
                                                 int64_t ldw, int64_t m, bool transposed) {
  if (cblas_sgemm_pack_get_size == nullptr || cblas_sgemm_pack == nullptr ||
      cblas_sgemm_compute == nullptr || !fits_int({m, n, k, ldw})) {
    return nullptr;
  }
  const size_t bytes = (cblas_sgemm_pack_get_size(kCblasBMatrix, m, n, k) + 63) / 64 * 64;
  float* buffer = BufferPool::instance().acquire(bytes);
  if (buffer == nullptr) return nullptr;
  // A copy, bound by memory: below a few MB a second thread saves less than waking it costs.
  const SerialBlas serial(n * k < kSerialGemmWork);
  cblas_sgemm_pack(kCblasRowMajor, kCblasBMatrix, transposed ? kCblasTrans : kCblasNoTrans, m, n,
                   k, 1.0f, w, ldw, buffer);
  return std::unique_ptr<PackedWeight>(new PackedWeight(buffer, bytes, m, n, k));
}

std::unique_ptr<PackedWeight> PackedWeight::pack_slabs(const float* w,
                                                       const std::vector<int64_t>& slab_rows,
                                                       int64_t rows_per_slab, int64_t k,
                                                       int64_t ldw, int64_t m) {
  const int64_t n = static_cast<int64_t>(slab_rows.size()) * rows_per_slab;
  if (n == 0 || k == 0) return nullptr;
  bool contiguous = true;  // slab s starts where slab s - 1 ends: w's rows as they are
  for (size_t s = 1; s < slab_rows.size(); ++s) {
    contiguous = contiguous && slab_rows[s] == slab_rows[s - 1] + rows_per_slab;
  }
  if (contiguous) return pack(w + slab_rows[0] * ldw, n, k, ldw, m, /*transposed=*/true);
  // The slabs gathered into one [n, k] matrix first, in a pooled buffer (no page faults).
  const size_t bytes = static_cast<size_t>(n * k) * sizeof(float);
  float* gathered = BufferPool::instance().acquire((bytes + 63) / 64 * 64);
  if (gathered == nullptr) return nullptr;
  for (size_t s = 0; s < slab_rows.size(); ++s) {
    for (int64_t r = 0; r < rows_per_slab; ++r) {
      std::memcpy(gathered + (s * rows_per_slab + r) * k, w + (slab_rows[s] + r) * ldw,
                  static_cast<size_t>(k) * sizeof(float));
    }
  }
  auto packed = pack(gathered, n, k, k, m, /*transposed=*/true);
  BufferPool::instance().release(gathered, (bytes + 63) / 64 * 64);
  return packed;
}

PackedWeight::~PackedWeight() { BufferPool::instance().release(buffer_, bytes_); }

void PackedWeight::multiply(const float* x, int64_t ldx, float* out, int64_t ldo,
                            float beta) const {
  const SerialBlas serial(m_ * n_ * k_ < kSerialGemmWork);
  cblas_sgemm_compute(kCblasRowMajor, kCblasNoTrans, kCblasPacked, m_, n_, k_, x, ldx, buffer_,
                      n_, beta, out, ldo);
}

}  // namespace rnn_ext::cpu
