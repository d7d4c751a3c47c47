"""Exact permutation variance of CKA's and the Mantel test's cross term, over all pairings or within groups.

Every permutation null here re-pairs the rows of one representation and changes only a cross term
    T(p) = sum_ij K_ij L_p(i)p(j) + lam sum_i K_ii L_p(i)p(i),
K, L symmetric n x n (linear kernels XX', YY' of centred features; a centred RBF kernel; the Mantel test's
centred rank matrices) and lam a constant (-n / (n - 2) for the unbiased HSIC_1: its r_x . r_(y,p) term is
that multiple of the diagonal term, since K's rows sum to zero; 0 otherwise). p is uniform over the
permutations that keep every row within its group (one group: all permutations). The exact mean is
`xlsub.similarity.permutation.cka_null_mean`; this module gives the exact variance, so a cell far in the
tail needs no pilot permutations to estimate it (`xlsub.similarity.permutation.tail_bound_decided`).

Derivation (checked against every permutation of small cases in `tests/test_moments.py`). The groups'
permutations p_g are independent, so T has the Hoeffding decomposition T = E T + sum_g F_g(p_g) + sum_{g<h}
I_gh(p_g, p_h), its terms uncorrelated:
- I_gh = 2 sum_{i in g, j in h} K_ij L~_p(i)p(j), with L~ the block L_gh double-centred. The double-centred
  m_g x m_h matrices carry an irreducible representation of S_mg x S_mh of dimension (m_g - 1)(m_h - 1), so
  (Schur orthogonality) Var I_gh = 4 |K~_gh|^2 |L~_gh|^2 / ((m_g - 1)(m_h - 1)). For linear kernels
  K~_gh = X~_g X~_h' (rows centred within their group), |K~_gh|^2 = <X~_g'X~_g, X~_h'X~_h>.
- F_g = Q_g + Lin_g: Q_g = sum_{i != j in g} K_ij L_p(i)p(j), a quadratic assignment statistic, and
  Lin_g = sum_{i in g} C_i,p(i) with C_ia = (1 + lam) K_ii L_aa + 2 sum_{h != g} k_ih l_ah, where
  k_ih = sum_{j in h} K_ij and l_ah = mean_{b in h} L_ab (the cross-group terms averaged over p_h).
  Var Q (Mantel 1967; here from S_m's action on symmetric zero-diagonal matrices, multiplicity free:
  trivial + standard (dim m - 1) + S^(m-2,2) (dim m(m-3)/2)): |A_std|^2 |B_std|^2 / (m - 1) +
  |A~|^2 |B~|^2 / (m(m-3)/2), with |A_std|^2 = 2 sum_i (r_i - rbar)^2 / (m - 2) from the within-group
  off-diagonal row sums r, and |A~|^2 the rest of |A_offdiag|^2 after the mean's S^2 / (m(m-1)).
  Var Lin = |C double-centred|^2 / (m - 1) (Hoeffding 1951). Cov(Q, Lin) from the moments of one, two and
  three distinct images: 2 r_A'C r_B / (m(m-1)) + (S_A 1 - 2 r_A)'C(S_B 1 - 2 r_B) / (m(m-1)(m-2))
  - S_A S_B 1'C1 / (m^2 (m-1)).
C = U_g D_g V_g' is low rank (U_g = [K_ii | k_ih], G + 1 columns), so every term of F_g needs only each
representation's per-group (G+1)^2 Gram of U, its sums and its products with r: `Summary`, computed once
per representation and set of groups, O(n d^2 + G^2 d^2) from features (no n x n matrix) or O(n^2 G) from
a Gram matrix. The pair's variance is then O(G^3).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Above this many rows a block's largest |eigenvalue| is bounded by its Frobenius norm instead of computed.
_EIGEN_MAX = 2048
# From this many rows `_top` finds the largest |eigenvalue| by Lanczos iteration instead of the whole spectrum (measured
# on 2 cores, a decaying spectrum: 100 rows 0.52 ms against 0.41, 150 0.84 against 1.04, 256 0.74 against 3.1, 768 3.2
# against 46).
_LANCZOS_MIN = 128
# Columns of the within-group scatter matrices per step when summing their pairwise inner products:
# G x d x _SCATTER_COLUMNS float64 values at a time (G = 100, d = 768: 39 MB).
_SCATTER_COLUMNS = 64
# Bytes of float64 rows `gram_summary` converts at a time.
_TILE_BYTES = 2**25


@dataclass(frozen=True)
class Summary:
    """What the permutation variance needs of one symmetric matrix K (or of features X, K = XX') and groups
    (G groups, `sizes` [G]): per group g, with U_g = [K_ii | k_i1 .. k_iG] (i in g; k_ih = sum_{j in h} K_ij):
    `gram` [G, G+1, G+1] = U_g'U_g, `sums` [G, G+1] = U_g'1, `rows` [G, G+1] = U_g'r (r_i = sum_{j in g, j != i}
    K_ij), `total` [G] = sum_{i in g} r_i, `standard` [G] = |A_std|^2 and `rest` [G] = |A~|^2 of the group's
    off-diagonal block (module docstring), `between` [G, G] = |K~_gh|^2, its blocks double-centred, and `top`
    [G]: the largest |eigenvalue| of each diagonal block double-centred, C_g K_gg C_g (for features, of the
    scatter X~_g'X~_g of the rows centred within their group), or an upper bound on it (`largest_weight`)."""

    sizes: torch.Tensor
    gram: torch.Tensor
    sums: torch.Tensor
    rows: torch.Tensor
    total: torch.Tensor
    standard: torch.Tensor
    rest: torch.Tensor
    between: torch.Tensor
    top: torch.Tensor


def group_codes(groups, n: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Labels 0..G-1 per row (one group without `groups`) and the group sizes [G] (float64), on `device`."""
    if groups is None:
        codes = torch.zeros(n, dtype=torch.long)
    else:
        codes = torch.unique(torch.as_tensor(np.asarray(groups)).reshape(-1), return_inverse=True)[1]
        if codes.numel() != n:
            raise ValueError(f"groups has {codes.numel()} labels for {n} examples")
    return codes.to(device), torch.bincount(codes).double().to(device)


def _top(block: torch.Tensor) -> torch.Tensor:
    """The largest |eigenvalue| of a symmetric block (its Frobenius norm, an upper bound, above `_EIGEN_MAX` rows). From
    `_LANCZOS_MIN` rows on the CPU by Lanczos iteration to machine precision (ARPACK's `eigsh`, a fixed start: the
    same value each time; the whole spectrum where it fails, as for a zero block): the one-group null's d x d scatter at
    d = 768 in 3 ms instead of 46 (the same value to about 1e-15, `tests/test_moments.py`)."""
    if len(block) == 0:
        return block.new_zeros(())
    if len(block) > _EIGEN_MAX:
        return torch.linalg.matrix_norm(block)
    if len(block) >= _LANCZOS_MIN and block.device.type == "cpu":
        from scipy.sparse.linalg import ArpackError, eigsh

        start = np.random.default_rng(0).standard_normal(len(block))  # not the ones vector: double-centred blocks annul it
        symmetric = (block.double() + block.double().mT) / 2  # products' mirror entries may differ in their last bits
        try:
            value = eigsh(symmetric.numpy(), k=1, which="LM", return_eigenvectors=False, tol=0, v0=start)[0]
            return torch.tensor(abs(float(value)), dtype=torch.float64)
        except ArpackError:  # no convergence, or no Krylov space at all (a zero block)
            pass
    return torch.linalg.eigvalsh(block).abs().max()


def _summary(u: torch.Tensor, codes: torch.Tensor, sizes: torch.Tensor, within_sq: torch.Tensor,
             between: torch.Tensor, top: torch.Tensor) -> Summary:
    """`Summary` from U [n, G+1] (diagonal, then the sums over each group) and each group's sum of squares
    over its block, diagonal included (`within_sq` [G])."""
    count = len(sizes)
    diagonal = u[:, 0]
    r = u[torch.arange(len(codes), device=u.device), 1 + codes] - diagonal  # within-group off-diagonal row sums
    order = torch.argsort(codes, stable=True)
    gram = torch.stack([part.mT @ part for part in torch.split(u[order], sizes.long().tolist())])
    sums = u.new_zeros(count, u.shape[1]).index_add_(0, codes, u)
    rows = u.new_zeros(count, u.shape[1]).index_add_(0, codes, r[:, None] * u)
    total = r.new_zeros(count).index_add_(0, codes, r)
    r_sq = r.new_zeros(count).index_add_(0, codes, r.square())
    off_sq = within_sq - r.new_zeros(count).index_add_(0, codes, diagonal.square())
    m = sizes
    standard = torch.where(m > 2, 2 * (r_sq - total.square() / m) / (m - 2).clamp_min(1), 0.0)
    mean_sq = torch.where(m > 1, total.square() / (m * (m - 1)).clamp_min(1), 0.0)
    rest = torch.where(m > 3, (off_sq - mean_sq - standard).clamp_min(0), 0.0)
    return Summary(sizes, gram, sums, rows, total, standard.clamp_min(0), rest, between, top)


def _group_terms(p: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One group's sum of squares of its block of K = XX' (diagonal included) and the largest eigenvalue of the block
    double-centred, from its rows p [m, d] (c: the same centred within the group): with m < d from the m x m Gram
    pp', the double-centred block being C pp' C = cc' (one m^2 d product for both); else from the d x d p'p and
    c'c (the same nonzero eigenvalues)."""
    m, d = p.shape
    if m < d:
        gram = p @ p.mT
        return gram.square().sum(), _top(gram - gram.mean(0, keepdim=True) - gram.mean(1, keepdim=True) + gram.mean())
    # one d x d product for both: with mu the group's mean, p'p = c'c + m mu mu', so |p'p|^2 = |c'c|^2 + 2 m mu'c'c mu
    # + m^2 |mu|^4 (each term non-negative: no cancellation)
    scatter, mu = c.mT @ c, p.mean(0)
    return scatter.square().sum() + 2 * m * (mu @ scatter @ mu) + m * m * mu.square().sum().square(), _top(scatter)


def feature_summary(xc: torch.Tensor, groups=None) -> Summary:
    """`Summary` of K = XX' for features xc [n, d] centred over the examples, without an n x n matrix."""
    xc = xc.double()
    n, d = xc.shape
    codes, sizes = group_codes(groups, n, xc.device)
    count = len(sizes)
    group_sums = xc.new_zeros(count, d).index_add_(0, codes, xc)  # s_h
    u = torch.cat([xc.square().sum(-1, keepdim=True), xc @ group_sums.mT], dim=1)
    order = torch.argsort(codes, stable=True)
    parts = torch.split(xc[order], sizes.long().tolist())
    centred = [p - p.mean(0, keepdim=True) for p in parts]  # rows centred within their group: X~_g
    within_sq, top = (torch.stack(values) for values in zip(*(_group_terms(p, c) for p, c in zip(parts, centred))))
    between = xc.new_zeros(count, count)
    if count > 1:  # <S_g, S_h>, S_g = X~_g'X~_g, summed over column blocks J of S: each symmetric S's square block
        # S[J, J] once and the rows below it, S[J+, J], twice (their mirror above the diagonal): half of S's products
        for start in range(0, d, _SCATTER_COLUMNS):
            stop = min(d, start + _SCATTER_COLUMNS)
            below = [c.mT[start:] @ c[:, start:stop] for c in centred]  # rows start.. of S[:, J]
            square = torch.stack([b[:stop - start].reshape(-1) for b in below])
            rest = torch.stack([b[stop - start:].reshape(-1) for b in below])
            between += square @ square.mT + 2 * (rest @ rest.mT)
    return _summary(u, codes, sizes, within_sq, between, top)


def gram_summary(k: torch.Tensor, groups=None) -> Summary:
    """`Summary` of a symmetric n x n matrix k (a centred RBF kernel, a Mantel test's centred rank matrix; float64,
    or float32 holding exact values), read a tile of rows at a time in float64: no n x n temporary (two of
    200 MB at n = 5,000 for the squares and a float64 copy)."""
    n = k.shape[-1]
    codes, sizes = group_codes(groups, n, k.device)
    count = len(sizes)
    sums = torch.zeros(n, count, dtype=torch.float64, device=k.device)  # k_ih
    row_squares = torch.zeros(n, count, dtype=torch.float64, device=k.device)  # sum_{j in h} k_ij^2
    rows = max(1, _TILE_BYTES // (8 * n))
    for start in range(0, n, rows):
        tile = k[start:start + rows].to(torch.float64, copy=True)  # squared in place below
        sums[start:start + rows].index_add_(1, codes, tile)
        row_squares[start:start + rows].index_add_(1, codes, tile.square_())
    u = torch.cat([k.diagonal().double()[:, None], sums], dim=1)
    squares = sums.new_zeros(count, count).index_add_(0, codes, row_squares)
    blocks = sums.new_zeros(count, count).index_add_(0, codes, sums)  # S_gh
    # |K_gh double-centred|^2 = sum K^2 - sum_i k_ih^2 / m_h - sum_j k_jg^2 / m_g + S_gh^2 / (m_g m_h)
    row_sq = sums.new_zeros(count, count).index_add_(0, codes, sums.square())  # [g, h] = sum_{i in g} k_ih^2
    between = squares - row_sq / sizes[None, :] - row_sq.mT / sizes[:, None] + blocks.square() / (sizes[:, None] * sizes[None, :])
    order = torch.argsort(codes, stable=True)
    top = []
    for index in torch.split(order, sizes.long().tolist()):
        block = k[index][:, index].double()
        top.append(_top(block - block.mean(0, keepdim=True) - block.mean(1, keepdim=True) + block.mean()))
    return _summary(u, codes, sizes, squares.diagonal().clone(), between.clamp_min(0), torch.stack(top))


def mean(a: Summary, b: Summary, lam: float = 0.0) -> torch.Tensor:
    """E T(p) for T as in `variance` (`xlsub.similarity.permutation.cka_null_mean`'s sums, from the summaries):
    the diagonal sum_g (1 + lam) tr_g(K) tr_g(L) / m_g, the within-group off-diagonal sum_g S_A S_B / (m(m-1))
    and the between-group sum_{g != h} S_gh(K) S_gh(L) / (m_g m_h), S_gh = sum of the block. 0-dim float64."""
    m = a.sizes
    count = len(m)
    diagonal = (1.0 + lam) * a.sums[:, 0] * b.sums[:, 0] / m
    within = torch.where(m > 1, a.total * b.total / (m * (m - 1)).clamp_min(1), 0.0)
    blocks = a.sums[:, 1:] * b.sums[:, 1:] / (m[:, None] * m[None, :])
    between = blocks.sum() - blocks.diagonal().sum() if count > 1 else blocks.new_zeros(())
    return diagonal.sum() + within.sum() + between


def variance(a: Summary, b: Summary, lam: float = 0.0) -> torch.Tensor:
    """Var T(p) for T = sum_ij K_ij L_p(i)p(j) + lam sum_i K_ii L_p(i)p(i), K summarised by `a`, L by `b` at the
    same groups, p uniform within groups (module docstring). 0-dim float64."""
    m = a.sizes
    count = len(m)
    weights = torch.cat([m.new_tensor([1.0 + lam]), 2.0 / m])
    d = weights.expand(count, count + 1).clone()
    d[torch.arange(count, device=m.device), 1 + torch.arange(count, device=m.device)] = 0.0  # the group's own column: inside Q, not Lin
    total = (a.sums * d * b.sums).sum(-1)  # 1'C1
    db, da = d * b.sums, d * a.sums
    row_sq = torch.einsum("gk,gkl,gl->g", db, a.gram, db)  # |C1|^2
    col_sq = torch.einsum("gk,gkl,gl->g", da, b.gram, da)  # |C'1|^2
    c_sq = (d[:, :, None] * a.gram * d[:, None, :] * b.gram).sum((-2, -1))  # |C|^2
    one = m > 1
    safe = m.clamp_min(1)
    var_lin = torch.where(one, (c_sq - row_sq / safe - col_sq / safe + total.square() / safe.square()) / (m - 1).clamp_min(1), 0.0)
    var_q = torch.where(m > 2, a.standard * b.standard / (m - 1).clamp_min(1), 0.0) \
        + torch.where(m > 3, 2 * a.rest * b.rest / (m * (m - 3)).clamp_min(1), 0.0)
    first = 2 * (a.rows * d * b.rows).sum(-1) / (m * (m - 1)).clamp_min(1)
    spread_a, spread_b = a.total[:, None] * a.sums - 2 * a.rows, b.total[:, None] * b.sums - 2 * b.rows
    second = torch.where(m > 2, (spread_a * d * spread_b).sum(-1) / (m * (m - 1) * (m - 2)).clamp_min(1), 0.0)
    third = a.total * b.total * total / (m.square() * (m - 1)).clamp_min(1)
    cov = torch.where(one, first + second - third, 0.0)
    within = (var_q + var_lin + 2 * cov).sum()
    inverse = torch.where(one, 1.0 / (m - 1).clamp_min(1), 0.0)
    pairs = a.between * b.between * inverse[:, None] * inverse[None, :]
    between = 2 * (pairs.sum() - pairs.diagonal().sum())  # 4 sum_{g < h}
    return (within + between).clamp_min(0)


def largest_weight(a: Summary, b: Summary) -> torch.Tensor:
    """An upper bound on the largest weight of T's quadratic part: with rows centred within groups, T =
    |M_0 + N|^2 for linear kernels, N = sum_g Y~_g'P_g X~_g, and vec N has the exact covariance
    sum_g (S^Y_g (x) S^X_g) / (m_g - 1) (S_g = X~_g'X~_g; Cov(a'Pb, c'Pd) = (a.c)(b.d) / (m - 1) for centred
    vectors). Its largest eigenvalue is at most sum_g top_g(K) top_g(L) / (m_g - 1). 0-dim float64."""
    m = a.sizes
    return torch.where(m > 1, a.top * b.top / (m - 1).clamp_min(1), 0.0).sum()


def mantel_moments(a: torch.Tensor, bs, norms: torch.Tensor, groups=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Mantel r's exact permutation mean, standard deviation and largest-weight bound (`mean`, `variance`,
    `largest_weight` divided by the r's denominators `norms` [m]) of one centred matrix a [n, n] against each of
    bs ([m, n, n], or m such matrices), p uniform within `groups`: what `tail_bound_decided` needs, each [m]."""
    reference = gram_summary(a, groups)
    summaries = [gram_summary(b, groups) for b in bs]
    mean_ = torch.stack([mean(reference, one) for one in summaries]) / norms
    sd = torch.stack([variance(reference, one).sqrt() for one in summaries]) / norms
    weight = torch.stack([largest_weight(reference, one) for one in summaries]) / norms
    return mean_, sd, weight
