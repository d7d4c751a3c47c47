"""Answers first: one verdict per question the study asks, each with its number, 95% interval, control and
p-value, worded by the numbers ("no evidence" where the control explains the effect).

`verdicts.json` (artifact root of an analyze run) is the list `Verdict.as_dict()` gives, in question
order; `report.html` opens with the same lines.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

ALPHA = 0.05
DIFFERENT_HEADS = "Do the languages need different heads?"
SPECIFICITY = "Does a language's subnetwork serve the other languages worse than its own?"
STABILITY = "Are the masks stable across seeds?"
BEYOND_LENGTH = "Do parallel sentences share representation beyond what length explains?"
PRUNING_SPECIFIC = "Does pruning to a language's subnetwork change the representation of other languages more than its own?"
# feed-forward neurons (the neurons stage; judged in `xlsub.report.neuron_tables`)
NEURON_SPECIFICITY = "Does switching off a language's neurons hurt that language most?"
NEURON_LAYERS = "Do language neurons concentrate in the bottom and top layers?"
NEURONS_VS_HEADS = "Do languages that share heads share neurons?"
QUESTIONS = (DIFFERENT_HEADS, SPECIFICITY, STABILITY, BEYOND_LENGTH, PRUNING_SPECIFIC,
             NEURON_SPECIFICITY, NEURON_LAYERS, NEURONS_VS_HEADS)  # the report's order
KEYS = {DIFFERENT_HEADS: "different_heads", SPECIFICITY: "specificity", STABILITY: "stability",
        BEYOND_LENGTH: "beyond_length", PRUNING_SPECIFIC: "pruning_specific", NEURON_SPECIFICITY: "neuron_specificity",
        NEURON_LAYERS: "neuron_layers", NEURONS_VS_HEADS: "neurons_vs_heads"}  # metric names


def as_metrics(verdicts) -> dict[str, float]:
    """`verdict.<key>.value`, `.lo`, `.hi`, `.control`, `.p`, `.p_floor` for each verdict (finite numbers only)."""
    out = {}
    for v in verdicts:
        key = v.key
        for name, x in (("value", v.value), ("lo", v.lo), ("hi", v.hi), ("control", v.control_value), ("p", v.p), ("p_floor", v.p_floor)):
            if x is not None and math.isfinite(x):
                out[f"verdict.{key}.{name}"] = float(x)
    return out


@dataclass(frozen=True)
class Inference:
    """How a verdict's interval and p were obtained: `unit` is what was resampled or permuted, top level
    first ("languages > seeds > chunks"), `n_units` how many of the top unit there were, `test` the null's
    name (`sign_flip_exact`, `relabel_mc`, `restricted_perm_mc`, ...), `p_floor` the smallest p that null
    can give (p >= p_floor always), `robust_to_leave_one_out` whether dropping any single top unit leaves
    the answer as it is (None where it was not computed)."""

    unit: str
    n_units: int
    test: str
    p_floor: float
    robust_to_leave_one_out: bool | None = None


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
    inference: Inference

    @property
    def key(self) -> str:
        """The verdict's name in metrics (`verdict.<key>.value`) and in `verdicts.json`."""
        return KEYS[self.question]

    @property
    def p_floor(self) -> float:
        return self.inference.p_floor

    def as_dict(self) -> dict:
        """JSON-ready (NaN and infinities become None): the fields of DESIGN.md's verdicts.json, `key` first."""
        fields = {k: v for k, v in asdict(self).items() if k != "inference"} | asdict(self.inference)
        # NaN (not measured) and an infinite interval end (too few units for one) are not JSON: both null
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in {"key": self.key, **fields}.items()}


def _fmt(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.3g}"


def format_p(p: float, p_floor: float) -> str:
    """`p <= x` where p sits at the smallest value its null can give (it could be smaller), else `p = x`."""
    if p is None or not math.isfinite(p):
        return "p n/a"
    if math.isfinite(p_floor) and p <= p_floor * (1 + 1e-9):
        return f"p <= {p_floor:.3g}"
    return f"p = {p:.3g}"


def _interval(lo: float, hi: float) -> str:
    return f"95% interval [{_fmt(lo)}, {_fmt(hi)}]" if math.isfinite(lo) and math.isfinite(hi) else "no interval"


def evidence(value: float, lo: float, hi: float, control_value: float, p: float, larger: bool = True) -> bool:
    """Evidence of an effect in the stated direction: the interval excludes the control on that side (or,
    where no interval was computed (NaN), the point estimate does) and the p-value is below ALPHA (where
    there is one). An infinite end (too few units for an interval) excludes nothing."""
    if not (math.isfinite(value) and math.isfinite(control_value)):
        return False
    if not (math.isnan(lo) or math.isnan(hi)):
        beyond = lo > control_value if larger else hi < control_value
    else:
        beyond = value > control_value if larger else value < control_value
    return beyond and (not math.isfinite(p) or p < ALPHA)


def different_heads(difference: float, lo: float, hi: float, p: float, positive: int, languages: int, across: float,
                    across_lo: float, across_hi: float, pairs_above_chance: int, pairs: int, inference: Inference) -> Verdict:
    """Do the languages need different heads? Within-language agreement of masks across pruning seeds minus
    their agreement with other languages' masks, both as Jaccard above what random masks of the same sizes
    share (so a small subnetwork is not called different for being small); every seed's masks; interval
    and p over languages. The answer also says where the across-language overlap stands against chance."""
    question = DIFFERENT_HEADS
    where = (f"across languages, masks overlap {_fmt(across)} above chance ({_interval(across_lo, across_hi)}; "
             f"{pairs_above_chance} of {pairs} first-seed language pairs above chance after BH)")
    if not math.isfinite(difference):
        answer = f"cannot tell: one pruning seed gives no within-language agreement to compare with; prune with several seeds; {where}"
    elif evidence(difference, lo, hi, 0.0, p):
        answer = (f"yes: a language's masks from different seeds agree more with each other than with other languages' masks, by "
                  f"{_fmt(difference)} chance-adjusted Jaccard ({_interval(lo, hi)}; positive in {positive} of {languages} languages), "
                  f"{format_p(p, inference.p_floor)}; {where}")
    else:
        answer = (f"no evidence: within-language agreement across seeds exceeds agreement with other languages by "
                  f"{_fmt(difference)} chance-adjusted Jaccard ({_interval(lo, hi)}; positive in {positive} of {languages} languages), "
                  f"{format_p(p, inference.p_floor)}; {where}")
    if inference.robust_to_leave_one_out is False:
        answer += "; the answer changes when one language is left out"
    return Verdict(question, answer, difference, lo, hi, "no difference (language labels of the masks permuted)", 0.0, p, inference)


def listed(names: Sequence[str]) -> str:
    """`a`, `a and b`, `a, b and c`."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def specificity(excess: float, lo: float, hi: float, random_gap: float, p: float, inference: Inference,
                per_language: Mapping[str, tuple[float, float]] | None = None) -> Verdict:
    """Does a language's subnetwork serve the other languages worse than its own? Per language, the
    specificity gap (off-diagonal minus diagonal relative perplexity) minus the same gap of its random
    masks, d; the claim is about languages: the mean of d with its sign-flip interval and p over languages
    (`xlsub.stats.inference.unit_level`). "yes" needs p < ALPHA and a lower end above 0 (so an interval:
    at least 6 languages at 95%). `random_gap` (the random masks' mean gap) is shown for reading;
    `per_language`: {language: (d, BH-adjusted p of its label-swap test)} names the languages without an
    excess."""
    question = SPECIFICITY
    n = inference.n_units
    p_text = format_p(p, inference.p_floor)
    per_language = dict(per_language or {})
    holds = [lang for lang, (d, q) in per_language.items() if d > 0 and q < ALPHA]
    without = [lang for lang in per_language if lang not in holds]
    if math.isfinite(excess) and math.isfinite(lo) and lo > 0 and math.isfinite(p) and p < ALPHA:
        scope = "" if not per_language else f" for all {n} languages" if not without else f" for {len(holds)} of {n} languages"
        answer = (f"yes{scope}: a subnetwork's relative perplexity on the other languages exceeds that on its own by "
                  f"{_fmt(excess)} more than for random masks with the same heads per layer (mean over {n} languages, "
                  f"{_interval(lo, hi)} from sign flips over languages; random masks' own gap {_fmt(random_gap)}), one-sided {p_text}")
        if without:
            answer += (f"; {listed(without)} {'shows' if len(without) == 1 else 'show'} no excess over random masks "
                       f"(BH-adjusted p >= {ALPHA:g})")
    else:
        includes = ", which includes 0" if math.isfinite(lo) and lo <= 0 else ""
        answer = (f"no evidence at the level of languages: the specificity gap exceeds that of random masks with the same "
                  f"heads per layer by {_fmt(excess)} on average over {n} languages ({_interval(lo, hi)}{includes}; one-sided "
                  f"{p_text})")
        answer += too_few_clause(inference, lo)
        if per_language:
            answer += f"; within languages the excess is significant for {len(holds)} of {len(per_language)} (BH-adjusted p < {ALPHA:g})"
    answer += robustness_clause(inference)
    return Verdict(question, answer, excess, lo, hi, "random masks with the same heads per layer", random_gap, p, inference)


def robustness_clause(inference: Inference) -> str:
    """What a verdict adds when leaving one language out changes its answer."""
    return "; the answer changes when one language is left out" if inference.robust_to_leave_one_out is False else ""


def too_few_clause(inference: Inference, lo: float) -> str:
    """Why a "no evidence" may come from the number of languages alone."""
    n = inference.n_units
    if math.isfinite(inference.p_floor) and inference.p_floor >= ALPHA:
        return f"; {n} languages cannot give p below {inference.p_floor:.3g}"
    if not math.isfinite(lo):
        return f"; {n} languages are too few for a 95% sign-flip interval (it needs 6)"
    return ""


def stability(within: float, lo: float, hi: float, chance: float, p: float, inference: Inference,
              per_language: Mapping[str, tuple[float, float]]) -> Verdict:
    """Are the masks stable across seeds? Per language, the Jaccard of its masks across pruning seeds minus
    the exact expectation for random masks with the same heads per layer; the claim is about languages:
    the mean over languages (shown as the mean Jaccard, `within`, against the random masks' `chance`) with
    the sign-flip interval and one-sided p of the excess over languages. `per_language`: {language:
    (excess, BH-adjusted p of its random-mask test)} counts the languages the claim holds for."""
    question = STABILITY
    n = inference.n_units
    holds = [lang for lang, (d, q) in per_language.items() if d > 0 and q < ALPHA]
    without = [lang for lang in per_language if lang not in holds]
    count = (f"; within languages, above chance for {len(holds)} of {len(per_language)} (BH-adjusted random-mask p < {ALPHA:g})"
             + (f"; not {listed(without)}" if without and len(without) <= 3 else ""))
    if not math.isfinite(within):
        answer = "cannot tell: prune with several seeds (e.g. seeds=0,1,2) to measure it"
    elif evidence(within, lo, hi, chance, p):
        answer = (f"yes, above chance: a language's masks from different seeds share Jaccard {_fmt(within)} of their heads "
                  f"({_interval(lo, hi)} from sign flips over {n} languages), against {_fmt(chance)} for random masks with the same "
                  f"heads per layer, one-sided {format_p(p, inference.p_floor)}{count}")
    else:
        answer = (f"no evidence at the level of languages: masks from different seeds overlap {_fmt(within)} "
                  f"({_interval(lo, hi)} over {n} languages) against {_fmt(chance)} for random masks, one-sided "
                  f"{format_p(p, inference.p_floor)}{too_few_clause(inference, lo)}{count}")
    answer += robustness_clause(inference)
    return Verdict(question, answer, within, lo, hi, "random masks with the same heads per layer", chance, p, inference)


def beyond_length(difference: float, lo: float, hi: float, above: float, control_above: float, p: float, control: str,
                  detection_limit: float, inference: Inference, power_draws: int = 50, power_permutations: int = 99,
                  positive: int | None = None) -> Verdict:
    """Do parallel sentences share representation beyond what length explains, more than a control encoder
    does? Per language, the parallel CKA above its length-matched null (pairings that keep the source's
    token count) at the last layer, the trained model's minus the control's (the random-init model, or the
    length-only encoder): the paired difference, its sign-flip interval and one-sided p over languages.
    `above`, `control_above`: the two means, for reading; `detection_limit`: the planted-signal power analysis's
    (`xlsub.similarity.power`, up to `power_draws` draws per level of `power_permutations` permutations);
    `positive`: the languages whose difference is above 0."""
    p_text = format_p(p, inference.p_floor)
    both = f"trained {_fmt(above)}, {control} {_fmt(control_above)}"
    if positive is not None:
        both += f"; positive in {positive} of {inference.n_units} languages"
    if evidence(difference, lo, hi, 0.0, p):
        answer = (f"yes: parallel sentences' CKA above length-matched pairings exceeds that of the {control} by "
                  f"{_fmt(difference)} ({_interval(lo, hi)} from sign flips over {inference.n_units} languages; {both}), "
                  f"one-sided {p_text}")
    else:
        includes = ", which includes 0" if math.isfinite(lo) and lo <= 0 else ""
        answer = (f"no evidence: parallel sentences' CKA above length-matched pairings exceeds that of the {control} by "
                  f"{_fmt(difference)} ({_interval(lo, hi)}{includes}; {both}), one-sided {p_text}")
    if inference.robust_to_leave_one_out is False:
        answer += "; the answer changes when one language is left out"
    if math.isfinite(detection_limit):
        answer += (f"; at this n and d, the length-restricted CKA test has power >= 0.8 (from up to {power_draws} planted draws per "
                   f"level, {power_permutations} permutations each) from a signal-to-noise ratio of {_fmt(detection_limit)} on")
    return Verdict(BEYOND_LENGTH, answer, difference, lo, hi, f"the same for the {control}", control_above, p, inference)


def pruning_specific(gap: float, lo: float, hi: float, p: float, positive: int, inference: Inference) -> Verdict:
    """Does pruning to a language's subnetwork change the representation of the other languages more than
    its own? Per subnetwork language, mean (1 - CKA(full, subnetwork)) at the last layer on the other
    languages minus on its own; the mean over languages with its sign-flip interval and one-sided p
    (control: no special diagonal, 0). `positive`: the languages whose difference is above 0."""
    n = inference.n_units
    shown = f"{_fmt(gap)} (1 - CKA; {_interval(lo, hi)} from sign flips over {n} languages; positive in {positive} of {n})"
    if evidence(gap, lo, hi, 0.0, p):
        answer = (f"yes: a subnetwork changes the other languages' representations more than its own by {shown}, "
                  f"one-sided {format_p(p, inference.p_floor)}")
    else:
        answer = (f"no evidence: the difference in 1 - CKA between the other languages and its own is {shown}, "
                  f"one-sided {format_p(p, inference.p_floor)}{too_few_clause(inference, lo)}")
    answer += robustness_clause(inference)
    return Verdict(PRUNING_SPECIFIC, answer, gap, lo, hi, "no difference between its own and the other languages", 0.0, p, inference)
