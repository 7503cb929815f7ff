"""Context parallelism: the sequence split over the mesh's 'sequence' axis.

Under a mesh whose 'sequence' axis has N > 1 devices (jax.set_mesh, as the trainer and
the engine run), every attention layer calls `attention` below instead of ops.attention.
When both the query and the key lengths split over N, it runs ops.ring (ring or
all-gather, Config.context_parallel) inside shard_map: each device keeps its queries and
sees the keys of the others one block at a time. Everything else in a block works on one
token at a time, so XLA's partitioner keeps it split along the sequence as it arrives.
Decode steps (one query) do not split and take ops.attention, as without the axis.

Causal load balance is the caller's: ops.ring masks by global positions, so the trainer
lays each sequence out in the zigzag order (`zigzag_order`): device i holds chunks i and
2N-1-i of 2N, and every device does the same causal work. With the plain split device
i's queries see the keys of blocks 0..i: the last does (2N-1)/N times the mean causal
work (1.75× at N=4, 1.875× at N=8), and every step waits for it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxlm import ops
from jaxlm.ops import ring

from .sharding import logical_to_spec

AXIS = "sequence"
ORDERS = ("zigzag", "contiguous")
_HIDDEN = 2 ** 30   # the position of an unfilled cache slot: after every query, so causally hidden


def sequence_size(mesh=None) -> int:
    """Devices along 'sequence' of the mesh in context (jax.set_mesh), 1 without one."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    return 1 if mesh.empty else dict(mesh.shape).get(AXIS, 1)


def zigzag_order(length: int, n: int, order: str = "zigzag") -> np.ndarray:
    """The permutation of 0..length-1 that lays a sequence out over n devices: device i's
    contiguous block holds chunks i and 2n-1-i of 2n (zigzag), or chunk i of n."""
    if order not in ORDERS:
        raise ValueError(f"sequence order {order!r}; choose one of {ORDERS}")
    pieces = 2 * n if order == "zigzag" else n
    if length % pieces:
        raise ValueError(f"a sequence of {length} tokens does not split into {pieces} equal "
                         f"chunks for {n} devices on the 'sequence' axis ({order} order); "
                         f"make the length a multiple of {pieces}")
    idx = np.arange(length).reshape(pieces, -1)
    if order == "contiguous":
        return idx.reshape(-1)
    return np.concatenate([np.concatenate([idx[i], idx[pieces - 1 - i]]) for i in range(n)])


def split_lengths(x):
    """x [b,t,...] constrained to rows over the batch axes and t over 'sequence' (prefill
    activations arrive whole; this starts the split). Unchanged when t does not split."""
    n = sequence_size()
    if n == 1 or x.shape[1] % n:
        return x
    mesh = jax.sharding.get_abstract_mesh()
    names = ("batch", "length") + (None,) * (x.ndim - 2)
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh))


def attention(q, k, v, *, variant: str = "ring", causal=False, q_positions=None,
              kv_positions=None, q_segment_ids=None, kv_segment_ids=None, kv_lengths=None,
              k_scale=None, v_scale=None, **kwargs):
    """ops.attention, context-parallel when the mesh in context splits the sequence and
    both lengths divide over it. Cache slots past kv_lengths take a position after every
    query (causal masking hides them); an int8 cache is dequantized first (ops.ring reads
    float blocks)."""
    n = sequence_size()
    b, t, s = q.shape[0], q.shape[1], k.shape[1]
    if n == 1 or t % n or s % n or (kv_lengths is not None and not causal):
        return ops.attention(q, k, v, causal=causal, q_positions=q_positions,
                             kv_positions=kv_positions, q_segment_ids=q_segment_ids,
                             kv_segment_ids=kv_segment_ids, kv_lengths=kv_lengths,
                             k_scale=k_scale, v_scale=v_scale, **kwargs)
    if k_scale is not None:
        k = ops.dequantize_kv(k, k_scale[..., None], q.dtype)
    if v_scale is not None:
        v = ops.dequantize_kv(v, v_scale[..., None], q.dtype)
    dq, dk = ops.default_positions(b, t, s)
    qpos = dq if q_positions is None else jnp.broadcast_to(q_positions, (b, t))
    kpos = dk if kv_positions is None else jnp.broadcast_to(kv_positions, (b, s))
    if kv_lengths is not None:
        kpos = jnp.where(jnp.arange(s)[None] < kv_lengths[:, None], kpos, _HIDDEN)
    return _sharded(q, k, v, qpos.astype(jnp.int32), kpos.astype(jnp.int32), q_segment_ids,
                    kv_segment_ids, variant=variant, causal=causal, **kwargs)


def _sharded(q, k, v, qpos, kpos, qseg, kseg, *, variant, alibi_slopes=None, **kwargs):
    """shard_map of ops.ring over the mesh in context: rows over the batch axes, lengths
    over 'sequence', heads over 'tensor' when the kv heads split too (a GQA model with
    fewer kv heads than tensor ranks keeps every head, as its kv heads are replicated)."""
    mesh = jax.sharding.get_abstract_mesh()
    b, kh = q.shape[0], k.shape[2]
    rows = logical_to_spec(("batch",), (b,), mesh)[0]
    heads = logical_to_spec(("kv_heads",), (kh,), mesh)[0]
    spec = P(rows, AXIS, heads, None)   # q, k, v and the output alike
    tok = P(rows, AXIS)
    seg = None if qseg is None else tok

    def local(q, k, v, qpos, kpos, qseg, kseg, slopes):
        return ring.context_attention(
            q, k, v, variant=variant, axis_name=AXIS, q_positions=qpos, kv_positions=kpos,
            q_segment_ids=qseg, kv_segment_ids=kseg, alibi_slopes=slopes, **kwargs)

    return jax.shard_map(local, mesh=mesh,   # ALiBi: each device's slopes of its own heads
                         in_specs=(spec, spec, spec, tok, tok, seg, seg, P(heads)),
                         out_specs=spec, check_vma=False)(
        q, k, v, qpos, kpos, qseg, kseg, alibi_slopes)
