"""Eigenvector similarity of nearest-neighbour graphs (Søgaard, Ruder & Vulić 2018; issue 12).

`knn_eigen_similarity` compares the Laplacian spectra of the two languages' kNN graphs: how close to
isomorphic the two point clouds are, whatever the pairing. `subsample_eigen_similarity` recomputes it on
random halves of the sentences for an interval: the statistic does not depend on the pairing, so there
is no pairing null to test it against, only the spread over which sentences are in the sample and the
comparison with a control model on the same sentences.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch

from xlsub.errors import XlsubError
from xlsub.similarity.retrieval import unit_rows
from xlsub.similarity.rsa import symmetric_products
from xlsub.stats import inference
from xlsub.stats.workers import side_by_side

# How many of the largest Laplacian eigenvalues the similarity compares. The paper's rule (the fewest
# largest eigenvalues holding 90% of the spectrum's sum, `energy_count`) keeps 851-864 of 1,077 on the
# demo (k = 10): a kNN graph's Laplacian spectrum is flat (every eigenvalue lies between 0 and twice the
# largest degree, and the sum is twice the edges), so the rule compares nearly the whole spectrum, i.e. the
# degree sequence, and its count grows with n, so a subsample and the full sample sum different numbers
# of terms. A fixed, small count compares the same terms at every n and for every model: the leading
# eigenvalues, set by the hubs and densest neighbourhoods, which the rule meant to emphasise. The sum is
# dominated by its first terms anyway (on the demo the 10 largest give 30-90% of the 90%-rule value and
# rank the models alike), and the 10 largest of a sparse Laplacian take a few milliseconds (Lanczos).
TOP_EIGENVALUES = 10
# Subsampling: random halves of the sentences (m = n // 2), the same half for every language and model.
SUBSAMPLE_FRACTION = 0.5
# Up to this many sentences the spectrum is taken densely; above it the `top` largest by Lanczos (ARPACK).
_DENSE_MAX = 256


def knn_laplacian(x: torch.Tensor, k: int = 10, centre: bool = True) -> scipy.sparse.csr_matrix:
    """The Laplacian L = D - A of the symmetric k-nearest-neighbour graph of x [n, d], sparse (float64).

    Neighbours by cosine similarity (after centring on the mean, as for retrieval, unless `centre` is
    False); i and j are joined when either is among the other's k nearest (unweighted).
    """
    return _laplacian(symmetric_products(unit_rows(x, centre)), k)


def gram_cosines(gram: torch.Tensor, centre: bool = True) -> torch.Tensor:
    """The cosine similarities of vectors given by their Gram matrix [m, m] (float64), each centred on the
    vectors' mean first if `centre`: the matrix `knn_laplacian` computes from the vectors themselves, from
    (x - mu)(x - mu)' = G - g 1' - 1 g' + mean(g) with g the row means of G. A subsample's block of the full
    sample's Gram gives its graph without another n x d product. Zero vectors have similarity 0."""
    return _gram_cosines_(gram.to(torch.float64, copy=True), centre)


def _gram_cosines_(g: torch.Tensor, centre: bool) -> torch.Tensor:
    """`gram_cosines` written over g (float64, the caller's own copy)."""
    if centre:
        row = g.mean(1)
        g.sub_(row[:, None]).sub_(row[None, :]).add_(row.mean())
    norms = g.diagonal().clamp_min(0).sqrt().clamp_min(torch.finfo(torch.float64).tiny)
    return g.div_(norms[:, None]).div_(norms[None, :])


def _check_k(k: int, n: int) -> None:
    if not 1 <= k < n:
        raise XlsubError(f"knn graph: k must be between 1 and the number of sentences - 1 ({n - 1}), got {k}")


def _laplacian(sim: torch.Tensor, k: int) -> scipy.sparse.csr_matrix:
    """`knn_laplacian` from the similarities [n, n] (overwritten: the diagonal is set to -inf)."""
    _check_k(k, sim.shape[0])
    sim.fill_diagonal_(-math.inf)
    return _graph(sim.topk(k, dim=1).indices.cpu().numpy())


def _compiled_gram(gram: torch.Tensor) -> bool:
    """Whether `_gram_laplacian` reads `gram` by its compiled loops: a contiguous float64 matrix on the CPU."""
    return inference.on_cpu(gram) and gram.dtype == torch.float64 and gram.is_contiguous()


def _gram_laplacian(gram: torch.Tensor, index: torch.Tensor | None, k: int, centre: bool,
                    means: torch.Tensor | None = None) -> scipy.sparse.csr_matrix:
    """`knn_laplacian` of the vectors `index` picks (None: all) from their Gram matrix `gram` [n, n] (float64, left
    unchanged): `_laplacian(gram_cosines(gram[index][:, index], centre), k)`. On the CPU by compiled loops that read
    the block where it lies (`xlsub.similarity.compiled_knn`: the same cosines up to the rounding of the row means, no
    m x m copy), the rows in parts side by side where torch has several threads; `means`: the block's row means [m]
    where the caller has them (else a pass over the block sums them)."""
    if not _compiled_gram(gram):
        block = gram.to(torch.float64, copy=True) if index is None else gram[index[:, None], index].to(torch.float64)
        return _laplacian(_gram_cosines_(block, centre), k)
    from xlsub.similarity import compiled_knn  # numba, imported where it is used

    rows = (torch.arange(gram.shape[0]) if index is None else index.cpu()).numpy()
    m = len(rows)
    _check_k(k, m)
    values = gram.numpy()
    if not centre:
        means = np.zeros(m)
    elif means is None:
        means = np.empty(m)
        compiled_knn.row_means(values, rows, means)
    else:
        means = means.to(torch.float64).contiguous().numpy()
    grand = float(means.mean()) if centre else 0.0
    out = np.empty((m, k), dtype=np.int64)
    parts = np.linspace(0, m, max(1, min(torch.get_num_threads(), m)) + 1).astype(np.int64)
    side_by_side(lambda t: compiled_knn.nearest(values, rows, means, grand, centre, k, int(parts[t]), int(parts[t + 1]), out),
                 range(len(parts) - 1))
    return _graph(out)


def _graph(neighbours: np.ndarray) -> scipy.sparse.csr_matrix:
    """The Laplacian D - A of the symmetric graph joining each row i to its neighbours[i] [n, k] (either direction: one
    unweighted edge)."""
    n, k = neighbours.shape
    rows = np.repeat(np.arange(n), k)
    directed = scipy.sparse.csr_matrix((np.ones(n * k), (rows, neighbours.reshape(-1))), shape=(n, n))
    adjacency = ((directed + directed.T) > 0).astype(np.float64)  # either direction: one unweighted edge
    return (scipy.sparse.diags(np.asarray(adjacency.sum(1)).reshape(-1)) - adjacency).tocsr()


def knn_laplacian_spectrum(x: torch.Tensor, k: int = 10, centre: bool = True, top: int | None = None) -> torch.Tensor:
    """Laplacian eigenvalues, largest first, of the kNN graph of x [n, d] (`knn_laplacian`), float64.

    All n of them, or with `top` only the `top` largest: dense for n <= 256 (or when `top` is most of
    the spectrum), else by Lanczos (scipy's ARPACK `eigsh`, a fixed start vector, so repeatable).
    """
    return _spectrum(knn_laplacian(x, k, centre), top)


def _spectrum(laplacian: scipy.sparse.csr_matrix, top: int | None) -> torch.Tensor:
    n = laplacian.shape[0]
    count = n if top is None else min(top, n)
    if n <= _DENSE_MAX or 2 * count >= n:
        return torch.linalg.eigvalsh(torch.from_numpy(laplacian.toarray())).flip(0)[:count]
    start = np.random.default_rng(0).standard_normal(n)  # never orthogonal to the top eigenvectors in practice
    values = scipy.sparse.linalg.eigsh(laplacian, k=count, which="LA", return_eigenvectors=False, v0=start, tol=1e-10)
    return torch.from_numpy(np.sort(values)[::-1].copy())


def energy_count(spectrum: torch.Tensor, energy: float) -> int:
    """The smallest k whose k largest eigenvalues (`spectrum`, largest first) hold at least `energy` of their sum."""
    total = float(spectrum.sum())
    if total <= 0:
        return len(spectrum)
    return int((torch.cumsum(spectrum, 0) < energy * total).sum()) + 1


def spectrum_distance(lx: torch.Tensor, ly: torch.Tensor, top: int | None = TOP_EIGENVALUES) -> torch.Tensor:
    """sum_{i <= top} (lambda_i(x) - lambda_i(y))^2 over the leading entries of spectra [..., >= top], largest
    first: [...]. `top` None: all the entries both have."""
    count = min(lx.shape[-1], ly.shape[-1]) if top is None else min(top, lx.shape[-1], ly.shape[-1])
    return (lx[..., :count] - ly[..., :count]).square().sum(-1)


def knn_eigen_similarity(x: torch.Tensor, y: torch.Tensor, k: int = 10, top: int | None = TOP_EIGENVALUES,
                         centre: bool = True, energy: float | None = None) -> float:
    """Eigenvector similarity of the kNN graphs of x and y (Søgaard, Ruder & Vulić 2018, section 4.3).

    sum_{i <= k'} (lambda_i(x) - lambda_i(y))^2 over the largest Laplacian eigenvalues of the two graphs
    (`knn_laplacian_spectrum`), with k' = `top` (`TOP_EIGENVALUES`, see there why a fixed count), or with
    `energy` the paper's rule: the smaller of the two counts of largest eigenvalues that hold that share
    (0.9 in the paper) of their spectrum's sum (`energy_count`). 0 for isomorphic graphs (e.g. the same
    points rotated or rescaled); larger = less isomorphic. Not a statistic of the pairing: it compares
    the two point clouds' shapes, so x and y need not be parallel or of the same size.
    """
    if energy is not None:
        lx, ly = knn_laplacian_spectrum(x, k, centre), knn_laplacian_spectrum(y, k, centre)
        count = min(energy_count(lx, energy), energy_count(ly, energy))
    else:
        lx, ly = knn_laplacian_spectrum(x, k, centre, top), knn_laplacian_spectrum(y, k, centre, top)
        count = top
    return float(spectrum_distance(lx, ly, count))


def subsamples(n: int, count: int, seed: int, fraction: float = SUBSAMPLE_FRACTION) -> torch.Tensor:
    """`count` random subsets of m = max(2, floor(fraction n)) of range(n), without replacement, [count, m]
    (int64, each row sorted), from torch.Generator(seed): row s is the first m of a random permutation."""
    m = max(2, int(fraction * n))
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=generator)[:m].sort().values for _ in range(count)]) \
        if count else torch.empty(0, m, dtype=torch.long)


def subsample_spectra(x: torch.Tensor, subsets: torch.Tensor, k: int = 10, top: int = TOP_EIGENVALUES,
                      centre: bool = True) -> torch.Tensor:
    """The `top` largest Laplacian eigenvalues of the kNN graph of each subset of x's rows (rows of
    `subsets` [S, m]), [S, min(top, m)]: m-out-of-n subsampling (Politis, Romano & Wolf 1999) of the
    spectrum. The graph is rebuilt on the m sentences (neighbours among them, centred on their mean), from
    the subset's block of x's Gram matrix, computed once for all subsets (`gram_cosines`; on the CPU read in place
    by compiled loops, `_gram_laplacian`), the subsets side by side on the cores (`side_by_side`: the neighbour
    searches and Lanczos are memory-bound or serial)."""
    return knn_spectra(x, subsets, None, k, top, centre)[1]


def knn_spectra(x: torch.Tensor, subsets: torch.Tensor, k: int | None = 10, k_subset: int = 10, top: int = TOP_EIGENVALUES,
                centre: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(`knn_laplacian_spectrum(x, k, centre, top)`, `subsample_spectra(x, subsets, k_subset, top, centre)`) from one
    Gram matrix of x, the whole sample's graph and each subset's read from it (`_gram_laplacian`; the same graph as
    from the unit rows' products, up to rounding: neighbours tied to the last bit aside). k None: the subsets' spectra
    alone (the first is None)."""
    x64 = x.to(torch.float64)
    x64 = x64 - x64.mean(0) if centre else x64  # centred on the whole sample first: less cancellation in each subset's
    gram = symmetric_products(x64)
    del x64

    means = None
    if centre and len(subsets) and _compiled_gram(gram):  # every subset's row means by one product: row i's sum over subset s
        member = torch.zeros(gram.shape[0], len(subsets), dtype=torch.float64)
        member[subsets.cpu(), torch.arange(len(subsets))[:, None]] = 1.0
        means = (gram @ member) / subsets.shape[1]

    def spectrum(s: int) -> torch.Tensor:
        index = subsets[s].to(gram.device)
        return _spectrum(_gram_laplacian(gram, index, min(k_subset, len(index) - 1), centre, None if means is None else means[index, s]), top)

    parts = torch.stack(side_by_side(spectrum, range(len(subsets)))) if len(subsets) else torch.empty(0, 0, dtype=torch.float64)
    return (None if k is None else _spectrum(_gram_laplacian(gram, None, k, centre), top)), parts
