"""Tiles: their sizes, padding to whole tiles, and the plan of which tiles to visit.

Tile skipping. `tile_plan` classifies every (query tile, kv tile) pair from the min/max of
its positions, segment ids and the kv length into SKIP (fully masked), PARTIAL (needs the
element mask) or FULL (nothing masked: the mask is not even computed). Kernels loop only
over [first, last] visible tile (so causal and sliding-window work is really cut, and cache
slots beyond kv_lengths are never read) and branch on the kind inside that range (holes
such as other segments). The plan is O(t/bq · s/bk) integers, not O(t·s).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

SKIP, PARTIAL, FULL = 0, 1, 2
_BIG = 2 ** 30  # beyond any position; keeps differences inside int32


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes. Forward: block_q × block_k; dq kernel: block_q_dq × block_k_dq; dk/dv
    kernel: block_q_dkv × block_k_dkv. num_warps/num_stages are Triton launch parameters."""
    block_q: int = 128
    block_k: int = 64
    block_q_dq: int = 64
    block_k_dq: int = 32
    block_q_dkv: int = 32
    block_k_dkv: int = 64
    num_warps: int = 4
    num_stages: int = 2


# Defaults per head dim, chosen after the FlashAttention-2 Triton tutorial's shapes
# (fwd 128×64, dq 128×32, dkv 32×128 at d=64; smaller as d grows for shared memory).
# Not yet measured on an H100: see benchmarks/attention.py.
_DEFAULTS = {
    64: BlockSizes(128, 64, 128, 32, 32, 128, num_warps=4, num_stages=3),
    128: BlockSizes(128, 64, 64, 32, 32, 64, num_warps=8, num_stages=2),
    256: BlockSizes(64, 32, 32, 32, 32, 32, num_warps=8, num_stages=1),
}


def default_block_sizes(head_dim: int) -> BlockSizes:
    for d in sorted(_DEFAULTS):
        if head_dim <= d:
            return _DEFAULTS[d]
    return _DEFAULTS[256]


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def fit_blocks(blocks: BlockSizes, t: int, s: int) -> BlockSizes:
    """Shrink tiles for short sequences (to the next power of two, at least 16)."""
    fq = lambda bq: min(bq, max(16, next_pow2(t)))
    fk = lambda bk: min(bk, max(16, next_pow2(s)))
    return dataclasses.replace(
        blocks, block_q=fq(blocks.block_q), block_k=fk(blocks.block_k),
        block_q_dq=fq(blocks.block_q_dq), block_k_dq=fk(blocks.block_k_dq),
        block_q_dkv=fq(blocks.block_q_dkv), block_k_dkv=fk(blocks.block_k_dkv))


def pad_to(x, axis, size, mode="constant"):
    """Pad `axis` of x up to `size` at the end (None and already-long arrays pass through)."""
    if x is None or x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, mode=mode)


def tile_plan(q_pos, kv_pos, kv_len, q_seg=None, kv_seg=None, *, causal, window,
              block_q, block_k):
    """Kinds [b, t/block_q, s/block_k] in {SKIP, PARTIAL, FULL} from per-tile ranges."""
    b, t = q_pos.shape
    s = kv_pos.shape[1]
    nq, nk = t // block_q, s // block_k
    valid = (jnp.arange(s)[None] < kv_len[:, None]).reshape(b, nk, block_k)

    def q_range(x):
        x = x.reshape(b, nq, block_q)
        return x.min(-1)[:, :, None], x.max(-1)[:, :, None]

    def kv_range(x):
        x = x.reshape(b, nk, block_k)
        lo = jnp.where(valid, x, _BIG).min(-1)
        hi = jnp.where(valid, x, -_BIG).max(-1)
        return lo[:, None, :], hi[:, None, :]

    qlo, qhi = q_range(q_pos)
    klo, khi = kv_range(kv_pos)
    visible = jnp.broadcast_to(valid.any(-1)[:, None, :], (b, nq, nk))
    full = valid.all(-1)[:, None, :]
    if causal:
        visible &= klo <= qhi
        full &= khi <= qlo
    if window is not None:
        visible &= qlo - khi < window
        full &= qhi - klo < window
        if not causal:
            visible &= klo - qhi < window
            full &= khi - qlo < window
    if q_seg is not None:
        slo, shi = q_range(q_seg)
        tlo, thi = kv_range(kv_seg)
        visible &= (tlo <= shi) & (thi >= slo)
        full &= (slo == shi) & (tlo == thi) & (slo == tlo)
    return jnp.where(visible, jnp.where(full, FULL, PARTIAL), SKIP).astype(jnp.int32)


def tile_bounds(kinds):
    """[..., 2] = [first visible, last visible + 1) along the last axis (empty: 0, 0)."""
    n = kinds.shape[-1]
    idx = jnp.arange(n, dtype=jnp.int32)
    seen = kinds > SKIP
    hi = jnp.where(seen, idx + 1, 0).max(-1)
    lo = jnp.minimum(jnp.where(seen, idx, n).min(-1), hi)
    return jnp.stack([lo, hi], -1).astype(jnp.int32)
