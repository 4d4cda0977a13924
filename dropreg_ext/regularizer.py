"""Training objectives: :class:`DropoutRegularizer` (dropout's explicit and implicit regularizers,
fused) and :func:`k_sample_loss` (DROPOUT_k)."""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, Iterator, Optional

import torch

from . import _dtensor, nn, ops
from .nn import record_sites
from .reference import SHARED_MASKS, VJP_RANGE, acc_dtype, shared_mask_dims

__all__ = ["DropoutRegularizer", "k_sample_loss"]

_compile_warned = False


def _warn_compile_once() -> None:
    global _compile_warned
    if not _compile_warned:
        _compile_warned = True
        warnings.warn(
            "dropreg_ext.DropoutRegularizer under torch.compile: the model is compiled, but each dropout "
            "site and the objective (which needs torch.autograd.grad(create_graph=True), not traced by "
            "dynamo) run eagerly, with graph breaks there; results are those of eager mode.",
            UserWarning,
            stacklevel=3,
        )


class DropoutRegularizer:
    r"""Dropout's explicit and implicit regularization effects as analytic terms
    (Wei, Kakade & Ma, ICML 2020), computed with fused kernels.

    Inside :meth:`capture`, every fused dropout module of ``model`` (:class:`~dropreg_ext.Dropout`, the channel
    and locked variants) that is in training mode is a *site* i: it does not drop, but passes its
    input h_i through a fresh autograd node o_i and records it (a module called T times, e.g. in a
    recurrent loop, gives T sites). :meth:`loss` then returns, for logits z with rows r
    (N_eff rows not ignored)::

        loss = J + Σ_i λ_i R_i + T,    J = (1/N_eff) Σ_r CE(z_r, y_r),    λ_i = scale · ½ · q_i/(1-q_i)

    - explicit ``"sampled"`` (the paper's R_approx): ŷ_r ~ softmax(z_r) (no gradient through the
      draw), g_i = ∂[Σ_r CE(z_r, ŷ_r)]/∂o_i, R_i = (1/N_eff) Σ (g_i ⊙ h_i)². Its value is an unbiased
      estimate of (1/N_eff) Σ_r ⟨diag(J_iᵀ H_out J_i), h_i²⟩ with H_out = diag(p) - ppᵀ; its gradient,
      as in the authors' code, is that of R_approx with H_out held constant (the draw of ŷ is not
      differentiated), not an unbiased estimate of ∇R_approx.
      ``"true"`` (the paper's R̃): the same with ŷ = y. ``None``: no explicit term.
    - implicit (the paper's ξ_approx): T = noise_scale · Σ_i ⟨∂J/∂o_i, η_i ⊙ h_i⟩ with fresh noise
      η_i of variance q_i/(1-q_i) (``"rademacher"``: ±sqrt(q/(1-q)); ``"dropout"``: m/(1-q) - 1).
      Its value is zero-mean noise; its gradient is the injected noise.
    - sites whose mask is shared (:class:`~dropreg_ext.LockedDropout` along time,
      :class:`~dropreg_ext.Dropout1d`/``2d``/``3d`` along the spatial dims), with ``shared_masks="exact"``:
      the products are summed over the positions S_k one mask element k covers before squaring,
      R_i = (1/N_eff) Σ_k (Σ_{j∈S_k} g_ij h_ij)², and η has one draw per mask element, the Taylor terms of
      the dropout those modules apply (:func:`dropreg_ext.reference.shared_mask_dims`). ``"elementwise"``
      treats every element as independent, as the authors' code does for AWD-LSTM's locked dropout.

    A capture that records no site (no fused dropout module in training mode with p > 0, or functional
    dropout without :func:`dropreg_ext.patch_functional`) warns once, as the terms are then zero; torch
    dropout modules left in the model (not converted by :func:`dropreg_ext.replace_dropout`) raise, since
    they drop instead of becoming sites.

    One ``loss.backward()`` gives the paper's update (a double backward through the model).

    How the work is fused: one read of the logits gives J, the log-sum-exp, ŷ and the cotangents of
    both terms, softmax(z) - onehot(ŷ) and (softmax(z) - onehot(y)) / N_eff
    (:func:`ops.cross_entropy_sample_grad`), whose backward is one op for all of them; the
    gradients at all sites come from one ``autograd.grad`` call per cotangent — a single one for
    ``explicit="true"`` with ``implicit``, whose two cotangents are proportional; each site's two
    terms come from one pass over (h, g_e, g_i) with η drawn in-kernel (:func:`ops.site_penalty`).

    Args:
        model: the module whose fused dropout layers become sites.
        explicit: ``"sampled"``, ``"true"`` or ``None``.
        implicit: add the implicit noise term T.
        noise: ``"rademacher"`` or ``"dropout"``.
        scale: multiplier of the coefficient λ_i: 1 is the second-order Taylor constant ½·q/(1-q), which
            matches the dropout gap; the authors' code uses q/(1-q), ``scale=2``.
        noise_scale: multiplier of T (e.g. sqrt(1 - 1/k) on top of DROPOUT_k).
        head: the ``nn.Linear`` that produces the logits (e.g. a language model's output layer), or
            ``None``. With it, :meth:`loss` needs the logits to be that layer's output in the captured
            forward, z = x Wᵀ + b, and takes the gradients at the sites from cotangents at its input x:
            c W for a cotangent c at z. For ``explicit="sampled"`` with ``implicit`` and C > d (logits
            wider than x, e.g. a vocabulary), the true label's follows from the sampled one's,
            (softmax(z) - onehot(y)) W = G W + W[ŷ] - W[y], so that one product with W is formed and
            differentiated instead of two: three fewer (N, C) x (C, d) matrix products per step. The
            result is the same objective, up to rounding.
        shared_masks: ``"exact"`` (default) or ``"elementwise"``: how sites with a shared mask enter
            the terms (above).

    Shape:
        logits (..., C), target (...) integer class indices.

    Example::

        >>> reg = DropoutRegularizer(model, explicit="sampled", implicit=True)
        >>> with reg.capture():
        ...     logits = model(x)
        >>> loss = reg.loss(logits, y)
        >>> loss.backward()
        >>> reg.last   # {"loss": J, "explicit": Σ λ_i R_i, "implicit": T}
    """

    EXPLICIT = ("sampled", "true", None)

    def __init__(
        self,
        model: torch.nn.Module,
        explicit: Optional[str] = "sampled",
        implicit: bool = True,
        noise: str = "rademacher",
        scale: float = 1.0,
        noise_scale: float = 1.0,
        head: Optional[torch.nn.Linear] = None,
        shared_masks: str = "exact",
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"argument 'model' must be a torch.nn.Module, got {type(model).__name__}")
        if explicit not in self.EXPLICIT:
            raise ValueError(f"argument 'explicit' must be one of {self.EXPLICIT}, got {explicit!r}")
        if not isinstance(implicit, bool):
            raise TypeError(f"argument 'implicit' must be a bool, got {type(implicit).__name__}")
        if noise not in ("rademacher", "dropout"):
            raise ValueError(f"argument 'noise' must be 'rademacher' or 'dropout', got {noise!r}")
        for name, value in (("scale", scale), ("noise_scale", noise_scale)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"argument '{name}' must be a finite number >= 0, got {value!r}")
        if head is not None and not isinstance(head, torch.nn.Linear):
            raise TypeError(f"argument 'head' must be a torch.nn.Linear or None, got {type(head).__name__}")
        if shared_masks not in SHARED_MASKS:
            raise ValueError(f"argument 'shared_masks' must be one of {SHARED_MASKS}, got {shared_masks!r}")
        self.model = model
        self.head = head
        self.explicit = explicit
        self.implicit = implicit
        self.noise = noise
        self.scale = float(scale)
        self.noise_scale = float(noise_scale)
        self.shared_masks = shared_masks
        self.last: Optional[dict] = None
        self._warned_no_site = False
        self._sites: Optional[list] = None
        self._head_call: Optional[tuple] = None  # (input, weight, output) of the head's last call in the capture
        self._fsdp_checked = False

    @contextlib.contextmanager
    def capture(self) -> Iterator["DropoutRegularizer"]:
        """Record the dropout sites of one forward pass of the model (:func:`record_sites`).

        Under ``torch.no_grad()`` (evaluation) nothing is recorded and the model runs as usual.
        """
        if not self._fsdp_checked:
            _dtensor.check_no_fsdp(self.model)
            self._fsdp_checked = True
        self._head_call = None
        hook = self.head.register_forward_hook(self._record_head, with_kwargs=True) if self.head is not None else None
        try:
            with record_sites(self.model) as sites:
                self._sites = sites
                yield self
        finally:
            if hook is not None:
                hook.remove()

    def _record_head(self, module, args, kwargs, output) -> None:
        # The weight as the call saw it (torch.func.functional_call swaps parameters for one call).
        self._head_call = (args[0] if args else kwargs["input"], module.weight, output)

    def _head_call_of(self, logits: torch.Tensor) -> Optional[tuple]:
        """(x, W) of the head's call in the captured forward when ``logits`` is its output (or a
        contiguous view of it with the same rows); None without a head."""
        if self.head is None:
            return None
        call, self._head_call = self._head_call, None
        if call is None:
            raise RuntimeError("argument 'head' was given, but the head was not called in the captured forward")
        x, weight, out = call
        def root(t):
            return t if t._base is None else t._base

        same = logits is out or (
            root(logits) is root(out) and logits.data_ptr() == out.data_ptr() and logits.numel() == out.numel()
            and logits.is_contiguous() and out.is_contiguous() and logits.shape[-1] == out.shape[-1]
        )
        if not same:
            raise ValueError(
                "argument 'logits' must be the output of the regularizer's head (its last call in the captured "
                "forward) when 'head' is given; construct the DropoutRegularizer without 'head' for other logits"
            )
        return x, weight

    def _take_sites(self) -> list:
        if self._sites is None:
            raise RuntimeError(
                "DropoutRegularizer.loss() needs a forward pass inside `with reg.capture():` first "
                "(each capture is consumed by one loss() call)"
            )
        sites, self._sites = self._sites, None
        return sites

    @torch.compiler.disable
    def terms(self, logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100) -> tuple:
        """(J, Σ_i λ_i R_i, T) as tensors with their graphs, for the last captured forward."""
        sites = self._take_sites()
        for site in sites:
            if site.h._version != site.version:
                raise RuntimeError(
                    "a dropout site's input was modified in place after the site was recorded (e.g. by an "
                    "in-place activation such as ReLU(inplace=True) after the dropout): the regularizer needs "
                    "the original values; use the out-of-place op"
                )
        if not isinstance(logits, torch.Tensor) or logits.dim() < 1 or logits.shape[-1] < 1:
            raise ValueError("argument 'logits' must be a tensor of shape (..., C) with C >= 1")
        if not isinstance(target, torch.Tensor) or target.shape != logits.shape[:-1]:
            raise ValueError(
                f"argument 'target' must have the logits' leading shape {tuple(logits.shape[:-1])}, "
                f"got {tuple(getattr(target, 'shape', ()))}"
            )
        if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
            raise TypeError(f"argument 'target' must be an integer tensor of class indices, got {target.dtype}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"argument 'ignore_index' must be an int, got {type(ignore_index).__name__}")
        head_call = self._head_call_of(logits)
        if _dtensor.is_dtensor(logits):
            _dtensor.check_double_backward()
            # Sharded logits (a column-parallel head): the whole rows, as on one device. The head's
            # row-product shortcut is for plain weights; the path through z gives the same terms.
            logits, head_call = logits.full_tensor(), None
        elif head_call is not None and any(_dtensor.is_dtensor(t) for t in head_call):
            head_call = None
        num_classes = logits.shape[-1]
        z = logits.reshape(-1, num_classes)
        t = target.reshape(-1).to(torch.int64)
        sites = [s for s in sites if s.q > 0]
        wanted = torch.is_grad_enabled() and (self.explicit is not None or self.implicit)
        if wanted and not sites:
            self._no_site()
        terms = bool(sites) and wanted
        rng = None  # each op draws its own state: one launch per op on a GPU
        n_eff = (t != ignore_index).sum().clamp_min(1).to(acc_dtype(z.dtype))
        true_cotangent = None
        # With the head, and logits wider than its input (C > d: a product with W costs more than the
        # (N, d) rows that replace it), the implicit term's cotangent at the head's input follows from
        # the sampled one's (below).
        true_from_sampled = (
            head_call is not None and self.explicit == "sampled" and self.implicit
            and num_classes > head_call[0].shape[-1]
        )
        if terms and true_from_sampled:
            loss_rows, lse, yhat, sampled_cotangent = ops.cross_entropy_sample_grad(z, t, rng, ignore_index)
        elif terms and self.explicit == "sampled":
            # The explicit term's cotangent softmax(z) - onehot(ŷ), and the implicit term's
            # (softmax(z) - onehot(y)) / N_eff, from the same read of the logits as the sample; the
            # double backward then meets one node for J and both cotangents.
            true_scale = n_eff.reciprocal().expand(z.shape[0]) if self.implicit else None
            sample = ops.cross_entropy_sample_grad(z, t, rng, ignore_index, true_scale=true_scale)
            loss_rows, lse, yhat, sampled_cotangent = sample[:4]
            true_cotangent = sample[4] if self.implicit else None
        else:
            loss_rows, lse, yhat = ops.cross_entropy_sample(z, t, rng, ignore_index)
        J = loss_rows.sum() / n_eff
        zero = J.new_zeros(())
        if not terms:
            return J, zero, zero

        lse = lse.detach()
        ones = torch.ones_like(lse)
        outs = [s.o for s in sites]

        if head_call is None:
            def head_vjp(cotangent: torch.Tensor) -> torch.Tensor:
                return cotangent
            start = z
        else:
            # z = x Wᵀ + b row by row, so a cotangent c at z is c W at x.
            head_input, weight = head_call
            weight = weight.to(z.dtype)
            head_rows = head_input.reshape(-1, head_input.shape[-1])

            def head_vjp(cotangent: torch.Tensor) -> torch.Tensor:
                return (cotangent @ weight).to(head_rows.dtype)
            start = head_rows

        def site_grads(cotangent: torch.Tensor) -> tuple:
            """The gradients at the sites for a cotangent at ``start`` (z, or the head's input)."""
            if not start.requires_grad:  # the logits depend on no site
                return (None,) * len(outs)
            with torch.profiler.record_function(VJP_RANGE):
                return torch.autograd.grad(start, outs, cotangent, create_graph=True, allow_unused=True)

        g_e = g_i = [None] * len(sites)
        if self.explicit == "sampled":
            sampled_at_start = head_vjp(sampled_cotangent)
            g_e = site_grads(sampled_at_start)
        elif self.explicit == "true":
            g_e = site_grads(head_vjp(ops.ce_grad(z, lse, t, ones, ignore_index)))
        if self.implicit:
            if self.explicit == "true":  # ∂J/∂o_i = g_e / N_eff: no second backward pass
                g_i = [g / n_eff if g is not None else None for g in g_e]
            elif true_cotangent is not None:
                g_i = site_grads(head_vjp(true_cotangent))
            elif true_from_sampled:
                # (softmax(z) - onehot(y)) W = (softmax(z) - onehot(ŷ)) W + W[ŷ] - W[y] on the rows not
                # ignored: two row gathers instead of a second (N, C) x (C, d) product (and of its two
                # products in the double backward).
                kept = (t != ignore_index).unsqueeze(1)
                label_rows = weight.index_select(0, torch.where(kept[:, 0], t, 0))
                sampled_rows = weight.index_select(0, torch.where(kept[:, 0], yhat, 0))
                true_at_start = (sampled_at_start + (sampled_rows - label_rows).to(head_rows.dtype)) / n_eff
                g_i = site_grads(torch.where(kept, true_at_start, 0))
            else:
                g_i = site_grads(head_vjp(ops.ce_grad(z, lse, t, ones / n_eff, ignore_index)))

        explicit = implicit = zero
        backend = ops.resolve_backend(z)
        for i, site in enumerate(sites):
            if g_e[i] is None and g_i[i] is None:
                continue  # the logits do not depend on this site
            shared = shared_mask_dims(site, self.shared_masks)
            h, ge, gi = self._shared_products(site, g_e[i], g_i[i], shared) if shared else (site.h, g_e[i], g_i[i])
            if _dtensor.is_dtensor(h):
                _dtensor.check_double_backward()
                # A sharded site: the whole tensors (their backward scatters the gradients back), so
                # that the sums and the noise are the single device's on every rank.
                h, ge, gi = (None if t is None else t.full_tensor() for t in (h, ge, gi))
            # Each site's noise at a state of its own, drawn by the op, which checks the arguments (the
            # state is kept for its backward); without the noise term the state is a constant seed,
            # which leaves the generator alone.
            pen = ops._draw("site_penalty", backend, (h, ge, gi, site.q, self.noise, None if gi is not None else 0))
            lam = self.scale * 0.5 * site.q / (1.0 - site.q)
            explicit = explicit + lam * pen[0]
            implicit = implicit + pen[1]
        return J, explicit / n_eff, self.noise_scale * implicit

    def _shared_products(self, site, g_e, g_i, shared: tuple) -> tuple:
        """(h, g_e, g_i) for the fused op at a site whose mask is shared along the dims ``shared``: the
        products reduced to the mask's shape (in the accumulation dtype) and h = 1, so that the op gives
        [Σ_k (Σ_{j∈S_k} g_e h)², Σ_k η_k Σ_{j∈S_k} g_i h] with η drawn per mask element."""
        acc = acc_dtype(site.h.dtype)
        h = site.h.to(acc)
        reduced = [None if g is None else (g.to(acc) * h).sum(shared, keepdim=True) for g in (g_e, g_i)]
        return torch.ones_like(next(r for r in reduced if r is not None)), *reduced

    def _no_site(self) -> None:
        """A capture without sites: raise if torch dropout modules ran in its place, else warn once."""
        left = [name or type(self.model).__name__ for name, module in self.model.named_modules()
                if type(module) in nn.TORCH_DROPOUT_MODULES and module.training and module.p > 0]
        if left:
            raise RuntimeError(
                f"DropoutRegularizer: the captured forward recorded no dropout site, and the model's dropout "
                f"modules {left[:5]}{' ...' if len(left) > 5 else ''} are torch's: they drop as usual instead of "
                "becoming sites, so the loss would be a dropout loss without the terms asked for; convert them with "
                "dropreg_ext.replace_dropout(model)"
            )
        if not self._warned_no_site:
            self._warned_no_site = True
            warnings.warn(
                "DropoutRegularizer: the captured forward recorded no dropout site, so loss() is the plain "
                "cross-entropy J and the explicit and implicit terms are zero. Likely causes: the model has no "
                "dropreg_ext dropout module in training mode with p > 0 (dropreg_ext.replace_dropout converts "
                "torch's; model.train() turns them on); its dropout is a call of torch.nn.functional.dropout "
                "(e.g. Hugging Face attention), which is a site only under `with dropreg_ext.patch_functional():` "
                "around the forward; or the forward ran under torch.no_grad().",
                UserWarning,
                stacklevel=5,  # _no_site, terms, its compiler.disable wrapper, loss (or k_sample_loss), the caller
            )

    def loss(self, logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """``J + Σ_i λ_i R_i + T`` for the last captured forward, ready for ``backward()``.

        Args:
            logits: (..., C) model output of the captured forward.
            target: (...) integer class indices (``ignore_index`` rows are excluded).
            ignore_index: target value of rows to ignore.

        Sets :attr:`last` to ``{"loss": J, "explicit": Σ λ_i R_i, "implicit": T}`` (detached).
        """
        if torch.compiler.is_compiling():
            _warn_compile_once()
        J, explicit, implicit = self.terms(logits, target, ignore_index)
        self.last = {"loss": J.detach(), "explicit": explicit.detach(), "implicit": implicit.detach()}
        return J + explicit + implicit


def k_sample_loss(
    model: torch.nn.Module,
    x,
    target: torch.Tensor,
    k: int,
    loss_fn: Optional[Callable] = None,
    *,
    implicit_correction: bool = False,
    noise: str = "rademacher",
    ignore_index: int = -100,
) -> torch.Tensor:
    """DROPOUT_k: the loss averaged over k independent dropout masks, (1/k) Σ_j ℓ(F(x, η_j), y);
    its gradient noise has covariance Cov(ξ_drop)/k.

    Args:
        model: a model in training mode with dropout layers.
        x: the model input (called as ``model(x)``).
        target: the targets for ``loss_fn``.
        k: number of masks (int >= 1).
        loss_fn: ``loss_fn(output, target) -> scalar``; default: cross-entropy over the last dim
            with ``ignore_index``.
        implicit_correction: add sqrt(1 - 1/k) · ξ_approx (the paper's DROPOUT_k + ξ): the implicit
            term T of :class:`DropoutRegularizer` from one extra forward without dropout, scaled by
            sqrt(1 - 1/k), which restores DROPOUT_1's gradient-noise level.
        noise: noise kind of the correction, ``"rademacher"`` or ``"dropout"``.
        ignore_index: target value of ignored rows (default loss and correction).

    The k forward graphs stay alive together until ``backward()``.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"argument 'k' must be an int >= 1, got {k!r}")
    if loss_fn is None:
        def loss_fn(out, tgt):
            return torch.nn.functional.cross_entropy(
                out.reshape(-1, out.shape[-1]), tgt.reshape(-1), ignore_index=ignore_index
            )
    loss = torch.stack([loss_fn(model(x), target) for _ in range(k)]).mean()
    if implicit_correction and k > 1:
        reg = DropoutRegularizer(model, explicit=None, implicit=True, noise=noise, noise_scale=math.sqrt(1 - 1 / k))
        with reg.capture():
            logits = model(x)
        _, _, implicit = reg.terms(logits, target, ignore_index)
        loss = loss + implicit
    return loss
