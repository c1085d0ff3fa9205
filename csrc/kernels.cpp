#include "kernels.h"

#include <array>
#include <string>

#include <c10/util/Exception.h>

namespace rnn_ext {

int64_t gates_per_unit(CellKind kind) {
  int64_t g = 0;
  visit_cell<float>(kind, [&](auto cell) { g = decltype(cell)::kGates; });
  return g;
}

int64_t saved_per_unit(CellKind kind) {
  int64_t s = 0;
  visit_cell<float>(kind, [&](auto cell) { s = decltype(cell)::kSaved; });
  return s;
}

namespace {
// The one table of the cells' names (rnn_ext/_kinds.py is Python's).
struct KindNames {
  CellKind kind;
  const char* mode;          // torch.nn's
  const char* nonlinearity;  // the RNN's, else null
};
constexpr KindNames kKindNames[] = {
    {CellKind::kRnnTanh, "RNN_TANH", "tanh"},
    {CellKind::kRnnRelu, "RNN_RELU", "relu"},
    {CellKind::kLstm, "LSTM", nullptr},
    {CellKind::kGru, "GRU", nullptr},
};

const KindNames& names_of(CellKind kind) {
  for (const KindNames& names : kKindNames) {
    if (names.kind == kind) return names;
  }
  TORCH_CHECK(false, "rnn_ext: unknown cell kind ", static_cast<int>(kind));
}
}  // namespace

bool has_workspace(CellKind kind) { return kind == CellKind::kLstm || kind == CellKind::kGru; }

const char* mode_name(CellKind kind) { return names_of(kind).mode; }

const char* nonlinearity_name(CellKind kind) {
  const char* name = names_of(kind).nonlinearity;
  TORCH_CHECK(name != nullptr, "rnn_ext: the ", names_of(kind).mode, " cell has no nonlinearity");
  return name;
}

CellKind rnn_cell_kind(const char* op, std::string_view nonlinearity) {
  for (const KindNames& names : kKindNames) {
    if (names.nonlinearity != nullptr && nonlinearity == names.nonlinearity) return names.kind;
  }
  TORCH_CHECK(false, op, ": unknown nonlinearity '", std::string(nonlinearity),
              "', expected 'tanh' or 'relu'");
}

namespace {
std::array<DeviceKernels, static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)>&
kernel_table() {
  static std::array<DeviceKernels,
                    static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)>
      table;
  return table;
}
}  // namespace

bool register_device_kernels(c10::DeviceType device, DeviceKernels kernels) {
  kernel_table()[static_cast<size_t>(device)] = kernels;
  return true;
}

const DeviceKernels& device_kernels(c10::DeviceType device) {
  const DeviceKernels& k = kernel_table()[static_cast<size_t>(device)];
  TORCH_CHECK(k.forward != nullptr, "rnn_ext: this build has no kernels for device type ",
              c10::DeviceTypeName(device),
              " (build with CUDA to run on GPUs: see the README's build section)");
  return k;
}

}  // namespace rnn_ext
