"""Representational similarity analysis (Kriegeskorte et al. 2008) and its Mantel test (Mantel 1967; issue 12).

`rdm`, `rsa`: Spearman correlation of the 1 - cosine dissimilarity matrices; `mantel_test` tests it against
joint re-pairings of one RDM's rows and columns, with the permutations of `xlsub.similarity.permutation`.
"""

from __future__ import annotations

import torch

from xlsub.similarity.cka import frob
from xlsub.similarity.permutation import PermutationResult, permutation_result, permutations
from xlsub.similarity.retrieval import unit_rows

# Bytes of permuted reference matrices (float64 n x n) per block of permutations in the Mantel test.
_BLOCK_BYTES = 2**26


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
    centred rank matrices (zero diagonal), O(n^2). Permutations: `permutations(n, n_perm, seed, groups)`
    (`groups`: e.g. the source sentences' token counts, for the length-restricted null). The leading
    dimensions broadcast: one x [n, d] against several y [m, n, d] (one language against the others)
    permutes x's matrix once per permutation for all m (`_permuted_cross`).
    """
    perms = permutations(x.shape[-2], n_perm, seed, groups)
    a, b = _centred_rank_matrix(x, centre), _centred_rank_matrix(y, centre)
    n = a.shape[-1]
    lead = (a[..., 0, 0] + b[..., 0, 0]).shape  # the broadcast leading shape
    flat_b = b.expand(*lead, n, n).reshape(-1, n, n)
    if a.shape[:-2].numel() == 1:  # one reference for every y: shared
        null = _permuted_cross(a.reshape(n, n), flat_b, perms)
    else:
        flat_a = a.expand(*lead, n, n).reshape(-1, n, n)
        null = torch.cat([_permuted_cross(ranks_x, ranks_y[None], perms) for ranks_x, ranks_y in zip(flat_a, flat_b)])
    norms = (frob(a) * frob(b)).reshape(-1, 1)
    observed = (a * b).sum((-2, -1)) / frob(a) / frob(b)
    return permutation_result(observed, (null / norms).reshape(*lead, n_perm))


def _permuted_cross(a: torch.Tensor, bs: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """sum_ij A_ij B_p(i)p(j) for every B in bs [m, n, n] and every permutation p, [m, P] float64.

    The same sum is sum_ij A_q(i)q(j) B_ij with q = p^-1, so A is gathered once per permutation and a
    block of gathered copies meets all m matrices in one float64 product: one n^2 gather per permutation
    however many languages share the reference (`permuted_gram_cross` gathers once per pair).
    """
    n = a.shape[-1]
    inverse = torch.argsort(perms, dim=1)
    a, flat_b = a.double(), bs.reshape(len(bs), n * n).double()
    block = max(1, min(len(perms), _BLOCK_BYTES // (8 * n * n)))
    rows, gathered = torch.empty(n, n, dtype=torch.float64), torch.empty(block, n, n, dtype=torch.float64)
    out = torch.empty(len(bs), len(perms), dtype=torch.float64)
    for start in range(0, len(perms), block):
        chunk = inverse[start:start + block]
        for k, q in enumerate(chunk):
            torch.index_select(torch.index_select(a, 0, q, out=rows), 1, q, out=gathered[k])
        out[:, start:start + len(chunk)] = flat_b @ gathered[:len(chunk)].reshape(len(chunk), n * n).mT
    return out
