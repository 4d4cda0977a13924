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
// The nodes are written as torch's generated ones are (a Node with its saved state, wired by
// set_history), not as torch::autograd::Function: that costs a fraction of the host time per call
// (no IValue maps, no output wrapping), which is what decides small calls (bench --only overhead).
// Forward-mode AD is not implemented and says so.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include "registered_ops.h"

#include <array>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace dropreg {
namespace {

using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// ---------------------------------------------------------------------------------------------
// Nodes and their wiring
// ---------------------------------------------------------------------------------------------

// torch holds autograd nodes by c10::intrusive_ptr (2.14) or by std::shared_ptr freed with deleteNode,
// which unwinds long chains without recursion (2.11): getptr() tells which.
using NodePtr = decltype(std::declval<Node&>().getptr());

template <typename T>
auto new_node() {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<Node>>) {
    return std::shared_ptr<T>(new T(), [](T* node) { deleteNode(node); });  // found by ADL, where it exists
  } else {
    return c10::make_intrusive<T>();
  }
}

// A node of type T for this call if autograd records it (grad mode on and an input requiring grad),
// else null. `inputs` are the differentiable inputs, in the order T::apply returns their gradients.
template <typename T, typename... Inputs>
auto record(const Inputs&... inputs) -> decltype(new_node<T>()) {
  TORCH_CHECK_NOT_IMPLEMENTED(!(torch::autograd::isFwGradDefined(inputs) || ...), "dropreg::", T::kOp,
                              ": forward-mode AD is not implemented; use reverse mode (backward, autograd.grad)");
  if (!torch::autograd::compute_requires_grad(inputs...)) return nullptr;
  auto node = new_node<T>();
  node->set_next_edges(torch::autograd::collect_next_edges(inputs...));
  return node;
}

// The base of our nodes: their name, and their saved tensors freed once a backward that does not
// retain the graph has run (SavedVariable then raises torch's "backward a second time" error).
template <typename Derived, size_t kSaved>
struct SavingNode : Node {
  std::string name() const override { return std::string("dropreg::") + Derived::kOp + "Backward"; }

  void release_variables() override {
    const std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable& s : saved) s.reset_data();
  }

  // The saved tensors; an output of this node's own op (is_output) is unpacked with the node.
  std::array<Tensor, kSaved> unpack() {
    const std::lock_guard<std::mutex> lock(mutex_);
    std::array<Tensor, kSaved> out;
    for (size_t i = 0; i < kSaved; ++i) out[i] = saved[i].unpack(getptr());
    return out;
  }

  SavedVariable saved[kSaved];
};

// A backward's op call: recorded by autograd while a graph is being built, below autograd otherwise.
template <typename Call>
auto below_autograd(const Call& call) {
  const at::AutoDispatchBelowADInplaceOrView below;
  return call();
}

template <typename Call>
auto in_backward(const Call& call) {
  return at::GradMode::is_enabled() ? call() : below_autograd(call);
}

OptTensor opt(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// ---------------------------------------------------------------------------------------------
// dropout, dropout_draw, dropout_indexed(_draw)
// ---------------------------------------------------------------------------------------------

// Under create_graph the gradient's dropout is recorded too, which gives every higher order.
struct DropoutBackward : SavingNode<DropoutBackward, 1> {  // saved: rng
  static constexpr const char* kOp = "dropout";
  double p = 0;

  variable_list apply(variable_list&& grads) override {
    if (!grads[0].defined()) return {Tensor()};
    const Tensor rng = unpack()[0];
    return {in_backward([&] { return dropout_op().call(grads[0], p, rng); })};
  }
};

Tensor wire_dropout(const Tensor& x, double p, const Tensor& rng, const Tensor& y) {
  if (auto node = record<DropoutBackward>(x)) {
    node->p = p;
    node->saved[0] = SavedVariable(rng, false);
    torch::autograd::set_history(y, node);
  }
  return y;
}

Tensor dropout_autograd(const Tensor& x, double p, const Tensor& rng) {
  return wire_dropout(x, p, rng, below_autograd([&] { return dropout_op().call(x, p, rng); }));
}

std::tuple<Tensor, Tensor> dropout_draw_autograd(const Tensor& x, double p, std::optional<int64_t> seed) {
  auto [y, rng] = below_autograd([&] { return dropout_draw_op().call(x, p, seed); });
  return {wire_dropout(x, p, rng, y), rng};
}

// The same with the mask at each element's logical index (linear in x too).
struct DropoutIndexedBackward : SavingNode<DropoutIndexedBackward, 1> {  // saved: rng
  static constexpr const char* kOp = "dropout_indexed";
  double p = 0;
  std::vector<int64_t> index_strides;
  int64_t index_base = 0;

  variable_list apply(variable_list&& grads) override {
    if (!grads[0].defined()) return {Tensor()};
    const Tensor rng = unpack()[0];
    return {in_backward([&] { return dropout_indexed_op().call(grads[0], p, rng, index_strides, index_base); })};
  }
};

Tensor wire_dropout_indexed(const Tensor& x, double p, const Tensor& rng, c10::IntArrayRef index_strides,
                            int64_t index_base, const Tensor& y) {
  if (auto node = record<DropoutIndexedBackward>(x)) {
    node->p = p;
    node->index_strides = index_strides.vec();
    node->index_base = index_base;
    node->saved[0] = SavedVariable(rng, false);
    torch::autograd::set_history(y, node);
  }
  return y;
}

Tensor dropout_indexed_autograd(const Tensor& x, double p, const Tensor& rng, c10::IntArrayRef index_strides,
                                int64_t index_base) {
  const Tensor y = below_autograd([&] { return dropout_indexed_op().call(x, p, rng, index_strides, index_base); });
  return wire_dropout_indexed(x, p, rng, index_strides, index_base, y);
}

std::tuple<Tensor, Tensor> dropout_indexed_draw_autograd(const Tensor& x, double p, c10::IntArrayRef index_strides,
                                                         int64_t index_base, std::optional<int64_t> seed) {
  auto [y, rng] = below_autograd([&] { return dropout_indexed_draw_op().call(x, p, index_strides, index_base, seed); });
  return {wire_dropout_indexed(x, p, rng, index_strides, index_base, y), rng};
}

// ---------------------------------------------------------------------------------------------
// cross_entropy_sample(_draw), cross_entropy_sample_grad(_draw), ce_grad
// ---------------------------------------------------------------------------------------------

// The gradient in z of ⟨grad_lse, lse⟩: grad_lse ⊙ softmax(z) (undefined if grad_lse is).
Tensor lse_grad(const Tensor& z, const Tensor& lse, const Tensor& grad_lse) {
  if (!grad_lse.defined()) return Tensor();
  return (grad_lse.unsqueeze(1) * at::exp(z.to(lse.scalar_type()) - lse.unsqueeze(1))).to(z.scalar_type());
}

Tensor add_defined(const Tensor& a, const Tensor& b) {
  if (!a.defined()) return b;
  return b.defined() ? a + b : a;
}

// d/dz of ⟨grad_loss, loss⟩ + ⟨grad_lse, lse⟩ for cross_entropy_sample's outputs (loss, lse; ŷ
// and the state are not differentiable).
struct CeSampleBackward : SavingNode<CeSampleBackward, 3> {  // saved: z, target, lse (an output)
  static constexpr const char* kOp = "cross_entropy_sample";
  static constexpr bool kSavesTrueScale = false;
  int64_t ignore_index = 0;

  variable_list apply(variable_list&& grads) override {
    const Tensor &grad_loss = grads[0], &grad_lse = grads[1];
    const auto s = unpack();
    const Tensor &z = s[0], &target = s[1], &lse = s[2];
    Tensor grad_z;
    if (grad_loss.defined()) {
      const Tensor row_scale = grad_loss.to(lse.scalar_type());
      grad_z = in_backward([&] { return ce_grad_op().call(z, lse, target, row_scale, ignore_index); });
    }
    return {add_defined(grad_z, lse_grad(z, lse, grad_lse))};
  }
};

// Wires the node of a cross-entropy op whose differentiable outputs are `outputs` (loss, lse, ...).
template <typename T>
void wire_ce(const Tensor& z, const Tensor& target, const Tensor& lse, int64_t ignore_index,
             std::initializer_list<Tensor> outputs, const Tensor& true_scale = Tensor()) {
  if (auto node = record<T>(z)) {
    node->ignore_index = ignore_index;
    for (const Tensor& out : outputs) torch::autograd::set_history(out, node);
    node->saved[0] = SavedVariable(z, false);
    node->saved[1] = SavedVariable(target, false);
    node->saved[2] = SavedVariable(lse, true);
    if constexpr (T::kSavesTrueScale) node->saved[3] = SavedVariable(true_scale, false);
  }
}

CeSample ce_sample_autograd(const Tensor& z, const Tensor& target, const Tensor& rng, int64_t ignore_index) {
  auto [loss, lse, yhat] = below_autograd([&] { return ce_sample_op().call(z, target, rng, ignore_index); });
  wire_ce<CeSampleBackward>(z, target, lse, ignore_index, {loss, lse});
  return {loss, lse, yhat};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> ce_sample_draw_autograd(const Tensor& z, const Tensor& target,
                                                                   int64_t ignore_index, std::optional<int64_t> seed) {
  auto [loss, lse, yhat, rng] = below_autograd([&] { return ce_sample_draw_op().call(z, target, ignore_index, seed); });
  wire_ce<CeSampleBackward>(z, target, lse, ignore_index, {loss, lse});
  return {loss, lse, yhat, rng};
}

// d/dz of the cotangents of cross_entropy_sample_grad's loss, lse, G and G_true: one backward op for
// loss, G and G_true (ŷ fixed by the draw), softmax for lse.
struct CeSampleGradBackward : SavingNode<CeSampleGradBackward, 4> {  // saved: z, target, lse, true_scale
  static constexpr const char* kOp = "cross_entropy_sample_grad";
  static constexpr bool kSavesTrueScale = true;
  int64_t ignore_index = 0;

  variable_list apply(variable_list&& grads) override {  // grads: loss, lse, G, G_true
    const auto s = unpack();
    const Tensor &z = s[0], &target = s[1], &lse = s[2], &true_scale = s[3];
    const Tensor &grad_loss = grads[0], &grad_lse = grads[1], &grad_g = grads[2];
    // Without true_scale the node has no G_true output (wire_ce_sample_grad).
    const Tensor grad_g_true = true_scale.defined() ? grads[3] : Tensor();
    Tensor grad_z;
    if (grad_loss.defined() || grad_g.defined() || grad_g_true.defined()) {
      const OptTensor loss_cotangent = grad_loss.defined() ? OptTensor(grad_loss.to(lse.scalar_type())) : std::nullopt;
      grad_z = in_backward([&] {
        return ce_sample_grad_backward_op().call(loss_cotangent, opt(grad_g), opt(grad_g_true), z, lse, target,
                                                 opt(true_scale), ignore_index);
      });
    }
    return {add_defined(grad_z, lse_grad(z, lse, grad_lse))};
  }
};

// Without true_scale, G_true is an empty placeholder: not an output of the node.
void wire_ce_sample_grad(const Tensor& z, const Tensor& target, int64_t ignore_index, const OptTensor& true_scale,
                         const Tensor& loss, const Tensor& lse, const Tensor& grad, const Tensor& grad_true) {
  if (true_scale.has_value()) {
    wire_ce<CeSampleGradBackward>(z, target, lse, ignore_index, {loss, lse, grad, grad_true}, *true_scale);
  } else {
    wire_ce<CeSampleGradBackward>(z, target, lse, ignore_index, {loss, lse, grad});
  }
}

CeSampleGrad ce_sample_grad_autograd(const Tensor& z, const Tensor& target, const Tensor& rng, int64_t ignore_index,
                                     const OptTensor& true_scale) {
  auto [loss, lse, yhat, grad, grad_true] =
      below_autograd([&] { return ce_sample_grad_op().call(z, target, rng, ignore_index, true_scale); });
  wire_ce_sample_grad(z, target, ignore_index, true_scale, loss, lse, grad, grad_true);
  return {loss, lse, yhat, grad, grad_true};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> ce_sample_grad_draw_autograd(
    const Tensor& z, const Tensor& target, int64_t ignore_index, const OptTensor& true_scale,
    std::optional<int64_t> seed) {
  auto [loss, lse, yhat, grad, grad_true, rng] =
      below_autograd([&] { return ce_sample_grad_draw_op().call(z, target, ignore_index, true_scale, seed); });
  wire_ce_sample_grad(z, target, ignore_index, true_scale, loss, lse, grad, grad_true);
  return {loss, lse, yhat, grad, grad_true, rng};
}

// G = row_scale ⊙ (softmax(z) - onehot(label)), a function of z and row_scale (lse = logsumexp(z)
// is an input for speed, not differentiated): its VJP is ce_grad_backward.
struct CeGradBackward : SavingNode<CeGradBackward, 4> {  // saved: z, lse, label, row_scale
  static constexpr const char* kOp = "ce_grad";
  int64_t ignore_index = 0;

  variable_list apply(variable_list&& grads) override {  // returns: z, row_scale
    if (!grads[0].defined()) return {Tensor(), Tensor()};
    const auto s = unpack();
    auto [grad_z, grad_scale] =
        in_backward([&] { return ce_grad_backward_op().call(grads[0], s[0], s[1], s[2], s[3], ignore_index); });
    return {grad_z, grad_scale};
  }
};

Tensor ce_grad_autograd(const Tensor& z, const Tensor& lse, const Tensor& label, const Tensor& row_scale,
                        int64_t ignore_index) {
  const Tensor out = below_autograd([&] { return ce_grad_op().call(z, lse, label, row_scale, ignore_index); });
  if (auto node = record<CeGradBackward>(z, row_scale)) {
    node->ignore_index = ignore_index;
    node->saved[0] = SavedVariable(z, false);
    node->saved[1] = SavedVariable(lse, false);
    node->saved[2] = SavedVariable(label, false);
    node->saved[3] = SavedVariable(row_scale, false);
    torch::autograd::set_history(out, node);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// site_penalty(_draw)
// ---------------------------------------------------------------------------------------------

// dh, dg_e, dg_i for grad = [a, b] (η regenerated from rng); undefined for a missing g_e / g_i.
struct SitePenaltyBackward : SavingNode<SitePenaltyBackward, 4> {  // saved: h, g_e, g_i, rng
  static constexpr const char* kOp = "site_penalty";
  double q = 0;
  std::string noise;

  variable_list apply(variable_list&& grads) override {  // returns: h, g_e, g_i
    if (!grads[0].defined()) return {Tensor(), Tensor(), Tensor()};
    const auto s = unpack();
    const Tensor &h = s[0], &g_e = s[1], &g_i = s[2], &rng = s[3];
    auto [dh, dge, dgi] = in_backward([&] {
      return site_penalty_backward_op().call(grads[0].contiguous(), h, opt(g_e), opt(g_i), q, noise, rng);
    });
    return {dh, g_e.defined() ? dge : Tensor(), g_i.defined() ? dgi : Tensor()};
  }
};

Tensor wire_site(const Tensor& h, const OptTensor& g_e, const OptTensor& g_i, double q, c10::string_view noise,
                 const Tensor& rng, const Tensor& out) {
  if (auto node = record<SitePenaltyBackward>(h, g_e, g_i)) {
    node->q = q;
    node->noise = std::string(noise);
    node->saved[0] = SavedVariable(h, false);
    node->saved[1] = SavedVariable(g_e.value_or(Tensor()), false);
    node->saved[2] = SavedVariable(g_i.value_or(Tensor()), false);
    node->saved[3] = SavedVariable(rng, false);
    torch::autograd::set_history(out, node);
  }
  return out;
}

Tensor site_penalty_autograd(const Tensor& h, const OptTensor& g_e, const OptTensor& g_i, double q,
                             c10::string_view noise, const Tensor& rng) {
  const Tensor out = below_autograd([&] { return site_penalty_op().call(h, g_e, g_i, q, noise, rng); });
  return wire_site(h, g_e, g_i, q, noise, rng, out);
}

std::tuple<Tensor, Tensor> site_penalty_draw_autograd(const Tensor& h, const OptTensor& g_e, const OptTensor& g_i,
                                                      double q, c10::string_view noise, std::optional<int64_t> seed) {
  auto [out, rng] = below_autograd([&] { return site_penalty_draw_op().call(h, g_e, g_i, q, noise, seed); });
  return {wire_site(h, g_e, g_i, q, noise, rng, out), rng};
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
