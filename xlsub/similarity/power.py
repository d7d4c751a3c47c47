"""Power of the representation tests against a planted shared signal (issue 12): at this n, d and
length-restricted null, how strong must a shared signal be for CKA, RSA or retrieval to detect it?

- Planted draws: the reference language's own vectors (`base`, centred and scaled as
  `planted_representations` scales its signal) against a partner that shares them at a signal-to-noise
  ratio (`planted_representations` of one "language", seeded per draw, in the reference's space: retrieval
  compares cosines across the two, and CKA and RSA do not see rotations, so a rotated partner would give
  draws of the same distribution at the cost of a d x d product). Draw j has the same noise at every level
  (common random numbers), so the power curve over levels is smooth.
- CKA and RSA draws so far above their exact null moments (`xlsub.similarity.moments`) that 4 of the 99
  permutations (enough to fail detection) reach them with probability at most `TAIL_RISK` are detected without
  permutations (`xlsub.similarity.permutation.tail_bound_decided` with `exceedances`).
- Each draw is tested with the verdicts' own test and null (`cka_permutation_test`, `mantel_test`,
  `retrieval_permutation_test`, pairings permuted within `groups`) on `N_PERM` = 99 permutations, stopped
  early by Besag & Clifford's (1991) sequential Monte Carlo test (`sequential_test`): a draw is not
  detected as soon as h = `stop_count` null values reach its statistic (with 99 permutations and alpha
  0.05, h = 4: p = (k + 1) / 100 >= 0.05 for every k >= 4). The decision is the full test's on the same
  permutations, by construction; permutations are evaluated in blocks growing from h to `BATCH` (a null draw stops
  after about 8).
- Draws come in chunks of `CHUNK` that share one permutation stream (RSA's reference matrix is gathered
  once per permutation for a whole chunk); chunks use different streams. Sharing a stream correlates the
  decisions within a chunk a little (under H0 by Var(1 - U_(96:99)) / (0.04 * 0.96), about 0.01: a design
  effect near 1.1 for 10 draws), so the binomial interval is slightly narrow. The reference is the clean
  signal, the same in every draw, so its rank matrix is computed once; both languages noisy would double
  RSA's ranking and forbid sharing the gather. Cost at the demo's n 1077, d 128 with 50 draws: about
  35-40 s on 2 cores (RSA ~25 s: one 580k-value sort per draw), 60 s on one.
- RSA's rank matrices (`spearman_matrix`) equal the Mantel test's bit for bit, from one sort when untied.
- Power at a level: the share of draws detected at alpha, with its Wilson 95% interval
  (`xlsub.stats.inference.wilson_interval`). Levels: `bisect_power`, bisection on log SNR inside
  `BRACKET` (a binary search over its 2^`BISECTIONS` steps; from a starting level, e.g. another measure's limit,
  where one is given); the detection limit is the smallest tested
  level with power >= `TARGET`. In the bisection (`power_curve`) a level stops drawing after a chunk once
  its side of the target is settled: the Wilson interval of its draws so far at 1 - 0.05 / K (Bonferroni over
  its K looks) excludes `TARGET` (all detected settles above after 30 of 50 draws, none below after 10); the
  table reports the draws each level used.
- CKA's levels share their null terms (`PlantedCkaTerms`): a draw is a x + b e_j at every level with the same
  noise and its chunk's permutations, so each (draw, permutation) is computed once for the whole curve, and each
  level's observed CKA comes from terms kept per draw, without making the draw. The tail bound is used only for a
  chunk whose permutations' terms are not all computed: where they are, the full test costs no product. Where n is
  well below d^2 (the study's 5,000 at d = 768) the terms are computed in Gram space, all of a chunk's permutations at
  its first use (`PlantedCkaTerms`' "gram" engine), so the bound is never needed.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from xlsub.devices import release_freed_memory
from xlsub.similarity import moments
from xlsub.similarity.cka import HSIC_RTOL, debiased_hsic, frob, prepare, prepared_cka, ratio
from xlsub.similarity.controls import length_only_representations, planted_representations, planted_weights
from xlsub.similarity.permutation import (
    FLOAT32_RECHECK,
    TIE_RTOL,
    NullSide,
    cka_null_moments_many,
    null_engine,
    null_side,
    pair_null_moments,
    permutations,
    permuted_cka,
    permuted_products,
    prepared_null,
    tail_bound_decided,
)
from xlsub.similarity.retrieval import CosineSide, nearest_translation, top1
from xlsub.similarity.rsa import centred_ranks, rank_dtype, rdm
from xlsub.stats.inference import MANTEL_TIE, centred_upper, matrix_dots, permuted_cross, permuted_cross_reads_upper, upper_norm, wilson_interval

MEASURES = ("cka", "rsa", "retrieval")
ALPHA = 0.05
N_PERM = 99  # with alpha 0.05: p = (k + 1) / 100, detected iff k <= 3 of 99 null values reach the statistic
BATCH = 20  # permutations per batch of the sequential test
SHARED_PERMS = 10  # `PlantedCkaTerms`: permutations whose d x d products M_p are held at once
CHUNK = 10  # draws sharing one permutation stream
NOISE_BYTES = 2**29  # `PlantedCkaTerms`: the chunks' float32 noise held for their next fills (3 chunks of 10 draws at n = 5,000, d = 768)
# `PlantedCkaTerms`' Gram engine: the float32 n x n matrices held at once (1 GiB: the reference's and 4 draws' two at
# n = 5,000), and where it is taken: n * GRAM_RATIO < d^2. Measured at n = 5,000, d = 768 on 2 cores
# (`benchmarks/power.py`): a draw's terms of one permutation cost a 32 ms float32 product in the feature engine, about
# 10 ms in the Gram engine (two n x n sums and its share of the gather), which also builds two Gram matrices a draw.
GRAM_BYTES = 2**30
# `PlantedCkaTerms`' Gram engine on the CPU: rows of a draw's two Gram matrices per product, each from its diagonal
# on (the sums read no more). Measured at n = 5,000, d = 768 on 2 cores: a draw's two matrices into a fresh buffer
# 0.49 s against 0.63 for the whole products and S's symmetric part (rows per product: 256 0.30 s for S, 384 0.285,
# 512 0.27, 768 0.28)
GRAM_ROWS = 512
GRAM_RATIO = 37
PLANTED_ENGINES = ("auto", "feature", "gram")
TARGET = 0.8
BRACKET = (1e-4, 1.0)  # the demo (n 1077, d 128) crosses 0.8 near 2e-3
BISECTIONS = 4
# The tail bound's risk (`xlsub.similarity.permutation.tail_bound_decided`), as the tables': a CKA or RSA draw so far
# above its exact null mean that its 99 permutations reach it with probability at most this is detected without them.
TAIL_RISK = 0.005


def stop_count(n_perm: int, alpha: float = ALPHA) -> int:
    """h: the exceedance count from which p = (k + 1) / (n_perm + 1) can no longer fall below alpha, the
    smallest k with (k + 1) >= alpha (n_perm + 1) (4 for 99 permutations at 0.05)."""
    return max(0, math.ceil(alpha * (n_perm + 1) - 1e-9) - 1)


@dataclass(frozen=True)
class Sequential:
    """Besag & Clifford (1991) sequential tests of m draws: `exceed` [m] null values at least as extreme as
    the statistic among the first `used` [m] permutations (of `n_perm`); `detected` [m]: p < alpha."""

    exceed: torch.Tensor
    used: torch.Tensor
    n_perm: int
    detected: torch.Tensor

    @property
    def p_value(self) -> torch.Tensor:
        """(k + 1) / (n_perm + 1) for a draw that used every permutation, h / l for one stopped at the h-th
        exceedance after l permutations (Besag & Clifford 1991), the floor 1 / (n_perm + 1) for one decided by
        the tail bound without permutations (`used` 0)."""
        full = (self.exceed + 1.0) / (self.n_perm + 1)
        return torch.where(self.used == self.n_perm, full, torch.where(self.used == 0, 1.0 / (self.n_perm + 1), self.exceed / self.used.clamp_min(1)))


def sequential_test(extreme: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], m: int, perms: torch.Tensor,
                    alpha: float = ALPHA, batch: int = BATCH, decided: torch.Tensor | None = None) -> Sequential:
    """m Monte Carlo permutation tests on one permutation stream `perms` [n_perm, n], stopped early.

    `extreme(draws, block)` -> bool [len(draws), len(block)]: which null values of the listed draws, under
    the permutations of `block`, are at least as extreme as their observed statistic. Permutations are
    visited in order in blocks that grow from h = `stop_count` (the fewest that can stop a draw) to `batch`, each
    as large as all before it (h, h, 2h, 4h, ... at most `batch`: 4, 4, 8, 16, 20, 20, 20, 7 for 99 permutations);
    a draw leaves as soon as its count reaches h (it cannot be detected any more), so only draws that may still be
    detected see all n_perm, and a draw of the null, stopping after about 8, is not computed 20 permutations deep.
    The blocks change what is computed, not the result, which is the same for any blocks. A detected draw saw every
    permutation and has (k + 1) / (n_perm + 1) < alpha: the full test's decision on the same stream.
    `decided` (bool [m], e.g. `extreme.decided` of `cka_extreme` and `rsa_extreme` with a tail risk): draws the
    exact null moments put so far above the null that no permutation is computed for them (`used` 0): detected,
    with the count 0 the full test gives them but with probability at most the risk.
    """
    n_perm, h = len(perms), stop_count(len(perms), alpha)
    exceed = torch.zeros(m, dtype=torch.long)
    used = torch.zeros(m, dtype=torch.long)
    skip = torch.zeros(m, dtype=torch.bool) if decided is None or 1.0 / (n_perm + 1) >= alpha else decided.cpu()
    active = torch.arange(m)[~skip] if h > 0 else torch.arange(0)
    start = 0
    while start < n_perm and len(active):
        block = perms[start:start + min(batch, max(h, start, 1))]
        running = exceed[active, None] + torch.as_tensor(extreme(active, block)).cpu().long().cumsum(-1)
        reached = running >= h
        stops = reached.any(-1)
        used[active] = torch.where(stops, start + 1 + reached.long().argmax(-1), start + len(block))
        exceed[active] = torch.where(stops, h, running[:, -1])
        active = active[~stops]
        start += len(block)
    detected = skip | ((used == n_perm) & ((exceed + 1.0) / (n_perm + 1) < alpha))
    return Sequential(exceed, used, n_perm, detected)


# -- the three measures: observed statistics of m draws and their null, batch by batch -----------------------

def _at_least(null: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """null [m, B] >= observed [m] within `xlsub.similarity.permutation`'s tie tolerance (`permutation_result`)."""
    return null >= (observed - TIE_RTOL * observed.abs())[:, None]


def cka_extreme(xs: torch.Tensor, ys: torch.Tensor, kind: str = "debiased", tail: tuple | None = None):
    """`sequential_test`'s `extreme` for `cka_permutation_test` of xs[j] against ys[j] [m, n, d]: the null in
    float32 products, values within its recheck distance of the observed CKA recomputed in float64, as there.
    `tail` = (groups, n_perm, risk, alpha): `extreme.decided` [m] says which draws the exact null moments
    (`cka_null_mean`, `cka_null_spread`) decide without permutations: detected, since fewer than `stop_count`
    of the n_perm permutations reach them except with probability `risk` (`tail_bound_decided` with
    `exceedances`); else None. The planted draws of the power curve: `planted_cka_extreme`."""
    engine, precision = null_engine(kind, *xs.shape[-2:], ys.shape[-1], precision="float64" if kind == "rbf" else "float32")
    same = bool((xs == xs[:1]).all())  # one reference for every draw (`measure_extreme`): prepared once
    states = {}  # each pair prepared once for all its blocks of permutations, in the null's precision
    selves, values, first = [], [], None  # each pair prepared once in float64 for its observed CKA; its null's copies take the self terms from it
    for x, y in zip(xs, ys):
        a = first if same and first is not None else prepare(x, kind)
        first = a if same else None
        b = prepare(y, kind)
        values.append(prepared_cka(a, b, kind))
        selves.append((a["self"], b["self"]))
    del first
    observed = torch.stack(values) if values else torch.empty(0, dtype=torch.float64, device=xs.device)

    def prepared(j: int) -> tuple[dict, dict]:
        if j not in states:
            known = (None, None) if kind == "rbf" else selves[j]
            reference = states[0][0] if same and 0 in states else prepare(xs[j], kind, precision=precision, self_=known[0])
            states[j] = (reference, prepare(ys[j], kind, precision=precision, self_=known[1]))
        return states[j]

    def extreme(draws: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        draws, block = draws.to(xs.device), block.to(xs.device)
        nulls = torch.stack([prepared_null(*prepared(j), block, kind, engine) for j in draws.tolist()])
        if precision == "float32":
            for row, j in enumerate(draws.tolist()):
                near = (nulls[row] - observed[j]).abs() <= FLOAT32_RECHECK * observed[j].abs()
                if near.any():
                    nulls[row, near] = permuted_cka(xs[j], ys[j], block[near], kind)
        return _at_least(nulls, observed[draws])

    extreme.decided = None
    if tail is not None:
        groups, n_perm, risk, alpha = tail
        if same:  # one reference for every draw: its statistics once
            mean, sd, weight = cka_null_moments_many(xs[0], ys, kind, groups)
        else:
            mean, sd, weight = (torch.cat(values) for values in zip(*(cka_null_moments_many(x, y[None], kind, groups) for x, y in zip(xs, ys))))
        extreme.decided = tail_bound_decided(observed, mean, observed.new_empty(len(observed), 0), n_perm, risk,
                                             exact_sd=sd, exact_weight=weight, exceedances=stop_count(n_perm, alpha))
    return extreme


class PlantedCkaTerms:
    """CKA's permutation null for the planted draws of every level from terms computed once per draw and
    permutation, for linear and debiased CKA (issue 25).

    Draw j at a level is y = a x + b e_j (`planted_representations` with rotate=False: x the centred, scaled
    reference, e_j its noise, the same at every level; a = sqrt(snr / (1 + snr)), b = sqrt(1 / (1 + snr))),
    and chunk c of draws has the same permutations at every level (seeded by its first draw). With the rows
    of a centred representation gathered by permutation p, (y_c)_p' x_c = a M_p + b N_jp, M_p = (x_c)_p' x_c
    (the same for every draw) and N_jp = (e_c)_p' x_c, so
        ||(y_c)_p' x_c||^2 = a^2 ||M_p||^2 + 2 a b <M_p, N_jp> + b^2 ||N_jp||^2,
    and the unbiased HSIC's other pairing term r_x . (r_y)_p (r_i = |row i|^2 of the centred representation;
    r_y = a^2 r_x + 2 a b q + b^2 u, q_i = x_i . e_i, u_i = |e_i|^2) from r_x . (r_x)_p, r_x . q_p, r_x . u_p.
    These six scalars per (draw, permutation) give its null CKA at any level, with the level's own
    HSIC(L, L) and sum r_y (`cka.prepare` of that level's y); the products are float32 over blocks summed in
    float64 (`permuted_products`), as the feature engine's, so `cka_extreme` rechecks values near the
    observed one in float64 as it does for that engine. A block of permutations is computed for every draw of
    its chunk the first time any level needs it: the draws near the detection limit need all of them at some
    level, and each (draw, permutation) is then computed once instead of once per level.

    The observed CKA and HSIC(L, L) of every level come from float64 terms computed once per draw, so a level
    makes no partner: with G = x'x, C_j = x'e_j and E_j = e_j'e_j, ||y'x||^2 = a^2 |G|^2 + 2 a b <G, C> + b^2 |C|^2
    and ||y'y||^2 = a^4 |G|^2 + 4 a^3 b <G, C> + 2 a^2 b^2 (|C|^2 + <C, C'> + <G, E>) + 4 a b^3 <C, E> + b^4 |E|^2
    (y'y = a^2 G + a b (C + C') + b^2 E), beside r_y above: two float64 d x d products per draw instead of two
    per draw and level (`prepare` and the cross product). `partner` makes a level's y where a float64 recheck or
    the tail bound needs it, bit for bit `planted_representations`' draw.

    Two engines for the permuted terms (`engine`; "auto": `planted_engine`). "feature": the d x d products above, a
    block of permutations at a time when a level first needs it. "gram" (n well below d^2, as at the study's n = 5,000
    and d = 768): in Gram space, with K = x_c x_c' and q = p^-1, ||M_p||^2 = sum_ik K_ik K_p(i)p(k), <M_p, N_jp> =
    sum_ik K_ik S_j p(i)p(k) with S_j = (x_c e_c' + e_c x_c') / 2 and ||N_jp||^2 = sum_ik K_ik (e_c e_c')_p(i)p(k):
    K gathered once per permutation meets the chunk's 2m float32 Gram matrices (`permuted_cross`, float64 sums),
    n^2 work per draw and permutation instead of n d^2. A chunk's terms are computed for all its permutations when
    it is first used (the Gram matrices are made once, `GRAM_BYTES` of them at a time; on the CPU only on and above
    their diagonals, which is all the compiled sums read, S as one product [x_c e_c] [e_c x_c]' / 2), so its draws
    never need the tail bound.
    """

    def __init__(self, x: torch.Tensor, noise: Callable[[int], torch.Tensor], kind: str, n_perm: int, groups=None,
                 engine: str = "auto"):
        if kind not in ("linear", "debiased"):
            raise ValueError(f"PlantedCkaTerms: linear or debiased CKA, not {kind!r}")
        self.kind, self.n_perm, self.groups, self.noise = kind, n_perm, groups, noise
        self.engine = planted_engine(*x.shape, engine)
        self._gram = None  # the reference's float32 Gram matrix (the Gram engine)
        self.planted = x  # the reference as drawn (a partner is a x + b e: `partner`)
        self.x = prepare(x, kind, precision="float32")  # xc float32; rows, total, self float64
        self.reference = prepare(x, kind)  # float64: the observed CKA of every draw
        self._side = None
        self.xc = self.reference["xc"]
        self.rows = self.xc.square().sum(-1)
        self.gram = self.xc.mT @ self.xc  # G = x'x, float64
        self._chunks: dict[tuple[int, ...], dict] = {}
        self._resident: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()  # recent chunks' centred noise, float32 (`_noise`)
        self.products = 0  # permuted d x d products formed by the feature engine (for the benchmark's accounting)
        self.grams = 0  # (draw, permutation) terms formed by the Gram engine

    def perms(self, chunk: Sequence[int]) -> torch.Tensor:
        return self._chunk(chunk)["perms"]

    def _chunk(self, chunk: Sequence[int]) -> dict:
        key = tuple(chunk)
        if key not in self._chunks:
            n = self.xc.shape[0]
            ec = self._centred_noise(key)
            m = len(key)
            self._chunks[key] = {
                "perms": permutations(n, self.n_perm, key[0], self.groups).to(self.xc.device),
                "q": (ec * self.xc).sum(-1), "u": ec.square().sum(-1), "observed": self._observed_terms(ec),
                "done": torch.zeros(self.n_perm, dtype=torch.bool, device=self.xc.device),
                "shared": torch.full((2, self.n_perm), math.nan, dtype=torch.float64, device=self.xc.device),  # ||M_p||^2, r_x . (r_x)_p
                "draw": torch.full((4, m, self.n_perm), math.nan, dtype=torch.float64, device=self.xc.device),  # <M, N>, ||N||^2, r_x . q_p, r_x . u_p
            }
            ec = ec.float()  # the float64 copy (300 MB a chunk at n = 5,000, d = 768) dropped before the fill
            if self.engine == "gram":
                self._fill_gram(self._chunks[key], ec)
            else:
                self._keep(key, ec)
        return self._chunks[key]

    def _observed_terms(self, ec: torch.Tensor) -> torch.Tensor:
        """Per draw of centred noise ec [m, n, d] (float64): <G, C>, |C|^2, <C, C'>, <G, E>, <C, E>, |E|^2 (class
        docstring), [6, m] float64."""
        out = torch.empty(6, len(ec), dtype=torch.float64, device=ec.device)
        for j, e in enumerate(ec):
            c, sq = self.xc.mT @ e, e.mT @ e
            out[:, j] = torch.stack([(self.gram * c).sum(), c.square().sum(), (c * c.mT).sum(), (self.gram * sq).sum(),
                                     (c * sq).sum(), sq.square().sum()])
        return out

    def observed(self, chunk: Sequence[int], snr: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The chunk's draws at level `snr`: their observed CKA against the reference, HSIC(L, L) (`prepare`'s "self")
        and, for debiased CKA, sum r_y (`prepare`'s "total"), each [m] float64, from the terms kept per draw."""
        state = self._chunk(tuple(chunk))
        a, b = planted_weights(snr)
        n = self.xc.shape[0]
        gc, cc, ctc, ge, ce, ee = state["observed"]
        gg = self.gram.square().sum()
        cross = a * a * gg + 2 * a * b * gc + b * b * cc  # ||y'x||^2
        square = a ** 4 * gg + 4 * a ** 3 * b * gc + 2 * a * a * b * b * (cc + ctc + ge) + 4 * a * b ** 3 * ce + b ** 4 * ee  # ||y'y||^2
        if self.kind == "linear":
            return ratio(cross, self.reference["self"], square), square, None
        rows = a * a * self.rows + 2 * a * b * state["q"] + b * b * state["u"]  # r_y [m, n]
        total = rows.sum(-1)
        self_y = debiased_hsic(square, rows, rows, total, total, n)
        self_y = torch.where(self_y <= HSIC_RTOL * total.square(), 0.0, self_y)
        cross = debiased_hsic(cross, self.rows, rows, self.reference["total"], total, n)
        return ratio(cross, self.reference["self"], self_y), self_y, total

    def partner(self, seed: int, snr: float) -> torch.Tensor:
        """Draw `seed`'s partner at level `snr`, a x + b e (float64 [n, d]): `planted_representations`' draw, bit for bit."""
        a, b = planted_weights(snr)
        return a * self.planted + b * self.noise(seed)

    def complete(self, chunk: Sequence[int]) -> bool:
        """Whether every permutation's terms of this chunk are computed: its draws' full tests then cost no product (the
        Gram engine computes them all when the chunk is first used)."""
        return bool(self._chunk(tuple(chunk))["done"].all())

    def _centred_noise(self, chunk: tuple[int, ...]) -> torch.Tensor:
        noise = torch.stack([self.noise(s) for s in chunk])
        return noise - noise.mean(-2, keepdim=True)

    def _noise(self, chunk: tuple[int, ...]) -> torch.Tensor:
        if chunk not in self._resident:
            self._keep(chunk, self._centred_noise(chunk).float())
        self._resident.move_to_end(chunk)
        return self._resident[chunk]

    def _keep(self, chunk: tuple[int, ...], noise: torch.Tensor) -> None:
        """Hold a chunk's float32 centred noise for its next fill, the least recently used dropped beyond `NOISE_BYTES`
        (the levels visit the chunks in turn: at n = 5,000, d = 768 a chunk's is 154 MB and remaking it 2 s)."""
        self._resident[chunk] = noise
        while len(self._resident) > 1 and sum(one.nbytes for one in self._resident.values()) > NOISE_BYTES:
            self._resident.popitem(last=False)

    def _fill(self, chunk: tuple[int, ...], block: torch.Tensor) -> None:
        state = self._chunks[chunk]
        missing = block[~state["done"][block]]
        for todo in missing.split(SHARED_PERMS):  # M_p of SHARED_PERMS permutations at a time: 47 MB at d = 768
            self._fill_part(state, chunk, todo)

    def _fill_part(self, state: dict, chunk: tuple[int, ...], todo: torch.Tensor) -> None:
        perms, ec, xc = state["perms"][todo], self._noise(chunk), self.x["xc"]
        d = xc.shape[1]
        shared = torch.empty(len(todo), d, d, dtype=torch.float64, device=xc.device)
        for start, products in permuted_products(xc, xc, perms):
            shared[start:start + len(products)] = products
        state["shared"][0, todo] = frob(shared).square()
        for j in range(len(chunk)):  # each draw's products over all these permutations: one set of buffers
            for start, products in permuted_products(xc, ec[j], perms):
                part = slice(start, start + len(products))
                state["draw"][0, j, todo[part]] = torch.bmm(shared[part].view(len(products), 1, -1), products.view(len(products), -1, 1)).view(-1)
                state["draw"][1, j, todo[part]] = frob(products).square()
        self.products += len(todo) * (1 + len(chunk))
        state["shared"][1, todo] = self.rows[perms] @ self.rows
        state["draw"][2][:, todo] = state["q"][:, perms] @ self.rows
        state["draw"][3][:, todo] = state["u"][:, perms] @ self.rows
        state["done"][todo] = True

    def _fill_gram(self, state: dict, ec: torch.Tensor) -> None:
        """Every permutation's terms of a chunk (centred float32 noise ec [m, n, d]) by the Gram engine (class
        docstring): the draws' Gram matrices a group of them at a time within `GRAM_BYTES`."""
        xc, perms = self.x["xc"], state["perms"]
        n, m = xc.shape[0], len(ec)
        if self._gram is None:
            self._gram = (self.xc @ self.xc.mT).float()  # in float64, then rounded
        group = max(1, (GRAM_BYTES // (4 * n * n) - 1) // 2)
        upper = permuted_cross_reads_upper(self._gram)  # the sums read the draws' matrices on and above the diagonal only
        for start in range(0, m, group):
            draws = list(range(start, min(m, start + group)))
            first = int(start == 0)  # the reference's own terms with the first group
            grams = torch.empty(first + 2 * len(draws), n, n, dtype=torch.float32, device=xc.device)
            if first:
                grams[0] = self._gram
            for row, j in enumerate(draws):
                symmetric, noise = grams[first + 2 * row], grams[first + 2 * row + 1]
                if upper:  # S = [x_c e_c] [e_c x_c]' / 2 and e_c e_c' on and above the diagonal only, in blocks of rows
                    halves, swapped = torch.cat([0.5 * xc, 0.5 * ec[j]], 1), torch.cat([ec[j], xc], 1)
                    for top in range(0, n, GRAM_ROWS):
                        rows = slice(top, top + GRAM_ROWS)
                        torch.mm(halves[rows], swapped[top:].mT, out=symmetric[rows, top:])
                        torch.mm(ec[j][rows], ec[j][top:].mT, out=noise[rows, top:])
                    del halves, swapped
                else:
                    torch.mm(xc, ec[j].mT, out=noise)  # x_c e_c', through the noise's slot
                    torch.add(noise, noise.mT, out=symmetric).mul_(0.5)
                    torch.mm(ec[j], ec[j].mT, out=noise)
            sums = permuted_cross(self._gram, grams, perms)
            del grams
            if first:
                state["shared"][0] = sums[0]
            state["draw"][0, draws] = sums[first::2]
            state["draw"][1, draws] = sums[first + 1::2]
        self.grams += m * self.n_perm
        state["shared"][1] = self.rows[perms] @ self.rows
        state["draw"][2] = state["q"][:, perms] @ self.rows
        state["draw"][3] = state["u"][:, perms] @ self.rows
        state["done"][:] = True

    def side(self) -> NullSide:
        """The reference's `NullSide` at the terms' groups (computed once)."""
        if self._side is None:
            self._side = null_side(self.reference, self.kind, self.groups)
        return self._side

    def level(self, chunk: Sequence[int], snr: float) -> tuple[torch.Tensor, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
        """(the observed CKA [m] of the chunk's draws at level `snr` (`observed`), null(draws, block) -> their null CKA
        [len(draws), len(block)] under the chunk's permutations `block` (indices))."""
        key = tuple(chunk)
        observed, self_y, total_y = self.observed(key, snr)
        a, b = planted_weights(snr)
        n = self.xc.shape[0]

        def null(draws: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
            draws, block = draws.to(self.xc.device), block.to(self.xc.device)
            self._fill(key, block)
            state = self._chunks[key]
            m2, rr = state["shared"][:, block]
            mn, n2, rq, ru = state["draw"][:, draws][..., block]
            cross = a * a * m2 + 2 * a * b * mn + b * b * n2
            if self.kind == "debiased":
                rxry = a * a * rr + 2 * a * b * rq + b * b * ru
                cross = cross - n / (n - 2) * rxry + (self.x["total"] * total_y[draws] / ((n - 1) * (n - 2)))[:, None]
            return ratio(cross, self.x["self"], self_y[draws, None])

        return observed, null


def planted_cka_extreme(terms: PlantedCkaTerms, chunk: Sequence[int], snr: float, tail: tuple | None = None):
    """`cka_extreme` of the planted draws of the seeds `chunk` at `snr` against the reference, from `terms`: blocks are
    indices into `terms.perms(chunk)` (pass `torch.arange(n_perm)` as `sequential_test`'s perms). Values within the
    recheck distance of the observed CKA are recomputed in float64 on the draw's partner (`partner`, made when first
    needed). `tail` as for `cka_extreme`, but only for a chunk whose terms are not all computed yet: the bound saves
    products, and where they exist the full test's decision costs none (and carries no risk)."""
    kind, n = terms.kind, terms.xc.shape[0]
    observed, null = terms.level(chunk, snr)
    partners = {}

    def partner(j: int) -> torch.Tensor:
        if j not in partners:
            partners[j] = terms.partner(chunk[j], snr)
        return partners[j]

    def extreme(draws: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        draws, block = draws.to(terms.xc.device), block.to(terms.xc.device)
        nulls, perms = null(draws, block), terms.perms(chunk)[block]
        for row, j in enumerate(draws.tolist()):
            near = (nulls[row] - observed[j]).abs() <= FLOAT32_RECHECK * observed[j].abs()
            if near.any():
                nulls[row, near] = permuted_cka(terms.planted, partner(j), perms[near], kind)
        return _at_least(nulls, observed[draws])

    extreme.decided = None
    if tail is not None and not terms.complete(chunk):
        groups, n_perm, risk, alpha = tail
        moments_ = []
        for j in range(len(chunk)):  # each partner made, summarised and dropped
            moments_.append(pair_null_moments(terms.side(), null_side(prepare(terms.partner(chunk[j], snr), kind), kind, groups), kind, n))
        mean, sd, weight = torch.stack(moments_).mT
        extreme.decided = tail_bound_decided(observed, mean, observed.new_empty(len(observed), 0), n_perm, risk,
                                             exact_sd=sd, exact_weight=weight, exceedances=stop_count(n_perm, alpha))
    return extreme


def retrieval_extreme(xs, ys: torch.Tensor):
    """`extreme` for `retrieval_permutation_test`: hits #{i : p(i) = nearest(i)} / n of each permutation
    (xs [m, n, d], or one reference [n, d] or its `CosineSide` for every draw)."""
    one = isinstance(xs, CosineSide) or xs.dim() == 2
    # each draw's sides prepared in turn (unit rows in float64: ten draws' are 300 MB a side at n = 5,000, d = 768)
    nearest = torch.stack([nearest_translation(xs if one else xs[j], ys[j]) for j in range(len(ys))])  # [m, n]
    observed = top1(nearest)

    def extreme(draws: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        draws, block = draws.to(nearest.device), block.to(nearest.device)
        null = (block[None] == nearest[draws, None, :]).double().mean(-1)
        return _at_least(null, observed[draws])

    return extreme


def spearman_matrix(d: torch.Tensor) -> torch.Tensor:
    """`xlsub.stats.inference.centred_upper(d, "spearman")` (the Mantel test's centred rank matrix of RDMs d
    [..., n, n]), bit for bit: one matrix at a time, each by its fast path where untied (continuous planted vectors)."""
    if d.dim() == 2:
        return centred_upper(d, "spearman")
    return torch.stack([spearman_matrix(one) for one in d])


def rsa_extreme(x: torch.Tensor, ys, reference: torch.Tensor | None = None, tail: tuple | None = None,
                out: torch.Tensor | None = None):
    """`extreme` for `mantel_test` (Spearman, "greater") of one reference x [n, d] against ys [m, n, d] (or, with
    `out`, an iterable of m draws [n, d], each ranked as it is made: `centred_ranks`): the
    reference's centred rank matrix (`reference`, if already computed) gathered once per permutation for all
    draws (`permuted_cross`). `tail` = (groups, n_perm, risk, alpha): `extreme.decided` as for `cka_extreme`, from the
    exact moments of r (`xlsub.similarity.moments` on the rank matrices). `out`: a [>= m, n, n] buffer in
    `rank_dtype(n)` for the draws' rank matrices, reused by the caller across chunks (each fresh GB at n = 5,000
    costs seconds of page faults)."""
    a = (spearman_matrix(rdm(x)) if reference is None else reference).to(rank_dtype(len(x)))  # exact: half the gathers' traffic
    b = centred_ranks(ys, out=out)  # one draw at a time, exact in rank_dtype
    norms = upper_norm(a) * upper_norm(b)
    observed = matrix_dots(a, b) / norms  # no [m, n, n] temporary (2 GB at n = 5,000)
    decided = None
    if tail is not None:
        groups, n_perm, risk, alpha = tail
        mean, sd, weight = moments.mantel_moments(a, b, norms, groups)
        decided = tail_bound_decided(observed, mean, observed.new_empty(len(observed), 0), n_perm, risk, exact_sd=sd, exact_weight=weight,
                                     exceedances=stop_count(n_perm, alpha))

    def extreme(draws: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        draws = draws.to(a.device)
        null = permuted_cross(a, b, block, select=draws) / norms[draws, None]  # the draws' matrices read in place
        return null >= (observed[draws] - MANTEL_TIE * observed[draws].abs().clamp_min(1.0))[:, None]

    extreme.decided = decided
    return extreme


def measure_extreme(measure: str, x: torch.Tensor, ys: torch.Tensor, kind: str = "debiased", reference=None, tail: tuple | None = None,
                    out: torch.Tensor | None = None):
    """`extreme` of `measure` (cka, rsa, retrieval) for one reference x [n, d] against draws ys [m, n, d]
    (`reference`: RSA's rank matrix of x, `spearman_matrix(rdm(x))`, or retrieval's `CosineSide(x)`, to reuse; `tail`: (groups, n_perm, risk, alpha)
    for the tail bound's `extreme.decided`, CKA and RSA; retrieval's is None; `out`: RSA's buffer, `rsa_extreme`, with which ys may
    also be an iterable of draws, each ranked as it is made)."""
    if measure == "cka":
        return cka_extreme(x.expand_as(ys), ys, kind, tail)
    if measure == "rsa":
        return rsa_extreme(x, ys, reference, tail, out)
    if measure == "retrieval":
        extreme = retrieval_extreme(x if reference is None else reference, ys)
        extreme.decided = None
        return extreme
    raise ValueError(f"unknown measure {measure!r}; use one of {MEASURES}")


# -- power at a level, and the levels --------------------------------------------------------------------

@dataclass(frozen=True)
class Power:
    """Power at one level: `detected` of `n_draws` draws, `power` = their share, (`lo`, `hi`) its Wilson 95%
    interval; `permutations`: the permutations the draws' tests evaluated in all (early stopping included)."""

    snr: float
    n_draws: int
    detected: int
    power: float
    lo: float
    hi: float
    permutations: int


def draw_seed(seed: int, draw: int) -> int:
    """Draw j's seed: its noise (the same at every level) and, for a chunk's first draw, the chunk's permutations."""
    return seed * 100_003 + draw


def rate(snr: float, draws: int, detected: int, permutations: int) -> Power:
    """Power from `detected` of `draws` draws, with its Wilson 95% interval."""
    lo, hi = wilson_interval(detected, draws)
    return Power(snr, draws, detected, detected / draws if draws else math.nan, lo, hi, permutations)


def detection_rate(test: Callable[[Sequence[int]], Sequential], draws: int, seed: int, snr: float = math.nan,
                   chunk: int = CHUNK, target: float | None = None) -> Power:
    """Power from `draws` tests: `test(seeds)` runs one chunk of draws (seeds `draw_seed(seed, j)`).

    `target` (the bisection's, `power_curve`): stop drawing once the level's side of the target is settled, where
    after a chunk the Wilson interval of the draws so far at level 1 - 0.05 / K (K = the chunks a level can take:
    Bonferroni over its looks) lies wholly above or below it. Such a level reports the draws it used (`n_draws`)
    and their 95% interval; a level near the target, where the detection limit is decided, uses all `draws`."""
    looks = max(1, math.ceil(draws / chunk))
    detected, evaluated, used = 0, 0, 0
    for start in range(0, draws, chunk):
        result = test([draw_seed(seed, j) for j in range(start, min(draws, start + chunk))])
        release_freed_memory()  # the chunk's draws and buffers, before the next chunk's
        detected += int(result.detected.sum())
        evaluated += int(result.used.sum())
        used = min(draws, start + chunk)
        if target is not None and used < draws:
            lo, hi = wilson_interval(detected, used, 1 - 0.05 / looks)
            if lo > target or hi < target:
                break
    return rate(snr, used, detected, evaluated)


def planted_power(measure: str, base: torch.Tensor, snr: float, groups=None, draws: int = 50, seed: int = 0,
                  kind: str = "debiased", n_perm: int = N_PERM, alpha: float = ALPHA, chunk: int = CHUNK,
                  terms: PlantedCkaTerms | None = None, target: float | None = None) -> Power:
    """Power of `measure`'s test at `groups`' null (None: all pairings) against a planted shared signal:
    `base` [n, d] (the reference's vectors; centred and scaled) against `draws` partners sharing it at `snr`
    (`planted_representations`, in the reference's space), each tested sequentially (`sequential_test`).
    `terms` (CKA: `planted_cka_terms` of the same base, groups, seed, kind, n_perm and chunk): the null from
    terms kept for every level (`PlantedCkaTerms`), the same test up to float32 rounding below its recheck.
    `target`: stop drawing once the level's side of it is settled (`detection_rate`)."""
    x = planted_representations(base, ["reference"], math.inf, 0, rotate=False)["reference"]
    reference = spearman_matrix(rdm(x)).to(rank_dtype(len(x))) if measure == "rsa" else CosineSide(x) if measure == "retrieval" else None
    ranks = torch.empty(min(chunk, draws), *reference.shape, dtype=rank_dtype(len(x)), device=x.device) if measure == "rsa" else None  # one buffer for every chunk
    tail = (groups, n_perm, TAIL_RISK, alpha)

    def test(seeds: Sequence[int]) -> Sequential:
        if measure == "cka" and terms is not None:  # no partner made unless a recheck or the tail bound needs it
            extreme = planted_cka_extreme(terms, seeds, snr, tail)
            return sequential_test(extreme, len(seeds), torch.arange(n_perm), alpha, decided=extreme.decided)
        draws = (planted_representations(base, ["planted"], snr, s, rotate=False)["planted"] for s in seeds)
        # RSA ranks each draw as it is made (the draws' 300 MB of vectors at n = 5,000 never held at once, beside the
        # rank buffer); CKA and retrieval take them stacked
        ys = draws if measure == "rsa" else torch.stack(list(draws))
        perms = permutations(x.shape[0], n_perm, seeds[0], groups)
        extreme = measure_extreme(measure, x, ys, kind, reference, tail, ranks)
        del ys  # what the permutations need is in `extreme` (RSA: the draws' rank matrices, not their 300 MB of vectors)
        return sequential_test(extreme, len(seeds), perms, alpha, decided=extreme.decided)

    return detection_rate(test, draws, seed, snr, chunk, target)


def planted_engine(n: int, d: int, engine: str = "auto") -> str:
    """`PlantedCkaTerms`' engine for n sentences of d dimensions: "gram" for "auto" where n * `GRAM_RATIO` < d^2 and the
    reference's and one draw's Gram matrices (3 n^2 float32) fit `GRAM_BYTES`, else "feature"."""
    if engine not in PLANTED_ENGINES:
        raise ValueError(f"PlantedCkaTerms: engine must be one of {PLANTED_ENGINES}, not {engine!r}")
    if engine == "auto":
        return "gram" if n * GRAM_RATIO < d * d and 12 * n * n <= GRAM_BYTES else "feature"
    return engine


def planted_cka_terms(base: torch.Tensor, groups=None, kind: str = "debiased", n_perm: int = N_PERM,
                      engine: str = "auto") -> PlantedCkaTerms | None:
    """`PlantedCkaTerms` for `planted_power`'s CKA draws of `base` (None for rbf CKA, which has no feature space)."""
    if kind not in ("linear", "debiased"):
        return None
    x = planted_representations(base, ["reference"], math.inf, 0, rotate=False)["reference"]
    return PlantedCkaTerms(x, lambda s: planted_representations(base, ["planted"], 0.0, s, rotate=False)["planted"], kind, n_perm,
                           groups, engine)


def power_curve(measure: str, base: torch.Tensor, groups=None, draws: int = 50, seed: int = 0, kind: str = "debiased",
                n_perm: int = N_PERM, bracket: tuple[float, float] = BRACKET, bisections: int = BISECTIONS,
                target: float = TARGET, start: float | None = None) -> tuple[list[Power], float]:
    """`bisect_power` of `planted_power` for one measure: (the tested levels, the detection limit). CKA's levels
    share one `PlantedCkaTerms`, so each draw's null terms are computed once for all levels; a level stops drawing
    once its side of the target is settled (`detection_rate`). `start`: where the search begins (`bisect_power`)."""
    terms = planted_cka_terms(base, groups, kind, n_perm) if measure == "cka" else None
    return bisect_power(lambda snr: planted_power(measure, base, snr, groups, draws, seed, kind, n_perm, terms=terms, target=target),
                        bracket, bisections, target, start)


def bisect_power(power_at: Callable[[float], Power], bracket: tuple[float, float] = BRACKET,
                 bisections: int = BISECTIONS, target: float = TARGET, start: float | None = None) -> tuple[list[Power], float]:
    """The levels of a power curve, by bisection on log SNR: the bracket cut into 2^bisections equal steps of
    log SNR (levels lo = g_0 < ... < g_K = hi), and a binary search for the first level with power >= `target`,
    power taken to grow with SNR. Each tested level halves the candidates (the K + 1 levels, or none), so at
    most bisections + 1 levels are tested and an end of the bracket only when the search reaches it: the
    answer of the bracket plus `bisections` midpoints, with the same resolution (a factor
    (hi / lo)^(1 / 2^bisections)), without paying for both ends. Returns (the tested levels by SNR, the
    detection limit: the smallest tested SNR with power >= target, NaN if none).

    `start` (an SNR: e.g. another measure's detection limit on the same data, where this one's is likely near): the
    search begins at the grid level nearest it and steps away from it by 1, 2, 4, ... levels (down while power >=
    target, up while below) until the crossing is bracketed, then bisects what is left. The same answer on the same
    grid for a power that grows with SNR; two levels where the crossing is next to `start` instead of about
    bisections + 1, at most about twice as many where it is far."""
    lo, hi = bracket
    steps = 2 ** bisections
    grid = [lo * (hi / lo) ** (k / steps) for k in range(steps + 1)]
    below, above = -1, steps + 1  # power < target at grid[:below + 1], >= target from grid[above] on (steps + 1: none)
    tested = {}

    def reaches(k: int) -> bool:
        tested[grid[k]] = power_at(grid[k])
        return tested[grid[k]].power >= target

    if start is not None and math.isfinite(start) and start > 0:
        k = min(steps, max(0, round(math.log(start / lo) / math.log(hi / lo) * steps)))
        down, step = reaches(k), 1
        below, above = (below, k) if down else (k, above)
        while above - below > 1:  # step away from the start, doubling, until a level on the other side
            k = above - step if down else below + step
            if not below < k < above:
                break
            if reaches(k):
                above = k
            else:
                below = k
            if (tested[grid[k]].power >= target) != down:
                break
            step *= 2
    while above - below > 1:
        k = (below + above) // 2
        below, above = (below, k) if reaches(k) else (k, above)
    levels = [tested[snr] for snr in sorted(tested)]
    reached = [level.snr for level in levels if level.power >= target]
    return levels, min(reached) if reached else math.nan


def length_only_power(lengths: dict[str, torch.Tensor], d: int, groups=None, draws: int = 50, seed: int = 0,
                      kind: str = "debiased", measures: Sequence[str] = ("cka", "retrieval"), n_perm: int = N_PERM,
                      alpha: float = ALPHA, chunk: int = CHUNK, device: torch.device | str = "cpu") -> dict[str, Power]:
    """The negative control's rejection rate: each of `measures`' tests (cka, retrieval) at `groups`' null on
    the same `draws` draws of the content-free length-only encoder (`length_only_representations`, seeded per
    draw) for the two languages of `lengths` ({lang: token counts without <s>, </s>}, reference first). At the
    length-restricted null it should be about alpha. Not RSA: with both languages redrawn, its Mantel null
    costs an n^2 gather per permutation and draw. The draws are made on the CPU and tested on `device`. Returns
    {measure: Power} (snr NaN)."""
    if not set(measures) <= {"cka", "retrieval"}:
        raise ValueError(f"length_only_power: measures must be cka or retrieval, got {list(measures)}")
    reference, other = list(lengths)[:2]
    counts = {lang: lengths[lang].long().tolist() for lang in (reference, other)}
    detected, evaluated = dict.fromkeys(measures, 0), dict.fromkeys(measures, 0)
    for start in range(0, draws, chunk):
        seeds = [draw_seed(seed, j) for j in range(start, min(draws, start + chunk))]
        encoded = [length_only_representations(counts, d, s) for s in seeds]
        xs, ys = (torch.stack([r[lang] for r in encoded]).to(device) for lang in (reference, other))
        del encoded  # the stacks are copies: 600 MB a chunk at n = 5,000
        perms = permutations(xs.shape[1], n_perm, seeds[0], groups)
        for measure in measures:
            extreme = cka_extreme(xs, ys, kind) if measure == "cka" else retrieval_extreme(xs, ys)
            result = sequential_test(extreme, len(seeds), perms, alpha)
            del extreme  # its prepared copies of the draws, before the next measure prepares its own
            detected[measure] += int(result.detected.sum())
            evaluated[measure] += int(result.used.sum())
        del xs, ys
        release_freed_memory()  # the chunk's draws and what the tests made of them, before the next chunk's
    return {measure: rate(math.nan, draws, detected[measure], evaluated[measure]) for measure in measures}
