// The registered dropreg:: ops as typed handles, for C++ callers that go through the dispatcher (the
// autograd nodes, the Python entry points): each found once, at its first use.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace dropreg {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

template <typename Sig>
inline c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

#define DROPREG_OP(fn, name, ...)                                    \
  inline c10::TypedOperatorHandle<__VA_ARGS__> fn() {                \
    static const auto op = find_op<__VA_ARGS__>("dropreg::" name); \
    return op;                                                       \
  }

using CeSample = std::tuple<Tensor, Tensor, Tensor>;
using CeSampleGrad = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
DROPREG_OP(dropout_op, "dropout", Tensor(const Tensor&, double, const Tensor&))
DROPREG_OP(dropout_inplace_op, "dropout_", void(Tensor&, double, const Tensor&))
DROPREG_OP(dropout_draw_op, "dropout_draw", std::tuple<Tensor, Tensor>(const Tensor&, double, std::optional<int64_t>))
DROPREG_OP(dropout_draw_inplace_op, "dropout_draw_", Tensor(Tensor&, double, std::optional<int64_t>))
DROPREG_OP(dropout_indexed_op, "dropout_indexed",
           Tensor(const Tensor&, double, const Tensor&, c10::IntArrayRef, int64_t))
DROPREG_OP(dropout_indexed_draw_op, "dropout_indexed_draw",
           std::tuple<Tensor, Tensor>(const Tensor&, double, c10::IntArrayRef, int64_t, std::optional<int64_t>))
DROPREG_OP(ce_sample_op, "cross_entropy_sample", CeSample(const Tensor&, const Tensor&, const Tensor&, int64_t))
DROPREG_OP(ce_sample_draw_op, "cross_entropy_sample_draw",
           std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, int64_t, std::optional<int64_t>))
DROPREG_OP(ce_sample_grad_op, "cross_entropy_sample_grad",
           CeSampleGrad(const Tensor&, const Tensor&, const Tensor&, int64_t, const OptTensor&))
DROPREG_OP(ce_sample_grad_draw_op, "cross_entropy_sample_grad_draw",
           std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, int64_t,
                                                                      const OptTensor&, std::optional<int64_t>))
DROPREG_OP(ce_sample_grad_backward_op, "cross_entropy_sample_grad_backward",
           Tensor(const OptTensor&, const OptTensor&, const OptTensor&, const Tensor&, const Tensor&, const Tensor&,
                  const OptTensor&, int64_t))
DROPREG_OP(ce_grad_op, "ce_grad", Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t))
DROPREG_OP(ce_grad_backward_op, "ce_grad_backward",
           std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                      int64_t))
DROPREG_OP(site_penalty_op, "site_penalty",
           Tensor(const Tensor&, const OptTensor&, const OptTensor&, double, c10::string_view, const Tensor&))
DROPREG_OP(site_penalty_draw_op, "site_penalty_draw",
           std::tuple<Tensor, Tensor>(const Tensor&, const OptTensor&, const OptTensor&, double, c10::string_view,
                                      std::optional<int64_t>))
DROPREG_OP(site_penalty_backward_op, "site_penalty_backward",
           std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, double,
                                              c10::string_view, const Tensor&))
#undef DROPREG_OP

}  // namespace dropreg
