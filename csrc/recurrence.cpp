// The recurrence ops (*_recurrence, *_recurrence_backward) and the layer inference ops
// (*_layer_inference): one direction of one layer over a whole sequence, in C++.
//
// Sequences are time-major and packed: step t owns rows [offset[t], offset[t] + batch[t]) of
// every [N, *] tensor and holds the first batch[t] sequences (longest first), as in
// torch.nn.utils.rnn.PackedSequence. A padded [T, B] input is the case batch[t] = B.
//
// Forward, per step: hg = h_prev @ W_hhᵀ (one GEMM into a preallocated buffer) and one pointwise
// kernel, fused per device (kernels.h: forward_steps), write y[t] directly; h_prev is the
// previous step's rows of y (a contiguous prefix: sequences are sorted longest first), so no
// state is copied. c is updated in place; rows past bs keep their values. Backward runs the
// steps in the opposite order, dh (and dc) in place; after the loop, dW_hh = Σ_t dhg[t]ᵀ h_prev[t]
// is GEMMs over all N rows (recurrent_weight_grad).
#include <algorithm>
#include <functional>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/DeviceGuard.h>

#include "checks.h"
#include "ops.h"
#include "kernels.h"

namespace rnn_ext {
namespace {

struct Steps {
  std::vector<int64_t> batch;   // [T] sequences active at step t, non-increasing
  std::vector<int64_t> offset;  // [T] first row of step t
  int64_t count() const { return static_cast<int64_t>(batch.size()); }
  // The step that runs i-th in the forward direction's order.
  int64_t forward_order(int64_t i, bool reverse) const { return reverse ? count() - 1 - i : i; }
};

// batch_sizes: [T] int64 on the CPU, as in PackedSequence. `rows` is N, `batch` is B.
Steps read_steps(const char* op, const Tensor& batch_sizes, int64_t rows, int64_t batch) {
  TORCH_CHECK(batch_sizes.dim() == 1 && batch_sizes.scalar_type() == at::kLong &&
                  batch_sizes.device().is_cpu(),
              op, ": batch_sizes must be a 1-D int64 CPU tensor, got ", batch_sizes.dim(),
              "-D ", batch_sizes.scalar_type(), " on ", batch_sizes.device());
  TORCH_CHECK(batch_sizes.numel() > 0, op, ": the sequence must have at least one step");
  const Tensor bs = batch_sizes.contiguous();
  const int64_t* p = bs.const_data_ptr<int64_t>();
  TORCH_CHECK(p[0] == batch, op, ": batch_sizes[0] is ", p[0], " but h0 holds ", batch,
              " sequences");
  Steps steps;
  int64_t offset = 0;
  for (int64_t t = 0; t < bs.numel(); ++t) {
    TORCH_CHECK(p[t] >= 0 && p[t] <= (t ? p[t - 1] : batch), op,
                ": batch_sizes must be non-increasing and non-negative, got ", p[t],
                " at step ", t);
    steps.batch.push_back(p[t]);
    steps.offset.push_back(offset);
    offset += p[t];
  }
  TORCH_CHECK(offset == rows, op, ": batch_sizes sum to ", offset, " but the sequence has ", rows,
              " rows");
  return steps;
}

// Shapes every layer op shares, read from w_hh [G*H, P] and h0 [B, P].
struct LayerShape {
  int64_t gates, hidden, out, batch;  // G, H, P (H, or proj_size), B
};

LayerShape check_layer_weights(const ArgChecker& check, CellKind kind, const Tensor& w_hh,
                               const OptTensor& b_hh, const OptTensor& w_hr, const Tensor& h0) {
  const int64_t G = gates_per_unit(kind);
  check(h0, "h0", {-1, -1});
  check(w_hh, "w_hh", {-1, h0.size(1)});
  TORCH_CHECK(w_hh.size(0) % G == 0 && w_hh.size(0) > 0, check.op(), ": w_hh must have ", G,
              "*H rows, got ", w_hh.size(0));
  const LayerShape s{G, w_hh.size(0) / G, h0.size(1), h0.size(0)};
  check(b_hh, "b_hh", {G * s.hidden});
  if (w_hr.has_value() && w_hr->defined()) {
    check(*w_hr, "w_hr", {s.out, s.hidden});
  } else {
    TORCH_CHECK(s.out == s.hidden, check.op(), ": h0 must have ", s.hidden, " columns, got ",
                s.out);
  }
  return s;
}

// [B, P]: each sequence's last output (its state after the last step it is active in).
Tensor final_states(const Tensor& y, const Tensor& h0, const Steps& steps, bool reverse) {
  Tensor h_n = h0.clone();  // B = 0 or a sequence with no steps keeps h0
  for (int64_t i = 0; i < steps.count(); ++i) {
    const int64_t t = steps.forward_order(i, reverse);
    const int64_t next = i + 1 < steps.count() ? steps.batch[steps.forward_order(i + 1, reverse)] : 0;
    const int64_t bs = steps.batch[t];
    if (next < bs) {  // rows [next, bs) end at this step
      h_n.narrow(0, next, bs - next).copy_(y.narrow(0, steps.offset[t] + next, bs - next));
    }
  }
  return h_n;
}

// Steps waiting to run in one device call (kernels.h: forward_steps / backward_steps, which a
// device may run in one parallel region): the recurrence queues them until it needs host work
// between two steps, and at the end.
template <typename Step>
class StepQueue {
 public:
  explicit StepQueue(std::function<void(const Step*, int64_t)> run_steps)
      : run_steps_(std::move(run_steps)) {}
  void push(const Step& step) { steps_.push_back(step); }
  void run() {
    if (steps_.empty()) return;
    run_steps_(steps_.data(), static_cast<int64_t>(steps_.size()));
    steps_.clear();
  }

 private:
  std::function<void(const Step*, int64_t)> run_steps_;
  std::vector<Step> steps_;
};

// The input side of the steps' gate pre-activations, xg [N, G*H]. The recurrence ops
// take it whole (autograd's F.linear computed it). The inference ops compute it here from
// x [N, I] as x @ w_ihᵀ, a chunk of consecutive steps at a time, into one reused buffer of at
// most kChunkBytes (or one step's rows). A long sequence's xg allocated whole is page-faulted in
// on every call (an LSTM at T=100, B=64, H=512: 52 MB, a tenth of the layer's time on the CPU);
// a chunk's buffer is reused, and stays in cache from its GEMM to its steps.
class InputGates {
 public:
  static constexpr int64_t kChunkBytes = int64_t{16} << 20;

  explicit InputGates(const Tensor& xg) : xg_(xg.contiguous()), lo_(0), hi_(xg_.size(0)) {}
  // x: [N, I]; w_ih: [G*H, I]
  InputGates(const Tensor& x, const Tensor& w_ih) : x_(x.contiguous()), w_ih_(w_ih.contiguous()) {}

  // Whether rows [row, row + rows) of xg are at hand.
  bool holds(int64_t row, int64_t rows) const { return row >= lo_ && row + rows <= hi_; }

  // Projects the chunk of steps that starts at the i-th step to run: every following step whose
  // rows still fit the budget (their rows are contiguous: steps run in row order, or in reverse).
  void project(const Steps& steps, int64_t i, bool reverse) {
    const int64_t row_bytes = w_ih_.size(0) * x_.element_size();
    const int64_t budget = std::max<int64_t>(1, kChunkBytes / row_bytes);
    int64_t t = steps.forward_order(i, reverse);
    lo_ = steps.offset[t];
    hi_ = lo_ + steps.batch[t];
    for (int64_t k = i + 1; k < steps.count(); ++k) {
      t = steps.forward_order(k, reverse);
      if (hi_ - lo_ + steps.batch[t] > budget) break;
      lo_ = std::min(lo_, steps.offset[t]);
      hi_ = std::max(hi_, steps.offset[t] + steps.batch[t]);
    }
    if (!xg_.defined() || xg_.size(0) < hi_ - lo_) {
      xg_ = at::empty({std::min(std::max(budget, hi_ - lo_), x_.size(0)), w_ih_.size(0)},
                      x_.options());
    }
    // ATen's GEMM, as F.linear's: for bfloat16 on the CPU it beats the BLAS call of the steps
    // (kernels.gemm), which must repack w_ih on every call.
    Tensor chunk = xg_.narrow(0, 0, hi_ - lo_);
    at::mm_out(chunk, x_.narrow(0, lo_, hi_ - lo_), w_ih_.t());
  }

  // Row `row` of xg (held).
  const void* row(int64_t row) const { return row_pointer(xg_, row - lo_); }

 private:
  Tensor x_, w_ih_;  // defined when projecting here
  Tensor xg_;        // rows [lo_, hi_) of xg
  int64_t lo_ = 0, hi_ = 0;
};

// What one layer call computes from: xg, or x and w_ih where the op projects x itself.
struct LayerForwardArgs {
  const char* op = nullptr;  // the op's name, for errors
  CellKind kind = CellKind::kLstm;
  Tensor xg;         // [N, G*H] input-side pre-activations (the recurrence ops), or
  Tensor x, w_ih;    // [N, I] and [G*H, I]: xg = x @ w_ihᵀ, computed here (the inference ops)
  OptTensor b_ih;    // [G*H], added by the pointwise step
  Tensor w_hh;       // [G*H, P]
  OptTensor b_hh;    // [G*H]
  OptTensor w_hr;    // [P, H] (LSTM with projection)
  Tensor h0;         // [B, P]
  Tensor c0;         // [B, H] (LSTM)
  Tensor batch_sizes;
  bool reverse = false;
  bool save_workspace = false;  // write the workspace the backward reads (LSTM, GRU)
};

struct LayerForward {
  Tensor y;      // [N, P]
  Tensor h_n;    // [B, P]
  Tensor c_n;    // [B, H] (LSTM)
  Tensor saved;  // [N, S*H], or [0, S*H] when not saved (the RNN's workspace is y)
};

// The forward of one layer.
LayerForward run_layer_forward(const LayerForwardArgs& a) {
  const char* op = a.op;
  const CellKind kind = a.kind;
  const bool projects = a.x.defined();
  const Tensor& input = projects ? a.x : a.xg;
  const Tensor &w_ih = a.w_ih, &w_hh = a.w_hh, &h0 = a.h0, &c0 = a.c0;
  const OptTensor &b_ih = a.b_ih, &b_hh = a.b_hh, &w_hr = a.w_hr;
  const bool reverse = a.reverse;
  const ArgChecker check(op, input);
  const LayerShape s = check_layer_weights(check, kind, w_hh, b_hh, w_hr, h0);
  const int64_t GH = s.gates * s.hidden;
  if (projects) {
    check(input, "x", {-1, -1});
    check(w_ih, "w_ih", {GH, input.size(1)});  // raises on an undefined w_ih too
  } else {
    check(input, "xg", {-1, GH});
  }
  check(b_ih, "b_ih", {GH});
  const bool lstm = kind == CellKind::kLstm;
  if (lstm) check(c0, "c0", {s.batch, s.hidden});
  const int64_t N = input.size(0);
  const Steps steps = read_steps(op, a.batch_sizes, N, s.batch);
  const c10::DeviceGuard guard(input.device());
  // The op is its own autograd boundary: the ATen calls inside it record no graph.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto& kernels = device_kernels(input.device().type());
  const auto opts = input.options();
  const bool proj = w_hr.has_value() && w_hr->defined();

  InputGates gates = projects ? InputGates(input, w_ih) : InputGates(input);
  const Tensor bias_ih = optional_contiguous(b_ih);
  const Tensor h_init = h0.contiguous();
  const Tensor w = w_hh.contiguous();
  const Tensor w_proj = proj ? w_hr->contiguous() : Tensor();
  const Tensor bias = optional_contiguous(b_hh);
  const bool saves = a.save_workspace && has_workspace(kind);

  LayerForward out;
  out.y = at::empty({N, s.out}, opts);
  if (lstm) out.c_n = c0.clone(at::MemoryFormat::Contiguous);  // the running c, in place
  out.saved = at::empty({saves ? N : 0, saved_per_unit(kind) * s.hidden}, opts);
  const Tensor hg = at::empty({s.batch, s.gates * s.hidden}, opts);
  const Tensor r = proj ? at::empty({s.batch, s.hidden}, opts) : Tensor();
  Tensor joined;  // [B, P] for a step whose batch outgrows the previous one (packed, reverse)
  const auto step_weights = kernels.prepare_step(kind, StepPass::kForward, w, s.batch);

  const DataType type = data_type_of(input);
  // Host work between steps (joining a start state, the projections) runs the queue first.
  StepQueue<ForwardStep> queued([&](const ForwardStep* queue, int64_t count) {
    kernels.forward_steps(kind, type, *step_weights, queue, count);
  });
  for (int64_t i = 0; i < steps.count(); ++i) {
    const int64_t t = steps.forward_order(i, reverse);
    const int64_t bs = steps.batch[t], off = steps.offset[t];
    if (bs == 0) continue;
    // The state the step starts from: the previous step's output rows (a contiguous prefix,
    // so no copy), h0 at the first step, or both joined when sequences start late.
    const void* h_prev = row_pointer(h_init);
    if (i > 0) {
      const int64_t before = steps.forward_order(i - 1, reverse);
      const int64_t carried = steps.batch[before];
      h_prev = row_pointer(out.y, steps.offset[before]);
      if (bs > carried) {
        queued.run();
        if (!joined.defined()) joined = at::empty({s.batch, s.out}, opts);
        joined.narrow(0, 0, carried).copy_(out.y.narrow(0, steps.offset[before], carried));
        joined.narrow(0, carried, bs - carried).copy_(h_init.narrow(0, carried, bs - carried));
        h_prev = row_pointer(joined);
      }
    }
    if (!gates.holds(off, bs)) {
      queued.run();  // the queued steps read the chunk about to be replaced
      gates.project(steps, i, reverse);
    }
    void* y_t = row_pointer(out.y, off);
    void* c = row_pointer(out.c_n);  // null unless LSTM
    ForwardPointers<void> p;
    p.xg = gates.row(off);
    p.hg = row_pointer(hg);
    p.b_ih = row_pointer(bias_ih);
    p.b_hh = row_pointer(bias);
    p.h_prev = h_prev;
    p.c_prev = c;
    p.h_new = proj ? row_pointer(r) : y_t;  // the projection's input, else the output row
    p.c_new = c;                            // in place
    p.saved = saves ? row_pointer(out.saved, off) : nullptr;
    p.rows = bs;
    p.hidden = s.hidden;
    queued.push({h_prev, p});
    if (proj) {
      queued.run();
      kernels.gemm(type, {y_t, bs, s.out, s.out}, matrix_rows(r, 0, bs), matrix_of(w_proj),
                   /*transpose_b=*/true, 0);
    }
  }
  queued.run();
  out.h_n = final_states(out.y, h_init, steps, reverse);
  return out;
}

// Row-range copies into `dst`, merged while each continues the previous one in both tensors
// (with a constant batch, every step's copy does): one ATen copy per run, not per step.
class RowCopies {
 public:
  explicit RowCopies(const Tensor& dst) : dst_(dst) {}

  // dst rows [dst_row, dst_row + rows) = src rows [src_row, src_row + rows)
  void add(int64_t dst_row, const Tensor& src, int64_t src_row, int64_t rows) {
    if (rows == 0) return;
    if (src_ == &src && dst_row == dst_row_ + rows_ && src_row == src_row_ + rows_) {
      rows_ += rows;
      return;
    }
    flush();
    src_ = &src;
    dst_row_ = dst_row;
    src_row_ = src_row;
    rows_ = rows;
  }

  void flush() {  // the last run; call once after the last add
    if (rows_ > 0) dst_.narrow(0, dst_row_, rows_).copy_(src_->narrow(0, src_row_, rows_));
    rows_ = 0;
  }

 private:
  const Tensor& dst_;
  const Tensor* src_ = nullptr;
  int64_t dst_row_ = 0, src_row_ = 0, rows_ = 0;
};

// [N, P]: the state each row's step started from (y of the step before it, or h0).
Tensor previous_states(const Tensor& y, const Tensor& h0, const Steps& steps, bool reverse) {
  Tensor prev = at::empty(y.sizes(), y.options());  // row-major whatever y is: a fixed summation order
  RowCopies copies(prev);
  for (int64_t t = 0; t < steps.count(); ++t) {
    const int64_t bs = steps.batch[t], off = steps.offset[t];
    const int64_t before = reverse ? t + 1 : t - 1;
    const bool has_before = before >= 0 && before < steps.count();
    const int64_t carried = has_before ? std::min(bs, steps.batch[before]) : 0;
    if (carried > 0) copies.add(off, y, steps.offset[before], carried);
    if (carried < bs) copies.add(off + carried, h0, carried, bs - carried);
  }
  copies.flush();
  return prev;
}

// dW_hh [G*H, P] = Σ_t dhg[t]ᵀ h_prev[t] for dhg [N, G*H]. With one batch size B throughout,
// h_prev is y shifted by one step, and h0 for the step that starts the sequence: two GEMMs on
// views of y. Otherwise the previous states are gathered first.
Tensor recurrent_weight_grad(const Tensor& grad_hg, const Tensor& y, const Tensor& h0,
                             const Steps& steps, bool reverse) {
  const int64_t B = steps.batch[0], N = y.size(0);
  const bool uniform = std::all_of(steps.batch.begin(), steps.batch.end(),
                                   [B](int64_t bs) { return bs == B; });
  if (!uniform) return grad_hg.t().mm(previous_states(y, h0, steps, reverse));
  const int64_t first = reverse ? N - B : 0;  // the rows of the step that starts from h0
  Tensor grad = grad_hg.narrow(0, first, B).t().mm(h0);
  if (N > B) {
    grad.addmm_(grad_hg.narrow(0, reverse ? 0 : B, N - B).t(),
                y.narrow(0, reverse ? B : 0, N - B));
  }
  return grad;
}

struct LayerBackward {
  Tensor grad_xg;    // [N, G*H]
  Tensor grad_w_hh;  // [G*H, P]
  Tensor grad_b_hh;  // [G*H]
  Tensor grad_h0;    // [B, P]
  Tensor grad_c0;    // [B, H] (LSTM)
  Tensor grad_w_hr;  // [P, H] (LSTM with projection), else [0]
};

// What one layer's backward computes from.
struct LayerBackwardArgs {
  const char* op = nullptr;  // the op's name, for errors
  CellKind kind = CellKind::kLstm;
  Tensor grad_y;     // [N, P]
  Tensor grad_h_n;   // [B, P]
  Tensor grad_c_n;   // [B, H] (LSTM)
  Tensor w_hh;       // [G*H, P]
  OptTensor w_hr;    // [P, H] (LSTM with projection)
  Tensor h0;         // [B, P]
  Tensor y;          // [N, P] the forward's output
  Tensor workspace;  // [N, S*H] the forward's (LSTM, GRU; the RNN's is y)
  Tensor batch_sizes;
  bool reverse = false;
};

LayerBackward run_layer_backward(const LayerBackwardArgs& a) {
  const char* op = a.op;
  const CellKind kind = a.kind;
  const Tensor &grad_y = a.grad_y, &grad_h_n = a.grad_h_n, &grad_c_n = a.grad_c_n;
  const Tensor &w_hh = a.w_hh, &h0 = a.h0, &y = a.y;
  const OptTensor& w_hr = a.w_hr;
  const bool reverse = a.reverse;
  const ArgChecker check(op, grad_y);
  const LayerShape s = check_layer_weights(check, kind, w_hh, {}, w_hr, h0);
  const bool lstm = kind == CellKind::kLstm, gru = kind == CellKind::kGru;
  const bool rnn = !lstm && !gru;
  check(y, "y", {-1, s.out});
  const int64_t N = y.size(0);
  check(grad_y, "grad_y", {N, s.out});
  check(grad_h_n, "grad_h_n", {s.batch, s.out});
  if (lstm) check(grad_c_n, "grad_c_n", {s.batch, s.hidden});
  if (!rnn) check(a.workspace, "workspace", {N, saved_per_unit(kind) * s.hidden});
  const Steps steps = read_steps(op, a.batch_sizes, N, s.batch);
  const c10::DeviceGuard guard(grad_y.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto& kernels = device_kernels(grad_y.device().type());
  const auto opts = grad_y.options();
  const bool proj = w_hr.has_value() && w_hr->defined();

  const Tensor saved = rnn ? y.contiguous() : a.workspace.contiguous();
  const Tensor gy = grad_y.contiguous();
  const Tensor w = w_hh.contiguous();
  const Tensor w_proj = proj ? w_hr->contiguous() : Tensor();
  LayerBackward out;
  out.grad_h0 = grad_h_n.clone(at::MemoryFormat::Contiguous);  // running dh, in place
  if (lstm) out.grad_c0 = grad_c_n.clone(at::MemoryFormat::Contiguous);
  out.grad_xg = at::empty({N, s.gates * s.hidden}, opts);
  const Tensor grad_hg = gru ? at::empty({N, s.gates * s.hidden}, opts) : out.grad_xg;
  const Tensor dh_all = proj ? at::empty({N, s.out}, opts) : Tensor();
  const Tensor dr = proj ? at::empty({s.batch, s.hidden}, opts) : Tensor();

  const DataType type = data_type_of(gy);
  const auto step_weights = kernels.prepare_step(kind, StepPass::kBackward, w, s.batch);
  // Host work between steps (the projection's) runs the queue first.
  StepQueue<BackwardStep> queued([&](const BackwardStep* queue, int64_t count) {
    kernels.backward_steps(kind, type, *step_weights, queue, count);
  });
  for (int64_t i = steps.count() - 1; i >= 0; --i) {
    const int64_t t = steps.forward_order(i, reverse);
    const int64_t bs = steps.batch[t], off = steps.offset[t];
    if (bs == 0) continue;
    void* dh = row_pointer(out.grad_h0);  // rows [0, bs): the gradient carried from step t+1
    void* dc = row_pointer(out.grad_c0);  // null unless LSTM
    // The pointwise backward reads dh + grad_y[t]; with a projection that sum is formed first,
    // for dW_hr, and dr = (dh + grad_y[t]) @ W_hr is the pointwise step's gradient.
    const void* grad_h_new = dh;
    const void* grad_h_add = row_pointer(gy, off);
    if (proj) {
      queued.run();
      const Tensor dh_rows = out.grad_h0.narrow(0, 0, bs);
      dh_rows.add_(gy.narrow(0, off, bs));
      dh_all.narrow(0, off, bs).copy_(dh_rows);
      kernels.gemm(type, matrix_rows(dr, 0, bs), matrix_rows(dh_rows, 0, bs), matrix_of(w_proj),
                   /*transpose_b=*/false, 0);
      grad_h_new = row_pointer(dr);
      grad_h_add = nullptr;
    }
    BackwardPointers<void> p;
    p.grad_h_new = grad_h_new;
    p.grad_h_add = grad_h_add;
    p.grad_c_new = dc;
    p.saved = row_pointer(saved, off);
    p.grad_xg = row_pointer(out.grad_xg, off);
    p.grad_hg = gru ? row_pointer(grad_hg, off) : nullptr;
    p.grad_h_prev = gru ? dh : nullptr;
    p.grad_c_prev = dc;  // in place
    p.rows = bs;
    p.hidden = s.hidden;
    // dh_prev = (GRU: z dh) + dhg @ W_hh; beta 0 discards dh's old contents otherwise.
    queued.push({p, matrix_rows(out.grad_h0, 0, bs), matrix_rows(grad_hg, off, bs),
                 gru ? 1.0 : 0.0});
  }
  queued.run();

  out.grad_w_hh = recurrent_weight_grad(grad_hg, y, h0, steps, reverse);
  out.grad_b_hh = grad_hg.sum(0);
  if (proj) {
    // The projection's input o ⊙ tanh(c'), recomputed from the workspace (i, f, g, o, c).
    const int64_t H = s.hidden;
    const Tensor& ws = saved;
    const Tensor c_new =
        ws.narrow(1, H, H) * ws.narrow(1, 4 * H, H) + ws.narrow(1, 0, H) * ws.narrow(1, 2 * H, H);
    out.grad_w_hr = dh_all.t().mm(ws.narrow(1, 3 * H, H) * at::tanh(c_new));
  } else {
    out.grad_w_hr = at::empty({0}, opts);
  }
  if (!lstm) out.grad_c0 = Tensor();
  return out;
}

}  // namespace

std::tuple<Tensor, Tensor> rnn_recurrence(const Tensor& xg, const Tensor& w_hh,
                                          const OptTensor& b_hh, const Tensor& h0,
                                          const Tensor& batch_sizes, bool reverse,
                                          std::string_view nonlinearity) {
  LayerForwardArgs a;
  a.op = "rnn_ext::rnn_recurrence";
  a.kind = rnn_cell_kind(a.op, nonlinearity);
  a.xg = xg;
  a.w_hh = w_hh;
  a.b_hh = b_hh;
  a.h0 = h0;
  a.batch_sizes = batch_sizes;
  a.reverse = reverse;
  const LayerForward r = run_layer_forward(a);
  return {r.y, r.h_n};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> rnn_recurrence_backward(
    const Tensor& grad_y, const Tensor& grad_h_n, const Tensor& w_hh, const Tensor& h0,
    const Tensor& y, const Tensor& batch_sizes, bool reverse, std::string_view nonlinearity) {
  LayerBackwardArgs a;
  a.op = "rnn_ext::rnn_recurrence_backward";
  a.kind = rnn_cell_kind(a.op, nonlinearity);
  a.grad_y = grad_y;
  a.grad_h_n = grad_h_n;
  a.w_hh = w_hh;
  a.h0 = h0;
  a.y = y;
  a.batch_sizes = batch_sizes;
  a.reverse = reverse;
  const LayerBackward r = run_layer_backward(a);
  return {r.grad_xg, r.grad_w_hh, r.grad_b_hh, r.grad_h0};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_recurrence(
    const Tensor& xg, const Tensor& w_hh, const OptTensor& b_hh, const OptTensor& w_hr,
    const Tensor& h0, const Tensor& c0, const Tensor& batch_sizes, bool reverse,
    bool save_workspace) {
  LayerForwardArgs a;
  a.op = "rnn_ext::lstm_recurrence";
  a.kind = CellKind::kLstm;
  a.xg = xg;
  a.w_hh = w_hh;
  a.b_hh = b_hh;
  a.w_hr = w_hr;
  a.h0 = h0;
  a.c0 = c0;
  a.batch_sizes = batch_sizes;
  a.reverse = reverse;
  a.save_workspace = save_workspace;
  const LayerForward r = run_layer_forward(a);
  return {r.y, r.h_n, r.c_n, r.saved};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_recurrence_backward(
    const Tensor& grad_y, const Tensor& grad_h_n, const Tensor& grad_c_n, const Tensor& w_hh,
    const OptTensor& w_hr, const Tensor& h0, const Tensor& y, const Tensor& workspace,
    const Tensor& batch_sizes, bool reverse) {
  LayerBackwardArgs a;
  a.op = "rnn_ext::lstm_recurrence_backward";
  a.kind = CellKind::kLstm;
  a.grad_y = grad_y;
  a.grad_h_n = grad_h_n;
  a.grad_c_n = grad_c_n;
  a.w_hh = w_hh;
  a.w_hr = w_hr;
  a.h0 = h0;
  a.y = y;
  a.workspace = workspace;
  a.batch_sizes = batch_sizes;
  a.reverse = reverse;
  const LayerBackward r = run_layer_backward(a);
  return {r.grad_xg, r.grad_w_hh, r.grad_b_hh, r.grad_h0, r.grad_c0, r.grad_w_hr};
}

std::tuple<Tensor, Tensor, Tensor> gru_recurrence(const Tensor& xg, const Tensor& w_hh,
                                                  const OptTensor& b_hh, const Tensor& h0,
                                                  const Tensor& batch_sizes, bool reverse,
                                                  bool save_workspace) {
  LayerForwardArgs a;
  a.op = "rnn_ext::gru_recurrence";
  a.kind = CellKind::kGru;
  a.xg = xg;
  a.w_hh = w_hh;
  a.b_hh = b_hh;
  a.h0 = h0;
  a.batch_sizes = batch_sizes;
  a.reverse = reverse;
  a.save_workspace = save_workspace;
  const LayerForward r = run_layer_forward(a);
  return {r.y, r.h_n, r.saved};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gru_recurrence_backward(
    const Tensor& grad_y, const Tensor& grad_h_n, const Tensor& w_hh, const Tensor& h0,
    const Tensor& y, const Tensor& workspace, const Tensor& batch_sizes, bool reverse) {
  LayerBackwardArgs a;
  a.op = "rnn_ext::gru_recurrence_backward";
  a.kind = CellKind::kGru;
  a.grad_y = grad_y;
  a.grad_h_n = grad_h_n;
  a.w_hh = w_hh;
  a.h0 = h0;
  a.y = y;
  a.workspace = workspace;
  a.batch_sizes = batch_sizes;
  a.reverse = reverse;
  const LayerBackward r = run_layer_backward(a);
  return {r.grad_xg, r.grad_w_hh, r.grad_b_hh, r.grad_h0};
}

std::tuple<Tensor, Tensor> rnn_layer_inference(const Tensor& x, const Tensor& w_ih,
                                               const OptTensor& b_ih, const Tensor& w_hh,
                                               const OptTensor& b_hh, const Tensor& h0,
                                               const Tensor& batch_sizes, bool reverse,
                                               std::string_view nonlinearity) {
  LayerForwardArgs a;
  a.op = "rnn_ext::rnn_layer_inference";
  a.kind = rnn_cell_kind(a.op, nonlinearity);
  a.x = x;
  a.w_ih = w_ih;
  a.b_ih = b_ih;
  a.w_hh = w_hh;
  a.b_hh = b_hh;
  a.h0 = h0;
  a.batch_sizes = batch_sizes;
  a.reverse = reverse;
  const LayerForward r = run_layer_forward(a);
  return {r.y, r.h_n};
}

std::tuple<Tensor, Tensor, Tensor> lstm_layer_inference(
    const Tensor& x, const Tensor& w_ih, const OptTensor& b_ih, const Tensor& w_hh,
    const OptTensor& b_hh, const OptTensor& w_hr, const Tensor& h0, const Tensor& c0,
    const Tensor& batch_sizes, bool reverse) {
  LayerForwardArgs a;
  a.op = "rnn_ext::lstm_layer_inference";
  a.kind = CellKind::kLstm;
  a.x = x;
  a.w_ih = w_ih;
  a.b_ih = b_ih;
  a.w_hh = w_hh;
  a.b_hh = b_hh;
  a.w_hr = w_hr;
  a.h0 = h0;
  a.c0 = c0;
  a.batch_sizes = batch_sizes;
  a.reverse = reverse;
  const LayerForward r = run_layer_forward(a);
  return {r.y, r.h_n, r.c_n};
}

std::tuple<Tensor, Tensor> gru_layer_inference(const Tensor& x, const Tensor& w_ih,
                                               const OptTensor& b_ih, const Tensor& w_hh,
                                               const OptTensor& b_hh, const Tensor& h0,
                                               const Tensor& batch_sizes, bool reverse) {
  LayerForwardArgs a;
  a.op = "rnn_ext::gru_layer_inference";
  a.kind = CellKind::kGru;
  a.x = x;
  a.w_ih = w_ih;
  a.b_ih = b_ih;
  a.w_hh = w_hh;
  a.b_hh = b_hh;
  a.h0 = h0;
  a.batch_sizes = batch_sizes;
  a.reverse = reverse;
  const LayerForward r = run_layer_forward(a);
  return {r.y, r.h_n};
}

namespace {
void register_layer_ops(torch::Library& m) {
  m.impl("rnn_recurrence", &rnn_recurrence);
  m.impl("rnn_recurrence_backward", &rnn_recurrence_backward);
  m.impl("lstm_recurrence", &lstm_recurrence);
  m.impl("lstm_recurrence_backward", &lstm_recurrence_backward);
  m.impl("gru_recurrence", &gru_recurrence);
  m.impl("gru_recurrence_backward", &gru_recurrence_backward);
  m.impl("rnn_layer_inference", &rnn_layer_inference);
  m.impl("lstm_layer_inference", &lstm_layer_inference);
  m.impl("gru_layer_inference", &gru_layer_inference);
}
}  // namespace

RNN_EXT_REGISTER_DEVICE_KERNELS(register_layer_ops)

}  // namespace rnn_ext
