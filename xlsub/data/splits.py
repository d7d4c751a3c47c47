"""The train/test split of every corpus: a hash of each item's key (a message ID, a line, an article).

The hash is sha256 (``hashlib``), so a split is the same on every machine and run, whatever
``PYTHONHASHSEED`` is; the seed is its salt.
"""

from __future__ import annotations

import hashlib

TEST_FRACTION = 0.1


def hash_fraction(key: str, salt: str | int) -> float:
    """A number in [0, 1) from sha256(salt, key): stable across runs, machines and Python versions."""
    digest = hashlib.sha256(f"{salt}\x00{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_test(key: str, seed: int, test_fraction: float = TEST_FRACTION) -> bool:
    """Whether the item with this key goes to the test split (about ``test_fraction`` of keys)."""
    return hash_fraction(key, seed) < test_fraction


def split_flags(keys: list[str], seed: int, test_fraction: float = TEST_FRACTION) -> list[bool]:
    """Test flags for one language's items, with at least one item in each split when there are 2+.

    The guarantee moves the single lowest-scoring train item to test (or the highest-scoring test
    item to train), so a tiny file still has something to evaluate on and something to train on.
    """
    return flags_from_scores([hash_fraction(k, seed) for k in keys], test_fraction)


def flags_from_scores(scores: list[float], test_fraction: float = TEST_FRACTION) -> list[bool]:
    """Test flags from each item's ``hash_fraction``, with the guarantee of ``split_flags``."""
    flags = [s < test_fraction for s in scores]
    if len(scores) >= 2 and not any(flags):
        flags[min(range(len(scores)), key=scores.__getitem__)] = True
    elif len(scores) >= 2 and all(flags):
        flags[max(range(len(scores)), key=scores.__getitem__)] = False
    return flags
