"""torch.distributed: two CPU processes (gloo, FileStore rendezvous in tmp_path) train with dr.Dropout
under DistributedDataParallel, and with DropoutRegularizer (explicit="sampled", implicit=True).

Seeding across ranks (what users must know; the same as for torch.nn.Dropout): the masks come from
each process's torch generator, so
- ``torch.manual_seed(s)`` with the same s on every rank gives every rank the SAME masks;
- seed per rank (``torch.manual_seed(base + rank)``) for independent masks on each rank;
- unseeded processes follow torch's default seed: random per process in recent torch (masks differ),
  a constant in older releases (masks equal) — the test checks that dropout agrees with
  ``torch.initial_seed()`` either way, and with torch's own dropout.

Both ranks run once per module (one world, several scenarios); the tests check what they saved. Each
rank checks its DDP gradients against a plain replica run from the same RNG state: the DDP gradient
must be the mean of the ranks' local gradients, bit-identical on both ranks.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from gloo_world import run_ranks, serve_rank

WORLD_SIZE = 2
STEPS = 3
TIMEOUT_S = 120

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)


# ------------------------------------------------------------------------------------------------
# What each rank runs (in its own process)
# ------------------------------------------------------------------------------------------------


def _masks_by_seeding() -> dict:
    """Dropout masks of 512 ones drawn: unseeded (this must be the process's first RNG use),
    after a per-rank seed, after the same seed on every rank; torch's own dropout alongside."""
    import torch.nn.functional as F

    import dropreg_ext as dr

    rank = int(os.environ["RANK"])
    ones = torch.ones(512)
    out = {"initial_seed": torch.initial_seed(), "unseeded": dr.functional.dropout(ones, 0.5) == 0}
    torch.manual_seed(out["initial_seed"])  # the same state again, for torch's own dropout
    out["torch_unseeded"] = F.dropout(ones, 0.5) == 0
    torch.manual_seed(100 + rank)
    out["per_rank_seed"] = dr.functional.dropout(ones, 0.5) == 0
    torch.manual_seed(7)
    out["same_seed"] = dr.functional.dropout(ones, 0.5) == 0
    return out


def _model():
    import dropreg_ext as dr

    torch.manual_seed(0)  # same initial weights everywhere (DDP broadcasts rank 0's anyway)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), dr.Dropout(0.3),
                               torch.nn.Linear(16, 3)).double()


def _data(rank: int):
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own shard
    return torch.randn(6, 8, generator=gen, dtype=torch.float64), torch.randint(0, 3, (6,), generator=gen)


def _train_ddp_dropout(rank: int) -> dict:
    """Plain dropout training under DDP; per step: the mask, local (replica) and DDP gradients, and
    the weights after the SGD step."""
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _model()
    replica = copy.deepcopy(model)
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    masks = []
    model[2].register_forward_hook(lambda m, i, o: masks.append(o.detach() == 0))
    x, y = _data(rank)
    torch.manual_seed(100 + rank)  # per-rank dropout streams
    record = {"mask": [], "local": [], "ddp": [], "weights": []}
    for _ in range(STEPS):
        replica.load_state_dict(model.state_dict())
        replica.zero_grad(set_to_none=True)
        state = torch.get_rng_state()
        F.cross_entropy(replica(x), y).backward()  # this rank's own gradient, same mask
        torch.set_rng_state(state)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(ddp(x), y).backward()
        record["mask"].append(masks[-1])
        record["local"].append([p.grad.clone() for p in replica.parameters()])
        record["ddp"].append([p.grad.clone() for p in model.parameters()])
        opt.step()
        record["weights"].append([p.detach().clone() for p in model.parameters()])
    return record


def _train_ddp_regularizer(rank: int) -> dict:
    """DropoutRegularizer(explicit="sampled", implicit=True) under DDP: reg.loss takes
    torch.autograd.grad(create_graph=True) w.r.t. the site outputs only (no parameter's
    AccumulateGrad runs, so DDP's reducer hooks fire once, in loss.backward())."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import dropreg_ext as dr

    model = _model()
    replica = copy.deepcopy(model)
    ddp = DDP(model)
    reg = dr.DropoutRegularizer(ddp, explicit="sampled", implicit=True)
    reg_local = dr.DropoutRegularizer(replica, explicit="sampled", implicit=True)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    x, y = _data(rank)
    torch.manual_seed(200 + rank)  # per-rank ŷ and noise
    record = {"local": [], "ddp": [], "weights": [], "terms": []}
    for _ in range(STEPS):
        replica.load_state_dict(model.state_dict())
        replica.zero_grad(set_to_none=True)
        state = torch.get_rng_state()
        with reg_local.capture():
            z = replica(x)
        reg_local.loss(z, y).backward()
        torch.set_rng_state(state)
        opt.zero_grad(set_to_none=True)
        with reg.capture():
            z = ddp(x)
        reg.loss(z, y).backward()
        record["terms"].append(torch.stack([reg.last["explicit"], reg.last["implicit"]]))
        record["local"].append([p.grad.clone() for p in replica.parameters()])
        record["ddp"].append([p.grad.clone() for p in model.parameters()])
        opt.step()
        record["weights"].append([p.detach().clone() for p in model.parameters()])
    return record


def _worker(rank: int, world_size: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    result = {"seeding": _masks_by_seeding()}  # first: before anything else touches the generator
    jobs = {"ddp_dropout": lambda: _train_ddp_dropout(rank), "ddp_regularizer": lambda: _train_ddp_regularizer(rank)}
    serve_rank(rank, world_size, init_file, out_file, jobs, TIMEOUT_S, result)


# ------------------------------------------------------------------------------------------------
# The launcher and the checks
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list:
    """Both ranks' saved results (runs the 2-process world once for the module)."""
    return run_ranks("test_distributed", tmp_path_factory.mktemp("ddp"), WORLD_SIZE, TIMEOUT_S)


def _equal_lists(a, b) -> bool:
    return all(torch.equal(u, v) for u, v in zip(a, b))


def test_unseeded_ranks_follow_torchs_default_seed(ranks):
    """Unseeded processes: masks equal across ranks exactly when torch's default seeds are (random per
    process in recent torch, a constant in older ones), and torch's own dropout agrees."""
    a, b = (r["seeding"] for r in ranks)
    same_seed = a["initial_seed"] == b["initial_seed"]
    assert torch.equal(a["unseeded"], b["unseeded"]) == same_seed
    assert torch.equal(a["torch_unseeded"], b["torch_unseeded"]) == same_seed, "torch's own dropout differs"
    assert 0 < int(a["unseeded"].sum()) < 512


def test_per_rank_seeds_draw_different_masks_and_same_seed_equal_ones(ranks):
    a, b = (r["seeding"] for r in ranks)
    assert not torch.equal(a["per_rank_seed"], b["per_rank_seed"]), "per-rank seeds must give different masks"
    assert torch.equal(a["same_seed"], b["same_seed"]), "the same seed on every rank gives the same mask"


@pytest.mark.parametrize("scenario", ["ddp_dropout", "ddp_regularizer"])
def test_ddp_gradients_are_synchronized_means(ranks, scenario):
    """Per step: DDP gradients identical on both ranks and equal to the mean of the ranks' local
    gradients; local gradients differ (different shards, masks, noise); weights stay identical."""
    a, b = (r[scenario] for r in ranks)
    for step in range(STEPS):
        assert _equal_lists(a["ddp"][step], b["ddp"][step]), f"step {step}: DDP gradients differ across ranks"
        assert not _equal_lists(a["local"][step], b["local"][step]), f"step {step}: ranks computed the same thing"
        for g, la, lb in zip(a["ddp"][step], a["local"][step], b["local"][step]):
            torch.testing.assert_close(g, (la + lb) / 2, rtol=1e-12, atol=1e-15,
                                       msg=f"step {step}: DDP gradient is not the mean of the local ones")
        assert _equal_lists(a["weights"][step], b["weights"][step]), f"step {step}: weights diverged"
    assert not _equal_lists(a["weights"][0], a["weights"][-1]), "training did not move the weights"


def test_ddp_dropout_masks_differ_across_ranks_with_per_rank_seeds(ranks):
    a, b = (r["ddp_dropout"] for r in ranks)
    for step in range(STEPS):
        assert not torch.equal(a["mask"][step], b["mask"][step]), f"step {step}: same mask on both ranks"
        assert 0 < int(a["mask"][step].sum()) < a["mask"][step].numel()


def test_ddp_regularizer_terms_are_active(ranks):
    for rank, r in enumerate(ranks):
        terms = torch.stack(r["ddp_regularizer"]["terms"])
        assert bool(torch.isfinite(terms).all()), f"rank {rank}"
        assert bool((terms[:, 0] > 0).all()), f"rank {rank}: explicit term must be positive"
        assert bool((terms[:, 1] != 0).all()), f"rank {rank}: implicit term must be nonzero noise"
