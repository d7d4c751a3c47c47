"""Representational similarity analysis (Kriegeskorte et al. 2008) and its Mantel test (Mantel 1967; issue 12).

`rdm`, `rsa`: Spearman correlation of the 1 - cosine dissimilarity matrices; `mantel_test` tests it against
joint re-pairings of one RDM's rows and columns, with the permutations of `xlsub.similarity.permutation`.
"""

from __future__ import annotations

import torch

from xlsub.similarity.cka import frob
from xlsub.similarity.permutation import PermutationResult, permutation_result, permutations, permuted_gram_cross
from xlsub.similarity.retrieval import unit_rows


def rdm(x: torch.Tensor, centre: bool = False) -> torch.Tensor:
    """Representational dissimilarity matrix 1 - cos(x_i, x_j), [..., n, n] float64 (Kriegeskorte et al. 2008).

    `centre`: subtract the mean over examples first. A zero row has cosine 0 (dissimilarity 1) to all.
    """
    xn = unit_rows(x, centre)
    return 1.0 - xn @ xn.mT


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..m over the last axis, ties given their average rank (scipy.stats.rankdata 'average'), float64."""
    order = torch.argsort(values, dim=-1, stable=True)
    ordered = values.gather(-1, order)
    new = torch.ones_like(ordered, dtype=torch.bool)
    new[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    run = torch.cumsum(new, dim=-1) - 1  # which tie-run each sorted position belongs to
    position = torch.arange(1, values.shape[-1] + 1, dtype=torch.float64).expand_as(ordered)
    total = torch.zeros_like(ordered, dtype=torch.float64).scatter_add_(-1, run, position)
    count = torch.zeros_like(ordered, dtype=torch.float64).scatter_add_(-1, run, torch.ones_like(position))
    mean = total.gather(-1, run) / count.gather(-1, run)
    return torch.empty_like(mean).scatter_(-1, order, mean)


def _centred_rank_matrix(x: torch.Tensor, centre: bool) -> torch.Tensor:
    """The ranks of the RDM's upper triangle, centred on their mean, as a symmetric matrix with zero diagonal."""
    d = rdm(x, centre)
    n = d.shape[-1]
    i, j = torch.triu_indices(n, n, offset=1)
    ranks = _ranks(d[..., i, j])
    ranks = ranks - ranks.mean(-1, keepdim=True)
    out = torch.zeros_like(d)
    out[..., i, j] = ranks
    return out + out.mT


def rsa(x: torch.Tensor, y: torch.Tensor, centre: bool = False) -> torch.Tensor:
    """Spearman correlation of the upper triangles (i < j) of rdm(x) and rdm(y), [...] float64.

    Representational similarity analysis (Kriegeskorte et al. 2008); ties get average ranks.
    """
    a, b = _centred_rank_matrix(x, centre), _centred_rank_matrix(y, centre)
    return (a * b).sum((-2, -1)) / (frob(a) * frob(b))


def mantel_test(x: torch.Tensor, y: torch.Tensor, n_perm: int = 500, seed: int = 0, groups=None,
                centre: bool = False) -> PermutationResult:
    """RSA of x, y [..., n, d] against re-pairings of y: y's RDM rows and columns permuted jointly (Mantel 1967).

    The upper triangle of a jointly permuted RDM holds the same values, so its ranks are the permuted
    ranks and their mean and norm do not change: each permutation is tr(A P B P') / (||A|| ||B||) on the
    centred rank matrices (zero diagonal), O(n^2). Permutations: `permutations(n, n_perm, seed, groups)`.
    """
    perms = permutations(x.shape[-2], n_perm, seed, groups)
    a, b = _centred_rank_matrix(x, centre), _centred_rank_matrix(y, centre)
    n = a.shape[-1]
    flat_a, flat_b = a.reshape(-1, n, n), b.reshape(-1, n, n)
    if n * (n - 1) // 2 < 2**24:  # centred ranks: multiples of 1/2 below 2^23, exact in float32
        flat_a, flat_b = flat_a.float(), flat_b.float()
    null = torch.stack([permuted_gram_cross(ranks_x, ranks_y, perms) for ranks_x, ranks_y in zip(flat_a, flat_b)])
    norms = (frob(a) * frob(b)).reshape(-1, 1)
    observed = (a * b).sum((-2, -1)) / frob(a) / frob(b)
    return permutation_result(observed, (null / norms).reshape(*a.shape[:-2], n_perm))
