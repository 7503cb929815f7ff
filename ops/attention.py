"""Scaled dot-product attention: the reference implementation and dispatch.

Shapes: q [b,t,h,d], k [b,s,k,d], v [b,s,k,dv], output [b,t,h,dv], with b batch,
t query positions, s key/value positions, h query heads, k kv heads, d the query/key
head dim and dv the value head dim.
Grouped-query attention groups the h query heads into k groups of g = h/k heads
that share one K/V head; K and V are never repeated in memory.

Masking is expressed through positions rather than indices so that one function
serves training (t == s), prefill and cached decode (t != s): query i at position
q_positions[b,i] may see key j at kv_positions[b,j] when
  * causal:          kv_pos <= q_pos
  * sliding window:  q_pos - kv_pos < window     (the window counts the query itself)
  * segment ids:     q_segment == kv_segment     (packed sequences, padding = its own id);
                     a key with segment id < 0 is shared by every segment (prefix tuning's
                     virtual tokens; the xla implementation only)
  * kv_lengths:      j < kv_lengths[b]           (unfilled cache slots are never seen)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn", "pallas")


def _check_shapes(q, k, v):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"attention expects q [b,t,h,d], k [b,s,k,d], v [b,s,k,dv]; got ranks "
            f"{q.ndim}, {k.ndim}, {v.ndim}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k {k.shape} and v {v.shape} must agree in [b,s,k]")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"batch differs: q has {q.shape[0]}, k/v have {k.shape[0]}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q head_dim {q.shape[-1]} != k head_dim {k.shape[-1]}")
    h, kh = q.shape[2], k.shape[2]
    if h % kh:
        raise ValueError(
            f"query heads ({h}) must be a multiple of kv heads ({kh}) for grouped-query "
            f"attention; pick num_kv_heads dividing num_heads")


def default_positions(b: int, t: int, s: int):
    """Queries are the last t of the s key positions (t == s in training)."""
    q_pos = jnp.broadcast_to(jnp.arange(s - t, s, dtype=jnp.int32), (b, t))
    kv_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    return q_pos, kv_pos


def attention_mask(q_positions, kv_positions, *, causal=False, sliding_window=None,
                   q_segment_ids=None, kv_segment_ids=None, kv_lengths=None):
    """Boolean mask [b,t,s]: True where query t may attend to key s."""
    qp = q_positions[:, :, None]
    kp = kv_positions[:, None, :]
    mask = jnp.ones(jnp.broadcast_shapes(qp.shape, kp.shape), dtype=bool)
    if causal:
        mask &= kp <= qp
    if sliding_window is not None:
        mask &= (qp - kp) < sliding_window
        if not causal:  # a symmetric window for bidirectional attention
            mask &= (kp - qp) < sliding_window
    if q_segment_ids is not None or kv_segment_ids is not None:
        if q_segment_ids is None or kv_segment_ids is None:
            raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
        ks = kv_segment_ids[:, None, :]
        mask &= (q_segment_ids[:, :, None] == ks) | (ks < 0)
    if kv_lengths is not None:
        s = kv_positions.shape[1]
        mask &= jnp.arange(s)[None, None, :] < kv_lengths[:, None, None]
    return mask


def alibi_bias(slopes, q_positions, kv_positions):
    """ALiBi bias [b,h,t,s] = -slope_h * |q_pos - kv_pos|."""
    dist = jnp.abs(q_positions[:, :, None] - kv_positions[:, None, :]).astype(jnp.float32)
    return -slopes.astype(jnp.float32)[None, :, None, None] * dist[:, None]


def soft_cap(x, cap):
    """Gemma-2 style logit soft-capping: cap * tanh(x / cap)."""
    return cap * jnp.tanh(x / cap)


def xla_attention(q, k, v, mask, *, scale, softcap=None, bias=None, k_scale=None,
                  v_scale=None):
    """Reference: softmax(q kᵀ · scale [+ bias]) v with an explicit [b,t,s] mask.

    Logits and softmax are float32 whatever the input dtype. Rows whose mask is
    all False (padding queries) produce zeros instead of NaN.
    k_scale, v_scale [b,s,k]: k and v are int8 with one scale per (token, kv head)
    (ops.quant.quantize_kv); the keys' scale multiplies the logits and the values' scale
    the probabilities, so neither is dequantized whole (as jax-llm-examples does).
    """
    b, t, h, d = q.shape
    s, kh, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = h // kh
    # The g query heads sharing a kv head and the t queries form one row axis r = (g, t),
    # so each (batch, kv head) pair is a plain [r,d]·[s,d]ᵀ matmul. Keeping t apart
    # ("btkgd,bskd->bkgts") makes XLA's CPU dots transpose operands first: 2-3× slower
    # in decode (t = 1) and ~25% slower forward+backward in training.
    rows = q.reshape(b, t, kh, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kh, g * t, d)
    logits = jnp.einsum("bkrd,bskd->bkrs", rows, k.astype(q.dtype),
                        preferred_element_type=jnp.float32)
    if k_scale is not None:  # [b,s,k] → [b,k,1,s]
        logits = logits * k_scale.astype(jnp.float32).transpose(0, 2, 1)[:, :, None]
    logits = logits.reshape(b, kh, g, t, s) * scale
    if softcap is not None:
        logits = soft_cap(logits, softcap)
    if bias is not None:  # [b,h,t,s] → [b,k,g,t,s]
        logits = logits + bias.reshape(bias.shape[0], kh, g, *bias.shape[2:])
    m = mask[:, None, None]
    logits = jnp.where(m, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(m.any(-1, keepdims=True), probs, 0.0)
    probs = probs.reshape(b, kh, g * t, s)
    if v_scale is not None:
        probs = probs * v_scale.astype(jnp.float32).transpose(0, 2, 1)[:, :, None]
    vdtype = q.dtype if v_scale is not None else v.dtype
    out = jnp.einsum("bkrs,bskd->bkrd", probs.astype(vdtype), v.astype(vdtype),
                     preferred_element_type=jnp.float32)
    out = out.reshape(b, kh, g, t, dv).transpose(0, 3, 1, 2, 4)
    return out.reshape(b, t, h, dv).astype(q.dtype)


def _cudnn_attention(q, k, v, *, causal, sliding_window, scale, kv_lengths,
                     positions_given, softcap, alibi_slopes, segments_given):
    unsupported = [name for name, used in (
        ("softcap", softcap is not None), ("alibi_slopes", alibi_slopes is not None),
        ("segment ids", segments_given), ("explicit positions", positions_given)) if used]
    if unsupported:
        raise ValueError(
            f"implementation='cudnn' does not support {', '.join(unsupported)}; "
            f"use implementation='xla' (or 'pallas')")
    if (causal or sliding_window is not None) and q.shape[1] != k.shape[1]:
        # jax.nn.dot_product_attention aligns its causal mask with the *first* t keys,
        # while jaxlm's queries are the *last* t of s (cached decode, chunked prefill).
        raise ValueError(
            f"implementation='cudnn' supports causal/windowed masks only for t == s "
            f"(got t={q.shape[1]}, s={k.shape[1]}); use implementation='xla' or 'pallas'")
    window = None
    if sliding_window is not None:
        window = (sliding_window - 1, 0 if causal else sliding_window - 1)
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=causal, local_window_size=window,
        key_value_seq_lengths=kv_lengths, implementation="cudnn")


def attention(q, k, v, *, causal: bool = False, sliding_window: int | None = None,
              q_positions=None, kv_positions=None, q_segment_ids=None,
              kv_segment_ids=None, kv_lengths=None, scale: float | None = None,
              softcap: float | None = None, alibi_slopes=None,
              implementation: str = "xla", k_scale=None, v_scale=None):
    """Multi-head / grouped-query / multi-query attention.

    Args:
      q: [b,t,h,d] queries. k: [b,s,k,d] keys. v: [b,s,k,dv] values; h % k == 0.
      causal: mask keys at later positions than the query.
      sliding_window: a query sees only the last `sliding_window` positions
        (itself included), as Mistral's sliding_window.
      q_positions, kv_positions: int [b,t] / [b,s]; default: queries are the last
        t of the s positions (so cached decode needs no positions when aligned).
      q_segment_ids, kv_segment_ids: int [b,t] / [b,s]; attend only within a segment.
      kv_lengths: int [b]; key slots at index >= kv_lengths[b] are never attended.
      scale: logit scale, default 1/sqrt(d).
      softcap: if set, logits = softcap * tanh(logits / softcap) (before masking).
      alibi_slopes: [h] slopes; adds -slope * |q_pos - kv_pos| to the logits.
      implementation: "xla" (reference einsums), "cudnn" (jax.nn.dot_product_attention
        on GPU) or "pallas" (tiled flash kernels, ops/pallas).
      k_scale, v_scale: [b,s,k] for an int8 cache (ops.quant.quantize_kv): k and v are
        int8 and each (token, kv head) has its scale. "xla" applies them to the logits and
        probabilities; the fused kernels take the dequantized k and v.
    Returns: [b,t,h,dv] in q's dtype.
    """
    _check_shapes(q, k, v)
    for name, sc, x in (("k_scale", k_scale, k), ("v_scale", v_scale, v)):
        if (sc is not None) != (x.dtype == jnp.int8):
            raise ValueError(f"{name}: int8 keys/values need their scale [b,s,k] and float "
                             f"ones take none; got {x.dtype} with "
                             f"{'a' if sc is not None else 'no'} scale")
        if sc is not None and sc.shape != x.shape[:3]:
            raise ValueError(f"{name} {sc.shape} must be [b,s,k] = {x.shape[:3]}")
    if (k_scale is not None or v_scale is not None) and implementation != "xla":
        from .quant import dequantize_kv
        if k_scale is not None:
            k, k_scale = dequantize_kv(k, k_scale[..., None], q.dtype), None
        if v_scale is not None:
            v, v_scale = dequantize_kv(v, v_scale[..., None], q.dtype), None
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}; choose one of {IMPLEMENTATIONS}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    b, t, _, d = q.shape
    s = k.shape[1]
    if scale is None:
        scale = d ** -0.5
    positions_given = q_positions is not None or kv_positions is not None
    dq, dk = default_positions(b, t, s)
    q_positions = dq if q_positions is None else jnp.broadcast_to(q_positions, (b, t))
    kv_positions = dk if kv_positions is None else jnp.broadcast_to(kv_positions, (b, s))

    if implementation == "cudnn":
        return _cudnn_attention(
            q, k, v, causal=causal, sliding_window=sliding_window, scale=scale,
            kv_lengths=kv_lengths, positions_given=positions_given, softcap=softcap,
            alibi_slopes=alibi_slopes,
            segments_given=q_segment_ids is not None or kv_segment_ids is not None)
    if implementation == "pallas":
        from .pallas import dispatch as _pallas  # lazy: Pallas import is heavy
        # Positions go through only when given: default (aligned) positions let the
        # kernels use static tile bounds and TPU splash attention.
        return _pallas.attention(
            q, k, v, causal=causal, sliding_window=sliding_window,
            q_positions=q_positions if positions_given else None,
            kv_positions=kv_positions if positions_given else None,
            q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
            kv_lengths=kv_lengths, scale=scale, softcap=softcap,
            alibi_slopes=alibi_slopes)

    mask = attention_mask(q_positions, kv_positions, causal=causal,
                          sliding_window=sliding_window, q_segment_ids=q_segment_ids,
                          kv_segment_ids=kv_segment_ids, kv_lengths=kv_lengths)
    bias = None
    if alibi_slopes is not None:
        if alibi_slopes.shape != (q.shape[2],):
            raise ValueError(f"alibi_slopes must have shape [h]=({q.shape[2]},), "
                             f"got {alibi_slopes.shape}")
        bias = alibi_bias(alibi_slopes, q_positions, kv_positions)
    return xla_attention(q, k, v, mask, scale=scale, softcap=softcap, bias=bias,
                         k_scale=k_scale, v_scale=v_scale)
