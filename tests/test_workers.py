"""xlsub.stats.workers: calls side by side on one torch thread each, in order, and torch's threads restored."""

from __future__ import annotations

import threading

import pytest
import torch

from xlsub.stats.workers import one_thread, side_by_side


def test_side_by_side_in_order_on_one_thread_each(two_threads):
    seen = []

    def work(i: int) -> int:
        seen.append((torch.get_num_threads(), threading.get_ident()))
        return int(torch.arange(i + 1).sum())

    assert side_by_side(work, range(9)) == [i * (i + 1) // 2 for i in range(9)]
    assert {threads for threads, _ in seen} == {1} and torch.get_num_threads() == 2
    assert threading.get_ident() not in {ident for _, ident in seen}  # run by the pool's threads


def test_side_by_side_nested_runs_in_turn_and_exceptions_restore(two_threads):
    def inner(i: int) -> list[int]:
        idents = side_by_side(lambda _: threading.get_ident(), range(3))
        return [len(set(idents)), idents[0] == threading.get_ident()]

    assert side_by_side(inner, range(2)) == [[1, True], [1, True]]  # one worker thread runs its inner calls itself

    def fail(i: int) -> int:
        if i == 3:
            raise ValueError("item 3")
        return i

    with pytest.raises(ValueError, match="item 3"):
        side_by_side(fail, range(5))
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError), one_thread():
        assert torch.get_num_threads() == 1
        raise RuntimeError
    assert torch.get_num_threads() == 2
    assert side_by_side(lambda i: i, []) == [] and side_by_side(lambda i: -i, [4]) == [-4]
