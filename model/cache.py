"""KV-cache pytrees: explicit values passed into the model and returned, never module state.

The standard cache stacks every layer's keys and values so the scanned layer loop
slices one layer per step:
    k [l, b, S, k, d]   v [l, b, S, k, dv]   lengths [b] (positions filled per row)
Slot j of a row holds the token at position j. A forward pass over t new tokens
writes them at slots lengths[b] .. lengths[b]+t-1 and returns lengths + t.
"""
from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp

from .config import Config


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
        shape = (cfg.n_layers, batch, max_len, cfg.num_kv_heads, cfg.dim_per_head)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def replace(self, **changes) -> "KVCache":
        return dataclasses.replace(self, **changes)


def write_layer(buf, new, starts):
    """Write new [b,t,...] into buf [b,S,...] at per-row slot offsets starts [b]."""
    def one(row_buf, row_new, start):
        idx = (start,) + (0,) * (row_buf.ndim - 1)
        return jax.lax.dynamic_update_slice(row_buf, row_new.astype(row_buf.dtype), idx)
    return jax.vmap(one)(buf, new, starts)
