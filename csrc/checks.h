// Argument checks shared by every op: a wrong call raises a clear error before any kernel runs.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace rnn_ext {

// Checks tensors against the shape each argument must have and against one reference tensor's
// dtype and device. A size of -1 accepts any extent.
class ArgChecker {
 public:
  ArgChecker(const char* op, const at::Tensor& like) : op_(op), like_(like) {
    TORCH_CHECK(like.defined(), op_, ": got an undefined tensor");
    TORCH_CHECK(at::isFloatingType(like.scalar_type()), op_,
                ": expected a floating-point tensor, got ", like.scalar_type());
  }

  void operator()(const at::Tensor& t, const char* name, std::vector<int64_t> sizes) const {
    TORCH_CHECK(t.defined(), op_, ": ", name, " is undefined");
    TORCH_CHECK(t.scalar_type() == like_.scalar_type(), op_, ": ", name, " has dtype ",
                t.scalar_type(), " but expected ", like_.scalar_type());
    TORCH_CHECK(t.device() == like_.device(), op_, ": ", name, " is on ", t.device(),
                " but expected ", like_.device());
    bool ok = t.dim() == static_cast<int64_t>(sizes.size());
    for (size_t d = 0; ok && d < sizes.size(); ++d) ok = sizes[d] < 0 || t.size(d) == sizes[d];
    TORCH_CHECK(ok, op_, ": ", name, " must have shape ", shape_string(sizes), ", got ",
                t.sizes());
  }

  void operator()(const std::optional<at::Tensor>& t, const char* name,
                  std::vector<int64_t> sizes) const {
    if (t.has_value() && t->defined()) (*this)(*t, name, std::move(sizes));
  }

  const char* op() const { return op_; }

 private:
  static std::string shape_string(const std::vector<int64_t>& sizes) {
    std::string s = "[";
    for (size_t d = 0; d < sizes.size(); ++d) {
      s += (d ? ", " : "") + (sizes[d] < 0 ? std::string("*") : std::to_string(sizes[d]));
    }
    return s + "]";
  }

  const char* op_;
  const at::Tensor& like_;
};

// The number of units H from a [*, G*H] gate tensor.
inline int64_t units_of(const char* op, const at::Tensor& gates, int64_t gates_per_unit) {
  TORCH_CHECK(gates.dim() == 2, op, ": gate pre-activations must be 2-D [B, ", gates_per_unit,
              "*H], got ", gates.dim(), "-D");
  TORCH_CHECK(gates.size(1) % gates_per_unit == 0 && gates.size(1) > 0, op,
              ": gate pre-activations must have ", gates_per_unit, "*H columns, got ",
              gates.size(1));
  return gates.size(1) / gates_per_unit;
}

// Checks the arguments of a whole cell step of G gates per unit (as *_cell_inference and the
// differentiable cell ops take them): input [B, I], hx [B, H], w_ih [G*H, I], w_hh [G*H, H].
// Returns H. The biases and cx are checked by the pointwise step.
inline int64_t check_cell_step(const char* op, int64_t G, const at::Tensor& input,
                               const at::Tensor& hx, const at::Tensor& w_ih,
                               const at::Tensor& w_hh) {
  const ArgChecker check(op, input);
  check(input, "input", {-1, -1});
  check(w_hh, "w_hh", {-1, -1});
  const int64_t B = input.size(0), H = w_hh.size(1);
  TORCH_CHECK(w_hh.size(0) == G * H, op, ": w_hh must be [", G, "*H, H], got ", w_hh.sizes());
  check(w_ih, "w_ih", {G * H, input.size(1)});
  check(hx, "hx", {B, H});
  return H;
}

inline at::Tensor optional_contiguous(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}

}  // namespace rnn_ext
