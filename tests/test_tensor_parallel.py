"""Tensor parallelism (DTensor) and FSDP2 with two CPU processes (gloo): a sharded model draws exactly
the single-device masks.

Each rank seeds torch identically (DTensor's rule for random ops: every rank of a mesh seeds the same,
data-parallel groups apart), so all ranks draw the same [seed, offset]; the fused dropout of a
DTensor shard reads the whole tensor's mask at each element's global index (``dropreg_ext._dtensor``).
The model's weights and inputs are small dyadic rationals, so that float64 sums are exact in any
order: a tensor-parallel matmul (partial sums, then an all-reduce) gives the single-device bits, and
any mask difference shows. The control: torch's own nn.Dropout in the same sharded model draws other
masks than on one device.
"""

from __future__ import annotations

import copy

import pytest
import torch
from gloo_world import run_ranks, serve_rank

WORLD_SIZE = 2
TIMEOUT_S = 180

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)


# ------------------------------------------------------------------------------------------------
# What each rank runs (in its own process)
# ------------------------------------------------------------------------------------------------


def _dyadic(*shape, scale: int = 8, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-4, 5, shape, generator=gen).double() / scale


class MLP(torch.nn.Module):
    """fc1 -> ReLU -> dropout -> fc2; ``dropout`` is a module, or torch's functional one (patched or not)."""

    def __init__(self, dropout: torch.nn.Module | None, hidden: int = 16, dtype=torch.float64):
        super().__init__()
        self.fc1 = torch.nn.Linear(8, hidden, bias=False, dtype=dtype)
        self.fc2 = torch.nn.Linear(hidden, 4, bias=False, dtype=dtype)
        self.drop = dropout
        with torch.no_grad():
            self.fc1.weight.copy_(_dyadic(hidden, 8, seed=1))
            self.fc2.weight.copy_(_dyadic(4, hidden, seed=2))

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        h = self.drop(h) if self.drop is not None else torch.nn.functional.dropout(h, 0.5)
        return self.fc2(h)


def _tp(model, mesh):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    # use_local_output=False: the hidden activation stays a DTensor (Shard(-1)), so dropout sees
    # where its shard lies; the output is replicated and local.
    return parallelize_module(model, mesh, {"fc1": ColwiseParallel(use_local_output=False), "fc2": RowwiseParallel()})


def _full(t):
    from dropreg_ext._dtensor import is_dtensor

    return t.full_tensor() if is_dtensor(t) else t


def _step(model, x, seed: int, masks: list, patch: bool = False):
    import dropreg_ext as dr

    torch.manual_seed(seed)
    if model.drop is not None:
        handle = model.drop.register_forward_hook(lambda m, i, o: masks.append(_full(o).detach() == 0))
    try:
        if patch:
            with dr.patch_functional():
                out = model(x)
        else:
            out = model(x)
    finally:
        if model.drop is not None:
            handle.remove()
    (out.square().sum()).backward()
    return out.detach(), [_full(p.grad).detach().clone() for p in (model.fc1.weight, model.fc2.weight)]


def _tensor_parallel(mesh) -> dict:
    """Single-device vs tensor-parallel runs of the same model, same seed: ours, patched F.dropout,
    torch's (the control), float32; channel and locked dropout on a sharded activation; errors."""
    import dropreg_ext as dr

    x = _dyadic(6, 8, scale=4, seed=3)
    out = {}
    for name, make, patch in (("ours", lambda: dr.Dropout(0.5), False),
                              ("patched", lambda: None, True),
                              ("torch", lambda: torch.nn.Dropout(0.5), False)):
        single, sharded = MLP(make()), _tp(MLP(make()), mesh)
        masks_single, masks_tp = [], []
        out[name] = {
            "single": _step(single, x, 123, masks_single, patch),
            "tp": _step(sharded, x, 123, masks_tp, patch),
            "masks": (masks_single, masks_tp),
        }
    # float32, random weights: within rounding
    single32, tp32 = MLP(dr.Dropout(0.5), dtype=torch.float32), None
    with torch.no_grad():
        single32.fc1.weight.normal_(generator=torch.Generator().manual_seed(5))
        single32.fc2.weight.normal_(generator=torch.Generator().manual_seed(6))
    tp32 = _tp(copy.deepcopy(single32), mesh)
    out["float32"] = {"single": _step(single32, x.float(), 9, []), "tp": _step(tp32, x.float(), 9, [])}
    out["regularizer"] = {"single": _regularized_step(MLP(dr.Dropout(0.5)), x)}
    try:
        out["regularizer"]["tp"] = _regularized_step(_tp(MLP(dr.Dropout(0.5)), mesh), x)
    except NotImplementedError as exc:  # a torch whose DTensor double backward is not exact
        out["regularizer"]["error"] = str(exc)
    out["kinds"] = _kinds_on_shards(mesh)
    out["errors"] = _unsupported_placements(mesh)
    return out


def _regularized_step(model, x) -> tuple:
    """One DropoutRegularizer step (explicit sampled + implicit): its three terms and the gradients."""
    import dropreg_ext as dr

    reg = dr.DropoutRegularizer(model, explicit="sampled", implicit=True)
    torch.manual_seed(77)
    with reg.capture():
        logits = model(x)
    reg.loss(logits, torch.arange(x.shape[0]) % 4).backward()
    return reg.last, [_full(p.grad).detach().clone() for p in (model.fc1.weight, model.fc2.weight)]


def _fsdp(rank: int) -> dict:
    """FSDP2 (fully_shard on fc1 and the root) with each rank on its own batch and seed, against one
    unsharded model that takes both ranks' steps and averages the gradients; k-sample dropout; and the
    regularizer's error."""
    from torch.distributed.fsdp import fully_shard

    import dropreg_ext as dr

    def batch(r):
        return _dyadic(6, 8, scale=4, seed=10 + r)

    def losses(model, r):
        torch.manual_seed(200 + r)  # data-parallel ranks: seeded apart
        plain = model(batch(r)).square().sum()
        k_sample = dr.k_sample_loss(model, batch(r), torch.arange(6) % 4, k=2)
        return plain + k_sample

    single, sharded = MLP(dr.Dropout(0.5)), MLP(dr.Dropout(0.5))
    fully_shard(sharded.fc1)
    fully_shard(sharded)
    for r in range(WORLD_SIZE):
        losses(single, r).backward()
    losses(sharded, rank).backward()
    grads = [(p.grad / WORLD_SIZE, _full(q.grad)) for p, q in zip(single.parameters(), sharded.parameters())]
    try:
        with dr.DropoutRegularizer(sharded).capture():
            pass
        error = None
    except NotImplementedError as exc:
        error = str(exc)
    return {"grads": grads, "regularizer_error": error}


def _kinds_on_shards(mesh) -> dict:
    """Channel (Dropout1d on (N, C, L) sharded on C and on L) and locked dropout (sharded on the hidden
    dim) of a DTensor: each rank's shard of the output == the single-device output's shard."""
    from torch.distributed.tensor import Shard, distribute_tensor

    import dropreg_ext as dr

    results = {}
    x = torch.randn(4, 6, 10, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    cases = {"dropout1d-C": (dr.Dropout1d(0.5), 1), "dropout1d-L": (dr.Dropout1d(0.5), 2),
             "locked-H": (dr.LockedDropout(0.5), 2), "dropout-mid": (dr.Dropout(0.3), 1)}
    for name, (module, dim) in cases.items():
        torch.manual_seed(31)
        single = module(x)
        torch.manual_seed(31)
        sharded = module(distribute_tensor(x, mesh, [Shard(dim)]))
        results[name] = (single, sharded.full_tensor())
    return results


def _unsupported_placements(mesh) -> list:
    from torch.distributed.tensor import DTensor, Partial

    import dropreg_ext as dr

    partial = DTensor.from_local(torch.ones(4, 4, dtype=torch.float64), mesh, [Partial()], run_check=False)
    messages = []
    for fn in (lambda: dr.functional.dropout(partial, 0.5), lambda: dr.Dropout(0.5)(partial)):
        try:
            fn()
            messages.append(None)
        except ValueError as exc:
            messages.append(str(exc))
    return messages


def _worker(rank: int, world_size: int, init_file: str, out_file: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    jobs = {"tp": lambda: _tensor_parallel(init_device_mesh("cpu", (world_size,))), "fsdp": lambda: _fsdp(rank)}
    serve_rank(rank, world_size, init_file, out_file, jobs, TIMEOUT_S)


# ------------------------------------------------------------------------------------------------
# The launcher and the checks
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list:
    return run_ranks("test_tensor_parallel", tmp_path_factory.mktemp("tp"), WORLD_SIZE, TIMEOUT_S)


@pytest.mark.parametrize("name", ["ours", "patched"])
def test_tensor_parallel_equals_single_device_bit_for_bit(ranks, name):
    """float64, exact arithmetic: the sharded model's masks, output and gradients are the single
    device's, bit for bit, on both ranks."""
    for rank, r in enumerate(ranks):
        case = r["tp"][name]
        (out_s, grads_s), (out_t, grads_t) = case["single"], case["tp"]
        masks_s, masks_t = case["masks"]
        if masks_s:
            assert torch.equal(masks_s[0], masks_t[0]), f"rank {rank}: masks differ"
        assert torch.equal(out_s, out_t), f"rank {rank}: outputs differ"
        for i, (a, b) in enumerate(zip(grads_s, grads_t)):
            assert torch.equal(a, b), f"rank {rank}: gradient of weight {i} differs"


def test_torch_dropout_is_the_control(ranks):
    """torch's nn.Dropout in the same tensor-parallel model draws other masks than on one device (what
    this package fixes); the float64 arithmetic is exact, so only the masks can make the difference."""
    case = ranks[0]["tp"]["torch"]
    assert not torch.equal(case["single"][0], case["tp"][0]), "torch's dropout matched single-device"
    ours = ranks[0]["tp"]["ours"]
    assert torch.equal(ours["single"][0], ours["tp"][0])


def test_tensor_parallel_float32_within_rounding(ranks):
    for r in ranks:
        (out_s, grads_s), (out_t, grads_t) = r["tp"]["float32"]["single"], r["tp"]["float32"]["tp"]
        torch.testing.assert_close(out_t, out_s, rtol=1e-5, atol=1e-5)
        assert torch.equal(out_s == 0, out_t == 0)
        for a, b in zip(grads_s, grads_t):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["dropout1d-C", "dropout1d-L", "locked-H", "dropout-mid"])
def test_dropout_kinds_on_shards(ranks, kind):
    for rank, r in enumerate(ranks):
        single, sharded = r["tp"]["kinds"][kind]
        assert torch.equal(single, sharded), f"rank {rank}: {kind} of a sharded tensor differs from one device"


def test_partial_placement_is_refused_with_the_alternative(ranks):
    for message in ranks[0]["tp"]["errors"]:
        assert message is not None and "Partial()" in message and "redistribute" in message, message


def test_regularizer_on_tensor_parallel_sites_is_the_single_devices(ranks):
    """Sharded sites: the same sampled labels and terms (the loss bit for bit), the gradients within the
    rounding of the reordered sums (the softmax is not dyadic). Under a torch older than the one this
    was checked on, a clear error instead (its DTensor double backward is not exact)."""
    from dropreg_ext._dtensor import DOUBLE_BACKWARD_MIN_TORCH

    if torch.torch_version.TorchVersion(torch.__version__) < DOUBLE_BACKWARD_MIN_TORCH:
        for r in ranks:
            assert "needs torch >=" in r["tp"]["regularizer"]["error"]
        return
    for rank, r in enumerate(ranks):
        (terms_s, grads_s), (terms_t, grads_t) = r["tp"]["regularizer"]["single"], r["tp"]["regularizer"]["tp"]
        assert terms_s["explicit"] > 0 and terms_s["implicit"] != 0, "the terms are not active"
        for key in ("loss", "explicit", "implicit"):
            torch.testing.assert_close(terms_t[key], terms_s[key], rtol=1e-13, atol=0, msg=f"rank {rank}: {key}")
        for a, b in zip(grads_s, grads_t):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-13)


def test_fsdp2_trains_exactly_as_unsharded(ranks):
    """fully_shard with dr.Dropout and k-sample dropout: each parameter's gradient is the mean of the
    ranks' unsharded gradients, bit for bit (dyadic float64)."""
    for rank, r in enumerate(ranks):
        for i, (single, sharded) in enumerate(r["fsdp"]["grads"]):
            assert torch.equal(single, sharded), f"rank {rank}: gradient of parameter {i} differs"


def test_fsdp2_regularizer_raises_what_to_do(ranks):
    message = ranks[0]["fsdp"]["regularizer_error"]
    assert message is not None and "FSDP2" in message and "DDP" in message
