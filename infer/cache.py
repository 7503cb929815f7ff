"""The decode cache: one preallocated buffer pair per layer, plus per-row lengths.

    layers[i] = (k [b,k,S,d], v [b,k,S,dv])      standard attention, implementation="xla"
              = (k [b,S,k,d], v [b,S,k,dv])      standard attention, Pallas / cuDNN kernels
              = (latent [b,S,r], k_rope [b,S,dr]) MLA
              int8 (dtype="int8"): the same int8 buffers followed by their scales, one per
              token and kv head, [..., 1] (MLA: one per token over latent ⊕ k_rope)
    lengths   = [b] int32                        slots filled in each row
    peft_ids  = [b] int32 or None                each row's index in the model's stacked
                                                 adapters (−1: none; infer/adapters.py)

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
from jax.sharding import Mesh, NamedSharding

from jaxlm.model.cache import HEADS_FIRST, create_cache
from jaxlm.model.config import Config
from jaxlm.model.sharding import activation_sharding, replicated


# Prompt, prefix and cache lengths round up to a multiple of this, so a new length is
# rarely a new shape to compile.
BUCKET = 16


def round_up(n: int, m: int = BUCKET) -> int:
    return -(-n // m) * m


@partial(jax.tree_util.register_dataclass, data_fields=["layers", "lengths", "peft_ids"],
         meta_fields=["slot_axis"])
@dataclasses.dataclass
class DecodeCache:
    layers: tuple        # per layer: a tuple of buffers (K and V, or latent and RoPE key)
    lengths: jax.Array   # [b] int32
    slot_axis: int = HEADS_FIRST  # the slot axis of every buffer (model.cache's names)
    # Which stacked adapter each row's K/V were made with, read by every later step; None
    # (no stacked adapters) adds no op to the compiled steps.
    peft_ids: jax.Array | None = None

    @classmethod
    def create(cls, cfg: Config, batch: int, max_len: int, dtype=None,
               mesh: Mesh | None = None) -> "DecodeCache":
        """Zero buffers for `batch` rows of `max_len` slots, shaped as the model's cache;
        with a mesh, born split over rows (batch axes) and kv heads (tensor)."""
        stacked = jax.eval_shape(lambda: create_cache(cfg, batch, max_len, dtype))
        axis = stacked.slot_axis

        def zeros(shape, dtype):
            where = None if mesh is None else cache_sharding(
                mesh, jax.ShapeDtypeStruct(shape, dtype), axis)
            return jnp.zeros(shape, dtype, device=where)
        layers = tuple(tuple(zeros(buf.shape[1:], buf.dtype) for buf in stacked.buffers)
                       for _ in range(cfg.n_layers))
        lengths = jnp.zeros((batch,), jnp.int32,
                            device=None if mesh is None else replicated(mesh))
        return cls(layers=layers, lengths=lengths, slot_axis=axis)

    @property
    def batch(self) -> int:
        return self.layers[0][0].shape[0]

    @property
    def max_len(self) -> int:
        return self.layers[0][0].shape[self.slot_axis]

    @property
    def nbytes(self) -> int:
        return sum(buf.nbytes for layer in self.layers for buf in layer)


def cache_sharding(mesh: Mesh, buf, slot_axis: int) -> NamedSharding:
    """Rows over the batch axes and, for K/V buffers, kv heads over tensor."""
    names = ["batch"] + [None] * (buf.ndim - 1)
    if buf.ndim == 4:  # [b,k,S,d] or [b,S,k,d]: the head axis is the other middle one
        names[1 if slot_axis == HEADS_FIRST else 2] = "kv_heads"
    return activation_sharding(mesh, names, buf.shape, what="KV-cache buffer")
