"""Prefix (prompt) caching: compute a shared prefix's K/V once, copy it into every row that
starts with it, and prefill only the suffixes.

    engine.prefixes.add(system_prompt_ids)            # explicit: a system prompt
    engine.generate(prompts, ..., prefix_cache=True)  # rows starting with it skip it

With prefix_cache=True, generate also stores the longest prefix that all prompts of a
batch share (when it is at least `min_shared` tokens), so a batch of requests behind one
few-shot block or chat history computes that block once, and later batches reuse it.

The K/V at position j depends only on tokens 0..j, so a prefix's K/V computed alone equal
those of a full prefill: outputs are identical with and without the cache (tested). A
match always leaves at least one token to prefill, whose logits give the first new token.
Entries are evicted least-recently-used once they hold more than `max_tokens` tokens.

Adapters: a row's K/V depend on its adapter, so each adapter id has its own PrefixCache
(`engine.prefixes_for(id)`; `engine.prefixes` is id -1, the engine's own model) and a row
only reuses prefixes computed under its adapter. An entry of a prefix-tuning adapter
starts with that adapter's P virtual tokens (slots 0..P-1), its tokens at P.., so copying
it sets up the row whole.
"""
from __future__ import annotations

import collections
import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from .cache import DecodeCache, round_up


@dataclasses.dataclass
class Prefix:
    tokens: tuple[int, ...]
    layers: tuple        # per layer: buffers of one row (slots = filled rounded up)
    slot_axis: int       # as DecodeCache.slot_axis
    offset: int = 0      # the adapter's virtual prefix tokens before `tokens`

    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def filled(self) -> int:
        """A row's cache length once this entry is copied in."""
        return self.offset + self.length

    @property
    def slots(self) -> int:
        return self.layers[0][0].shape[self.slot_axis]


@partial(jax.jit, donate_argnames=("cache",))
def _copy_into_rows(cache: DecodeCache, layers, rows, length):
    """cache rows where rows[b] get the prefix K/V at slots 0.. and lengths = length."""
    def put(buf, pre):
        first = [slice(None)] * buf.ndim
        first[cache.slot_axis] = slice(0, pre.shape[cache.slot_axis])  # slots 0..p-1
        first = tuple(first)
        mask = rows.reshape((-1,) + (1,) * (buf.ndim - 1))
        return buf.at[first].set(jnp.where(mask, pre.astype(buf.dtype), buf[first]))
    new = tuple(tuple(put(b, p) for b, p in zip(layer, pre))
                for layer, pre in zip(cache.layers, layers))
    return dataclasses.replace(cache, layers=new, lengths=jnp.where(rows, length,
                                                                    cache.lengths))


class PrefixCache:
    def __init__(self, engine, *, adapter: int = -1, max_tokens: int = 1 << 16,
                 min_shared: int = 16):
        self.engine = engine
        self.adapter = adapter   # the adapter id whose rows these prefixes serve
        self.max_tokens = max_tokens
        self.min_shared = min_shared
        self.entries: collections.OrderedDict[tuple[int, ...], Prefix] = \
            collections.OrderedDict()

    def __len__(self) -> int:
        return len(self.entries)

    def clear(self) -> None:
        self.entries.clear()

    def add(self, tokens) -> Prefix:
        """Compute and store the K/V of `tokens` (a prefix of later prompts)."""
        tokens = tuple(int(t) for t in tokens)
        if not tokens:
            raise ValueError("a cached prefix needs at least one token")
        ids = None if self.adapter == -1 else [self.adapter]
        self.engine.check([list(tokens)], 1, adapter_ids=ids)
        if tokens in self.entries:
            self.entries.move_to_end(tokens)
            return self.entries[tokens]
        offset = self.engine.virtual_tokens(self.adapter)
        width = round_up(len(tokens))
        padded = np.zeros((1, width), np.int32)
        padded[0, :len(tokens)] = tokens
        cache = self.engine.new_cache(1, round_up(offset + width), ids)
        _, _, cache = self.engine.prefill(padded, [len(tokens)], cache, jax.random.key(0))
        entry = Prefix(tokens, cache.layers, cache.slot_axis, offset)
        self.entries[tokens] = entry
        self._evict()
        return entry

    def _evict(self) -> None:
        while (len(self.entries) > 1 and
               sum(e.length for e in self.entries.values()) > self.max_tokens):
            self.entries.popitem(last=False)

    def match(self, prompt) -> Prefix | None:
        """The longest stored prefix of prompt that leaves at least one token to prefill."""
        best = None
        for key, entry in self.entries.items():
            n = len(key)
            if n < len(prompt) and (best is None or n > best.length) and \
                    tuple(prompt[:n]) == key:
                best = entry
        if best is not None:
            self.entries.move_to_end(best.tokens)
        return best

    def shared_prefix(self, prompts) -> list[int]:
        """The longest prefix every prompt shares, leaving each at least one token."""
        if len(prompts) < 2:
            return []
        n = min(len(p) for p in prompts) - 1
        first = prompts[0]
        for p in prompts[1:]:
            n = next((i for i in range(n) if p[i] != first[i]), n)
        return list(first[:n])

    def plan(self, prompts) -> list[Prefix | None]:
        """The stored prefix each prompt reuses (storing the batch's shared prefix first)."""
        shared = self.shared_prefix(prompts)
        if len(shared) >= self.min_shared and any(
                (m := self.match(p)) is None or m.length < len(shared) for p in prompts):
            self.add(shared)
        return [self.match(p) for p in prompts]


def fill_rows(cache: DecodeCache, matches: list[Prefix | None]) -> DecodeCache:
    """Copy each matched prefix into its rows (one call per distinct prefix)."""
    for entry in {id(m): m for m in matches if m is not None}.values():
        rows = jnp.asarray([m is entry for m in matches])
        cache = _copy_into_rows(cache, entry.layers, rows, jnp.int32(entry.filled))
    return cache
