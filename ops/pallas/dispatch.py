"""Entry point for ops.attention(implementation="pallas"): pick kernel and backend.

Kernel: few queries against a longer cache → split-K decode; otherwise flash.
Backend: CPU → Pallas interpret mode (slow; for tests); GPU → Triton lowering; TPU →
JAX's splash attention (jax.experimental.pallas.ops.tpu), which takes index-based masks,
so features it cannot express raise a ValueError there.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from . import decode, flash
from .tiles import BlockSizes

DECODE_MAX_QUERIES = 16   # t at or below this, against a cache ≥ 4·t long, uses decode


def default_backend() -> str:
    platform = jax.default_backend()
    if platform == "cpu":
        return "interpret"
    if platform in ("gpu", "cuda", "rocm"):
        return "triton"
    if platform == "tpu":
        return "tpu"
    raise ValueError(f"no Pallas attention backend for platform {platform!r}; "
                     f"use implementation='xla'")


def use_decode(t: int, s: int) -> bool:
    return t <= DECODE_MAX_QUERIES and s >= 4 * t


def attention(q, k, v, *, causal=False, sliding_window=None, q_positions=None,
              kv_positions=None, q_segment_ids=None, kv_segment_ids=None, kv_lengths=None,
              scale=None, softcap=None, alibi_slopes=None, backend: str | None = None,
              block_sizes: BlockSizes | None = None):
    """Same arguments and semantics as ops.attention; positions may be None (defaults)."""
    h, t, s = q.shape[2], q.shape[1], k.shape[1]
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    if alibi_slopes is not None and tuple(alibi_slopes.shape) != (h,):
        raise ValueError(f"alibi_slopes must have shape [h]=({h},), got {alibi_slopes.shape}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be > 0, got {softcap}")
    backend = backend or default_backend()
    kw = dict(causal=causal, sliding_window=sliding_window, q_positions=q_positions,
              kv_positions=kv_positions, q_segment_ids=q_segment_ids,
              kv_segment_ids=kv_segment_ids, kv_lengths=kv_lengths, scale=scale,
              softcap=softcap, alibi_slopes=alibi_slopes)
    if backend == "tpu":
        return splash_attention(q, k, v, **kw)
    if use_decode(t, s):
        return decode.decode_attention(q, k, v, backend=backend, **kw)
    return flash.flash_attention(q, k, v, backend=backend, block_sizes=block_sizes, **kw)


# ----------------------------------------------------------------------------- TPU

_NO_SEGMENT = np.iinfo(np.int32).min  # marks cache slots past kv_lengths


def _positions_are_default(q_positions, kv_positions, t, s) -> bool:
    """True when absent, or concrete and equal to ops.attention's defaults. Traced
    positions cannot be checked, so they count as custom."""
    for pos, first, n in ((q_positions, s - t, t), (kv_positions, 0, s)):
        if pos is None:
            continue
        try:
            pos = np.asarray(pos)
        except jax.errors.JAXTypeError:  # traced under jit: values unknown
            return False
        if not np.array_equal(pos, np.broadcast_to(np.arange(first, first + n), pos.shape)):
            return False
    return True


def splash_unsupported(q, k, *, q_positions, kv_positions, alibi_slopes, block=128):
    """Reasons the splash path cannot run this call (empty list: it can)."""
    t, s = q.shape[1], k.shape[1]
    why = []
    if alibi_slopes is not None:
        why.append("alibi_slopes")
    if not _positions_are_default(q_positions, kv_positions, t, s):
        why.append("explicit q_positions/kv_positions (splash masks are index-based; pass "
                   "positions only when they differ from the defaults)")
    if t % block or s % block:
        why.append(f"sequence lengths t={t}, s={s} that are not multiples of {block}")
    return why


def splash_attention(q, k, v, *, causal, sliding_window, q_positions, kv_positions,
                     q_segment_ids, kv_segment_ids, kv_lengths, scale, softcap, alibi_slopes,
                     _interpret: bool = False):
    """TPU: JAX's splash attention, vmapped over batch and kv heads (MQA kernel per group).

    kv_lengths become segment ids (slots past the length get a segment no query has).
    CI runs it only through TPU interpret mode on CPU (`_interpret=True`); rows with no
    visible key are undefined in splash."""
    why = splash_unsupported(q, k, q_positions=q_positions, kv_positions=kv_positions,
                             alibi_slopes=alibi_slopes)
    if why:
        raise ValueError("implementation='pallas' on TPU (splash attention) does not support "
                         + "; ".join(why) + ". Use implementation='xla'.")
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    b, t, h, d = q.shape
    s, kh, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = h // kh
    scale = d ** -0.5 if scale is None else scale
    if sliding_window is not None:
        mask = splash.LocalMask((t, s), (sliding_window - 1, 0 if causal else sliding_window - 1),
                                offset=s - t)
    elif causal:
        mask = splash.CausalMask((t, s), offset=s - t)
    else:
        mask = splash.FullMask((t, s))
    kernel = splash.make_splash_mqa_single_device(
        splash.MultiHeadMask([mask] * g), attn_logits_soft_cap=softcap, interpret=_interpret)

    segments = None
    if q_segment_ids is not None or kv_lengths is not None:
        qs = jnp.zeros((b, t), jnp.int32) if q_segment_ids is None else q_segment_ids
        ks = jnp.zeros((b, s), jnp.int32) if kv_segment_ids is None else kv_segment_ids
        if kv_lengths is not None:
            ks = jnp.where(jnp.arange(s)[None] < kv_lengths[:, None], ks, _NO_SEGMENT)
        segments = splash.SegmentIds(q=qs.astype(jnp.int32), kv=ks.astype(jnp.int32))

    qg = (q.astype(jnp.float32) * scale).astype(q.dtype)   # splash applies no scale
    qg = qg.reshape(b, t, kh, g, d).transpose(0, 2, 3, 1, 4)        # [b,k,g,t,d]
    kk, vv = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)      # [b,k,s,d]
    per_head = lambda q_, k_, v_, seg: kernel(q_, k_, v_, segment_ids=seg)
    seg_axes = None if segments is None else 0
    out = jax.vmap(jax.vmap(per_head, in_axes=(0, 0, 0, None)),
                   in_axes=(0, 0, 0, seg_axes))(qg, kk, vv, segments)  # [b,k,g,t,dv]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, dv)
