"""Translation retrieval (Libovicky et al. 2020) with its permutation null (issue 12).

`retrieval_top1`: the fraction of sentences whose nearest neighbour (cosine, each language centred on its
own mean) among the other language's sentences is their translation; `retrieval_permutation_test` tests
it against re-pairings, with the permutations of `xlsub.similarity.permutation`. `unit_rows` is the cosine
geometry the RSA and kNN-graph measures share with it.
"""

from __future__ import annotations

import functools
import math
from functools import partial

import numpy as np
import torch

from xlsub.devices import native_16bit_products
from xlsub.similarity.permutation import PermutationResult, permutation_result, permutations
from xlsub.stats import inference
from xlsub.stats.workers import side_by_side

# Rows of x per similarity block in retrieval (a block x n matrix at a time).
_ROW_BLOCK = 1024
# Bytes of screened similarities per call of the compiled loop (a whole layer at n = 5,000 in bfloat16: 50 MB).
_COMPILED_BLOCK_BYTES = 1 << 26
# Screening candidates a row may have for a pairwise float64 recheck; a row with more is screened again in
# float32 (the pairwise gather reads d float64 per candidate: cheaper than a float32 row only for a few).
_FEW = 8


def unit_rows(x: torch.Tensor, centre: bool) -> torch.Tensor:
    """x in float64, centred over examples if asked, rows scaled to unit length (zero rows stay zero); in one new
    tensor, centred and scaled in place (each new one of a 13-layer, 5,000-sentence side is 400 MB to fault in)."""
    x = x.to(torch.float64, copy=True)
    if centre:
        x.sub_(x.mean(-2, keepdim=True))
    return x.div_(torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny))


def _screen_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where the CPU multiplies it through oneDNN (float32 accumulation: AVX512-BF16 or AMX, about
    6x float32's rate here), else int8 where oneDNN's integer product is exact on this CPU (`_int8_exact`: 2.5x
    float32's rate on an AVX2-only CPU), float32 elsewhere: the screen's error bound below assumes float32
    accumulation, which cuBLAS does not promise for bfloat16 (its reduced-precision reductions are on by default in
    torch)."""
    if device.type != "cpu":
        return torch.float32
    if native_16bit_products(torch.bfloat16):
        return torch.bfloat16
    return torch.int8 if _int8_exact() else torch.float32


@functools.cache
def _int8_exact() -> bool:
    """Whether oneDNN's quantized linear (`torch.ops.onednn.qlinear_pointwise`) multiplies the int8 screen's operands
    exactly on this CPU: 7-bit unsigned rows (zero point 64) by 8-bit signed ones, extremes included, into float32
    products equal to the integer ones (CPUs without VNNI add pairs of products in 16 bits, which 7 bits on one side
    keep from saturating; 8 bits on both sides do saturate there)."""
    try:
        g = torch.Generator().manual_seed(0)
        low = torch.randint(1, 128, (64, 96), dtype=torch.uint8, generator=g)
        high = torch.randint(-127, 128, (40, 96), dtype=torch.int8, generator=g)
        low[0], low[1], high[0], high[1] = 127, 1, 127, -127
        screened = _int8_product(low, torch.ops.onednn.qlinear_prepack(high, list(high.shape)), torch.ones(len(high)))
        return bool(torch.equal(screened.double(), (low.double() - 64) @ high.double().mT))
    except (AttributeError, RuntimeError, NotImplementedError, TypeError):  # no oneDNN, or an operator of another signature
        return False


def _int8_product(low: torch.Tensor, packed, steps: torch.Tensor) -> torch.Tensor:
    """float32 [r, m]: (low - 64) @ high' (int32, exact), column j times steps[j] (float32), by oneDNN; low [r, d] uint8,
    packed: `qlinear_prepack` of high [m, d] int8."""
    return torch.ops.onednn.qlinear_pointwise(low, 1.0, 64, packed, steps.float(), torch.zeros(len(steps), dtype=torch.long), None,
                                              1.0, 0, torch.float32, "none", [], "")


def screen_error(dtype: torch.dtype, d: int) -> float:
    """A bound on |screened cosine - float64 cosine| for unit vectors of length d rounded to `dtype` (unit
    roundoff u each), multiplied with float32 accumulation (at most 1.1 d eps32 of the sum of |products|)
    and, for bfloat16, the product rounded back to bfloat16 (u): 2u + u^2 from the inputs (Cauchy-Schwarz
    over unit vectors), 3u + 5u^2 with the output's rounding. For int8 (`int8_errors`): each side's rounding at its
    largest, sqrt(d) / (2 levels), and their product, plus the float32 output's."""
    if dtype == torch.int8:
        low, high = (math.sqrt(d) / (2 * levels) for levels in INT8_LEVELS)
        return low + high + low * high + int8_errors(d)
    u = torch.finfo(dtype).eps / 2
    inputs = 2 * u + u * u
    output = u * (1 + inputs) if dtype != torch.float32 else 0.0
    return inputs + output + 1.1 * d * torch.finfo(torch.float32).eps * (1 + u) ** 2


def screen_margins(best: torch.Tensor, x_rounding: torch.Tensor, y_rounding: torch.Tensor, dtype: torch.dtype, d: int) -> torch.Tensor:
    """Per row of a screen: how far below the row's screened best a screened similarity may lie and still be, in
    float64, the best or tied with it (twice a bound on |screened - float64| for the row's candidates), never more
    than the worst case 2 `screen_error`.

    The inputs' rounding error is measured, not bounded: with x^ = x + dx, y^ = y + dy (unit rows),
    |x^.y^ - x.y| <= |dx| + |dy| + |dx||dy|, where `x_rounding` [r] = |dx| of each row and `y_rounding` the largest
    |dy| of the candidates' side (typically half the roundoff u of the worst case, |dx| <= u). The float32
    accumulation adds at most 1.1 d eps32 (1 + u)^2, as in `screen_error`. A bfloat16 output rounds the sum v
    by at most u |v|: a candidate's screened value lies at most 2 `screen_error` below the row's screened best
    (the margin never exceeds that), so |v| <= (|best| + 2 screen_error)(1 + 2u) <= |best| + 3 screen_error
    (2u (1 + 3 screen_error) <= screen_error, as |best| <= 1 + screen_error and screen_error >= 3u). Near chance
    (cosines about 0.1) this term is a tenth of the worst case's u."""
    u = torch.finfo(dtype).eps / 2
    worst = screen_error(dtype, d)
    inputs = x_rounding + y_rounding + x_rounding * y_rounding + 1.1 * d * torch.finfo(torch.float32).eps * (1 + u) ** 2
    output = u * (best.double().abs() + 3 * worst) if dtype != torch.float32 else torch.zeros_like(inputs)
    return torch.clamp_max(2 * (inputs * (1 + u) + output), 2 * worst)


# The int8 screen's integer levels: the unsigned side of oneDNN's product rounds to -63..63 (7 bits), the signed
# side to -127..127 (8 bits).
INT8_LEVELS = (63, 127)


def int8_errors(d: int) -> float:
    """A bound on the int8 screen's error beyond its inputs' rounding: the exact integer product times the other
    side's step rounded to float32 and the product rounded to float32 (2 u32 relative, taken as 3 eps32 = 6 u32) of
    a cosine of vectors no longer than 1 + sqrt(d) / (2 levels) each, plus 1e-12 for the rotation's float64
    sums (about log2(d) eps64 relative)."""
    low, high = (math.sqrt(d) / (2 * levels) for levels in INT8_LEVELS)
    return 3 * torch.finfo(torch.float32).eps * (1 + low) * (1 + high) + 1e-12


def int8_rotation(d: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The int8 screen's rotation of d coordinates (`compiled_nearest.rotate`): signs +-1 (seeded: the same rotation
    for every side, as their dot products need), the order that deals coordinate k to block k mod (d / block), and
    the block, the largest power of two dividing d (256 at d = 768; 1, no mixing, at odd d)."""
    block = d & -d if d else 1
    blocks = d // block
    order = np.arange(d).reshape(block, blocks).T.reshape(-1) if d else np.arange(0)
    signs = np.random.default_rng(0).choice(np.array([-1.0, 1.0]), size=d)
    return signs, np.ascontiguousarray(order), block


class CosineSide:
    """One side of retrieval: rows centred on their own mean and scaled to unit length (`unit`, float64), the same
    rounded to the screening dtype (`screen`), and each row's rounding error |screen - unit| (`rounding`, float64
    [..., n], for `screen_margins`). Prepare a side once to retrieve against it many times (the reference language
    against every other).

    On the CPU (`_compiled`) one compiled pass a row makes the screen and the rounding error
    (`xlsub.similarity.compiled_nearest.side_bfloat16`), keeping the rows themselves (`rows`: x, not copied where it is
    float32 or float64 and contiguous, so it must not change while the side is used), their `mean` [..., d] and each
    row's `scale` (1 / its centred norm) [..., n] instead of a float64 copy: `unit` is made only when asked for. Elsewhere
    `unit` is made at once (`unit_rows`) and `rows` is None.

    The int8 screen (`dtype` torch.int8, the CPU's loops only) rotates the unit rows (`compiled_nearest.rotate`) and
    keeps two roundings of them: `screen` (7 bits, uint8), `step` and `rounding` where the side `serves` as x (the rows
    retrieving), `weights` (8 bits, int8), `weight_step` and `weight_rounding` where it serves as y (the rows
    retrieved; packed once a layer for oneDNN, `packed`); a side made by the caller serves as both."""

    def __init__(self, x: torch.Tensor, dtype: torch.dtype | None = None, serves: str = "both"):
        if dtype is None:
            dtype = _screen_dtype(x.device)
            dtype = torch.float32 if dtype == torch.int8 and not _compiled(x, dtype) else dtype  # a tensor the loops do not read
        if serves not in ("x", "y", "both"):
            raise ValueError(f"retrieval: serves must be 'x', 'y' or 'both', not {serves!r}")
        self.shape, self.dtype, self.serves = x.shape, dtype, serves
        if dtype == torch.int8 and not _compiled(x, dtype):
            raise ValueError(f"retrieval: the int8 screen runs in the CPU's compiled loops only; x is on {x.device}")
        if not _compiled(x, dtype):
            self.rows, self._unit = None, unit_rows(x, True)
            self.screen = self._unit.to(dtype)
            flat_unit, flat_screen = self._unit.reshape(-1, *x.shape[-2:]), self.screen.reshape(-1, *x.shape[-2:])
            self.rounding = torch.stack([torch.linalg.vector_norm(s.double().sub_(u), dim=-1)  # a layer at a time: no float64 copy of all
                                         for s, u in zip(flat_screen, flat_unit)]).reshape(x.shape[:-1]) if len(flat_unit) else \
                torch.zeros(x.shape[:-1], dtype=torch.float64, device=x.device)  # no layers
            return
        from xlsub.similarity import compiled_nearest  # numba, imported where it is used

        n, d = x.shape[-2:]
        self.rows, self._unit = (x if x.dtype in (torch.float32, torch.float64) else x.float()).contiguous(), None
        self._unit32: dict[int, np.ndarray] = {}
        rows = self.rows.reshape(-1, n, d).numpy()
        self.mean = torch.empty(len(rows), d, dtype=torch.float64)
        self.scale = torch.empty(len(rows), n, dtype=torch.float64)
        self.rounding = torch.empty(len(rows), n, dtype=torch.float64)
        self.screen = torch.empty(len(rows), n, d, dtype=dtype) if dtype != torch.int8 else None
        mean, scale, rounding = self.mean.numpy(), self.scale.numpy(), self.rounding.numpy()
        if dtype == torch.int8:
            kernel = self._int8_kernel(len(rows), n, d, serves)
        else:
            screen, side = (self.screen.view(torch.int16).numpy(), compiled_nearest.side_bfloat16) if dtype == torch.bfloat16 else \
                (self.screen.numpy(), compiled_nearest.side_float32)
            kernel = lambda layer, start, stop: side(rows[layer], mean[layer], start, stop, scale[layer], screen[layer], rounding[layer])  # noqa: E731
        for layer in range(len(rows)):
            compiled_nearest.column_mean(rows[layer], mean[layer])
        split = max(1, torch.get_num_threads() // max(1, len(rows)))  # a single layer's rows split between the threads
        parts = [(layer, int(part[0]), int(part[-1]) + 1) for layer in range(len(rows)) for part in np.array_split(np.arange(n), split) if len(part)]
        side_by_side(lambda part: kernel(*part), parts)
        lead = x.shape[:-2]
        self.mean, self.scale = self.mean.reshape(*lead, d), self.scale.reshape(*lead, n)
        self.rounding = self.rounding.reshape(*lead, n) if dtype != torch.int8 or serves != "y" else self.rounding
        if dtype == torch.int8:  # a rounding not made keeps its empty arrays
            self.screen, self.step = (t.reshape(*lead, *t.shape[1:]) if serves != "y" else t for t in (self.screen, self.step))
            self.weights, self.weight_step, self.weight_rounding = (t.reshape(*lead, *t.shape[1:]) if serves != "x" else t
                                                                    for t in (self.weights, self.weight_step, self.weight_rounding))
            return
        self.screen = self.screen.reshape(x.shape)

    def _int8_kernel(self, layers: int, n: int, d: int, serves: str):
        """The int8 screen's arrays, made here, and the compiled pass that fills a layer's rows: `screen` (the rows
        rotated and rounded to 7 bits, uint8, the unsigned side of the product where this side is x), `step` and
        `rounding` of each row; `weights` (8 bits, int8, the signed side where this side is y), `weight_step` and
        `weight_rounding`; the rotation's `block`. Only the rounding it `serves` for is made (as x, y, or both; the other
        is left with no layers): `nearest_translation` prepares its own sides for one use."""
        from xlsub.similarity import compiled_nearest

        low, high = (layers if serves in (role, "both") else 0 for role in ("x", "y"))
        signs, order, self.block = int8_rotation(d)
        self.screen = torch.empty(low, n, d, dtype=torch.uint8)
        self.weights = torch.empty(high, n, d, dtype=torch.int8)
        self.step, self.weight_step, self.weight_rounding = (torch.empty(count, n, dtype=torch.float64) for count in (low, high, high))
        self.rounding = self.rounding[:low]
        self._packed: dict[int, object] = {}
        arrays = [t.numpy() for t in (self.rows.reshape(layers, n, d), self.mean, self.scale, self.screen, self.step, self.rounding,
                                       self.weights, self.weight_step, self.weight_rounding)]
        rows, mean, scale, low, low_step, low_rounding, high, high_step, high_rounding = arrays
        none, no_rows = np.empty((0, d), np.uint8), np.empty(0)

        def part(layer: int, start: int, stop: int) -> None:
            made = [(low[layer], low_step[layer], low_rounding[layer]) if len(low) else (none, no_rows, no_rows),
                    (high[layer], high_step[layer], high_rounding[layer]) if len(high) else (none.view(np.int8), no_rows, no_rows)]
            compiled_nearest.side_int8(rows[layer], mean[layer], start, stop, scale[layer], signs, order, self.block, *made[0], *made[1])
        return part

    def unit32(self, layer: int) -> np.ndarray:
        """One layer's centred unit rows rounded to float32 (flat layer index; [n, d], made when first asked for and kept,
        200 MB for a 13-layer side at n = 5,000): the int8 screen's float32 stage (`compiled_nearest._answer`)."""
        from xlsub.similarity import compiled_nearest

        if layer not in self._unit32:
            n, d = self.shape[-2:]
            rows, mean, scale = (t.reshape(-1, *t.shape[len(self.shape) - 2:])[layer].numpy() for t in (self.rows, self.mean, self.scale))
            self._unit32[layer] = np.empty((n, d), np.float32)
            compiled_nearest.unit_float32(rows, mean, scale, 0, n, self._unit32[layer])
        return self._unit32[layer]

    def packed(self, layer: int):
        """oneDNN's packed form of one layer's `weights` (flat layer index), made once and kept: a reference side
        serves as y against every other language."""
        if layer not in self._packed:
            weights = self.weights.reshape(-1, *self.shape[-2:])[layer]
            self._packed[layer] = torch.ops.onednn.qlinear_prepack(weights, list(weights.shape))
        return self._packed[layer]

    @property
    def unit(self) -> torch.Tensor:
        """The centred unit rows, float64 [..., n, d] (on the CPU's path: (rows - mean) * scale, made when first asked for)."""
        if self._unit is None:
            self._unit = (self.rows.double() - self.mean.unsqueeze(-2)) * self.scale.unsqueeze(-1)
        return self._unit


def nearest_translation(x, y) -> torch.Tensor:
    """For each row i of x [..., n, d], the row of y [..., n, d] most cosine-similar to it, or -1 on a tie.

    Each language is centred on its own mean first (Libovicky et al. 2020); x or y may be a `CosineSide`
    prepared once, and their leading dimensions broadcast. -1 where the largest similarity is shared by two
    rows of y (also where a centred row is zero: all its similarities are 0). The answer is float64's:
    similarities are screened at a lower precision in blocks of rows of x (a block x n matrix at a time),
    every row of y within the row's `screen_margins` of its screened best is a candidate (no other can be the
    float64 best or tie with it), a row with one candidate is answered, and the candidates of the others
    are compared in float64: on the CPU by compiled loops (`_compiled_nearest`: every candidate's float64 cosine,
    however many), elsewhere by torch (`_nearest_rows`).
    """
    prepared = [side.dtype for side in (x, y) if isinstance(side, CosineSide)]
    xs, ys = (side if isinstance(side, CosineSide) else CosineSide(side, prepared[0] if prepared else None, role)
              for side, role in ((x, "x"), (y, "y")))
    if xs.serves == "y" or ys.serves == "x":
        raise ValueError("retrieval: a side prepared to serve as x (or y) was given as the other")
    if xs.dtype != ys.dtype:
        raise ValueError(f"retrieval: x and y are screened in {xs.dtype} and {ys.dtype}; prepare both alike")
    if xs.shape[-2:] != ys.shape[-2:] or xs.shape[-2] < 2:
        raise ValueError(f"retrieval: x {tuple(xs.shape)} and y {tuple(ys.shape)} must have the same shape "
                         "(one space, so cosines compare) and at least 2 examples")
    n, d = xs.shape[-2:]
    lead = torch.broadcast_shapes(xs.shape[:-2], ys.shape[:-2])
    if xs.rows is not None and ys.rows is not None:  # both prepared for the compiled loop
        return _compiled_nearest(xs, ys, lead)
    flat = [side.expand(*lead, n, d).reshape(-1, n, d) for side in (xs.screen, xs.unit, ys.screen, ys.unit)]
    x_rounding, y_largest = xs.rounding.expand(*lead, n).reshape(-1, n), ys.rounding.amax(-1).expand(lead).reshape(-1)
    dtype, second = xs.screen.dtype, 2 * screen_error(torch.float32, d)
    out = torch.empty(flat[0].shape[0], n, dtype=torch.long, device=flat[0].device)
    for k, (x_screen, x_unit, y_screen, y_unit) in enumerate(zip(*flat)):
        y32 = y_unit.float() if dtype != torch.float32 else None  # a float32 screen goes on to float64
        for start in range(0, n, _ROW_BLOCK):
            rows = slice(start, start + _ROW_BLOCK)
            margins = partial(screen_margins, x_rounding=x_rounding[k, rows], y_rounding=y_largest[k], dtype=dtype, d=d), second
            out[k, rows] = _nearest_rows(x_screen[rows] @ y_screen.mT, x_unit[rows], y_unit, y32, margins)
    return out.reshape(*lead, n)


def _compiled(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether `CosineSide` prepares x, and `nearest_translation` answers its screened rows, by the compiled loops
    (`xlsub.similarity.compiled_nearest`): on the CPU, for a bfloat16, float32 or int8 screen (int8 has no other path:
    `_screen_dtype` never chooses it off the CPU)."""
    return inference.on_cpu(x) and dtype in (torch.bfloat16, torch.float32, torch.int8)


def _compiled_nearest(xs: CosineSide, ys: CosineSide, lead: torch.Size) -> torch.Tensor:
    """`nearest_translation` of two sides prepared for the compiled loop: each pair's screen made a block of rows at a
    time (`_COMPILED_BLOCK_BYTES`: a layer at n = 5,000), each block's rows answered by one call of the loop, split
    between the threads (`_compiled_rows`). A side broadcast over the other's leading dimensions is read in place."""
    n = xs.shape[-2]

    def index(side: CosineSide) -> torch.Tensor:
        own = side.shape[:-2]
        return torch.arange(own.numel()).reshape(own).expand(lead).reshape(-1)  # the side's layer for each pair

    def flat(side: CosineSide) -> list[torch.Tensor]:
        return [t.reshape(-1, *t.shape[len(side.shape) - 2:]) for t in (side.screen, side.rows, side.mean, side.scale, side.rounding)]

    x_index, y_index = index(xs), index(ys)
    out = torch.empty(len(x_index), n, dtype=torch.long)
    if not len(out):  # no layers
        return out.reshape(*lead, n)
    if xs.dtype == torch.int8:
        _int8_nearest(xs, ys, x_index.tolist(), y_index.tolist(), out)
        return out.reshape(*lead, n)
    x, y = flat(xs), flat(ys)
    step = max(1, _COMPILED_BLOCK_BYTES // (n * xs.screen.element_size()))
    for k, (a, b) in enumerate(zip(x_index.tolist(), y_index.tolist())):
        y_largest = float(y[4][b].max())
        for start in range(0, n, step):
            rows = slice(start, start + step)
            _compiled_rows(x[0][a, rows] @ y[0][b].mT, (x[1][a, rows], x[2][a], x[3][a, rows]), (y[1][b], y[2][b], y[3][b]),
                           x[4][a, rows], y_largest, out[k, rows])
    return out.reshape(*lead, n)


def _int8_nearest(xs: CosineSide, ys: CosineSide, x_layers: list[int], y_layers: list[int], out: torch.Tensor) -> None:
    """`_compiled_nearest` for the int8 screen, into out [pairs, n]: x's 7-bit rows times y's 8-bit rows by oneDNN (y's
    packed once a layer), a block of rows at a time (float32 products, `_COMPILED_BLOCK_BYTES`), each row's cosines
    those products times y's steps and the row's own step / block; the candidates within the row's margin (its
    measured rounding, y's largest, and `int8_errors`) compared by their float64 cosines, where a row has more than
    `compiled_nearest.STAGED` of them only those its float32 stage keeps (y's float32 unit rows, `CosineSide.unit32`,
    within twice float32's `screen_error`)."""
    from xlsub.similarity import compiled_nearest  # numba, imported where it is used

    n, d = xs.shape[-2:]
    x = [t.reshape(-1, *t.shape[len(xs.shape) - 2:]) for t in (xs.screen, xs.rows, xs.mean, xs.scale, xs.rounding, xs.step)]
    y = [t.reshape(-1, *t.shape[len(ys.shape) - 2:]) for t in (ys.rows, ys.mean, ys.scale, ys.weight_step, ys.weight_rounding)]
    accumulation, worst, margin32 = int8_errors(d), screen_error(torch.int8, d), 2 * screen_error(torch.float32, d)
    step = max(1, 2 * _COMPILED_BLOCK_BYTES // (n * 4))  # float32 products: a whole layer at n = 5,000 (oneDNN's rate is best there)
    answers = np.empty(n, dtype=np.int64)
    for k, (a, b) in enumerate(zip(x_layers, y_layers)):
        packed, y_rounding = ys.packed(b), float(y[4][b].max())
        y_arrays = [t[b].numpy() for t in y[:3]] + [ys.unit32(b)]
        for start in range(0, n, step):
            stop = min(n, start + step)
            screened = _int8_product(x[0][a, start:stop], packed, y[3][b]).numpy()
            factor = (x[5][a, start:stop] / xs.block).numpy()
            arrays = [x[1][a, start:stop].numpy(), x[2][a].numpy(), x[3][a, start:stop].numpy()]
            rounding, rows = x[4][a, start:stop].numpy(), answers[start:stop]
            parts = [part for part in np.array_split(np.arange(stop - start), max(1, min(stop - start, torch.get_num_threads()))) if len(part)]
            side_by_side(lambda part: compiled_nearest.nearest_int8(screened, *arrays, factor, *y_arrays, rounding, y_rounding, accumulation,
                                                                    worst, margin32, int(part[0]), int(part[-1]) + 1, rows), parts)
        out[k] = torch.from_numpy(answers)


def _compiled_rows(screened: torch.Tensor, x: tuple, y: tuple, x_rounding: torch.Tensor, y_rounding: float, out: torch.Tensor,
                   y32: np.ndarray | None = None) -> None:
    """`_nearest_rows`' answers written into out [r] (int64) by the compiled loop, the rows split between the threads:
    each row's candidates within its `screen_margins` compared by their float64 cosines, however many; where a row has
    more than `compiled_nearest.STAGED` and `y32` (y's float32 unit rows, `CosineSide.unit32`) is given, only those its
    float32 stage keeps. x: (rows [r, d], mean [d], scale [r]) of the block's rows, y: (rows [n, d], mean [d], scale [n])
    of the other side (`CosineSide`). `_compiled_nearest` gives no `y32`: bfloat16's rows have few candidates (at the
    study's size the stage did not pay for making the float32 rows: retrieval_table 58.3 s without, 60.4 s with)."""
    from xlsub.similarity import compiled_nearest  # numba, imported where it is used

    dtype, d = screened.dtype, x[0].shape[-1]
    u = torch.finfo(dtype).eps / 2
    bounds = u, 1.1 * d * torch.finfo(torch.float32).eps * (1 + u) ** 2, screen_error(dtype, d)
    kernel, values = (compiled_nearest.nearest_bfloat16, screened.view(torch.int16)) if dtype == torch.bfloat16 else \
        (compiled_nearest.nearest_float32, screened)
    arrays = [t.contiguous().numpy() for t in (values, *x, *y, x_rounding)]
    stage, margin32 = (y32, 2 * screen_error(torch.float32, d)) if y32 is not None else (np.empty((0, d), np.float32), 0.0)
    answers = np.empty(len(out), dtype=np.int64)
    parts = [part for part in np.array_split(np.arange(len(out)), max(1, min(len(out), torch.get_num_threads()))) if len(part)]
    side_by_side(lambda part: kernel(*arrays[:7], stage, arrays[7], y_rounding, *bounds, margin32, int(part[0]), int(part[-1]) + 1, answers),
                 parts)
    out.copy_(torch.from_numpy(answers))


def _unique_best(similarities: torch.Tensor) -> torch.Tensor:
    """Each row's largest entry's column, -1 where the largest is shared."""
    two = similarities.topk(2, dim=-1)
    return torch.where(two.values[:, 0] > two.values[:, 1], two.indices[:, 0], -1)


def _nearest_rows(screened: torch.Tensor, x_unit: torch.Tensor, y_unit: torch.Tensor, y32: torch.Tensor | None,
                  margins: tuple) -> torch.Tensor:
    """float64's nearest row of y (or -1 on a tie) for rows x_unit [r, d], from their screened similarities
    [r, n] to y_unit [n, d]: margins[0](best) gives each row's candidate margin from its screened best
    (`screen_margins`); one candidate answers a row; a few are compared pairwise in float64; more send the
    row to float32 (y32, the margin margins[1]; None: a float32 screen), then float64, whole rows."""
    top = screened.topk(min(_FEW, screened.shape[-1]), dim=-1)
    values = top.values.double()
    floor = values[:, :1] - margins[0](values[:, 0])[:, None]  # the lowest screened value a candidate can have
    count = (values >= floor).sum(-1)  # candidates among the first _FEW
    answer = top.indices[:, 0].clone()
    few = ((count > 1) & (count < top.indices.shape[-1])).nonzero().reshape(-1)
    if len(few):
        width = int(count[few].max())
        exact = (y_unit[top.indices[few, :width]] @ x_unit[few, :, None]).squeeze(-1)  # [rows, width] float64
        exact[values[few, :width] < floor[few]] = -math.inf
        best = _unique_best(exact)
        answer[few] = torch.where(best >= 0, top.indices[few].gather(1, best.clamp_min(0)[:, None]).squeeze(1), -1)
    many = (count == top.indices.shape[-1]).nonzero().reshape(-1)
    if len(many) and y32 is None:
        answer[many] = _unique_best(x_unit[many] @ y_unit.mT)
    elif len(many):
        rescreened = (x_unit[many].float() @ y32.mT).topk(2, dim=-1)
        answer[many] = rescreened.indices[:, 0]
        close = many[(rescreened.values[:, 0] - rescreened.values[:, 1]) <= margins[1]]
        if len(close):
            answer[close] = _unique_best(x_unit[close] @ y_unit.mT)
    return answer


def top1(nearest: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy from each sentence's nearest sentence (`nearest_translation`, [..., n]): the share whose nearest
    is its translation (the same index), [...] float64."""
    return (nearest == torch.arange(nearest.shape[-1], device=nearest.device)).double().mean(-1)


def retrieval_top1_per_layer(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Top-1 translation retrieval accuracy per leading index: x, y [..., n, d] -> [...] (float64).

    The fraction of sentences i whose unique nearest neighbour (cosine, after centring each language on
    its mean) among all n rows of y is its translation y_i; a tie for the top counts as a miss. Chance is
    1/n.
    """
    return top1(nearest_translation(x, y))


def retrieval_top1(x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 translation retrieval accuracy of x [n, d] against y [n, d] (see `retrieval_top1_per_layer`)."""
    if x.ndim != 2:
        raise ValueError(f"retrieval_top1 takes [n, d] inputs, got {tuple(x.shape)}; "
                         "use retrieval_top1_per_layer for [layers, n, d]")
    return float(retrieval_top1_per_layer(x, y))


def retrieval_permutation_test(x: torch.Tensor, y: torch.Tensor, n_perm: int = 1000, seed: int = 0,
                               groups=None, nearest: torch.Tensor | None = None) -> PermutationResult:
    """Top-1 retrieval of x [..., n, d] against the same for random re-pairings of y (within `groups`).

    Re-pairing moves no vector, so each x_i keeps its nearest y, m(i); under permutation p the hit count
    is #{i : p(i) = m(i)}, O(n) per permutation after one similarity pass. The permutations are
    `permutations(n, n_perm, seed, groups)`, as for CKA. `nearest`: `nearest_translation(x, y)` where the
    caller has it (the similarity pass is then skipped).
    """
    n = x.shape[-2]
    if nearest is None:
        nearest = nearest_translation(x, y)  # [..., n]
    elif nearest.shape != x.shape[:-1]:
        raise ValueError(f"retrieval_permutation_test: nearest has shape {tuple(nearest.shape)}, not x's {tuple(x.shape[:-1])}")
    perms = permutations(n, n_perm, seed, groups).to(nearest.device)
    observed = top1(nearest)
    null = (perms == nearest[..., None, :]).double().mean(-1)  # [..., n_perm]
    return permutation_result(observed, null)
