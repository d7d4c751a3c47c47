"""Representational similarity analysis (Kriegeskorte et al. 2008) and its Mantel test (Mantel 1967; issue 12).

`rdm`, `rsa`: Spearman correlation of the 1 - cosine dissimilarity matrices; `mantel_test` tests it against
joint re-pairings of one RDM's rows and columns (`xlsub.stats.inference.mantel_test` on the RDMs);
`rsa_jackknife_interval`: its delete-a-block jackknife interval over sentences.
"""

from __future__ import annotations

import torch

from xlsub.similarity.jackknife import Interval, jackknife_blocks
from xlsub.similarity.permutation import permutations
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

    Representational similarity analysis (Kriegeskorte et al. 2008); ties get average ranks.
    """
    return inference.matrix_correlation(rdm(x, centre), rdm(y, centre))


def mantel_test(x: torch.Tensor, y: torch.Tensor, n_perm: int = 500, seed: int = 0, groups=None,
                centre: bool = False) -> inference.MantelResult:
    """RSA of x, y [..., n, d] against re-pairings of y: y's RDM rows and columns permuted jointly (Mantel 1967).

    `xlsub.stats.inference.mantel_test` (one-sided, "greater") on rdm(x), rdm(y): `n_perm` permutations
    `xlsub.similarity.permutation.permutations(n, n_perm, seed, groups)` (`groups`: e.g. the source
    sentences' token counts, for the length-restricted null), or all n! where that is affordable. The leading dimensions broadcast: one x
    [n, d] against several y [m, n, d] (one language against the others) permutes x's matrix once per
    permutation for all m.
    """
    sample = permutations(x.shape[-2], n_perm, seed, groups)
    return inference.mantel_test(rdm(x, centre), rdm(y, centre), sample, groups)


def leave_block_out_rsa(x: torch.Tensor, y: torch.Tensor, blocks: torch.Tensor, centre: bool = False) -> torch.Tensor:
    """RSA without the sentences of block b, for every block b of `blocks` (labels 0..B-1 per sentence),
    [..., B]: the block's rows and columns deleted from both RDMs, and the rest re-ranked."""
    blocks = torch.as_tensor(blocks, dtype=torch.long)
    dx, dy = rdm(x, centre), rdm(y, centre)
    out = []
    for b in range(int(blocks.max()) + 1):
        keep = (blocks != b).nonzero().reshape(-1)
        out.append(inference.matrix_correlation(dx[..., keep, :][..., keep], dy[..., keep, :][..., keep]))
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
