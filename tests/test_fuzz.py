"""Abuse resistance: property-based tests (hypothesis) over shapes, strides, dtypes, p, q and seeds,
junk arguments everywhere, in-place misuse, and module round trips.

- Every CPU backend equals the reference bit for bit on any shape (0–4 dims of size 0–17), any
  layout (transposed, sliced, permuted, expanded views), any dtype, any p in [0, 1] and any seed in
  [0, 2**64); the fraction dropped stays within a Hoeffding bound (failure probability 1e-9 per example).
- Channel and locked dropout: ``x ⊙ m`` with m the reference mask of the broadcast shape, on every backend.
- ``cross_entropy_sample`` / ``ce_grad`` / ``site_penalty`` against the reference within error bounds
  built from the inputs (the same bounds as test_cross_entropy.py / test_site_penalty.py).
- Junk for p, q, seed, backend names, noise names, ignore_index, rng and tensors of integer/bool/complex
  dtype: a TypeError/ValueError/RuntimeError whose message names the argument.
- In-place misuse is caught by autograd's version counter, never silent.
- state_dict / pickle / torch.save / deepcopy round trips of every module class; replace_dropout keeps
  a model's eval outputs bit for bit.

Hypothesis runs derandomized (fixed examples, no database) with few examples per property, so the
file is fast and cannot flake. Triton runs under the interpreter on CPU: only at tiny sizes.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import warnings

import pytest
import torch
from conftest import (
    ALL_BACKENDS,
    CPU_BACKENDS,
    acc_dtype,
    assert_bitwise_equal,
    assert_within,
    assert_yhat_matches,
    ce_grad_bound,
    lse_bound,
    reordered_sum_bound,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dropreg_ext as dr
from dropreg_ext import reference as R

FUZZ = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
FEW = settings(FUZZ, max_examples=12)

CPU_NAMES = [name for name in ("cpu", "reference", "triton") if name in dr.ops.available_backends("cpu")]
TRITON_MAX_NUMEL = 1024  # the interpreter runs one numpy program per block: keep its cases tiny
ALL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
BAD_DTYPES = (torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool, torch.complex64)
LAYOUTS = ("contiguous", "transposed", "sliced", "permuted", "expanded")


def backends_for(numel: int, triton_max: int = TRITON_MAX_NUMEL) -> list:
    return [name for name in CPU_NAMES if name != "triton" or numel <= triton_max]


def make_tensor(shape, dtype, layout: str, seed: int) -> torch.Tensor:
    """A float tensor of ``shape`` in ``layout``: contiguous, or a transposed / sliced (stride 2,
    storage offset 1) / fully permuted / expanded (stride 0) view of a larger tensor."""
    gen = torch.Generator().manual_seed(seed)
    shape = tuple(shape)
    nd = len(shape)

    def rnd(s):
        return torch.randn(tuple(s), generator=gen, dtype=torch.float64).to(dtype)

    if layout == "transposed" and nd >= 2:
        s = list(shape)
        s[-1], s[-2] = s[-2], s[-1]
        return rnd(s).transpose(-1, -2)
    if layout == "sliced" and nd >= 1:
        return rnd(shape[:-1] + (2 * shape[-1] + 1,))[..., 1::2]
    if layout == "permuted" and nd >= 2:
        return rnd(shape[::-1]).permute(*reversed(range(nd)))
    if layout == "expanded" and nd >= 1:
        return rnd((1,) + shape[1:]).expand(shape)
    return rnd(shape)


def raw_rng(seed: int, offset: int) -> torch.Tensor:
    """[seed, offset] as int64 (seed in [0, 2**64) taken with the same bits, as make_rng does)."""
    return torch.tensor([dr._checks.check_seed(seed), offset], dtype=torch.int64)


shapes = st.lists(st.integers(0, 17), min_size=0, max_size=4).map(tuple)
dtypes = st.sampled_from(ALL_DTYPES)
layouts = st.sampled_from(LAYOUTS)


@st.composite
def layouts_and_shapes(draw, max_size: int = 17, max_dims: int = 4):
    """(layout, shape) with enough dimensions for the layout to be a real view: transposed and
    permuted need 2 dims, sliced and expanded 1."""
    layout = draw(layouts)
    min_dims = {"transposed": 2, "permuted": 2, "sliced": 1, "expanded": 1}.get(layout, 0)
    shape = draw(st.lists(st.integers(0, max_size), min_size=min_dims, max_size=max_dims))
    return layout, tuple(shape)


probs = st.one_of(st.sampled_from([0.0, 1.0, 0.5]), st.floats(0.0, 1.0))
drop_probs_below_1 = st.one_of(st.just(0.0), st.floats(0.0, 1.0, exclude_max=True))
seeds = st.integers(0, 2**64 - 1)
offsets = st.integers(-(2**63), 2**63 - 1)
noises = st.sampled_from(R.NOISE_KINDS)


# ------------------------------------------------------------------------------------------------
# Fused dropout: every CPU backend == reference, bit for bit
# ------------------------------------------------------------------------------------------------


@FUZZ
@given(spec=layouts_and_shapes(), dtype=dtypes, p=probs, seed=seeds, offset=offsets,
       explicit=st.booleans(), data_seed=st.integers(0, 2**31))
def test_fused_dropout_equals_reference(spec, dtype, p, seed, offset, explicit, data_seed):
    layout, shape = spec
    x = make_tensor(shape, dtype, layout, data_seed)
    rng = dr.ops.make_rng("cpu", seed) if explicit else raw_rng(seed, offset)
    expected = R.dropout(x, p, rng)
    for name in backends_for(x.numel()):
        y = dr.ops.fused_dropout(x, p, rng, backend=name)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert_bitwise_equal(y, expected, f"{name} {layout} {tuple(shape)} {dtype} p={p!r}")


@FUZZ
@given(shape=shapes, p=probs, seed=seeds)
def test_fraction_dropped_is_sane(shape, p, seed):
    """Dropped fraction of the reference mask (== every backend's, above) within a Hoeffding bound
    around the effective probability round(p·2^32)/2^32; p = 0 keeps all, p = 1 drops all."""
    n = math.prod(shape)
    rng = dr.ops.make_rng("cpu", seed)
    y = dr.ops.fused_dropout(torch.ones(shape), p, rng)
    dropped = int((y == 0).sum())
    if p == 0.0:
        assert dropped == 0
    elif p == 1.0:
        assert dropped == n
    elif n:
        p_eff = R.dropout_threshold(p) / 2**16
        bound = math.sqrt(math.log(2 / 1e-9) / (2 * n))
        assert abs(dropped / n - p_eff) <= bound, (dropped, n, p)
    kept = y[y != 0]
    assert bool((kept == torch.tensor(R.dropout_scale(p), dtype=torch.float32)).all())


@FEW
@given(spec=layouts_and_shapes(), dtype=dtypes, p=probs, seed=seeds, data_seed=st.integers(0, 2**31))
def test_functional_dropout_seed_reproduces_on_every_backend(spec, dtype, p, seed, data_seed):
    """dr.functional.dropout(seed=s): same result on every backend, the reference's, and the
    global generator untouched."""
    layout, shape = spec
    x = make_tensor(shape, dtype, layout, data_seed)
    state = torch.get_rng_state()
    expected = R.dropout(x, p, dr.ops.make_rng("cpu", seed))
    for name in backends_for(x.numel()):
        with dr.use_backend(name):
            assert_bitwise_equal(dr.functional.dropout(x, p, seed=seed), expected, name)
    assert torch.equal(torch.get_rng_state(), state)


# ------------------------------------------------------------------------------------------------
# Channel and locked dropout
# ------------------------------------------------------------------------------------------------

CHANNEL = {
    "dropout1d": (dr.functional.dropout1d, 1),
    "dropout2d": (dr.functional.dropout2d, 2),
    "dropout3d": (dr.functional.dropout3d, 3),
}


@FUZZ
@given(kind=st.sampled_from(["dropout1d", "dropout2d", "dropout3d", "locked", "locked_batch_first"]),
       extra=st.integers(0, 2), sizes=st.lists(st.integers(0, 5), min_size=5, max_size=5), dtype=dtypes,
       layout=layouts, p=probs, seed=seeds, data_seed=st.integers(0, 2**31))
def test_channel_and_locked_dropout_shapes(kind, extra, sizes, dtype, layout, p, seed, data_seed):
    """y = x ⊙ m, m = reference dropout of ones(mask_shape) (one draw per channel / per sequence)."""
    if kind.startswith("locked"):
        rank = 2 + extra
        batch_first = kind == "locked_batch_first"
        time_dim = 1 if batch_first else 0

        def fn(t):
            return dr.functional.locked_dropout(t, p, True, batch_first, seed=seed)
    else:
        f, spatial = CHANNEL[kind]
        rank = spatial + 1 + min(extra, 1)
        time_dim = None

        def fn(t):
            return f(t, p, True, seed=seed)
    shape = tuple(sizes[:rank])
    x = make_tensor(shape, dtype, layout, data_seed)
    if time_dim is None:  # torch's rule: channels over (N, C), over C alone for an unbatched 1d/3d input
        channel_dims = 2 if kind == "dropout2d" or rank == CHANNEL[kind][1] + 2 else 1
        mask_shape = shape[:channel_dims] + (1,) * (rank - channel_dims)
    else:
        mask_shape = tuple(1 if d == time_dim else n for d, n in enumerate(shape))
    mask = R.dropout(torch.ones(mask_shape, dtype=dtype), p, dr.ops.make_rng("cpu", seed))
    expected = x * mask
    for name in backends_for(math.prod(mask_shape)):
        with dr.use_backend(name):
            y = fn(x)
        assert y.shape == x.shape and y.dtype == dtype
        assert_bitwise_equal(y, expected, f"{kind} {name} {shape} {dtype} p={p!r}")


@FEW
@given(kind=st.sampled_from(["dropout1d", "dropout2d", "dropout3d", "locked"]),
       rank=st.integers(0, 6))
def test_channel_and_locked_dropout_reject_bad_ranks(kind, rank):
    """Channel dropout fails (or not) on every rank exactly as torch's function does; locked dropout
    needs time and batch dims."""
    x = torch.randn((2,) * rank)
    if kind == "locked":
        if rank >= 2:
            assert dr.functional.locked_dropout(x, 0.5).shape == x.shape
        else:
            with pytest.raises(ValueError, match="argument 'input'"):
                dr.functional.locked_dropout(x, 0.5)
        return
    fn, _ = CHANNEL[kind]
    torch_fn = dr.functional.TORCH_FUNCTIONS[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            expected = torch_fn(x, 0.5).shape
        except RuntimeError as exc:
            with pytest.raises(RuntimeError, match=str(exc)[:40]):
                fn(x, 0.5)
        else:
            assert fn(x, 0.5).shape == expected


# ------------------------------------------------------------------------------------------------
# Cross-entropy sampling, ce_grad and site penalty against the reference
# ------------------------------------------------------------------------------------------------


@FUZZ
@given(n=st.integers(0, 6), c=st.integers(1, 9), dtype=dtypes, scale=st.sampled_from([0.0, 1e-3, 1.0, 20.0]),
       transposed=st.booleans(), ignore=st.lists(st.booleans(), min_size=6, max_size=6),
       ignore_index=st.sampled_from([-100, -1, 0]), seed=seeds, data_seed=st.integers(0, 2**31))
def test_cross_entropy_sample_and_ce_grad_vs_reference(n, c, dtype, scale, transposed, ignore, ignore_index, seed,
                                                       data_seed):
    gen = torch.Generator().manual_seed(data_seed)
    base = scale * torch.randn((c, n) if transposed else (n, c), generator=gen, dtype=torch.float64)
    z = (base.t() if transposed else base).to(dtype)
    t = torch.randint(0, c, (n,), generator=gen)
    t[torch.tensor(ignore[:n], dtype=torch.bool)] = ignore_index
    rng = dr.ops.make_rng("cpu", seed)
    acc = acc_dtype(dtype)
    rloss, rlse, ryhat = R.cross_entropy_sample(z, t, rng, ignore_index)
    row_scale = torch.randn(n, generator=gen, dtype=torch.float64).to(acc)
    rgrad = R.ce_grad(z, rlse, t, row_scale, ignore_index)

    valid = t != ignore_index
    loss_bound = lse_bound(z, t, rlse, ignore_index)
    grad_bound = ce_grad_bound(z, rlse, row_scale, rgrad)
    for name in backends_for(n, triton_max=3):
        what = f"{name} {dtype} ({n}, {c}) scale={scale}"
        loss, lse, yhat = dr.ops.cross_entropy_sample(z, t, rng, ignore_index, backend=name)
        assert loss.dtype == lse.dtype == acc and yhat.dtype == torch.int64
        assert loss.shape == lse.shape == yhat.shape == (n,)
        assert_within(lse, rlse, loss_bound, f"{what} lse")
        assert_within(loss, rloss, loss_bound, f"{what} loss")
        assert bool((loss[~valid] == 0).all()) and bool((yhat[~valid] == ignore_index).all())
        assert_yhat_matches(yhat, ryhat, z, rng, what)
        g = dr.ops.ce_grad(z, rlse, t, row_scale, ignore_index, backend=name)
        assert g.dtype == dtype and g.shape == z.shape
        assert_within(g, rgrad, grad_bound, f"{what} ce_grad")


@FUZZ
@given(spec=layouts_and_shapes(max_size=9, max_dims=3), dtype=dtypes, q=drop_probs_below_1, noise=noises,
       given_g=st.tuples(st.booleans(), st.booleans()), seed=seeds, offset=offsets,
       data_seed=st.integers(0, 2**31))
def test_site_penalty_vs_reference(spec, dtype, q, noise, given_g, seed, offset, data_seed):
    layout, shape = spec
    h = make_tensor(shape, dtype, layout, data_seed)
    g_e = make_tensor(shape, dtype, layout, data_seed + 1) if given_g[0] else None
    g_i = make_tensor(shape, dtype, layout, data_seed + 2) if given_g[1] else None
    rng = raw_rng(seed, offset)
    acc = acc_dtype(dtype)
    expected = R.site_penalty(h, g_e, g_i, q, noise, rng)
    hd = h.double()
    eta = R.site_noise(shape, q, noise, rng, acc).double()
    te = (g_e.double() * hd) ** 2 if g_e is not None else torch.zeros_like(hd)
    ti = g_i.double() * eta * hd if g_i is not None else torch.zeros_like(hd)
    bound = torch.stack([reordered_sum_bound(te, dtype), reordered_sum_bound(ti, dtype)])
    grad = torch.tensor([0.75, -1.25], dtype=acc)
    want = R.site_penalty_backward(grad, h, g_e, g_i, q, noise, rng)
    for name in backends_for(h.numel(), triton_max=256):
        out = dr.ops.site_penalty(h, g_e, g_i, q, noise, rng, backend=name)
        what = f"{name} {dtype} {layout} {tuple(shape)} q={q!r} {noise} {given_g}"
        assert out.dtype == acc and out.shape == (2,)
        assert_within(out, expected, bound, what)
        got = dr.ops.BACKEND_OPS[name]["site_penalty_backward"](grad, h, g_e, g_i, q, noise, rng)
        for a, b, label in zip(got, want, ("dh", "dg_e", "dg_i")):
            if b is None:
                assert a.numel() == 0, f"{what} {label}"
            else:
                assert_bitwise_equal(a, b, f"{what} {label}")


# ------------------------------------------------------------------------------------------------
# The rng tensor in any layout: [seed, offset] are its logical elements
# ------------------------------------------------------------------------------------------------

RNG_LAYOUTS = {
    "strided": lambda: torch.tensor([11, -1, 2**40 + 3, -1])[::2],
    "expanded": lambda: torch.tensor([2**33 + 7]).expand(2),
    "storage-offset": lambda: torch.tensor([-1, -1, 5, 2**35])[2:],
}


def _rng_op_calls(be):
    """(name, call(rng)) for every op that takes an rng, on backend ``be``."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(97, generator=gen).to(be.device)
    z = torch.randn(3, 7, generator=gen).to(be.device)
    t = torch.tensor([0, 6, 2], device=be.device)
    g = torch.randn(97, generator=gen).to(be.device)
    ops = dr.ops.BACKEND_OPS[be.name]
    return {
        "dropout": lambda rng: dr.ops.fused_dropout(x, 0.5, rng, backend=be.name),
        "cross_entropy_sample": lambda rng: dr.ops.cross_entropy_sample(z, t, rng, backend=be.name),
        "site_penalty": lambda rng: dr.ops.site_penalty(x, g, g, 0.3, "rademacher", rng, backend=be.name),
        "site_penalty_backward": lambda rng: ops["site_penalty_backward"](
            torch.ones(2, device=be.device), x, g, g, 0.3, "dropout", rng),
    }


@pytest.mark.parametrize("op", ["dropout", "cross_entropy_sample", "site_penalty", "site_penalty_backward"])
@pytest.mark.parametrize("be", ALL_BACKENDS)
def test_non_contiguous_rng_reads_logical_elements(be, op):
    """An rng that is a view (strided, expanded, storage offset) must act as its contiguous copy:
    never read past its logical elements (wrong masks silently, or freed memory)."""
    call = _rng_op_calls(be)[op]
    wrong = []
    for layout, make in RNG_LAYOUTS.items():
        rng = make().to(be.device)
        got, want = call(rng), call(rng.contiguous())
        got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
        if not all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(got, want)):
            wrong.append(layout)
    assert not wrong, f"{be} {op}: an rng view gives another result than its contiguous copy: {wrong}"


# ------------------------------------------------------------------------------------------------
# Junk arguments: a clear error naming the argument
# ------------------------------------------------------------------------------------------------

junk_probs = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).filter(lambda v: not 0.0 <= v <= 1.0),
    st.integers().filter(lambda v: v not in (0, 1)),
    st.booleans(),
    st.text(max_size=4),
    st.none(),
    st.complex_numbers(max_magnitude=2),
    st.lists(st.floats(0, 1), max_size=2),
    st.just(torch.tensor([0.5])),  # a 0-d tensor is a valid p (as torch); a 1-D one is not
    st.just(torch.tensor(0.5, requires_grad=True)),
)
junk_seeds = st.one_of(
    st.integers(max_value=-1),
    st.integers(min_value=2**64),
    st.floats(),
    st.booleans(),
    st.text(max_size=4),
    st.just(torch.tensor(3)),
    st.just([1, 2]),
)
junk_names = st.one_of(
    st.text(max_size=8).filter(lambda s: s not in dr.ops.BACKENDS),
    st.integers(),
    st.just(b"cpu"),
    st.just(["cpu"]),
    st.just("CPU"),
    st.just(" cpu"),
)
junk_noises = st.one_of(
    st.text(max_size=10).filter(lambda s: s not in R.NOISE_KINDS),
    st.integers(),
    st.none(),
    st.just("Rademacher"),
    st.just(["dropout"]),
)

X = torch.randn(4, 4)
X3 = torch.randn(2, 3, 4)
X4 = torch.randn(2, 3, 4, 4)
Z = torch.randn(3, 5)
T = torch.tensor([0, 4, -100])
RNG = dr.ops.make_rng("cpu", 0)


def _raises_naming(call, name: str, exc=(TypeError, ValueError, RuntimeError)):
    with pytest.raises(exc) as info:
        call()
    assert f"'{name}'" in str(info.value), f"error does not name argument '{name}': {info.value!r}"


@FUZZ
@given(p=junk_probs)
def test_junk_p_is_rejected_everywhere(p):
    calls = [
        lambda: dr.functional.dropout(X, p),
        lambda: dr.functional.dropout(X, p, training=False),
        lambda: dr.ops.fused_dropout(X, p, RNG),
        lambda: dr.functional.broadcast_dropout(X, p, (1, 4)),
        lambda: dr.functional.dropout1d(X3, p),
        lambda: dr.functional.dropout2d(X4, p),
        lambda: dr.functional.locked_dropout(X3, p),
        lambda: dr.Dropout(p),
        lambda: dr.Dropout1d(p),
        lambda: dr.Dropout2d(p),
        lambda: dr.Dropout3d(p),
        lambda: dr.LockedDropout(p),
    ]
    for call in calls:
        _raises_naming(call, "p", (TypeError, ValueError))


@FUZZ
@given(q=st.one_of(junk_probs, st.just(1.0), st.just(1), st.floats(1.0, 10.0)))
def test_junk_q_is_rejected(q):
    _raises_naming(lambda: dr.ops.site_penalty(X, X, X, q, "rademacher", RNG), "q", (TypeError, ValueError))


@FUZZ
@given(seed=junk_seeds)
def test_junk_seed_is_rejected_everywhere(seed):
    calls = [
        lambda: dr.functional.dropout(X, 0.5, seed=seed),
        lambda: dr.functional.dropout(X, 0.5, training=False, seed=seed),
        lambda: dr.ops.make_rng("cpu", seed),
        lambda: dr.functional.broadcast_dropout(X, 0.5, (1, 4), seed=seed),
        lambda: dr.functional.dropout2d(X4, 0.5, seed=seed),
        lambda: dr.functional.locked_dropout(X3, 0.5, seed=seed),
    ]
    for call in calls:
        _raises_naming(call, "seed", (TypeError, ValueError))


@FUZZ
@given(name=junk_names)
def test_junk_backend_names_are_rejected(name):
    before = dr.get_backend()
    lse = torch.logsumexp(Z, -1)
    calls = [
        lambda: dr.ops.fused_dropout(X, 0.5, RNG, backend=name),
        lambda: dr.ops.cross_entropy_sample(Z, T, RNG, backend=name),
        lambda: dr.ops.ce_grad(Z, lse, T, torch.ones(3), backend=name),
        lambda: dr.ops.site_penalty(X, X, None, 0.5, "dropout", RNG, backend=name),
        lambda: dr.ops.philox(torch.zeros(1, 4, dtype=torch.int64), torch.zeros(1, 2, dtype=torch.int64),
                              backend=name),
        lambda: dr.ops.resolve_backend(X, name),
    ]
    for call in calls:
        _raises_naming(call, "backend", ValueError)
    _raises_naming(lambda: dr.set_backend(name), "name", ValueError)

    def use():
        with dr.use_backend(name):
            pass
    _raises_naming(use, "name", ValueError)
    assert dr.get_backend() == before


@FEW
@given(noise=junk_noises)
def test_junk_noise_names_are_rejected(noise):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), dr.Dropout(0.1))
    calls = [
        lambda: dr.ops.site_penalty(X, None, X, 0.5, noise, RNG),
        lambda: R.site_noise((3,), 0.5, noise, RNG),
        lambda: dr.DropoutRegularizer(model, noise=noise),
    ]
    for call in calls:
        _raises_naming(call, "noise", ValueError)


@FEW
@given(dtype=st.sampled_from(BAD_DTYPES))
def test_tensors_of_non_float_dtype_are_rejected(dtype):
    bad = torch.ones(4, 4).to(dtype)
    lse, ones = torch.logsumexp(Z, -1), torch.ones(3)
    bad_z = torch.ones(3, 5).to(dtype)
    calls = [
        ("input", lambda: dr.functional.dropout(bad, 0.5)),
        ("input", lambda: dr.functional.dropout(bad, 0.5, training=False)),
        ("x", lambda: dr.ops.fused_dropout(bad, 0.5, RNG)),
        ("input", lambda: dr.functional.broadcast_dropout(bad, 0.5, (1, 4))),
        ("input", lambda: dr.functional.dropout2d(torch.ones(2, 3, 4, 4).to(dtype), 0.5)),
        ("input", lambda: dr.functional.locked_dropout(torch.ones(2, 3, 4).to(dtype), 0.5)),
        ("h", lambda: dr.ops.site_penalty(bad, None, None, 0.5, "dropout", RNG)),
        ("g_e", lambda: dr.ops.site_penalty(X, bad, None, 0.5, "dropout", RNG)),
        ("g_i", lambda: dr.ops.site_penalty(X, None, bad, 0.5, "dropout", RNG)),
        ("z", lambda: dr.ops.cross_entropy_sample(bad_z, T, RNG)),
        ("z", lambda: dr.ops.ce_grad(bad_z, lse, T, ones)),
    ]
    if dtype != torch.int64:
        calls += [
            ("rng", lambda: dr.ops.fused_dropout(X, 0.5, RNG.to(dtype))),
            ("rng", lambda: dr.ops.site_penalty(X, X, X, 0.5, "dropout", RNG.to(dtype))),
            ("target", lambda: dr.ops.cross_entropy_sample(Z, T.to(dtype), RNG)),
            ("label", lambda: dr.ops.ce_grad(Z, lse, T.to(dtype), ones)),
            ("rng", lambda: dr.ops.cross_entropy_sample(Z, T, RNG.to(dtype))),
        ]
    for name, call in calls:
        _raises_naming(call, name, (TypeError, ValueError))


def test_junk_ignore_index_is_rejected():
    """Like reg.loss (which checks it): a float ignore_index is never truncated silently (1.7 would
    ignore the rows of class 1), and junk gets an error that names the argument."""
    lse = torch.logsumexp(Z, -1)
    target = torch.tensor([0, 4, 1])
    problems = []
    for ignore_index in (1.7, "x", None):
        for op, call in (("cross_entropy_sample", lambda: dr.ops.cross_entropy_sample(Z, target, RNG, ignore_index)),
                         ("ce_grad", lambda: dr.ops.ce_grad(Z, lse, target, torch.ones(3), ignore_index))):
            try:
                call()
            except (TypeError, ValueError, RuntimeError) as exc:
                if "'ignore_index'" not in str(exc):
                    problems.append(f"{op}(ignore_index={ignore_index!r}): {type(exc).__name__}: {exc}")
            else:
                problems.append(f"{op}(ignore_index={ignore_index!r}): accepted")
    assert not problems, "\n".join(problems)


# (argument the error must name, op, args built from x and rng)
REGISTERED_BAD_CALLS = {
    "dropout": [
        ("p", lambda x, rng: (x, 1.5, rng)),
        ("p", lambda x, rng: (x, -0.25, rng)),
        ("p", lambda x, rng: (x, float("nan"), rng)),
        ("x", lambda x, rng: (x.long(), 0.5, rng)),
        ("x", lambda x, rng: (x.bool(), 0.5, rng)),
    ],
    "site_penalty": [
        ("q", lambda x, rng: (x, x, x, 1.0, "rademacher", rng)),
        ("q", lambda x, rng: (x, x, x, 1.5, "dropout", rng)),
        ("noise", lambda x, rng: (x, x, x, 0.5, "bogus", rng)),
    ],
}


REGISTERED_BAD_CASES = [
    pytest.param(op, i, id=f"{op}-{i}-{name}") for op, calls in REGISTERED_BAD_CALLS.items()
    for i, (name, _) in enumerate(calls)
]


@pytest.mark.parametrize("op, index", REGISTERED_BAD_CASES)
@pytest.mark.parametrize("be", ALL_BACKENDS)
def test_registered_ops_check_arguments_like_the_cpp_ops(be, op, index):
    """Every backend's registered op (torch.ops.dropreg.<op>[_<backend>], what opcheck and
    torch.compile see) rejects what the C++ op rejects, naming the argument — never garbage.
    One case per test, so that a crash names the call that caused it."""
    x = torch.randn(8, device=be.device)
    rng = dr.ops.make_rng(be.device, 1)
    name, make_args = REGISTERED_BAD_CALLS[op][index]
    args = make_args(x, rng)
    shown = [a if not isinstance(a, torch.Tensor) else a.dtype for a in args]
    try:
        dr.ops.BACKEND_OPS[be.name][op](*args)
    except (TypeError, ValueError, RuntimeError) as exc:
        assert f"'{name}'" in str(exc), f"{be} registered {op}{shown}: {type(exc).__name__} not naming '{name}': {exc}"
    else:
        pytest.fail(f"{be} registered {op}{shown}: accepted")


# ------------------------------------------------------------------------------------------------
# In-place misuse is detected by autograd (version counter), never silent
# ------------------------------------------------------------------------------------------------

INPLACE_KINDS = {
    "module": lambda t: dr.Dropout(0.5, inplace=True)(t),
    "functional-noncontiguous": lambda t: dr.functional.dropout(t.t(), 0.5, inplace=True),
    "dropout2d": lambda t: dr.functional.dropout2d(t.view(2, 4, 2, 2), 0.5, inplace=True),
    "Dropout1d-module": lambda t: dr.Dropout1d(0.5, inplace=True)(t.view(4, 4, 2)),
}


@pytest.mark.parametrize("kind", list(INPLACE_KINDS))
def test_inplace_dropout_of_a_saved_tensor_raises_on_backward(cpu_backend, kind):
    """x is saved by x·w (for dL/dw); dropping x out in place afterwards must make backward refuse."""
    dr.set_backend(cpu_backend.name)
    x = torch.randn(8, 4)
    w = torch.randn(8, 4, requires_grad=True)
    loss = (x * w).sum()
    INPLACE_KINDS[kind](x)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def _site_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), dr.Dropout(0.3), torch.nn.Linear(8, 3)).double()


@pytest.mark.parametrize("when", ["before-loss", "after-loss"])
def test_regularizer_site_modified_in_place_makes_backward_raise(when):
    model = _site_model()
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(o))  # the site's input h
    reg = dr.DropoutRegularizer(model, explicit="sampled", implicit=True)
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    with reg.capture():
        z = model(x)
    if when == "before-loss":
        with torch.no_grad():
            seen[0].mul_(2)
        with pytest.raises(RuntimeError, match="modified in place after the site was recorded"):
            reg.loss(z, y)
        return
    loss = reg.loss(z, y)
    if when == "after-loss":
        with torch.no_grad():
            seen[0].mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_inplace_op_after_a_regularizer_site_is_not_silent():
    """Plain dropout returns a fresh tensor, so ``Dropout → ELU(inplace=True)`` is legal. Under the
    regularizer the site returns a view of h: the in-place op rewrites the recorded h (and the
    gradient 'at the site' becomes the gradient after the ELU). Either raise, or give exactly the
    out-of-place objective — never a silently different one."""
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    results = {}
    for inplace in (False, True):
        model = _site_model()
        torch.manual_seed(1)
        model.insert(2, torch.nn.ELU(inplace=inplace))
        reg = dr.DropoutRegularizer(model, explicit="true", implicit=False)
        try:
            with reg.capture():
                z = model(x)
            loss = reg.loss(z, y)
            loss.backward()
        except RuntimeError:
            assert inplace, "the out-of-place model must run"
            return  # detected: fine
        results[inplace] = (reg.last["explicit"], model[0].weight.grad)
    assert_bitwise_equal(results[True][0], results[False][0], "explicit term with ELU(inplace=True) after the site")
    assert_bitwise_equal(results[True][1], results[False][1], "gradient with ELU(inplace=True) after the site")


# ------------------------------------------------------------------------------------------------
# Round trips of every module class; replace_dropout keeps eval outputs
# ------------------------------------------------------------------------------------------------

MODULES = {
    "Dropout": (lambda: dr.Dropout(0.3, inplace=True), torch.nn.Dropout, (4, 6)),
    "Dropout1d": (lambda: dr.Dropout1d(0.4), torch.nn.Dropout1d, (2, 5, 7)),
    "Dropout2d": (lambda: dr.Dropout2d(0.25, inplace=True), torch.nn.Dropout2d, (2, 5, 3, 3)),
    "Dropout3d": (lambda: dr.Dropout3d(0.6), torch.nn.Dropout3d, (2, 3, 2, 2, 2)),
    "LockedDropout": (lambda: dr.LockedDropout(0.35, batch_first=True), None, (3, 4, 5)),
}
ATTRS = ("p", "inplace", "batch_first", "training")


def _round_trips():
    def via_pickle(m):
        return pickle.loads(pickle.dumps(m))

    def via_torch_save(m):
        buffer = io.BytesIO()
        torch.save(m, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=False)

    return {"pickle": via_pickle, "torch.save": via_torch_save, "deepcopy": copy.deepcopy}


@pytest.mark.parametrize("trip", list(_round_trips()))
@pytest.mark.parametrize("kind", list(MODULES))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_module_round_trips(kind, trip, training):
    make, torch_kind, shape = MODULES[kind]
    module = make().train(training)
    restored = _round_trips()[trip](module)
    assert type(restored) is type(module)
    for attr in ATTRS:
        assert getattr(restored, attr, None) == getattr(module, attr, None), attr
    assert repr(restored) == repr(module)
    x = torch.randn(shape)
    torch.manual_seed(4)
    a = module(x.clone())
    torch.manual_seed(4)
    assert_bitwise_equal(restored(x.clone()), a, f"{kind} after {trip}")


@pytest.mark.parametrize("kind", list(MODULES))
def test_module_state_dict_round_trip(kind):
    make, torch_kind, _ = MODULES[kind]
    module = make()
    state = module.state_dict()
    assert state == {}, "dropout modules have no parameters or buffers"
    fresh = make()
    assert not fresh.load_state_dict(state, strict=True).missing_keys
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True) == {}
    if torch_kind is not None:
        assert isinstance(module, torch_kind)
        torch_kind(module.p).load_state_dict(state, strict=True)


class AllKinds(torch.nn.Module):
    """Every torch dropout kind replace_dropout handles, each in the forward path."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv1d(3, 4, 3)
        self.d1 = torch.nn.Dropout1d(0.3)
        self.conv2 = torch.nn.Conv2d(3, 4, 3)
        self.d2 = torch.nn.Dropout2d(0.4, inplace=True)
        self.conv3 = torch.nn.Conv3d(3, 4, 2)
        self.d3 = torch.nn.Dropout3d(0.2)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(4 * 3, 8), torch.nn.ReLU(), torch.nn.Dropout(0.5),
                                       torch.nn.Linear(8, 8), torch.nn.Dropout(0.1, inplace=True))
        self.rnn = torch.nn.GRU(8, 8)
        self.d_seq = torch.nn.Dropout(0.25)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, a, b, c):
        f1 = self.d1(self.conv1(a)).mean(-1)
        f2 = self.d2(self.conv2(b)).mean((-1, -2))
        f3 = self.d3(self.conv3(c)).mean((-1, -2, -3))
        h = self.mlp(torch.cat([f1, f2, f3], -1))
        seq, _ = self.rnn(h.unsqueeze(0).expand(3, -1, -1).contiguous())
        return self.head(self.d_seq(seq))


@pytest.mark.parametrize("locked", [False, True], ids=["elementwise", "locked"])
def test_replace_dropout_keeps_eval_outputs_of_a_model_with_all_kinds(locked):
    torch.manual_seed(0)
    model = AllKinds().eval()
    inputs = (torch.randn(2, 3, 9), torch.randn(2, 3, 6, 6), torch.randn(2, 3, 3, 3, 3))
    before = model(*inputs)
    assert dr.replace_dropout(model, locked=locked) == 6
    kinds = {type(m) for m in model.modules()}
    assert {dr.Dropout1d, dr.Dropout2d, dr.Dropout3d} <= kinds
    assert (dr.LockedDropout if locked else dr.Dropout) in kinds
    assert not any(type(m) in (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d)
                   for m in model.modules())
    assert_bitwise_equal(model(*inputs), before, "eval output after replace_dropout")
    # training mode is kept per module, and p = 0 everywhere is the identity in training too
    model.train()
    for m in model.modules():
        if isinstance(m, (dr.Dropout, dr.Dropout1d, dr.Dropout2d, dr.Dropout3d, dr.LockedDropout)):
            m.p = 0.0
    assert_bitwise_equal(model(*inputs), before, "p = 0 training output after replace_dropout")


def test_cpu_backend_list_matches_conftest():
    """The fuzz tests iterate CPU backends themselves (hypothesis and fixtures don't mix well): the
    list must be conftest's."""
    names = [p.values[0].name for p in CPU_BACKENDS
             if not any(m.name == "skipif" and m.args and m.args[0] for m in p.marks)]
    assert sorted(CPU_NAMES) == sorted(names)
