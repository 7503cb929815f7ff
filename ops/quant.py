"""Weight-only and KV-cache quantization: quantize, dequantize, int4 packing and the
quantized matmuls, as pure functions.

Conventions (kept everywhere in jaxlm):
  * symmetric, no zero point: x ≈ q · scale, with scale = absmax / Q over the values that
    share a scale and q = round-half-to-even(x / scale) clipped to [-Q, Q];
    Q = 127 for int8 (absmax/127, not /127.5: -128 is never used, so q and -q are both
    representable) and Q = 7 for int4 (-8 unused, for the same reason).
  * an all-zero slice gets scale 1 (so dequantizing gives exact zeros, never NaN).
  * |x − q·scale| ≤ scale/2 elementwise (rounding error at most half a step; clipping never
    bites because |x| ≤ absmax = Q·scale).

Layouts, with weights as the model stores them (contraction axes first, W [K..., N...]):
  * int8 per output channel: q int8 of W's shape, scale [N...] (one per output column,
    the absmax taken over all contraction axes).
  * int4 grouped: W flattened to [K, N...], groups of `group` consecutive rows of K share a
    scale [K/group, N...]; two int4 values per byte along K: packed uint8 [K/2, N...], row
    2i in the low nibble and row 2i+1 in the high nibble.
  * KV cache int8: one scale per (token, kv head): q int8 [..., d], scale [..., 1] (the
    trailing 1 keeps the scale buffer's axes aligned with the values', so code that slices a
    cache buffer along its slot axis treats both the same).

Why written here rather than taken from qwix: jaxlm's engine runs each layer over its own
weight arrays and MoE/MLA use weights directly (ragged dots, absorbed up-projections), not
only through intercepted dot_generals; and a quantized model must save and load as plain
arrays (orbax / safetensors) with the config saying how. These few functions are all it
takes; the modules that hold quantized weights call them (jaxlm.model.quant).
"""
from __future__ import annotations

import math

import jax.numpy as jnp

INT8_MAX = 127
INT4_MAX = 7
MODES = ("int8", "int4")


def _scale_of(absmax, qmax: int, dtype):
    scale = absmax.astype(jnp.float32) / qmax
    return jnp.where(scale == 0, 1.0, scale).astype(dtype)


def _round_clip(x, scale, qmax: int):
    return jnp.clip(jnp.round(x.astype(jnp.float32) / scale.astype(jnp.float32)), -qmax, qmax)


# Weights: int8 per output channel -------------------------------------------------------
def quantize_int8(w, n_contract: int, scale_dtype=jnp.float32):
    """W [K..., N...] (the first n_contract axes are contracted) → (q int8 [K..., N...],
    scale [N...]): one scale per output column."""
    axes = tuple(range(n_contract))
    scale = _scale_of(jnp.max(jnp.abs(w), axis=axes), INT8_MAX, scale_dtype)
    return _round_clip(w, scale, INT8_MAX).astype(jnp.int8), scale


def dequantize_int8(q, scale, dtype=jnp.float32):
    """q [K..., N...], scale [N...] → W ≈ q·scale in dtype."""
    return (q.astype(jnp.float32) * scale.astype(jnp.float32)).astype(dtype)


def int8_matmul(x, q, scale, n_contract: int):
    """x [..., K...] · W where W = q·scale: the scale is per output column, so it is
    applied to the product (x·q)·scale, exact, and q is only converted, never scaled."""
    n = n_contract
    y = jnp.tensordot(x, q.astype(x.dtype), axes=(tuple(range(x.ndim - n, x.ndim)),
                                                  tuple(range(n))))
    return y * scale.astype(x.dtype)


# Weights: int4 grouped ------------------------------------------------------------------
def check_int4(k: int, group: int, what: str = "weight") -> None:
    """int4 needs an even group dividing the contraction size K."""
    if group < 2 or group % 2:
        raise ValueError(f"int4 group size must be an even number >= 2, got {group}")
    if k % group:
        raise ValueError(f"int4 group size {group} does not divide {what}'s contraction "
                         f"size {k}; pick a group size that divides it (e.g. 32, 64, 128) "
                         f"or quantize to int8")


def pack_int4(q):
    """q integer [K, ...] with values in [-8, 7], K even → uint8 [K/2, ...]: row 2i in the
    low nibble, row 2i+1 in the high nibble (two's complement nibbles)."""
    if q.shape[0] % 2:
        raise ValueError(f"pack_int4 needs an even leading size, got {q.shape[0]}")
    u = q.astype(jnp.int32) & 0xF
    return (u[0::2] | (u[1::2] << 4)).astype(jnp.uint8)


def unpack_int4(packed):
    """The inverse of pack_int4: uint8 [K/2, ...] → int8 [K, ...] in [-8, 7]."""
    p = packed.astype(jnp.int32)
    lo = ((p & 0xF) ^ 8) - 8           # sign-extend the nibble
    hi = (((p >> 4) & 0xF) ^ 8) - 8
    out = jnp.stack([lo, hi], axis=1)  # [K/2, 2, ...]
    return out.reshape(packed.shape[0] * 2, *packed.shape[1:]).astype(jnp.int8)


def quantize_int4(w, n_contract: int, group: int, scale_dtype=jnp.float32):
    """W [K..., N...] → (packed uint8 [K/2, N...], scale [K/group, N...]), the contraction
    axes flattened to K (row-major) and each run of `group` rows sharing a scale."""
    k = math.prod(w.shape[:n_contract])
    check_int4(k, group)
    out = w.shape[n_contract:]
    groups = w.reshape(k // group, group, *out)
    scale = _scale_of(jnp.max(jnp.abs(groups), axis=1), INT4_MAX, scale_dtype)
    q = _round_clip(groups, scale[:, None], INT4_MAX).reshape(k, *out)
    return pack_int4(q), scale


def dequantize_int4(packed, scale, group: int, dtype=jnp.float32):
    """(packed [K/2, N...], scale [K/group, N...]) → W [K, N...] (contraction flattened)."""
    q = unpack_int4(packed).astype(jnp.float32)
    k = q.shape[0]
    w = q.reshape(k // group, group, *q.shape[1:]) * scale.astype(jnp.float32)[:, None]
    return w.reshape(q.shape).astype(dtype)


def int4_matmul(x, packed, scale, group: int, n_contract: int):
    """x [..., K...] · W with W stored as int4 groups: x's n_contract trailing axes are
    flattened to K and W is dequantized to x's dtype, then one dot. (XLA's CPU backend does
    not fuse this unpacking into the dot, so the dequantized W is materialised per call on
    CPU; benchmarks/quantize.py measures what that costs.)"""
    lead = x.shape[:x.ndim - n_contract]
    xf = x.reshape(*lead, -1)
    w = dequantize_int4(packed, scale, group, x.dtype)
    return jnp.tensordot(xf, w, axes=((xf.ndim - 1,), (0,)))


# KV cache: int8 per (token, kv head) --------------------------------------------------
def quantize_kv(x, scale_dtype=None):
    """x [..., d] → (q int8 [..., d], scale [..., 1]): one scale per vector (a token's key
    or value in one kv head), in x's dtype unless scale_dtype says otherwise."""
    scale = _scale_of(jnp.max(jnp.abs(x), axis=-1, keepdims=True), INT8_MAX,
                      scale_dtype or x.dtype)
    return _round_clip(x, scale, INT8_MAX).astype(jnp.int8), scale


def dequantize_kv(q, scale, dtype=jnp.float32):
    return (q.astype(jnp.float32) * scale.astype(jnp.float32)).astype(dtype)
