"""Compiled loops (numba) for the kNN graphs of `xlsub.similarity.isomorphism` on the CPU: each sentence's k nearest
neighbours among a subset of the sentences, read from the whole sample's Gram matrix without forming the subset's
cosine matrix.

`knn_spectra` builds a graph on each of 50 random halves of the sentences per model and language. The torch path
gathers the half's block of the Gram matrix (2,500 x 2,500 float64 at n = 5,000), centres it on the half's mean and
scales it to cosines in place, and takes each row's k largest (`topk`): about 90 ms a half on one thread, most of
it the gather's page faults and passes over the block. Here two passes over the block's entries, read where they lie
in the Gram matrix: the first sums each row (the half's row means, unless the caller has them), the second forms row
i's centred products g - r_i - r_j + mean r, each times 1 / s_j (s_j: sentence j's centred norm; row i's own 1 / s_i
scales its whole row, so it orders nothing and is left out), and keeps the row's k largest in a small sorted list.
These differ from the torch path's cosines in their last bits (the row means' summation order, one product for two
quotients): only a neighbour tied with the k-th to the last bit can differ, as between the Gram and the vectors' own
products (`knn_spectra`). Ties are broken towards the lower index. Measured side by side in
`benchmarks/isomorphism.py`.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True)
def row_means(gram: np.ndarray, index: np.ndarray, out: np.ndarray) -> None:
    """out[i] = the mean of gram[index[i], index[j]] over j: the row means of the subset's block."""
    m = len(index)
    for i in range(m):
        row = gram[index[i]]
        total = 0.0
        for j in range(m):
            total += row[index[j]]
        out[i] = total / m


@numba.njit(nogil=True, cache=True)
def nearest(gram: np.ndarray, index: np.ndarray, means: np.ndarray, grand: float, centre: bool, k: int, first: int,
            last: int, out: np.ndarray) -> None:
    """out[i, :k] for first <= i < last: the k rows j != i of the subset with the largest cosine to row i (`means`: the
    block's row means and `grand` their mean, used where `centre`), largest first."""
    m = len(index)
    inverse = np.empty(m)
    for j in range(m):
        g = gram[index[j], index[j]]
        if centre:
            g = g - means[j] - means[j] + grand
        inverse[j] = 1.0 / max(np.sqrt(max(g, 0.0)), 2.2250738585072014e-308)
    values = np.empty(k)
    found = np.empty(k, np.int64)
    for i in range(first, last):
        row = gram[index[i]]
        held = 0
        for j in range(m):
            if j == i:
                continue
            v = row[index[j]]
            if centre:
                v = v - means[i] - means[j] + grand
            v = v * inverse[j]  # row i's own scale is common to its row: it orders nothing
            if held == k and v <= values[k - 1]:
                continue
            at = held if held < k else k - 1  # insert into the sorted list (descending; an equal value stays behind)
            while at > 0 and values[at - 1] < v:
                values[at], found[at] = values[at - 1], found[at - 1]
                at -= 1
            values[at], found[at] = v, j
            if held < k:
                held += 1
        for t in range(k):
            out[i, t] = found[t]
