// The way in from Python of the public calls that draw their own state: dropreg_ext's dropout,
// cross_entropy_sample(_grad) and site_penalty call these where nothing needs Python's view of the
// call (plain tensors on a C++ backend, no __torch_function__ to honour, not under torch.compile:
// dropreg_ext/ops.py decides). Each calls its registered <op>_draw through the dispatcher, typed, as
// torch's generated bindings call theirs: autograd, autocast, dispatch modes and the kernels run as
// for torch.ops.dropreg.<op>_draw. What it saves is the host time of a small call: no boxing of the
// arguments into IValues and back (a torch.ops call's), and only the outputs the public call
// returns become Python objects (not the drawn state, nor an absent G_true).
#include "entry.h"

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/object_ptr.h>

#include <array>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "registered_ops.h"

namespace dropreg {
namespace {

// One positional argument converted to the type its op takes (a wrongly typed one raises a TypeError
// naming it; the Python layer has checked the values already).
[[noreturn]] void wrong(const char* fn, const char* name, const char* allowed, PyObject* got) {
  throw torch::TypeError(std::string("dropreg_ext._C.") + fn + ": argument '" + name + "' must be " + allowed +
                         ", got " + Py_TYPE(got)->tp_name);
}

template <typename T>
struct From;

template <>
struct From<Tensor> {
  static Tensor get(const char* fn, const char* name, PyObject* obj) {
    if (!THPVariable_Check(obj)) wrong(fn, name, "a Tensor", obj);
    return THPVariable_Unpack(obj);
  }
};

template <>
struct From<double> {
  static double get(const char* fn, const char* name, PyObject* obj) {
    if (!PyFloat_Check(obj) && !PyLong_Check(obj)) wrong(fn, name, "a float", obj);
    const double value = PyFloat_AsDouble(obj);
    if (value == -1.0 && PyErr_Occurred()) throw python_error();
    return value;
  }
};

template <>
struct From<int64_t> {
  static int64_t get(const char* fn, const char* name, PyObject* obj) {
    if (!PyLong_Check(obj)) wrong(fn, name, "an int", obj);
    const long long value = PyLong_AsLongLong(obj);  // raises OverflowError outside int64
    if (value == -1 && PyErr_Occurred()) throw python_error();
    return value;
  }
};

template <>
struct From<c10::string_view> {  // valid while the str is: the caller holds its arguments
  static c10::string_view get(const char* fn, const char* name, PyObject* obj) {
    Py_ssize_t size = 0;
    const char* data = PyUnicode_Check(obj) ? PyUnicode_AsUTF8AndSize(obj, &size) : nullptr;
    if (data == nullptr) {
      if (PyErr_Occurred()) throw python_error();
      wrong(fn, name, "a str", obj);
    }
    return c10::string_view(data, static_cast<size_t>(size));
  }
};

template <typename T>
struct From<std::optional<T>> {  // None, or a T
  static std::optional<T> get(const char* fn, const char* name, PyObject* obj) {
    return obj == Py_None ? std::nullopt : std::optional<T>(From<T>::get(fn, name, obj));
  }
};

// Calls `op` with the positional arguments `args` (named `names`), converted with the GIL held, and
// runs it with the GIL released, as torch's bindings run their ops (a dispatch mode or a Python
// kernel below takes it back itself).
template <typename Ret, typename... OpArgs, size_t... I>
Ret call_typed(const c10::TypedOperatorHandle<Ret(OpArgs...)>& op, const char* fn,
               const std::array<const char*, sizeof...(OpArgs)>& names, PyObject* const* args, Py_ssize_t nargs,
               std::index_sequence<I...>) {
  if (nargs != static_cast<Py_ssize_t>(sizeof...(OpArgs))) {
    throw torch::TypeError(std::string("dropreg_ext._C.") + fn + " takes " + std::to_string(sizeof...(OpArgs)) +
                           " positional arguments, got " + std::to_string(nargs));
  }
  const std::tuple<std::decay_t<OpArgs>...> converted{From<std::decay_t<OpArgs>>::get(fn, names[I], args[I])...};
  struct Released {
    PyThreadState* state = PyEval_SaveThread();
    ~Released() { PyEval_RestoreThread(state); }
  } released;
  return op.call(std::get<I>(converted)...);
}

template <typename Ret, typename... OpArgs>
Ret call(const c10::TypedOperatorHandle<Ret(OpArgs...)>& op, const char* fn,
         const std::array<const char*, sizeof...(OpArgs)>& names, PyObject* const* args, Py_ssize_t nargs) {
  return call_typed(op, fn, names, args, nargs, std::index_sequence_for<OpArgs...>());
}

PyObject* wrap(const Tensor& t) {
  PyObject* obj = THPVariable_Wrap(t);
  if (obj == nullptr) throw python_error();
  return obj;
}

PyObject* wrap_tuple(std::initializer_list<Tensor> outputs) {
  THPObjectPtr tuple(PyTuple_New(static_cast<Py_ssize_t>(outputs.size())));
  if (!tuple) throw python_error();
  Py_ssize_t i = 0;
  for (const Tensor& t : outputs) PyTuple_SET_ITEM(tuple.get(), i++, wrap(t));
  return tuple.release();
}

PyObject* dropout(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  return wrap(std::get<0>(call(dropout_draw_op(), "dropout", {"input", "p", "seed"}, args, nargs)));
  END_HANDLE_TH_ERRORS
}

PyObject* cross_entropy_sample(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const auto [loss, lse, yhat, rng] =
      call(ce_sample_draw_op(), "cross_entropy_sample", {"z", "target", "ignore_index", "seed"}, args, nargs);
  return wrap_tuple({loss, lse, yhat});
  END_HANDLE_TH_ERRORS
}

PyObject* cross_entropy_sample_grad(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const auto [loss, lse, yhat, grad, grad_true, rng] =
      call(ce_sample_grad_draw_op(), "cross_entropy_sample_grad",
           {"z", "target", "ignore_index", "true_scale", "seed"}, args, nargs);
  // G_true is an output where true_scale was given (an empty placeholder otherwise).
  return args[3] != Py_None ? wrap_tuple({loss, lse, yhat, grad, grad_true}) : wrap_tuple({loss, lse, yhat, grad});
  END_HANDLE_TH_ERRORS
}

PyObject* site_penalty(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  return wrap(std::get<0>(
      call(site_penalty_draw_op(), "site_penalty", {"h", "g_e", "g_i", "q", "noise", "seed"}, args, nargs)));
  END_HANDLE_TH_ERRORS
}

}  // namespace

// METH_FASTCALL functions, cast through void (*)() as CPython's own modules do.
#define DROPREG_FASTCALL(fn) reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fn)), METH_FASTCALL

PyMethodDef kEntryMethods[] = {
    {"dropout", DROPREG_FASTCALL(dropout), "dropout(input, p, seed) -> y: dropreg::dropout_draw without its state."},
    {"cross_entropy_sample", DROPREG_FASTCALL(cross_entropy_sample),
     "cross_entropy_sample(z, target, ignore_index, seed) -> (loss, lse, yhat)."},
    {"cross_entropy_sample_grad", DROPREG_FASTCALL(cross_entropy_sample_grad),
     "cross_entropy_sample_grad(z, target, ignore_index, true_scale, seed) -> (loss, lse, yhat, G[, G_true])."},
    {"site_penalty", DROPREG_FASTCALL(site_penalty),
     "site_penalty(h, g_e, g_i, q, noise, seed) -> (2,) [sum (g_e h)^2, sum g_i eta h]."},
    {nullptr, nullptr, 0, nullptr}};

#undef DROPREG_FASTCALL

}  // namespace dropreg
