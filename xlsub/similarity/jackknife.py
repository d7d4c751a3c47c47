"""Delete-a-block jackknife confidence intervals for CKA (issue 12).

`cka_jackknife_interval`: the grouped jackknife (Efron & Tibshirani 1993, 11.5) over blocks of sentences,
with the leave-one-block-out CKA computed from per-block sums of the HSIC terms (Song et al. 2012, eq. 5).
Resampling rows with replacement duplicates rows and inflates CKA, so no bootstrap.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from scipy import stats

from xlsub.errors import XlsubError
from xlsub.similarity import moments
from xlsub.similarity.cka import HSIC_RTOL, centre, check_options, cka, ratio, sq_frob


class Interval(NamedTuple):
    """An estimate and the bounds of its confidence interval, each [...] float64."""

    estimate: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor


def jackknife_blocks(n: int, blocks: int, seed: int | None = None) -> torch.Tensor:
    """The block (0..blocks-1) of each of n examples: contiguous runs, or a seeded random split.

    Block sizes differ by at most one (the first n % blocks blocks have one more example). With a `seed`,
    the examples are assigned by a random permutation, so that blocks do not follow the corpus order.
    """
    if not 2 <= blocks <= n:
        raise XlsubError(f"jackknife: blocks must be between 2 and the number of sentences ({n}), got {blocks}")
    sizes = [n // blocks + (b < n % blocks) for b in range(blocks)]
    labels = torch.repeat_interleave(torch.arange(blocks), torch.tensor(sizes))
    if seed is None:
        return labels
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out = torch.empty(n, dtype=torch.long)
    out[order] = labels
    return out


# The axis of the block index in each `_moments` sum: before A's two axes and the vectors' one.
_BLOCK_AXIS = {"A": -3, "su": -2, "sv": -2, "wu": -2, "wv": -2}


def _moments(u: torch.Tensor, v: torch.Tensor, blocks: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-block sums for the HSIC of u [..., n, du], v [..., n, dv] on any union of blocks (rows `blocks[b]`).

    A = sum u_i v_i' [..., B, du, dv], s_u = sum u_i, s_v [..., B, d], q_u = sum |u_i|^2, q_v,
    w_u = sum |v_i|^2 u_i, w_v = sum |u_i|^2 v_i [..., B, d], m = sum |u_i|^2 |v_i|^2, and the count n [B]:
    every term of biased and unbiased HSIC on a subset of rows is a function of these sums, which are
    additive over blocks.
    """
    rows = []
    for index in blocks:
        ub, vb = u[..., index, :], v[..., index, :]
        ru, rv = ub.square().sum(-1), vb.square().sum(-1)
        rows.append({
            "A": ub.mT @ vb, "su": ub.sum(-2), "sv": vb.sum(-2), "qu": ru.sum(-1), "qv": rv.sum(-1),
            "wu": (ub * rv[..., None]).sum(-2), "wv": (vb * ru[..., None]).sum(-2), "m": (ru * rv).sum(-1),
            "n": torch.tensor(float(len(index)), dtype=torch.float64),
        })
    return {key: torch.stack([r[key] for r in rows], dim=_BLOCK_AXIS.get(key, -1)) for key in rows[0]}


def _hsic_from_moments(t: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """HSIC (up to a factor that cancels in CKA) of the rows the sums `t` cover (Song et al. 2012, eq. 5).

    linear: ||A - s_u s_v' / n||_F^2, the cross-covariance of the rows re-centred on their own mean.
    debiased, on the raw kernel (HSIC_1 needs no centring): tr(K~L~) = ||A||^2 - m, 1'K~1 = |s_u|^2 - q_u,
    1'K~L~1 = s_u'A s_v - s_u.w_u - s_v.w_v + m.
    """
    n = t["n"]
    if kind == "linear":
        return sq_frob(t["A"] - t["su"][..., :, None] * t["sv"][..., None, :] / n[..., None, None])
    tr_kl = sq_frob(t["A"]) - t["m"]
    ones_k = t["su"].square().sum(-1) - t["qu"]
    ones_l = t["sv"].square().sum(-1) - t["qv"]
    ones_kl = (torch.einsum("...i,...ij,...j->...", t["su"], t["A"], t["sv"])
               - (t["su"] * t["wu"]).sum(-1) - (t["sv"] * t["wv"]).sum(-1) + t["m"])
    return tr_kl + ones_k * ones_l / ((n - 1) * (n - 2)) - 2 / (n - 2) * ones_kl


def leave_block_out_cka(x: torch.Tensor, y: torch.Tensor, blocks: torch.Tensor,
                        kind: str = "debiased") -> torch.Tensor:
    """CKA on all examples but block b, for every block b of `blocks` (labels 0..B-1 per example), [..., B].

    Linear and debiased: from per-block sums (`_moments`), total minus block, with x and y first centred
    on all examples (CKA is translation invariant; this keeps the raw sums small, so the re-centring on
    the kept rows does not cancel). One pass over the data, then O(d1 d2) per block. rbf (its bandwidth
    depends on the rows kept): recomputed per block.
    """
    check_options(kind)
    blocks = torch.as_tensor(blocks, dtype=torch.long)
    count = int(blocks.max()) + 1
    if x.dim() > 2:
        # one layer at a time: the per-block d1 x d2 moments of all 13 layers at d=768 would take ~4 GB
        lead = x.shape[:-2]
        pairs = zip(x.reshape(-1, *x.shape[-2:]), y.reshape(-1, *y.shape[-2:]))
        return torch.stack([leave_block_out_cka(a, b, blocks, kind) for a, b in pairs]).reshape(*lead, count)
    if kind == "rbf":
        return torch.stack([cka(x[..., blocks != b, :], y[..., blocks != b, :], kind) for b in range(count)], -1)
    hsic = _leave_block_out_hsic(x, y, blocks, kind)
    return ratio(hsic["xy"], hsic["xx"], hsic["yy"])


def _leave_block_out_hsic(x: torch.Tensor, y: torch.Tensor, blocks: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
    """HSIC(K, L), HSIC(K, K), HSIC(L, L) (`xy`, `xx`, `yy`, each [B]) on all examples but block b, for x [n, d1],
    y [n, d2] and linear or debiased kernels, on `xlsub.similarity.cka.prepare`'s scale."""
    count = int(blocks.max()) + 1
    members = [(blocks == b).nonzero().reshape(-1) for b in range(count)]
    if kind == "debiased" and len(blocks) - max(len(m) for m in members) < 4:
        raise ValueError("debiased CKA needs at least 4 examples left out of every block")
    xc, yc = centre(x)[0], centre(y)[0]
    hsic = {}
    for name, (u, v) in {"xy": (xc, yc), "xx": (xc, xc), "yy": (yc, yc)}.items():
        per_block = _moments(u, v, members)
        kept = {key: value.sum(_BLOCK_AXIS.get(key, -1), keepdim=True) - value  # total minus the block
                for key, value in per_block.items()}
        value = _hsic_from_moments(kept, kind)
        if name != "xy":
            # as in xlsub.similarity.cka.prepare: a self term that is zero up to rounding is zero (CKA NaN)
            scale = kept["qu"] - kept["su"].square().sum(-1) / kept["n"]  # sum of re-centred squared norms
            floor = HSIC_RTOL * scale.square() if kind == "debiased" else 0.0
            value = torch.where(value <= floor, 0.0, value)
        hsic[name] = value
    return hsic


def leave_block_out_above_chance(x: torch.Tensor, y: torch.Tensor, blocks: torch.Tensor, kind: str = "debiased",
                                 groups=None) -> torch.Tensor:
    """CKA minus its exact permutation null mean, both on all examples but block b, for every block b, [B]
    (x [n, d1], y [n, d2]): the jackknife values of `xlsub.similarity.permutation.cka_null_mean`'s "CKA above
    chance" with the re-pairings within `groups` restricted to the kept examples.

    Linear and debiased: the null mean's terms (`cka_null_mean`: per group its size, the sum of |x_i|^2 and the
    sum of x_i, re-centred on the kept examples' mean) from per-(block, group) sums, total minus the block:
    one pass over the data and O(G^2 d) per block, instead of recomputing both representations' statistics
    for each of the B subsets. rbf (its bandwidth depends on the rows kept): recomputed per block."""
    from xlsub.similarity.permutation import cka_null_mean  # permutation builds on this module's neighbours

    check_options(kind)
    blocks = torch.as_tensor(blocks, dtype=torch.long)
    count = int(blocks.max()) + 1
    n = x.shape[-2]
    codes = moments.group_codes(groups, n)[0]
    if kind == "rbf":
        return torch.stack([cka(x[blocks != b], y[blocks != b], kind) - cka_null_mean(x[blocks != b], y[blocks != b], kind, codes[blocks != b])
                            for b in range(count)])
    hsic = _leave_block_out_hsic(x, y, blocks, kind)
    cell = blocks * (int(codes.max()) + 1) + codes  # (block, group)
    cells = count * (int(codes.max()) + 1)

    def kept_sums(v: torch.Tensor):
        """Per block b, per group: the count, sum |v_i - mu_b|^2 and sum (v_i - mu_b) over the kept rows, mu_b their mean."""
        vc = centre(v)[0]
        size = torch.zeros(cells, dtype=torch.float64).index_add_(0, cell, torch.ones(n, dtype=torch.float64)).reshape(count, -1)
        sq = torch.zeros(cells, dtype=torch.float64).index_add_(0, cell, vc.square().sum(-1)).reshape(count, -1)
        sums = torch.zeros(cells, vc.shape[-1], dtype=torch.float64).index_add_(0, cell, vc).reshape(count, -1, vc.shape[-1])
        size, sq, sums = size.sum(0) - size, sq.sum(0) - sq, sums.sum(0) - sums  # [B, G], [B, G], [B, G, d]
        kept = size.sum(-1)  # [B]
        mu = sums.sum(1) / kept[:, None]  # [B, d]
        trace = sq - 2 * (sums * mu[:, None, :]).sum(-1) + size * mu.square().sum(-1)[:, None]  # sum over the group of |v - mu|^2
        return size, trace, sums - size[..., None] * mu[:, None, :], kept

    size, tr_k, s_x, kept = kept_sums(x)
    _, tr_l, s_y, _ = kept_sums(y)
    present = size > 0
    safe = size.clamp_min(1)
    diagonal = torch.where(present, tr_k * tr_l / safe, 0.0).sum(-1)
    block_k, block_l = s_x @ s_x.mT, s_y @ s_y.mT  # [B, G, G]
    same_k, same_l = block_k.diagonal(dim1=-2, dim2=-1), block_l.diagonal(dim1=-2, dim2=-1)
    pairs = size * (size - 1)
    within = torch.where(pairs > 0, (same_k - tr_k) * (same_l - tr_l) / pairs.clamp_min(1), 0.0).sum(-1)
    between = ((block_k * block_l / (safe[..., :, None] * safe[..., None, :])).sum((-2, -1))
               - torch.where(present, same_k * same_l / safe.square(), 0.0).sum(-1))
    expected = diagonal + within + between
    if kind == "debiased":
        expected = expected - kept / (kept - 2) * diagonal + tr_k.sum(-1) * tr_l.sum(-1) / ((kept - 1) * (kept - 2))
    return ratio(hsic["xy"], hsic["xx"], hsic["yy"]) - ratio(expected, hsic["xx"], hsic["yy"])


def cka_jackknife_interval(x: torch.Tensor, y: torch.Tensor, kind: str = "debiased", blocks: int = 20,
                           level: float = 0.95, seed: int | None = None) -> Interval:
    """Delete-a-block jackknife confidence interval for CKA: (estimate, lo, hi), each [...].

    The n examples are split into `blocks` blocks (`jackknife_blocks`: contiguous, or random with a
    `seed`); theta_b is the CKA without block b (`leave_block_out_cka`). SE = sqrt((B-1)/B sum_b (theta_b -
    mean theta)^2) (the grouped jackknife; Efron & Tibshirani 1993, 11.5), and the interval is estimate +-
    t_{B-1, (1+level)/2} SE, with estimate the CKA on all n examples (not bias-corrected). No example is
    ever duplicated, unlike a bootstrap, which inflates CKA.
    """
    if not 0 < level < 1:
        raise XlsubError(f"jackknife: level must be between 0 and 1 (e.g. 0.95), got {level}")
    labels = jackknife_blocks(x.shape[-2], blocks, seed)
    theta = leave_block_out_cka(x, y, labels, kind)
    se = ((blocks - 1) / blocks * (theta - theta.mean(-1, keepdim=True)).square().sum(-1)).sqrt()
    estimate = cka(x, y, kind)
    half = float(stats.t.ppf((1 + level) / 2, blocks - 1)) * se
    return Interval(estimate, estimate - half, estimate + half)
