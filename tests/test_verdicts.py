"""Verdict wording follows the numbers: "yes" only where the interval clears the control and p < 0.05; every
verdict says how it was tested (unit, test, p floor) and writes a p at its floor as "p <= x"."""

import json
import math

from xlsub.report.verdicts import Inference, beyond_length, different_heads, evidence, format_p, pruning_specific, specificity, stability

LANGUAGES = Inference("languages > seeds > chunks", 8, "sign_flip_exact", 1 / 256, True)
SEEDS = Inference("languages > seed pairs", 8, "random_masks_mc", 1 / 1001)
PER_LANGUAGE = {"de": (0.3, 0.001), "en": (0.2, 0.01), "ru": (0.01, 0.4)}


def test_evidence_needs_the_interval_beyond_the_control_and_a_small_p():
    assert evidence(0.5, 0.3, 0.7, 0.2, 0.01)
    assert not evidence(0.5, 0.1, 0.7, 0.2, 0.01)  # the interval includes the control
    assert not evidence(0.5, 0.3, 0.7, 0.2, 0.2)  # not significant
    assert evidence(0.1, 0.05, 0.15, 0.2, 0.01, larger=False)
    assert not evidence(math.nan, 0.3, 0.7, 0.2, 0.01)
    assert evidence(0.5, math.nan, math.nan, 0.2, 0.01)  # no interval computed: the point estimate decides
    assert not evidence(0.5, -math.inf, math.inf, 0.2, 0.01)  # too few units for an interval: no evidence


def test_specificity_says_no_evidence_when_random_masks_explain_the_gap():
    yes = specificity(0.30, 0.20, 0.40, 0.05, 0.001, LANGUAGES)
    no = specificity(0.30, 0.02, 0.60, 0.05, 0.2, LANGUAGES)
    assert yes.answer.startswith("yes") and no.answer.startswith("no evidence")
    assert (yes.value, yes.lo, yes.hi, yes.control_value, yes.p) == (0.30, 0.20, 0.40, 0.05, 0.001)
    # significant one-sided but an interval that reaches 0: no evidence, and the answer says why
    edge = specificity(0.318, -0.00715, 0.699, 0.274, 0.0273, LANGUAGES)
    assert edge.answer.startswith("no evidence") and "[-0.00715, 0.699], which includes 0; one-sided p = 0.0273" in edge.answer


def test_different_heads_and_stability_need_several_seeds():
    assert different_heads(math.nan, math.nan, math.nan, math.nan, 0, 0, 0.01, -0.02, 0.04, 0, 28, SEEDS).answer.startswith("cannot tell")
    assert stability(math.nan, math.nan, math.nan, 0.2, math.nan, SEEDS, PER_LANGUAGE).answer.startswith("cannot tell")
    yes = different_heads(0.3, 0.25, 0.35, 0.001, 7, 8, 0.01, -0.02, 0.04, 0, 28, SEEDS)
    assert yes.answer.startswith("yes") and "positive in 7 of 8 languages" in yes.answer and "0 of 28 first-seed language pairs" in yes.answer
    assert different_heads(0.3, -0.05, 0.75, 0.001, 5, 8, 0.01, -0.02, 0.04, 0, 28, SEEDS).answer.startswith("no evidence")
    assert different_heads(0.3, 0.25, 0.35, 0.2, 5, 8, 0.01, -0.02, 0.04, 0, 28, SEEDS).answer.startswith("no evidence")
    fragile = different_heads(0.3, 0.25, 0.35, 0.001, 7, 8, 0.01, -0.02, 0.04, 0, 28, Inference("languages", 8, "relabel_mc", 0.001, False))
    assert fragile.answer.endswith("the answer changes when one language is left out")
    assert "left out" not in yes.answer
    assert stability(0.6, 0.5, 0.7, 0.25, 0.001, SEEDS, PER_LANGUAGE).answer.startswith("yes")
    assert stability(0.3, 0.2, 0.4, 0.25, 0.3, SEEDS, PER_LANGUAGE).answer.startswith("no evidence")
    stable = stability(0.6, 0.5, 0.7, 0.25, 0.001, SEEDS, PER_LANGUAGE).answer
    assert "above chance for 2 of 3 (BH-adjusted random-mask p < 0.05); not ru" in stable
    too_few = stability(0.6, -math.inf, math.inf, 0.25, 1 / 16, Inference("languages > seed pairs", 4, "sign_flip_exact", 1 / 16), {})
    assert too_few.answer.startswith("no evidence") and "4 languages cannot give p below 0.0625" in too_few.answer


def test_pruning_specific_is_judged_over_languages():
    languages = Inference("languages", 8, "sign_flip_exact", 1 / 256, True)
    yes = pruning_specific(0.05, 0.02, 0.08, 1 / 256, 8, languages)
    assert yes.answer.startswith("yes") and "positive in 8 of 8" in yes.answer and "p <= 0.00391" in yes.answer
    no = pruning_specific(0.05, -0.01, 0.08, 0.03, 6, Inference("languages", 8, "sign_flip_exact", 1 / 256, False))
    assert no.answer.startswith("no evidence") and no.answer.endswith("the answer changes when one language is left out")
    assert (no.value, no.lo, no.hi, no.control_value, no.p) == (0.05, -0.01, 0.08, 0.0, 0.03)


def test_a_p_at_its_floor_is_written_as_a_bound_and_only_then():
    assert format_p(1 / 256, 1 / 256) == "p <= 0.00391"
    assert format_p(1 / 1001, 1 / 1001) == "p <= 0.000999"
    assert format_p(0.027, 1 / 256) == "p = 0.027"
    assert format_p(math.nan, 1 / 256) == "p n/a"
    at_floor = stability(0.6, 0.5, 0.7, 0.25, 1 / 1001, SEEDS, PER_LANGUAGE).answer
    assert "p <= 0.000999" in at_floor and "p = " not in at_floor
    above = stability(0.6, 0.5, 0.7, 0.25, 0.004, SEEDS, PER_LANGUAGE).answer
    assert "p = 0.004" in above and "<=" not in above


def test_verdicts_are_json_with_the_schema_and_nan_as_null():
    row = stability(math.nan, math.nan, math.nan, 0.2, math.nan, SEEDS, PER_LANGUAGE).as_dict()
    assert list(row) == ["key", "question", "answer", "value", "lo", "hi", "control", "control_value", "p",
                         "unit", "n_units", "test", "p_floor", "robust_to_leave_one_out"]
    parsed = json.loads(json.dumps(row))
    assert parsed["value"] is None and parsed["key"] == "stability" and parsed["test"] == "random_masks_mc"
    assert parsed["p_floor"] == 1 / 1001 and parsed["n_units"] == 8 and parsed["robust_to_leave_one_out"] is None


def test_an_infinite_interval_end_is_null_in_json():
    row = stability(0.6, -math.inf, math.inf, 0.25, 0.01, SEEDS, PER_LANGUAGE).as_dict()
    assert json.loads(json.dumps(row, allow_nan=False))["lo"] is None


def test_beyond_length_is_judged_on_the_paired_difference():
    inference = Inference("languages > sentences", 7, "sign_flip_exact", 1 / 128, True)
    yes = beyond_length(0.046, 0.009, 0.083, 0.106, 0.0605, 1 / 128, "randomly initialised model", 0.03, inference)
    assert yes.answer.startswith("yes: parallel sentences' CKA above length-matched pairings exceeds that of the randomly "
                                 "initialised model by 0.046 (95% interval [0.009, 0.083] from sign flips over 7 languages")
    assert "trained 0.106, randomly initialised model 0.0605" in yes.answer and "one-sided p <= 0.00781" in yes.answer
    assert (yes.value, yes.control_value) == (0.046, 0.0605)
    no = beyond_length(0.046, -0.01, 0.1, 0.106, 0.0605, 0.03, "randomly initialised model", math.nan, inference)
    assert no.answer.startswith("no evidence") and "which includes 0" in no.answer
