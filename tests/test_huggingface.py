"""Real Hugging Face models with the fused dropout: GPT-2, BERT and T5 through ``replace_dropout``
(their hidden-state dropouts are ``nn.Dropout`` modules) and ``patch_functional`` (their eager
attention, as Llama's, applies attention-probability dropout with ``nn.functional.dropout``: so in
transformers 5), Llama through ``patch_functional`` alone. Tiny configs, random weights, no
downloads.

Per model: eval outputs bit for bit those of the unreplaced model; a training step has finite
gradients; ``torch.manual_seed`` reproduces the training loss; ``save_pretrained`` /
``from_pretrained`` round-trips; the regularizer's objective and its backward run.
"""

from __future__ import annotations

import copy

import pytest
import torch

import dropreg_ext as dr

transformers = pytest.importorskip("transformers", reason="the Hugging Face tests need transformers")

VOCAB, T, B = 97, 12, 2


def _gpt2():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                     resid_pdrop=0.2, embd_pdrop=0.2, attn_pdrop=0.2,
                                     attn_implementation="eager")
    return transformers.GPT2LMHeadModel(config)


def _bert():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.2,
                                     attention_probs_dropout_prob=0.2, attn_implementation="eager")
    return transformers.BertForMaskedLM(config)


def _t5():
    config = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   dropout_rate=0.2, decoder_start_token_id=0, attn_implementation="eager")
    return transformers.T5ForConditionalGeneration(config)


def _llama():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      attention_dropout=0.2, attn_implementation="eager")
    return transformers.LlamaForCausalLM(config)


# name -> (builder, whether it has nn.Dropout modules to replace); every forward runs under the patch
MODELS = {"gpt2": (_gpt2, True), "bert": (_bert, True), "t5": (_t5, True), "llama": (_llama, False)}


def _batch(name: str) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    if name == "t5":
        return {"input_ids": ids, "labels": torch.randint(0, VOCAB, (B, T), generator=g)}
    return {"input_ids": ids, "labels": ids}


def _fused(name: str, model):
    """The model with our dropout in, and the context its forward runs in (the functional patch)."""
    if MODELS[name][1]:
        assert dr.replace_dropout(model) > 0
        assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    return model, dr.patch_functional


@pytest.fixture(params=list(MODELS))
def case(request):
    torch.manual_seed(0)
    original = MODELS[request.param][0]()
    model, ctx = _fused(request.param, copy.deepcopy(original))
    return request.param, original, model, ctx


def test_eval_outputs_unchanged_bit_for_bit(case):
    name, original, model, ctx = case
    batch = _batch(name)
    original.eval(), model.eval()
    with torch.no_grad():
        expected = original(**batch).logits
        with ctx():
            got = model(**batch).logits
    assert torch.equal(got, expected)


def test_training_step_finite_gradients_and_seed_reproduces_loss(case):
    name, _, model, ctx = case
    batch = _batch(name)
    model.train()
    losses = []
    for _ in range(2):
        torch.manual_seed(123)
        model.zero_grad()
        with ctx():
            loss = model(**batch).loss
        loss.backward()
        losses.append(loss.detach())
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(losses[0], losses[1])
    torch.manual_seed(124)
    with ctx():
        other = model(**batch).loss
    assert not torch.equal(other.detach(), losses[0]), "another seed should give other masks"
    with torch.no_grad(), ctx():
        model.eval()
        clean = model(**batch).loss
    assert not torch.equal(clean, losses[0]), "training mode should drop"


@pytest.mark.parametrize("name", list(MODELS))
def test_attention_dropout_is_fused_only_under_the_patch(name, monkeypatch):
    """The attention-probability dropout ((B, heads, T, T)) runs the fused op only while the patch is
    on; replace_dropout alone covers the modules."""
    torch.manual_seed(0)
    model = MODELS[name][0]().train()
    if MODELS[name][1]:
        dr.replace_dropout(model)
    batch = _batch(name)
    calls = []
    draw = dr.ops._draw  # every fused dropout call draws its mask's state through it

    def counting(name, backend, args):
        if name == "dropout":
            calls.append(tuple(args[0].shape))
        return draw(name, backend, args)

    monkeypatch.setattr(dr.ops, "_draw", counting)
    model(**batch)
    assert (B, 4, T, T) not in calls
    calls.clear()
    with dr.patch_functional():
        model(**batch)
    layers = {"t5": 6}.get(name, 2)  # T5: encoder self, decoder self and cross attention, 2 layers each
    assert calls.count((B, 4, T, T)) == layers


def test_save_pretrained_round_trip(case, tmp_path):
    name, _, model, ctx = case
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    batch = _batch(name)
    saved, restored = model.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys() and all(torch.equal(saved[k], restored[k]) for k in saved)
    with torch.no_grad(), ctx():  # the loaded model may pick another attention kernel: values, not bits
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)


def test_regularizer_objective_and_backward(case):
    name, _, model, ctx = case
    batch = _batch(name)
    model.train()
    reg = dr.DropoutRegularizer(model, explicit="sampled", implicit=True)
    with ctx():
        with reg.capture():
            logits = model(**{k: v for k, v in batch.items() if k != "labels" or name == "t5"}).logits
        j, penalty, noise = reg.terms(logits, batch["labels"])
    assert torch.isfinite(j) and torch.isfinite(noise)
    assert penalty > 0, "no dropout site was recorded"
    (j + penalty + noise).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
