"""Representational similarity analysis (Kriegeskorte et al. 2008) and its Mantel test (Mantel 1967; issue 12).

`rdm`, `rsa`: Spearman correlation of the 1 - cosine dissimilarity matrices; `mantel_test` tests it against
joint re-pairings of one RDM's rows and columns (`xlsub.stats.inference.mantel_test` on the RDMs);
`rsa_jackknife_interval`: its delete-a-block jackknife interval over sentences.
"""

from __future__ import annotations

import math

import torch

from xlsub.similarity.jackknife import Interval, jackknife_blocks
from xlsub.similarity.permutation import TAIL_PILOT, permutations, sequential_null
from xlsub.similarity.retrieval import unit_rows
from xlsub.stats import inference


def rdm(x: torch.Tensor, centre: bool = False) -> torch.Tensor:
    """Representational dissimilarity matrix 1 - cos(x_i, x_j), [..., n, n] float64 (Kriegeskorte et al. 2008).

    `centre`: subtract the mean over examples first. A zero row has cosine 0 (dissimilarity 1) to all.
    """
    xn = unit_rows(x, centre)
    return 1.0 - xn @ xn.mT


def rsa(x: torch.Tensor, y: torch.Tensor, centre: bool = False) -> torch.Tensor:
    """Spearman correlation of the upper triangles (i < j) of rdm(x) and rdm(y), [...] float64.

    Representational similarity analysis (Kriegeskorte et al. 2008); ties get average ranks. One x against
    several y [m, n, d]: the ranks of x once, each y's one at a time (`centred_ranks`).
    """
    if x.dim() == 2 and y.dim() > 2:
        a = centred_ranks(x, centre)
        flat = y.reshape(-1, *y.shape[-2:])
        values = [(a * (b := centred_ranks(one, centre))).sum() / (inference.upper_norm(a) * inference.upper_norm(b)) for one in flat]
        return torch.stack(values).reshape(y.shape[:-2])
    return inference.matrix_correlation(rdm(x, centre), rdm(y, centre))


def mantel_test(x: torch.Tensor, y: torch.Tensor, n_perm: int = 500, seed: int = 0, groups=None,
                centre: bool = False, tail_risk: float | None = None, pilot: int = TAIL_PILOT,
                stop_after: int | None = None) -> inference.MantelResult:
    """RSA of x, y [..., n, d] against re-pairings of y: y's RDM rows and columns permuted jointly (Mantel 1967).

    `xlsub.stats.inference.mantel_test` (one-sided, "greater") on rdm(x), rdm(y): `n_perm` permutations
    `xlsub.similarity.permutation.permutations(n, n_perm, seed, groups)` (`groups`: e.g. the source
    sentences' token counts, for the length-restricted null), or all n! where that is affordable. The leading dimensions broadcast: one x
    [n, d] against several y [m, n, d] (one language against the others) permutes x's matrix once per
    permutation for all m.

    `tail_risk` (None: off; one x against y [m, n, d] only): the first `pilot` permutations first, and a
    language whose observed RSA they put so far above the null that the n_perm permutations reach it with
    probability at most `tail_risk` (+ 0.01 for the pilot's mean and sd; `tail_bound_decided`) gets p =
    1 / (1 + n_perm) without the others (`tail_bound` says where; null_mean and null_std are the pilot's). The
    other languages run all n_perm permutations: their numbers are the full test's.

    `stop_after` (None: off; the same shapes): languages clearly at the null stop early (`sequential_null`:
    at the `stop_after`-th null r reaching the observed one within the first `stop_after` / `STOP_P`
    permutations, p = `stop_after` / L; `stopped` says where).
    """
    n = x.shape[-2]
    sample = permutations(n, n_perm, seed, groups)
    a, b = centred_ranks(x, centre), centred_ranks(y, centre)
    staged = (tail_risk is not None and pilot < n_perm) or stop_after
    if not staged or x.dim() != 2 or y.dim() != 3 or math.factorial(min(n, 20)) <= inference.EXACT_LIMIT:
        return inference.mantel_test(a, b, sample, groups, centred=True)
    first = inference.mantel_test(a, b, sample[:min(pilot, n_perm)], groups, centred=True)

    def compute(cells, start, stop):
        if start == 0 and stop == len(first.null[0]) and len(cells) == len(b):
            return first.null
        return inference.mantel_test(a, b[cells], sample[start:stop], groups, centred=True).null

    def exceeds(null, observed):
        return null >= observed - inference.MANTEL_TIE * observed.abs().clamp_min(1.0)

    done = sequential_null(compute, first.observed, n_perm, exceeds, pilot=pilot, tail_risk=tail_risk, stop_after=stop_after)
    return inference.MantelResult(first.observed, done.p_value, done.null, n_perm, 1.0 / (n_perm + 1), first.test, done.tail_bound,
                                  pilot, done.stopped)


def centred_ranks(x: torch.Tensor, centre: bool = False) -> torch.Tensor:
    """`xlsub.stats.inference.centred_upper(rdm(x), "spearman")` [..., n, n], one leading index at a time:
    at n = 5,000 an RDM is 200 MB, and ranking seven at once held several GB of sort buffers."""
    if x.dim() == 2:
        return inference.centred_upper(rdm(x, centre), "spearman")
    flat = x.reshape(-1, *x.shape[-2:])
    out = torch.empty(len(flat), x.shape[-2], x.shape[-2], dtype=torch.float64)
    for index, one in enumerate(flat):
        out[index] = inference.centred_upper(rdm(one, centre), "spearman")
    return out.reshape(*x.shape[:-2], x.shape[-2], x.shape[-2])


def _upper(d: torch.Tensor) -> torch.Tensor:
    i, j = torch.triu_indices(d.shape[-1], d.shape[-1], offset=1)
    return d[..., i, j]


def _tie_runs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ascending (stable) order of `values` along the last axis, and for each sorted position the index
    of its run of equal values."""
    order = torch.argsort(values, dim=-1, stable=True)
    ordered = values.gather(-1, order)
    new = torch.ones_like(ordered, dtype=torch.bool)
    new[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    return order, torch.cumsum(new, dim=-1) - 1


def _subset_ranks(order: torch.Tensor, runs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties averaged, as `xlsub.stats.inference.average_ranks`) of the kept entries among
    themselves, from the full sort (`_tie_runs`): O(m) per subset instead of a new sort. [..., kept]."""
    kept = keep[order].double()  # in sorted order
    position = torch.cumsum(kept, dim=-1)  # a kept entry's rank among the kept ones
    total = torch.zeros_like(position).scatter_add_(-1, runs, position * kept)
    count = torch.zeros_like(position).scatter_add_(-1, runs, kept)
    mean = total.gather(-1, runs) / count.gather(-1, runs).clamp_min(1.0)
    return torch.empty_like(mean).scatter_(-1, order, mean)[..., keep]


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1))


def leave_block_out_rsa(x: torch.Tensor, y: torch.Tensor, blocks: torch.Tensor, centre: bool = False) -> torch.Tensor:
    """RSA without the sentences of block b, for every block b of `blocks` (labels 0..B-1 per sentence),
    [..., B]: the block's rows and columns deleted from both RDMs and the rest re-ranked. Each RDM is
    sorted once; the ranks of a subset are read off that sort (`_subset_ranks`), which equals re-ranking
    the subset from scratch (ties included)."""
    blocks = torch.as_tensor(blocks, dtype=torch.long)
    i, j = torch.triu_indices(len(blocks), len(blocks), offset=1)
    count = int(blocks.max()) + 1
    if x.dim() == 2 and y.dim() > 2:
        # one reference against several languages: the reference sorted once, each language's sort kept in int32
        # and its ranks taken one language at a time (at n = 5,000 the batched buffers took several GB)
        sorted_x = _tie_runs(_upper(rdm(x, centre)))
        flat = y.reshape(-1, *y.shape[-2:])
        sorted_ys = [tuple(t.int() for t in _tie_runs(_upper(rdm(one, centre)))) for one in flat]
        out = torch.empty(len(flat), count, dtype=torch.float64)
        for b in range(count):
            keep = (blocks[i] != b) & (blocks[j] != b)
            ranks_x = _subset_ranks(*sorted_x, keep)
            for index, (order, runs) in enumerate(sorted_ys):
                out[index, b] = _pearson(ranks_x, _subset_ranks(order.long(), runs.long(), keep))
        return out.reshape(*y.shape[:-2], count)
    ux, uy = _upper(rdm(x, centre)), _upper(rdm(y, centre))
    sorted_x, sorted_y = _tie_runs(ux), _tie_runs(uy)
    out = []
    for b in range(count):
        keep = (blocks[i] != b) & (blocks[j] != b)
        out.append(_pearson(_subset_ranks(*sorted_x, keep), _subset_ranks(*sorted_y, keep)))
    return torch.stack(out, -1)


def rsa_jackknife_interval(x: torch.Tensor, y: torch.Tensor, blocks: int = 20, level: float = 0.95,
                           centre: bool = False) -> Interval:
    """Delete-a-block jackknife interval for RSA: (estimate, lo, hi), each [...] (leading axes broadcast).

    The n sentences in `blocks` contiguous blocks (`jackknife_blocks`); theta_b is the RSA without block b
    (`leave_block_out_rsa`), and the interval `xlsub.stats.inference.jackknife_interval` (t quantile,
    grouped jackknife SE) around the RSA on all n. Not a bootstrap with replacement: a sentence drawn twice
    has dissimilarity 0 to its copy in both RDMs, and these shared zeros, ranked lowest in both, inflate the
    rank correlation.
    """
    labels = jackknife_blocks(x.shape[-2], blocks)
    estimate = rsa(x, y, centre)
    lo, hi = inference.jackknife_interval(estimate, leave_block_out_rsa(x, y, labels, centre), level)
    return Interval(estimate, lo, hi)
