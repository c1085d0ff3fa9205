"""Builds rnn_ext._C: a CUDAExtension when torch has CUDA and nvcc is found (no GPU needed),
else a CppExtension.

Environment:
  RNN_EXT_CUDA=0             build without the CUDA sources (quick CPU-only iterations)
  TORCH_CUDA_ARCH_LIST       GPU architectures to compile for (default "8.0;9.0", 9.0 = H100/H200)
  RNN_EXT_CPU_NATIVE=0       compile the CPU kernels for generic x86-64 instead of -march=native
  CUDA_HOME                  the CUDA toolkit, when it cannot be found from nvcc
"""

import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def find_cuda_home():
    """The toolkit directory: CUDA_HOME, else the first candidate holding nvcc and libcudart.

    `which nvcc` may be a wrapper script outside the toolkit (torch would then look for
    libcudart beside it), so candidates are checked for the runtime library."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    candidates = ["/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        has_nvcc = os.path.exists(os.path.join(home, "bin", "nvcc"))
        has_cudart = glob.glob(os.path.join(home, "lib*", "libcudart.so*"))
        if has_nvcc and has_cudart:
            return home
    return None


want_cuda = os.environ.get("RNN_EXT_CUDA", "1") != "0"
cuda_home = find_cuda_home() if want_cuda else None
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

with_cuda = bool(want_cuda and cuda_home and torch.version.cuda)

sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
cxx_flags = ["-O3", "-fopenmp"]
if os.environ.get("RNN_EXT_CPU_NATIVE", "1") != "0":
    cxx_flags.append("-march=native")
extra_compile_args = {"cxx": cxx_flags}
include_dirs = [os.path.join(ROOT, "csrc")]

if with_cuda:
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    extra_compile_args["nvcc"] = ["-O3", "--expt-relaxed-constexpr"]
    extension = CUDAExtension
else:
    extension = CppExtension

ext = extension(
    "rnn_ext._C",
    sources,
    include_dirs=include_dirs,
    # the headers, so that an sdist carries them (a wheel built from the sdist needs them)
    depends=sorted(glob.glob(os.path.join("csrc", "**", "*.h"), recursive=True)),
    extra_compile_args=extra_compile_args,
    extra_link_args=["-fopenmp"],
    define_macros=[("RNN_EXT_WITH_CUDA", "1" if with_cuda else "0")],
)

print(f"rnn_ext: building with {'CUDA (' + cuda_home + ', archs ' + os.environ['TORCH_CUDA_ARCH_LIST'] + ')' if with_cuda else 'CPU only'}")

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension},
)
