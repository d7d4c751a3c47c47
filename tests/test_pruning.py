"""Iterative pruning, its stop rule, physical pruning and the pruned-model loader."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from tests.reference import iterative_pruning_two_pass
from tests.test_heads import HEADS, HIDDEN, LAYERS, logits, tiny_batches, tiny_model
from xlsub.errors import XlsubError
from xlsub.models.heads import HeadGates, attention_modules, head_importance, num_heads
from xlsub.models.mlm import perplexity
from xlsub.models.pruning import (
    iterative_pruning,
    load_pruned,
    mask_least_important,
    masked_perplexities,
    prune_heads,
    prune_loop,
    random_mask_like,
    save_pruned,
    select_mask,
)

HEAD_DIM = HIDDEN // HEADS


def awkward_mask() -> torch.Tensor:
    """Layer 0 loses every head, layer 1 keeps one, layer 2 loses one."""
    mask = torch.ones(LAYERS, HEADS)
    mask[0] = 0
    mask[1] = torch.tensor([0.0, 0.0, 1.0, 0.0])
    mask[2, 1] = 0
    return mask


# -- stop rule ------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("ppls", "kept"),
    [
        ([10.0, 10.5, 11.0, 11.2, 10.0], 2),  # 11.0 = 1.1 x 10 is still kept; 11.2 stops, later steps ignored
        ([10.0, 12.0], 0),  # the first pruning step already exceeds: keep the full model
        ([10.0, 10.2, 10.9], 2),  # never exceeds: the last step
        ([10.0, 9.0, 8.0, 11.5, 10.5], 2),
    ],
)
def test_select_mask_keeps_the_step_before_the_first_exceedance(ppls, kept):
    assert select_mask(ppls, 10.0, 1.1) == kept


def scripted(ppls: list[float], importance: torch.Tensor):
    """An evaluate() that returns a fixed importance and the next scripted perplexity, recording the masks."""
    seen = []

    def evaluate(mask):
        seen.append(mask.clone())
        return importance, ppls[len(seen) - 1]

    return evaluate, seen


def test_loop_stops_at_the_first_step_past_the_threshold():
    importance = torch.arange(12.0).view(3, 4)  # head (0, 0) least important, then (0, 1), ...
    evaluate, seen = scripted([10.0, 10.4, 10.9, 11.3, 10.0, 10.0], importance)
    result = prune_loop(evaluate, (3, 4), threshold=1.1, amount=0.25, target_sparsity=None, continue_to=0.0,
                         progress=None, progress_desc="test")
    assert len(seen) == 4  # step 3 exceeds 11.0; steps 4 and 5 are never evaluated
    assert [s.ppl for s in result.steps] == [10.0, 10.4, 10.9, 11.3]
    assert result.base_ppl == 10.0
    assert result.kept == 2 and result.ppl == 10.9
    assert torch.equal(result.mask, result.steps[2].mask)
    # 3 heads per step, always the least important heads still on: flat indices 0..5 are off after step 2
    expected = torch.ones(12)
    expected[:6] = 0
    assert torch.equal(result.mask.flatten(), expected)
    assert [s.frac_pruned for s in result.steps] == [0.0, 0.25, 0.5, 0.75]


def test_the_trajectory_goes_on_to_continue_to_and_keeps_the_same_mask():
    importance = torch.arange(12.0).view(3, 4)
    evaluate, seen = scripted([10.0, 10.4, 11.3, 10.0, 10.0, 10.0], importance)
    result = prune_loop(evaluate, (3, 4), threshold=1.1, amount=0.25, target_sparsity=None, progress=None,
                         progress_desc="test", continue_to=0.9)
    # past the threshold at step 2, then on in steps of 3 until round(12 * 0.9) = 11 heads are off: 12
    assert [12 - int(s.mask.sum()) for s in result.steps] == [0, 3, 6, 9, 12]
    assert result.kept == 1 and torch.equal(result.mask, result.steps[1].mask)
    sparse = prune_loop(scripted([10.0] * 9, importance)[0], (3, 4), threshold=1.1, amount=0.25, target_sparsity=0.6,
                         progress=None, progress_desc="test", continue_to=0.75)
    # 7 heads (the target) exactly, then whole steps to 9
    assert [12 - int(s.mask.sum()) for s in sparse.steps] == [0, 3, 6, 7, 10]
    assert int((sparse.mask == 0).sum()) == 7
    with pytest.raises(XlsubError, match="^continue_to: "):
        prune_loop(evaluate, (3, 4), threshold=1.1, amount=0.25, target_sparsity=None, progress=None, progress_desc="t",
                    continue_to=1.5)


def test_loop_ends_when_no_head_remains():
    evaluate, seen = scripted([10.0] * 20, torch.rand(3, 4))
    result = prune_loop(evaluate, (3, 4), threshold=1.1, amount=0.4, target_sparsity=None, continue_to=0.0,
                         progress=None, progress_desc="test")
    # int(12 * 0.4) = 4 heads per step: 12 heads off after 3 steps
    assert [int(s.mask.sum()) for s in result.steps] == [12, 8, 4, 0]
    assert result.mask.sum() == 0


def test_heads_already_off_are_never_picked_again():
    importance = torch.tensor([[0.0, 0.1, 0.5, 0.6], [0.2, 0.3, 0.4, 0.7]])
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    new = mask_least_important(importance, mask, 3)
    assert torch.equal(new, torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]]))
    assert mask_least_important(importance, mask, 100).sum() == 0


def test_target_sparsity_removes_exactly_the_requested_heads():
    model = tiny_model()
    calls = []
    result = iterative_pruning(model, tiny_batches(2), threshold=1.0, amount=0.25, target_sparsity=0.6, continue_to=0.0,
                               progress=calls.append)
    # round(12 * 0.6) = 7 heads: 3, 3, then the 1 still needed, whatever the perplexity does
    assert [12 - int(s.mask.sum()) for s in result.steps] == [0, 3, 6, 7]
    assert int((result.mask == 0).sum()) == 7
    assert torch.equal(result.mask, result.steps[-1].mask)
    assert result.kept == len(result.steps) - 1
    assert calls == result.steps


def test_masked_perplexities_gate_each_language():
    model = tiny_model()
    by_language = {"en": tiny_batches(1, seed=1), "de": tiny_batches(1, seed=2)}
    mask = awkward_mask()
    gated = masked_perplexities(model, mask, by_language)
    full = masked_perplexities(model, None, by_language)
    for lang, batches in by_language.items():
        assert full[lang] == perplexity(model, batches)
        pruned = prune_heads(copy.deepcopy(model), mask)
        assert gated[lang] == pytest.approx(perplexity(pruned, batches), rel=1e-5)
        assert gated[lang] != pytest.approx(full[lang], rel=1e-3)


def test_bad_parameters_are_user_errors():
    model, batches = tiny_model(), tiny_batches(1)
    settings = {"threshold": 1.1, "amount": 0.1, "target_sparsity": None, "continue_to": 0.0}
    for kwargs in ({"threshold": 0.9}, {"amount": 0.0}, {"target_sparsity": 1.0}):
        with pytest.raises(XlsubError):
            iterative_pruning(model, batches, **(settings | kwargs))


def test_one_pass_and_two_pass_pruning_agree():
    model = tiny_model()
    batches = tiny_batches(2)
    settings = {"threshold": 1.05, "amount": 0.2, "target_sparsity": None, "continue_to": 0.0}
    one = iterative_pruning(model, batches, **settings)
    two = iterative_pruning_two_pass(model, batches, **settings)
    assert len(one.steps) == len(two.steps) > 2
    for a, b in zip(one.steps, two.steps):
        assert torch.equal(a.mask, b.mask)
        assert a.ppl == pytest.approx(b.ppl, rel=1e-5)
    assert torch.equal(one.mask, two.mask)
    torch.testing.assert_close(one.importance, two.importance)
    # the recorded perplexity of each step is the model's perplexity under that step's mask
    with HeadGates(model, one.steps[1].mask):
        assert perplexity(model, batches) == pytest.approx(one.steps[1].ppl, rel=1e-5)


# -- random control ---------------------------------------------------------------------------------

def test_random_controls_of_two_languages_are_independent_draws():
    """Draws seeded by (language, seed, draw): their Jaccard matches the exact expectation for independent
    random masks, and a smaller mask is nested in a larger one only as often as chance allows."""
    import math

    from xlsub.artifacts import SubnetworkId
    from xlsub.models.pruning import control_seed
    from xlsub.stats.overlap import expected_random_jaccard, jaccard

    small = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]], dtype=torch.float32)  # 1 and 2 of 8 kept
    large = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]], dtype=torch.float32)  # 4 and 5 of 8
    draws = 2000
    values, nested = [], 0
    for draw in range(draws):
        a = random_mask_like(small, control_seed(SubnetworkId("ru", 0), draw))
        b = random_mask_like(large, control_seed(SubnetworkId("en", 0), draw))
        values.append(jaccard(a, b))
        nested += bool(((a == 1) <= (b == 1)).all())
    mean, sd = float(torch.tensor(values).mean()), float(torch.tensor(values).std())
    assert abs(mean - expected_random_jaccard(small, large)) < 4 * sd / math.sqrt(draws)
    # P(nested) = prod over layers of C(5-ish kept in b, k_a) / C(8, k_a): (4/8) * (C(5,2)/C(8,2))
    p_nested = (4 / 8) * (math.comb(5, 2) / math.comb(8, 2))
    assert abs(nested / draws - p_nested) < 4 * math.sqrt(p_nested * (1 - p_nested) / draws)
    seeds = {control_seed(SubnetworkId(l, s), d) for l in ("en", "de") for s in (0, 1) for d in (0, 1)}
    assert len(seeds) == 8


def test_random_mask_like_keeps_per_layer_counts_and_follows_its_seed():
    mask = awkward_mask()
    masks = [random_mask_like(mask, seed) for seed in range(6)]
    for random in masks:
        assert torch.equal(random.sum(1), mask.sum(1))
        assert set(random.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(random_mask_like(mask, 3), masks[3])
    assert len({tuple(m.flatten().tolist()) for m in masks}) > 1


# -- physical pruning -------------------------------------------------------------------------------

@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["xlmr", "bert"])
def test_pruned_model_matches_gated_model_and_has_the_expected_size(kind, attn):
    model = tiny_model(kind, attn)
    batch = tiny_batches(1)[0]
    mask = awkward_mask()
    with HeadGates(model, mask):
        gated = logits(model, batch)
    full_params = sum(p.numel() for p in model.parameters())

    prune_heads(model, mask)
    assert num_heads(model) == [0, 1, 3]
    assert model.config.xlsub_kept_heads == [[], [2], [0, 2, 3]]
    assert (logits(model, batch) - gated).abs().max() < 1e-5

    removed_heads = int((mask == 0).sum())
    per_head = 3 * (HIDDEN * HEAD_DIM + HEAD_DIM) + HIDDEN * HEAD_DIM
    assert sum(p.numel() for p in model.parameters()) == full_params - removed_heads * per_head


def test_fully_pruned_layer_adds_only_the_output_bias():
    model = tiny_model()
    batch = tiny_batches(1)[0]
    mask = torch.ones(LAYERS, HEADS)
    mask[1] = 0
    prune_heads(model, mask)
    block = attention_modules(model)[1]
    hidden = torch.randn(2, 5, HIDDEN)
    with torch.no_grad():
        out = block(hidden)[0]
        expected = block.output.LayerNorm(hidden + block.output.dense.bias)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    logits(model, batch)  # and the whole model runs


def test_eager_pruned_model_returns_one_attention_map_per_layer():
    model = tiny_model("xlmr", "eager")
    batch = tiny_batches(1)[0]
    prune_heads(model, awkward_mask())
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_attentions=True)
    assert [a.shape[1] for a in out.attentions] == [0, 1, 3]


def test_prune_heads_refuses_bad_masks_and_pruned_models():
    model = tiny_model()
    with pytest.raises(XlsubError, match="shape"):
        prune_heads(model, torch.ones(LAYERS, HEADS + 1))
    prune_heads(model, awkward_mask())
    with pytest.raises(XlsubError, match="already"):
        prune_heads(model, torch.ones(LAYERS, HEADS))


def test_gates_importance_and_pruning_refuse_a_pruned_model():
    model, batches = prune_heads(tiny_model(), awkward_mask()), tiny_batches(1)
    message = r"^model: its heads are already pruned \(heads per layer \[0, 1, 3\]\)"
    with pytest.raises(XlsubError, match=message):
        HeadGates(model, torch.ones(LAYERS, HEADS))
    with pytest.raises(XlsubError, match=message):
        head_importance(model, batches)
    with pytest.raises(XlsubError, match=message):
        iterative_pruning(model, batches, threshold=1.1, amount=0.1, target_sparsity=None, continue_to=0.0)


@pytest.mark.parametrize("kind", ["xlmr", "bert"])
def test_save_and_load_round_trip(tmp_path, kind):
    model = tiny_model(kind)
    batch = tiny_batches(1)[0]
    prune_heads(model, awkward_mask())
    save_pruned(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["xlsub_kept_heads"] == [[], [2], [0, 2, 3]]
    assert not list(tmp_path.glob("*.bin"))  # safetensors only

    loaded = load_pruned(tmp_path)
    assert type(loaded) is type(model)
    assert num_heads(loaded) == [0, 1, 3]
    assert torch.equal(logits(loaded, batch), logits(model, batch))
    eager = load_pruned(tmp_path, attn_implementation="eager")
    assert (logits(eager, batch) - logits(model, batch)).abs().max() < 1e-5


def test_loader_refuses_weights_that_do_not_match_the_recorded_heads(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)  # full weights
    config = json.loads((tmp_path / "config.json").read_text())
    config["xlsub_kept_heads"] = [[], [2], [0, 2, 3]]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(XlsubError, match="do not match"):
        load_pruned(tmp_path)
