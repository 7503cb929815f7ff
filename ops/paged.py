"""Paged attention (PagedAttention, as in vLLM): KV caches in a pool of fixed-size pages.

Shapes: a pool holds p pages of z slots, k_pages [p,z,k,d] and v_pages [p,z,k,dv]. Each
sequence ("row", n of them) owns a block table, block_tables [n,pmax] of page ids: the
token at position j of row r lives at page block_tables[r, j // z], offset j % z, so slot
index == position. Table entries past a row's pages hold any valid page id; kv_lengths [n]
masks them.

The queries are a batch of rows, t new tokens each: q [b,t,h,d] with q_positions [b,t]
(absolute positions). A continuous-batching step is a few such batches — decode rows with
t = 1, prefill chunks with t = c (model.cache.PageIndex) — rather than one packed list of
tokens, so the reference gathers each row's pages once instead of once per token (for a
256-token prefill chunk, 256× less gathered K/V).

Implementations: "xla", the plain gather reference (each row gathers its pages and runs
the dense ops.attention, so the masking maths lives in one place), and "pallas"
(ops/pallas/paged.py: one program per (query token, kv head) walking only the pages it can
see, straight out of the pool).
"""
from __future__ import annotations

import jax.numpy as jnp

from .attention import attention

IMPLEMENTATIONS = ("xla", "pallas")


def paged_write(pages, new, slots):
    """Write new tokens into a pool. pages [p,z,...]; new [T,...]; slots [T] int32 flat slot
    ids (page·z + offset), -1 for padding tokens. Returns the pages with new written.

    A scatter on the flattened [p·z,...] view with mode='drop': padding (-1) is mapped past
    the end so it is dropped too, rather than wrapping round to the last slot."""
    p, z = pages.shape[:2]
    if new.shape[1:] != pages.shape[2:]:
        raise ValueError(f"new {new.shape} must be [T, *pages.shape[2:]] = "
                         f"[T, {', '.join(map(str, pages.shape[2:]))}]")
    if slots.shape != new.shape[:1]:
        raise ValueError(f"slots {slots.shape} must be [T] = ({new.shape[0]},)")
    flat = pages.reshape(p * z, *pages.shape[2:])
    slots = jnp.where(slots < 0, p * z, slots)
    flat = flat.at[slots].set(new.astype(pages.dtype), mode="drop")
    return flat.reshape(pages.shape)


def gather_pages(pages, block_tables):
    """pages [p,z,...], block_tables [n,pmax] → [n, pmax·z, ...]: each row's slots in order
    (slot index == position)."""
    n, pmax = block_tables.shape
    return pages[block_tables].reshape(n, pmax * pages.shape[1], *pages.shape[2:])


def _check(q, k_pages, v_pages, block_tables, q_positions, kv_lengths, v_dim):
    if q.ndim != 4 or k_pages.ndim != 4:
        raise ValueError(f"paged_attention expects q [b,t,h,d] and k_pages [p,z,k,d]; got "
                         f"ranks {q.ndim}, {k_pages.ndim}")
    if q.shape[-1] != k_pages.shape[-1]:
        raise ValueError(f"q head_dim {q.shape[-1]} != k_pages head_dim {k_pages.shape[-1]}")
    h, kh = q.shape[2], k_pages.shape[2]
    if h % kh:
        raise ValueError(f"query heads ({h}) must be a multiple of kv heads ({kh})")
    if v_pages is None:
        if v_dim is None or not 0 < v_dim <= k_pages.shape[-1]:
            raise ValueError(f"v_pages=None (MLA: values are the first v_dim key columns) "
                             f"needs 0 < v_dim <= {k_pages.shape[-1]}; got v_dim={v_dim}")
    elif v_pages.ndim != 4 or v_pages.shape[:3] != k_pages.shape[:3]:
        raise ValueError(f"v_pages {v_pages.shape} must be [p,z,k,dv] with [p,z,k] = "
                         f"{k_pages.shape[:3]}")
    if block_tables.ndim != 2 or block_tables.shape[0] != q.shape[0]:
        raise ValueError(f"block_tables must be [b,pmax] with b = {q.shape[0]}, got shape "
                         f"{block_tables.shape}")
    if q_positions.shape != q.shape[:2]:
        raise ValueError(f"q_positions {q_positions.shape} must be [b,t] = {q.shape[:2]}")
    if kv_lengths.shape != q.shape[:1]:
        raise ValueError(f"kv_lengths {kv_lengths.shape} must be [b] = ({q.shape[0]},)")


def _xla_paged(q, k_pages, v_pages, block_tables, q_positions, kv_lengths, *, v_dim,
               k_scales=None, v_scales=None, **kw):
    """Gather reference: each row's pages in slot order, then the dense op (int8 pages go
    in as int8 with their gathered scales)."""
    keys = gather_pages(k_pages, block_tables)                       # [b,s,k,d]
    # MLA: values are the leading columns of the single latent key head.
    values = keys[..., :v_dim] if v_pages is None else gather_pages(v_pages, block_tables)
    b, s = keys.shape[:2]
    if k_scales is not None:
        kw["k_scale"] = gather_pages(k_scales, block_tables)
        kw["v_scale"] = (kw["k_scale"] if v_pages is None
                         else gather_pages(v_scales, block_tables))
    else:
        keys, values = keys.astype(q.dtype), values.astype(q.dtype)
    return attention(q, keys, values, causal=True,
                     q_positions=q_positions.astype(jnp.int32),
                     kv_positions=jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)),
                     kv_lengths=kv_lengths, **kw)


def paged_attention(q, k_pages, v_pages, block_tables, q_positions, kv_lengths, *,
                    sliding_window: int | None = None, scale: float | None = None,
                    softcap: float | None = None, alibi_slopes=None, v_dim: int | None = None,
                    implementation: str = "xla", k_scales=None, v_scales=None):
    """Causal attention of b rows of t new tokens each against their paged KV caches.

    Args:
      q: [b,t,h,d] queries.
      k_pages: [p,z,k,d] key pool. v_pages: [p,z,k,dv] value pool, or None for MLA
        (DeepSeek's absorbed attention over [latent ⊕ k_rope] with one kv head): values are
        then the first v_dim columns of the keys.
      block_tables: int [b,pmax] page ids per row.
      q_positions: int [b,t] absolute position of each query in its row.
      kv_lengths: int [b] filled slots per row, this step's tokens included (they were
        written with paged_write before the call); 0 for a padding row (output zeros).
      sliding_window, scale, softcap, alibi_slopes: as ops.attention.
      implementation: "xla" (gather + dense op) or "pallas" (ops/pallas/paged.py).
      k_scales, v_scales: [p,z,k] for int8 pools (one scale per token and kv head,
        ops.quant.quantize_kv); v_scales is None for MLA (the values share the keys'
        scale). "xla" applies them inside attention; the Pallas kernel reads float pages,
        so for it the pools are dequantized first (a full pass over the pool per call).
    Query (r, i) sees row r's slots j with j <= q_positions[r,i], j < kv_lengths[r] and
    q_positions[r,i] - j < sliding_window.
    Returns: [b,t,h,dv] in q's dtype.
    """
    _check(q, k_pages, v_pages, block_tables, q_positions, kv_lengths, v_dim)
    if (k_scales is None) != (k_pages.dtype != jnp.int8) or (
            v_pages is not None and (v_scales is None) != (v_pages.dtype != jnp.int8)) or (
            v_pages is None and v_scales is not None):
        raise ValueError("int8 pools need their scales (k_scales, and v_scales unless "
                         "v_pages is None) and float pools take none")
    for name, sc, pool in (("k_scales", k_scales, k_pages), ("v_scales", v_scales, v_pages)):
        if sc is not None and sc.shape != pool.shape[:3]:
            raise ValueError(f"{name} {sc.shape} must be [p,z,k] = {pool.shape[:3]}")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}; choose one of {IMPLEMENTATIONS}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be > 0, got {softcap}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if implementation == "pallas":
        if alibi_slopes is not None:
            raise ValueError("paged_attention(implementation='pallas') does not support "
                             "alibi_slopes; use implementation='xla'")
        from .pallas import paged as _pallas  # lazy: Pallas import is heavy
        if k_scales is not None:
            from .quant import dequantize_kv
            k_pages = dequantize_kv(k_pages, k_scales[..., None], q.dtype)
            if v_pages is not None:
                v_pages = dequantize_kv(v_pages, v_scales[..., None], q.dtype)
        # The kernel walks one query token per program: hand it the rows' tokens flat.
        b, t = q.shape[:2]
        rows = jnp.repeat(jnp.arange(b, dtype=jnp.int32), t)
        out = _pallas.paged_attention(q.reshape(b * t, *q.shape[2:]), k_pages, v_pages,
                                      block_tables, rows, q_positions.reshape(-1), kv_lengths,
                                      sliding_window=sliding_window, scale=scale,
                                      softcap=softcap, v_dim=v_dim)
        return out.reshape(b, t, *out.shape[1:])
    return _xla_paged(q, k_pages, v_pages, block_tables, q_positions, kv_lengths,
                      v_dim=v_dim, sliding_window=sliding_window, scale=scale,
                      softcap=softcap, alibi_slopes=alibi_slopes, k_scales=k_scales,
                      v_scales=v_scales)
