// Per-element gate math of the four cells, forward and backward, written once for CPU and CUDA.
//
// A "unit" is one hidden unit j of one batch row b. Its G gate pre-activations are read from
// row b at columns g*H + j (torch.nn's gate order), split into an input side `x[g]`
// (W_ih x + b_ih) and a hidden side `h[g]` (W_hh h + b_hh); only the GRU needs them apart.
// The forward stores S values per unit in `saved` (the workspace the backward reads).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define RNN_EXT_HD __host__ __device__ __forceinline__
#define RNN_EXT_UNROLL _Pragma("unroll")
#else
// Forced inline: the CPU loops vectorise only once every call in them is inlined.
#define RNN_EXT_HD inline __attribute__((always_inline))
#define RNN_EXT_UNROLL _Pragma("GCC unroll 8")
#endif

namespace rnn_ext {

// exp for float on the host: branch-free so that the CPU loops vectorise (libm's expf does not).
// Range reduction exp(x) = 2^n e^r with |r| <= ln2/2 and Cephes' degree-6 polynomial: ~1 ulp.
// NaN propagates; +-inf saturate to the largest / smallest normal result.
inline __attribute__((always_inline)) float exp_vectorizable(float x) {
  x = x > 88.02969193f ? 88.02969193f : x;    // 127 ln2: 2^n stays a finite float
  x = x < -87.33654475f ? -87.33654475f : x;  // -126 ln2: the smallest normal
  // n = round(x / ln2) by the 1.5 * 2^23 trick (std::floor blocks gcc's vectoriser). The sum's
  // low mantissa bits hold n as an integer: reading it there needs no float-to-int conversion,
  // which is undefined for NaN and, guarded by a select, made gcc split the loop into masked
  // paths (twice the instructions).
  constexpr float kRound = 12582912.0f;
  constexpr int32_t kRoundBits = 0x4B400000;
  const float shifted = x * 1.44269504088896341f + kRound;
  const float n = shifted - kRound;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t shifted_bits;
  std::memcpy(&shifted_bits, &shifted, sizeof(shifted_bits));
  // 2^n as a float: exponent field n + 127 (NaN gives junk here; p is NaN and carries it)
  const uint32_t bits = static_cast<uint32_t>(shifted_bits - kRoundBits + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

RNN_EXT_HD float exp_fn(float x) {
#if defined(__CUDA_ARCH__)
  return ::expf(x);
#else
  return exp_vectorizable(x);
#endif
}
RNN_EXT_HD double exp_fn(double x) { return ::exp(x); }

RNN_EXT_HD float tanh_fn(float x) {
#if defined(__CUDA_ARCH__)
  return ::tanhf(x);
#else
  // 1 - 2/(1+e^{2x}): saturates cleanly at +-inf; absolute error within a few float ulps.
  return 1.0f - 2.0f / (1.0f + exp_vectorizable(2.0f * x));
#endif
}
RNN_EXT_HD double tanh_fn(double x) { return ::tanh(x); }

template <typename T>
RNN_EXT_HD T sigmoid_fn(T x) {
  return T(1) / (T(1) + exp_fn(-x));
}

// ---------------------------------------------------------------------------------------------
// Each cell: G gates per unit, S saved values per unit, whether its hidden-side pre-activations
// need a gradient of their own (GRU) or share the input side's (RNN, LSTM), whether it reads
// h_prev in the pointwise step (GRU), and whether it has a cell state (LSTM).
//   forward(x[G], h[G], h_prev, c_prev) -> h_new, c_new, saved[S]
//   backward(dh_new, dc_new, saved[S]) -> dx[G], dh[G] (GRU), dh_prev (direct path), dc_prev
// ---------------------------------------------------------------------------------------------

// h' = act(x + h). Saves h' (the layer's output doubles as its workspace).
template <typename T, bool kRelu>
struct RnnCellMath {
  static constexpr int kGates = 1;
  static constexpr int kSaved = 1;
  static constexpr bool kSeparateHiddenGrad = false;
  static constexpr bool kReadsPrevHidden = false;
  static constexpr bool kHasCellState = false;

  RNN_EXT_HD static void forward(const T* x, const T* h, T /*h_prev*/, T /*c_prev*/, T& h_new,
                                 T& /*c_new*/, T* saved) {
    const T pre = x[0] + h[0];
    // relu written so that NaN passes through, as torch.relu does
    h_new = kRelu ? (pre < T(0) ? T(0) : pre) : tanh_fn(pre);
    saved[0] = h_new;
  }

  RNN_EXT_HD static void backward(T dh_new, T /*dc_new*/, const T* saved, T* dx, T* /*dh*/,
                                  T& dh_prev, T& /*dc_prev*/) {
    const T y = saved[0];
    // relu: zero where y <= 0, so a NaN output passes the gradient on, as torch's relu does
    dx[0] = kRelu ? (y <= T(0) ? T(0) : dh_new) : dh_new * (T(1) - y * y);
    dh_prev = T(0);
  }
};

// Gates i, f, g, o. c' = f c + i g, h' = o tanh(c'). Saves i, f, g, o (activated) and c.
template <typename T>
struct LstmCellMath {
  static constexpr int kGates = 4;
  static constexpr int kSaved = 5;
  static constexpr bool kSeparateHiddenGrad = false;
  static constexpr bool kReadsPrevHidden = false;
  static constexpr bool kHasCellState = true;

  RNN_EXT_HD static void forward(const T* x, const T* h, T /*h_prev*/, T c_prev, T& h_new,
                                 T& c_new, T* saved) {
    const T i = sigmoid_fn(x[0] + h[0]);
    const T f = sigmoid_fn(x[1] + h[1]);
    const T g = tanh_fn(x[2] + h[2]);
    const T o = sigmoid_fn(x[3] + h[3]);
    c_new = f * c_prev + i * g;
    h_new = o * tanh_fn(c_new);
    saved[0] = i;
    saved[1] = f;
    saved[2] = g;
    saved[3] = o;
    saved[4] = c_prev;
  }

  RNN_EXT_HD static void backward(T dh_new, T dc_new, const T* saved, T* dx, T* /*dh*/,
                                  T& dh_prev, T& dc_prev) {
    const T i = saved[0], f = saved[1], g = saved[2], o = saved[3], c_prev = saved[4];
    const T tanh_c = tanh_fn(f * c_prev + i * g);  // recomputed: cheaper than storing c'
    const T dc = dc_new + dh_new * o * (T(1) - tanh_c * tanh_c);
    dx[0] = dc * g * i * (T(1) - i);
    dx[1] = dc * c_prev * f * (T(1) - f);
    dx[2] = dc * i * (T(1) - g * g);
    dx[3] = dh_new * tanh_c * o * (T(1) - o);
    dc_prev = dc * f;
    dh_prev = T(0);
  }
};

// Gates r, z, n. n = tanh(x_n + r (W_hn h + b_hn)), h' = n + z (h - n).
// Saves r, z, n, the hidden-side n pre-activation, and h.
template <typename T>
struct GruCellMath {
  static constexpr int kGates = 3;
  static constexpr int kSaved = 5;
  static constexpr bool kSeparateHiddenGrad = true;
  static constexpr bool kReadsPrevHidden = true;
  static constexpr bool kHasCellState = false;

  RNN_EXT_HD static void forward(const T* x, const T* h, T h_prev, T /*c_prev*/, T& h_new,
                                 T& /*c_new*/, T* saved) {
    const T r = sigmoid_fn(x[0] + h[0]);
    const T z = sigmoid_fn(x[1] + h[1]);
    const T n = tanh_fn(x[2] + r * h[2]);
    h_new = n + z * (h_prev - n);
    saved[0] = r;
    saved[1] = z;
    saved[2] = n;
    saved[3] = h[2];
    saved[4] = h_prev;
  }

  RNN_EXT_HD static void backward(T dh_new, T /*dc_new*/, const T* saved, T* dx, T* dh,
                                  T& dh_prev, T& /*dc_prev*/) {
    const T r = saved[0], z = saved[1], n = saved[2], hn = saved[3], h_prev = saved[4];
    const T dn = dh_new * (T(1) - z) * (T(1) - n * n);
    const T dr = dn * hn * r * (T(1) - r);
    const T dz = dh_new * (h_prev - n) * z * (T(1) - z);
    dx[0] = dr;
    dx[1] = dz;
    dx[2] = dn;
    dh[0] = dr;
    dh[1] = dz;
    dh[2] = dn * r;
    dh_prev = dh_new * z;
  }
};

// ---------------------------------------------------------------------------------------------
// One unit's load -> math -> store, shared by the CPU loop and the CUDA kernel.
// Row-major, contiguous: row b of a [B, K*H] tensor starts at b*K*H. Pointers a cell does not
// use may be null (see each field); biases and `saved` are optional for every cell.
// Outputs may alias inputs of the same shape (in-place state update): each unit reads all of
// its inputs before it writes.
// ---------------------------------------------------------------------------------------------

// scalar_t = void gives the type-erased form that device-agnostic code passes around.
template <typename scalar_t>
struct ForwardPointers {
  const scalar_t* xg = nullptr;      // [B, G*H] input-side pre-activations
  const scalar_t* hg = nullptr;      // [B, G*H] hidden-side pre-activations
  const scalar_t* b_ih = nullptr;    // [G*H] or null
  const scalar_t* b_hh = nullptr;    // [G*H] or null
  const scalar_t* h_prev = nullptr;  // [B, H] or null (read by the GRU only)
  const scalar_t* c_prev = nullptr;  // [B, H] or null (read by the LSTM only)
  scalar_t* h_new = nullptr;         // [B, H]
  scalar_t* c_new = nullptr;         // [B, H] or null (LSTM only)
  scalar_t* saved = nullptr;         // [B, S*H] or null (inference)
  int64_t rows = 0;                  // B
  int64_t hidden = 0;                // H
  // hg's layout: element (b, g, j) at hg[b * hg_row + g * hg_gate + j]. 0 means the standard
  // [B, G*H] (G*H, H); the CPU's fused step passes its per-thread blocked layout.
  int64_t hg_row = 0, hg_gate = 0;
};

template <typename scalar_t>
struct BackwardPointers {
  const scalar_t* grad_h_new = nullptr;  // [B, H]
  // [B, H] or null: a second gradient of h_new, added to the first
  const scalar_t* grad_h_add = nullptr;
  const scalar_t* grad_c_new = nullptr;  // [B, H] or null (LSTM only)
  const scalar_t* saved = nullptr;       // [B, S*H]
  scalar_t* grad_xg = nullptr;           // [B, G*H]
  scalar_t* grad_hg = nullptr;           // [B, G*H] or null (GRU only)
  // [B, H] or null (GRU only: h_prev's direct path into h_new)
  scalar_t* grad_h_prev = nullptr;
  scalar_t* grad_c_prev = nullptr;       // [B, H] or null (LSTM only)
  int64_t rows = 0;                      // B
  int64_t hidden = 0;                    // H
};

// Which optional forward arguments are present: known at compile time (the CPU instantiates
// every combination, so its loops have no branches and vectorise), or read from the pointers
// at run time (CUDA, where a uniform branch costs nothing).
enum ForwardArgs : int {
  kBiasIh = 1,
  kBiasHh = 2,
  kSaves = 4,
  kArgsAtRunTime = 8,
};

template <typename Cell, typename acc_t, int kArgs = kArgsAtRunTime, typename scalar_t>
RNN_EXT_HD void forward_unit(const ForwardPointers<scalar_t>& p, int64_t b, int64_t j) {
  constexpr int G = Cell::kGates;
  constexpr int S = Cell::kSaved;
  constexpr bool kRunTime = (kArgs & kArgsAtRunTime) != 0;
  const bool has_b_ih = kRunTime ? p.b_ih != nullptr : (kArgs & kBiasIh) != 0;
  const bool has_b_hh = kRunTime ? p.b_hh != nullptr : (kArgs & kBiasHh) != 0;
  const bool saves = kRunTime ? p.saved != nullptr : (kArgs & kSaves) != 0;
  const int64_t H = p.hidden;
  const int64_t row = b * G * H + j;
  const int64_t hg_row = p.hg_row ? p.hg_row : G * H, hg_gate = p.hg_gate ? p.hg_gate : H;
  acc_t x[G], h[G], saved[S];
  RNN_EXT_UNROLL
  for (int g = 0; g < G; ++g) {
    x[g] = static_cast<acc_t>(p.xg[row + g * H]);
    h[g] = static_cast<acc_t>(p.hg[b * hg_row + g * hg_gate + j]);
    if (has_b_ih) x[g] += static_cast<acc_t>(p.b_ih[g * H + j]);
    if (has_b_hh) h[g] += static_cast<acc_t>(p.b_hh[g * H + j]);
  }
  const int64_t unit = b * H + j;
  const acc_t h_prev = Cell::kReadsPrevHidden ? static_cast<acc_t>(p.h_prev[unit]) : acc_t(0);
  const acc_t c_prev = Cell::kHasCellState ? static_cast<acc_t>(p.c_prev[unit]) : acc_t(0);
  acc_t h_new, c_new = acc_t(0);
  Cell::forward(x, h, h_prev, c_prev, h_new, c_new, saved);
  p.h_new[unit] = static_cast<scalar_t>(h_new);
  if (Cell::kHasCellState) p.c_new[unit] = static_cast<scalar_t>(c_new);
  if (saves) {
    RNN_EXT_UNROLL
    for (int s = 0; s < S; ++s) p.saved[b * S * H + s * H + j] = static_cast<scalar_t>(saved[s]);
  }
}

template <typename Cell, typename acc_t, typename scalar_t>
RNN_EXT_HD void backward_unit(const BackwardPointers<scalar_t>& p, int64_t b, int64_t j) {
  constexpr int G = Cell::kGates;
  constexpr int S = Cell::kSaved;
  const int64_t H = p.hidden;
  const int64_t unit = b * H + j;
  acc_t saved[S], dx[G], dh[G];
RNN_EXT_UNROLL
  for (int s = 0; s < S; ++s) saved[s] = static_cast<acc_t>(p.saved[b * S * H + s * H + j]);
  acc_t dh_new = static_cast<acc_t>(p.grad_h_new[unit]);
  if (p.grad_h_add) dh_new += static_cast<acc_t>(p.grad_h_add[unit]);
  const acc_t dc_new = Cell::kHasCellState ? static_cast<acc_t>(p.grad_c_new[unit]) : acc_t(0);
  acc_t dh_prev = acc_t(0), dc_prev = acc_t(0);
  Cell::backward(dh_new, dc_new, saved, dx, dh, dh_prev, dc_prev);
  const int64_t row = b * G * H + j;
RNN_EXT_UNROLL
  for (int g = 0; g < G; ++g) {
    p.grad_xg[row + g * H] = static_cast<scalar_t>(dx[g]);
    if (Cell::kSeparateHiddenGrad) p.grad_hg[row + g * H] = static_cast<scalar_t>(dh[g]);
  }
  if (Cell::kSeparateHiddenGrad) p.grad_h_prev[unit] = static_cast<scalar_t>(dh_prev);
  if (Cell::kHasCellState) p.grad_c_prev[unit] = static_cast<scalar_t>(dc_prev);
}

}  // namespace rnn_ext
