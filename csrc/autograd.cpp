// Autograd of the dropout op in C++. dropout is linear in x with a mask fixed by rng, so its
// backward is the same op on the gradient (the mask regenerated from rng), and so is that
// backward's backward, to any order. The other ops' autograd is Python (dropreg_ext/ops.py); this
// one is C++ because dropout is called many times a step on tensors whose kernel takes
// microseconds, where a Python autograd wrapper (torch.library.register_autograd) is most of the
// call. torch.compile traces it like the Python form (the forward runs below autograd on the fake).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace dropreg {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_dropout(const at::Tensor& x, double p, const at::Tensor& rng) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("dropreg::dropout", "")
                             .typed<at::Tensor(const at::Tensor&, double, const at::Tensor&)>();
  return op.call(x, p, rng);
}

class DropoutFunction : public torch::autograd::Function<DropoutFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, double p, const at::Tensor& rng) {
    ctx->saved_data["p"] = p;
    ctx->save_for_backward({rng});
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_dropout(x, p, rng);
  }

  // Through the dispatcher with autograd on: under create_graph the gradient's dropout is recorded
  // too, which gives every higher order.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor rng = ctx->get_saved_variables()[0];
    return {call_dropout(grads[0], ctx->saved_data["p"].toDouble(), rng), at::Tensor(), at::Tensor()};
  }
};

at::Tensor dropout_autograd(const at::Tensor& x, double p, const at::Tensor& rng) {
  return DropoutFunction::apply(x, p, rng);
}

}  // namespace

TORCH_LIBRARY_IMPL(dropreg, Autograd, m) { m.impl("dropout", &dropout_autograd); }

}  // namespace dropreg
