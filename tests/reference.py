"""Slow, straightforward computations of what xlsub computes fast: references for the tests and benchmarks.

Each gives the same numbers as its xlsub counterpart another way, so a test or benchmark can hold the
two together. None is part of xlsub's API. Benchmarks import this module with the repository root on
`sys.path`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from xlsub.cka import _centre_gram, _check_pair, _ratio, _sq_frob
from xlsub.encoding import _base_model, _check_args, _EvalMode, _forward_pooled, _pad_id, _prepare
from xlsub.heads import HeadGates, head_importance, mask_shape
from xlsub.mlm import perplexity
from xlsub.pruning import PruningResult, Step, _prune_loop


def encode_naive(
    model: nn.Module,
    tokenizer,
    sentences: Sequence[str],
    *,
    batch_size: int = 64,
    max_length: int | None = None,
    device: str | torch.device | None = None,
    progress_desc: str | None = None,
) -> torch.Tensor:
    """The same numbers as ``encode``, computed the straightforward way (the benchmark's reference).

    Sentences in their given order; each tokenised on its own inside the loop; every batch padded
    to the longest sentence of the whole input (found by a first tokenising pass), not to its own.
    """
    max_length = _check_args(model, tokenizer, batch_size, max_length)
    pad_id = _pad_id(tokenizer)
    base = _base_model(model)
    sentences = list(sentences)
    width = max((len(tokenizer(s, truncation=True, max_length=max_length)["input_ids"]) for s in sentences), default=0)
    chunks = []
    device = _prepare(model, device)
    with _EvalMode(model), torch.inference_mode():
        for start in tqdm(range(0, len(sentences), batch_size), desc=progress_desc or "encode (naive)", leave=False):
            rows, masks = [], []
            for sentence in sentences[start:start + batch_size]:
                ids = tokenizer(sentence, truncation=True, max_length=max_length)["input_ids"]
                rows.append(ids + [pad_id] * (width - len(ids)))
                masks.append([1] * len(ids) + [0] * (width - len(ids)))
            input_ids = torch.tensor(rows, device=device)
            attention_mask = torch.tensor(masks, device=device)
            chunks.append(_forward_pooled(base, input_ids, attention_mask).cpu())
    if not chunks:
        return torch.empty(base.config.num_hidden_layers + 1, 0, base.config.hidden_size)
    return torch.cat(chunks, dim=1)


def iterative_pruning_two_pass(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    threshold: float = 1.1,
    amount: float = 0.1,
    target_sparsity: float | None = None,
    continue_to: float = 0.0,
    progress: Callable[[Step], None] | None = None,
    progress_desc: str = "pruning",
) -> PruningResult:
    """Reference for `iterative_pruning` as bertology runs it: per step an importance pass with
    gradients for every weight, then a separate no-grad pass for the perplexity. Same masks, slower."""
    batches = list(batches)

    def evaluate(mask: torch.Tensor) -> tuple[torch.Tensor, float]:
        importance = head_importance(model, batches, mask, freeze_weights=False).importance
        with HeadGates(model, mask):
            ppl = perplexity(model, batches)
        return importance, ppl

    return _prune_loop(evaluate, mask_shape(model), threshold=threshold, amount=amount,
                       target_sparsity=target_sparsity, continue_to=continue_to, progress=progress, progress_desc=progress_desc)


def linear_cka_gram(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Linear CKA in its Gram form tr(KHLH) / sqrt(tr(KHKH) tr(LHLH)), K = XX', L = YY', H = I - 11'/n.

    The O(n^2 d) time, O(n^2) memory reference for `linear_cka` (tests, benchmark): K and L are formed from
    the raw inputs and centred as matrices; tr(KHLH) = <HKH, HLH> since H is idempotent.
    """
    _check_pair(x, y, "linear")
    x, y = x.to(torch.float64), y.to(torch.float64)
    kc, lc = _centre_gram(x @ x.mT), _centre_gram(y @ y.mT)
    return _ratio((kc * lc).sum((-2, -1)), _sq_frob(kc), _sq_frob(lc))
