"""Translation retrieval (Libovicky et al. 2020) with its permutation null (issue 12).

`retrieval_top1`: the fraction of sentences whose nearest neighbour (cosine, each language centred on its
own mean) among the other language's sentences is their translation; `retrieval_permutation_test` tests
it against re-pairings, with the permutations of `xlsub.similarity.permutation`. `unit_rows` is the cosine
geometry the RSA and kNN-graph measures share with it.
"""

from __future__ import annotations

import torch

from xlsub.similarity.permutation import PermutationResult, permutation_result, permutations

# Rows of x per similarity block in retrieval (a block x n matrix of float64 at a time).
_ROW_BLOCK = 1024


def unit_rows(x: torch.Tensor, centre: bool) -> torch.Tensor:
    """x in float64, centred over examples if asked, rows scaled to unit length (zero rows stay zero)."""
    x = x.to(torch.float64)
    if centre:
        x = x - x.mean(-2, keepdim=True)
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)


def nearest_translation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """For each row i of x [..., n, d], the row of y [..., n, d] most cosine-similar to it, or -1 on a tie.

    Each language is centred on its own mean first (Libovicky et al. 2020). -1 where the largest
    similarity is shared by two rows of y (also where a centred row is zero: all its similarities are 0).
    Computed in blocks of rows of x, so memory is a block x n matrix, not n x n.
    """
    if x.shape != y.shape or x.shape[-2] < 2:
        raise ValueError(f"retrieval: x {tuple(x.shape)} and y {tuple(y.shape)} must have the same shape "
                         "(one space, so cosines compare) and at least 2 examples")
    xn, yn = unit_rows(x, True), unit_rows(y, True)
    # float32 similarities (twice the float64 rate), then float64 for the rows whose two best are closer than
    # twice float32's worst-case error on a cosine of unit vectors, (d + 2) eps32 (inputs rounded once, a
    # d-term sum): elsewhere the float64 best is the same row and unique, so the answer is float64's
    margin = 4 * (x.shape[-1] + 2) * torch.finfo(torch.float32).eps
    x32, y32 = xn.float(), yn.float()
    out = []
    for start in range(0, x.shape[-2], _ROW_BLOCK):
        rows = slice(start, start + _ROW_BLOCK)
        top = (x32[..., rows, :] @ y32.mT).topk(2, dim=-1)
        best = top.indices[..., 0]
        close = (top.values[..., 0] - top.values[..., 1]) <= margin
        flat_best, flat_close = best.reshape(-1, best.shape[-1]), close.reshape(-1, close.shape[-1])
        flat_x, flat_y = xn[..., rows, :].reshape(-1, *best.shape[-1:], x.shape[-1]), yn.reshape(-1, *y.shape[-2:])
        for lead in flat_close.any(-1).nonzero().reshape(-1).tolist():  # one leading index (layer) at a time
            which = flat_close[lead].nonzero().reshape(-1)
            exact = (flat_x[lead, which] @ flat_y[lead].mT).topk(2, dim=-1)
            unique = exact.values[:, 0] > exact.values[:, 1]
            flat_best[lead, which] = torch.where(unique, exact.indices[:, 0], -1)
        out.append(flat_best.reshape(best.shape))
    return torch.cat(out, dim=-1)


def retrieval_top1_per_layer(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Top-1 translation retrieval accuracy per leading index: x, y [..., n, d] -> [...] (float64).

    The fraction of sentences i whose unique nearest neighbour (cosine, after centring each language on
    its mean) among all n rows of y is its translation y_i; a tie for the top counts as a miss. Chance is
    1/n.
    """
    nearest = nearest_translation(x, y)
    return (nearest == torch.arange(x.shape[-2])).double().mean(-1)


def retrieval_top1(x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 translation retrieval accuracy of x [n, d] against y [n, d] (see `retrieval_top1_per_layer`)."""
    if x.ndim != 2:
        raise ValueError(f"retrieval_top1 takes [n, d] inputs, got {tuple(x.shape)}; "
                         "use retrieval_top1_per_layer for [layers, n, d]")
    return float(retrieval_top1_per_layer(x, y))


def retrieval_permutation_test(x: torch.Tensor, y: torch.Tensor, n_perm: int = 1000, seed: int = 0,
                               groups=None) -> PermutationResult:
    """Top-1 retrieval of x [..., n, d] against the same for random re-pairings of y (within `groups`).

    Re-pairing moves no vector, so each x_i keeps its nearest y, m(i); under permutation p the hit count
    is #{i : p(i) = m(i)}, O(n) per permutation after one similarity pass. The permutations are
    `permutations(n, n_perm, seed, groups)`, as for CKA.
    """
    n = x.shape[-2]
    nearest = nearest_translation(x, y)  # [..., n]
    perms = permutations(n, n_perm, seed, groups)
    observed = (nearest == torch.arange(n)).double().mean(-1)
    null = (perms == nearest[..., None, :]).double().mean(-1)  # [..., n_perm]
    return permutation_result(observed, null)
