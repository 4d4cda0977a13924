// Cross-entropy with a sampled label on CUDA (docs/design.md §2, fused op 2).
//
//   cross_entropy_sample       one read pass over each row of z (N, C):
//                                lse_r  = log Σ_c exp(z_rc)
//                                ŷ_r    = argmax_c (z_rc + G_rc)    (Gumbel-max, G: contract v3)
//                                loss_r = lse_r - z_r[target_r]
//                              bytes/elem: sizeof(T) read, nothing written per element.
//   cross_entropy_sample_grad  the same kernel, keeping the row in shared memory, then
//                                G_rc = exp(z_rc - lse_r) - [c == ŷ_r]    (0 on ignored rows)
//                              from it: sizeof(T) read + sizeof(T) written. loss, lse and ŷ are
//                              cross_entropy_sample's bits (the same kernel computes them), G is
//                              ce_grad's (the same formula). Rows that do not fit on chip: the
//                              sample, then ce_grad (z read twice).
//   ce_grad                    G_rc = row_scale_r · (exp(z_rc - lse_r) - [c == label_r]) over the
//                              sample's row layout: sizeof(T) read + sizeof(T) written.
//   ce_grad_backward           grad_z = row_scale · p ⊙ (u - ⟨p, u⟩), grad_row_scale = ⟨p, u⟩ - u[label]:
//                              z and u read once and kept in shared memory for the second pass
//                              when the row fits (2·sizeof(T) read + sizeof(T) written), else read
//                              twice (4·sizeof(T) read; the second read hits L2 for short rows).
//
// The kernels are templates in headers, one per family: cross_entropy_sample_kernel.cuh (the
// sample, its fused gradient and the merge of split rows), ce_grad_kernel.cuh,
// ce_grad_backward_kernel.cuh; what they share (chunks, the row layout, a work item's chunks) is
// in cross_entropy_common.cuh. This file holds the host side: argument checks, allocation, the
// row plan and the launches. The sample kernel reads its state from a cuda::RngArg (rng.cuh): the
// `rng` tensor, or, for the _draw ops, torch's generator's Philox state, which its first launch
// writes to the draw's rng output (one launch per call where the op is one kernel).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "ce_grad_backward_kernel.cuh"
#include "ce_grad_kernel.cuh"
#include "cross_entropy_common.cuh"
#include "cross_entropy_host.h"
#include "cross_entropy_sample_kernel.cuh"
#include "cuda_utils.cuh"
#include "rng.cuh"
#include "static_switch.h"

namespace dropreg {
namespace {

using ce::BackwardArgs;
using ce::BackwardChunk;
using ce::GradArgs;
using ce::RowPlan;
using ce::SampleArgs;
using ce::SampleChunk;
using ce::SamplePartial;
using cuda::ChunkShape;
using cuda::grid_size;
using cuda::is_aligned;
using cuda::max_dynamic_smem;

// Launches a row kernel over the plan's work items of `rows` rows, with `smem` bytes of dynamic
// shared memory (the caller checked that they fit: max_dynamic_smem).
template <typename Kernel, typename Args>
void launch_rows(Kernel kernel, const RowPlan& plan, int64_t rows, size_t smem, const Args& args) {
  const int threads = ce::plan_threads(plan);
  kernel<<<grid_size(kernel, ce::plan_blocks(plan, rows), threads, smem), threads, smem,
           at::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// lse, label and row_scale (N,) as the row kernels read them: contiguous.
struct RowInputs {
  at::Tensor lse;
  at::Tensor label;
  at::Tensor row_scale;

  RowInputs(const at::Tensor& lse_in, const at::Tensor& label_in, const at::Tensor& row_scale_in)
      : lse(lse_in.contiguous()), label(label_in.contiguous()), row_scale(row_scale_in.contiguous()) {}
};

// loss, lse, ŷ into the given tensors, and the fused gradient into `grad` when it is defined
// and the row fits on chip. Returns whether it wrote `grad`.
bool sample_into(const at::Tensor& zc, const at::Tensor& tc, const cuda::RngArg& rng, int64_t ignore_index,
                 at::Tensor& loss, at::Tensor& lse, at::Tensor& yhat, at::Tensor* grad) {
  const int64_t rows = zc.size(0);
  const int64_t cols = zc.size(1);
  check_cuda_columns(cols);
  bool fused = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, zc.scalar_type(), "cross_entropy_sample_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const RowPlan plan = ce::plan_rows<SampleChunk<scalar_t>>(cols, 1, true);
    const auto kernel = BOOL_SWITCH(plan.block_mode, kBlockMode, [&] {
      return ce::cross_entropy_sample_kernel<scalar_t, acc_t, kBlockMode>;
    });
    const size_t smem = ce::stash_bytes<SampleChunk<scalar_t>>(plan, 1);
    fused = grad != nullptr && plan.splits == 1 && smem <= max_dynamic_smem(kernel);
    at::Tensor partials;
    if (plan.splits > 1) {
      partials = at::empty({rows * plan.splits * static_cast<int64_t>(sizeof(SamplePartial<acc_t>))},
                           zc.options().dtype(at::kByte));
    }
    const scalar_t* zp = zc.const_data_ptr<scalar_t>();
    scalar_t* gp = fused ? grad->data_ptr<scalar_t>() : nullptr;
    const uintptr_t align = ChunkShape<scalar_t>::kAlign;
    const SampleArgs<scalar_t, acc_t> args{
        zp, tc.const_data_ptr<int64_t>(), rng, loss.data_ptr<acc_t>(),
        lse.data_ptr<acc_t>(), yhat.data_ptr<int64_t>(),
        plan.splits > 1 ? reinterpret_cast<SamplePartial<acc_t>*>(partials.data_ptr()) : nullptr, gp, rows, cols,
        ignore_index, plan, is_aligned(zp, align) && is_aligned(gp, align)};
    launch_rows(kernel, plan, rows, fused ? smem : 0, args);
    if (plan.splits > 1) {  // the split rows' states merged in split order
      constexpr int kThreads = ce::kElementwiseThreads;
      const auto merge = ce::cross_entropy_merge_kernel<scalar_t, acc_t>;
      const int64_t blocks = (rows + kThreads - 1) / kThreads;
      merge<<<grid_size(merge, blocks, kThreads), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return fused;
}

// loss and lse (z's accumulation dtype) and ŷ (int64), one per row of z.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_outputs(const at::Tensor& z) {
  const auto rows = z.size(0);
  return {at::empty({rows}, z.options().dtype(acc_type(z))), at::empty({rows}, z.options().dtype(acc_type(z))),
          at::empty({rows}, z.options().dtype(at::kLong))};
}

// loss, lse and ŷ at the state `rng` (a draw's launch writes the state it drew, also for N = 0).
std::tuple<at::Tensor, at::Tensor, at::Tensor> launch_sample(const at::Tensor& z, const at::Tensor& target,
                                                             const cuda::RngArg& rng, int64_t ignore_index) {
  const c10::cuda::CUDAGuard guard(z.device());
  auto [loss, lse, yhat] = sample_outputs(z);
  if (z.size(0) == 0) {
    cuda::write_rng(rng, at::cuda::getCurrentCUDAStream());
    return {loss, lse, yhat};
  }
  sample_into(z.contiguous(), target.contiguous(), rng, ignore_index, loss, lse, yhat, nullptr);
  return {loss, lse, yhat};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_sample_cuda(const at::Tensor& z,
                                                                         const at::Tensor& target,
                                                                         const at::Tensor& rng,
                                                                         int64_t ignore_index) {
  check_cross_entropy_sample_args(z, target, rng);
  const at::Tensor rc = rng.contiguous();
  return launch_sample(z, target, cuda::given_rng(rc), ignore_index);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_entropy_sample_draw_cuda(
    const at::Tensor& z, const at::Tensor& target, int64_t ignore_index, std::optional<int64_t> seed) {
  check_cross_entropy_sample_draw_args(z, target);
  auto [rng, state] = cuda::draw_rng(z, seed);
  auto [loss, lse, yhat] = launch_sample(z, target, rng, ignore_index);
  return {loss, lse, yhat, state};
}

at::Tensor ce_grad_cuda(const at::Tensor& z, const at::Tensor& lse, const at::Tensor& label,
                        const at::Tensor& row_scale, int64_t ignore_index) {
  check_ce_grad_args(z, lse, label, row_scale);
  const c10::cuda::CUDAGuard guard(z.device());
  const at::Tensor zc = z.contiguous();
  at::Tensor out = at::empty_like(zc, at::MemoryFormat::Contiguous);
  if (zc.numel() == 0) return out;
  const int64_t rows = zc.size(0);
  const int64_t cols = zc.size(1);
  check_cuda_columns(cols);
  const RowInputs in(lse, label, row_scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, zc.scalar_type(), "ce_grad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const RowPlan plan = ce::plan_rows<SampleChunk<scalar_t>>(cols, 1, true);
    const scalar_t* zp = zc.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const uintptr_t align = ChunkShape<scalar_t>::kAlign;
    const GradArgs<scalar_t, acc_t> args{zp, in.lse.const_data_ptr<acc_t>(), in.label.const_data_ptr<int64_t>(),
                                         in.row_scale.const_data_ptr<acc_t>(), op, rows, cols, ignore_index, plan,
                                         is_aligned(zp, align) && is_aligned(op, align)};
    BOOL_SWITCH(plan.block_mode, kBlockMode, [&] {
      launch_rows(ce::ce_grad_kernel<scalar_t, acc_t, kBlockMode>, plan, rows, 0, args);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> ce_grad_backward_cuda(const at::Tensor& u, const at::Tensor& z,
                                                         const at::Tensor& lse,
                                                         const at::Tensor& label,
                                                         const at::Tensor& row_scale,
                                                         int64_t ignore_index) {
  check_ce_grad_args(z, lse, label, row_scale);
  check_cotangent(u, z);
  const c10::cuda::CUDAGuard guard(z.device());
  const at::Tensor zc = z.contiguous();
  const at::Tensor uc = u.contiguous();
  at::Tensor grad_z = at::empty_like(zc, at::MemoryFormat::Contiguous);
  at::Tensor grad_row_scale = at::empty_like(row_scale, at::MemoryFormat::Contiguous);
  const int64_t rows = zc.size(0);
  const int64_t cols = zc.size(1);
  if (rows == 0) return {grad_z, grad_row_scale};
  check_cuda_columns(cols);
  const RowInputs in(lse, label, row_scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, zc.scalar_type(), "ce_grad_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const RowPlan plan = ce::plan_rows<BackwardChunk<scalar_t>>(cols, 2, false);
    BOOL_SWITCH(plan.block_mode, kBlockMode, [&] {
      const auto kernel = ce::ce_grad_backward_kernel<scalar_t, acc_t, kBlockMode>;
      const size_t stash = ce::stash_bytes<BackwardChunk<scalar_t>>(plan, 2);
      const bool on_chip = stash <= static_cast<size_t>(ce::kOnChipBytes) && stash <= max_dynamic_smem(kernel);
      const uintptr_t align = ChunkShape<scalar_t>::kAlign;
      const scalar_t* up = uc.const_data_ptr<scalar_t>();
      const scalar_t* zp = zc.const_data_ptr<scalar_t>();
      scalar_t* gp = grad_z.data_ptr<scalar_t>();
      const BackwardArgs<scalar_t, acc_t> args{
          up, zp, in.lse.const_data_ptr<acc_t>(), in.label.const_data_ptr<int64_t>(),
          in.row_scale.const_data_ptr<acc_t>(), gp, grad_row_scale.data_ptr<acc_t>(), rows, cols, ignore_index,
          plan, is_aligned(up, align) && is_aligned(zp, align) && is_aligned(gp, align), on_chip};
      launch_rows(kernel, plan, rows, on_chip ? stash : 0, args);
    });
  });
  return {grad_z, grad_row_scale};
}

// The sample and G = exp(z - lse) - onehot(ŷ) (0 on ignored rows) in one kernel when the row fits
// on chip; otherwise the sample, then ce_grad(z, lse, ŷ, 1) on the valid rows (z read twice). With
// true_scale, G_true = ce_grad(z, lse, target, true_scale) by one more ce_grad pass. At the state
// `rng`, as launch_sample.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> launch_sample_grad(
    const at::Tensor& z, const at::Tensor& target, const cuda::RngArg& rng, int64_t ignore_index,
    const std::optional<at::Tensor>& true_scale) {
  const c10::cuda::CUDAGuard guard(z.device());
  auto [loss, lse, yhat] = sample_outputs(z);
  at::Tensor grad = at::empty_like(z, at::MemoryFormat::Contiguous);
  at::Tensor grad_true = true_scale ? at::empty_like(z, at::MemoryFormat::Contiguous) : z.new_empty({0});
  if (z.size(0) == 0) {
    cuda::write_rng(rng, at::cuda::getCurrentCUDAStream());
    return {loss, lse, yhat, grad, grad_true};
  }
  const at::Tensor zc = z.contiguous();
  if (!sample_into(zc, target.contiguous(), rng, ignore_index, loss, lse, yhat, &grad)) {
    const at::Tensor label = yhat.masked_fill(target == ignore_index, kSampledLabelIgnore);
    grad = ce_grad_cuda(zc, lse, label, at::ones_like(lse), kSampledLabelIgnore);
  }
  if (true_scale) grad_true = ce_grad_cuda(zc, lse, target, *true_scale, ignore_index);
  return {loss, lse, yhat, grad, grad_true};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_entropy_sample_grad_cuda(
    const at::Tensor& z, const at::Tensor& target, const at::Tensor& rng, int64_t ignore_index,
    const std::optional<at::Tensor>& true_scale) {
  check_cross_entropy_sample_args(z, target, rng);
  check_true_scale(true_scale, z);
  const at::Tensor rc = rng.contiguous();
  return launch_sample_grad(z, target, cuda::given_rng(rc), ignore_index, true_scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_entropy_sample_grad_draw_cuda(
    const at::Tensor& z, const at::Tensor& target, int64_t ignore_index, const std::optional<at::Tensor>& true_scale,
    std::optional<int64_t> seed) {
  check_cross_entropy_sample_draw_args(z, target);
  check_true_scale(true_scale, z);
  auto [rng, state] = cuda::draw_rng(z, seed);
  auto [loss, lse, yhat, grad, grad_true] = launch_sample_grad(z, target, rng, ignore_index, true_scale);
  return {loss, lse, yhat, grad, grad_true, state};
}

// The fused op's backward from the other kernels: ce_grad_backward of w = grad_g + true_scale·grad_g_true
// (formed in the accumulation dtype, rounded once to z's) plus ce_grad of grad_loss.
at::Tensor cross_entropy_sample_grad_backward_cuda(const std::optional<at::Tensor>& grad_loss,
                                                   const std::optional<at::Tensor>& grad_g,
                                                   const std::optional<at::Tensor>& grad_g_true, const at::Tensor& z,
                                                   const at::Tensor& lse, const at::Tensor& target,
                                                   const std::optional<at::Tensor>& true_scale, int64_t ignore_index) {
  check_sample_grad_backward_args(grad_loss, grad_g, grad_g_true, z, lse, target, true_scale);
  const c10::cuda::CUDAGuard guard(z.device());
  const at::Tensor ones = at::ones_like(lse);
  at::Tensor grad_z;
  if (grad_g || grad_g_true) {
    at::Tensor w = grad_g ? grad_g->to(acc_type(z)) : at::zeros_like(z, z.options().dtype(acc_type(z)));
    if (grad_g_true) w = w + true_scale->unsqueeze(1) * grad_g_true->to(acc_type(z));
    grad_z = std::get<0>(ce_grad_backward_cuda(w.to(z.scalar_type()), z, lse, target, ones, ignore_index));
  }
  if (grad_loss) {
    const at::Tensor from_loss = ce_grad_cuda(z, lse, target, *grad_loss, ignore_index);
    grad_z = grad_z.defined() ? grad_z + from_loss : from_loss;
  }
  return grad_z.defined() ? grad_z : at::zeros_like(z, at::MemoryFormat::Contiguous);
}

}  // namespace

TORCH_LIBRARY_IMPL(dropreg, CUDA, m) {
  m.impl("cross_entropy_sample", &cross_entropy_sample_cuda);
  m.impl("cross_entropy_sample_grad", &cross_entropy_sample_grad_cuda);
  m.impl("cross_entropy_sample_draw", &cross_entropy_sample_draw_cuda);
  m.impl("cross_entropy_sample_grad_draw", &cross_entropy_sample_grad_draw_cuda);
  m.impl("cross_entropy_sample_grad_backward", &cross_entropy_sample_grad_backward_cuda);
  m.impl("ce_grad", &ce_grad_cuda);
  m.impl("ce_grad_backward", &ce_grad_backward_cuda);
}

}  // namespace dropreg
