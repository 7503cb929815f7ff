"""The decode cache: one preallocated buffer pair per layer, plus per-row lengths.

    layers[i] = (k [b,k,S,d], v [b,k,S,dv])      for standard (MHA/GQA/MQA) attention
              = (latent [b,S,r], k_rope [b,S,dr]) for MLA
    lengths   = [b] int32                        slots filled in each row

Slot j of a row holds the token at position j, as in jaxlm.model.KVCache. The model's
KVCache stacks the layers on one leading axis for its layer scan; here each layer owns its
buffer, so the unrolled decode step updates it in place (dynamic_update_slice on a donated
loop carry) and attention reads it directly, with no per-step slice or restack of a stacked
buffer. Created once for (batch, max_len, dtype) and donated into every jitted call.
"""
from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp

from jaxlm.model.cache import SLOT_AXIS, create_cache
from jaxlm.model.config import Config


@partial(jax.tree_util.register_dataclass, data_fields=["layers", "lengths"], meta_fields=[])
@dataclasses.dataclass
class DecodeCache:
    layers: tuple        # per layer: a tuple of buffers [b,S,...] (K and V)
    lengths: jax.Array   # [b] int32

    @classmethod
    def create(cls, cfg: Config, batch: int, max_len: int, dtype=None) -> "DecodeCache":
        """Zero buffers for `batch` rows of `max_len` slots, shaped as the model's cache."""
        stacked = jax.eval_shape(lambda: create_cache(cfg, batch, max_len, dtype))
        layers = tuple(tuple(jnp.zeros(buf.shape[1:], buf.dtype) for buf in stacked.buffers)
                       for _ in range(cfg.n_layers))
        return cls(layers=layers, lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def batch(self) -> int:
        return self.layers[0][0].shape[0]

    @property
    def max_len(self) -> int:
        return self.layers[0][0].shape[SLOT_AXIS]

    @property
    def nbytes(self) -> int:
        return sum(buf.nbytes for layer in self.layers for buf in layer)

    def replace(self, **changes) -> "DecodeCache":
        return dataclasses.replace(self, **changes)


def cache_bytes(cfg: Config, batch: int, max_len: int, dtype=None) -> int:
    """Bytes DecodeCache.create would allocate, without allocating."""
    stacked = jax.eval_shape(lambda: create_cache(cfg, batch, max_len, dtype))
    return sum(buf.size * buf.dtype.itemsize for buf in stacked.buffers)
