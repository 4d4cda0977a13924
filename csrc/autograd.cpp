// Autograd of the C++ ops (the cpu and cuda backends), in C++: no backward runs Python, and a call
// costs one autograd node. The formulas (docs/design.md §2) are those of dropreg_ext/ops.py, which
// registers the same ones for the Python backends (triton, reference):
//   dropout(_indexed):     y = m ⊙ x / (1 - p), linear in x: backward is the same op on the
//                          gradient (mask regenerated from rng), and so is its backward, to any order.
//   cross_entropy_sample:  d loss/d z = ce_grad(z, lse, y, grad_loss), d lse/d z = grad_lse ⊙ softmax(z).
//   cross_entropy_sample_grad: the same for loss and lse, and one op for the cotangents of loss, G
//                          and G_true (cross_entropy_sample_grad_backward).
//   ce_grad:               ce_grad_backward, in z and row_scale.
//   site_penalty:          site_penalty_backward (η regenerated from rng).
// The <op>_draw ops have their base op's backward, with the state they drew (an output) saved.
// A backward calls its op through autograd while a graph is being built (create_graph: the backward
// ops' own derivatives, third order, are composite PyTorch registered in ops.py), and below autograd
// otherwise, so that first-order backward never enters a Python autograd kernel.
// torch.compile traces these like Python autograd (the forward runs below autograd on the fake).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

namespace dropreg {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using at::Tensor;
using OptTensor = std::optional<Tensor>;

template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// The registered ops the forwards and backwards call (found once, at first use).
#define DROPREG_OP(fn, name, ...)                                    \
  c10::TypedOperatorHandle<__VA_ARGS__> fn() {                       \
    static const auto op = find_op<__VA_ARGS__>("dropreg::" name); \
    return op;                                                       \
  }

using CeSample = std::tuple<Tensor, Tensor, Tensor>;
using CeSampleGrad = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
DROPREG_OP(dropout_op, "dropout", Tensor(const Tensor&, double, const Tensor&))
DROPREG_OP(dropout_draw_op, "dropout_draw", std::tuple<Tensor, Tensor>(const Tensor&, double, std::optional<int64_t>))
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

// A backward's op call: recorded by autograd while a graph is being built, below autograd otherwise.
template <typename Call>
auto in_backward(const Call& call) {
  if (at::GradMode::is_enabled()) return call();
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return call();
}

OptTensor opt(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// ---------------------------------------------------------------------------------------------
// dropout, dropout_draw
// ---------------------------------------------------------------------------------------------

// Under create_graph the gradient's dropout is recorded too, which gives every higher order.
Tensor dropout_backward(AutogradContext* ctx, const Tensor& grad) {
  if (!grad.defined()) return Tensor();
  const Tensor rng = ctx->get_saved_variables()[0];
  return in_backward([&] { return dropout_op().call(grad, ctx->saved_data["p"].toDouble(), rng); });
}

class DropoutFunction : public torch::autograd::Function<DropoutFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, double p, const Tensor& rng) {
    ctx->saved_data["p"] = p;
    ctx->save_for_backward({rng});
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return dropout_op().call(x, p, rng);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {dropout_backward(ctx, grads[0]), Tensor(), Tensor()};
  }
};

class DropoutDrawFunction : public torch::autograd::Function<DropoutDrawFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, double p, std::optional<int64_t> seed) {
    Tensor y, rng;
    {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(y, rng) = dropout_draw_op().call(x, p, seed);
    }
    ctx->saved_data["p"] = p;
    ctx->save_for_backward({rng});
    ctx->mark_non_differentiable({rng});
    ctx->set_materialize_grads(false);  // no zeros for the state's (absent) gradient
    return {y, rng};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {dropout_backward(ctx, grads[0]), Tensor(), Tensor()};
  }
};

// dropout_indexed(_draw): the same with the mask at each element's logical index (linear in x too).
Tensor dropout_indexed_backward(AutogradContext* ctx, const Tensor& grad) {
  if (!grad.defined()) return Tensor();
  const Tensor rng = ctx->get_saved_variables()[0];
  const std::vector<int64_t> strides = ctx->saved_data["index_strides"].toIntVector();
  const int64_t base = ctx->saved_data["index_base"].toInt();
  return in_backward([&] { return dropout_indexed_op().call(grad, ctx->saved_data["p"].toDouble(), rng, strides, base); });
}

void save_indexed(AutogradContext* ctx, double p, c10::IntArrayRef index_strides, int64_t index_base,
                  const Tensor& rng) {
  ctx->saved_data["p"] = p;
  ctx->saved_data["index_strides"] = index_strides.vec();
  ctx->saved_data["index_base"] = index_base;
  ctx->save_for_backward({rng});
}

class DropoutIndexedFunction : public torch::autograd::Function<DropoutIndexedFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, double p, const Tensor& rng,
                        c10::IntArrayRef index_strides, int64_t index_base) {
    save_indexed(ctx, p, index_strides, index_base, rng);
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return dropout_indexed_op().call(x, p, rng, index_strides, index_base);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {dropout_indexed_backward(ctx, grads[0]), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

class DropoutIndexedDrawFunction : public torch::autograd::Function<DropoutIndexedDrawFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, double p, c10::IntArrayRef index_strides,
                               int64_t index_base, std::optional<int64_t> seed) {
    Tensor y, rng;
    {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(y, rng) = dropout_indexed_draw_op().call(x, p, index_strides, index_base, seed);
    }
    save_indexed(ctx, p, index_strides, index_base, rng);
    ctx->mark_non_differentiable({rng});
    ctx->set_materialize_grads(false);  // no zeros for the state's (absent) gradient
    return {y, rng};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {dropout_indexed_backward(ctx, grads[0]), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// ---------------------------------------------------------------------------------------------
// cross_entropy_sample(_draw), cross_entropy_sample_grad(_draw), ce_grad
// ---------------------------------------------------------------------------------------------

// Saves what the cross-entropy backwards read: z, target, lse (an output), true_scale (may be undefined).
void save_ce(AutogradContext* ctx, const Tensor& z, const Tensor& target, const Tensor& lse,
             const OptTensor& true_scale, int64_t ignore_index) {
  ctx->saved_data["ignore_index"] = ignore_index;
  ctx->set_materialize_grads(false);  // an unused output's gradient stays undefined: no pass for it
  ctx->save_for_backward({z, target, lse, true_scale.value_or(Tensor())});
}

// The gradient in z of ⟨grad_lse, lse⟩: grad_lse ⊙ softmax(z) (undefined if grad_lse is).
Tensor lse_grad(const Tensor& z, const Tensor& lse, const Tensor& grad_lse) {
  if (!grad_lse.defined()) return Tensor();
  return (grad_lse.unsqueeze(1) * at::exp(z.to(lse.scalar_type()) - lse.unsqueeze(1))).to(z.scalar_type());
}

Tensor add_defined(const Tensor& a, const Tensor& b) {
  if (!a.defined()) return b;
  return b.defined() ? a + b : a;
}

// d/dz of ⟨grad_loss, loss⟩ + ⟨grad_lse, lse⟩ for cross_entropy_sample's outputs.
Tensor ce_sample_backward(AutogradContext* ctx, const Tensor& grad_loss, const Tensor& grad_lse) {
  const auto saved = ctx->get_saved_variables();
  const Tensor &z = saved[0], &target = saved[1], &lse = saved[2];
  const int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
  Tensor grad_z;
  if (grad_loss.defined()) {
    const Tensor row_scale = grad_loss.to(lse.scalar_type());
    grad_z = in_backward([&] { return ce_grad_op().call(z, lse, target, row_scale, ignore_index); });
  }
  return add_defined(grad_z, lse_grad(z, lse, grad_lse));
}

class CrossEntropySampleFunction : public torch::autograd::Function<CrossEntropySampleFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& z, const Tensor& target, const Tensor& rng,
                               int64_t ignore_index) {
    Tensor loss, lse, yhat;
    {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(loss, lse, yhat) = ce_sample_op().call(z, target, rng, ignore_index);
    }
    save_ce(ctx, z, target, lse, std::nullopt, ignore_index);
    ctx->mark_non_differentiable({yhat});
    return {loss, lse, yhat};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {ce_sample_backward(ctx, grads[0], grads[1]), Tensor(), Tensor(), Tensor()};
  }
};

class CrossEntropySampleDrawFunction : public torch::autograd::Function<CrossEntropySampleDrawFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& z, const Tensor& target, int64_t ignore_index,
                               std::optional<int64_t> seed) {
    Tensor loss, lse, yhat, rng;
    {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(loss, lse, yhat, rng) = ce_sample_draw_op().call(z, target, ignore_index, seed);
    }
    save_ce(ctx, z, target, lse, std::nullopt, ignore_index);
    ctx->mark_non_differentiable({yhat, rng});
    return {loss, lse, yhat, rng};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {ce_sample_backward(ctx, grads[0], grads[1]), Tensor(), Tensor(), Tensor()};
  }
};

// d/dz of the cotangents of cross_entropy_sample_grad's loss, lse, G and G_true: one backward op for
// loss, G and G_true (ŷ fixed by the draw), softmax for lse.
Tensor ce_sample_grad_backward(AutogradContext* ctx, const variable_list& grads) {
  const auto saved = ctx->get_saved_variables();
  const Tensor &z = saved[0], &target = saved[1], &lse = saved[2], &true_scale = saved[3];
  const int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
  const Tensor &grad_loss = grads[0], &grad_lse = grads[1], &grad_g = grads[3];
  // Without true_scale, G_true is an empty placeholder (AOT autograd may hand it zeros).
  const Tensor grad_g_true = true_scale.defined() ? grads[4] : Tensor();
  Tensor grad_z;
  if (grad_loss.defined() || grad_g.defined() || grad_g_true.defined()) {
    const OptTensor loss_cotangent = grad_loss.defined() ? OptTensor(grad_loss.to(lse.scalar_type())) : std::nullopt;
    grad_z = in_backward([&] {
      return ce_sample_grad_backward_op().call(loss_cotangent, opt(grad_g), opt(grad_g_true), z, lse, target,
                                               opt(true_scale), ignore_index);
    });
  }
  return add_defined(grad_z, lse_grad(z, lse, grad_lse));
}

class CrossEntropySampleGradFunction : public torch::autograd::Function<CrossEntropySampleGradFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& z, const Tensor& target, const Tensor& rng,
                               int64_t ignore_index, const OptTensor& true_scale) {
    Tensor loss, lse, yhat, grad, grad_true;
    {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(loss, lse, yhat, grad, grad_true) = ce_sample_grad_op().call(z, target, rng, ignore_index, true_scale);
    }
    save_ce(ctx, z, target, lse, true_scale, ignore_index);
    ctx->mark_non_differentiable({yhat});
    return {loss, lse, yhat, grad, grad_true};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {ce_sample_grad_backward(ctx, grads), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

class CrossEntropySampleGradDrawFunction : public torch::autograd::Function<CrossEntropySampleGradDrawFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& z, const Tensor& target, int64_t ignore_index,
                               const OptTensor& true_scale, std::optional<int64_t> seed) {
    Tensor loss, lse, yhat, grad, grad_true, rng;
    {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(loss, lse, yhat, grad, grad_true, rng) =
          ce_sample_grad_draw_op().call(z, target, ignore_index, true_scale, seed);
    }
    save_ce(ctx, z, target, lse, true_scale, ignore_index);
    ctx->mark_non_differentiable({yhat, rng});
    return {loss, lse, yhat, grad, grad_true, rng};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {ce_sample_grad_backward(ctx, grads), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// G = row_scale ⊙ (softmax(z) - onehot(label)), a function of z and row_scale (lse = logsumexp(z)
// is an input for speed): its VJP is ce_grad_backward.
class CeGradFunction : public torch::autograd::Function<CeGradFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& z, const Tensor& lse, const Tensor& label,
                        const Tensor& row_scale, int64_t ignore_index) {
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->save_for_backward({z, lse, label, row_scale});
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return ce_grad_op().call(z, lse, label, row_scale, ignore_index);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
    auto [grad_z, grad_scale] = in_backward(
        [&] { return ce_grad_backward_op().call(grads[0], saved[0], saved[1], saved[2], saved[3], ignore_index); });
    return {grad_z, Tensor(), Tensor(), grad_scale, Tensor()};
  }
};

// ---------------------------------------------------------------------------------------------
// site_penalty(_draw)
// ---------------------------------------------------------------------------------------------

void save_site(AutogradContext* ctx, const Tensor& h, const OptTensor& g_e, const OptTensor& g_i, double q,
               c10::string_view noise, const Tensor& rng) {
  ctx->saved_data["q"] = q;
  ctx->saved_data["noise"] = std::string(noise);
  ctx->save_for_backward({h, g_e.value_or(Tensor()), g_i.value_or(Tensor()), rng});
  ctx->set_materialize_grads(false);  // no zeros for a draw's state (no gradient)
}

// dh, dg_e, dg_i for grad = [a, b]; undefined for a missing g_e / g_i.
variable_list site_backward(AutogradContext* ctx, const Tensor& grad) {
  if (!grad.defined()) return {Tensor(), Tensor(), Tensor()};
  const auto saved = ctx->get_saved_variables();
  const Tensor &h = saved[0], &g_e = saved[1], &g_i = saved[2], &rng = saved[3];
  const std::string noise = ctx->saved_data["noise"].toStringRef();
  auto [dh, dge, dgi] = in_backward([&] {
    return site_penalty_backward_op().call(grad.contiguous(), h, opt(g_e), opt(g_i), ctx->saved_data["q"].toDouble(),
                                           noise, rng);
  });
  return {dh, g_e.defined() ? dge : Tensor(), g_i.defined() ? dgi : Tensor()};
}

class SitePenaltyFunction : public torch::autograd::Function<SitePenaltyFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& h, const OptTensor& g_e, const OptTensor& g_i, double q,
                        c10::string_view noise, const Tensor& rng) {
    save_site(ctx, h, g_e, g_i, q, noise, rng);
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return site_penalty_op().call(h, g_e, g_i, q, noise, rng);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out = site_backward(ctx, grads[0]);
    out.resize(6);
    return out;
  }
};

class SitePenaltyDrawFunction : public torch::autograd::Function<SitePenaltyDrawFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& h, const OptTensor& g_e, const OptTensor& g_i,
                               double q, c10::string_view noise, std::optional<int64_t> seed) {
    Tensor out, rng;
    {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(out, rng) = site_penalty_draw_op().call(h, g_e, g_i, q, noise, seed);
    }
    save_site(ctx, h, g_e, g_i, q, noise, rng);
    ctx->mark_non_differentiable({rng});
    return {out, rng};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out = site_backward(ctx, grads[0]);
    out.resize(6);
    return out;
  }
};

// ---------------------------------------------------------------------------------------------
// The Autograd kernels
// ---------------------------------------------------------------------------------------------

template <size_t... I>
auto as_tuple(const variable_list& v, std::index_sequence<I...>) {
  return std::make_tuple(v[I]...);
}

template <size_t N>
auto as_tuple(const variable_list& v) {
  return as_tuple(v, std::make_index_sequence<N>{});
}

Tensor dropout_autograd(const Tensor& x, double p, const Tensor& rng) { return DropoutFunction::apply(x, p, rng); }

std::tuple<Tensor, Tensor> dropout_draw_autograd(const Tensor& x, double p, std::optional<int64_t> seed) {
  return as_tuple<2>(DropoutDrawFunction::apply(x, p, seed));
}

Tensor dropout_indexed_autograd(const Tensor& x, double p, const Tensor& rng, c10::IntArrayRef index_strides,
                                int64_t index_base) {
  return DropoutIndexedFunction::apply(x, p, rng, index_strides, index_base);
}

std::tuple<Tensor, Tensor> dropout_indexed_draw_autograd(const Tensor& x, double p, c10::IntArrayRef index_strides,
                                                         int64_t index_base, std::optional<int64_t> seed) {
  return as_tuple<2>(DropoutIndexedDrawFunction::apply(x, p, index_strides, index_base, seed));
}

CeSample ce_sample_autograd(const Tensor& z, const Tensor& target, const Tensor& rng, int64_t ignore_index) {
  return as_tuple<3>(CrossEntropySampleFunction::apply(z, target, rng, ignore_index));
}

std::tuple<Tensor, Tensor, Tensor, Tensor> ce_sample_draw_autograd(const Tensor& z, const Tensor& target,
                                                                   int64_t ignore_index, std::optional<int64_t> seed) {
  return as_tuple<4>(CrossEntropySampleDrawFunction::apply(z, target, ignore_index, seed));
}

CeSampleGrad ce_sample_grad_autograd(const Tensor& z, const Tensor& target, const Tensor& rng, int64_t ignore_index,
                                     const OptTensor& true_scale) {
  return as_tuple<5>(CrossEntropySampleGradFunction::apply(z, target, rng, ignore_index, true_scale));
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> ce_sample_grad_draw_autograd(
    const Tensor& z, const Tensor& target, int64_t ignore_index, const OptTensor& true_scale,
    std::optional<int64_t> seed) {
  return as_tuple<6>(CrossEntropySampleGradDrawFunction::apply(z, target, ignore_index, true_scale, seed));
}

Tensor ce_grad_autograd(const Tensor& z, const Tensor& lse, const Tensor& label, const Tensor& row_scale,
                        int64_t ignore_index) {
  return CeGradFunction::apply(z, lse, label, row_scale, ignore_index);
}

Tensor site_penalty_autograd(const Tensor& h, const OptTensor& g_e, const OptTensor& g_i, double q,
                             c10::string_view noise, const Tensor& rng) {
  return SitePenaltyFunction::apply(h, g_e, g_i, q, noise, rng);
}

std::tuple<Tensor, Tensor> site_penalty_draw_autograd(const Tensor& h, const OptTensor& g_e, const OptTensor& g_i,
                                                      double q, c10::string_view noise, std::optional<int64_t> seed) {
  return as_tuple<2>(SitePenaltyDrawFunction::apply(h, g_e, g_i, q, noise, seed));
}

}  // namespace

TORCH_LIBRARY_IMPL(dropreg, Autograd, m) {
  m.impl("dropout", &dropout_autograd);
  m.impl("dropout_draw", &dropout_draw_autograd);
  m.impl("dropout_indexed", &dropout_indexed_autograd);
  m.impl("dropout_indexed_draw", &dropout_indexed_draw_autograd);
  m.impl("cross_entropy_sample", &ce_sample_autograd);
  m.impl("cross_entropy_sample_draw", &ce_sample_draw_autograd);
  m.impl("cross_entropy_sample_grad", &ce_sample_grad_autograd);
  m.impl("cross_entropy_sample_grad_draw", &ce_sample_grad_draw_autograd);
  m.impl("ce_grad", &ce_grad_autograd);
  m.impl("site_penalty", &site_penalty_autograd);
  m.impl("site_penalty_draw", &site_penalty_draw_autograd);
}

}  // namespace dropreg
