"""Representational similarity analysis (Kriegeskorte et al. 2008) and its Mantel test (Mantel 1967; issue 12).

`rdm`, `rsa`: Spearman correlation of the 1 - cosine dissimilarity matrices; `mantel_test` tests it against
joint re-pairings of one RDM's rows and columns (`xlsub.stats.inference.mantel_test` on the RDMs);
`rsa_jackknife_interval`: its delete-a-block jackknife interval over sentences.
"""

from __future__ import annotations

import itertools
import math

import torch

from xlsub.similarity import moments
from xlsub.similarity.jackknife import Interval, jackknife_blocks
from xlsub.similarity.permutation import TAIL_PILOT, permutations, sequential_null
from xlsub.similarity.retrieval import unit_rows
from xlsub.stats import inference
from xlsub.stats.workers import side_by_side

# the leave-block-out RSA (`_sorted_rsa`): blocks whose x ranks one gather reads together (int32, 32 bytes: half a
# cache line; 20 blocks in 3 gathers: seven 5,000-sentence languages 17.4 -> 14.1 s, with int8 block labels, against
# 4 blocks a gather), and the entries of a language's sort handled at a time
JACKKNIFE_GROUP = 8
JACKKNIFE_CHUNK = 1 << 16
# ... and where a language is tied, whose doubled ranks per block are held whole beside the table ([G, m] int32 each):
# 4 blocks a gather hold the two at 400 MB at n = 5,000, not 800 (the study's peak was raised there)
TIED_GROUP = 4


GRAM_BLOCK_ROWS = 640  # `symmetric_products`: rows of the triangle's blocks (8 blocks at n = 5,000)


def symmetric_products(x: torch.Tensor, out: torch.Tensor | None = None, upper: bool = False) -> torch.Tensor:
    """x x' [..., n, n] from the products of blocks of `GRAM_BLOCK_ROWS` rows on and above the diagonal only (at
    n = 5,000, d = 768 in float64: 0.21 s instead of 0.41 for the whole product), the lower triangle their mirror,
    so the matrix is exactly symmetric. `out`: a [..., n, n] buffer of x's dtype to write into; `upper`: leave the
    entries below the diagonal blocks unwritten (callers that read only i < j)."""
    n = x.shape[-2]
    out = x.new_empty(*x.shape[:-1], n) if out is None else out
    for start in range(0, n, GRAM_BLOCK_ROWS):
        rows = slice(start, start + GRAM_BLOCK_ROWS)
        torch.matmul(x[..., rows, :], x[..., start:, :].mT, out=out[..., rows, start:])
        if not upper:
            out[..., rows, :start] = out[..., :start, rows].mT
            square = out[..., rows, rows]
            square.copy_(torch.where(torch.ones(square.shape[-2:], dtype=torch.bool, device=x.device).tril_(-1), square.mT, square))
    return out


def rdm(x: torch.Tensor, centre: bool = False, out: torch.Tensor | None = None, upper: bool = False) -> torch.Tensor:
    """Representational dissimilarity matrix 1 - cos(x_i, x_j), [..., n, n] float64 (Kriegeskorte et al. 2008).

    `centre`: subtract the mean over examples first. A zero row has cosine 0 (dissimilarity 1) to all.
    `out`: a float64 [..., n, n] buffer to write it into (the same numbers: -c + 1 rounds as 1 - c).
    The cosines from `symmetric_products` (exactly symmetric); `upper`: only the entries above the diagonal
    are meant to be read (those below the diagonal blocks are left unwritten before the subtraction).
    """
    return symmetric_products(unit_rows(x, centre), out, upper).neg_().add_(1.0)


def rsa(x: torch.Tensor, y: torch.Tensor, centre: bool = False) -> torch.Tensor:
    """Spearman correlation of the upper triangles (i < j) of rdm(x) and rdm(y), [...] float64.

    Representational similarity analysis (Kriegeskorte et al. 2008); ties get average ranks. One x against
    several y [m, n, d]: the ranks of x once, each y's one at a time (`centred_ranks`).
    """
    if x.dim() == 2 and y.dim() > 2:
        a = centred_ranks(x, centre)
        flat = y.reshape(-1, *y.shape[-2:])
        values = [torch.dot(a.reshape(-1), (b := centred_ranks(one, centre)).reshape(-1)) / (inference.upper_norm(a) * inference.upper_norm(b)) for one in flat]
        return torch.stack(values).reshape(y.shape[:-2])
    return inference.matrix_correlation(rdm(x, centre), rdm(y, centre))


def mantel_test(x: torch.Tensor, y: torch.Tensor, n_perm: int = 500, seed: int = 0, groups=None,
                centre: bool = False, tail_risk: float | None = None, pilot: int = TAIL_PILOT,
                stop_after: int | None = None, ranks: tuple[torch.Tensor, torch.Tensor] | None = None) -> inference.MantelResult:
    """RSA of x, y [..., n, d] against re-pairings of y: y's RDM rows and columns permuted jointly (Mantel 1967).

    `xlsub.stats.inference.mantel_test` (one-sided, "greater") on rdm(x), rdm(y): `n_perm` permutations
    `xlsub.similarity.permutation.permutations(n, n_perm, seed, groups)` (`groups`: e.g. the source
    sentences' token counts, for the length-restricted null), or all n! where that is affordable. The leading dimensions broadcast: one x
    [n, d] against several y [m, n, d] (one language against the others) permutes x's matrix once per
    permutation for all m.

    `tail_risk` (None: off; one x against y [m, n, d] only): a language whose observed RSA the exact
    permutation mean and sd of r (`xlsub.similarity.moments` on the centred rank matrices, within `groups`) put
    so far above the null that the n_perm permutations reach it with probability at most `tail_risk`
    (`tail_bound_decided`) gets p = 1 / (1 + n_perm) without computing any (`tail_bound` says where;
    null_mean and null_std are the exact ones). The other languages run all n_perm permutations: their
    numbers are the full test's.

    `stop_after` (None: off; the same shapes): languages clearly at the null stop early (`sequential_null`:
    at the `stop_after`-th null r reaching the observed one within the first `stop_after` / `STOP_P`
    permutations, p = `stop_after` / L; `stopped` says where).
    `ranks`: (`centred_ranks(x, centre)`, `centred_ranks(y, centre)`) where the caller already has them (x's best
    in `rank_dtype(n)`, exact: float32 up to n = 5,793, which halves the memory traffic of the permutations' gathers).
    """
    n = x.shape[-2]
    sample = permutations(n, n_perm, seed, groups)
    a, b = (centred_ranks(x, centre).to(rank_dtype(n)), centred_ranks(y, centre)) if ranks is None else ranks
    staged = (tail_risk is not None and pilot < n_perm) or stop_after
    if not staged or x.dim() != 2 or y.dim() != 3 or math.factorial(min(n, 20)) <= inference.EXACT_LIMIT:
        return inference.mantel_test(a, b, sample, groups, centred=True)
    norms = inference.upper_norm(a) * inference.upper_norm(b)
    observed = inference.matrix_dots(a, b) / norms
    exact_mean = exact_sd = exact_weight = None
    if tail_risk is not None:  # r's exact permutation mean and sd: the tail bound without a pilot
        exact_mean, exact_sd, exact_weight = moments.mantel_moments(a, b, norms, groups)

    def compute(cells, start, stop):  # the cells' null r, their matrices read in place (no copy of the undecided ones)
        return inference.permuted_cross(a, b, sample[start:stop], select=cells) / norms[cells, None]

    def exceeds(null, observed):
        return null >= observed - inference.MANTEL_TIE * observed.abs().clamp_min(1.0)

    done = sequential_null(compute, observed, n_perm, exceeds, pilot=pilot, tail_risk=tail_risk, exact_mean=exact_mean,
                           exact_sd=exact_sd, exact_weight=exact_weight, stop_after=stop_after)
    test = "relabel_mc" if groups is None else "restricted_perm_mc"
    return inference.MantelResult(observed, done.p_value, done.null, n_perm, 1.0 / (n_perm + 1), test, done.tail_bound,
                                  0 if exact_mean is not None else pilot, done.stopped, exact_mean, exact_sd)


def rank_dtype(n: int) -> torch.dtype:
    """float32 where it holds every centred rank of an n-sentence triangle exactly, float64 above: the ranks
    (tie means included) minus their mean are multiples of 1/2 of magnitude at most (m - 1) / 2, m = n (n - 1) / 2,
    and float32 has every such multiple up to 2^23 (n <= 5,793)."""
    return torch.float32 if n * (n - 1) // 2 - 1 <= 2**24 else torch.float64


def centred_ranks(x, centre: bool = False, out: torch.Tensor | None = None, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """`xlsub.stats.inference.centred_upper(rdm(x), "spearman")` [..., n, n], one leading index at a time, each
    ranked where its RDM was written (`centred_ranks_`): at n = 5,000 an RDM is 200 MB, and ranking seven at
    once held several GB of sort buffers. One x [n, d]: float64; stacked [..., n, d] (the languages, or planted
    draws): in `rank_dtype(n)`, the same values (seven languages at n = 5,000 hold 700 MB instead of 1.4 GB),
    written into `out` [>= len, n, n] where given (a caller's buffer, reused). x may also be an iterable of [n, d]
    (with `out`): each made when reached and dropped once ranked, so a caller's draws need not be stacked (ten
    planted draws at n = 5,000, d = 768 are 300 MB); returns out[:len]. One at a time: two side by side on one
    torch thread each (`xlsub.stats.workers`) ranked six at n = 5,000 in 6.7-6.8 s instead of 9.9-13.1 s, but their
    second scratch matrix and sort buffers raised the study's peak by 0.4-0.7 GiB (`benchmarks/README.md`).
    `scratch`: a float64 [n, n] matrix to write each RDM into before it is ranked into a narrower `out` (a caller's, reused
    across calls: a fresh one is 200 MB of page faults at n = 5,000)."""
    if isinstance(x, torch.Tensor) and x.dim() == 2:
        return inference.centred_ranks_(rdm(x, centre, upper=True))
    if isinstance(x, torch.Tensor):
        flat, lead, n = x.reshape(-1, *x.shape[-2:]), x.shape[:-2], x.shape[-2]
        out = torch.empty(len(flat), n, n, dtype=rank_dtype(n), device=x.device) if out is None else out[:len(flat)]
    elif out is None:
        raise ValueError("centred_ranks: an iterable of representations is ranked into a caller's `out`")
    else:
        flat, lead, n = x, None, out.shape[-1]
    if out.dtype == torch.float64:
        scratch = None
    elif scratch is None:
        scratch = torch.empty(n, n, dtype=torch.float64, device=out.device)
    count = 0
    for index, one in enumerate(flat):
        ranked = inference.centred_ranks_(rdm(one, centre, out=out[index] if scratch is None else scratch, upper=True))
        if scratch is not None:
            out[index].copy_(ranked)
        count = index + 1
    return out[:count] if lead is None else out.reshape(*lead, n, n)


def centred_ranks_each(ys: torch.Tensor, centre: bool = False) -> list[torch.Tensor]:
    """`centred_ranks` of each of ys [m, n, d] as a tensor of its own (in `rank_dtype(n)`), so that a caller done
    with one can free it: `rsa_jackknife_interval` frees each language's matrix once it has its sort. One float64
    scratch matrix holds each RDM in turn (`centred_ranks`' `scratch`)."""
    n, dtype = ys.shape[-2], rank_dtype(ys.shape[-2])
    scratch = None if dtype == torch.float64 else torch.empty(n, n, dtype=torch.float64, device=ys.device)
    return [centred_ranks(one[None], centre, out=torch.empty(1, n, n, dtype=dtype, device=ys.device), scratch=scratch)[0] for one in ys]


def _released(items: list):
    """Each of `items`, removed from the list as it is handed out (the list is the caller's last reference)."""
    while items:
        yield items.pop(0)


def _tie_runs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ascending (stable) order of `values` along the last axis, and for each sorted position the index
    of its run of equal values."""
    order = torch.argsort(values, dim=-1, stable=True)
    ordered = values.gather(-1, order)
    new = torch.ones_like(ordered, dtype=torch.bool)
    new[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    return order, torch.cumsum(new, dim=-1) - 1


def _subset_ranks(order: torch.Tensor, runs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties averaged, as `xlsub.stats.inference.average_ranks`) of the kept entries among
    themselves, from the full sort (`_tie_runs`): O(m) per subset instead of a new sort. [..., kept]."""
    kept = keep[order].double()  # in sorted order
    position = torch.cumsum(kept, dim=-1)  # a kept entry's rank among the kept ones
    total = torch.zeros_like(position).scatter_add_(-1, runs, position * kept)
    count = torch.zeros_like(position).scatter_add_(-1, runs, kept)
    mean = total.gather(-1, runs) / count.gather(-1, runs).clamp_min(1.0)
    return torch.empty_like(mean).scatter_(-1, order, mean)[..., keep]


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1))


def _untied_order(ranks: torch.Tensor) -> torch.Tensor | None:
    """The sort order of an upper triangle from its `centred_ranks` matrix (ranks 1..m minus their mean, no
    sort), or None where the ranks are not a permutation of 1..m (ties were averaged). On the CPU one compiled walk
    of the triangle, its rows in parts side by side (`xlsub.stats.compiled_sort.untied_order`)."""
    if inference.on_cpu(ranks) and ranks.is_contiguous():
        from xlsub.stats import compiled_sort

        k = ranks.shape[-1]
        m = k * (k - 1) // 2
        order = torch.empty(m, dtype=torch.long)
        return order if compiled_sort.untied_order(ranks.numpy(), (m + 1) / 2, order.numpy(), torch.get_num_threads()) else None
    position = inference.upper_entries(ranks)
    m = len(position)
    position += (m + 1) / 2 - 1  # in place (exact in float32 ranks too: integers below 2^24): each temporary is 100 MB
    if not torch.equal(position, torch.round(position)):
        return None
    at = position.long()
    del position
    order = torch.full((m,), -1, dtype=torch.long, device=at.device).index_copy_(0, at, torch.arange(m, device=at.device))
    return order if bool((order >= 0).all()) else None


def _sort(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(order, tie runs) of an upper triangle [m] or of the triangle of a `centred_ranks` matrix (whose ranks
    give the order without a sort where untied), as `xlsub.stats.inference.value_order`; None where it has none."""
    if values.dim() == 2:
        order = _untied_order(values)
        if order is not None:
            return order, torch.empty(0, 2, dtype=torch.long, device=order.device)
        values = inference.upper_entries(values)
    return inference.value_order(values)


class _SortedSide:
    """One triangle's sort for `_sorted_rsa`: the blocks of each sorted entry's two sentences (`first`, `second`,
    int8 up to 128 blocks, else int16) and its tie runs (positions in a run, their lengths, first and last positions)."""

    def __init__(self, order: torch.Tensor, runs: torch.Tensor, block_i: torch.Tensor, block_j: torch.Tensor):
        self.first, self.second = block_i.index_select(0, order), block_j.index_select(0, order)
        self.tied = len(runs) > 0
        if self.tied:
            self.starts, self.stops = runs[:, 0], runs[:, 1]
            on = {"dtype": torch.int32, "device": order.device}
            marks = torch.zeros(len(order) + 1, **on)
            marks.index_add_(0, self.starts, torch.ones(len(runs), **on))
            marks.index_add_(0, self.stops, torch.full((len(runs),), -1, **on))
            self.in_run, self.lengths = marks.cumsum(0, dtype=torch.int32)[:-1] > 0, self.stops - self.starts

    @classmethod
    def untied(cls, first: torch.Tensor, second: torch.Tensor) -> _SortedSide:
        """An untied sort's side from the blocks of its sorted entries, made without the order (`_language_side`)."""
        side = cls.__new__(cls)
        side.first, side.second, side.tied = first, second, False
        return side

    def doubled_ranks(self, block: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Twice each entry's rank among the entries kept without `block` (ties given the mean of their ranks, so
        twice it is an integer), in sorted order, int32 [m], 0 where the entry is removed, into `out` where given. A
        kept entry's rank is the running count of kept entries; a tie run with `before` kept entries ahead of it and t
        kept in it has mean rank before + (t + 1) / 2."""
        kept = (self.first != block) & (self.second != block)
        count = torch.cumsum(kept, 0, dtype=torch.int32)
        doubled = torch.mul(count, 2, out=out)
        if self.tied:
            before = torch.where(self.starts > 0, count[(self.starts - 1).clamp_min(0)], 0)
            doubled[self.in_run] = (before + count[self.stops - 1] + 1).repeat_interleave(self.lengths)
        return doubled.mul_(kept)


def _sorted_rsa(ux: torch.Tensor, uys, blocks: torch.Tensor) -> torch.Tensor | None:
    """`leave_block_out_rsa` of one upper triangle ux against each of uys (an iterable, each triangle built when
    reached and dropped once sorted: seven 5,000-sentence triangles are 700 MB; or `centred_ranks` matrices, whose
    ranks give the sort without sorting where untied), [len(uys), B]; None where a triangle cannot be sorted by
    `value_order` (non-finite values).

    Spearman's rho without block b is the correlation of the kept entries' ranks among themselves. A kept entry's
    rank is a running count of kept entries along its triangle's sort (the mean over its tie run where tied:
    `_SortedSide.doubled_ranks`); untied ranks 1..K have sum of squares K (K + 1) (2K + 1) / 6, tied ones are
    summed. The cross term sum_kept r_x r_y needs, per block, x's kept ranks read at the x-sorted position of each
    entry of y's sort: one random gather of the triangle. On the CPU, with neither side tied and at most
    `kept_ranks.MAX_BLOCKS` blocks, x's removed entries are bit words and one compiled walk of y's sort sums every
    block (`xlsub.similarity.kept_ranks`: seven 5,000-sentence languages 13.4 -> 5.8 s, `benchmarks/jackknife.py`), in
    halves of y's sort side by side.
    Otherwise `JACKKNIFE_GROUP` blocks' x ranks sit side by side (half a cache line; `TIED_GROUP` with a tied language,
    whose ranks per block are held whole), so one gather serves them all
    (`_kept_rank_products`). The languages share the cores (`side_by_side`)."""
    k = len(blocks)
    labels = blocks.to(torch.int8 if int(blocks.max()) < 128 else torch.int16)  # each entry's blocks: 25 MB, not 50, a triangle
    # each triangle entry's two blocks, by rows of the label matrices (no int64 index arrays: 200 MB at n = 5,000)
    block_i, block_j = inference.upper_entries(labels[:, None].expand(k, k)), inference.upper_entries(labels[None, :].expand(k, k))
    reference = position_x = None
    sides = []
    from xlsub.similarity import kept_ranks  # numba, imported where it is used

    for values in itertools.chain([ux], uys):
        side = None if reference is None or reference.tied else _language_side(values, ux, labels)
        if side is not None:  # untied, by one walk of the two rank matrices
            sides.append(side)
            del values
            continue
        found = None if values is None else _sort(values)
        if found is None:
            return None
        del values
        order, runs = found
        if reference is None:  # the reference: each entry's position in its sort
            position_x = torch.empty(len(order), dtype=torch.int32, device=order.device).index_copy_(
                0, order, torch.arange(len(order), dtype=torch.int32, device=order.device))
            reference = _SortedSide(order, runs, block_i, block_j)
        else:  # a language: the reference's position of each entry of its sort
            sides.append((position_x.index_select(0, order), _SortedSide(order, runs, block_i, block_j)))
        del order, runs, found
    del position_x, block_i, block_j
    count = int(blocks.max()) + 1
    sizes = torch.bincount(blocks, minlength=count).double()
    kept = (k - sizes) * (k - sizes - 1) / 2  # entries without the block: pairs of the other sentences
    untied_squares = 4 * kept * (kept + 1) * (2 * kept + 1) / 6  # sum of the doubled ranks' squares without ties
    cross = torch.empty(len(sides), count, dtype=torch.float64, device=blocks.device)
    squares_x, squares_y = untied_squares.clone(), untied_squares.expand(len(sides), count).clone()

    compiled = [] if reference.tied or count > kept_ranks.MAX_BLOCKS or not inference.on_cpu(blocks) else \
        [index for index, (_, side) in enumerate(sides) if not side.tied]
    if compiled:  # untied on both sides, on the CPU: x's removed entries as bits, one walk of each language's sort
        words = kept_ranks.removed_words(reference.first.numpy(), reference.second.numpy(), count)
        # each walk in halves of y's sort, so that the threads share out the languages evenly (7 of them on 2 threads:
        # no thread is left with a fourth whole walk while the other is idle)
        m = len(reference.first)
        walks = [(index, start, stop) for index in compiled for start, stop in ((0, m // 2), (m // 2, m))]
        done = side_by_side(lambda walk: kept_ranks.kept_rank_cross(*words, sides[walk[0]][0].numpy(), sides[walk[0]][1].first.numpy(),
                                                                    sides[walk[0]][1].second.numpy(), walk[1], walk[2]), walks)
        cross[compiled] = 0.0
        for (index, _, _), products in zip(walks, done):
            cross[index] += 4 * torch.from_numpy(products)  # of the doubled ranks
        del words
    rest = [index for index in range(len(sides)) if index not in compiled]
    size = TIED_GROUP if any(sides[index][1].tied for index in rest) else JACKKNIFE_GROUP
    for group in torch.arange(count, dtype=torch.int16, device=blocks.device).split(size) if rest else ():
        table = torch.empty(len(reference.first), len(group), dtype=torch.int32, device=blocks.device)
        for column, b in enumerate(group.tolist()):  # x's doubled kept ranks in x's sort, 0 where removed
            table[:, column] = reference.doubled_ranks(b)
            if reference.tied:
                squares_x[b] = table[:, column].double().square().sum()
        done = side_by_side(lambda index: _kept_rank_products(table, sides[index][0], sides[index][1], group), rest)
        for index, (products, squares) in zip(rest, done):
            cross[index, group.long()] = products
            if squares is not None:
                squares_y[index, group.long()] = squares
        table = None  # freed before the next group's is built
    centre = 4 * kept * ((kept + 1) / 2) ** 2  # K times the mean doubled rank squared
    return (cross - centre) / ((squares_x - centre) * (squares_y - centre)).sqrt()


def _language_side(ranks_y, ranks_x, labels: torch.Tensor) -> tuple[torch.Tensor, _SortedSide] | None:
    """A language's (x position of each entry of y's sort, its `_SortedSide`) for `_sorted_rsa`'s compiled walk, from its
    and the reference's `centred_ranks` matrices, both untied, in one compiled pass over the two
    (`xlsub.similarity.kept_ranks.language_side_part`, rows in parts side by side) instead of a sort order and three
    gathers by it: the jackknife of seven 5,000-sentence languages 4.6 -> 2.9 s on 2 vCPUs of a Xeon held to AVX2. None
    where that walk does not apply (not two contiguous [k, k] matrices on the CPU, more blocks than it takes) or y is
    tied (its ranks not 1..m once each): then `_sort`."""
    from xlsub.similarity import kept_ranks
    from xlsub.stats import compiled_sort

    if not (isinstance(ranks_y, torch.Tensor) and ranks_y.dim() == 2 and ranks_y.shape == ranks_x.shape and ranks_y.is_contiguous()
            and ranks_x.is_contiguous() and inference.on_cpu(ranks_y) and inference.on_cpu(ranks_x)
            and int(labels.max()) < kept_ranks.MAX_BLOCKS):
        return None
    k = ranks_y.shape[-1]
    m = k * (k - 1) // 2
    position = torch.full((m,), -1, dtype=torch.int32)
    first, second = torch.empty(m, dtype=labels.dtype), torch.empty(m, dtype=labels.dtype)
    arrays = ranks_y.numpy(), ranks_x.numpy(), (m + 1) / 2, labels.numpy(), position.numpy(), first.numpy(), second.numpy()
    valid = side_by_side(lambda rows: kept_ranks.language_side_part(*arrays, *rows), compiled_sort.row_parts(k, torch.get_num_threads()))
    if not all(valid) or bool((position < 0).any()):  # m entries at m valid places leave one unwritten exactly where two share one
        return None
    return position, _SortedSide.untied(first, second)


def _kept_rank_products(table: torch.Tensor, position: torch.Tensor, side: _SortedSide, group: torch.Tensor,
                        chunk: int = JACKKNIFE_CHUNK) -> tuple[torch.Tensor, torch.Tensor | None]:
    """For each block of `group` [G]: the sum over kept entries of x's doubled kept rank (`table` [N, G], read at
    each entry's x position `position`, 0 where removed) times y's (`side`'s, in its sorted order), and where y is
    tied the sum of y's squared doubled ranks (None untied: known). Untied, y's kept rank is a running count along
    its sort, computed `chunk` entries at a time into buffers allocated once, so the temporaries stay in cache."""
    blocks, width, on = group[:, None], min(chunk, len(position)), {"device": position.device}
    gathered, values = torch.empty(width, len(group), dtype=torch.int32, **on), torch.empty(width, len(group), dtype=torch.float64, **on)
    total = torch.zeros(len(group), dtype=torch.float64, **on)
    if side.tied:  # y's doubled ranks per block, whole (runs cross chunks), then the products chunk by chunk
        ranks_y = torch.empty(len(group), len(position), dtype=torch.int32, **on)  # written a row at a time: no second copy to stack
        for row, b in zip(ranks_y, group.tolist()):
            side.doubled_ranks(b, out=row)
        squares = torch.stack([one.double().square().sum() for one in ranks_y])  # a row at a time: 100 MB, not 400
        for start in range(0, len(position), width):
            stop = min(start + width, len(position))
            g, v = gathered[:stop - start], values[:stop - start]
            v.copy_(torch.index_select(table, 0, position[start:stop], out=g))
            total += torch.mm(ranks_y[:, start:stop].double(), v).diagonal()
        return total, squares
    kept, other = torch.empty(len(group), width, dtype=torch.bool, **on), torch.empty(len(group), width, dtype=torch.bool, **on)
    ranks = torch.empty(len(group), width, dtype=torch.float64, **on)
    carry = torch.zeros(len(group), 1, dtype=torch.float64, **on)
    for start in range(0, len(position), width):
        stop = min(start + width, len(position))
        k, o, r, g, v = kept[:, :stop - start], other[:, :stop - start], ranks[:, :stop - start], gathered[:stop - start], values[:stop - start]
        torch.ne(side.first[None, start:stop], blocks, out=k).logical_and_(torch.ne(side.second[None, start:stop], blocks, out=o))
        torch.cumsum(k, 1, dtype=torch.float64, out=r).add_(carry)
        carry = r[:, -1:].clone()
        v.copy_(torch.index_select(table, 0, position[start:stop], out=g))
        total += torch.mm(r, v).diagonal()
    return 2 * total, None  # y's ranks doubled


def leave_block_out_rsa(x: torch.Tensor, y: torch.Tensor, blocks: torch.Tensor, centre: bool = False,
                        ranks: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """RSA without the sentences of block b, for every block b of `blocks` (labels 0..B-1 per sentence),
    [..., B]: the block's rows and columns deleted from both RDMs and the rest re-ranked. Each RDM is
    sorted once; the ranks of a subset are read off that sort (`_subset_ranks`), which equals re-ranking
    the subset from scratch (ties included). One reference against languages: `_sorted_rsa`; `ranks`: (`centred_ranks(x, centre)`,
    `centred_ranks(y, centre)`, or an iterable of y's matrices) where the caller has them, which give the sorts."""
    blocks = torch.as_tensor(blocks, dtype=torch.long).to(x.device)
    count = int(blocks.max()) + 1
    if x.dim() == 2 and x.shape[-2] > 3:
        flat = y.reshape(-1, *y.shape[-2:])
        if ranks is not None:  # `centred_ranks` of x and y, already computed: no sort at all
            languages = ranks[1].reshape(-1, *ranks[1].shape[-2:]) if isinstance(ranks[1], torch.Tensor) else ranks[1]
            fast = _sorted_rsa(ranks[0], iter(languages), blocks)
        else:
            fast = _sorted_rsa(inference.upper_entries(rdm(x, centre, upper=True)), (inference.upper_entries(rdm(one, centre, upper=True)) for one in flat), blocks)
        if fast is not None:
            return fast.reshape(*y.shape[:-2], count)
    i, j = torch.triu_indices(len(blocks), len(blocks), offset=1, device=blocks.device)  # the re-ranking paths' pairs (200 MB at n = 5,000)
    if x.dim() == 2 and y.dim() > 2:
        # one reference against several languages: the reference sorted once, each language's sort kept in int32
        # and its ranks taken one language at a time (at n = 5,000 the batched buffers took several GB)
        sorted_x = _tie_runs(inference.upper_entries(rdm(x, centre, upper=True)))
        flat = y.reshape(-1, *y.shape[-2:])
        sorted_ys = [tuple(t.int() for t in _tie_runs(inference.upper_entries(rdm(one, centre, upper=True)))) for one in flat]
        out = torch.empty(len(flat), count, dtype=torch.float64, device=blocks.device)
        for b in range(count):
            keep = (blocks[i] != b) & (blocks[j] != b)
            ranks_x = _subset_ranks(*sorted_x, keep)
            for index, (order, runs) in enumerate(sorted_ys):
                out[index, b] = _pearson(ranks_x, _subset_ranks(order.long(), runs.long(), keep))
        return out.reshape(*y.shape[:-2], count)
    ux, uy = inference.upper_entries(rdm(x, centre, upper=True)), inference.upper_entries(rdm(y, centre, upper=True))
    sorted_x, sorted_y = _tie_runs(ux), _tie_runs(uy)
    out = []
    for b in range(count):
        keep = (blocks[i] != b) & (blocks[j] != b)
        out.append(_pearson(_subset_ranks(*sorted_x, keep), _subset_ranks(*sorted_y, keep)))
    return torch.stack(out, -1)


def rsa_jackknife_interval(x: torch.Tensor, y: torch.Tensor, blocks: int = 20, level: float = 0.95,
                           centre: bool = False, ranks: tuple[torch.Tensor, torch.Tensor] | None = None,
                           estimate: torch.Tensor | None = None) -> Interval:
    """Delete-a-block jackknife interval for RSA: (estimate, lo, hi), each [...] (leading axes broadcast).

    The n sentences in `blocks` contiguous blocks (`jackknife_blocks`); theta_b is the RSA without block b
    (`leave_block_out_rsa`), and the interval `xlsub.stats.inference.jackknife_interval` (t quantile,
    grouped jackknife SE) around the RSA on all n. Not a bootstrap with replacement: a sentence drawn twice
    has dissimilarity 0 to its copy in both RDMs, and these shared zeros, ranked lowest in both, inflate the
    rank correlation. `ranks`: (`centred_ranks(x, centre)`, `centred_ranks(y, centre)`) where the caller has them;
    y's as a list (`centred_ranks_each`) is emptied, each matrix freed once the jackknife has its sort (at n =
    5,000 the sorts of seven languages take 700 MB, which the freed matrices make room for). `estimate`: the RSA on
    all n where the caller has it (`mantel_test`'s observed), not computed again (a pass over every rank matrix).
    """
    labels = jackknife_blocks(x.shape[-2], blocks)
    if ranks is None:
        estimate = rsa(x, y, centre) if estimate is None else estimate
    else:  # `centred_ranks` of x and y (the caller's): RSA is their correlation
        a, b = ranks
        if estimate is None:
            estimate = inference.matrix_dots(a, b) / (inference.upper_norm(a) * inference.upper_norm(b))
        if isinstance(b, list):
            ranks = a, _released(b)
    lo, hi = inference.jackknife_interval(estimate, leave_block_out_rsa(x, y, labels, centre, ranks), level)
    return Interval(estimate, lo, hi)
