"""Flash attention in Pallas: online softmax over K/V tiles, forward and backward.

The t×s score matrix is never materialised (kernels.py holds the kernel bodies). GQA/MQA
map query head h onto kv head h // g in the BlockSpec index maps, so K/V are never
repeated in memory, and dk/dv are accumulated per kv head inside the kernel (no [b,s,h,d]
gradient buffer). Work is cut to the visible tiles of `tiles.tile_plan` (causal, sliding
window, segments, kv lengths).

This module lays out the grids, pads t and s to whole tiles and ties forward and
backward together in a custom_vjp; `flash_attention` is the entry point.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .kernels import BACKENDS, AttentionSpec, MaskInputs, dkv_kernel, dq_kernel, fwd_kernel, run
from .tiles import (BlockSizes, default_block_sizes, fit_blocks, next_pow2, pad_to, tile_bounds,
                    tile_plan)


def _plan_inputs(spec, masking, bq, bk, *, transpose, index):
    """kinds/bounds inputs for a grid whose tile index is `index(grid ids) -> (b, tile)`."""
    kinds = tile_plan(masking.qpos, masking.kpos, masking.kv_len, masking.qseg, masking.kseg,
                      causal=spec.causal, window=spec.window, block_q=bq, block_k=bk)
    if transpose:
        kinds = kinds.transpose(0, 2, 1)
    n = kinds.shape[-1]
    return [("kinds", kinds, pl.BlockSpec((None, None, n), lambda *i: (*index(*i), 0))),
            ("bounds", tile_bounds(kinds), pl.BlockSpec((None, None, 2),
                                                        lambda *i: (*index(*i), 0))),
            ("len", masking.kv_len, pl.BlockSpec((1,), lambda *i: (index(*i)[0],)))]


def _query_tile_inputs(spec, q, k, v, masking, bq, bk):
    """Grid (query tile i, batch b, head h): the q tile, its kv head's whole K/V rows (head
    h reads kv head h // g: GQA without repeating K/V), positions, segments, slope, plan."""
    d, s, dv, g = q.shape[-1], k.shape[1], v.shape[-1], spec.groups
    out = [
        ("q", q, pl.BlockSpec((None, bq, None, d), lambda i, b, h: (b, i, h, 0))),
        ("k", k, pl.BlockSpec((None, s, None, d), lambda i, b, h: (b, 0, h // g, 0))),
        ("v", v, pl.BlockSpec((None, s, None, dv), lambda i, b, h: (b, 0, h // g, 0))),
        ("qpos", masking.qpos, pl.BlockSpec((None, bq), lambda i, b, h: (b, i))),
        ("kpos", masking.kpos, pl.BlockSpec((None, s), lambda i, b, h: (b, 0)))]
    if spec.segments:
        out += [("qseg", masking.qseg, pl.BlockSpec((None, bq), lambda i, b, h: (b, i))),
                ("kseg", masking.kseg, pl.BlockSpec((None, s), lambda i, b, h: (b, 0)))]
    if spec.alibi:
        out += [("slope", masking.slopes, pl.BlockSpec((1,), lambda i, b, h: (h,)))]
    return out + _plan_inputs(spec, masking, bq, bk, transpose=False,
                              index=lambda i, b, h: (b, i))


def _forward(spec: AttentionSpec, q, k, v, masking: MaskInputs, empty_lse: float = 0.0):
    """Padded inputs → (o [b,t,h,dv], lse [b,h,t] float32); rows that see no key get o 0
    and lse `empty_lse` (ring attention combines blocks by lse and needs a very negative one)."""
    b, t, h, d = q.shape
    dv = v.shape[-1]
    bq, bk = spec.blocks.block_q, spec.blocks.block_k
    inputs = _query_tile_inputs(spec, q, k, v, masking, bq, bk)
    outputs = [
        ("o", jax.ShapeDtypeStruct((b, t, h, dv), q.dtype),
         pl.BlockSpec((None, bq, None, dv), lambda i, b_, h_: (b_, i, h_, 0))),
        ("lse", jax.ShapeDtypeStruct((b, h, t), jnp.float32),
         pl.BlockSpec((None, None, bq), lambda i, b_, h_: (b_, h_, i)))]
    kernel = functools.partial(fwd_kernel, spec, block_k=bk, empty_lse=empty_lse)
    o, lse = run(kernel, spec, grid=(t // bq, b, h), inputs=inputs, outputs=outputs,
                 name="flash_fwd")
    return o, lse


def _backward_dq(spec: AttentionSpec, q, k, v, masking: MaskInputs, lse, delta, do):
    """Grid (query tile, batch, head), as the forward."""
    b, t, h, d = q.shape
    dv = v.shape[-1]
    bq, bk = spec.blocks.block_q_dq, spec.blocks.block_k_dq
    row = lambda i, b_, h_: (b_, h_, i)
    inputs = _query_tile_inputs(spec, q, k, v, masking, bq, bk) + [
        ("do", do, pl.BlockSpec((None, bq, None, dv), lambda i, b_, h_: (b_, i, h_, 0))),
        ("lse", lse, pl.BlockSpec((None, None, bq), row)),
        ("delta", delta, pl.BlockSpec((None, None, bq), row))]
    outputs = [("dq", jax.ShapeDtypeStruct(q.shape, q.dtype),
                pl.BlockSpec((None, bq, None, d), lambda i, b_, h_: (b_, i, h_, 0)))]
    (dq,) = run(functools.partial(dq_kernel, spec), spec, grid=(t // bq, b, h),
                inputs=inputs, outputs=outputs, name="flash_bwd_dq")
    return dq


def _backward_dkv(spec: AttentionSpec, q, k, v, masking: MaskInputs, lse, delta, do):
    """Grid (kv tile, batch, kv head): each program reads all g query heads of its group."""
    b, t, h, d = q.shape
    s, kh, dv, g = k.shape[1], k.shape[2], v.shape[-1], spec.groups
    bk = spec.blocks.block_k_dkv
    tile = lambda j, b_, k_: (b_, j, k_, 0)
    inputs = [
        ("q", q, pl.BlockSpec((None, t, g, d), lambda j, b_, k_: (b_, 0, k_, 0))),
        ("do", do, pl.BlockSpec((None, t, g, dv), lambda j, b_, k_: (b_, 0, k_, 0))),
        ("lse", lse, pl.BlockSpec((None, g, t), lambda j, b_, k_: (b_, k_, 0))),
        ("delta", delta, pl.BlockSpec((None, g, t), lambda j, b_, k_: (b_, k_, 0))),
        ("k", k, pl.BlockSpec((None, bk, None, d), tile)),
        ("v", v, pl.BlockSpec((None, bk, None, dv), tile)),
        ("qpos", masking.qpos, pl.BlockSpec((None, t), lambda j, b_, k_: (b_, 0))),
        ("kpos", masking.kpos, pl.BlockSpec((None, bk), lambda j, b_, k_: (b_, j)))]
    if spec.segments:
        inputs += [("qseg", masking.qseg, pl.BlockSpec((None, t), lambda j, b_, k_: (b_, 0))),
                   ("kseg", masking.kseg, pl.BlockSpec((None, bk), lambda j, b_, k_: (b_, j)))]
    if spec.alibi:
        inputs += [("slope", masking.slopes, pl.BlockSpec((g,), lambda j, b_, k_: (k_,)))]
    inputs += _plan_inputs(spec, masking, spec.blocks.block_q_dkv, bk, transpose=True,
                           index=lambda j, b_, k_: (b_, j))
    outputs = [
        ("dk", jax.ShapeDtypeStruct(k.shape, k.dtype), pl.BlockSpec((None, bk, None, d), tile)),
        ("dv", jax.ShapeDtypeStruct(v.shape, v.dtype), pl.BlockSpec((None, bk, None, dv), tile))]
    return run(functools.partial(dkv_kernel, spec), spec, grid=(s // bk, b, kh),
               inputs=inputs, outputs=outputs, name="flash_bwd_dkv")


def _backward_padded(spec: AttentionSpec, q, k, v, masking: MaskInputs, out, lse, do):
    # delta = rowsum(dO ∘ O): elementwise, left to XLA to fuse.
    delta = jnp.einsum("bthd,bthd->bht", do.astype(jnp.float32), out.astype(jnp.float32))
    dq = _backward_dq(spec, q, k, v, masking, lse, delta, do)
    dk, dv = _backward_dkv(spec, q, k, v, masking, lse, delta, do)
    return dq, dk, dv


# ------------------------------------------------------------- padding and custom_vjp

def _padded_lengths(spec: AttentionSpec, t: int, s: int):
    bl = spec.blocks
    tq = max(bl.block_q, bl.block_q_dq, bl.block_q_dkv)  # powers of two: max is a multiple
    tk = max(bl.block_k, bl.block_k_dq, bl.block_k_dkv)
    return -(-t // tq) * tq, -(-s // tk) * tk


def _pad_inputs(spec, q, k, v, masking):
    """Pad t and s up to whole tiles. Padded keys sit past kv_len (never seen); padded
    queries repeat the last query's position/segment, so tile ranges do not widen."""
    tp, sp = _padded_lengths(spec, q.shape[1], k.shape[1])
    masking = masking._replace(
        qpos=pad_to(masking.qpos, 1, tp, "edge"), kpos=pad_to(masking.kpos, 1, sp, "edge"),
        qseg=pad_to(masking.qseg, 1, tp, "edge"), kseg=pad_to(masking.kseg, 1, sp, "edge"))
    return pad_to(q, 1, tp), pad_to(k, 1, sp), pad_to(v, 1, sp), masking


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(spec: AttentionSpec, q, k, v, masking: MaskInputs):
    return _flash_fwd(spec, q, k, v, masking)[0]


def _flash_fwd(spec, q, k, v, masking, empty_lse: float = 0.0):
    t = q.shape[1]
    o, lse = _forward(spec, *_pad_inputs(spec, q, k, v, masking), empty_lse=empty_lse)
    o, lse = o[:, :t], lse[:, :, :t]
    return o, (q, k, v, masking, o, lse)


def backward(spec: AttentionSpec, res, do):
    """Gradients (dq, dk, dv, None) from residuals (q, k, v, masking, out, lse [b,h,t]).

    Shared by the decode kernel, whose forward produces the same residuals."""
    q, k, v, masking, out, lse = res
    t, s = q.shape[1], k.shape[1]
    qp, kp, vp, maskp = _pad_inputs(spec, q, k, v, masking)
    tp = qp.shape[1]
    dq, dk, dv = _backward_padded(spec, qp, kp, vp, maskp, pad_to(out, 1, tp),
                                  pad_to(lse, 2, tp), pad_to(do.astype(out.dtype), 1, tp))
    return dq[:, :t], dk[:, :s], dv[:, :s], None


_flash.defvjp(_flash_fwd, backward)


# ---------------------------------------------------------------------- entry point

def make_spec(q, k, v, *, causal, sliding_window, scale, softcap, alibi_slopes, segments,
              block_sizes, backend) -> AttentionSpec:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; choose one of {BACKENDS}")
    d, t, s = q.shape[-1], q.shape[1], k.shape[1]
    blocks = fit_blocks(block_sizes or default_block_sizes(d), t, s)
    return AttentionSpec(causal=bool(causal), window=sliding_window,
                         scale=float(d ** -0.5 if scale is None else scale),
                         softcap=None if softcap is None else float(softcap),
                         groups=q.shape[2] // k.shape[2], segments=segments,
                         alibi=alibi_slopes is not None, blocks=blocks, backend=backend)


def make_mask_inputs(q, k, *, q_positions, kv_positions, q_segment_ids, kv_segment_ids,
                     kv_lengths, alibi_slopes) -> MaskInputs:
    """ops.attention's optional arguments as int32 arrays at full [b,·] shape (defaults:
    queries are the last t positions of s, every cache slot filled)."""
    b, t, s = q.shape[0], q.shape[1], k.shape[1]
    i32 = lambda x: None if x is None else jnp.asarray(x, jnp.int32)
    if q_positions is None:
        q_positions = jnp.arange(s - t, s, dtype=jnp.int32)
    if kv_positions is None:
        kv_positions = jnp.arange(s, dtype=jnp.int32)
    kv_len = jnp.full((b,), s, jnp.int32) if kv_lengths is None else jnp.minimum(
        jnp.broadcast_to(i32(kv_lengths), (b,)), s)
    seg = lambda x, n: None if x is None else jnp.broadcast_to(i32(x), (b, n))
    return MaskInputs(
        qpos=jnp.broadcast_to(i32(q_positions), (b, t)),
        kpos=jnp.broadcast_to(i32(kv_positions), (b, s)),
        qseg=seg(q_segment_ids, t), kseg=seg(kv_segment_ids, s), kv_len=kv_len,
        slopes=None if alibi_slopes is None else jnp.asarray(alibi_slopes, jnp.float32))


def pad_head_dims(backend, q, k, v):
    """Triton tiles must be powers of two ≥ 16 (dot minimum): zero-pad d (logits are
    unchanged) and dv (the extra output columns are sliced off)."""
    if backend != "triton":
        return q, k, v
    d, dv = max(16, next_pow2(q.shape[-1])), max(16, next_pow2(v.shape[-1]))
    return pad_to(q, 3, d), pad_to(k, 3, d), pad_to(v, 3, dv)


def flash_attention(q, k, v, *, causal=False, sliding_window=None, q_positions=None,
                    kv_positions=None, q_segment_ids=None, kv_segment_ids=None,
                    kv_lengths=None, scale=None, softcap=None, alibi_slopes=None,
                    block_sizes: BlockSizes | None = None, backend: str = "interpret"):
    """Tiled attention with ops.attention's semantics; q [b,t,h,d], k [b,s,k,d],
    v [b,s,k,dv] → [b,t,h,dv]. Differentiable in q, k, v (ALiBi slopes, positions and
    segment ids are constants). backend: "interpret" (any platform, slow) or "triton"
    (GPU; chosen explicitly, so a CUDA program can be lowered on a CPU-only machine)."""
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    spec = make_spec(q, k, v, causal=causal, sliding_window=sliding_window, scale=scale,
                     softcap=softcap, alibi_slopes=alibi_slopes,
                     segments=q_segment_ids is not None, block_sizes=block_sizes,
                     backend=backend)
    masking = make_mask_inputs(q, k, q_positions=q_positions, kv_positions=kv_positions,
                               q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                               kv_lengths=kv_lengths, alibi_slopes=alibi_slopes)
    dv = v.shape[-1]
    q, k, v = pad_head_dims(backend, q, k, v)
    return _flash(spec, q, k, v, masking)[..., :dv]
