"""Per-chunk losses and the paired bootstrap over test chunks, against direct computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import XLMRobertaConfig, XLMRobertaForMaskedLM

from xlsub.models.mlm import ChunkLosses, chunk_losses, perplexity
from xlsub.stats.inference import bootstrap_indices, percentile_interval
from xlsub.stats.intervals import (
    chunk_counts,
    random_control_replicates,
    relative_perplexity_replicates,
    relative_replicates,
    specificity_gap,
)


def tiny_model():
    torch.manual_seed(0)
    config = XLMRobertaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                              max_position_embeddings=20)
    return XLMRobertaForMaskedLM(config).eval()


def batches(n=7, length=9, batch_size=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, batch_size):
        rows = min(batch_size, n - start)
        ids = torch.randint(3, 40, (rows, length), generator=g)
        labels = torch.where(torch.rand(rows, length, generator=g) < 0.3, ids, torch.full_like(ids, -100))
        labels[:, 1] = ids[:, 1]  # every chunk scores at least one token
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def test_chunk_losses_are_each_rows_stock_cross_entropy_and_sum_to_the_perplexity():
    model, data = tiny_model(), batches()
    losses = chunk_losses(model, data)
    expected_nll, expected_tokens = [], []
    with torch.no_grad():
        for batch in data:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            for row in range(len(batch["labels"])):
                scored = batch["labels"][row] != -100
                expected_nll.append(float(torch.nn.functional.cross_entropy(logits[row][scored], batch["labels"][row][scored], reduction="sum")))
                expected_tokens.append(int(scored.sum()))
    assert losses.nll.tolist() == pytest.approx(expected_nll, rel=1e-5)
    assert losses.tokens.tolist() == expected_tokens
    assert losses.perplexity == pytest.approx(perplexity(model, data), rel=1e-6)


def losses(seed, n=30, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(5, 15, (n,), generator=g)
    return ChunkLosses(scale * tokens.double() * (2 + torch.rand(n, generator=g, dtype=torch.float64)), tokens)


def test_paired_relative_replicates_match_a_loop_over_resamples():
    sub, full = losses(1, scale=1.3), losses(1)
    full = ChunkLosses(full.nll + torch.linspace(0, 3, 30, dtype=torch.float64), full.tokens)  # same chunks, another model
    idx = bootstrap_indices(30, 50, seed=4)
    counts = chunk_counts(idx, 30)
    got = relative_perplexity_replicates(sub, full, counts)
    for b in range(50):
        rows = idx[b].tolist()
        ppl_sub = math.exp(sum(sub.nll[i] for i in rows) / sum(sub.tokens[i] for i in rows))
        ppl_full = math.exp(sum(full.nll[i] for i in rows) / sum(full.tokens[i] for i in rows))
        assert float(got[b]) == pytest.approx(ppl_sub / ppl_full, rel=1e-12)
    # the resample as chunk counts (shared by every model on the language)
    assert counts.sum(1).tolist() == [30.0] * 50 and counts[7, idx[7, 0]] == int((idx[7] == idx[7, 0]).sum())


def test_random_control_replicates_resample_draws_and_chunks_together():
    draws = [losses(s) for s in (5, 6, 7)]
    idx = bootstrap_indices(30, 40, seed=2)
    got = random_control_replicates(draws, chunk_counts(idx, 30), seed=9)
    picks = torch.randint(0, 3, (40, 3), generator=torch.Generator().manual_seed(10))  # the draws' generator: seed + 1
    for b in range(40):
        rows = idx[b].tolist()
        ppls = [math.exp(sum(draws[d].nll[i] for i in rows) / sum(draws[d].tokens[i] for i in rows)) for d in picks[b].tolist()]
        assert float(got[b]) == pytest.approx(sum(ppls) / 3, rel=1e-12)


def test_percentile_interval_is_numpys_linear_quantile():
    values = torch.randn(997, generator=torch.Generator().manual_seed(0))
    lo, hi = percentile_interval(values)
    assert (lo, hi) == pytest.approx(tuple(np.quantile(values.numpy().astype(np.float64), [0.025, 0.975])), rel=1e-12)


def test_bootstrap_interval_covers_the_true_perplexity_about_95_percent_of_the_time():
    """Chunks drawn iid from a known model: the true perplexity is exp(E[nll] / E[tokens])."""
    g = torch.Generator().manual_seed(123)
    true_log_ppl = math.log(20.0)
    covered, trials = 0, 300
    for t in range(trials):
        tokens = torch.randint(5, 15, (80,), generator=g).double()
        nll = tokens * true_log_ppl + torch.randn(80, generator=g, dtype=torch.float64) * 3.0  # mean nll per token = log 20
        chunks = ChunkLosses(nll, tokens.long())
        replicates = torch.exp(chunks.resampled_log_ppl(chunk_counts(bootstrap_indices(80, 400, seed=t), 80)))
        lo, hi = percentile_interval(replicates)
        covered += lo <= 20.0 <= hi
    assert 0.90 <= covered / trials <= 0.99


def test_relative_replicates_pair_every_cell_of_a_language_with_one_index_set():
    full = {"en": losses(1), "de": losses(2, n=25)}
    cells = {("en-s0", "en"): losses(3), ("en-s0", "de"): losses(4, n=25), ("de-s0", "de"): losses(5, n=25)}
    rand = {("en-s0", "de"): [losses(6, n=25), losses(7, n=25)]}
    sub, control = relative_replicates(cells, rand, full, replicates=20, seed=0)
    idx_de = chunk_counts(bootstrap_indices(25, 20, seed=0), 25)  # languages in sorted order: de first
    expected = relative_perplexity_replicates(cells[("de-s0", "de")], full["de"], idx_de)
    assert torch.allclose(sub[("de-s0", "de")], expected)
    expected_random = random_control_replicates(rand[("en-s0", "de")], idx_de, 0) / torch.exp(full["de"].resampled_log_ppl(idx_de))
    assert torch.allclose(control[("en-s0", "de")], expected_random)


def test_specificity_gap_is_mean_off_diagonal_minus_diagonal():
    relative = {"de-s0": {"de": 1.1, "en": 1.5, "zh": 1.9}, "en-s0": {"de": 1.2, "en": 1.0, "zh": 1.0}}
    gaps = specificity_gap(relative, {"de-s0": "de", "en-s0": "en"})
    assert gaps == pytest.approx({"de-s0": 1.7 - 1.1, "en-s0": 1.1 - 1.0})
