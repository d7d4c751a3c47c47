"""Centred kernel alignment (CKA) between two sets of representations of the same examples.

CKA (Kornblith et al. 2019, "Similarity of Neural Network Representations
Revisited") compares X [n, d1] and Y [n, d2], the representations of the same n
sentences, through HSIC of their kernel matrices K = k(X), L = k(Y):

    CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)).

Three estimators:
- `linear_cka`: linear kernel, biased HSIC = tr(KHLH) / (n-1)^2, computed in
  feature space: with X, Y centred over examples, tr(KHLH) = ||Y'X||_F^2, so
  CKA = ||Y'X||_F^2 / (||X'X||_F ||Y'Y||_F), O(n d^2) instead of O(n^2 d).
  `tests/reference.py` has the same number through n x n Gram matrices
  (`linear_cka_gram`), the reference for the tests and `benchmarks/cka.py`.
- `debiased_linear_cka`: linear kernel, the unbiased HSIC_1 of Song et al.
  2012, as Nguyen et al. 2021 ("Do Wide and Deep Networks Learn the Same
  Things?") use for minibatch CKA. The biased estimator gives independent
  representations a CKA well above 0 at small n (~0.2 for n=32, d=64).
- `rbf_cka`: Gaussian kernel with a median-distance bandwidth, biased HSIC.

Everything is computed in float64 by default and batched over leading dimensions: x
`[..., n, d1]` and y `[..., n, d2]` give `[...]`, e.g. one CKA per layer for
encodings `[layers+1, n, d]`. A representation that is constant over the
examples (the same vector for every sentence) has no kernel structure to
compare: its CKA is NaN, as is a debiased CKA whose HSIC_1(K, K) is not
positive. For linear kernels HSIC_1(K, K) is a U-statistic of squares,
((x_i - x_j)'(x_q - x_r))^2 / 4 over distinct i, j, q, r, so it is never
negative in exact arithmetic, but it is exactly 0 for degenerate inputs (e.g.
all examples identical but one) and rounding then leaves it at +-1e-16 of its
scale: taken literally, a square root of a negative number or a ratio of
rounding errors. Such values give NaN, never an exception.

`precision="float32"` (linear and debiased) takes about two thirds of the float64 time on CPUs, whose
float32 matrix products run at about twice the float64 rate (and far more on most GPUs): examples are
still centred in float64 and the self terms HSIC(K, K) stay float64; for the cross terms, the centred
features are rounded to float32 once, the products run in float32 over blocks of at most 4096 examples,
and the block products, their norms and every later sum are accumulated in float64. Rounding the centred
features to float32 is a relative perturbation of 6e-8, the same as storing the encodings in float32;
with the blocked products the CKA moves by a few 1e-9 at the study's sizes (n=5000, d=768;
`benchmarks/cka.py`) and by under 1e-6 in the tests. RBF kernels need float64 distances (|x_i|^2 +
|x_j|^2 - 2 x_i'x_j cancels), so rbf refuses float32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from xlsub.errors import XlsubError

KINDS = ("linear", "debiased", "rbf")
PRECISIONS = ("float64", "float32")
# A representation whose centred norm is below this fraction of its raw norm is constant over the examples
# up to float64 rounding in the centring; its CKA is 0/0.
_CONSTANT_RTOL = 1e-10
# An unbiased HSIC_1(K, K) below this fraction of its natural scale ||X||_F^4 is zero up to rounding (exactly
# zero for inputs such as one outlier among identical points; genuine values are ~1/rank(X) of it or more).
HSIC_RTOL = 1e-12
# float64 copies of every language held at once by `cka_matrix`, per chunk of leading indices (layers).
# Batching more layers into one product gains nothing once a product is as large as n x d = 5000 x 768.
_CHUNK_BYTES = 2**28
# With precision="float32", each float32 product reduces over at most this many examples; the block
# products are summed in float64, so rounding grows with the block size, not with n.
FLOAT32_BLOCK = 4096
# `self_product_sq`: rows of X'X per block product (measured at n = 5,000, d = 768, float64, 2 threads: 96 rows 47 ms,
# 128 52 ms, 192 50 ms, 256 59 ms, the whole product 75 ms)
SELF_BLOCK = 96


# -- the estimators, as per-representation statistics and a cross term ----------------------------------
#
# Each kind reduces one representation to what its HSIC needs (`prepare`), HSIC(K, K) from those
# statistics (`state["self"]`), and HSIC(K, L) from two of them (`_cross`). `cka` and `cka_matrix` share
# this code; `cka_matrix` just prepares every language once.

def centre(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x in float64 centred over examples (axis -2), and where it is constant over the examples."""
    xc = x.to(torch.float64, copy=True)  # one float64 copy, centred in place
    raw = frob(xc)
    xc -= xc.mean(dim=-2, keepdim=True)
    return xc, frob(xc) <= _CONSTANT_RTOL * raw


def blocked_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """b'a in float64 for centred a [..., n, d1], b [..., n, d2] in float64 or float32.

    float64 operands: one product. float32 operands: float32 products over blocks of at most
    `FLOAT32_BLOCK` examples, summed in float64.
    """
    if a.dtype == torch.float64:
        return b.mT @ a
    n = a.shape[-2]
    total = None
    for start in range(0, n, FLOAT32_BLOCK):
        block = (b[..., start:start + FLOAT32_BLOCK, :].mT @ a[..., start:start + FLOAT32_BLOCK, :]).double()
        total = block if total is None else total.add_(block)
    return total


def self_product_sq(xc: torch.Tensor) -> torch.Tensor:
    """||X'X||_F^2 for X = xc [..., n, d] from the products of X'X's blocks of `SELF_BLOCK` rows on and above the
    diagonal only (X'X is symmetric: each block right of the diagonal counts twice), in float64 for float64 xc. At
    n = 5,000, d = 768: 47 ms instead of 75 for the whole product (2 threads): the self term of every representation
    a CKA table prepares."""
    d = xc.shape[-1]
    total = None
    for start in range(0, d, SELF_BLOCK):
        square = (xc[..., start:start + SELF_BLOCK].mT @ xc[..., start:]).square_()
        part = 2 * square.sum((-2, -1)) - square[..., :min(SELF_BLOCK, d - start)].sum((-2, -1))
        total = part if total is None else total.add_(part)
    return total if total is not None else xc.new_zeros(xc.shape[:-2])


def frob(m: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(m, dim=(-2, -1))


def sq_frob(m: torch.Tensor) -> torch.Tensor:
    return frob(m).square()


def debiased_hsic(xty_sq: torch.Tensor, rx: torch.Tensor, ry: torch.Tensor, sx: torch.Tensor, sy: torch.Tensor,
                   n: int) -> torch.Tensor:
    """n(n-3) HSIC_1(K, L) for linear kernels of centred X, Y (Song et al. 2012, eq. 5), in feature space.

    With K~ = K with zeroed diagonal, r_i = |x_i|^2 and s = sum_i r_i, centring gives K~1 = -r and
    1'K~1 = -s, so tr(K~L~) = ||Y'X||^2 - r_x.r_y, 1'K~L~1 = r_x.r_y and
    n(n-3) HSIC_1 = ||Y'X||^2 - n/(n-2) r_x.r_y + s_x s_y / ((n-1)(n-2)). HSIC_1 is unchanged by centring
    the features (a U-statistic of kernel differences), so this equals the formula on the raw K and L.
    The factor n(n-3) cancels in CKA.
    """
    return xty_sq - n / (n - 2) * (rx * ry).sum(-1) + sx * sy / ((n - 1) * (n - 2))


def _median(values: torch.Tensor) -> torch.Tensor:
    """Median over the last axis (the mean of the two middle values for an even count, as numpy)."""
    m = values.shape[-1]
    low = torch.kthvalue(values, (m + 1) // 2, dim=-1).values
    if m % 2:
        return low
    return (low + torch.kthvalue(values, m // 2 + 1, dim=-1).values) / 2


def centre_gram(k: torch.Tensor) -> torch.Tensor:
    """HKH with H = I - 11'/n, by subtracting row and column means (O(n^2), not two n x n products)."""
    return k - k.mean(-1, keepdim=True) - k.mean(-2, keepdim=True) + k.mean((-2, -1), keepdim=True)


def _rbf_gram(xc: torch.Tensor, sigma_frac: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian kernel exp(-|x_i - x_j|^2 / (2 sigma^2)), sigma = sigma_frac x median distance of the pairs i < j.

    Kornblith et al.'s `gram_rbf` takes the median over the whole n x n matrix, diagonal zeros included,
    which shrinks the bandwidth slightly at small n; here only distinct pairs count. Also returns where the
    median distance is 0 (most examples identical), where the kernel is undefined.
    One n x n buffer becomes the Gram matrix, the squared distances and the kernel in place: the time is in
    passes over n x n memory (200 MB each at n = 5000), and a new matrix per step would double them.
    """
    n = xc.shape[-2]
    kernel = xc @ xc.mT
    sq_norms = kernel.diagonal(dim1=-2, dim2=-1).clone()
    kernel.mul_(-2).add_(sq_norms[..., :, None]).add_(sq_norms[..., None, :]).clamp_min_(0)
    kernel.diagonal(dim1=-2, dim2=-1).zero_()
    upper = torch.ones(n, n, dtype=torch.bool, device=xc.device).triu_(1)
    sigma = sigma_frac * _median(kernel[..., upper].sqrt_())
    undefined = sigma <= 0
    sigma = torch.where(undefined, 1.0, sigma)
    return kernel.div_(-2 * sigma[..., None, None] ** 2).exp_(), undefined


def prepare(x: torch.Tensor, kind: str, sigma_frac: float = 1.0,
             precision: str = "float64", self_: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The statistics of one representation [..., n, d] that its HSIC terms need; "self" is HSIC(K, K).

    The self term is computed in float64 for either `precision`, so that a degenerate representation
    (HSIC(K, K) = 0 up to float64 rounding) is recognised as such; "xc", the centred representation the
    cross terms multiply, is in the dtype of `precision`. Everything else is float64.
    `self_` (linear, debiased): x's self term, already computed (`self_hsic`, or "self" of an earlier `prepare` of
    x or of x with its rows permuted): its d x d product, half of a pair's cost, is then skipped.
    """
    xc, constant = centre(x)
    n = x.shape[-2]
    if kind == "linear":
        self_ = self_product_sq(xc) if self_ is None else self_
        state = {"xc": xc}
    elif kind == "debiased":
        rows = torch.linalg.vector_norm(xc, dim=-1).square()
        total = rows.sum(-1)
        if self_ is None:
            self_ = debiased_hsic(self_product_sq(xc), rows, rows, total, total, n)
            self_ = torch.where(self_ <= HSIC_RTOL * total.square(), 0.0, self_)
        state = {"xc": xc, "rows": rows, "total": total}
    elif kind == "rbf":
        kc, undefined = _rbf_gram(xc, sigma_frac)
        row, col = kc.mean(-1, keepdim=True), kc.mean(-2, keepdim=True)
        kc.sub_(row).sub_(col).add_(col.mean(-1, keepdim=True))  # centre_gram, in place
        self_ = sq_frob(kc)
        constant = constant | undefined
        state = {"kc": kc}
    else:
        raise ValueError(f"prepare: unknown kind {kind!r}")  # callers run check_options first
    state["self"] = torch.where(constant, 0.0, self_)
    if precision == "float32":
        # centred in float64 first: each value is rounded once, not as a difference of rounded values
        state["xc"] = xc.float()
    return state


def self_hsic(x: torch.Tensor, kind: str, sigma_frac: float = 1.0) -> torch.Tensor:
    """`prepare(x, kind)["self"]`, HSIC(K, K) of x [..., n, d] -> [...], a chunk of leading indices (layers) at a time
    within `_CHUNK_BYTES` of float64 copies: computed once for every pair a representation is in."""
    flat = x.reshape(-1, *x.shape[-2:])
    chunk = max(1, _CHUNK_BYTES // (8 * flat.shape[-2] * (flat.shape[-2] if kind == "rbf" else flat.shape[-1])))
    return torch.cat([prepare(flat[start:start + chunk], kind, sigma_frac)["self"] for start in range(0, len(flat), chunk)]).reshape(x.shape[:-2])


def _cross(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """HSIC(K, L) between two prepared representations (up to the factor `self` carries too)."""
    if kind == "rbf":  # <K, L> as a dot product: no n x n temporary
        return (a["kc"].flatten(-2)[..., None, :] @ b["kc"].flatten(-2)[..., :, None])[..., 0, 0]
    xty_sq = sq_frob(blocked_product(a["xc"], b["xc"]))
    if kind == "linear":
        return xty_sq
    n = a["xc"].shape[-2]
    return debiased_hsic(xty_sq, a["rows"], b["rows"], a["total"], b["total"], n)


def ratio(cross: torch.Tensor, self_a: torch.Tensor, self_b: torch.Tensor) -> torch.Tensor:
    """HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), NaN where either self term is not positive."""
    valid = (self_a > 0) & (self_b > 0)
    denom = torch.where(valid, self_a * self_b, 1.0).sqrt()
    return torch.where(valid, cross / denom, math.nan)


def check_options(kind: str, precision: str = "float64") -> None:
    """XlsubError naming the input for an unknown `kind` or `precision`, or rbf with float32."""
    if kind not in KINDS:
        raise XlsubError(f"cka: unknown kind '{kind}'; use {', '.join(KINDS[:-1])} or {KINDS[-1]}")
    if precision not in PRECISIONS:
        raise XlsubError(f"cka_precision: unknown precision '{precision}'; use float64 or float32")
    if kind == "rbf" and precision != "float64":
        raise XlsubError("cka_precision: rbf CKA is computed in float64 only (its distances cancel in float32); "
                         "use cka_precision=float64 or a linear kind")


def check_pair(x: torch.Tensor, y: torch.Tensor, kind: str, precision: str = "float64") -> None:
    check_options(kind, precision)
    if x.ndim < 2 or y.ndim < 2 or x.shape[:-1] != y.shape[:-1]:
        raise ValueError(f"cka: x {tuple(x.shape)} and y {tuple(y.shape)} must be [..., n, d] with the same "
                         "leading dimensions and number of examples n")
    if kind == "debiased" and x.shape[-2] < 4:
        raise ValueError(f"debiased CKA needs at least 4 examples (n(n-3) > 0), got n={x.shape[-2]}")


# -- public API --------------------------------------------------------------------------------------

def cka(x: torch.Tensor, y: torch.Tensor, kind: str = "linear", *, sigma_frac: float = 1.0,
        precision: str = "float64") -> torch.Tensor:
    """CKA of x [..., n, d1] and y [..., n, d2] with the estimator `kind` (linear, debiased or rbf) -> [...].

    `sigma_frac` is the RBF bandwidth as a fraction of the median pairwise distance (rbf only).
    `precision`: float64, or float32 products accumulated in float64 (linear, debiased; module docstring).
    """
    check_pair(x, y, kind, precision)
    return prepared_cka(prepare(x, kind, sigma_frac, precision), prepare(y, kind, sigma_frac, precision), kind)


def prepared_cka(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """`cka` of two representations already `prepare`d: a caller comparing one reference with many prepares it once."""
    return ratio(_cross(a, b, kind), a["self"], b["self"])


def linear_cka(x: torch.Tensor, y: torch.Tensor, precision: str = "float64") -> torch.Tensor:
    """Linear CKA, feature-space form ||Y'X||_F^2 / (||X'X||_F ||Y'Y||_F) of X, Y centred over examples.

    Kornblith et al. 2019, eq. 5 / `feature_space_linear_cka`. O(n d1 d2 + n d1^2 + n d2^2) time and
    O(d^2) extra memory; equal to the Gram form tr(KHLH) / sqrt(tr(KHKH) tr(LHLH)).
    x [..., n, d1], y [..., n, d2] -> [...], float64.
    `precision="float32"`: float32 products accumulated in float64 (see the module docstring).
    """
    return cka(x, y, "linear", precision=precision)


def debiased_linear_cka(x: torch.Tensor, y: torch.Tensor, precision: str = "float64") -> torch.Tensor:
    """Linear CKA with the unbiased HSIC_1 estimator (Song et al. 2012; Nguyen et al. 2021), in feature space.

    HSIC_1(K, L) = [tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3)), K~ = K with a zero
    diagonal, K = XX'. For linear kernels every term reduces to d x d products and row norms (see
    `debiased_hsic`), so the cost is that of `linear_cka`, O(n d^2), with no n x n matrix. Needs n >= 4
    (ValueError otherwise). NaN where HSIC_1(K, K) or HSIC_1(L, L) is not positive beyond rounding
    (degenerate inputs; see the module docstring).
    Values can fall slightly below 0 or above 1: the estimate is unbiased, not bounded.
    `precision="float32"`: float32 products accumulated in float64 (see the module docstring).
    """
    return cka(x, y, "debiased", precision=precision)


def rbf_cka(x: torch.Tensor, y: torch.Tensor, sigma_frac: float = 1.0) -> torch.Tensor:
    """CKA with Gaussian kernels and biased HSIC (Kornblith et al. 2019, section 3 / `gram_rbf`).

    Bandwidth sigma = sigma_frac x the median Euclidean distance between distinct examples, for each input
    and each leading index (layer) separately. Builds n x n kernels: O(n^2 d) time, O(n^2) memory per
    leading index. NaN where the median distance is 0.
    """
    return cka(x, y, "rbf", sigma_frac=sigma_frac)


def cka_matrix(reps: Mapping[str, torch.Tensor], kind: str = "linear", *,
               sigma_frac: float = 1.0, precision: str = "float64", selves: Mapping[str, torch.Tensor] | None = None,
               anchor: str | None = None, every_pair: Sequence[int] | None = None) -> torch.Tensor:
    """CKA between every pair of languages, per layer: {lang: [L, n, d]} -> [L, k, k] (float64).

    Rows and columns follow the order of `reps`. Each language is centred and reduced once (for linear:
    X'X and its norm; for rbf: its centred kernel) and each pair then costs one batched d x d product
    over the layers (linear, debiased) or one n x n inner product (rbf). Symmetric; the diagonal is 1
    (NaN for a degenerate representation). Leading indices (layers) are processed in chunks so the
    float64 copies of all languages stay within 256 MiB where one layer allows (at least one layer at
    a time: k n d float64 values; rbf: k n x n kernels). `precision`: as for `cka`. `selves` (linear, debiased):
    {lang: `self_hsic` of reps[lang]} already computed, used instead of computing them again. `anchor` (a language of
    `reps`) with `every_pair` (flat leading indices): every pair at those indices, elsewhere only the anchor's pairs
    (its row and column; the others NaN), as a table of the anchor's CKA per layer beside all pairs at a few layers
    needs.
    """
    check_options(kind, precision)
    langs = list(reps)
    if not langs:
        raise ValueError("cka_matrix: no representations")
    first = reps[langs[0]]
    for lang in langs:
        check_pair(first, reps[lang], kind, precision)
    lead, (n, _) = first.shape[:-2], first.shape[-2:]
    flat = {lang: reps[lang].reshape(-1, n, reps[lang].shape[-1]) for lang in langs}
    batch, k = flat[langs[0]].shape[0], len(langs)

    per_index = sum(8 * n * (n if kind == "rbf" else x.shape[-1]) for x in flat.values())
    chunk = max(1, _CHUNK_BYTES // per_index)
    if anchor is not None and anchor not in reps:
        raise ValueError(f"cka_matrix: anchor {anchor!r} is not one of {langs}")
    whole = torch.ones(batch, dtype=torch.bool) if anchor is None or every_pair is None else \
        torch.zeros(batch, dtype=torch.bool).index_fill_(0, torch.as_tensor(list(every_pair), dtype=torch.long) % max(1, batch), True)
    out = torch.full((batch, k, k), math.nan, dtype=torch.float64, device=first.device)
    for start in range(0, batch, chunk):
        part = slice(start, start + chunk)
        known = {lang: None if selves is None or kind == "rbf" else selves[lang].reshape(-1)[part] for lang in langs}
        states = [prepare(flat[lang][part], kind, sigma_frac, precision, known[lang]) for lang in langs]
        inside = whole[part].nonzero().reshape(-1).to(first.device)  # the chunk's indices where every pair is wanted
        for i, a in enumerate(states):
            out[part, i, i] = torch.where(a["self"] > 0, 1.0, math.nan)
            for j in range(i + 1, k):
                b = states[j]
                if anchor is None or anchor in (langs[i], langs[j]) or len(inside) == len(a["self"]):
                    out[part, i, j] = out[part, j, i] = ratio(_cross(a, b, kind), a["self"], b["self"])
                elif len(inside):
                    picked = [{key: value[inside] for key, value in side.items()} for side in (a, b)]
                    values = ratio(_cross(*picked, kind), picked[0]["self"], picked[1]["self"])
                    out[start + inside, i, j] = out[start + inside, j, i] = values
        del states
    return out.reshape(*lead, k, k)


def shuffled_pairs_cka(x: torch.Tensor, y: torch.Tensor, seed: int, kind: str = "linear", *,
                       sigma_frac: float = 1.0, precision: str = "float64",
                       selves: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The non-parallel control: CKA of x with y's examples re-paired by a seeded random derangement.

    Sentence i of x is compared with sentence pi(i) != i of y, where pi is a uniformly random n-cycle (the
    same for every leading index / layer), so no sentence keeps its translation. What CKA this control
    still shows comes from the marginal structure of the two spaces, not from the sentences being parallel.
    `selves` (linear, debiased): x's and y's `self_hsic`, unchanged by re-pairing, to skip computing them.
    """
    n = y.shape[-2]
    if n < 2:
        raise ValueError(f"shuffled_pairs_cka needs at least 2 examples, got n={n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    partner = torch.empty(n, dtype=torch.long)
    partner[order] = order.roll(-1)  # order[i] -> order[i+1]: one cycle through all n, no fixed point
    partner = partner.to(y.device)
    if selves is None or kind == "rbf":
        return cka(x, y[..., partner, :], kind, sigma_frac=sigma_frac, precision=precision)
    check_pair(x, y, kind, precision)
    return prepared_cka(prepare(x, kind, precision=precision, self_=selves[0]), prepare(y[..., partner, :], kind, precision=precision, self_=selves[1]), kind)
