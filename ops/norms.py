"""Normalisations, computed in float32 and cast back to the input dtype."""
from __future__ import annotations

import jax
import jax.numpy as jnp

NORMS = ("rms", "layer")  # rms_norm, layer_norm


def rms_norm(x, weight=None, *, eps: float = 1e-6, weight_offset: float = 0.0):
    """x / sqrt(mean(x²) + eps) · (weight + weight_offset) over the last axis.

    weight_offset=1 gives Gemma's (1 + w) parameterisation.
    """
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if weight is not None:
        y = y * (weight.astype(jnp.float32) + weight_offset)
    return y.astype(x.dtype)


def layer_norm(x, weight=None, bias=None, *, eps: float = 1e-5):
    """(x − mean) / sqrt(var + eps) · weight + bias over the last axis."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)
