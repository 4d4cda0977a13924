// Operator schemas of the dropreg namespace and the Python module that carries the build facts,
// what the CPU backend did (which dispatch-table rows ran, how many bytes it mapped ahead) and the
// public calls' entry points (entry.cpp).
// Kernels: cpu/*.cpp (CPU) and cuda/*.cu (CUDA). Fakes and autograd: dropreg_ext/ops.py, but dropout's
// autograd: autograd.cpp.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/fresh_output.h"
#include "cpu/isa.h"
#include "entry.h"

namespace {

namespace cpu = dropreg::cpu;

const char* const kBuildInfo =
    "{\"torch\": \"" DROPREG_TORCH_VERSION "\", \"cuda\": \"" DROPREG_CUDA_VERSION
    "\", \"cuda_archs\": \"" DROPREG_CUDA_ARCHS "\", \"backends\": [\"cpu\"" DROPREG_CUDA_BACKEND
    "]}";

PyObject* build_info(PyObject*, PyObject*) { return PyUnicode_FromString(kBuildInfo); }

PyObject* cpu_capability(PyObject*, PyObject*) { return PyUnicode_FromString(cpu::isa_name(cpu::cpu_isa())); }

PyObject* cpu_entries_used(PyObject*, PyObject*) {
  PyObject* used = PyDict_New();
  if (used == nullptr) return nullptr;
  for (int op = 0; op < static_cast<int>(cpu::CpuOp::kCount); ++op) {
    PyObject* rows = PyList_New(0);
    const unsigned bits = cpu::g_entries_used[op].load(std::memory_order_relaxed);
    for (int isa = 0; rows != nullptr && isa < cpu::kIsaCount; ++isa) {
      if ((bits >> isa & 1u) == 0) continue;
      PyObject* name = PyUnicode_FromString(cpu::isa_name(static_cast<cpu::Isa>(isa)));
      if (name == nullptr || PyList_Append(rows, name) != 0) Py_CLEAR(rows);
      Py_XDECREF(name);
    }
    if (rows == nullptr || PyDict_SetItemString(used, cpu::kCpuOpNames[op], rows) != 0) {
      Py_XDECREF(rows);
      Py_DECREF(used);
      return nullptr;
    }
    Py_DECREF(rows);
  }
  return used;
}

PyObject* cpu_prefault(PyObject*, PyObject*) {
  try {
    return PyBool_FromLong(cpu::prefault_enabled());
  } catch (const c10::Error& e) {  // DROPREG_CPU_PREFAULT holds something else than 0 or 1
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    return nullptr;
  }
}

PyObject* cpu_prefaulted_bytes(PyObject*, PyObject*) {
  return PyLong_FromLongLong(cpu::g_prefaulted_bytes.load(std::memory_order_relaxed));
}

PyObject* reset_cpu_entries_used(PyObject*, PyObject*) {
  for (auto& bits : cpu::g_entries_used) bits.store(0, std::memory_order_relaxed);
  Py_RETURN_NONE;
}

PyMethodDef kMethods[] = {
    {"build_info", build_info, METH_NOARGS,
     "JSON string: torch and CUDA versions the extension was built against, archs, backends."},
    {"cpu_capability", cpu_capability, METH_NOARGS,
     "The CPU loops of this process, for every op: 'avx512', 'avx2', or 'default' (portable loops); "
     "DROPREG_CPU_CAPABILITY=avx2 or =default caps it."},
    {"cpu_entries_used", cpu_entries_used, METH_NOARGS,
     "{op: [the rows of its CPU dispatch table ('avx512', 'avx2', 'default') that ran since the last "
     "reset_cpu_entries_used()]}; 'exp_log' is the float exp/log arrays (SLEEF, or libm for 'default')."},
    {"reset_cpu_entries_used", reset_cpu_entries_used, METH_NOARGS, "Clears what cpu_entries_used() reports."},
    {"cpu_prefault", cpu_prefault, METH_NOARGS,
     "Whether the CPU kernels map a fresh output's pages ahead of its writers (DROPREG_CPU_PREFAULT=1, the "
     "default, or 0)."},
    {"cpu_prefaulted_bytes", cpu_prefaulted_bytes, METH_NOARGS,
     "The bytes of fresh outputs the CPU kernels have mapped ahead of their writers in this process."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, kMethods};

}  // namespace

// Importing _C from Python loads this library, which runs the TORCH_LIBRARY registrations below.
PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&kModule);
  if (module != nullptr && PyModule_AddFunctions(module, dropreg::kEntryMethods) != 0) Py_CLEAR(module);
  return module;
}

TORCH_LIBRARY(dropreg, m) {
  // x: any shape, f64/f32/f16/bf16; rng: int64 [seed, offset] on x's device.
  // Returns m ⊙ x / (1 - p) with m regenerated from (seed, offset) by the Philox contract.
  m.def("dropout(Tensor x, float p, Tensor rng) -> Tensor");
  // The same, written into x (contiguous; on the CPU any dense layout).
  m.def("dropout_(Tensor(a!) x, float p, Tensor rng) -> ()");
  // The same with the mask read at the logical index index_base + Σ_k i_k·index_strides[k] of the element
  // at position (i_0, .., i_{n-1}), instead of its row-major index: for the box of a larger row-major
  // tensor (a shard of a DTensor), that tensor's mask. index_strides: one per dim, >= 0; index_base >= 0.
  m.def("dropout_indexed(Tensor x, float p, Tensor rng, int[] index_strides, int index_base) -> Tensor");
  // Raw Philox4x32-10: counter int64 (N, 4), key int64 (N, 2), values in [0, 2^32) -> int64 (N, 4).
  m.def("philox(Tensor counter, Tensor key) -> Tensor");

  // Cross-entropy with a sampled label, one pass over each row of z (N, C):
  // loss (N,) = lse - z[target] (0 on ignored rows), lse (N,), yhat (N,) int64 = argmax(z + Gumbel)
  // (ignore_index on ignored rows). loss/lse are float32 (float64 for float64 z).
  m.def(
      "cross_entropy_sample(Tensor z, Tensor target, Tensor rng, int ignore_index) -> "
      "(Tensor loss, Tensor lse, Tensor yhat)");
  // The same three and G (N, C) = exp(z - lse) - onehot(yhat) (0 on ignored rows, z's dtype), the
  // gradient of the sampled label's cross-entropy, written from the row the sample just read; with
  // true_scale (N,) also G_true = true_scale * (exp(z - lse) - onehot(target)) (else an empty (0,)).
  m.def(
      "cross_entropy_sample_grad(Tensor z, Tensor target, Tensor rng, int ignore_index, Tensor? true_scale=None) -> "
      "(Tensor loss, Tensor lse, Tensor yhat, Tensor grad, Tensor grad_true)");
  // Its backward: grad_z = p * (w - <p,w>) + grad_loss * (p - onehot(target)), w = grad_g +
  // true_scale * grad_g_true, p = exp(z - lse), 0 on ignored rows (a missing cotangent counts as 0).
  m.def(
      "cross_entropy_sample_grad_backward(Tensor? grad_loss, Tensor? grad_g, Tensor? grad_g_true, Tensor z, "
      "Tensor lse, Tensor target, Tensor? true_scale, int ignore_index) -> Tensor");
  // G (N, C) = row_scale ⊙ (exp(z - lse) - onehot(label)), 0 on ignored rows; z's dtype.
  m.def("ce_grad(Tensor z, Tensor lse, Tensor label, Tensor row_scale, int ignore_index) -> Tensor");
  // VJP of ce_grad: grad_z = row_scale ⊙ p ⊙ (u - <p,u>), grad_row_scale = <p,u> - u[label].
  m.def(
      "ce_grad_backward(Tensor u, Tensor z, Tensor lse, Tensor label, Tensor row_scale, "
      "int ignore_index) -> (Tensor grad_z, Tensor grad_row_scale)");

  // Site penalty: [sum (g_e*h)^2, sum g_i*eta*h] (2,) with eta regenerated from rng
  // (noise = "rademacher" | "dropout"); a missing g_e / g_i contributes 0.
  m.def("site_penalty(Tensor h, Tensor? g_e, Tensor? g_i, float q, str noise, Tensor rng) -> Tensor");
  // Its gradients for grad = [a, b]: dh = 2a g_e^2 h + b g_i eta, dg_e = 2a g_e h^2, dg_i = b eta h;
  // an empty tensor stands for the gradient of a missing input.
  m.def(
      "site_penalty_backward(Tensor grad, Tensor h, Tensor? g_e, Tensor? g_i, float q, str noise, "
      "Tensor rng) -> (Tensor grad_h, Tensor grad_g_e, Tensor grad_g_i)");

  // The ops that draw their own state: <op>_draw is <op> with `rng` replaced by a trailing `seed`
  // and the state it used, int64 [seed, offset] on the input's device, as one more output (saved by
  // the backward that regenerates the noise). seed=None draws [seed, offset] from torch's generator
  // of that device (on a GPU: an offset reserved on the host, read by the kernel itself, graph-safe);
  // an int gives [seed, 0]. One launch where the op is one kernel: no random_, fill_ or copy.
  const std::vector<at::Tag> seeded = {at::Tag::nondeterministic_seeded};
  // The state alone, as the _draw ops draw it (dropreg_ext.ops.make_rng), on like's device.
  m.def("rng_state(Tensor like, int? seed=None) -> Tensor", seeded);
  m.def("dropout_draw(Tensor x, float p, int? seed=None) -> (Tensor y, Tensor rng)", seeded);
  m.def("dropout_draw_(Tensor(a!) x, float p, int? seed=None) -> Tensor rng", seeded);
  m.def(
      "dropout_indexed_draw(Tensor x, float p, int[] index_strides, int index_base, int? seed=None) -> "
      "(Tensor y, Tensor rng)",
      seeded);
  m.def(
      "cross_entropy_sample_draw(Tensor z, Tensor target, int ignore_index, int? seed=None) -> "
      "(Tensor loss, Tensor lse, Tensor yhat, Tensor rng)",
      seeded);
  m.def(
      "cross_entropy_sample_grad_draw(Tensor z, Tensor target, int ignore_index, Tensor? true_scale=None, "
      "int? seed=None) -> (Tensor loss, Tensor lse, Tensor yhat, Tensor grad, Tensor grad_true, Tensor rng)",
      seeded);
  m.def(
      "site_penalty_draw(Tensor h, Tensor? g_e, Tensor? g_i, float q, str noise, int? seed=None) -> "
      "(Tensor out, Tensor rng)",
      seeded);
}
