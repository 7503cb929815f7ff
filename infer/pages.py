"""The page pool's bookkeeping (host side): free pages, reference counts, prefix hashes.

The device holds, per layer, pools of P pages of z slots (model.cache.paged_buffers); this
class only decides which page ids each sequence uses. A sequence's block table is a list
of page ids, slot j in page table[j // z].

Prefix sharing (vLLM's automatic prefix caching, PagedAttention §4.4): a FULL page is
keyed by a hash of its tokens chained with the hash of every page before it, so equal keys
mean equal token prefixes and therefore equal K/V (K/V at position j depend only on tokens
0..j). A new sequence walks its prompt's full pages and takes every page whose key is
known, raising its reference count, and prefills only the rest. When the last reference
goes, a hashed page is not wiped: it waits in an LRU list, still findable by its key,
until an allocation needs it (so a preempted or repeated prompt finds its pages again).
A page is never written once full, so sharing needs only one copy-on-write case, handled
by the scheduler: a prompt matched to its very last token must recompute that token (its
logits start generation), which would write into a shared page.

Why our own and not a library: this is a few dictionaries; vLLM's block manager is tied
to its engine.
"""
from __future__ import annotations

import collections
import hashlib

import numpy as np


def page_keys(tokens, page_size: int, parent: bytes = b"") -> list[bytes]:
    """The chained key of every full page of tokens: key_i = H(key_{i-1}, page_i tokens)."""
    keys = []
    for i in range(len(tokens) // page_size):
        page = np.asarray(tokens[i * page_size:(i + 1) * page_size], np.int64).tobytes()
        parent = hashlib.blake2b(parent + page, digest_size=16).digest()
        keys.append(parent)
    return keys


class PagePool:
    """n_pages page ids: free, cached (refcount 0 but findable by key) or in use."""

    def __init__(self, n_pages: int, page_size: int):
        if n_pages < 1 or page_size < 1:
            raise ValueError(f"a page pool needs n_pages >= 1 and page_size >= 1, got "
                             f"{n_pages}, {page_size}")
        self.n_pages, self.page_size = n_pages, page_size
        self.refs = np.zeros(n_pages, np.int32)
        self.free = collections.deque(range(n_pages))    # never hashed (or evicted)
        self.cached: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU
        self.by_key: dict[bytes, int] = {}
        self.key_of: dict[int, bytes] = {}

    @property
    def available(self) -> int:
        """Pages an allocation can take now (free, or cached and evictable)."""
        return len(self.free) + len(self.cached)

    @property
    def in_use(self) -> int:
        return int((self.refs > 0).sum())

    def allocate(self) -> int:
        """One page with refcount 1: a free one, else the least recently used cached one
        (forgetting its key). Call only when `available` > 0."""
        if self.free:
            page = self.free.popleft()
        else:
            page, _ = self.cached.popitem(last=False)
            del self.by_key[self.key_of.pop(page)]
        self.refs[page] = 1
        return page

    def match(self, keys: list[bytes]) -> list[int]:
        """The longest run of leading keys with a page, each taken (refcount + 1)."""
        pages = []
        for key in keys:
            page = self.by_key.get(key)
            if page is None:
                break
            if self.refs[page] == 0:
                del self.cached[page]
            self.refs[page] += 1
            pages.append(page)
        return pages

    def register(self, page: int, key: bytes) -> None:
        """Make a full page findable by its key (a page with the same key already known
        stays the one found; this page is then simply private)."""
        if key not in self.by_key and page not in self.key_of:
            self.by_key[key] = page
            self.key_of[page] = key

    def release(self, pages) -> None:
        """Drop one reference to each page; unreferenced pages become cached (if keyed,
        most recently used last) or free."""
        for page in pages:
            self.refs[page] -= 1
            if self.refs[page] < 0:
                raise RuntimeError(f"page {page} released more often than taken")
            if self.refs[page] == 0:
                if page in self.key_of:
                    self.cached[page] = None
                else:
                    self.free.append(page)

    def check_whole(self) -> None:
        """Every page is exactly one of free / cached / in use (a leak check for tests)."""
        free, cached = set(self.free), set(self.cached)
        used = set(np.flatnonzero(self.refs > 0).tolist())
        if free & cached or (free | cached) & used or len(free | cached | used) != self.n_pages:
            raise AssertionError(f"page pool inconsistent: {len(free)} free, {len(cached)} "
                                 f"cached, {len(used)} in use of {self.n_pages}")
