"""Eigenvector similarity of nearest-neighbour graphs (Søgaard, Ruder & Vulić 2018; issue 12).

`knn_eigen_similarity` compares the Laplacian spectra of the two languages' kNN graphs: how close to
isomorphic the two point clouds are, whatever the pairing.
"""

from __future__ import annotations

import math

import torch

from xlsub.errors import XlsubError
from xlsub.similarity.retrieval import unit_rows


def knn_laplacian_spectrum(x: torch.Tensor, k: int = 10, centre: bool = True) -> torch.Tensor:
    """Laplacian eigenvalues, largest first, of the symmetric k-nearest-neighbour graph of x [n, d] (float64).

    Neighbours by cosine similarity (after centring on the mean, as for retrieval, unless `centre` is
    False); i and j are joined when either is among the other's k nearest (unweighted); L = D - A.
    """
    n = x.shape[0]
    if not 1 <= k < n:
        raise XlsubError(f"knn graph: k must be between 1 and the number of sentences - 1 ({n - 1}), got {k}")
    xn = unit_rows(x, centre)
    sim = xn @ xn.T
    sim.fill_diagonal_(-math.inf)
    neighbours = sim.topk(k, dim=1).indices
    adjacency = torch.zeros(n, n, dtype=torch.float64)
    adjacency.scatter_(1, neighbours, 1.0)
    adjacency = torch.maximum(adjacency, adjacency.T)
    laplacian = torch.diag(adjacency.sum(1)) - adjacency
    return torch.linalg.eigvalsh(laplacian).flip(0)


def _energy_k(spectrum: torch.Tensor, energy: float) -> int:
    """The smallest k whose k largest eigenvalues hold at least `energy` of their sum."""
    total = float(spectrum.sum())
    if total <= 0:
        return len(spectrum)
    return int((torch.cumsum(spectrum, 0) < energy * total).sum()) + 1


def knn_eigen_similarity(x: torch.Tensor, y: torch.Tensor, k: int = 10, top: int | None = None,
                         centre: bool = True) -> float:
    """Eigenvector similarity of the kNN graphs of x and y (Søgaard, Ruder & Vulić 2018, section 4.3).

    sum_{i <= k'} (lambda_i(x) - lambda_i(y))^2 over the largest Laplacian eigenvalues of the two graphs
    (`knn_laplacian_spectrum`), with k' the smaller of the two counts of largest eigenvalues that hold 90%
    of their spectrum's sum, as in the paper; `top` fixes k' instead. 0 for isomorphic graphs (e.g. the
    same points rotated or rescaled); larger = less isomorphic. Not a statistic of the pairing: it compares
    the two point clouds' shapes, so x and y need not be parallel or of the same size.
    """
    lx, ly = knn_laplacian_spectrum(x, k, centre), knn_laplacian_spectrum(y, k, centre)
    count = min(_energy_k(lx, 0.9), _energy_k(ly, 0.9)) if top is None else min(top, len(lx), len(ly))
    return float((lx[:count] - ly[:count]).square().sum())
