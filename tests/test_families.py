"""Every model family through the adapter (`xlsub.models.families`), on its tiny random-init preset.

The expected numbers come from outside the adapter: the output projection's weight slices are zeroed
by parameter name (`OUTPUT_PROJECTION` below, written from the transformers sources), losses from the
stock `*ForCausalLM`/`*ForMaskedLM` forward, importance from finite differences.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
import transformers

from xlsub.data.lm import mlm_collator
from xlsub.errors import XlsubError
from xlsub.models.encoding import encode
from xlsub.models.families import CAUSAL, REGISTRY, adapter_for
from xlsub.models.heads import HeadGates, head_importance, mask_shape, num_heads
from xlsub.models.loading import FAMILY_PRESETS, scratch_model, train_tokenizer
from xlsub.models.mlm import IGNORE_INDEX, chunk_losses, lm_loss, perplexity
from xlsub.models.pruning import load_pruned, prune_heads, save_pruned, zero_pruned_heads

ROOT = Path(__file__).resolve().parents[1]
MAX_SEQ_LEN = 64

# preset -> (the output projection's weight in layer {l}, whether it is stored [in, out] (Conv1D)),
# read off each family's modeling file, independent of the adapter
OUTPUT_PROJECTION = {
    "tiny": ("roberta.encoder.layer.{l}.attention.output.dense.weight", False),
    "tiny-roberta": ("roberta.encoder.layer.{l}.attention.output.dense.weight", False),
    "tiny-bert": ("bert.encoder.layer.{l}.attention.output.dense.weight", False),
    "tiny-distilbert": ("distilbert.transformer.layer.{l}.attention.out_lin.weight", False),
    "tiny-modernbert": ("model.layers.{l}.attn.Wo.weight", False),
    "tiny-llama": ("model.layers.{l}.self_attn.o_proj.weight", False),
    "tiny-mistral": ("model.layers.{l}.self_attn.o_proj.weight", False),
    "tiny-qwen2": ("model.layers.{l}.self_attn.o_proj.weight", False),
    "tiny-qwen3": ("model.layers.{l}.self_attn.o_proj.weight", False),
    "tiny-gemma": ("model.layers.{l}.self_attn.o_proj.weight", False),
    "tiny-gpt2": ("transformer.h.{l}.attn.c_proj.weight", True),
    "tiny-bloom": ("transformer.h.{l}.self_attention.dense.weight", False),
}
PRESETS = [p for p in OUTPUT_PROJECTION if p != "tiny"]
PHYSICAL = {"tiny", "tiny-roberta", "tiny-bert", "tiny-distilbert", "tiny-modernbert", "tiny-gpt2"}
# Layer 0 loses head 0 only: with 2 key/value heads, query heads 0 and 1 share key/value head 0, so
# the group is pruned unevenly. Layer 1 loses three heads, one from one group and both of the other.
MASK = torch.tensor([[0.0, 1, 1, 1], [1, 0, 0, 0]])

TEXTS = [
    "The quick brown fox jumps over the lazy dog.", "Der schnelle braune Fuchs springt über den faulen Hund.",
    "El rápido zorro marrón salta sobre el perro perezoso.", "Быстрая коричневая лиса прыгает через ленивую собаку.",
    "敏捷的棕色狐狸跳过了懒狗。", "Open the file", "Datei öffnen", "Abrir el archivo", "Открыть файл",
    "打开文件", "Save the page as a bookmark", "Seite als Lesezeichen speichern",
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([TEXTS * 20], vocab_size=300)


def build(preset: str, tokenizer, dtype=torch.float32):
    transformers.set_seed(0)
    return scratch_model(preset, tokenizer, MAX_SEQ_LEN).to(dtype).eval()


@pytest.fixture(scope="module", params=PRESETS)
def family(request, tokenizer):
    """(preset, model, one padded batch with labels for the model's objective): one per family."""
    preset = request.param
    model = build(preset, tokenizer)
    encoded = tokenizer(TEXTS[:6], padding=True, return_tensors="pt")
    batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    if adapter_for(model).objective == CAUSAL:
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    else:
        batch = dict(mlm_collator(tokenizer, seed=0)([{"input_ids": ids} for ids in tokenizer(TEXTS[:6])["input_ids"]]))
    return preset, model, batch


def logits_of(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def zeroed_by_hand(preset, model, mask):
    """A copy of `model` with each switched-off head's slice of the output projection set to 0, found by
    parameter name: columns of a Linear weight [out, heads * head_dim], rows of a Conv1D weight."""
    name, transposed = OUTPUT_PROJECTION[preset]
    copy_ = copy.deepcopy(model)
    params = dict(copy_.named_parameters())
    with torch.no_grad():
        for layer, gates in enumerate(mask):
            weight = params[name.format(l=layer)]
            width = weight.shape[0] if transposed else weight.shape[1]
            head_dim = width // len(gates)
            for head in (gates == 0).nonzero()[:, 0].tolist():
                cut = slice(head * head_dim, (head + 1) * head_dim)
                if transposed:
                    weight[cut, :] = 0
                else:
                    weight[:, cut] = 0
    return copy_


# -- step 1: the registry ---------------------------------------------------------------------

def test_every_registered_family_has_a_preset_a_test_and_a_docs_row(tokenizer):
    covered = {build(preset, tokenizer).config.model_type: preset for preset in OUTPUT_PROJECTION}
    docs = (ROOT / "docs" / "families.md").read_text()
    for model_type in REGISTRY:
        assert model_type in covered, f"model type {model_type} has no tiny preset in this test"
        assert f"`{covered[model_type]}`" in docs, f"{covered[model_type]} has no row in docs/families.md"
    assert set(PRESETS) == set(FAMILY_PRESETS)


def test_unknown_model_type_is_refused_with_the_supported_ones():
    with pytest.raises(XlsubError, match=r"^model: .*'t5'.*llama"):
        adapter_for(transformers.T5Config())


def test_head_layout_comes_from_the_config(tokenizer):
    gemma = build("tiny-gemma", tokenizer)
    layout = adapter_for(gemma).head_layout(gemma.config)
    assert (layout.heads, layout.kv_heads, layout.head_dim) == (4, 2, 16)  # 16 != 32 / 4
    assert gemma.model.layers[0].self_attn.o_proj.in_features == 4 * 16
    assert [layout.kv_head_of(h) for h in range(4)] == [0, 0, 1, 1]


# -- step 3: head gates ---------------------------------------------------------------------------

def test_gating_equals_zeroing_the_heads_slice(family):
    preset, model, batch = family
    assert mask_shape(model) == (2, 4)
    with HeadGates(model, MASK):
        gated = logits_of(model, batch)
    expected = logits_of(zeroed_by_hand(preset, model, MASK), batch)
    assert not torch.allclose(gated, logits_of(model, batch), atol=1e-4)  # the mask does something
    torch.testing.assert_close(gated, expected, atol=1e-5, rtol=1e-5)
    # the library's stock form is the same model
    torch.testing.assert_close(logits_of(zero_pruned_heads(model, MASK), batch), expected, atol=1e-5, rtol=1e-5)


def test_importance_in_one_pass_gives_the_loss(family):
    _, model, batch = family
    result = head_importance(model, [batch], MASK)
    with HeadGates(model, MASK), torch.no_grad():
        loss, n = lm_loss(model, batch)
    assert result.token_count == n
    assert result.loss_sum == pytest.approx(float(loss), rel=1e-6)
    assert result.importance.shape == (2, 4) and float(result.importance.max()) == pytest.approx(1.0)


def test_llama_importance_equals_finite_differences(tokenizer):
    model = build("tiny-llama", tokenizer, torch.float64)
    encoded = tokenizer(TEXTS[:4], padding=True, return_tensors="pt")
    batch = dict(encoded)
    raw = head_importance(model, [batch], MASK, normalize_layers=False, normalize_global=False).importance.double()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)[:, 1:]
    n = int((labels != IGNORE_INDEX).sum())

    def summed_nll(gates):  # the stock forward's logits, cross-entropy in float64
        with HeadGates(model, gates):
            logits = model(**batch).logits[:, :-1]
        return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum"))

    eps = 1e-3  # RMSNorm computes in float32 even in a float64 model: a smaller step drowns in rounding
    expected = torch.zeros(2, 4, dtype=torch.float64)
    with torch.no_grad():
        for layer in range(2):
            for head in range(4):
                up, down = MASK.double().clone(), MASK.double().clone()
                up[layer, head] += eps
                down[layer, head] -= eps
                expected[layer, head] = abs(summed_nll(up) - summed_nll(down)) / (2 * eps) / n
    assert float(expected.min()) > 0
    # the loss rounds at float32 precision (RMSNorm), so the differences leave ~1e-7 per token (measured 4e-7)
    torch.testing.assert_close(raw, expected, rtol=1e-3, atol=1e-6)


# -- step 4: the causal-LM loss ---------------------------------------------------------------------

def test_loss_equals_the_stock_models_own(family):
    """The scored-only loss is the stock forward's mean loss times the count, whole batch and per chunk."""
    _, model, batch = family
    with torch.no_grad():
        loss, n = lm_loss(model, batch)
        stock = model(**batch).loss
        assert float(loss) / n == pytest.approx(float(stock), rel=1e-5)
        losses = chunk_losses(model, [batch])
        for row in range(len(batch["input_ids"])):
            one = {k: v[row:row + 1] for k, v in batch.items()}
            row_loss = model(**one).loss
            scored = int((one["labels"][:, 1:] if adapter_for(model).objective == CAUSAL else one["labels"]).ne(IGNORE_INDEX).sum())
            assert int(losses.tokens[row]) == scored
            assert float(losses.nll[row]) == pytest.approx(float(row_loss) * scored, rel=1e-5)
    assert losses.perplexity == pytest.approx(perplexity(model, [batch]), rel=1e-6)  # float32 vs float64 sums


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_causal_loss_needs_no_labels_and_keeps_an_eos_that_is_the_pad(tokenizer, preset):
    """Without labels, every real next token is scored (padding from the attention mask, not the pad id):
    with pad = EOS the EOS is still scored, where a stock collator (labels[input_ids == pad] = -100)
    would drop it."""
    model = build(preset, tokenizer)
    encoded = tokenizer(TEXTS[:3], padding=True, return_tensors="pt")
    batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    with torch.no_grad():
        loss, n = lm_loss(model, batch)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        assert float(loss) / n == pytest.approx(float(model(**batch, labels=labels).loss), rel=1e-5)
    assert n == int(batch["attention_mask"][:, 1:].sum())
    # the same text with EOS as pad id: padding still excluded by the mask, EOS still counted
    as_pad = dict(batch, input_ids=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, tokenizer.eos_token_id))
    with torch.no_grad():
        loss_eos_pad, n_eos_pad = lm_loss(model, as_pad)
    assert n_eos_pad == n and float(loss_eos_pad) == pytest.approx(float(loss), rel=1e-6)


# -- step 5: the stock form and physical pruning ------------------------------------------------------

def test_stock_form_loads_without_xlsub_and_equals_the_gated_model(family, tmp_path):
    _, model, batch = family
    zero_pruned_heads(model, MASK).save_pretrained(tmp_path)
    auto = transformers.AutoModelForCausalLM if adapter_for(model).objective == CAUSAL else transformers.AutoModelForMaskedLM
    loaded = auto.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    with HeadGates(model, MASK):
        gated = logits_of(model, batch)
    torch.testing.assert_close(logits_of(loaded, batch), gated, atol=1e-5, rtol=1e-5)


def test_physical_pruning_where_the_architecture_allows(family, tmp_path):
    preset, model, batch = family
    pruned = copy.deepcopy(model)
    if preset not in PHYSICAL:
        with pytest.raises(XlsubError, match="cannot be removed physically"):
            prune_heads(pruned, MASK)
        return
    with HeadGates(model, MASK):
        gated = logits_of(model, batch)
    prune_heads(pruned, MASK)
    assert num_heads(pruned) == [3, 1]
    torch.testing.assert_close(logits_of(pruned, batch), gated, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    save_pruned(pruned, tmp_path)
    torch.testing.assert_close(logits_of(load_pruned(tmp_path), batch), gated, atol=1e-5, rtol=1e-5)
    # a layer with no head left adds only the output projection's bias
    empty = torch.tensor([[0.0, 0, 0, 0], [1, 1, 1, 1]])
    with HeadGates(model, empty):
        gated_empty = logits_of(model, batch)
    torch.testing.assert_close(logits_of(prune_heads(copy.deepcopy(model), empty), batch), gated_empty,
                               atol=1e-5, rtol=1e-5)


# -- step 6: pooling ---------------------------------------------------------------------------------

def test_decoder_pooling_leaves_out_bos_and_eos_and_last_is_the_last_token(tokenizer):
    model = build("tiny-llama", tokenizer)
    sentences = TEXTS[:5]
    pooled = encode(model, tokenizer, sentences, batch_size=2, pooling="mean")
    last = encode(model, tokenizer, sentences, batch_size=2, pooling="last")
    for i, sentence in enumerate(sentences):
        ids = tokenizer(sentence, return_tensors="pt")["input_ids"]
        assert int(ids[0, 0]) == tokenizer.bos_token_id and int(ids[0, -1]) == tokenizer.eos_token_id
        with torch.no_grad():
            states = torch.stack(model.model(input_ids=ids, output_hidden_states=True).hidden_states)[:, 0]
        torch.testing.assert_close(pooled[:, i], states[:, 1:-1].mean(1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(last[:, i], states[:, -1], atol=1e-5, rtol=1e-5)


def test_encoder_mean_pooling_still_includes_special_tokens(tokenizer):
    model = build("tiny-roberta", tokenizer)
    ids = tokenizer(TEXTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        states = torch.stack(model.roberta(input_ids=ids, output_hidden_states=True).hidden_states)[:, 0]
    torch.testing.assert_close(encode(model, tokenizer, TEXTS[:1], batch_size=1, pooling="mean")[:, 0],
                               states.mean(1), atol=1e-5, rtol=1e-5)


def test_docs_table_lists_every_preset():
    rows = re.findall(r"^\| `(tiny[-\w]*)` ", (ROOT / "docs" / "families.md").read_text(), flags=re.M)
    assert set(PRESETS) <= set(rows)


# -- training a causal LM ---------------------------------------------------------------------------

def test_causal_collator_scores_every_real_token_even_an_eos_pad(tokenizer):
    from xlsub.models.training import CausalCollator, lm_collator

    llama = build("tiny-llama", tokenizer)
    assert isinstance(lm_collator(llama, tokenizer, 0), CausalCollator)
    assert not isinstance(lm_collator(build("tiny-bert", tokenizer), tokenizer, 0), CausalCollator)
    chunks = tokenizer(TEXTS[:3])["input_ids"]
    batch = CausalCollator(tokenizer)([{"input_ids": ids} for ids in chunks])
    for row, ids in enumerate(chunks):
        assert batch["labels"][row, :len(ids)].tolist() == ids
        assert (batch["labels"][row, len(ids):] == IGNORE_INDEX).all()
    eos_pad = copy.deepcopy(tokenizer)
    eos_pad.pad_token = eos_pad.eos_token
    batch = CausalCollator(eos_pad)([{"input_ids": ids} for ids in chunks])
    assert int((batch["labels"] == tokenizer.eos_token_id).sum()) == len(chunks)  # each chunk's EOS is scored


def test_trainer_learns_the_next_token_objective(tokenizer, tmp_path):
    """A few Trainer steps on the causal path (CausalCollator + the scored-only loss) lower perplexity,
    and the model stays a stock *ForCausalLM afterwards."""
    import datasets

    from xlsub.models.training import TrainSettings, train_masked_lm

    model = build("tiny-llama", tokenizer).train()
    encoded = tokenizer(TEXTS, padding=True, return_tensors="pt")
    batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    before = perplexity(model, [batch])
    settings = TrainSettings(epochs=4, batch_size=12, lr=3e-3, weight_decay=0.0, seed=0, device="cpu", fp16=False,
                             bf16=False, log_every=100, save_steps=1000)
    train_masked_lm(model, tokenizer, datasets.Dataset.from_dict({"input_ids": tokenizer(TEXTS)["input_ids"] * 3}),
                    settings, tmp_path)
    assert perplexity(model, [batch]) < 0.7 * before
    assert "forward" not in vars(model)


def test_saved_decoder_loads_as_its_lm_class(tokenizer, tmp_path):
    from xlsub.models.loading import load_lm, load_pretrained, max_text_len

    model = build("tiny-qwen2", tokenizer)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert type(load_lm(tmp_path)) is transformers.Qwen2ForCausalLM
    assert type(load_pretrained(str(tmp_path))[0]) is transformers.Qwen2ForCausalLM
    assert max_text_len(model) == MAX_SEQ_LEN
    assert max_text_len(build("tiny-roberta", tokenizer)) == MAX_SEQ_LEN
    assert max_text_len(build("tiny-bloom", tokenizer)) > 10**9  # ALiBi: no position limit in its config


def test_gemma_final_logit_soft_cap_is_part_of_the_lm_head(tokenizer):
    from xlsub.models.loading import preset_config
    from xlsub.models.mlm import lm_head_of

    config = preset_config("tiny-gemma", tokenizer, MAX_SEQ_LEN)
    config.final_logit_softcapping = 0.05  # below the raw logits' range, so the cap changes them
    transformers.set_seed(0)
    model = transformers.Gemma3ForCausalLM(config).eval()
    encoded = tokenizer(TEXTS[:4], padding=True, return_tensors="pt")
    batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    with torch.no_grad():
        hidden = model.model(**batch).last_hidden_state
        assert float(model.lm_head(hidden).abs().max()) > 0.1
        torch.testing.assert_close(lm_head_of(model)(hidden), model(**batch).logits, atol=1e-6, rtol=1e-5)
        loss, n = lm_loss(model, batch)
        assert float(loss) / n == pytest.approx(float(model(**batch, labels=labels).loss), rel=1e-5)


def test_eval_batches_follow_the_objective(tokenizer):
    from xlsub.data.lm import masked_batches
    from xlsub.models.mlm import lm_batches

    chunks = tokenizer(TEXTS)["input_ids"]
    llama, bert = build("tiny-llama", tokenizer), build("tiny-bert", tokenizer)
    causal = lm_batches(llama, chunks, tokenizer, 5)
    assert [len(b["input_ids"]) for b in causal] == [5, 5, 2]
    assert sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in causal) == sum(len(c) for c in chunks)
    for got, expected in zip(lm_batches(bert, chunks, tokenizer, 5, seed=3), masked_batches(chunks, tokenizer, 5, seed=3)):
        assert torch.equal(got["labels"], expected["labels"]) and torch.equal(got["input_ids"], expected["input_ids"])


# the FFN's intermediate width, from each config class's own field
FFN_WIDTH = {"tiny-distilbert": 64, "tiny-gpt2": 64, "tiny-bloom": 4 * 32}


def test_ffn_activation_is_each_layers_intermediate_activation(family):
    preset, model, batch = family
    family_ = adapter_for(model)
    seen = []
    handles = [family_.ffn_activation(layer).register_forward_hook(lambda m, a, out, l=l: seen.append((l, out.shape)))
               for l, layer in enumerate(family_.layers(model))]
    try:
        logits_of(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    width = FFN_WIDTH.get(preset, 64)
    assert [(l, shape[-1]) for l, shape in seen] == [(0, width), (1, width)]


def test_saved_subnetwork_and_its_random_control_in_the_familys_form(family, tmp_path):
    """`subnetwork_model` is what prune saves: physically pruned or the stock form, kept heads recorded
    either way; `load_subnetwork` rebuilds it (equal to the gated model) and `random_like` gives a fresh
    model with the same heads removed."""
    from xlsub.models.encoding import random_like
    from xlsub.models.pruning import kept_heads_mask, load_subnetwork, subnetwork_model

    preset, model, batch = family
    saved = subnetwork_model(model, MASK)
    assert num_heads(saved) == ([3, 1] if preset in PHYSICAL else [4, 4])
    save_pruned(saved, tmp_path)
    loaded = load_pruned(tmp_path)
    assert torch.equal(kept_heads_mask(loaded.config), MASK)
    with HeadGates(model, MASK):
        gated = logits_of(model, batch)
    torch.testing.assert_close(logits_of(loaded, batch), gated, atol=1e-5, rtol=1e-5)
    control = random_like(loaded, seed=1)
    assert torch.equal(kept_heads_mask(control.config), MASK) and num_heads(control) == num_heads(saved)
    name, _ = OUTPUT_PROJECTION[preset]
    if preset not in PHYSICAL:  # the stock-form control has the pruned heads' slices zeroed
        weight = dict(control.named_parameters())[name.format(l=1)].detach()
        assert float(weight.view(weight.shape[0], 4, -1)[:, 1:].abs().sum()) == 0
        assert float(weight.view(weight.shape[0], 4, -1)[:, 0].abs().sum()) > 0
    with pytest.raises(XlsubError, match="keeps other heads"):
        load_subnetwork(tmp_path, torch.ones(2, 4))


# -- the share of attention parameters a head mask keeps ----------------------------------------------

# each preset's attention block in layer {l}, by parameter name (read off the modeling files, not the adapter)
ATTENTION_BLOCK = {
    "tiny-roberta": "roberta.encoder.layer.{l}.attention.",
    "tiny-bert": "bert.encoder.layer.{l}.attention.",
    "tiny-distilbert": "distilbert.transformer.layer.{l}.attention.",
    "tiny-modernbert": "model.layers.{l}.attn.",
    "tiny-llama": "model.layers.{l}.self_attn.",
    "tiny-mistral": "model.layers.{l}.self_attn.",
    "tiny-qwen2": "model.layers.{l}.self_attn.",
    "tiny-qwen3": "model.layers.{l}.self_attn.",
    "tiny-gemma": "model.layers.{l}.self_attn.",
    "tiny-gpt2": "transformer.h.{l}.attn.",
    "tiny-bloom": "transformer.h.{l}.self_attention.",
}
# By hand from the presets: hidden size D = 32, 4 query heads of size h = 8 (Gemma 3: 16), 2 key/value
# heads under grouped-query attention. (per_query_head, per_kv_head, shared, heads, kv_heads)
D, h = 32, 8
EXPECTED_ATTENTION_PARAMS = {
    # q, k, v rows with biases and output columns per head; output bias and the attention LayerNorm shared
    "tiny-roberta": (4 * D * h + 3 * h, 0, 3 * D, 4, 4),
    "tiny-bert": (4 * D * h + 3 * h, 0, 3 * D, 4, 4),
    "tiny-distilbert": (4 * D * h + 3 * h, 0, D, 4, 4),  # its LayerNorm sits outside the attention block
    "tiny-modernbert": (4 * D * h, 0, 0, 4, 4),  # fused Wqkv, no biases
    "tiny-llama": (2 * D * h, 2 * D * h, 0, 4, 2),  # q rows and o columns; k and v rows; no biases
    "tiny-mistral": (2 * D * h, 2 * D * h, 0, 4, 2),
    "tiny-qwen2": (2 * D * h + h, 2 * (D * h + h), 0, 4, 2),  # q, k, v biases, none on o_proj
    "tiny-qwen3": (2 * D * h, 2 * D * h, 2 * h, 4, 2),  # q_norm and k_norm over one head's h, shared by all
    "tiny-gemma": (2 * D * 16, 2 * D * 16, 2 * 16, 4, 2),
    "tiny-gpt2": (4 * D * h + 3 * h, 0, D, 4, 4),  # fused c_attn with biases; c_proj's bias shared
    "tiny-bloom": (4 * D * h + 3 * h, 0, D, 4, 4),  # fused query_key_value with biases; dense's bias shared
}


def attention_numel(preset: str, model) -> int:
    """Parameters of every layer's attention block, summed by parameter name."""
    blocks = tuple(ATTENTION_BLOCK[preset].format(l=l) for l in range(model.config.num_hidden_layers))
    return sum(p.numel() for name, p in model.named_parameters() if name.startswith(blocks))


def test_attention_params_split_the_attention_block_by_head(family):
    preset, model, _ = family
    assert set(EXPECTED_ATTENTION_PARAMS) == set(PRESETS)
    params = adapter_for(model).attention_params(model.config)
    assert (params.per_query_head, params.per_kv_head, params.shared, params.heads, params.kv_heads) == EXPECTED_ATTENTION_PARAMS[preset]
    assert params.total * model.config.num_hidden_layers == attention_numel(preset, model)


@pytest.mark.parametrize("preset", sorted(PHYSICAL - {"tiny"}))
def test_params_kept_frac_is_the_share_physical_pruning_leaves(tokenizer, preset):
    from xlsub.stats.overlap import params_kept_frac

    model = build(preset, tokenizer)
    params = adapter_for(model).attention_params(model.config)
    for mask in (MASK, torch.tensor([[0.0, 0, 0, 0], [1, 1, 1, 1]])):
        pruned = prune_heads(copy.deepcopy(model), mask)
        assert attention_numel(preset, pruned) < attention_numel(preset, model)
        assert params_kept_frac(mask, params) == pytest.approx(attention_numel(preset, pruned) / attention_numel(preset, model),
                                                               rel=1e-12)


def test_params_kept_under_grouped_query_attention_keeps_a_group_while_one_head_reads_it(tokenizer):
    from xlsub.stats.overlap import params_kept_frac, params_kept_per_layer

    model = build("tiny-llama", tokenizer)
    block = {name: p.numel() for name, p in model.named_parameters() if name.startswith("model.layers.0.self_attn.")}
    q, k, v, o = (block[f"model.layers.0.self_attn.{x}_proj.weight"] for x in "qkvo")
    assert len(block) == 4  # no biases, no norms
    per_query, per_kv = (q + o) // 4, (k + v) // 2  # 4 query heads; 2 key/value heads, each read by 2 of them
    total = 4 * per_query + 2 * per_kv
    mask = torch.tensor([[0.0, 0, 1, 0],  # group (0, 1) off, group (2, 3) half off: 1 query head, 1 key/value head
                         [1, 0, 0, 1]])  # both groups half off: 2 query heads, 2 key/value heads
    expected = [(per_query + per_kv) / total, (2 * per_query + 2 * per_kv) / total]
    params = adapter_for(model).attention_params(model.config)
    assert params_kept_per_layer({"en": mask}, params).loc["en"].tolist() == pytest.approx(expected)
    assert params_kept_frac(mask, params) == pytest.approx((expected[0] + expected[1]) / 2)
    assert expected == pytest.approx([1 / 3, 2 / 3])  # against 1/4 and 1/2 of the query heads
