"""Verdict wording follows the numbers: "yes" only where the interval clears the control and p < 0.05."""

import json
import math

from xlsub.report.verdicts import different_heads, evidence, specificity, stability


def test_evidence_needs_the_interval_beyond_the_control_and_a_small_p():
    assert evidence(0.5, 0.3, 0.7, 0.2, 0.01)
    assert not evidence(0.5, 0.1, 0.7, 0.2, 0.01)  # the interval includes the control
    assert not evidence(0.5, 0.3, 0.7, 0.2, 0.2)  # not significant
    assert evidence(0.1, 0.05, 0.15, 0.2, 0.01, larger=False)
    assert not evidence(math.nan, 0.3, 0.7, 0.2, 0.01)


def test_specificity_says_no_evidence_when_random_masks_explain_the_gap():
    yes = specificity(0.30, 0.20, 0.40, 0.05, 0.001)
    no = specificity(0.30, 0.02, 0.60, 0.05, 0.2)
    assert yes.answer.startswith("yes") and no.answer.startswith("no evidence")
    assert (yes.value, yes.lo, yes.hi, yes.control_value, yes.p) == (0.30, 0.20, 0.40, 0.05, 0.001)


def test_different_heads_and_stability_need_several_seeds():
    assert different_heads(0.3, math.nan, math.nan, math.nan, math.nan, 0.2).answer.startswith("cannot tell")
    assert stability(math.nan, math.nan, math.nan, 0.2, math.nan).answer.startswith("cannot tell")
    assert different_heads(0.3, 0.25, 0.35, 0.7, 0.001, 0.2).answer.startswith("yes")
    assert different_heads(0.3, 0.25, 0.75, 0.7, 0.001, 0.2).answer.startswith("no evidence")
    assert stability(0.6, 0.5, 0.7, 0.25, 0.001).answer.startswith("yes")
    assert stability(0.3, 0.2, 0.4, 0.25, 0.3).answer.startswith("no evidence")


def test_verdicts_are_json_with_the_schema_and_nan_as_null():
    row = stability(math.nan, math.nan, math.nan, 0.2, math.nan).as_dict()
    assert list(row) == ["question", "answer", "value", "lo", "hi", "control", "control_value", "p"]
    assert json.loads(json.dumps(row))["value"] is None
