"""Attention kernel bodies (one Pallas program each) and `run`, which launches them.

Each program owns one query tile and walks the K/V tiles with a running max / sum
(forward, dq), or owns one K/V tile and walks the query tiles of every head in its group
(dk, dv), visiting only the tiles `tiles.tile_plan` marks visible. The t×s score matrix is
never materialised.

Backends: "interpret" (CPU, any shapes) and "triton" (GPU; Pallas' Triton lowering, jax
0.10–0.11; tests/test_pallas_export.py checks on CPU that every kernel still lowers).
A Mosaic GPU (Hopper warpgroup/TMA) variant would be a separate kernel module beside this
one, reusing `tile_plan`, `BlockSizes` and flash.py's custom_vjp plumbing, selected in
dispatch.py.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .tiles import BlockSizes

BACKENDS = ("interpret", "triton")


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """The static description of one attention call: mask rule, score transform, GQA
    grouping, tiles and backend (hashable: a custom_vjp nondiff arg, a jit cache key)."""
    causal: bool
    window: int | None
    scale: float
    softcap: float | None
    groups: int            # g = h // kv_heads
    segments: bool         # MaskInputs carries qseg/kseg
    alibi: bool            # MaskInputs carries slopes
    blocks: BlockSizes
    backend: str


class MaskInputs(NamedTuple):
    """The non-differentiable arrays the mask and the ALiBi bias are computed from:
    positions qpos [b,t] / kpos [b,s], segment ids qseg [b,t] / kseg [b,s] (or None),
    filled cache length kv_len [b] and ALiBi slopes [h] (or None)."""
    qpos: jax.Array
    kpos: jax.Array
    qseg: jax.Array | None
    kseg: jax.Array | None
    kv_len: jax.Array
    slopes: jax.Array | None


# ----------------------------------------------------------------------- kernel helpers

def _dot(a, b):      # a [m,k] · b [k,n]
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_nt(a, b):   # a [m,k] · b[n,k]ᵀ
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):   # a[k,m]ᵀ · b [k,n]
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _mask(spec, qp, kp, col, kv_len, qs, ks):
    qp, kp = qp[:, None], kp[None, :]
    m = (col < kv_len)[None, :]
    if spec.causal:
        m = m & (kp <= qp)
    if spec.window is not None:
        m = m & (qp - kp < spec.window)
        if not spec.causal:
            m = m & (kp - qp < spec.window)
    if spec.segments:
        m = m & (qs[:, None] == ks[None, :])
    return m


def _logits(spec, q, k, qp, kp, slope):
    """Scaled, soft-capped, ALiBi-biased float32 logits; also d(capped)/d(raw) or None."""
    s = _dot_nt(q, k) * spec.scale
    dcap = None
    if spec.softcap is not None:
        th = jnp.tanh(s / spec.softcap)
        s, dcap = spec.softcap * th, 1.0 - th * th
    if spec.alibi:
        s = s - slope * jnp.abs(qp[:, None] - kp[None, :]).astype(jnp.float32)
    return s, dcap


def _kv_tile(refs, j, bk, kv_len, masked):
    """K/V rows [j·bk, (j+1)·bk); in partial tiles slots past kv_len are zeroed so that
    garbage (NaN/inf) in unfilled cache slots cannot leak through 0 · x."""
    start = pl.multiple_of(j * bk, bk)
    sl = pl.ds(start, bk)
    k, v, kp = refs["k"][sl, :], refs["v"][sl, :], refs["kpos"][sl]
    ks = refs["kseg"][sl] if "kseg" in refs else None
    col = start + jnp.arange(bk, dtype=jnp.int32)
    if masked:
        ok = (col < kv_len)[:, None]
        k, v = jnp.where(ok, k, 0), jnp.where(ok, v, 0)
    return k, v, kp, ks, col


def _visit(kinds_ref, step):
    """Loop body: skip, masked step or unmasked step according to the tile's kind."""
    def body(j, carry):
        return lax.switch(kinds_ref[j], (lambda c: c,
                                         functools.partial(step, j, masked=True),
                                         functools.partial(step, j, masked=False)), carry)
    return body


def _slope(refs):  # [rows, 1] or [1, 1]; a vector in decode (heads vary along rows)
    return refs["slope"][...][:, None] if "slope" in refs else None


# ------------------------------------------------------------------------------ kernels

def fwd_kernel(spec: AttentionSpec, refs, *, block_k, tiles_per_split=None, empty_lse=0.0):
    """One query tile against its visible K/V tiles. Writes o and lse (natural log)."""
    q, qp = refs["q"][...], refs["qpos"][...]
    qs = refs["qseg"][...] if spec.segments else None
    slope = _slope(refs)
    kv_len = refs["len"][0]
    lo, hi = refs["bounds"][0], refs["bounds"][1]
    if tiles_per_split is not None:  # flash-decoding: this program's share of the cache
        split = pl.program_id(0)
        lo = jnp.maximum(lo, split * tiles_per_split)
        hi = jnp.minimum(hi, (split + 1) * tiles_per_split)

    def step(j, carry, masked):
        acc, m, l = carry
        k, v, kp, ks, col = _kv_tile(refs, j, block_k, kv_len, masked)
        s, _ = _logits(spec, q, k, qp, kp, slope)
        if masked:
            s = jnp.where(_mask(spec, qp, kp, col, kv_len, qs, ks), s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(-1))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with nothing seen yet
        p = jnp.exp(s - m_use[:, None])
        alpha = jnp.exp(m - m_use)
        acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v)
        return acc, m_new, alpha * l + p.sum(-1)

    rows, dv = q.shape[0], refs["v"].shape[-1]
    init = (jnp.zeros((rows, dv), jnp.float32), jnp.full((rows,), -jnp.inf, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    acc, m, l = lax.fori_loop(lo, hi, _visit(refs["kinds"], step), init)
    seen = l > 0.0  # fully masked rows: output 0
    l_safe = jnp.where(seen, l, 1.0)
    refs["o"][...] = (acc / l_safe[:, None]).astype(refs["o"].dtype)
    refs["lse"][...] = jnp.where(seen, m + jnp.log(l_safe), empty_lse)


def dq_kernel(spec: AttentionSpec, refs):
    """One query tile's dq, walking its visible K/V tiles (as the forward does)."""
    q, qp, do = refs["q"][...], refs["qpos"][...], refs["do"][...]
    qs = refs["qseg"][...] if spec.segments else None
    lse, delta = refs["lse"][...], refs["delta"][...]
    slope, kv_len = _slope(refs), refs["len"][0]

    def step(j, dq, masked):
        k, v, kp, ks, col = _kv_tile(refs, j, spec.blocks.block_k_dq, kv_len, masked)
        s, dcap = _logits(spec, q, k, qp, kp, slope)
        if masked:
            s = jnp.where(_mask(spec, qp, kp, col, kv_len, qs, ks), s, -jnp.inf)
        p = jnp.exp(s - lse[:, None])
        ds = p * (_dot_nt(do, v) - delta[:, None])
        if dcap is not None:
            ds = ds * dcap
        return dq + _dot(ds.astype(k.dtype), k)

    dq = lax.fori_loop(refs["bounds"][0], refs["bounds"][1], _visit(refs["kinds"], step),
                       jnp.zeros(q.shape, jnp.float32))
    refs["dq"][...] = (dq * spec.scale).astype(refs["dq"].dtype)


def dkv_kernel(spec: AttentionSpec, refs):
    """One K/V tile of one kv head against the query tiles of all g heads in its group."""
    bq, bk = spec.blocks.block_q_dkv, spec.blocks.block_k_dkv
    kv_len = refs["len"][0]
    col = pl.program_id(0) * bk + jnp.arange(bk, dtype=jnp.int32)
    ok = (col < kv_len)[:, None]
    k, v = jnp.where(ok, refs["k"][...], 0), jnp.where(ok, refs["v"][...], 0)
    kp = refs["kpos"][...]
    ks = refs["kseg"][...] if spec.segments else None

    def head(hg, carry):
        slope = refs["slope"][hg] if spec.alibi else None

        def step(i, c, masked):
            dk, dv = c
            sl = pl.ds(pl.multiple_of(i * bq, bq), bq)
            q, do = refs["q"][sl, hg, :], refs["do"][sl, hg, :]
            lse, delta = refs["lse"][hg, sl], refs["delta"][hg, sl]
            qp = refs["qpos"][sl]
            qs = refs["qseg"][sl] if spec.segments else None
            s, dcap = _logits(spec, q, k, qp, kp, slope)
            if masked:
                s = jnp.where(_mask(spec, qp, kp, col, kv_len, qs, ks), s, -jnp.inf)
            p = jnp.exp(s - lse[:, None])
            dv = dv + _dot_tn(p.astype(do.dtype), do)
            ds = p * (_dot_nt(do, v) - delta[:, None])
            if dcap is not None:
                ds = ds * dcap
            return dk + _dot_tn(ds.astype(q.dtype), q), dv

        return lax.fori_loop(refs["bounds"][0], refs["bounds"][1],
                             _visit(refs["kinds"], step), carry)

    init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = lax.fori_loop(0, spec.groups, head, init)
    refs["dk"][...] = (dk * spec.scale).astype(refs["dk"].dtype)
    refs["dv"][...] = dv.astype(refs["dv"].dtype)


# ------------------------------------------------------------------------ pallas calls

def run(kernel, spec: AttentionSpec, *, grid, inputs, outputs, name):
    """pallas_call over named (array, BlockSpec) inputs; the kernel gets a dict of refs.

    The backend choice lives here: interpret on CPU, Triton compiler params on GPU.
    """
    names = [n for n, _, _ in inputs] + [n for n, _, _ in outputs]

    def body(*refs):
        kernel(dict(zip(names, refs)))

    extra = {}
    if spec.backend == "interpret":
        extra["interpret"] = True
    elif spec.backend == "triton":
        from jax.experimental.pallas import triton as plgpu
        extra["compiler_params"] = plgpu.CompilerParams(
            num_warps=spec.blocks.num_warps, num_stages=spec.blocks.num_stages)
    else:
        raise ValueError(f"backend={spec.backend!r}; choose one of {BACKENDS}")
    return pl.pallas_call(
        body, grid=grid, name=name, in_specs=[sp for _, _, sp in inputs],
        out_specs=[sp for _, _, sp in outputs], out_shape=[o for _, o, _ in outputs],
        **extra)(*[x for _, x, _ in inputs])
