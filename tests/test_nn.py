"""Modules: ``dr.Dropout`` as a drop-in torch.nn.Dropout, ``dr.replace_dropout`` and the backend
switches ``set_backend`` / ``get_backend`` / ``use_backend``."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from conftest import assert_bitwise_equal
from torch.utils._python_dispatch import TorchDispatchMode

import dropreg_ext as dr


def test_is_a_torch_dropout():
    m = dr.Dropout(0.2, inplace=True)
    assert isinstance(m, torch.nn.Dropout)
    assert m.p == 0.2 and m.inplace is True and m.training is True
    assert dr.Dropout().p == 0.5 and dr.Dropout().inplace is False


def test_p_is_stored_as_float():
    assert isinstance(dr.Dropout(1).p, float) and dr.Dropout(1).p == 1.0
    assert isinstance(dr.Dropout(0).p, float)


@pytest.mark.parametrize("name", ["auto", "cpu", "reference"])
def test_repr_shows_backend(name):
    m = dr.Dropout(0.25)
    with dr.use_backend(name):
        assert repr(m) == f"Dropout(p=0.25, inplace=False, backend={name})"


def test_repr_in_a_model():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), dr.Dropout(0.1, inplace=True))
    assert "Dropout(p=0.1, inplace=True, backend=auto)" in repr(model)


def test_state_dict_equals_torch_dropout():
    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(4, 3), dr.Dropout(0.3), torch.nn.Linear(3, 2))
    torch.manual_seed(0)
    theirs = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.3), torch.nn.Linear(3, 2))
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert list(sd_ours) == list(sd_theirs)
    for key in sd_ours:
        assert torch.equal(sd_ours[key], sd_theirs[key])
    assert dr.Dropout(0.3).state_dict() == torch.nn.Dropout(0.3).state_dict() == {}
    # loads both ways, strictly
    ours.load_state_dict(sd_theirs, strict=True)
    theirs.load_state_dict(sd_ours, strict=True)


def _model_with_dropout():
    return torch.nn.Sequential(torch.nn.Linear(6, 5), dr.Dropout(0.4, inplace=True), torch.nn.ReLU())


def test_pickle_round_trip():
    model = _model_with_dropout()
    restored = pickle.loads(pickle.dumps(model))
    drop = restored[1]
    assert type(drop) is dr.Dropout
    assert drop.p == 0.4 and drop.inplace is True and drop.training is True
    x = torch.randn(3, 6)
    restored.eval()
    model.eval()
    assert_bitwise_equal(restored(x), model(x))
    torch.manual_seed(3)
    a = restored.train()(x)
    torch.manual_seed(3)
    assert_bitwise_equal(a, model.train()(x))


def test_torch_save_round_trip():
    buffer = io.BytesIO()
    torch.save(_model_with_dropout(), buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    assert type(restored[1]) is dr.Dropout and restored[1].p == 0.4


def test_train_eval_switch():
    m = dr.Dropout(0.5)
    x = torch.randn(1000)
    assert not torch.equal(m(x), x)
    m.eval()
    assert m(x) is x
    m.train()
    assert not torch.equal(m(x), x)


# ------------------------------------------------------------------------------------------------
# replace_dropout
# ------------------------------------------------------------------------------------------------


class MyDropout(torch.nn.Dropout):
    """A user subclass with its own behaviour: must be left alone."""

    def forward(self, input):
        return input * 0


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Linear(8, 8)
        self.drop = torch.nn.Dropout(0.1)
        self.blocks = torch.nn.ModuleList(
            [
                torch.nn.Sequential(
                    torch.nn.Linear(8, 8), torch.nn.Dropout(0.2, inplace=True), torch.nn.GELU()
                ),
                torch.nn.Sequential(
                    torch.nn.Linear(8, 8),
                    torch.nn.Sequential(torch.nn.Dropout(0.3), torch.nn.Identity()),
                ),
            ]
        )
        self.channel_2d = torch.nn.Dropout2d(0.5)
        self.channel_1d = torch.nn.Dropout1d(0.5)
        self.alpha = torch.nn.AlphaDropout(0.5)
        self.feature_alpha = torch.nn.FeatureAlphaDropout(0.3, inplace=True)
        self.keep_subclass = MyDropout(0.5)
        self.already = dr.Dropout(0.6)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x):
        x = self.drop(self.stem(x))
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_replace_dropout_nested_count_and_attributes():
    model = Net()
    model.blocks[1].eval()  # one replaced module keeps its eval flag
    before = {name: (type(m), getattr(m, "p", None), getattr(m, "inplace", None), m.training)
              for name, m in model.named_modules()}
    count = dr.replace_dropout(model)
    assert count == 7
    after = {name: m for name, m in model.named_modules()}
    assert set(after) == set(before), "module tree changed shape"
    replaced = ["drop", "blocks.0.1", "blocks.1.1.0"]
    for name in replaced:
        kind, p, inplace, training = before[name]
        assert kind is torch.nn.Dropout
        new = after[name]
        assert type(new) is dr.Dropout, name
        assert (new.p, new.inplace, new.training) == (p, inplace, training), name
    assert after["blocks.1.1.0"].training is False
    assert type(after["channel_2d"]) is dr.Dropout2d and after["channel_2d"].p == 0.5
    assert type(after["channel_1d"]) is dr.Dropout1d and after["channel_1d"].p == 0.5
    assert type(after["alpha"]) is dr.AlphaDropout and after["alpha"].p == 0.5
    assert type(after["feature_alpha"]) is dr.FeatureAlphaDropout and after["feature_alpha"].inplace
    untouched = {
        "keep_subclass": MyDropout,
        "already": dr.Dropout,
    }
    for name, kind in untouched.items():
        assert type(after[name]) is kind, name
    assert dr.replace_dropout(model) == 0, "a second pass has nothing left to replace"


def test_replace_dropout_eval_outputs_identical():
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(4, 8)
    before = model(x)
    dr.replace_dropout(model)
    assert_bitwise_equal(model(x), before)


def test_replace_dropout_training_uses_our_kernel():
    model = torch.nn.Sequential(torch.nn.Dropout(0.5))
    wrapper = torch.nn.Sequential(model)
    assert dr.replace_dropout(wrapper) == 1
    x = torch.randn(300)
    torch.manual_seed(8)
    y = wrapper(x)
    torch.manual_seed(8)
    assert_bitwise_equal(y, dr.functional.dropout(x, 0.5))


def test_replace_dropout_argument_errors():
    with pytest.raises(ValueError, match="argument 'model'.*torch.nn.Dropout"):
        dr.replace_dropout(torch.nn.Dropout(0.5))
    with pytest.raises(TypeError, match="argument 'model'.*list"):
        dr.replace_dropout([torch.nn.Dropout(0.5)])
    assert dr.replace_dropout(torch.nn.Linear(2, 2)) == 0


# ------------------------------------------------------------------------------------------------
# Backend switches
# ------------------------------------------------------------------------------------------------


def test_set_and_get_backend():
    assert dr.get_backend() == "auto"
    for name in dr.ops.BACKENDS:
        dr.set_backend(name)
        assert dr.get_backend() == name
    with pytest.raises(ValueError, match="argument 'name'"):
        dr.set_backend("CPU")
    assert dr.get_backend() == dr.ops.BACKENDS[-1], "a refused name must not change the backend"


def test_use_backend_restores_on_exit_and_on_exception():
    dr.set_backend("reference")
    with dr.use_backend("cpu"):
        assert dr.get_backend() == "cpu"
        with dr.use_backend("auto"):
            assert dr.get_backend() == "auto"
        assert dr.get_backend() == "cpu"
    assert dr.get_backend() == "reference"
    with pytest.raises(KeyError):
        with dr.use_backend("cpu"):
            raise KeyError("boom")
    assert dr.get_backend() == "reference"
    with pytest.raises(ValueError, match="argument 'name'"):
        with dr.use_backend("bogus"):
            pass
    assert dr.get_backend() == "reference"


def test_auto_resolves_to_cpu_kernels_on_cpu():
    x = torch.randn(2)
    expected = "cpu" if dr._ext.HAS_CPU else "reference"
    assert dr.ops.resolve_backend(x) == expected
    assert dr.ops.resolve_backend(x, "reference") == "reference"
    assert "reference" in dr.ops.available_backends("cpu")
    assert "cuda" not in dr.ops.available_backends("cpu")


class _OpLog(TorchDispatchMode):
    """Records the name of every op that reaches the dispatcher."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


# The ops a module's call dispatches: the C++ op draws its own state; a Python backend's takes it
# from rng_state (make_rng), then runs its op.
DROPOUT_OPS_OF = {
    "cpu": ["dropreg.dropout_draw.default"],
    "reference": ["dropreg.rng_state.default", "dropreg.dropout_reference.default"],
    "triton": ["dropreg.rng_state.default", "dropreg.dropout_triton.default"],
}


def test_module_follows_backend(cpu_backend):
    m = dr.Dropout(0.5)
    x = torch.randn(513)
    with dr.use_backend(cpu_backend.name), _OpLog() as log:
        torch.manual_seed(2)
        y = m(x)
    dropout_ops = [name for name in log.names if name.startswith("dropreg.")]
    assert dropout_ops == DROPOUT_OPS_OF[cpu_backend.name]
    torch.manual_seed(2)
    rng = dr.ops.make_rng("cpu")
    assert_bitwise_equal(y, dr.reference.dropout(x, 0.5, rng))
