"""Planted controls for power (issue 12): how strong a shared signal each similarity measure detects.

`planted_representations` (a positive control: a shared signal at a known signal-to-noise ratio),
`length_only_representations` (a negative control: an encoder that sees only sentence length);
`xlsub.similarity.power` turns them into the power of each measure's test.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch


def _language_generator(seed: int, lang: str) -> torch.Generator:
    """A generator per (seed, language), stable across runs and independent of the other languages listed."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(lang.encode()))


def random_rotation(d: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random d x d orthogonal matrix: QR of a Gaussian matrix, signs fixed by R (Mezzadri 2007)."""
    q, r = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def planted_weights(snr: float) -> tuple[float, float]:
    """(signal, noise) weights of `planted_representations` at `snr`: sqrt(snr / (1 + snr)), sqrt(1 / (1 + snr))."""
    if math.isinf(snr):
        return 1.0, 0.0
    return math.sqrt(snr / (1 + snr)), math.sqrt(1 / (1 + snr))


def planted_representations(base: torch.Tensor, languages: Sequence[str], snr: float, seed: int = 0, *,
                            rotate: bool = True) -> dict[str, torch.Tensor]:
    """A positive control: {lang: [n, d]} sharing the per-sentence signal `base` at signal-to-noise `snr`.

    `base` [n, d] (e.g. the English full-model vectors) is centred and scaled to unit mean square (its
    covariance keeps its shape); language l gets base R_l sqrt(snr / (1 + snr)) + E_l sqrt(1 / (1 + snr)),
    R_l a random rotation (identity with rotate=False) and E_l standard Gaussian noise, both seeded per
    language. Signal and noise have equal total variance at snr = 1; snr = inf gives the signal alone,
    snr = 0 pure noise.

    CKA, RSA and the kNN-graph spectra are invariant to rotations, so R_l changes nothing for them; but
    retrieval compares cosines across the two languages, so with rotate=True the languages share
    structure in unaligned coordinates and retrieval stays at chance at any SNR. For retrieval's
    detection limit use rotate=False (one shared space, as one encoder gives both languages).
    """
    if snr < 0:
        raise ValueError(f"planted_representations: snr must be >= 0, got {snr}")
    base = base.to(torch.float64)
    base = base - base.mean(0)
    rms = base.square().mean().sqrt()
    if rms == 0:
        raise ValueError("planted_representations: base is constant over the examples")
    base = base / rms
    signal_w, noise_w = planted_weights(snr)
    out = {}
    for lang in languages:
        generator = _language_generator(seed, lang)
        if rotate:
            rotation = random_rotation(base.shape[1], generator).to(base.device)
        else:  # the rotation's draws are skipped in the stream (no QR), so the noise is the same either way
            torch.randn(base.shape[1], base.shape[1], generator=generator, dtype=torch.float64)
        # drawn in float32 and used in float64: 5,000 x 768 normals take 17.7 ms against 94.0 in float64 on 2 cores, and
        # the power table draws 50 partners' noise at each level and measure; CPU streams on every device
        noise = torch.randn(base.shape, generator=generator, dtype=torch.float32).to(base.device, torch.float64)
        out[lang] = signal_w * (base @ rotation if rotate else base) + noise_w * noise
    return out


def length_only_representations(lengths: Mapping[str, Sequence[int]], d: int, seed: int = 0, *,
                                special: bool = True, vocab: int = 8000) -> dict[str, torch.Tensor]:
    """A content-free encoder: {lang: [n, d]} that depends on each sentence only through its token count.

    Sentence i of language l with lengths[l][i] tokens is the mean over its positions of (token embedding
    + position embedding), as an embedding layer mean-pooled would give: tokens drawn uniformly from a
    vocabulary of `vocab` random embeddings of its own per language (disjoint vocabularies), position
    embeddings shared by all languages, and with `special`, shared <s> and </s> embeddings at the first
    and last positions (lengths exclude them). Only the lengths are correlated across languages, yet
    REFERENCES measured linear CKA 0.70 on parallel pairs for such an encoder: a negative control for
    "shared meaning".
    """
    languages = list(lengths)
    longest = max((int(max(v)) for v in lengths.values() if len(v)), default=0)
    shared = torch.Generator().manual_seed(seed)
    positions = torch.randn(longest + 2, d, generator=shared, dtype=torch.float64)
    cumulative = torch.cat([torch.zeros(1, d, dtype=torch.float64), positions.cumsum(0)])  # sum of the first k
    bos, eos = torch.randn(2, d, generator=shared, dtype=torch.float64)
    out = {}
    for lang in languages:
        counts = torch.as_tensor(np.asarray(lengths[lang]), dtype=torch.long)
        if counts.numel() and int(counts.min()) < (0 if special else 1):
            raise ValueError(f"length_only_representations: {lang} has a sentence of length "
                             f"{int(counts.min())}; lengths count tokens without <s>/</s> and must be >= "
                             f"{0 if special else 1}")
        generator = _language_generator(seed, lang)
        # drawn in float32 (torch draws them 4.5x faster than float64: the power table's control draws 100 tables
        # of 8,000 x 768) and summed in float64
        table = torch.randn(vocab, d, generator=generator, dtype=torch.float32).double()
        tokens = torch.randint(vocab, (int(counts.sum()),), generator=generator)
        # each sentence's tokens summed as a bag (offsets: where each sentence's tokens begin), not a tokens x d
        # gather (770 MB at the study's 5,000 sentences)
        offsets = torch.cumsum(counts, 0) - counts
        summed = torch.nn.functional.embedding_bag(tokens, table, offsets, mode="sum")
        width = counts + 2 if special else counts  # positions 0 .. width-1
        summed += cumulative[width]
        if special:
            summed += bos + eos
        out[lang] = summed / width[:, None]
    return out

