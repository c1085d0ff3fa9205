// Lets Python load the library with `import rnn_ext._C`; loading runs the TORCH_LIBRARY
// registrations. The ops are reached through torch.ops.rnn_ext, never through this module.
#include <Python.h>

#ifndef RNN_EXT_WITH_CUDA
#define RNN_EXT_WITH_CUDA 0
#endif

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  // rnn_ext._C.with_cuda: whether the CUDA kernels were compiled into this build.
  if (module != nullptr && PyModule_AddIntConstant(module, "with_cuda", RNN_EXT_WITH_CUDA) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
