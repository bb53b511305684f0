"""Compact sets of image keys: 16-byte digests in sorted numpy arrays.

Resuming a labelling job means knowing which of millions of keys are already
committed, both in the driver (to refuse duplicates) and in every decode task
(to skip work). A key becomes its 128-bit BLAKE2b digest, 16 bytes whatever the
key's length, so ten million keys take 160 MB and membership is a vectorised
binary search. (Two different keys share a digest with probability about
n^2 / 2^129: 10^-25 for ten million keys.)
"""
from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np

DIGEST_DTYPE = np.dtype("S16")
_MERGE_EVERY = 65536  # pending digests merged into the sorted array in chunks of this many


def key_digests(keys: Iterable[str]) -> np.ndarray:
    """The digest of each key, in order (dtype S16)."""
    return np.array([hashlib.blake2b(str(k).encode("utf-8"), digest_size=16).digest() for k in keys],
                    dtype=DIGEST_DTYPE)


def content_digests(keys: Iterable[str], hashes: Iterable[str]) -> np.ndarray:
    """The digest of each (key, content hash) pair: which bytes an output labelled under a key."""
    return key_digests(f"{k}\n{h}" for k, h in zip(keys, hashes))


def sorted_unique(digests: np.ndarray) -> np.ndarray:
    return np.unique(np.asarray(digests, dtype=DIGEST_DTYPE))


def contains_sorted(sorted_digests: np.ndarray, digests: np.ndarray) -> np.ndarray:
    """Boolean mask: which of `digests` are in the sorted, unique array `sorted_digests`."""
    if len(sorted_digests) == 0 or len(digests) == 0:
        return np.zeros(len(digests), dtype=bool)
    at = np.searchsorted(sorted_digests, digests)
    at[at == len(sorted_digests)] = 0
    return sorted_digests[at] == digests


class KeyDigestSet:
    """A growing set of key digests: a sorted array, plus a Python set of recent additions that is
    merged into the array every `_MERGE_EVERY` additions (fast lookups, 16 bytes a key at rest)."""

    def __init__(self, digests: np.ndarray | None = None) -> None:
        self._sorted = sorted_unique(digests if digests is not None else np.zeros(0, DIGEST_DTYPE))
        self._recent: set[bytes] = set()

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)

    def sorted_array(self) -> np.ndarray:
        """All digests, sorted and unique (what decode tasks receive)."""
        self._merge()
        return self._sorted

    def contains(self, digests: np.ndarray) -> np.ndarray:
        digests = np.asarray(digests, dtype=DIGEST_DTYPE)
        found = contains_sorted(self._sorted, digests)
        if self._recent:
            found |= np.fromiter((d in self._recent for d in digests.tolist()), dtype=bool, count=len(digests))
        return found

    def add_new(self, digests: np.ndarray) -> np.ndarray:
        """Add digests; returns the mask of those that were not in the set yet (a digest repeated
        within `digests` counts as new once, at its first occurrence)."""
        digests = np.asarray(digests, dtype=DIGEST_DTYPE)
        known = self.contains(digests)
        new = np.zeros(len(digests), dtype=bool)
        for i, d in enumerate(digests.tolist()):
            if not known[i] and d not in self._recent:
                self._recent.add(d)
                new[i] = True
        if len(self._recent) >= _MERGE_EVERY:
            self._merge()
        return new

    def _merge(self) -> None:
        if self._recent:
            recent = np.array(sorted(self._recent), dtype=DIGEST_DTYPE)
            self._sorted = sorted_unique(np.concatenate([self._sorted, recent]))
            self._recent = set()
