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


# The axis of the block index in each `_moments` sum other than A (whose blocks `_block_hsic` sums itself): before
# the vectors' axis, or last for the scalars.
_BLOCK_AXIS = {"su": -2, "sv": -2, "wu": -2, "wv": -2}


def _moments(u: torch.Tensor, v: torch.Tensor, blocks: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-block sums for the HSIC of u [..., n, du], v [..., n, dv] on any union of blocks (rows `blocks[b]`).

    A = sum u_i v_i' [..., B, du, dv], s_u = sum u_i, s_v [..., B, d], q_u = sum |u_i|^2, q_v,
    w_u = sum |v_i|^2 u_i, w_v = sum |u_i|^2 v_i [..., B, d], m = sum |u_i|^2 |v_i|^2, and the count n [B]:
    every term of biased and unbiased HSIC on a subset of rows is a function of these sums, which are
    additive over blocks. A's block products are written into one buffer (no stacked copy: 94 MB at d = 768);
    the other sums are each one pass over the rows by block label.
    """
    count, n = len(blocks), u.shape[-2]
    labels = torch.empty(n, dtype=torch.long, device=u.device)
    for b, index in enumerate(blocks):
        labels[index] = b
    a = torch.empty(*u.shape[:-2], count, u.shape[-1], v.shape[-1], dtype=torch.promote_types(u.dtype, v.dtype), device=u.device)
    for b, index in enumerate(blocks):
        torch.matmul(u[..., index, :].mT, v[..., index, :], out=a[..., b, :, :])
    ru, rv = u.square().sum(-1), v.square().sum(-1)

    def by_block(values: torch.Tensor, dim: int) -> torch.Tensor:
        shape = list(values.shape)
        shape[dim] = count
        return values.new_zeros(shape).index_add_(dim, labels, values)

    return {"A": a, "su": by_block(u, -2), "sv": by_block(v, -2), "qu": by_block(ru, -1), "qv": by_block(rv, -1),
            "wu": by_block(u * rv[..., None], -2), "wv": by_block(v * ru[..., None], -2), "m": by_block(ru * rv, -1),
            "n": torch.tensor([float(len(index)) for index in blocks], dtype=torch.float64, device=u.device)}


def _hsic_from_moments(t: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """HSIC (up to a factor that cancels in CKA) of the rows the sums `t` cover (Song et al. 2012, eq. 5), with
    A through ||A||^2 (`A_sq`) and s_u'A s_v (`A_uv`).

    linear: ||A - s_u s_v' / n||_F^2 = ||A||^2 - 2 s_u'A s_v / n + |s_u|^2 |s_v|^2 / n^2, the cross-covariance of the
    rows re-centred on their own mean.
    debiased, on the raw kernel (HSIC_1 needs no centring): tr(K~L~) = ||A||^2 - m, 1'K~1 = |s_u|^2 - q_u,
    1'K~L~1 = s_u'A s_v - s_u.w_u - s_v.w_v + m.
    """
    n = t["n"]
    su_sq, sv_sq = t["su"].square().sum(-1), t["sv"].square().sum(-1)
    if kind == "linear":
        return t["A_sq"] - 2 * t["A_uv"] / n + su_sq * sv_sq / n.square()
    tr_kl = t["A_sq"] - t["m"]
    ones_k = su_sq - t["qu"]
    ones_l = sv_sq - t["qv"]
    ones_kl = t["A_uv"] - (t["su"] * t["wu"]).sum(-1) - (t["sv"] * t["wv"]).sum(-1) + t["m"]
    return tr_kl + ones_k * ones_l / ((n - 1) * (n - 2)) - 2 / (n - 2) * ones_kl


class BlockHsic(NamedTuple):
    """HSIC of a representation with itself (`leave_block_out_self`), on `xlsub.similarity.cka.prepare`'s scale:
    `kept` [..., B] on all examples but block b, `whole` [...] on all of them."""

    kept: torch.Tensor
    whole: torch.Tensor


def leave_block_out_self(x: torch.Tensor, blocks: torch.Tensor, kind: str = "debiased") -> BlockHsic:
    """HSIC(K, K) of x [..., n, d] without each block of `blocks` (labels 0..B-1 per example) and on every
    example, linear or debiased: the self terms of every leave-one-block-out CKA of x, computed once for all
    the representations x is compared with (`leave_block_out_cka`'s `selves`). A self term that is zero up to
    rounding is zero, as in `prepare`."""
    check_options(kind)
    if kind == "rbf":
        raise ValueError("leave_block_out_self: linear or debiased CKA (rbf's bandwidth depends on the rows kept)")
    blocks = torch.as_tensor(blocks, dtype=torch.long).to(x.device)
    if x.dim() > 2:
        parts = [leave_block_out_self(a, blocks, kind) for a in x.reshape(-1, *x.shape[-2:])]
        return BlockHsic(*(torch.stack(values).reshape(*x.shape[:-2], *values[0].shape) for values in zip(*parts)))
    xc = centre(x)[0]
    return _block_hsic(xc, xc, _members(blocks, kind), kind, self_term=True)


def _members(blocks: torch.Tensor, kind: str) -> list[torch.Tensor]:
    members = [(blocks == b).nonzero().reshape(-1) for b in range(int(blocks.max()) + 1)]
    if kind == "debiased" and len(blocks) - max(len(m) for m in members) < 4:
        raise ValueError("debiased CKA needs at least 4 examples left out of every block")
    return members


def _block_hsic(u: torch.Tensor, v: torch.Tensor, members: list[torch.Tensor], kind: str, self_term: bool) -> BlockHsic:
    """HSIC of centred u, v without each block and on all rows, from the per-block sums (`_moments`)."""
    per_block = _moments(u, v, members)
    blocks = per_block.pop("A")  # [..., B, du, dv]
    totals = {key: value.sum(_BLOCK_AXIS.get(key, -1), keepdim=True) for key, value in per_block.items()}
    kept = {key: totals[key] - value for key, value in per_block.items()}  # total minus the block
    # A's terms without the block, T - A_b, from T = sum_b A_b and each A_b: no [B, du, dv] difference formed
    whole = blocks.sum(-3)
    whole_sq = sq_frob(whole)[..., None]
    kept["A_sq"] = whole_sq - 2 * (blocks.flatten(-2) @ whole.flatten(-2)[..., None])[..., 0] + sq_frob(blocks)
    kept["A_uv"] = (torch.einsum("...bi,...ij,...bj->...b", kept["su"], whole, kept["sv"])
                    - (kept["su"][..., None, :] @ blocks @ kept["sv"][..., :, None])[..., 0, 0])
    totals["A_sq"] = whole_sq
    totals["A_uv"] = torch.einsum("...bi,...ij,...bj->...b", totals["su"], whole, totals["sv"])
    out = []
    for sums in (kept, totals):
        value = _hsic_from_moments(sums, kind)
        if self_term:
            # as in xlsub.similarity.cka.prepare: a self term that is zero up to rounding is zero (CKA NaN)
            scale = sums["qu"] - sums["su"].square().sum(-1) / sums["n"]  # sum of re-centred squared norms
            floor = HSIC_RTOL * scale.square() if kind == "debiased" else 0.0
            value = torch.where(value <= floor, 0.0, value)
        out.append(value)
    return BlockHsic(out[0], out[1][..., 0])


def leave_block_out_cka(x: torch.Tensor, y: torch.Tensor, blocks: torch.Tensor, kind: str = "debiased",
                        selves: tuple[BlockHsic, BlockHsic] | None = None) -> torch.Tensor:
    """CKA on all examples but block b, for every block b of `blocks` (labels 0..B-1 per example), [..., B].

    Linear and debiased: from per-block sums (`_moments`), total minus block, with x and y first centred
    on all examples (CKA is translation invariant; this keeps the raw sums small, so the re-centring on
    the kept rows does not cancel). One pass over the data, then O(d1 d2) per block. `selves`: x's and y's
    `leave_block_out_self` on the same blocks, computed once for every pair they are in (then only the cross
    term is computed here). rbf (its bandwidth depends on the rows kept): recomputed per block.
    """
    return _leave_block_out(x, y, blocks, kind, selves)[0]


def _leave_block_out(x: torch.Tensor, y: torch.Tensor, blocks: torch.Tensor, kind: str,
                     selves: tuple[BlockHsic, BlockHsic] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(leave-one-block-out CKA [..., B], CKA on all examples [...] from the same sums; None for rbf)."""
    check_options(kind)
    blocks = torch.as_tensor(blocks, dtype=torch.long).to(x.device)
    count = int(blocks.max()) + 1
    if x.dim() > 2:
        # one layer at a time: the per-block d1 x d2 moments of all 13 layers at d=768 would take ~4 GB
        lead = x.shape[:-2]
        pick = (lambda i: None) if selves is None else (lambda i: tuple(BlockHsic(s.kept.reshape(-1, count)[i], s.whole.reshape(-1)[i]) for s in selves))
        parts = [_leave_block_out(a, b, blocks, kind, pick(i))
                 for i, (a, b) in enumerate(zip(x.reshape(-1, *x.shape[-2:]), y.reshape(-1, *y.shape[-2:])))]
        whole = None if kind == "rbf" else torch.stack([p[1] for p in parts]).reshape(lead)
        return torch.stack([p[0] for p in parts]).reshape(*lead, count), whole
    if kind == "rbf":
        return torch.stack([cka(x[..., blocks != b, :], y[..., blocks != b, :], kind) for b in range(count)], -1), None
    hsic = _leave_block_out_hsic(x, y, blocks, kind, selves)
    return ratio(hsic["xy"].kept, hsic["xx"].kept, hsic["yy"].kept), ratio(hsic["xy"].whole, hsic["xx"].whole, hsic["yy"].whole)


def _leave_block_out_hsic(x: torch.Tensor, y: torch.Tensor, blocks: torch.Tensor, kind: str,
                          selves: tuple[BlockHsic, BlockHsic] | None = None) -> dict[str, BlockHsic]:
    """HSIC(K, L), HSIC(K, K), HSIC(L, L) (`xy`, `xx`, `yy`, each a `BlockHsic`: [B] and on all rows) without each
    block, for x [n, d1], y [n, d2] and linear or debiased kernels, on `xlsub.similarity.cka.prepare`'s scale;
    `selves`: `xx` and `yy` already computed (`leave_block_out_self`)."""
    members = _members(blocks, kind)
    xc, yc = centre(x)[0], centre(y)[0]
    hsic = {"xy": _block_hsic(xc, yc, members, kind, self_term=False)}
    if selves is not None:
        if any(s.kept.shape != (len(members),) for s in selves):
            raise ValueError(f"leave_block_out_cka: selves must be leave_block_out_self on the same {len(members)} blocks")
        return hsic | dict(zip(("xx", "yy"), selves))
    return hsic | {"xx": _block_hsic(xc, xc, members, kind, self_term=True), "yy": _block_hsic(yc, yc, members, kind, self_term=True)}


def leave_block_out_above_chance(x: torch.Tensor, y: torch.Tensor, blocks: torch.Tensor, kind: str = "debiased",
                                 groups=None, selves: tuple[BlockHsic, BlockHsic] | None = None) -> torch.Tensor:
    """CKA minus its exact permutation null mean, both on all examples but block b, for every block b, [B]
    (x [n, d1], y [n, d2]): the jackknife values of `xlsub.similarity.permutation.cka_null_mean`'s "CKA above
    chance" with the re-pairings within `groups` restricted to the kept examples.

    Linear and debiased: the null mean's terms (`cka_null_mean`: per group its size, the sum of |x_i|^2 and the
    sum of x_i, re-centred on the kept examples' mean) from per-(block, group) sums, total minus the block:
    one pass over the data and O(G^2 d) per block, instead of recomputing both representations' statistics
    for each of the B subsets. rbf (its bandwidth depends on the rows kept): recomputed per block. `selves`: x's and
    y's `leave_block_out_self` on the same blocks (a reference's computed once for every language it meets)."""
    from xlsub.similarity.permutation import cka_null_mean  # permutation builds on this module's neighbours

    check_options(kind)
    blocks = torch.as_tensor(blocks, dtype=torch.long).to(x.device)
    count = int(blocks.max()) + 1
    n = x.shape[-2]
    codes = moments.group_codes(groups, n, x.device)[0]
    if kind == "rbf":
        return torch.stack([cka(x[blocks != b], y[blocks != b], kind) - cka_null_mean(x[blocks != b], y[blocks != b], kind, codes[blocks != b])
                            for b in range(count)])
    hsic = {name: value.kept for name, value in _leave_block_out_hsic(x, y, blocks, kind, selves).items()}
    cell = blocks * (int(codes.max()) + 1) + codes  # (block, group)
    cells = count * (int(codes.max()) + 1)

    def kept_sums(v: torch.Tensor):
        """Per block b, per group: the count, sum |v_i - mu_b|^2 and sum (v_i - mu_b) over the kept rows, mu_b their mean."""
        vc = centre(v)[0]
        on = {"dtype": torch.float64, "device": vc.device}
        size = torch.zeros(cells, **on).index_add_(0, cell, torch.ones(n, **on)).reshape(count, -1)
        sq = torch.zeros(cells, **on).index_add_(0, cell, vc.square().sum(-1)).reshape(count, -1)
        sums = torch.zeros(cells, vc.shape[-1], **on).index_add_(0, cell, vc).reshape(count, -1, vc.shape[-1])
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
                           level: float = 0.95, seed: int | None = None,
                           selves: tuple[BlockHsic, BlockHsic] | None = None) -> Interval:
    """Delete-a-block jackknife confidence interval for CKA: (estimate, lo, hi), each [...].

    The n examples are split into `blocks` blocks (`jackknife_blocks`: contiguous, or random with a
    `seed`); theta_b is the CKA without block b (`leave_block_out_cka`). SE = sqrt((B-1)/B sum_b (theta_b -
    mean theta)^2) (the grouped jackknife; Efron & Tibshirani 1993, 11.5), and the interval is estimate +-
    t_{B-1, (1+level)/2} SE, with estimate the CKA on all n examples (not bias-corrected; linear and debiased:
    from the same block sums, rbf: `cka`). No example is ever duplicated, unlike a bootstrap, which inflates CKA.
    `selves`: x's and y's `leave_block_out_self` on `jackknife_blocks(n, blocks, seed)`, to share between pairs.
    """
    if not 0 < level < 1:
        raise XlsubError(f"jackknife: level must be between 0 and 1 (e.g. 0.95), got {level}")
    labels = jackknife_blocks(x.shape[-2], blocks, seed)
    theta, estimate = _leave_block_out(x, y, labels, kind, selves)
    return jackknife_bounds(theta, cka(x, y, kind) if estimate is None else estimate, level)


def jackknife_bounds(theta: torch.Tensor, estimate: torch.Tensor, level: float = 0.95) -> Interval:
    """The grouped jackknife's interval (`cka_jackknife_interval`) from the leave-one-block-out values theta [..., B]."""
    blocks = theta.shape[-1]
    se = ((blocks - 1) / blocks * (theta - theta.mean(-1, keepdim=True)).square().sum(-1)).sqrt()
    half = float(stats.t.ppf((1 + level) / 2, blocks - 1)) * se
    return Interval(estimate, estimate - half, estimate + half)
