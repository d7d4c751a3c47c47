"""Answers first: one verdict per question the study asks, each with its number, 95% interval, control and
p-value, worded by the numbers ("no evidence" where the control explains the effect).

`verdicts.json` (artifact root of an analyze run) is the list `Verdict.as_dict()` gives, in question
order; `report.html` opens with the same lines.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

ALPHA = 0.05
DIFFERENT_HEADS = "Do the languages need different heads?"
SPECIFICITY = "Does a language's subnetwork serve the other languages worse than its own?"
STABILITY = "Are the masks stable across seeds?"
BEYOND_LENGTH = "Do parallel sentences share representation beyond what length explains?"
PRUNING_SPECIFIC = "Does pruning to a language's subnetwork change the representation of other languages more than its own?"
QUESTIONS = (DIFFERENT_HEADS, SPECIFICITY, STABILITY, BEYOND_LENGTH, PRUNING_SPECIFIC)  # the report's order
KEYS = {DIFFERENT_HEADS: "different_heads", SPECIFICITY: "specificity", STABILITY: "stability",
        BEYOND_LENGTH: "beyond_length", PRUNING_SPECIFIC: "pruning_specific"}  # metric names


def as_metrics(verdicts) -> dict[str, float]:
    """`verdict.<key>.value`, `.lo`, `.hi`, `.control`, `.p` for each verdict (finite numbers only)."""
    out = {}
    for v in verdicts:
        key = KEYS.get(v.question, "other")
        for name, x in (("value", v.value), ("lo", v.lo), ("hi", v.hi), ("control", v.control_value), ("p", v.p)):
            if x is not None and math.isfinite(x):
                out[f"verdict.{key}.{name}"] = float(x)
    return out


@dataclass(frozen=True)
class Verdict:
    question: str
    answer: str
    value: float
    lo: float
    hi: float
    control: str
    control_value: float
    p: float

    def as_dict(self) -> dict:
        """JSON-ready: NaN becomes None."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def _fmt(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.3g}"


def _interval(lo: float, hi: float) -> str:
    return f"95% interval [{_fmt(lo)}, {_fmt(hi)}]" if math.isfinite(lo) and math.isfinite(hi) else "no interval"


def evidence(value: float, lo: float, hi: float, control_value: float, p: float, larger: bool = True) -> bool:
    """Evidence of an effect in the stated direction: the interval excludes the control on that side (or,
    without an interval, the point estimate does) and the p-value is below ALPHA (where there is one)."""
    if not (math.isfinite(value) and math.isfinite(control_value)):
        return False
    if math.isfinite(lo) and math.isfinite(hi):
        beyond = lo > control_value if larger else hi < control_value
    else:
        beyond = value > control_value if larger else value < control_value
    return beyond and (not math.isfinite(p) or p < ALPHA)


def different_heads(across: float, lo: float, hi: float, within: float, p: float, chance: float) -> Verdict:
    """Do the languages need different heads? Across-language overlap of kept heads against the same
    language's overlap with itself across pruning seeds (the noise ceiling); p from permuting languages."""
    question = DIFFERENT_HEADS
    if not math.isfinite(within):
        answer = (f"cannot tell: one pruning seed gives no within-language noise ceiling (across-language Jaccard "
                  f"{_fmt(across)}, random masks {_fmt(chance)}); prune with several seeds")
    elif math.isfinite(p) and p < ALPHA and within > across and (not math.isfinite(hi) or hi < within):
        answer = (f"yes: masks agree less across languages (Jaccard {_fmt(across)}, {_interval(lo, hi)}) than within a "
                  f"language across seeds ({_fmt(within)}), p = {_fmt(p)}")
    else:
        answer = (f"no evidence: across-language Jaccard {_fmt(across)} ({_interval(lo, hi)}) is not below the "
                  f"within-language agreement across seeds ({_fmt(within)}), p = {_fmt(p)}")
    return Verdict(question, answer, across, lo, hi, "within-language Jaccard across pruning seeds", within, p)


def specificity(gap: float, lo: float, hi: float, random_gap: float, p: float) -> Verdict:
    """Does a language's subnetwork serve the other languages worse than its own? The mean specificity
    gap (off-diagonal minus diagonal relative perplexity) against the same gap of random masks."""
    question = SPECIFICITY
    if evidence(gap, lo, hi, random_gap, p):
        answer = (f"yes: relative perplexity is {_fmt(gap)} higher on other languages than on its own ({_interval(lo, hi)}), "
                  f"against {_fmt(random_gap)} for random masks of the same size, p = {_fmt(p)}")
    else:
        answer = (f"no evidence: the specificity gap {_fmt(gap)} ({_interval(lo, hi)}) is not above that of random masks "
                  f"of the same size ({_fmt(random_gap)}), p = {_fmt(p)}")
    return Verdict(question, answer, gap, lo, hi, "the same gap for random masks with the same heads per layer", random_gap, p)


def stability(within: float, lo: float, hi: float, chance: float, p: float) -> Verdict:
    """Are the masks stable across seeds? Same-language Jaccard across pruning seeds against random masks
    with the same heads per layer (exact expectation; p from random masks drawn alike)."""
    question = STABILITY
    if not math.isfinite(within):
        answer = "cannot tell: prune with several seeds (e.g. seeds=0,1,2) to measure it"
    elif evidence(within, lo, hi, chance, p):
        answer = (f"yes, above chance: a language's masks from different seeds share Jaccard {_fmt(within)} "
                  f"({_interval(lo, hi)}) of their heads, against {_fmt(chance)} for random masks, p = {_fmt(p)}")
    else:
        answer = (f"no evidence: masks from different seeds overlap {_fmt(within)} ({_interval(lo, hi)}), "
                  f"no more than random masks ({_fmt(chance)}), p = {_fmt(p)}")
    return Verdict(question, answer, within, lo, hi, "random masks with the same heads per layer", chance, p)


def beyond_length(above: float, lo: float, hi: float, control_above: float, p: float, control: str,
                  detection_limit: float = math.nan) -> Verdict:
    """Parallel sentences' CKA above a length-matched null (pairings that keep the source's token count),
    mean over languages at the last layer, against the same for a control encoder (the random-init model,
    or the length-only encoder); p: Bonferroni over languages of the length-matched permutation tests."""
    if evidence(above, lo, hi, control_above, p):
        answer = (f"yes: CKA is {_fmt(above)} above length-matched pairings ({_interval(lo, hi)}), against "
                  f"{_fmt(control_above)} for the {control}, p = {_fmt(p)}")
    else:
        answer = (f"no evidence: CKA above length-matched pairings is {_fmt(above)} ({_interval(lo, hi)}), not above "
                  f"the {control} ({_fmt(control_above)}), p = {_fmt(p)}")
    if math.isfinite(detection_limit):
        answer += f"; at this n and d, CKA detects a planted shared signal down to a signal-to-noise ratio of {_fmt(detection_limit)}"
    return Verdict(BEYOND_LENGTH, answer, above, lo, hi, f"the same for the {control}", control_above, p)


def pruning_specific(gap: float, lo: float, hi: float, p: float) -> Verdict:
    """Mean (1 - CKA(full, subnetwork)) on other languages minus on the subnetwork's own language, last
    layer; p from permuting which subnetwork belongs to which language (control: no special diagonal, 0)."""
    if evidence(gap, lo, hi, 0.0, p):
        answer = (f"yes: a subnetwork changes the other languages' representations more than its own by {_fmt(gap)} "
                  f"(1 - CKA; {_interval(lo, hi)}), p = {_fmt(p)}")
    else:
        answer = (f"no evidence: the difference in 1 - CKA between other languages and its own is {_fmt(gap)} "
                  f"({_interval(lo, hi)}), p = {_fmt(p)}")
    return Verdict(PRUNING_SPECIFIC, answer, gap, lo, hi, "no difference (subnetwork labels permuted)", 0.0, p)
