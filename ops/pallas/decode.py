"""Split-K flash-decoding: a few new queries against a long KV cache.

With t ≤ ~16 queries a flash grid over query tiles has too few programs to fill a GPU, so
the cache is cut into `num_splits` chunks processed in parallel, each producing a partial
(normalised output, logsumexp); the partials are combined by logsumexp weights. All g query
heads (× t queries) sharing a kv head form the rows of one tile, so each K/V tile is read
once per kv head. Each program walks only its chunk's tiles that are visible and below the
row's kv length (`tiles.tile_plan`), so empty cache slots are never read.

Gradients (rarely wanted at decode, but free): the residuals match flash's, so the flash
backward kernels are reused.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import flash
from .kernels import AttentionSpec, MaskInputs, fwd_kernel, run
from .tiles import next_pow2, pad_to, tile_bounds, tile_plan


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """The static description of one decode call: the attention spec plus the split-K
    layout."""
    base: AttentionSpec  # masks, scale, backend; base.blocks drive the backward
    block_k: int
    num_splits: int
    rows: int            # t·g padded to a power of two ≥ 16 (Triton dot minimum)


def _pick_block_k(s: int, block_k: int) -> int:
    """Largest power of two ≤ block_k dividing s (≥ 16), so the cache is not copied to pad
    it; 0 when none exists (then the cache is padded)."""
    bk = block_k
    while bk >= 16:
        if s % bk == 0:
            return bk
        bk //= 2
    return 0


def _default_splits(backend: str, b: int, kh: int, nk: int) -> int:
    if backend == "interpret":  # programs run one after another: splits only add work
        return min(nk, 4)
    return max(1, min(nk, -(-264 // (b * kh))))  # ~2 programs per H100 SM


def _forward(dspec: DecodeSpec, q, k, v, masking: MaskInputs):
    """Unpadded inputs → (o [b,t,h,dv], lse [b,h,t])."""
    spec = dspec.base
    b, t, h, d = q.shape
    s, kh, dv, g = k.shape[1], k.shape[2], v.shape[-1], spec.groups
    bk, rows, r = dspec.block_k, t * g, dspec.rows
    sp = -(-s // bk) * bk
    k, v = pad_to(k, 1, sp), pad_to(v, 1, sp)
    kpos = pad_to(masking.kpos, 1, sp, "edge")
    kseg = pad_to(masking.kseg, 1, sp, "edge")
    # Rows ordered (query, head-in-group): q [b,t,k,g,d] → [b,k,t·g,d] (q is small).
    q_rows = q.reshape(b, t, kh, g, d).transpose(0, 2, 1, 3, 4).reshape(b, kh, rows, d)
    per_row = lambda x: pad_to(jnp.repeat(x, g, axis=1), 1, r, "edge")
    kinds = tile_plan(masking.qpos, kpos, masking.kv_len, masking.qseg, kseg,
                      causal=spec.causal, window=spec.window, block_q=t, block_k=bk)
    nk = sp // bk
    tiles_per_split = -(-nk // dspec.num_splits)
    splits = -(-nk // tiles_per_split)

    inputs = [
        ("q", pad_to(q_rows, 2, r), pl.BlockSpec((None, None, r, d),
                                                 lambda j, b_, k_: (b_, k_, 0, 0))),
        ("k", k, pl.BlockSpec((None, sp, None, d), lambda j, b_, k_: (b_, 0, k_, 0))),
        ("v", v, pl.BlockSpec((None, sp, None, dv), lambda j, b_, k_: (b_, 0, k_, 0))),
        ("qpos", per_row(masking.qpos), pl.BlockSpec((None, r), lambda j, b_, k_: (b_, 0))),
        ("kpos", kpos, pl.BlockSpec((None, sp), lambda j, b_, k_: (b_, 0)))]
    if spec.segments:
        inputs += [("qseg", per_row(masking.qseg),
                    pl.BlockSpec((None, r), lambda j, b_, k_: (b_, 0))),
                   ("kseg", kseg, pl.BlockSpec((None, sp), lambda j, b_, k_: (b_, 0)))]
    if spec.alibi:  # slope of each row's head: [k, t·g]
        slopes = jnp.tile(masking.slopes.reshape(kh, g), (1, t))
        inputs += [("slope", pad_to(slopes, 1, r),
                    pl.BlockSpec((None, r), lambda j, b_, k_: (k_, 0)))]
    inputs += [
        ("kinds", kinds, pl.BlockSpec((None, None, nk), lambda j, b_, k_: (b_, 0, 0))),
        ("bounds", tile_bounds(kinds), pl.BlockSpec((None, None, 2),
                                                    lambda j, b_, k_: (b_, 0, 0))),
        ("len", masking.kv_len, pl.BlockSpec((1,), lambda j, b_, k_: (b_,)))]
    outputs = [
        ("o", jax.ShapeDtypeStruct((b, kh, splits, r, dv), jnp.float32),
         pl.BlockSpec((None, None, None, r, dv), lambda j, b_, k_: (b_, k_, j, 0, 0))),
        ("lse", jax.ShapeDtypeStruct((b, kh, splits, r), jnp.float32),
         pl.BlockSpec((None, None, None, r), lambda j, b_, k_: (b_, k_, j, 0)))]
    kernel = functools.partial(fwd_kernel, spec, block_k=bk,
                               tiles_per_split=tiles_per_split, empty_lse=-jnp.inf)
    o_parts, lse_parts = run(kernel, spec, grid=(splits, b, kh), inputs=inputs,
                             outputs=outputs, name="flash_decode")
    o, lse = combine(o_parts, lse_parts)                  # [b,k,r,dv], [b,k,r]
    o = o[:, :, :rows].reshape(b, kh, t, g, dv).transpose(0, 2, 1, 3, 4).reshape(b, t, h, dv)
    lse = lse[:, :, :rows].reshape(b, kh, t, g).transpose(0, 1, 3, 2).reshape(b, h, t)
    return o.astype(q.dtype), lse


def combine(o_parts, lse_parts):
    """Merge split partials along axis 2 by logsumexp weights; empty rows → 0 (lse 0)."""
    m = lse_parts.max(2, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lse_parts - m)                            # empty split: exp(-inf) = 0
    l = w.sum(2)
    seen = l > 0.0
    l_safe = jnp.where(seen, l, 1.0)
    o = (w[..., None] * o_parts).sum(2) / l_safe[..., None]
    return o, jnp.where(seen, m[:, :, 0] + jnp.log(l_safe), 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _decode(dspec: DecodeSpec, q, k, v, masking):
    return _decode_fwd(dspec, q, k, v, masking)[0]


def _decode_fwd(dspec, q, k, v, masking):
    o, lse = _forward(dspec, q, k, v, masking)
    return o, (q, k, v, masking, o, lse)


def _decode_bwd(dspec, res, do):
    return flash.backward(dspec.base, res, do)


_decode.defvjp(_decode_fwd, _decode_bwd)


def decode_attention(q, k, v, *, causal=False, sliding_window=None, q_positions=None,
                     kv_positions=None, q_segment_ids=None, kv_segment_ids=None,
                     kv_lengths=None, scale=None, softcap=None, alibi_slopes=None,
                     block_k: int | None = None, num_splits: int | None = None,
                     backend: str = "interpret"):
    """Flash-decoding with ops.attention's semantics; meant for small t (new tokens) and
    long s (the cache). q [b,t,h,d], k [b,s,k,d], v [b,s,k,dv] → [b,t,h,dv]."""
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    b, t, h, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    spec = flash.make_spec(q, k, v, causal=causal, sliding_window=sliding_window,
                           scale=scale, softcap=softcap, alibi_slopes=alibi_slopes,
                           segments=q_segment_ids is not None, block_sizes=None,
                           backend=backend)
    masking = flash.make_mask_inputs(
        q, k, q_positions=q_positions, kv_positions=kv_positions,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, kv_lengths=kv_lengths,
        alibi_slopes=alibi_slopes)
    want = block_k or (128 if d <= 128 else 64)
    bk = _pick_block_k(s, want) or min(want, max(16, next_pow2(s)))
    nk = -(-s // bk)
    splits = num_splits or _default_splits(backend, b, kh, nk)
    rows = max(16, next_pow2(t * (h // kh)))
    dspec = DecodeSpec(base=spec, block_k=bk, num_splits=max(1, min(splits, nk)), rows=rows)
    dv = v.shape[-1]
    q, k, v = flash.pad_head_dims(backend, q, k, v)
    return _decode(dspec, q, k, v, masking)[..., :dv]
