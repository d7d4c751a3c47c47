"""Head gates and head importance, checked against hand-made and finite-difference computations."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, XLMRobertaConfig, XLMRobertaForMaskedLM

from xlsub.errors import XlsubError
from xlsub.models.heads import HeadGates, attention_modules, head_importance, num_heads
from xlsub.models.mlm import masked_lm_loss, perplexity

LAYERS, HEADS, HIDDEN, VOCAB = 3, 4, 32, 100


def tiny_model(kind: str = "xlmr", attn: str = "sdpa", seed: int = 0):
    """A randomly initialised 3-layer, 4-head masked LM (XLM-R or BERT), in eval mode."""
    torch.manual_seed(seed)
    shape = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                 intermediate_size=64, max_position_embeddings=70,
                 initializer_range=0.2)  # large enough weights that every head changes the loss
    if kind == "xlmr":
        return XLMRobertaForMaskedLM._from_config(XLMRobertaConfig(**shape), attn_implementation=attn).eval()
    return BertForMaskedLM._from_config(BertConfig(**shape), attn_implementation=attn).eval()


def tiny_batches(n_batches: int = 2, size: int = 3, length: int = 12, seed: int = 0):
    """Pre-masked MLM batches; the first sequence of each batch is padded after 8 tokens."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(5, VOCAB, (size, length), generator=g)
        attention_mask = torch.ones_like(ids)
        attention_mask[0, 8:] = 0
        scored = (torch.rand(size, length, generator=g) < 0.3) & (attention_mask == 1)
        scored[:, 1] = True  # at least one scored token per sequence
        batches.append({"input_ids": torch.where(scored, 4, ids), "attention_mask": attention_mask,
                        "labels": torch.where(scored, ids, -100)})
    return batches


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def float64_loss(model, batch):
    """Summed masked-LM cross-entropy through the stock forward, kept in the model's float64
    (`masked_lm_loss` casts logits to float32, too coarse for finite differences)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    labels = batch["labels"]
    scored = labels != -100
    return torch.nn.functional.cross_entropy(out.logits[scored], labels[scored], reduction="sum"), int(scored.sum())


def summed_loss(model, batch, gates) -> float:
    with torch.no_grad(), HeadGates(model, gates):
        return float(float64_loss(model, batch)[0])


def raw_importance(model, batches, mask=None):
    return head_importance(model, batches, mask, normalize_layers=False, normalize_global=False)


@pytest.mark.parametrize("kind", ["xlmr", "bert"])
def test_attention_modules_and_heads_per_layer(kind):
    model = tiny_model(kind)
    blocks = attention_modules(model)
    assert len(blocks) == LAYERS
    assert all(block.output.dense.in_features == HIDDEN for block in blocks)
    assert num_heads(model) == [HEADS] * LAYERS


def test_non_bert_model_is_refused():
    with pytest.raises(XlsubError, match="BERT-family"):
        attention_modules(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["xlmr", "bert"])
def test_all_ones_gate_leaves_logits_unchanged(kind, attn):
    model = tiny_model(kind, attn)
    batch = tiny_batches(1)[0]
    plain = logits(model, batch)
    with HeadGates(model, torch.ones(LAYERS, HEADS)):
        gated = logits(model, batch)
    assert (gated - plain).abs().max() < 1e-6
    after = logits(model, batch)  # hooks removed on exit
    assert torch.equal(after, plain)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_zero_gate_equals_zeroing_the_heads_value_rows(attn):
    model = tiny_model("xlmr", attn)
    batch = tiny_batches(1)[0]
    layer, head, size = 1, 2, HIDDEN // HEADS
    gates = torch.ones(LAYERS, HEADS)
    gates[layer, head] = 0
    with HeadGates(model, gates):
        gated = logits(model, batch)

    by_hand = copy.deepcopy(model)
    value = attention_modules(by_hand)[layer].self.value
    with torch.no_grad():
        value.weight[head * size:(head + 1) * size] = 0
        value.bias[head * size:(head + 1) * size] = 0
    expected = logits(by_hand, batch)
    assert (gated - expected).abs().max() < 1e-5
    assert (gated - logits(model, batch)).abs().max() > 1e-3  # the head mattered


def test_gates_of_wrong_shape_are_refused():
    with pytest.raises(XlsubError, match="shape"):
        HeadGates(tiny_model(), torch.ones(LAYERS, HEADS + 1))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_importance_equals_finite_differences(attn):
    """Unnormalised importance = sum over batches of |d L_b / d gate| / masked tokens, by central differences."""
    model = tiny_model("xlmr", attn).double()
    batches = tiny_batches(2)
    mask = torch.ones(LAYERS, HEADS, dtype=torch.float64)
    mask[2, 1] = 0  # a head switched off still gets its gradient at gate 0
    result = head_importance(model, batches, mask, normalize_layers=False, normalize_global=False,
                             loss_fn=float64_loss)

    eps = 1e-5
    expected = torch.zeros(LAYERS, HEADS, dtype=torch.float64)
    for batch in batches:
        for layer in range(LAYERS):
            for head in range(HEADS):
                up, down = mask.clone(), mask.clone()
                up[layer, head] += eps
                down[layer, head] -= eps
                slope = (summed_loss(model, batch, up) - summed_loss(model, batch, down)) / (2 * eps)
                expected[layer, head] += abs(slope)
    count = sum(int((b["labels"] != -100).sum()) for b in batches)
    expected /= count
    assert result.token_count == count
    torch.testing.assert_close(result.importance.double(), expected, rtol=1e-5, atol=1e-9)
    assert expected.min() > 0


def test_importance_adds_per_batch_gradients_not_running_totals():
    """The bertology bug guard: two batches give the sum of the two per-batch importances."""
    model = tiny_model()
    b1, b2 = tiny_batches(2)
    one, two, both = raw_importance(model, [b1]), raw_importance(model, [b2]), raw_importance(model, [b1, b2])
    summed = (one.importance * one.token_count + two.importance * two.token_count) / both.token_count
    torch.testing.assert_close(both.importance, summed, rtol=1e-5, atol=1e-8)

    # What never zeroing the gates' grad would give: |g1| + |g1 + g2|; it must differ here.
    gates = torch.ones(LAYERS, HEADS, requires_grad=True)
    with HeadGates(model, gates):
        g1 = torch.autograd.grad(masked_lm_loss(model, b1)[0], gates)[0]
        g2 = torch.autograd.grad(masked_lm_loss(model, b2)[0], gates)[0]
    running = (g1.abs() + (g1 + g2).abs()) / both.token_count
    assert (running - both.importance).abs().max() > 1e-4


def test_normalisation_is_layer_l2_then_global_min_max():
    model = tiny_model()
    batches = tiny_batches(2)
    raw = raw_importance(model, batches).importance
    by_layer = raw / raw.norm(dim=1, keepdim=True)
    expected = (by_layer - by_layer.min()) / (by_layer.max() - by_layer.min())
    torch.testing.assert_close(head_importance(model, batches).importance, expected)
    torch.testing.assert_close(head_importance(model, batches, normalize_global=False).importance, by_layer)
    assert head_importance(model, batches).importance.max() == 1


def test_importance_pass_gives_the_perplexity_under_the_mask():
    model = tiny_model()
    batches = tiny_batches(2)
    mask = torch.ones(LAYERS, HEADS)
    mask[0, :3] = 0
    with HeadGates(model, mask):
        expected = perplexity(model, batches)
    result = head_importance(model, batches, mask)
    assert result.perplexity == pytest.approx(expected, rel=1e-6)
    assert perplexity(model, batches) != pytest.approx(expected, rel=1e-4)  # the mask changed it


def test_importance_is_deterministic_and_restores_the_model():
    model = tiny_model()
    model.train()
    batches = tiny_batches(2)
    first, second = head_importance(model, batches), head_importance(model, batches)
    assert torch.equal(first.importance, second.importance)
    assert model.training
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    head_importance(model, batches, freeze_weights=False)  # bertology's pass, weight grads discarded
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_bertology_pass_gives_the_same_importance():
    model = tiny_model()
    batches = tiny_batches(2)
    torch.testing.assert_close(head_importance(model, batches, freeze_weights=False).importance,
                               head_importance(model, batches).importance)


def test_attention_entropy_matches_the_returned_attention_probabilities():
    model = tiny_model("xlmr", "eager")
    batches = tiny_batches(2)
    total, tokens = torch.zeros(LAYERS, HEADS, dtype=torch.float64), 0
    for batch in batches:
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_attentions=True)
        real = batch["attention_mask"].bool()
        for layer, probs in enumerate(out.attentions):  # [batch, heads, query, key]
            p = probs.double().permute(0, 2, 1, 3)[real]  # [real tokens, heads, key]
            logp = torch.where(p > 0, p.log(), torch.zeros_like(p))
            total[layer] += -(p * logp).sum(-1).sum(0)
        tokens += int(real.sum())
    result = head_importance(model, batches, entropy=True)
    torch.testing.assert_close(result.entropy.double(), total / tokens, rtol=1e-5, atol=1e-6)


def test_entropy_with_sdpa_is_refused():
    with pytest.raises(XlsubError, match="eager"):
        head_importance(tiny_model("xlmr", "sdpa"), tiny_batches(1), entropy=True)


def test_importance_in_mixed_precision_is_close_to_float32(monkeypatch):
    """prune's precision=bf16 (`xlsub.devices.autocast`): the importance pass and the perplexity in bfloat16 products
    (unit roundoff 2^-9) against float32: the same ranking of heads up to near-ties, perplexities within 1%, and not
    the float32 numbers (the products did run in 16 bits). On a CPU without bfloat16 products in hardware the stages
    refuse it; here it is let through, emulated (this tiny model costs nothing either way)."""
    from xlsub import devices
    from xlsub.devices import autocast

    monkeypatch.setattr(devices, "native_16bit_products", lambda dtype: True)
    model = tiny_model()
    batches = tiny_batches(4, size=4, length=16)
    exact, ppl = raw_importance(model, batches), perplexity(model, batches)
    with autocast("cpu", "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        mixed, mixed_ppl = raw_importance(model, batches), perplexity(model, batches)
    assert not torch.is_autocast_enabled("cpu")
    assert mixed.perplexity == pytest.approx(exact.perplexity, rel=1e-2) and mixed_ppl == pytest.approx(ppl, rel=1e-2)
    assert mixed_ppl != ppl and not torch.equal(mixed.importance, exact.importance)
    correlation = torch.corrcoef(torch.stack([mixed.importance.flatten(), exact.importance.flatten()]))[0, 1]
    assert correlation > 0.99, correlation
    with autocast("cpu", "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(XlsubError, match="^precision: 'fp64'"):
        autocast("cpu", "fp64")


def test_mixed_precision_on_a_cpu_that_would_emulate_it_is_refused(monkeypatch):
    from xlsub import devices

    monkeypatch.setattr(devices, "native_16bit_products", lambda dtype: False)
    with pytest.raises(XlsubError, match="^precision: this CPU has no bf16 products in hardware .AVX512-BF16 or AMX.*use fp32"):
        devices.autocast("cpu", "bf16")
    with pytest.raises(XlsubError, match="^precision: this CPU has no fp16 products in hardware .AVX512-FP16 or AMX-FP16"):
        devices.autocast("cpu", "fp16")
    assert devices.autocast("cpu", "fp32") is not None  # fp32 needs no hardware
