"""Absolute and relative position signals that are not RoPE."""
from __future__ import annotations

import math

import jax.numpy as jnp

# Where a model's position signal comes from: rotary (ops.rope), a learned table, the
# sinusoidal table below, ALiBi biases (below), or none.
POSITIONS = ("rope", "learned", "sinusoidal", "alibi", "none")


def sinusoidal_positions(positions, dim: int, max_timescale: float = 10000.0):
    """The Transformer's fixed embedding [.., dim]: sin on the first half, cos on the second.

    Frequencies are max_timescale^(-i/(dim/2)) for i < dim/2 ("Attention is all you need",
    laid out as concatenated halves rather than interleaved).
    """
    if dim % 2:
        raise ValueError(f"sinusoidal position dim must be even, got {dim}")
    half = dim // 2
    inv_freq = max_timescale ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def alibi_slopes(num_heads: int):
    """ALiBi head slopes (Press et al. 2022), float32 [num_heads].

    For n a power of two the slopes are the geometric sequence 2^(-8/n·i), i = 1..n.
    Otherwise, as in the paper's reference code, take the slopes of the closest
    smaller power of two c, then every other slope of the 2c sequence for the rest.
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")

    def power_of_two(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two(closest)
    if closest != num_heads:
        slopes += power_of_two(2 * closest)[0::2][: num_heads - closest]
    return jnp.asarray(slopes, dtype=jnp.float32)
