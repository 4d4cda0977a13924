"""Activation checkpointing around fused dropout: the recomputed forward draws the first forward's masks,
so outputs and gradients are the eager ones bit for bit (float64).

torch restores the generator before recomputing when ``preserve_rng_state=True``; then our draws repeat
by construction (a mask is a function of the drawn ``[seed, offset]``). With ``preserve_rng_state=False``
it does not, and a dropout redraws: the control below shows the wrong gradients that gives, and
``dr.checkpoint_context`` replays the draws instead. Under ``torch.compile`` the draw ops are
nondeterministic-seeded, so the partitioner never recomputes them.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import dropreg_ext as dr


class Segment(torch.nn.Module):
    """Linear -> ReLU -> dropout -> Linear -> ReLU -> dropout: two draws inside the checkpoint."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.fc1 = torch.nn.Linear(8, 16, dtype=torch.float64)
        self.fc2 = torch.nn.Linear(16, 4, dtype=torch.float64)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
        self.drop1, self.drop2 = dr.Dropout(0.5), dr.Dropout(0.3)

    def forward(self, x):
        return self.drop2(torch.relu(self.fc2(self.drop1(torch.relu(self.fc1(x))))))


def _run(run_segment) -> tuple:
    """Output and gradients (parameters and input) of one step; the generator moves on between the
    forward and the backward, as other layers' draws would move it."""
    segment = Segment()
    x = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    torch.manual_seed(42)
    y = run_segment(segment, x)
    torch.rand(3)
    (y * torch.arange(1.0, 5.0, dtype=torch.float64)).sum().backward()
    return y.detach(), [p.grad for p in segment.parameters()] + [x.grad]


def _eager(segment, x):
    return segment(x)


def _assert_same(got, want):
    assert torch.equal(got[0], want[0]), "outputs differ"
    for i, (a, b) in enumerate(zip(got[1], want[1])):
        assert torch.equal(a, b), f"gradient {i} differs"


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_preserved_rng_state_recomputes_the_same_masks(reentrant):
    _assert_same(_run(lambda s, x: checkpoint(s, x, use_reentrant=reentrant)), _run(_eager))


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_without_preserved_rng_state_a_plain_recompute_redraws(reentrant):
    """The control: torch leaves the generator where the forward left it, so the recompute draws other
    masks and the gradients are wrong (for torch's dropout as for ours without the context)."""
    got = _run(lambda s, x: checkpoint(s, x, use_reentrant=reentrant, preserve_rng_state=False))
    want = _run(_eager)
    assert torch.equal(got[0], want[0])
    assert not all(torch.equal(a, b) for a, b in zip(got[1], want[1]))


@pytest.mark.parametrize("preserve", [True, False], ids=["preserve", "no-preserve"])
def test_checkpoint_context_replays_the_draws(preserve):
    run = lambda s, x: checkpoint(  # noqa: E731
        s, x, use_reentrant=False, preserve_rng_state=preserve, context_fn=dr.checkpoint_context)
    _assert_same(_run(run), _run(_eager))


@pytest.mark.parametrize("preserve", [True, False], ids=["preserve", "no-preserve"])
def test_compiled_checkpoint_keeps_the_masks(preserve):
    def run(segment, x):
        fn = torch.compile(lambda t: checkpoint(segment, t, use_reentrant=False, preserve_rng_state=preserve),
                           backend="aot_eager", fullgraph=True)
        return fn(x)

    torch._dynamo.reset()
    _assert_same(_run(run), _run(_eager))
