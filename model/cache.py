"""KV-cache pytrees: explicit values passed into the model and returned, never module state.

Both caches expose `buffers` (the per-layer arrays, stacked on a leading layer axis)
and `with_buffers`, which is all the layer scan needs to know about them.

The standard cache stacks every layer's keys and values so the scanned layer loop
slices one layer per step:
    k [l, b, k, S, d]   v [l, b, k, S, dv]   lengths [b] (positions filled per row)
Slot j of a row holds the token at position j. A forward pass over t new tokens
writes them at slots lengths[b] .. lengths[b]+t-1 and returns lengths + t.

Where the slots sit follows the attention implementation (`slot_axis(cfg)`): XLA's
attention contracts over d with (b, k) as batch dimensions, so for implementation="xla"
the kv heads come before the slots, [b, k, S, d], and a decode step reads each row's keys
in place instead of first transposing a copy of the whole cache. The Pallas and cuDNN
kernels take [b, S, k, d] as they are, so for them the slots come first. MLA buffers,
[b, S, r], have no head axis.
"""
from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp

from jaxlm import ops

from .config import Config


# Where the slots sit in a K/V buffer, as an axis counted from the end (so it is the same
# for the layer-stacked buffers and one layer's).
HEADS_FIRST = -2   # [.., k, S, d]: XLA attention, and MLA's [.., S, r] (no head axis)
SLOTS_FIRST = -3   # [.., S, k, d]: the Pallas and cuDNN kernels


def slot_axis(cfg: Config) -> int:
    """HEADS_FIRST or SLOTS_FIRST: the cache layout the config's attention kernel reads."""
    return SLOTS_FIRST if cfg.attention == "gqa" and cfg.attention_impl != "xla" else HEADS_FIRST


def heads_to_layout(a, axis: int):
    """[b,t,k,d] → a buffer's layout ([b,k,t,d] for HEADS_FIRST); its own inverse."""
    return a.transpose(0, 2, 1, 3) if axis == HEADS_FIRST else a


@partial(jax.tree_util.register_dataclass,
         data_fields=["k", "v", "lengths", "k_scale", "v_scale"], meta_fields=["slot_axis"])
@dataclasses.dataclass
class KVCache:
    k: jax.Array
    v: jax.Array
    lengths: jax.Array
    slot_axis: int = HEADS_FIRST   # [l,b,k,S,d]; SLOTS_FIRST: [l,b,S,k,d]
    # An int8 cache (dtype="int8"): k and v are int8 with one scale per (token, kv head),
    # [l,b,k,S,1] (the trailing 1 keeps every buffer's slot axis the same).
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None

    @classmethod
    def create(cls, cfg: Config, batch: int, max_len: int, dtype=None) -> "KVCache":
        """Preallocate a zero cache for `batch` rows of up to `max_len` positions;
        dtype="int8" stores quantized keys and values with scales in the compute dtype."""
        if batch < 1 or max_len < 1:
            raise ValueError(f"KVCache needs batch >= 1 and max_len >= 1, got {batch}, {max_len}")
        dtype = cache_dtype(cfg, dtype)
        axis = slot_axis(cfg)
        heads = ((cfg.num_kv_heads, max_len) if axis == HEADS_FIRST
                 else (max_len, cfg.num_kv_heads))
        shape = (cfg.n_layers, batch, *heads, cfg.dim_per_head)
        scales = {}
        if dtype == jnp.int8:
            scales = {name: jnp.zeros((*shape[:-1], 1), jnp.dtype(cfg.dtype))
                      for name in ("k_scale", "v_scale")}
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   lengths=jnp.zeros((batch,), jnp.int32), slot_axis=axis, **scales)

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[self.slot_axis]

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    @property
    def buffers(self):
        """(k, v), or (k, v, k_scale, v_scale) for an int8 cache."""
        return (self.k, self.v) if self.k_scale is None else (self.k, self.v, self.k_scale,
                                                              self.v_scale)

    def with_buffers(self, buffers, lengths) -> "KVCache":
        return KVCache(*buffers[:2], lengths=lengths, slot_axis=self.slot_axis,
                       k_scale=buffers[2] if len(buffers) > 2 else None,
                       v_scale=buffers[3] if len(buffers) > 2 else None)


@partial(jax.tree_util.register_dataclass,
         data_fields=["latent", "k_rope", "lengths", "scale"], meta_fields=[])
@dataclasses.dataclass
class MLACache:
    """MLA cache: latent [l,b,S,r] and the shared RoPE key [l,b,S,dr] per token. int8:
    both int8 with one scale per token over [latent ⊕ k_rope], scale [l,b,S,1] (as the
    paged pool quantizes the same vector, so the two caches agree)."""
    latent: jax.Array
    k_rope: jax.Array
    lengths: jax.Array
    scale: jax.Array | None = None

    @classmethod
    def create(cls, cfg: Config, batch: int, max_len: int, dtype=None) -> "MLACache":
        if batch < 1 or max_len < 1:
            raise ValueError(f"MLACache needs batch >= 1 and max_len >= 1, got {batch}, {max_len}")
        dtype = cache_dtype(cfg, dtype)
        lead = (cfg.n_layers, batch, max_len)
        scale = (jnp.zeros((*lead, 1), jnp.dtype(cfg.dtype)) if dtype == jnp.int8 else None)
        return cls(latent=jnp.zeros((*lead, cfg.kv_lora_rank), dtype),
                   k_rope=jnp.zeros((*lead, cfg.qk_rope_head_dim), dtype),
                   lengths=jnp.zeros((batch,), jnp.int32), scale=scale)

    batch = property(lambda self: self.latent.shape[1])
    slot_axis = HEADS_FIRST
    max_len = property(lambda self: self.latent.shape[-2])
    nbytes = property(lambda self: sum(b.nbytes for b in self.buffers))

    @property
    def buffers(self):
        return ((self.latent, self.k_rope) if self.scale is None
                else (self.latent, self.k_rope, self.scale))

    def with_buffers(self, buffers, lengths) -> "MLACache":
        return MLACache(latent=buffers[0], k_rope=buffers[1], lengths=lengths,
                        scale=buffers[2] if len(buffers) > 2 else None)


CACHE_DTYPES = ("float32", "bfloat16", "float16", "int8")


def cache_dtype(cfg: Config, dtype=None):
    """The cache's storage dtype (default: the compute dtype), checked."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    if dtype.name not in CACHE_DTYPES:
        raise ValueError(f"cache dtype {dtype.name!r} is not one of {CACHE_DTYPES}")
    return dtype


def is_int8(buffers) -> bool:
    """Whether one layer's cache buffers (or page pools) are an int8 cache's."""
    return buffers[0].dtype == jnp.int8


def quantized_news(buffers, news):
    """What to write into a layer's buffers for new float entries `news` (one per value
    buffer, in the buffers' layout): news as they are for a float cache; for an int8 cache,
    the int8 values then their scales (ops.quant.quantize_kv), one scale per vector, and for
    MLA's three buffers (latent, k_rope, scale) one scale over the joined vector."""
    if not is_int8(buffers):
        return tuple(news)
    scale_dtype = buffers[-1].dtype
    if len(buffers) == 3:   # MLA: latent and k_rope share a scale
        r = news[0].shape[-1]
        q, scale = ops.quantize_kv(jnp.concatenate(news, -1), scale_dtype)
        return q[..., :r], q[..., r:], scale
    pairs = [ops.quantize_kv(x, scale_dtype) for x in news]
    return tuple(q for q, _ in pairs) + tuple(s for _, s in pairs)


def create_cache(cfg: Config, batch: int, max_len: int, dtype=None):
    """The cache the config's attention needs: MLACache for MLA, KVCache otherwise."""
    kind = MLACache if cfg.attention == "mla" else KVCache
    return kind.create(cfg, batch, max_len, dtype)


def write_layer(buf, new, starts, axis: int = HEADS_FIRST):
    """Write new (buf's layout, t positions on the slot axis `axis`) into buf at per-row
    slot offsets starts [b]."""
    def one(row_buf, row_new, start):
        idx = [0] * row_buf.ndim
        idx[axis] = start
        return jax.lax.dynamic_update_slice(row_buf, row_new.astype(row_buf.dtype), idx)
    return jax.vmap(one)(buf, new, starts)


@partial(jax.tree_util.register_dataclass, data_fields=["block_tables", "kv_lengths"],
         meta_fields=["queries"])
@dataclasses.dataclass
class PagedRows:
    """b sequences ("rows") with `queries` new tokens each, attending over their pages.
        block_tables [b, p]  each row's page ids (slot j of a row: page j // z, offset j % z)
        kv_lengths   [b]     slots filled per row once this step's tokens are written
                             (0: a padding row, whose tokens write nowhere)"""
    block_tables: jax.Array
    kv_lengths: jax.Array
    queries: int = 1


@partial(jax.tree_util.register_dataclass, data_fields=["slots", "segments"],
         meta_fields=[])
@dataclasses.dataclass
class PageIndex:
    """Where one continuous-batching step's tokens live in a paged cache (the same for
    every layer). The step's T tokens [1,T] are the concatenation of segments of uniform
    rows — decode rows with one token each, then prefill chunks of several — row-major,
    so each segment's attention is a plain batch of rows (no per-token gather).
        slots     [T]   each token's flat slot page·z + offset (-1: padding, not written)
        segments        PagedRows, in token order
    """
    slots: jax.Array
    segments: tuple

    def split(self, a):
        """a [T,...] (one step's packed tokens) → one [b, queries, ...] per segment."""
        out, start = [], 0
        for seg in self.segments:
            b = seg.block_tables.shape[0]
            out.append(a[start:start + b * seg.queries].reshape(b, seg.queries, *a.shape[1:]))
            start += b * seg.queries
        return out

    def attend(self, q, positions, k_pages, v_pages, *, attention_impl: str, **kwargs):
        """q [1,T,h,d], positions [1,T] → [1,T,h,dv]: ops.paged_attention segment by
        segment. attention_impl is the model's: its Pallas kernel for "pallas", else the
        XLA gather reference (cuDNN has no paged op). kwargs: as ops.paged_attention."""
        impl = "pallas" if attention_impl == "pallas" else "xla"
        out = [ops.paged_attention(qs, k_pages, v_pages, seg.block_tables, ps,
                                   seg.kv_lengths, implementation=impl, **kwargs)
               for seg, qs, ps in zip(self.segments, self.split(q[0]), self.split(positions[0]))]
        return jnp.concatenate([o.reshape(-1, *o.shape[2:]) for o in out])[None]


def paged_buffers(cfg: Config, n_pages: int, page_size: int, dtype=None) -> tuple:
    """One layer's page pools: (k [P,z,k,d], v [P,z,k,dv]); MLA: ([P,z,1,r+dr],), the
    latent and the shared RoPE key side by side, attended as one kv head (absorbed form),
    values being its first r columns. int8: the pools are int8, followed by their scale
    pools [P,z,k,1] (one per pool) in the compute dtype."""
    dtype = cache_dtype(cfg, dtype)
    if cfg.attention == "mla":
        shape = (n_pages, page_size, 1, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        pools = (jnp.zeros(shape, dtype),)
    else:
        shape = (n_pages, page_size, cfg.num_kv_heads, cfg.dim_per_head)
        pools = (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
    if dtype == jnp.int8:
        pools += tuple(jnp.zeros((*shape[:-1], 1), jnp.dtype(cfg.dtype)) for _ in pools)
    return pools
