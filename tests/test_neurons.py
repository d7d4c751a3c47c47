"""Feed-forward neurons (`xlsub.models.neurons`) on every family's tiny preset, against computations done
another way: counts from stored activations and from the pre-activation found by module name, LAPE by
hand and by a transcription of the reference's steps in numpy, gates against down-projection columns
zeroed by parameter name, importance against finite differences."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import transformers

from xlsub.data.lm import mlm_collator
from xlsub.errors import XlsubError
from xlsub.models.families import CAUSAL, adapter_for
from xlsub.models.loading import FAMILY_PRESETS, scratch_model, train_tokenizer
from xlsub.models.mlm import IGNORE_INDEX, lm_loss
from xlsub.models.neurons import (
    ActivationCounter,
    NeuronGates,
    activation_statistics,
    lape_selection,
    neuron_importance,
    neuron_mask_shape,
    random_neuron_mask_like,
    zero_neurons,
)

MAX_SEQ_LEN = 64
TEXTS = [
    "The quick brown fox jumps over the lazy dog.", "Der schnelle braune Fuchs springt über den faulen Hund.",
    "El rápido zorro marrón salta sobre el perro perezoso.", "Быстрая коричневая лиса прыгает через ленивую собаку.",
    "敏捷的棕色狐狸跳过了懒狗。", "Open the file", "Datei öffnen", "Abrir el archivo", "Открыть файл",
    "打开文件", "Save the page as a bookmark", "Seite als Lesezeichen speichern",
]

# Read off each family's modeling file, independent of the adapter: the module whose output is the FFN's
# pre-activation (ModernBERT's Wi: its first half, `input`, is the activated one) and the down projection's
# weight (stored [in, out] where True: GPT-2's Conv1D).
LAYER = {
    "tiny-roberta": "roberta.encoder.layer.{l}", "tiny-bert": "bert.encoder.layer.{l}",
    "tiny-distilbert": "distilbert.transformer.layer.{l}", "tiny-modernbert": "model.layers.{l}",
    "tiny-llama": "model.layers.{l}", "tiny-mistral": "model.layers.{l}", "tiny-qwen2": "model.layers.{l}",
    "tiny-qwen3": "model.layers.{l}", "tiny-gemma": "model.layers.{l}", "tiny-gpt2": "transformer.h.{l}",
    "tiny-bloom": "transformer.h.{l}",
}
FFN = {  # family -> (pre-activation module, down projection weight, transposed)
    "bert": ("intermediate.dense", "output.dense.weight", False),
    "distilbert": ("ffn.lin1", "ffn.lin2.weight", False),
    "modernbert": ("mlp.Wi", "mlp.Wo.weight", False),
    "llama": ("mlp.gate_proj", "mlp.down_proj.weight", False),
    "gpt2": ("mlp.c_fc", "mlp.c_proj.weight", True),
    "bloom": ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h.weight", False),
}
KIND = {"tiny-roberta": "bert", "tiny-bert": "bert", "tiny-distilbert": "distilbert", "tiny-modernbert": "modernbert",
        "tiny-gpt2": "gpt2", "tiny-bloom": "bloom"}


def ffn_names(preset: str, layer: int) -> tuple[str, str, bool]:
    pre, down, transposed = FFN[KIND.get(preset, "llama")]
    prefix = LAYER[preset].format(l=layer)
    return f"{prefix}.{pre}", f"{prefix}.{down}", transposed


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([TEXTS * 20], vocab_size=300)


def build(preset: str, tokenizer, dtype=torch.float32):
    transformers.set_seed(0)
    return scratch_model(preset, tokenizer, MAX_SEQ_LEN).to(dtype).eval()


def lm_batch(model, tokenizer, texts):
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    if adapter_for(model).objective == CAUSAL:
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        return batch
    return dict(mlm_collator(tokenizer, seed=0)([{"input_ids": ids} for ids in tokenizer(texts)["input_ids"]]))


@pytest.fixture(scope="module", params=list(LAYER))
def family(request, tokenizer):
    assert set(LAYER) == set(FAMILY_PRESETS)
    model = build(request.param, tokenizer)
    return request.param, model, lm_batch(model, tokenizer, TEXTS[:6])


def logits_of(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# -- activation statistics --------------------------------------------------------------------------

def test_counts_equal_a_recount_of_the_stored_activations_without_padding(family, tokenizer):
    preset, model, _ = family
    layers, neurons = neuron_mask_shape(model)
    batches = [tokenizer(texts, padding=True, return_tensors="pt") for texts in (TEXTS[:5], TEXTS[5:12])]
    assert all(bool((b["attention_mask"] == 0).any()) for b in batches)  # both batches hold padding
    stored, pre = {layer: [] for layer in range(layers)}, {layer: [] for layer in range(layers)}
    hooks = []
    for layer in range(layers):
        act_module = adapter_for(model).ffn_activation(adapter_for(model).layers(model)[layer])
        hooks.append(act_module.register_forward_hook(lambda m, a, out, layer=layer: stored[layer].append(out.detach())))
        pre_name = ffn_names(preset, layer)[0]
        hooks.append(model.get_submodule(pre_name).register_forward_hook(lambda m, a, out, layer=layer: pre[layer].append(out.detach())))
    try:
        stats = activation_statistics(model, [dict(b) for b in batches])
    finally:
        for hook in hooks:
            hook.remove()

    masks = [b["attention_mask"].bool() for b in batches]
    assert stats.tokens == sum(int(m.sum()) for m in masks)
    assert stats.active.dtype == torch.int64 and stats.active.shape == (layers, neurons)
    for layer in range(layers):
        # one real token at a time, row by row: padding never enters
        from_stored = torch.zeros(neurons, dtype=torch.int64)
        from_pre = torch.zeros(neurons, dtype=torch.int64)
        for acts, pres, mask in zip(stored[layer], pre[layer], masks):
            if KIND.get(preset) == "modernbert":
                pres = pres.chunk(2, dim=-1)[0]  # Wi -> (input, gate): act(input) is the activated half
            for row in range(len(mask)):
                from_stored += (acts[row][mask[row]] > 0).sum(0)
                from_pre += (pres[row][mask[row]] > 0).sum(0)  # GELU/SiLU(x) > 0 exactly where x > 0
        assert torch.equal(stats.active[layer], from_stored)
        assert torch.equal(stats.active[layer], from_pre)
    assert 0 < int(stats.active.sum()) < stats.tokens * layers * neurons
    assert torch.all((stats.probability >= 0) & (stats.probability <= 1))


def test_counter_counts_only_its_own_passes(tokenizer):
    model = build("tiny-llama", tokenizer)
    batch = dict(tokenizer(TEXTS[:3], padding=True, return_tensors="pt"))
    with ActivationCounter(model) as counter:
        with torch.no_grad():
            model(**batch)  # a forward outside `count` is not counted
        assert counter.stats().tokens == 0 and int(counter.stats().active.sum()) == 0
        counter.count(batch)
        once = counter.stats()
        counter.count(batch)
        twice = counter.stats()
    assert twice.tokens == 2 * once.tokens == 2 * int(batch["attention_mask"].sum())
    assert torch.equal(twice.active, 2 * once.active)
    assert all(not module._forward_hooks for module in model.modules())  # hooks removed
    with pytest.raises(XlsubError, match="no real tokens"):
        _ = ActivationCounter(model).stats().probability


# -- LAPE ------------------------------------------------------------------------------------------------

def test_lape_on_a_hand_made_case():
    # 3 languages x 2 layers x 5 neurons = 30 values; background below 0.16
    p = (torch.arange(30, dtype=torch.float64) * 0.005 + 0.01).view(3, 2, 5)
    p[:, 0, 0] = torch.tensor([0.9, 0.0, 0.0])  # entropy 0, above the filter: selected, language 0's
    p[:, 1, 4] = torch.tensor([0.0, 0.8, 0.7])  # entropy 0.69: selected, languages 1 and 2 (both above the bar)
    p[:, 0, 2] = torch.tensor([0.6, 0.6, 0.6])  # above the filter, entropy log 3: not among the 2 lowest
    p[:, 1, 1] = torch.tensor([0.3, 0.0, 0.0])  # entropy 0 but p = the filter value, not above it: infinite
    # filter_rate 0.8: k = 24, the 24th smallest of 30 = the 7th largest = 0.3; top_rate 0.2: 2 of 10 neurons;
    # activation_bar 0.9: k = 27, the 4th largest = 0.6, so p in {0.9, 0.8, 0.7} assign
    selected = lape_selection(p, top_rate=0.2, filter_rate=0.8, activation_bar=0.9)
    expected = torch.zeros(3, 2, 5, dtype=torch.bool)
    expected[0, 0, 0] = expected[1, 1, 4] = expected[2, 1, 4] = True
    assert torch.equal(selected, expected)
    # with three neurons to choose, the uniform one (0, 2) comes next, but its p = 0.6 is not above the bar
    assert torch.equal(lape_selection(p, top_rate=0.3, filter_rate=0.8, activation_bar=0.9), expected)
    # a lower bar (k = 24: 0.3) assigns it to every language
    lower = lape_selection(p, top_rate=0.3, filter_rate=0.8, activation_bar=0.8)
    assert lower[:, 0, 2].all() and int(lower.sum()) == 6


def reference_lape(probs: np.ndarray, top_rate: float, filter_rate: float, activation_bar: float) -> np.ndarray:
    """The steps of the reference code (RUCAIBox/Language-Specific-Neurons, identify.py), transcribed in numpy
    on its layout [layers, neurons, languages]: quantiles as the k-th value of the sorted flat array."""
    over = np.moveaxis(probs, 0, -1)
    total = over.sum(-1, keepdims=True)
    normed = np.divide(over, total, out=np.zeros_like(over), where=total > 0)
    logs = np.log(normed, out=np.zeros_like(normed), where=normed > 0)
    entropy = -(normed * logs).sum(-1)
    flat = np.sort(over.ravel())
    filter_value = flat[round(flat.size * filter_rate) - 1]
    entropy[(over > filter_value).sum(-1) == 0] = np.inf
    chosen = np.argsort(entropy.ravel(), kind="stable")[: round(entropy.size * top_rate)]
    bar_value = flat[round(flat.size * activation_bar) - 1]
    out = np.zeros(probs.shape, dtype=bool)
    for layer, neuron in zip(*np.divmod(chosen, entropy.shape[1])):
        for lang in np.nonzero(over[layer, neuron] > bar_value)[0]:
            out[lang, layer, neuron] = True
    return out


@pytest.mark.parametrize("rates", [(0.01, 0.95, 0.95), (0.1, 0.9, 0.95), (0.05, 0.8, 0.7)])
def test_lape_equals_the_reference_steps(rates):
    generator = torch.Generator().manual_seed(0)
    p = torch.rand(4, 3, 50, generator=generator, dtype=torch.float64) ** 3 * 0.5
    for i, (layer, neuron) in enumerate([(0, 3), (0, 17), (1, 5), (2, 40), (2, 41), (1, 30)]):
        p[:, layer, neuron] = 0.01
        p[i % 4, layer, neuron] = 0.6 + 0.05 * i  # language-specific
    p[:, 1, 7] = 0.0  # never active
    expected = torch.from_numpy(reference_lape(p.numpy(), *rates))
    selected = lape_selection(p, *rates)
    assert torch.equal(selected, expected)
    assert int(selected.any(0).sum()) <= round(150 * rates[0])
    assert torch.equal(lape_selection(p.float(), *rates), selected)  # the same in float32


def test_lape_refuses_bad_input():
    p = torch.rand(3, 2, 5)
    with pytest.raises(XlsubError, match="^top_rate: must be"):
        lape_selection(p, top_rate=0.0)
    with pytest.raises(XlsubError, match="^activation_bar: must be"):
        lape_selection(p, activation_bar=1.5)
    with pytest.raises(XlsubError, match="^probabilities:"):
        lape_selection(p[0])
    with pytest.raises(XlsubError, match="^probabilities:"):
        lape_selection(p * 3)


# -- gates and the stock form ------------------------------------------------------------------------------

def test_gating_equals_zeroing_the_down_projection_inputs(family, tmp_path):
    preset, model, batch = family
    layers, neurons = neuron_mask_shape(model)
    assert neurons == (128 if preset == "tiny-bloom" else 64)
    mask = (torch.rand(layers, neurons, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    with NeuronGates(model, mask):
        gated = logits_of(model, batch)
    assert not torch.allclose(gated, logits_of(model, batch), atol=1e-4)  # the mask does something

    by_hand = copy.deepcopy(model)
    params = dict(by_hand.named_parameters())
    with torch.no_grad():
        for layer in range(layers):
            _, down, transposed = ffn_names(preset, layer)
            off = mask[layer] == 0
            if transposed:
                params[down][off, :] = 0
            else:
                params[down][:, off] = 0
    expected = logits_of(by_hand, batch)
    torch.testing.assert_close(gated, expected, atol=1e-5, rtol=1e-5)

    stock = zero_neurons(model, mask)
    torch.testing.assert_close(logits_of(stock, batch), expected, atol=1e-5, rtol=1e-5)
    stock.save_pretrained(tmp_path)  # loads with transformers alone
    auto = transformers.AutoModelForCausalLM if adapter_for(model).objective == CAUSAL else transformers.AutoModelForMaskedLM
    torch.testing.assert_close(logits_of(auto.from_pretrained(tmp_path).eval(), batch), expected, atol=1e-5, rtol=1e-5)


def test_zeroing_in_place_equals_the_copy_and_changes_the_model_itself(tokenizer):
    model = build("tiny-roberta", tokenizer)
    mask = (torch.rand(neuron_mask_shape(model), generator=torch.Generator().manual_seed(3)) > 0.3).float()
    batch = {"input_ids": torch.tensor([[0, 11, 12, 13, 2]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    copied = logits_of(zero_neurons(model, mask), batch)
    before = logits_of(model, batch)
    assert zero_neurons(model, mask, copy=False) is model
    torch.testing.assert_close(logits_of(model, batch), copied, atol=0, rtol=0)
    assert float((before - copied).abs().max()) > 1e-4


def test_gates_refuse_a_mask_of_the_wrong_shape(tokenizer):
    model = build("tiny-gpt2", tokenizer)
    with pytest.raises(XlsubError, match=r"needs \[layers, neurons\] = \[2, 64\]"):
        NeuronGates(model, torch.ones(2, 32))
    with pytest.raises(XlsubError, match="entries must be 0 or 1"):
        zero_neurons(model, torch.full((2, 64), 0.5))


# -- importance -----------------------------------------------------------------------------------------

def test_importance_equals_finite_differences(tokenizer):
    model = build("tiny-gpt2", tokenizer, torch.float64)  # float64 throughout (Llama's RMSNorm stays float32)
    batch = dict(tokenizer(TEXTS[:4], padding=True, return_tensors="pt"))
    layers, neurons = neuron_mask_shape(model)
    mask = torch.ones(layers, neurons)
    mask[0, :8] = 0  # switched off: the gradient at gate 0
    raw = neuron_importance(model, [batch], mask, normalize_layers=False, normalize_global=False).importance.double()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)[:, 1:]
    n = int((labels != IGNORE_INDEX).sum())

    def summed_nll(gates):  # the stock forward's logits, cross-entropy in float64
        with NeuronGates(model, gates):
            logits = model(**batch).logits[:, :-1]
        return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum"))

    eps = 1e-5
    checked = [0, 5, 9, 30, 47, 63]  # in layer 0, 0 and 5 are switched off
    expected = torch.zeros(layers, len(checked), dtype=torch.float64)
    with torch.no_grad():
        for layer in range(layers):
            for i, neuron in enumerate(checked):
                up, down = mask.double().clone(), mask.double().clone()
                up[layer, neuron] += eps
                down[layer, neuron] -= eps
                expected[layer, i] = abs(summed_nll(up) - summed_nll(down)) / (2 * eps) / n
    assert float(expected.min()) > 1e-6
    torch.testing.assert_close(raw[:, checked], expected, rtol=1e-4, atol=1e-9)  # measured: 6e-11 at most


def test_importance_in_one_pass_gives_the_loss_and_leaves_the_weights(family):
    _, model, batch = family
    mask = torch.ones(neuron_mask_shape(model))
    mask[1, ::3] = 0
    result = neuron_importance(model, [batch], mask)
    with NeuronGates(model, mask), torch.no_grad():
        loss, n = lm_loss(model, batch)
    assert result.token_count == n
    assert result.loss_sum == pytest.approx(float(loss), rel=1e-6)
    assert result.importance.shape == mask.shape and float(result.importance.max()) == pytest.approx(1.0)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


# -- random controls -------------------------------------------------------------------------------------

def test_random_mask_keeps_each_layers_count():
    mask = torch.ones(3, 40)
    mask[0, :5] = 0
    mask[2, 10:30] = 0
    draws = [random_neuron_mask_like(mask, seed) for seed in range(20)]
    for draw in draws:
        assert torch.equal(draw.sum(1), mask.sum(1))
        assert set(draw.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(random_neuron_mask_like(mask, 3), draws[3])
    assert len({tuple(d.flatten().tolist()) for d in draws}) == 20
    # every neuron of layer 0 is switched off in some draw: the draw covers the layer, not a fixed block
    assert bool((torch.stack(draws)[:, 0] == 0).any(0).sum() > 30)
