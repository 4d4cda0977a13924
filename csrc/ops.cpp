// Operator schemas of the dropreg namespace and the Python module that carries the build facts.
// Kernels: cpu/*.cpp (CPU) and cuda/*.cu (CUDA). Fakes and autograd: dropreg_ext/ops.py.
#include <Python.h>
#include <torch/library.h>

#include <string>

namespace {

const char* const kBuildInfo =
    "{\"torch\": \"" DROPREG_TORCH_VERSION "\", \"cuda\": \"" DROPREG_CUDA_VERSION
    "\", \"cuda_archs\": \"" DROPREG_CUDA_ARCHS "\", \"backends\": [\"cpu\"" DROPREG_CUDA_BACKEND
    "]}";

PyObject* build_info(PyObject*, PyObject*) { return PyUnicode_FromString(kBuildInfo); }

PyMethodDef kMethods[] = {
    {"build_info", build_info, METH_NOARGS,
     "JSON string: torch and CUDA versions the extension was built against, archs, backends."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, kMethods};

}  // namespace

// Importing _C from Python loads this library, which runs the TORCH_LIBRARY registrations below.
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }

TORCH_LIBRARY(dropreg, m) {
  // x: any shape, f64/f32/f16/bf16; rng: int64 [seed, offset] on x's device.
  // Returns m ⊙ x / (1 - p) with m regenerated from (seed, offset) by the Philox contract.
  m.def("dropout(Tensor x, float p, Tensor rng) -> Tensor");
  // The same, written into x (x must be contiguous).
  m.def("dropout_(Tensor(a!) x, float p, Tensor rng) -> ()");
  // Raw Philox4x32-10: counter int64 (N, 4), key int64 (N, 2), values in [0, 2^32) -> int64 (N, 4).
  m.def("philox(Tensor counter, Tensor key) -> Tensor");
}
