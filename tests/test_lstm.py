"""dropreg_ext.LSTM against torch.nn.LSTM: outputs, final states and gradients with the same weights
(float64), the state_dict both ways, the double backward (gradgradcheck), the between-layer dropout
(the same masks as dr.functional.dropout, and regularizer sites), and the errors for what it does not
support."""

from __future__ import annotations

import pytest
import torch

import dropreg_ext as dr

F64 = torch.float64

CONFIGS = [
    pytest.param(dict(num_layers=1), id="1layer"),
    pytest.param(dict(num_layers=2), id="2layers"),
    pytest.param(dict(num_layers=2, batch_first=True), id="2layers-batch_first"),
    pytest.param(dict(num_layers=3, bias=False), id="3layers-nobias"),
    pytest.param(dict(num_layers=2, dropout=0.4), id="2layers-dropout-eval"),
]


def pair(input_size=5, hidden_size=7, **kwargs):
    """(ours, torch's) with torch's weights loaded into ours, float64; both in eval mode when dropout is set."""
    torch.manual_seed(0)
    ref = torch.nn.LSTM(input_size, hidden_size, **kwargs).double()
    ours = dr.LSTM(input_size, hidden_size, **kwargs).double()
    ours.load_state_dict(ref.state_dict())
    if kwargs.get("dropout"):
        ours.eval()
        ref.eval()
    return ours, ref


def inputs(ours, seq=6, batch=3, with_state=True):
    gen = torch.Generator().manual_seed(1)
    shape = (batch, seq, ours.input_size) if ours.batch_first else (seq, batch, ours.input_size)
    x = torch.randn(shape, generator=gen, dtype=F64, requires_grad=True)
    if not with_state:
        return x, None
    state = tuple(torch.randn(ours.num_layers, batch, ours.hidden_size, generator=gen, dtype=F64,
                              requires_grad=True) for _ in range(2))
    return x, state


@pytest.mark.parametrize("with_state", [True, False], ids=["hx", "no-hx"])
@pytest.mark.parametrize("kwargs", CONFIGS)
def test_outputs_and_gradients_match_nn_lstm(kwargs, with_state):
    ours, ref = pair(**kwargs)
    x, hx = inputs(ours, with_state=with_state)
    out, (h, c) = ours(x, hx)
    out_ref, (h_ref, c_ref) = ref(x, hx)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close((h, c), (h_ref, c_ref))
    assert out.shape == out_ref.shape and h.shape == h_ref.shape
    weights = torch.randn_like(out)  # a loss that weighs every output and both final states
    leaves = [x, *(hx or ())]

    def grads(module, output, final):
        loss = (output * weights).sum() + final[0].square().sum() + final[1].sum()
        return torch.autograd.grad(loss, leaves + list(module.parameters()))

    for a, b in zip(grads(ours, out, (h, c)), grads(ref, out_ref, (h_ref, c_ref))):
        torch.testing.assert_close(a, b)


def test_unbatched_input_matches_nn_lstm():
    ours, ref = pair(num_layers=2)
    x = torch.randn(4, 5, dtype=F64)
    state = (torch.randn(2, 7, dtype=F64), torch.randn(2, 7, dtype=F64))
    for hx in (None, state):
        out, final = ours(x, hx)
        out_ref, final_ref = ref(x, hx)
        torch.testing.assert_close(out, out_ref)
        torch.testing.assert_close(final, final_ref)


def test_state_dict_round_trip_both_ways():
    torch.manual_seed(3)
    ref = torch.nn.LSTM(4, 6, num_layers=2, dropout=0.2)
    ours = dr.LSTM(4, 6, num_layers=2, dropout=0.2)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert [v.shape for v in ours.state_dict().values()] == [v.shape for v in ref.state_dict().values()]
    ours.load_state_dict(ref.state_dict())
    back = torch.nn.LSTM(4, 6, num_layers=2, dropout=0.2)
    back.load_state_dict(ours.state_dict())
    for (name, a), b in zip(ref.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name


def test_initialization_is_nn_lstm_s():
    """Same parameters, in the same order, from the same random stream as nn.LSTM."""
    torch.manual_seed(11)
    ref = torch.nn.LSTM(3, 5, num_layers=2)
    torch.manual_seed(11)
    ours = dr.LSTM(3, 5, num_layers=2)
    for (name, a), (name_ref, b) in zip(ours.named_parameters(), ref.named_parameters()):
        assert name == name_ref and torch.equal(a, b), name


def test_gradgradcheck():
    """The regularizers differentiate the model twice: second derivatives by finite differences, float64."""
    torch.manual_seed(0)
    lstm = dr.LSTM(3, 4, num_layers=2).double()
    x = torch.randn(4, 2, 3, dtype=F64, requires_grad=True)
    h0 = torch.randn(2, 2, 4, dtype=F64, requires_grad=True)
    params = list(lstm.parameters())
    names = [name for name, _ in lstm.named_parameters()]

    def fn(inp, state, *weights):
        output, (h, c) = torch.func.functional_call(lstm, dict(zip(names, weights)), (inp, (state, state * 0.5)))
        return output.tanh().sum(0), h, c

    assert torch.autograd.gradgradcheck(fn, (x, h0, *[p.detach().requires_grad_() for p in params]))


def test_between_layer_dropout_uses_the_fused_dropout():
    """In training, the output of every layer but the last goes through dr.Dropout: the same masks as
    dr.functional.dropout from the same generator state, between the layers of an nn.LSTM."""
    ours, ref = pair(num_layers=3)
    ours.dropout = 0.5
    for module in ours.dropouts:
        module.p = 0.5
    ours.train()
    singles = [torch.nn.LSTM(5 if layer == 0 else 7, 7).double() for layer in range(3)]
    for layer, single in enumerate(singles):
        single.load_state_dict({k.replace(f"_l{layer}", "_l0"): v for k, v in ref.state_dict().items()
                                if k.endswith(f"_l{layer}")})
    x, _ = inputs(ours, with_state=False)
    torch.manual_seed(5)
    out, (h, _) = ours(x)
    torch.manual_seed(5)
    y = x
    for layer, single in enumerate(singles):
        if layer:
            y = dr.functional.dropout(y, 0.5)
        y, (h_layer, _) = single(y)
        torch.testing.assert_close(h[layer], h_layer[0])
    torch.testing.assert_close(out, y)
    assert (out - ours.eval()(x)[0]).abs().max() > 0.01  # the dropout did change the output


def test_dropout_sites_under_the_regularizer():
    """Inside DropoutRegularizer.capture the between-layer dropouts are sites (one per call), the
    objective has a double backward through the LSTM, and without dropout there is no site."""
    torch.manual_seed(0)
    lstm = dr.LSTM(4, 6, num_layers=3, dropout=0.3)
    head = torch.nn.Linear(6, 5)
    model = torch.nn.ModuleDict({"lstm": lstm, "head": head})
    x, y = torch.randn(7, 2, 4), torch.randint(0, 5, (7, 2))
    reg = dr.DropoutRegularizer(model, explicit="sampled", implicit=True)
    with reg.capture():
        logits = head(lstm(x)[0])
    assert [tuple(s.h.shape) for s in reg._sites] == [(7, 2, 6)] * 2 and all(s.q == 0.3 for s in reg._sites)
    loss = reg.loss(logits, y)
    loss.backward()
    assert reg.last["explicit"] > 0 and lstm.weight_hh_l0.grad.abs().sum() > 0
    with dr.record_sites(dr.LSTM(4, 6, num_layers=3)) as sites:
        pass
    assert sites == []


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(bidirectional=True), NotImplementedError, "bidirectional"),
    (dict(proj_size=3), NotImplementedError, "proj_size"),
    (dict(num_layers=0), ValueError, "num_layers"),
    (dict(hidden_size=0), ValueError, "hidden_size"),
    (dict(dropout=1.5), ValueError, "dropout"),
    (dict(batch_first=1), TypeError, "batch_first"),
    (dict(bias="yes"), TypeError, "bias"),
])
def test_constructor_errors(kwargs, error, match):
    args = dict(input_size=3, hidden_size=4, num_layers=2) | kwargs
    with pytest.raises(error, match=match):
        dr.LSTM(**args)


def test_single_layer_dropout_warns_as_nn_lstm():
    with pytest.warns(UserWarning, match="num_layers greater than 1"):
        dr.LSTM(3, 4, dropout=0.5)


def test_forward_errors():
    lstm = dr.LSTM(3, 4, num_layers=2)
    packed = torch.nn.utils.rnn.pack_padded_sequence(torch.randn(5, 2, 3), [5, 3])
    with pytest.raises(NotImplementedError, match="PackedSequence"):
        lstm(packed)
    with pytest.raises(ValueError, match="argument 'input'"):
        lstm(torch.randn(5, 2, 2, 3))
    with pytest.raises(ValueError, match="input_size=3"):
        lstm(torch.randn(5, 2, 4))
    with pytest.raises(ValueError, match=r"h_0 must have shape \(2, 2, 4\)"):
        lstm(torch.randn(5, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(2, 2, 4)))
    with pytest.raises(TypeError, match="argument 'hx'"):
        lstm(torch.randn(5, 2, 3), torch.zeros(2, 2, 4))


def test_repr():
    assert dr.LSTM(3, 4, num_layers=2, dropout=0.1, batch_first=True).extra_repr() == (
        "3, 4, num_layers=2, batch_first=True, dropout=0.1")
    assert dr.LSTM(3, 4, bias=False).extra_repr() == "3, 4, bias=False"
