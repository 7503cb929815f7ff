"""Paged attention kernel: packed query tokens against their rows' pages, read in place.

One program per (query token, kv head): it holds the g query heads sharing that kv head as
the rows of one tile, reads its token's position, kv length and page range from small
per-token arrays, and walks only the pages it can see (from the first page the sliding
window reaches to the last filled slot at or before its position), looking each page id up
in its row's block table and loading the K/V page straight from the pool with dynamic ref
indexing (the pools are passed whole, never blocked over pages, and never gathered into a
per-row copy). Online softmax in float32, as kernels.fwd_kernel.

Backends: "interpret" (CPU, tests) and "triton" (GPU). Triton tensors must have power-of-two
sizes and dots need every side ≥ 16, so there: the g rows are zero-padded to a power of two
≥ 16 (q is small), the page size must be a power of two ≥ 16, and the head dims are cut into
power-of-two column chunks (576 = 512 + 64 for DeepSeek's MLA) so the pools are never
padded (that would copy the whole cache every step). TPU is refused (use 'xla').
Forward only: a decode-time op.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .dispatch import default_backend
from .kernels import _dot, _dot_nt
from .tiles import next_pow2, pad_to

BACKENDS = ("interpret", "triton")


def _chunks(n: int, triton: bool):
    """(offset, size) column chunks: whole on interpret; powers of two on Triton."""
    if not triton:
        return ((0, n),)
    out, off = [], 0
    for bit in reversed(range(n.bit_length())):
        if n & (1 << bit):
            out.append((off, 1 << bit))
            off += 1 << bit
    return tuple(out)


def _kernel(q_ref, meta_ref, tab_ref, k_ref, v_ref, o_ref, *, z, d_chunks, v_chunks, scale,
            softcap, window):
    head = pl.program_id(1)
    pos, length, lo, hi = meta_ref[0], meta_ref[1], meta_ref[2], meta_ref[3]
    qs = [q_ref[:, pl.ds(off, c)] for off, c in d_chunks]
    rows = qs[0].shape[0]
    # MLA: values are leading key columns; reuse the loaded key tiles when chunks line up.
    reuse = v_ref is None and v_chunks == d_chunks[:len(v_chunks)]

    def step(j, carry):
        accs, m, l = carry
        page = tab_ref[j]
        ks = [k_ref[page, :, head, pl.ds(off, c)] for off, c in d_chunks]
        s = functools.reduce(jnp.add, [_dot_nt(qc, kc) for qc, kc in zip(qs, ks)]) * scale
        if softcap is not None:
            s = softcap * jnp.tanh(s / softcap)
        slot = j * z + jnp.arange(z, dtype=jnp.int32)
        ok = (slot <= pos) & (slot < length)
        if window is not None:
            ok = ok & (pos - slot < window)
        s = jnp.where(ok[None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(-1))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with nothing seen yet
        p = jnp.exp(s - m_use[:, None])
        alpha = jnp.exp(m - m_use)
        if reuse:
            vs = ks[:len(v_chunks)]
        else:
            src = k_ref if v_ref is None else v_ref
            vs = [src[page, :, head, pl.ds(off, c)] for off, c in v_chunks]
        # Unfilled slots may hold anything (stale pages, NaN): 0 · NaN must not leak.
        vs = [jnp.where(ok[:, None], v, 0) for v in vs]
        accs = tuple(alpha[:, None] * a + _dot(p.astype(v.dtype), v) for a, v in zip(accs, vs))
        return accs, m_new, alpha * l + p.sum(-1)

    init = (tuple(jnp.zeros((rows, c), jnp.float32) for _, c in v_chunks),
            jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32))
    accs, _, l = lax.fori_loop(lo, hi, step, init)
    l_safe = jnp.where(l > 0.0, l, 1.0)  # no visible slot (padding token): zeros
    for (off, c), a in zip(v_chunks, accs):
        o_ref[:, pl.ds(off, c)] = (a / l_safe[:, None]).astype(o_ref.dtype)


def _check_triton(z, d, dv):
    if z < 16 or z & (z - 1):
        raise ValueError(f"paged attention on Triton needs a page size that is a power of "
                         f"two >= 16, got z={z}; change the page size or use "
                         f"implementation='xla'")
    if d % 16 or dv % 16:
        raise ValueError(f"paged attention on Triton needs head dims that are multiples of "
                         f"16, got d={d}, dv={dv}; use implementation='xla'")


def _token_meta(q_rows, q_positions, kv_lengths, *, z, pmax, window):
    """Per token [T,4] int32: position, kv length, first and last+1 page to visit."""
    rows = jnp.maximum(q_rows, 0)
    length = jnp.where(q_rows >= 0, kv_lengths[rows], 0).astype(jnp.int32)
    pos = q_positions.astype(jnp.int32)
    seen = jnp.clip(jnp.minimum(length, pos + 1), 0, pmax * z)  # slots [0, seen) may count
    hi = -(-seen // z)
    lo = jnp.zeros_like(hi) if window is None else jnp.maximum(pos - window + 1, 0) // z
    return jnp.stack([pos, length, jnp.minimum(lo, hi), hi], -1).astype(jnp.int32)


def paged_attention(q, k_pages, v_pages, block_tables, q_rows, q_positions, kv_lengths, *,
                    scale, sliding_window=None, softcap=None, v_dim=None,
                    backend: str | None = None):
    """ops.paged_attention's semantics (arguments already validated there); q [T,h,d],
    k_pages [p,z,k,d], v_pages [p,z,k,dv] or None (MLA, values = k[..., :v_dim])
    → [T,h,dv]. backend: "interpret" or "triton"; default from the platform."""
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"paged attention has no Pallas kernel for backend {backend!r}; "
                         f"use implementation='xla'")
    triton = backend == "triton"
    t, h, d = q.shape
    z, kh = k_pages.shape[1], k_pages.shape[2]
    dv = v_dim if v_pages is None else v_pages.shape[-1]
    g, pmax = h // kh, block_tables.shape[1]
    if triton:
        _check_triton(z, d, dv)
    rows = max(16, next_pow2(g)) if triton else g
    qg = pad_to(q.reshape(t, kh, g, d), 2, rows)                     # [T,k,rows,d]
    meta = _token_meta(q_rows, q_positions, kv_lengths, z=z, pmax=pmax, window=sliding_window)
    tables = block_tables[jnp.maximum(q_rows, 0)].astype(jnp.int32)  # [T,pmax]

    whole = lambda x: pl.BlockSpec(x.shape, lambda i, j: (0,) * x.ndim)
    arrays = [qg, meta, tables, k_pages] + ([] if v_pages is None else [v_pages])
    in_specs = [pl.BlockSpec((None, None, rows, d), lambda i, j: (i, j, 0, 0)),
                pl.BlockSpec((None, 4), lambda i, j: (i, 0)),
                pl.BlockSpec((None, pmax), lambda i, j: (i, 0)),
                whole(k_pages)] + ([] if v_pages is None else [whole(v_pages)])
    kernel = functools.partial(_kernel, z=z, d_chunks=_chunks(d, triton),
                               v_chunks=_chunks(dv, triton), scale=scale, softcap=softcap,
                               window=sliding_window)
    if v_pages is None:  # keep one kernel signature: v_ref is None for MLA
        body = lambda q_ref, m_ref, t_ref, k_ref, o_ref: kernel(q_ref, m_ref, t_ref, k_ref,
                                                                None, o_ref)
    else:
        body = kernel
    extra = {"interpret": True}
    if triton:
        from jax.experimental.pallas import triton as plgpu
        extra = {"compiler_params": plgpu.CompilerParams(num_warps=4, num_stages=2)}
    out = pl.pallas_call(
        body, grid=(t, kh), name="paged_attention", in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, rows, dv), lambda i, j: (i, j, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((t, kh, rows, dv), q.dtype), **extra)(*arrays)
    return out[:, :, :g].reshape(t, h, dv)
