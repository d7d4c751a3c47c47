"""Calibration of every verdict's test: on simulated data with no true effect, where everything is drawn
from one distribution for all languages but each language may differ from the others at random (the
between-language variation that a test at the wrong unit ignores), a verdict says "yes" at most at rate
alpha, up to Monte Carlo error (alpha + 3 standard errors over the simulated sets); with a planted effect
it says "yes" in most sets. Each test runs the code path the analyze stage runs for that verdict, on small
synthetic data, with few permutations (their p floor stays below alpha)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from tests.test_uncertainty import language_losses
from xlsub.artifacts import SubnetworkId
from xlsub.report import analysis, tables
from xlsub.report.analysis import AnalysisInputs, AnalysisResult
from xlsub.report.similarity_tables import subnetwork_specificity
from xlsub.report.verdicts import DIFFERENT_HEADS, STABILITY, Inference, pruning_specific

ALPHA = 0.05
LANGS = ["en", "de", "fr", "es", "ru", "zh", "ar", "hi"]


def bound(sets: int) -> float:
    """alpha + 3 binomial standard errors of a rejection rate over `sets` simulated data sets."""
    return ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / sets)


def said_yes(result: AnalysisResult, question: str) -> bool:
    (verdict,) = [v for v in result.verdicts if v.question == question]
    return verdict.answer.startswith("yes")


def head_masks(rng: np.random.Generator, specific: float, seeds: int = 3, layers: int = 3, heads: int = 6,
               kept: int = 3) -> dict[SubnetworkId, torch.Tensor]:
    """Masks keeping the `kept` most important heads per layer; importance = a profile shared by all
    languages + `specific` x the language's own profile + seed noise. specific = 0: every language's masks
    come from one distribution (though each language's masks still differ from the others' at random)."""
    shared = rng.normal(size=(layers, heads))
    masks = {}
    for lang in LANGS[:6]:
        own = rng.normal(size=(layers, heads))
        for seed in range(seeds):
            score = shared + specific * own + rng.normal(size=(layers, heads))
            mask = np.zeros((layers, heads))
            np.put_along_axis(mask, np.argsort(-score, axis=1)[:, :kept], 1.0, axis=1)
            masks[SubnetworkId(lang, seed)] = torch.tensor(mask)
    return masks


@pytest.mark.parametrize("specific", [0.0, 3.0])
def test_the_heads_verdicts_are_calibrated_and_find_a_planted_effect(specific):
    """Different heads and stability. With specific = 0 a language's masks agree with each other no more
    than with other languages' (different heads: H0), though all agree above random masks (stability is
    true: the shared profile), so only different heads is calibrated here; with a strong language profile
    both are found."""
    rng = np.random.default_rng(0)
    sets = 150 if specific == 0 else 20
    yes = {DIFFERENT_HEADS: 0, STABILITY: 0}
    for _ in range(sets):
        masks = head_masks(rng, specific)
        result = AnalysisResult()
        analysis._noise_ceiling(result, AnalysisInputs(languages=LANGS[:6], masks=masks), LANGS[:6], 39, int(rng.integers(1 << 30)))
        for question in yes:
            yes[question] += said_yes(result, question)
    if specific == 0:
        assert yes[DIFFERENT_HEADS] / sets <= bound(sets), yes
    else:
        assert yes[DIFFERENT_HEADS] / sets >= 0.8 and yes[STABILITY] / sets >= 0.8, yes


def test_the_stability_verdict_is_calibrated_on_random_masks():
    """Stability's H0: masks no more alike across seeds than random masks with the same heads per layer
    (here they are random masks, a different number of heads per layer in each language)."""
    rng = np.random.default_rng(1)
    sets, yes = 150, 0
    for _ in range(sets):
        masks = {}
        for lang in LANGS[:6]:
            kept = rng.integers(1, 6, size=3)
            for seed in range(3):
                mask = np.zeros((3, 6))
                for layer, k in enumerate(kept):
                    mask[layer, rng.choice(6, size=k, replace=False)] = 1.0
                masks[SubnetworkId(lang, seed)] = torch.tensor(mask)
        result = AnalysisResult()
        analysis._stability(result, AnalysisInputs(languages=LANGS[:6], masks=masks), LANGS[:6], 39, int(rng.integers(1 << 30)))
        yes += said_yes(result, STABILITY)
    assert yes / sets <= bound(sets), yes


@pytest.mark.parametrize("mean_effect", [0.0, 0.3])
def test_the_specificity_verdict_is_calibrated_over_languages(mean_effect):
    """Each language's specificity excess over its random masks is drawn at random, N(mean_effect, 0.15^2):
    with mean 0 some languages show a clear excess and others a clear deficit, each significant within its
    language (a chunk-level test would call the mean significant), yet over languages there is none."""
    rng = np.random.default_rng(2)
    sets = 120 if mean_effect == 0 else 20
    yes = chunk_level = 0
    for i in range(sets):
        effects = dict(zip(LANGS, rng.normal(mean_effect, 0.15, len(LANGS))))
        losses = language_losses(effects, n_chunks=12, seed=int(rng.integers(1 << 30)))
        out, metrics = tables.perplexity_interval_tables(losses, LANGS, replicates=39, seed=i)
        level = tables.specificity_excess(out["specificity_gap"], 39, i)
        yes += level.p < ALPHA and level.lo > 0  # the verdict's rule (`verdicts.specificity`)
        # the wrong unit: the chunk bootstrap of the mean gap, clear of the random masks' interval
        chunk_level += metrics["specificity_gap_lo"] > metrics["specificity_gap_random_hi"]
    if mean_effect == 0:
        assert yes / sets <= bound(sets), yes
        assert chunk_level / sets > 2 * bound(sets), chunk_level  # 33 of 120: what the language level guards against
    else:
        assert yes / sets >= 0.8, yes


@pytest.mark.parametrize("planted", [0.0, 0.1])
def test_the_pruning_specific_verdict_is_calibrated_over_languages(planted):
    """CKA(full, subnetwork) at the last layer: each subnetwork language changes its own language by a random
    amount drawn like the others (planted = 0), or by `planted` less."""
    rng = np.random.default_rng(3)
    sets = 300 if planted == 0 else 40
    yes = 0
    for i in range(sets):
        rows = rng.normal(0.8, 0.05, size=(len(LANGS), 1))  # how much each subnetwork changes everything
        cka = rows + rng.normal(0, 0.05, size=(len(LANGS), len(LANGS))) + planted * np.eye(len(LANGS))
        last = pd.DataFrame(cka, index=LANGS, columns=LANGS)
        _, level, _ = subnetwork_specificity(last, 99, i)
        verdict = pruning_specific(level.value, level.lo, level.hi, level.p, 0, Inference("languages", level.n_units, level.test, level.p_floor))
        yes += verdict.answer.startswith("yes")
    if planted == 0:
        assert yes / sets <= bound(sets), yes
    else:
        assert yes / sets >= 0.8, yes


@pytest.mark.parametrize("planted", [1.0, 4.0])
def test_the_beyond_length_verdict_is_calibrated_over_languages(planted):
    """Per language, each model's CKA above its length-matched null (`cka`, `cka_null_mean` within the
    reference's length groups, as `length_control_table`), trained minus control, judged over languages
    (`unit_level`, as the analyze stage does). Both models encode a length signal and a shared content
    signal whose strength varies at random by language and model; planted = 1: the same distribution for
    both (H0), planted = 4: the trained model's content signal is 4 times as strong (signal-to-noise)."""
    from xlsub.report.similarity_tables import length_groups
    from xlsub.similarity.cka import cka
    from xlsub.similarity.controls import planted_representations
    from xlsub.similarity.permutation import cka_null_mean
    from xlsub.stats.inference import unit_level

    rng = np.random.default_rng(4)
    n, d = 48, 6
    sets = 120 if planted == 1 else 20
    yes = 0
    for _ in range(sets):
        lengths = torch.as_tensor(rng.integers(3, 9, n))
        groups = length_groups({"en": lengths}, "en")
        base = torch.as_tensor(rng.normal(size=(n, d)))
        length_part = torch.as_tensor(rng.normal(size=(1, d))) * (lengths[:, None].double() - 5.5)
        above = {}
        for model, strength in (("full", planted), ("random", 1.0)):
            for lang in LANGS[1:]:
                snr = strength * float(rng.lognormal(np.log(0.5), 0.5))
                planted_reps = planted_representations(base, ["en", lang], snr, int(rng.integers(1 << 30)))
                x, y = planted_reps["en"] + 0.2 * length_part, planted_reps[lang] + 0.2 * length_part
                above[(model, lang)] = float(cka(x, y, "debiased")) - float(cka_null_mean(x, y, "debiased", groups))
        level = unit_level([above[("full", lang)] - above[("random", lang)] for lang in LANGS[1:]])
        yes += level.p < ALPHA and level.lo > 0  # `verdicts.evidence` with the control at 0
    if planted == 1:
        assert yes / sets <= bound(sets), yes
    else:
        assert yes / sets >= 0.8, yes
