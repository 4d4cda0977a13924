"""Channel dropout (Dropout1d/2d/3d) and locked (variational) dropout: mask structure, the Philox
contract (bit-identical masks across backends for one seed), autograd, replacement and sites."""

import warnings

import pytest
import torch
from conftest import assert_bitwise_equal

import dropreg_ext as dr

CHANNEL = [
    (dr.Dropout1d, dr.functional.dropout1d, torch.nn.Dropout1d, (4, 6, 9), 1),
    (dr.Dropout2d, dr.functional.dropout2d, torch.nn.Dropout2d, (4, 6, 5, 3), 2),
    (dr.Dropout3d, dr.functional.dropout3d, torch.nn.Dropout3d, (3, 5, 2, 3, 4), 3),
]
IDS = ["1d", "2d", "3d"]


@pytest.mark.parametrize("module, fn, torch_module, shape, spatial", CHANNEL, ids=IDS)
def test_channel_mask_is_constant_over_spatial_dims(module, fn, torch_module, shape, spatial):
    x = torch.ones(shape)
    y = fn(x, 0.5, seed=11)
    reduce_dims = tuple(range(x.dim() - spatial, x.dim()))
    first = y.amax(dim=reduce_dims, keepdim=True)
    assert torch.equal(y, first.expand_as(y)), "a channel is partly dropped"
    assert set(y.unique().tolist()) <= {0.0, 2.0}
    assert 0 < int((first == 0).sum()) < first.numel(), "expected some channels dropped and some kept"


@pytest.mark.parametrize("module, fn, torch_module, shape, spatial", CHANNEL, ids=IDS)
def test_channel_masks_bit_identical_across_backends(module, fn, torch_module, shape, spatial, cpu_backend):
    x = torch.randn(shape)
    with dr.use_backend("reference"):
        expected = fn(x, 0.3, seed=2**63 + 5)
    with dr.use_backend(cpu_backend.name):
        assert_bitwise_equal(fn(x, 0.3, seed=2**63 + 5), expected)


@pytest.mark.parametrize("module, fn, torch_module, shape, spatial", CHANNEL, ids=IDS)
def test_channel_unbatched_input_and_bad_rank(module, fn, torch_module, shape, spatial):
    """Unbatched inputs are fine where torch's are (1d, 3d; a 3-D input to 2d is (N, C, L), with
    torch's warning); a 1-D input is torch's RuntimeError, or, for 3d, a warning and element-wise
    dropout (tests/test_torch_behaviour.py has every rank)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = fn(torch.ones(shape[1:]), 0.5, seed=1)
    assert y.shape == shape[1:] and (len(caught) == 1) == (spatial == 2)
    if spatial == 3:
        with pytest.warns(UserWarning, match="Received a 1-D input"):
            assert fn(torch.ones(shape[-1]), 0.5).shape == (shape[-1],)
    else:
        with pytest.raises(RuntimeError), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn(torch.ones(shape[-1]), 0.5)


@pytest.mark.parametrize("module, fn, torch_module, shape, spatial", CHANNEL, ids=IDS)
def test_channel_module_matches_functional_and_eval_identity(module, fn, torch_module, shape, spatial):
    m = module(0.4)
    x = torch.randn(shape)
    torch.manual_seed(3)
    y = m(x)
    torch.manual_seed(3)
    assert_bitwise_equal(y, fn(x, 0.4))
    assert m.eval()(x) is x
    assert "backend=" in repr(m)
    assert m.state_dict().keys() == torch_module(0.4).state_dict().keys()


def test_channel_dropout_gradient_is_the_mask():
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    y = dr.functional.dropout1d(x, 0.5, seed=9)
    y.sum().backward()
    mask = dr.functional.dropout1d(torch.ones_like(x), 0.5, seed=9)
    assert torch.equal(x.grad, mask)
    torch.autograd.gradcheck(lambda t: dr.functional.dropout1d(t, 0.5, seed=9), (x,))
    torch.autograd.gradgradcheck(lambda t: dr.functional.dropout1d(t, 0.5, seed=9), (x,))


def test_channel_dropout_saves_only_the_small_mask():
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    x = torch.randn(8, 16, 32, 32, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        dr.Dropout2d(0.5)(x * 1.0).sum()
    assert max(sizes) <= 8 * 16, f"saved tensors of sizes {sizes}"


def test_inplace_channel_dropout_writes_input():
    x = torch.ones(2, 3, 4)
    y = dr.functional.dropout1d(x, 0.5, inplace=True, seed=4)
    assert y is x and set(x.unique().tolist()) <= {0.0, 2.0}


@pytest.mark.parametrize("batch_first", [False, True])
def test_locked_dropout_shares_the_mask_over_time(batch_first):
    shape = (3, 7, 10) if batch_first else (7, 3, 10)  # B=3, T=7, H=10
    y = dr.LockedDropout(0.5, batch_first=batch_first)(torch.ones(shape))
    time_dim = 1 if batch_first else 0
    first = y.narrow(time_dim, 0, 1)
    assert torch.equal(y, first.expand_as(y))
    assert 0 < int((first == 0).sum()) < first.numel()


def test_locked_dropout_backends_and_seed():
    x = torch.randn(5, 2, 6)
    with dr.use_backend("reference"):
        expected = dr.functional.locked_dropout(x, 0.25, seed=77)
    assert_bitwise_equal(dr.functional.locked_dropout(x, 0.25, seed=77), expected)
    assert dr.LockedDropout(0.3).eval()(x) is x


def test_locked_dropout_bad_arguments():
    with pytest.raises(ValueError, match="argument 'p'"):
        dr.LockedDropout(1.5)
    with pytest.raises(TypeError, match="argument 'batch_first'"):
        dr.LockedDropout(0.5, batch_first=1)
    with pytest.raises(ValueError, match="argument 'input'"):
        dr.functional.locked_dropout(torch.ones(4), 0.5)


def test_broadcast_dropout_rejects_mask_shapes_that_do_not_broadcast():
    with pytest.raises(ValueError, match="argument 'mask_shape'"):
        dr.functional.broadcast_dropout(torch.ones(4, 3), 0.5, (4, 2))
    with pytest.raises(ValueError, match="argument 'mask_shape'"):
        dr.functional.broadcast_dropout(torch.ones(4, 3), 0.5, (2, 4, 3))


def test_replace_dropout_locked_is_opt_in():
    model = torch.nn.Sequential(torch.nn.Dropout(0.4), torch.nn.Linear(4, 4), torch.nn.Dropout2d(0.1))
    assert dr.replace_dropout(model, locked=True, batch_first=True) == 2
    assert type(model[0]) is dr.LockedDropout and model[0].p == 0.4 and model[0].batch_first
    assert type(model[2]) is dr.Dropout2d
    plain = torch.nn.Sequential(torch.nn.Dropout(0.4))
    dr.replace_dropout(plain)
    assert type(plain[0]) is dr.Dropout


def test_locked_and_channel_modules_are_regularizer_sites():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), dr.LockedDropout(0.3), torch.nn.Linear(6, 3))
    reg = dr.DropoutRegularizer(model, explicit="sampled", implicit=False)
    x = torch.randn(5, 2, 4)  # (T, B, features)
    with reg.capture():
        logits = model(x)
    assert len(reg._sites) == 1
    loss = reg.loss(logits, torch.randint(0, 3, (5, 2)))
    loss.backward()
    assert reg.last["explicit"] > 0
