"""KV-cache pytrees: explicit values passed into the model and returned, never module state.

Both caches expose `buffers` (the per-layer arrays, stacked on a leading layer axis)
and `with_buffers`, which is all the layer scan needs to know about them.

The standard cache stacks every layer's keys and values so the scanned layer loop
slices one layer per step:
    k [l, b, k, S, d]   v [l, b, k, S, dv]   lengths [b] (positions filled per row)
Slot j of a row holds the token at position j. A forward pass over t new tokens
writes them at slots lengths[b] .. lengths[b]+t-1 and returns lengths + t.

In every buffer the slot axis S is the second-to-last (SLOT_AXIS), after the kv heads:
attention contracts over d with (b, k) as batch dimensions, so with heads before slots
each row's keys are already laid out as the dot wants them, and a decode step reads the
cache in place instead of first transposing a copy of all of it.
"""
from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp

from .config import Config

SLOT_AXIS = -2  # the cache-slot axis of every buffer, stacked or per layer


@partial(jax.tree_util.register_dataclass, data_fields=["k", "v", "lengths"], meta_fields=[])
@dataclasses.dataclass
class KVCache:
    k: jax.Array
    v: jax.Array
    lengths: jax.Array

    @classmethod
    def create(cls, cfg: Config, batch: int, max_len: int, dtype=None) -> "KVCache":
        """Preallocate a zero cache for `batch` rows of up to `max_len` positions."""
        if batch < 1 or max_len < 1:
            raise ValueError(f"KVCache needs batch >= 1 and max_len >= 1, got {batch}, {max_len}")
        dtype = jnp.dtype(dtype or cfg.dtype)
        shape = (cfg.n_layers, batch, cfg.num_kv_heads, max_len, cfg.dim_per_head)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[SLOT_AXIS]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def replace(self, **changes) -> "KVCache":
        return dataclasses.replace(self, **changes)

    @property
    def buffers(self):
        return (self.k, self.v)

    def with_buffers(self, buffers, lengths) -> "KVCache":
        return KVCache(k=buffers[0], v=buffers[1], lengths=lengths)


@partial(jax.tree_util.register_dataclass, data_fields=["latent", "k_rope", "lengths"],
         meta_fields=[])
@dataclasses.dataclass
class MLACache:
    """MLA cache: latent [l,b,S,r] and the shared RoPE key [l,b,S,dr] per token."""
    latent: jax.Array
    k_rope: jax.Array
    lengths: jax.Array

    @classmethod
    def create(cls, cfg: Config, batch: int, max_len: int, dtype=None) -> "MLACache":
        if batch < 1 or max_len < 1:
            raise ValueError(f"MLACache needs batch >= 1 and max_len >= 1, got {batch}, {max_len}")
        dtype = jnp.dtype(dtype or cfg.dtype)
        lead = (cfg.n_layers, batch, max_len)
        return cls(latent=jnp.zeros((*lead, cfg.kv_lora_rank), dtype),
                   k_rope=jnp.zeros((*lead, cfg.qk_rope_head_dim), dtype),
                   lengths=jnp.zeros((batch,), jnp.int32))

    batch = property(lambda self: self.latent.shape[1])
    max_len = property(lambda self: self.latent.shape[SLOT_AXIS])
    nbytes = property(lambda self: self.latent.nbytes + self.k_rope.nbytes)
    buffers = property(lambda self: (self.latent, self.k_rope))

    def replace(self, **changes) -> "MLACache":
        return dataclasses.replace(self, **changes)

    def with_buffers(self, buffers, lengths) -> "MLACache":
        return MLACache(latent=buffers[0], k_rope=buffers[1], lengths=lengths)


def create_cache(cfg: Config, batch: int, max_len: int, dtype=None):
    """The cache the config's attention needs: MLACache for MLA, KVCache otherwise."""
    kind = MLACache if cfg.attention == "mla" else KVCache
    return kind.create(cfg, batch, max_len, dtype)


def write_layer(buf, new, starts):
    """Write new [b,...,t,x] into buf [b,...,S,x] (slots on SLOT_AXIS) at per-row slot
    offsets starts [b]."""
    def one(row_buf, row_new, start):
        idx = [0] * row_buf.ndim
        idx[SLOT_AXIS] = start
        return jax.lax.dynamic_update_slice(row_buf, row_new.astype(row_buf.dtype), idx)
    return jax.vmap(one)(buf, new, starts)
