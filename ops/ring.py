"""Context-parallel attention: the sequence split over a mesh axis (call inside shard_map).

Each device holds a block of the queries, keys and values of every row ([b,t,·] locally,
t = T/N) with their global positions and segment ids. Masks come from positions, so a
block may hold any set of tokens: the zigzag order (device i holds chunks i and 2N-1-i
of the sequence), which gives every device the same causal work, needs nothing here.

  * `ring_attention`: K/V blocks travel around the ring (`lax.ppermute`) with their
    positions and segment ids; each device combines its partial results by log-sum-exp,
    so no device holds more than two K/V blocks. Pairs of sub-blocks that the mask hides
    entirely (causal future, outside a sliding window, other documents) are skipped with
    `lax.cond`. The backward pass runs the ring again with the global (out, lse), as flash
    attention's backward does per tile, and dK/dV travel home with their blocks; saving
    each step's K/V for autodiff instead would hold the whole K/V on every device.
  * `allgather_attention`: all-gather K/V (and positions, segments), then ordinary
    attention: one collective, the full K/V on each device; the simpler choice for short
    rings, and the check of the ring.

The per-block attention is plain XLA (below) or, with implementation="pallas", the flash
kernels (ops/pallas/flash.py; Triton on GPU, interpret mode on CPU), whose forward returns
the lse and whose backward takes the global out and lse. cuDNN and TPU splash attention
return no lse, so "cudnn", and "pallas" on TPU, use the XLA block.
Shapes as ops.attention: q [b,t,h,d], k [b,s,k,d], v [b,s,k,dv], all local blocks (s may
exceed t: a prefill's queries over a cache's slots, unfilled slots at a position after
every query).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .attention import IMPLEMENTATIONS, alibi_bias, attention, attention_mask

NEG = -1e30   # lse of a row that sees no key yet: finite, so exp(NEG - NEG) is 1, not nan
VARIANTS = ("ring", "allgather")


class RingSpec(NamedTuple):
    axis_name: str
    causal: bool
    window: int | None
    scale: float
    softcap: float | None
    chunks: int           # sub-blocks per device block, each pair skipped when fully masked
    implementation: str   # "xla" or "pallas"
    backend: str | None   # the Pallas backend (None: the platform's)


# --------------------------------------------------------------- one block, plain XLA

def _logits(spec: RingSpec, q, k, qpos, kpos, slopes):
    """(logits [b,k,g,t,s] float32 after softcap and ALiBi, tanh of the capped logits)."""
    b, t, h, d = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, h // kh, d)
    z = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * spec.scale
    tanh = None
    if spec.softcap is not None:
        tanh = jnp.tanh(z / spec.softcap)
        z = spec.softcap * tanh
    if slopes is not None:
        z = z + alibi_bias(slopes, qpos, kpos).reshape(b, kh, h // kh, t, -1)
    return z, tanh


def _xla_block_fwd(spec, q, k, v, mask, qpos, kpos, slopes):
    """(o [b,t,h,dv] float32, lse [b,h,t]) of q against one K/V block; NEG where no key."""
    b, t, h, _ = q.shape
    z, _ = _logits(spec, q, k, qpos, kpos, slopes)
    z = jnp.where(mask[:, None, None], z, -jnp.inf)
    m = jnp.max(z, axis=-1)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(z - m[..., None])
    l = jnp.sum(p, axis=-1)
    seen = l > 0
    p = p / jnp.where(seen, l, 1.0)[..., None]
    o = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32))
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), NEG)
    return o.reshape(b, t, h, -1), lse.reshape(b, h, t)


def _xla_block_bwd(spec, q, k, v, mask, qpos, kpos, slopes, out, lse, do):
    """(dq, dk, dv) float32 of one block, from the global out and lse (so the block's
    probabilities are the true ones and the blocks' gradients add up)."""
    b, t, h, d = q.shape
    kh = k.shape[2]
    g = h // kh
    z, tanh = _logits(spec, q, k, qpos, kpos, slopes)
    lse = lse.reshape(b, kh, g, t)[..., None]
    p = jnp.exp(jnp.where(mask[:, None, None], z - lse, -jnp.inf))
    dog = do.astype(jnp.float32).reshape(b, t, kh, g, -1)
    delta = jnp.einsum("btkgd,btkgd->bkgt", dog, out.astype(jnp.float32).reshape(dog.shape))
    dv = jnp.einsum("bkgts,btkgd->bskd", p, dog)
    dp = jnp.einsum("btkgd,bskd->bkgts", dog, v.astype(jnp.float32))
    ds = p * (dp - delta[..., None])
    if tanh is not None:
        ds = ds * (1.0 - jnp.square(tanh))
    ds = ds * spec.scale
    dq = jnp.einsum("bkgts,bskd->btkgd", ds, k.astype(jnp.float32)).reshape(b, t, h, d)
    dk = jnp.einsum("bkgts,btkgd->bskd", ds, q.astype(jnp.float32).reshape(b, t, kh, g, d))
    return dq, dk, dv


# ------------------------------------------------------- one block, Pallas flash kernels

def _flash_parts(spec, q, k, v, qpos, kpos, qseg, kseg, slopes):
    from .pallas import flash  # lazy: Pallas import is heavy
    fspec = flash.make_spec(q, k, v, causal=spec.causal, sliding_window=spec.window,
                            scale=spec.scale, softcap=spec.softcap, alibi_slopes=slopes,
                            segments=qseg is not None, block_sizes=None, backend=spec.backend)
    masking = flash.make_mask_inputs(q, k, q_positions=qpos, kv_positions=kpos,
                                     q_segment_ids=qseg, kv_segment_ids=kseg,
                                     kv_lengths=None, alibi_slopes=slopes)
    return flash, fspec, masking, flash.pad_head_dims(spec.backend, q, k, v)


def _flash_block_fwd(spec, q, k, v, qpos, kpos, qseg, kseg, slopes):
    flash, fspec, masking, (qp, kp, vp) = _flash_parts(spec, q, k, v, qpos, kpos, qseg, kseg,
                                                       slopes)
    o, (*_, lse) = flash._flash_fwd(fspec, qp, kp, vp, masking, empty_lse=NEG)
    return o[..., :v.shape[-1]].astype(jnp.float32), lse


def _flash_block_bwd(spec, q, k, v, qpos, kpos, qseg, kseg, slopes, out, lse, do):
    from .pallas.tiles import pad_to
    flash, fspec, masking, (qp, kp, vp) = _flash_parts(spec, q, k, v, qpos, kpos, qseg, kseg,
                                                       slopes)
    dvp = vp.shape[-1]
    res = (qp, kp, vp, masking, pad_to(out.astype(q.dtype), 3, dvp), lse)
    dq, dk, dv, _ = flash.backward(fspec, res, pad_to(do.astype(q.dtype), 3, dvp))
    return (dq[..., :q.shape[-1]].astype(jnp.float32), dk[..., :k.shape[-1]].astype(jnp.float32),
            dv[..., :v.shape[-1]].astype(jnp.float32))


# -------------------------------------------------------------------------- the ring

BLOCK = 512   # default largest sub-block: the XLA block holds [t/C, s/C] logits per head


def default_chunks(t: int, s: int) -> int:
    """Sub-blocks per local block: 2 (the zigzag halves) when both lengths are even, then
    doubled while the sub-blocks exceed BLOCK tokens, so a pair's logits stay bounded and
    memory grows with T/N, not (T/N)²."""
    c = 2 if t % 2 == 0 and s % 2 == 0 else 1
    while max(t, s) // c > BLOCK and t % (2 * c) == 0 and s % (2 * c) == 0:
        c *= 2
    return c


def _piece(x, i, size, axis=1):
    """x[..., i*size:(i+1)*size, ...] along `axis`, i traced (None passes through)."""
    return None if x is None else jax.lax.dynamic_slice_in_dim(x, i * size, size, axis)


def _put(x, part, i, size, axis=1):
    return jax.lax.dynamic_update_slice_in_dim(x, part, i * size, axis)


def _varying(x, axis_name):
    """Zeros made inside shard_map vary over the ring like the blocks they accumulate
    (shard_map's check_vma needs both branches of a cond to agree)."""
    pcast = getattr(jax.lax, "pcast", None)
    return x if pcast is None else pcast(x, axis_name, to="varying")


def _shift(tree, axis_name):
    """Each device's blocks to the next device of the ring (the last to the first)."""
    n = jax.lax.axis_size(axis_name)
    perm = [(i, (i + 1) % n) for i in range(n)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, axis_name, perm), tree)


def _each_pair(spec: RingSpec, tq: int, tk: int, qpos, qseg, kpos, kseg, body, carry):
    """fori_loop over the C² (query sub-block i, key sub-block j) pairs: carry =
    body(i, j, mask [b,tq,tk], carry) when the mask shows anything, else unchanged. A
    loop, not unrolled, so one pair's logits are live at a time and compile time does
    not grow with C."""
    c = spec.chunks

    def pair(p, carry):
        i, j = p // c, p % c
        mask = attention_mask(_piece(qpos, i, tq), _piece(kpos, j, tk), causal=spec.causal,
                              sliding_window=spec.window, q_segment_ids=_piece(qseg, i, tq),
                              kv_segment_ids=_piece(kseg, j, tk))
        return jax.lax.cond(jnp.any(mask), lambda c_: body(i, j, mask, c_), lambda c_: c_,
                            carry)
    return jax.lax.fori_loop(0, c * c, pair, carry)


def _visit_fwd(spec, q, qpos, qseg, slopes, acc, kv):
    """acc (o [b,t,h,dv] float32, lse [b,h,t]) updated with one K/V block."""
    k, v, kpos, kseg = kv
    tq, tk = q.shape[1] // spec.chunks, k.shape[1] // spec.chunks

    def body(i, j, mask, acc):
        o, lse = acc
        qi, qp, qs = _piece(q, i, tq), _piece(qpos, i, tq), _piece(qseg, i, tq)
        kj, vj, kp, ks = (_piece(x, j, tk) for x in (k, v, kpos, kseg))
        if spec.implementation == "pallas":
            o_b, lse_b = _flash_block_fwd(spec, qi, kj, vj, qp, kp, qs, ks, slopes)
        else:
            o_b, lse_b = _xla_block_fwd(spec, qi, kj, vj, mask, qp, kp, slopes)
        o_i, lse_i = _piece(o, i, tq), _piece(lse, i, tq, axis=2)
        new = jnp.logaddexp(lse_i, lse_b)
        w_old = jnp.exp(lse_i - new).transpose(0, 2, 1)[..., None]   # [b,tq,h,1]
        w_new = jnp.exp(lse_b - new).transpose(0, 2, 1)[..., None]
        return (_put(o, o_i * w_old + o_b * w_new, i, tq),
                _put(lse, new, i, tq, axis=2))
    return _each_pair(spec, tq, tk, qpos, qseg, kpos, kseg, body, acc)


def _ring_fwd(spec: RingSpec, q, k, v, qpos, kpos, qseg, kseg, slopes):
    b, t, h, _ = q.shape
    acc = (jnp.zeros((b, t, h, v.shape[-1]), jnp.float32), jnp.full((b, h, t), NEG, jnp.float32))
    acc = jax.tree.map(lambda x: _varying(x, spec.axis_name), acc)
    kv = (k, v, kpos, kseg)
    # Checkpointed: differentiated inside the model (shard_map in a scanned, linearized
    # layer), JAX otherwise keeps every ring step's sub-block logits as residuals of this
    # forward, [N-1, C², …] stacked: memory ∝ T²/N. The backward ring needs none of them.
    visit = jax.checkpoint(functools.partial(_visit_fwd, spec))

    def step(_, carry):
        acc, kv = carry
        nxt = _shift(kv, spec.axis_name)   # in flight while this block is visited
        return visit(q, qpos, qseg, slopes, acc, kv), nxt

    acc, kv = jax.lax.fori_loop(0, jax.lax.axis_size(spec.axis_name) - 1, step, (acc, kv))
    out, lse = visit(q, qpos, qseg, slopes, acc, kv)   # the last block: nothing left to send
    return out.astype(q.dtype), (q, k, v, qpos, kpos, qseg, kseg, slopes, out, lse)


def _ring_bwd(spec: RingSpec, res, do):
    q, k, v, qpos, kpos, qseg, kseg, slopes, out, lse = res
    tq, tk = q.shape[1] // spec.chunks, k.shape[1] // spec.chunks

    def body_for(kb, vb, kpos_b, kseg_b):
        def body(i, j, mask, acc):
            dq, dk, dv = acc
            args = (_piece(q, i, tq), _piece(kb, j, tk), _piece(vb, j, tk))
            pos = (_piece(qpos, i, tq), _piece(kpos_b, j, tk))
            segs = (_piece(qseg, i, tq), _piece(kseg_b, j, tk))
            glob = (_piece(out, i, tq), _piece(lse, i, tq, axis=2), _piece(do, i, tq))
            if spec.implementation == "pallas":
                g = _flash_block_bwd(spec, *args, *pos, *segs, slopes, *glob)
            else:
                g = _xla_block_bwd(spec, *args, mask, *pos, slopes, *glob)
            return (_put(dq, _piece(dq, i, tq) + g[0], i, tq),
                    _put(dk, _piece(dk, j, tk) + g[1], j, tk),
                    _put(dv, _piece(dv, j, tk) + g[2], j, tk))
        return body

    def step(_, carry):
        dq, kv, (dk, dv) = carry
        nxt = _shift(kv, spec.axis_name)   # the next K/V block travels during the maths
        dq, dk, dv = _each_pair(spec, tq, tk, qpos, qseg, kv[2], kv[3], body_for(*kv),
                                (dq, dk, dv))
        return dq, nxt, _shift((dk, dv), spec.axis_name)

    zeros = lambda x: _varying(jnp.zeros(x.shape, jnp.float32), spec.axis_name)  # noqa: E731
    # n steps and n shifts: every K/V block, with its accumulated dK/dV, comes home.
    dq, _, (dk, dv) = jax.lax.fori_loop(0, jax.lax.axis_size(spec.axis_name), step,
                                        (zeros(q), (k, v, kpos, kseg), (zeros(k), zeros(v))))
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
            None, None, None, None, None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(spec: RingSpec, q, k, v, qpos, kpos, qseg, kseg, slopes):
    return _ring_fwd(spec, q, k, v, qpos, kpos, qseg, kseg, slopes)[0]


_ring.defvjp(_ring_fwd, _ring_bwd)


# ----------------------------------------------------------------------- entry points

def _check(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or q.shape[2] % k.shape[2]:
        raise ValueError(f"ring attention expects q [b,t,h,d], k [b,s,k,d], v [b,s,k,dv] with "
                         f"h a multiple of k; got {q.shape}, {k.shape}, {v.shape}")
    if q_positions is None or kv_positions is None:
        raise ValueError("context-parallel attention needs q_positions and kv_positions: a "
                         "device's block does not know where it sits in the sequence")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")


def ring_attention(q, k, v, *, axis_name: str, q_positions, kv_positions, causal=False,
                   sliding_window: int | None = None, q_segment_ids=None, kv_segment_ids=None,
                   scale: float | None = None, softcap: float | None = None,
                   alibi_slopes=None, chunks: int | None = None, implementation: str = "xla",
                   backend: str | None = None):
    """Attention of this device's queries over every device's keys along `axis_name`
    (inside shard_map), with ops.attention's masking by global positions and segments.
    The local key block may be longer than the queries' (prefill over a cache's slots).
    chunks: sub-blocks per block, each pair skipped when its mask is empty (default
    `default_chunks`: the two zigzag halves, split further to at most BLOCK tokens).
    Returns [b,t,h,dv] in q's dtype;
    differentiable in q, k and v."""
    _check(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids)
    b, t, s = q.shape[0], q.shape[1], k.shape[1]
    if chunks is None:
        chunks = default_chunks(t, s)
    if not isinstance(chunks, int) or chunks < 1 or t % chunks or s % chunks:
        raise ValueError(f"chunks={chunks!r} must be a positive int dividing the local query "
                         f"and key lengths ({t} and {s})")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}; choose one of {IMPLEMENTATIONS}")
    if alibi_slopes is not None and tuple(alibi_slopes.shape) != (q.shape[2],):
        raise ValueError(f"alibi_slopes must have shape [h]=({q.shape[2]},), got "
                         f"{tuple(alibi_slopes.shape)}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    if implementation == "pallas":
        from .pallas.dispatch import default_backend
        backend = backend or default_backend()
        if backend == "tpu":  # splash attention returns no lse: XLA blocks on TPU
            implementation = "xla"
    spec = RingSpec(axis_name, bool(causal), sliding_window,
                    float(q.shape[-1] ** -0.5 if scale is None else scale),
                    None if softcap is None else float(softcap), chunks,
                    "pallas" if implementation == "pallas" else "xla", backend)
    i32 = lambda x, n: None if x is None else jnp.broadcast_to(x, (b, n)).astype(jnp.int32)
    slopes = None if alibi_slopes is None else jnp.asarray(alibi_slopes, jnp.float32)
    return _ring(spec, q, k, v, i32(q_positions, t), i32(kv_positions, s),
                 i32(q_segment_ids, t), i32(kv_segment_ids, s), slopes)


def allgather_attention(q, k, v, *, axis_name: str, q_positions, kv_positions, causal=False,
                        sliding_window: int | None = None, q_segment_ids=None,
                        kv_segment_ids=None, scale: float | None = None,
                        softcap: float | None = None, alibi_slopes=None,
                        implementation: str = "xla"):
    """As ring_attention, by gathering every device's K/V (and positions, segments) first.
    Autodiff gives the backward (the gather's transpose is a reduce-scatter of dK/dV)."""
    _check(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids)
    b, t, s = q.shape[0], q.shape[1], k.shape[1]

    def gather(x, n):
        if x is None:
            return None
        x = jnp.broadcast_to(x, (b, n, *x.shape[2:])) if x.ndim == 2 else x
        return jax.lax.all_gather(x, axis_name, axis=1, tiled=True)
    return attention(q, gather(k, s), gather(v, s), causal=causal,
                     sliding_window=sliding_window, q_positions=q_positions,
                     kv_positions=gather(kv_positions, s), q_segment_ids=q_segment_ids,
                     kv_segment_ids=gather(kv_segment_ids, s), scale=scale, softcap=softcap,
                     alibi_slopes=alibi_slopes, implementation=implementation)


def context_attention(q, k, v, *, variant: str = "ring", **kwargs):
    """ring_attention or allgather_attention by name (Config.context_parallel)."""
    if variant not in VARIANTS:
        raise ValueError(f"context-parallel variant {variant!r}; choose one of {VARIANTS}")
    if variant == "allgather":   # one gathered attention: no sub-blocks, ops.attention's backend
        kwargs.pop("chunks", None)
        kwargs.pop("backend", None)
        return allgather_attention(q, k, v, **kwargs)
    return ring_attention(q, k, v, **kwargs)
