"""Flash attention in Pallas: online softmax over K/V tiles, forward and backward.

The t×s score matrix is never materialised: each program owns one query tile and walks
the K/V tiles with a running max / sum (forward, dq), or owns one K/V tile and walks the
query tiles of every head in its group (dk, dv). GQA/MQA map query head h onto kv head
h // g in the BlockSpec index maps, so K/V are never repeated in memory, and dk/dv are
accumulated per kv head inside the kernel (no [b,s,h,d] gradient buffer).

Tile skipping. `tile_plan` classifies every (query tile, kv tile) pair from the min/max of
its positions, segment ids and the kv length into SKIP (fully masked), PARTIAL (needs the
element mask) or FULL (nothing masked: the mask is not even computed). Kernels loop only
over [first, last] visible tile (so causal and sliding-window work is really cut, and cache
slots beyond kv_lengths are never read) and branch on the kind inside that range (holes
such as other segments). The plan is O(t/bq · s/bk) integers, not O(t·s).

Backends: "interpret" (CPU, any shapes) and "triton" (GPU; Pallas' Triton lowering, jax
0.10–0.11). A Mosaic GPU (Hopper warpgroup/TMA) variant would be a separate kernel module
beside this one, reusing `tile_plan`, `BlockSizes` and the custom_vjp plumbing, selected
in dispatch.py.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

BACKENDS = ("interpret", "triton")
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


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _fit_blocks(blocks: BlockSizes, t: int, s: int) -> BlockSizes:
    """Shrink tiles for short sequences (to the next power of two, at least 16)."""
    fq = lambda bq: min(bq, max(16, _next_pow2(t)))
    fk = lambda bk: min(bk, max(16, _next_pow2(s)))
    return dataclasses.replace(
        blocks, block_q=fq(blocks.block_q), block_k=fk(blocks.block_k),
        block_q_dq=fq(blocks.block_q_dq), block_k_dq=fk(blocks.block_k_dq),
        block_q_dkv=fq(blocks.block_q_dkv), block_k_dkv=fk(blocks.block_k_dkv))


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything static about one attention call (hashable: a custom_vjp nondiff arg)."""
    causal: bool
    window: int | None
    scale: float
    softcap: float | None
    groups: int            # g = h // kv_heads
    segments: bool
    alibi: bool
    blocks: BlockSizes
    backend: str


class Aux(NamedTuple):
    """Non-differentiable inputs: int positions/segments [b,t]/[b,s], kv_len [b], slopes [h]."""
    qpos: jax.Array
    kpos: jax.Array
    qseg: jax.Array | None
    kseg: jax.Array | None
    kv_len: jax.Array
    slopes: jax.Array | None


# ----------------------------------------------------------------------------- tile plan

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


# ----------------------------------------------------------------------- kernel helpers

def _dot(a, b):      # a [m,k] · b [k,n]
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_nt(a, b):   # a [m,k] · b[n,k]ᵀ
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):   # a[k,m]ᵀ · b [k,n]
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _mask(cfg, qp, kp, col, kv_len, qs, ks):
    qp, kp = qp[:, None], kp[None, :]
    m = (col < kv_len)[None, :]
    if cfg.causal:
        m = m & (kp <= qp)
    if cfg.window is not None:
        m = m & (qp - kp < cfg.window)
        if not cfg.causal:
            m = m & (kp - qp < cfg.window)
    if cfg.segments:
        m = m & (qs[:, None] == ks[None, :])
    return m


def _logits(cfg, q, k, qp, kp, slope):
    """Scaled, soft-capped, ALiBi-biased float32 logits; also d(capped)/d(raw) or None."""
    s = _dot_nt(q, k) * cfg.scale
    dcap = None
    if cfg.softcap is not None:
        th = jnp.tanh(s / cfg.softcap)
        s, dcap = cfg.softcap * th, 1.0 - th * th
    if cfg.alibi:
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

def fwd_kernel(cfg: Config, refs, *, block_k, tiles_per_split=None, empty_lse=0.0):
    """One query tile against its visible K/V tiles. Writes o and lse (natural log)."""
    q, qp = refs["q"][...], refs["qpos"][...]
    qs = refs["qseg"][...] if cfg.segments else None
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
        s, _ = _logits(cfg, q, k, qp, kp, slope)
        if masked:
            s = jnp.where(_mask(cfg, qp, kp, col, kv_len, qs, ks), s, -jnp.inf)
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


def _dq_kernel(cfg: Config, refs):
    q, qp, do = refs["q"][...], refs["qpos"][...], refs["do"][...]
    qs = refs["qseg"][...] if cfg.segments else None
    lse, delta = refs["lse"][...], refs["delta"][...]
    slope, kv_len = _slope(refs), refs["len"][0]

    def step(j, dq, masked):
        k, v, kp, ks, col = _kv_tile(refs, j, cfg.blocks.block_k_dq, kv_len, masked)
        s, dcap = _logits(cfg, q, k, qp, kp, slope)
        if masked:
            s = jnp.where(_mask(cfg, qp, kp, col, kv_len, qs, ks), s, -jnp.inf)
        p = jnp.exp(s - lse[:, None])
        ds = p * (_dot_nt(do, v) - delta[:, None])
        if dcap is not None:
            ds = ds * dcap
        return dq + _dot(ds.astype(k.dtype), k)

    dq = lax.fori_loop(refs["bounds"][0], refs["bounds"][1], _visit(refs["kinds"], step),
                       jnp.zeros(q.shape, jnp.float32))
    refs["dq"][...] = (dq * cfg.scale).astype(refs["dq"].dtype)


def _dkv_kernel(cfg: Config, refs):
    """One K/V tile of one kv head against the query tiles of all g heads in its group."""
    bq, bk = cfg.blocks.block_q_dkv, cfg.blocks.block_k_dkv
    kv_len = refs["len"][0]
    col = pl.program_id(0) * bk + jnp.arange(bk, dtype=jnp.int32)
    ok = (col < kv_len)[:, None]
    k, v = jnp.where(ok, refs["k"][...], 0), jnp.where(ok, refs["v"][...], 0)
    kp = refs["kpos"][...]
    ks = refs["kseg"][...] if cfg.segments else None

    def head(hg, carry):
        slope = refs["slope"][hg] if cfg.alibi else None

        def step(i, c, masked):
            dk, dv = c
            sl = pl.ds(pl.multiple_of(i * bq, bq), bq)
            q, do = refs["q"][sl, hg, :], refs["do"][sl, hg, :]
            lse, delta = refs["lse"][hg, sl], refs["delta"][hg, sl]
            qp = refs["qpos"][sl]
            qs = refs["qseg"][sl] if cfg.segments else None
            s, dcap = _logits(cfg, q, k, qp, kp, slope)
            if masked:
                s = jnp.where(_mask(cfg, qp, kp, col, kv_len, qs, ks), s, -jnp.inf)
            p = jnp.exp(s - lse[:, None])
            dv = dv + _dot_tn(p.astype(do.dtype), do)
            ds = p * (_dot_nt(do, v) - delta[:, None])
            if dcap is not None:
                ds = ds * dcap
            return dk + _dot_tn(ds.astype(q.dtype), q), dv

        return lax.fori_loop(refs["bounds"][0], refs["bounds"][1],
                             _visit(refs["kinds"], step), carry)

    init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = lax.fori_loop(0, cfg.groups, head, init)
    refs["dk"][...] = (dk * cfg.scale).astype(refs["dk"].dtype)
    refs["dv"][...] = dv.astype(refs["dv"].dtype)


# ------------------------------------------------------------------------ pallas calls

def run(kernel, cfg: Config, *, grid, inputs, outputs, name):
    """pallas_call over named (array, BlockSpec) inputs; the kernel gets a dict of refs.

    The backend choice lives here: interpret on CPU, Triton compiler params on GPU.
    """
    names = [n for n, _, _ in inputs] + [n for n, _, _ in outputs]

    def body(*refs):
        kernel(dict(zip(names, refs)))

    extra = {}
    if cfg.backend == "interpret":
        extra["interpret"] = True
    elif cfg.backend == "triton":
        from jax.experimental.pallas import triton as plgpu
        extra["compiler_params"] = plgpu.CompilerParams(
            num_warps=cfg.blocks.num_warps, num_stages=cfg.blocks.num_stages)
    else:
        raise ValueError(f"backend={cfg.backend!r}; choose one of {BACKENDS}")
    return pl.pallas_call(
        body, grid=grid, name=name, in_specs=[sp for _, _, sp in inputs],
        out_specs=[sp for _, _, sp in outputs], out_shape=[o for _, o, _ in outputs],
        **extra)(*[x for _, x, _ in inputs])


def _plan_inputs(cfg, aux, bq, bk, *, transpose, index):
    """kinds/bounds inputs for a grid whose tile index is `index(grid ids) -> (b, tile)`."""
    kinds = tile_plan(aux.qpos, aux.kpos, aux.kv_len, aux.qseg, aux.kseg, causal=cfg.causal,
                      window=cfg.window, block_q=bq, block_k=bk)
    if transpose:
        kinds = kinds.transpose(0, 2, 1)
    n = kinds.shape[-1]
    return [("kinds", kinds, pl.BlockSpec((None, None, n), lambda *i: (*index(*i), 0))),
            ("bounds", tile_bounds(kinds), pl.BlockSpec((None, None, 2),
                                                        lambda *i: (*index(*i), 0))),
            ("len", aux.kv_len, pl.BlockSpec((1,), lambda *i: (index(*i)[0],)))]


def _query_tile_inputs(cfg, q, k, v, aux, bq, bk):
    """Grid (query tile i, batch b, head h): the q tile, its kv head's whole K/V rows (head
    h reads kv head h // g: GQA without repeating K/V), positions, segments, slope, plan."""
    d, s, dv, g = q.shape[-1], k.shape[1], v.shape[-1], cfg.groups
    out = [
        ("q", q, pl.BlockSpec((None, bq, None, d), lambda i, b, h: (b, i, h, 0))),
        ("k", k, pl.BlockSpec((None, s, None, d), lambda i, b, h: (b, 0, h // g, 0))),
        ("v", v, pl.BlockSpec((None, s, None, dv), lambda i, b, h: (b, 0, h // g, 0))),
        ("qpos", aux.qpos, pl.BlockSpec((None, bq), lambda i, b, h: (b, i))),
        ("kpos", aux.kpos, pl.BlockSpec((None, s), lambda i, b, h: (b, 0)))]
    if cfg.segments:
        out += [("qseg", aux.qseg, pl.BlockSpec((None, bq), lambda i, b, h: (b, i))),
                ("kseg", aux.kseg, pl.BlockSpec((None, s), lambda i, b, h: (b, 0)))]
    if cfg.alibi:
        out += [("slope", aux.slopes, pl.BlockSpec((1,), lambda i, b, h: (h,)))]
    return out + _plan_inputs(cfg, aux, bq, bk, transpose=False, index=lambda i, b, h: (b, i))


def _forward(cfg: Config, q, k, v, aux: Aux):
    """Padded inputs → (o [b,t,h,dv], lse [b,h,t] float32)."""
    b, t, h, d = q.shape
    s, dv, g = k.shape[1], v.shape[-1], cfg.groups
    bq, bk = cfg.blocks.block_q, cfg.blocks.block_k
    inputs = _query_tile_inputs(cfg, q, k, v, aux, bq, bk)
    outputs = [
        ("o", jax.ShapeDtypeStruct((b, t, h, dv), q.dtype),
         pl.BlockSpec((None, bq, None, dv), lambda i, b_, h_: (b_, i, h_, 0))),
        ("lse", jax.ShapeDtypeStruct((b, h, t), jnp.float32),
         pl.BlockSpec((None, None, bq), lambda i, b_, h_: (b_, h_, i)))]
    kernel = functools.partial(fwd_kernel, cfg, block_k=bk)
    o, lse = run(kernel, cfg, grid=(t // bq, b, h), inputs=inputs, outputs=outputs,
                 name="flash_fwd")
    return o, lse


def _backward_padded(cfg: Config, q, k, v, aux: Aux, out, lse, do):
    b, t, h, d = q.shape
    s, kh, dv, g = k.shape[1], k.shape[2], v.shape[-1], cfg.groups
    bl = cfg.blocks
    # delta = rowsum(dO ∘ O): elementwise, left to XLA to fuse.
    delta = jnp.einsum("bthd,bthd->bht", do.astype(jnp.float32), out.astype(jnp.float32))
    bq, bk = bl.block_q_dq, bl.block_k_dq
    row = lambda i, b_, h_: (b_, h_, i)
    inputs = _query_tile_inputs(cfg, q, k, v, aux, bq, bk) + [
        ("do", do, pl.BlockSpec((None, bq, None, dv), lambda i, b_, h_: (b_, i, h_, 0))),
        ("lse", lse, pl.BlockSpec((None, None, bq), row)),
        ("delta", delta, pl.BlockSpec((None, None, bq), row))]
    outputs = [("dq", jax.ShapeDtypeStruct(q.shape, q.dtype),
                pl.BlockSpec((None, bq, None, d), lambda i, b_, h_: (b_, i, h_, 0)))]
    (dq,) = run(functools.partial(_dq_kernel, cfg), cfg, grid=(t // bq, b, h),
                inputs=inputs, outputs=outputs, name="flash_bwd_dq")

    bq, bk = bl.block_q_dkv, bl.block_k_dkv
    tile = lambda j, b_, k_: (b_, j, k_, 0)
    inputs = [
        ("q", q, pl.BlockSpec((None, t, g, d), lambda j, b_, k_: (b_, 0, k_, 0))),
        ("do", do, pl.BlockSpec((None, t, g, dv), lambda j, b_, k_: (b_, 0, k_, 0))),
        ("lse", lse, pl.BlockSpec((None, g, t), lambda j, b_, k_: (b_, k_, 0))),
        ("delta", delta, pl.BlockSpec((None, g, t), lambda j, b_, k_: (b_, k_, 0))),
        ("k", k, pl.BlockSpec((None, bk, None, d), tile)),
        ("v", v, pl.BlockSpec((None, bk, None, dv), tile)),
        ("qpos", aux.qpos, pl.BlockSpec((None, t), lambda j, b_, k_: (b_, 0))),
        ("kpos", aux.kpos, pl.BlockSpec((None, bk), lambda j, b_, k_: (b_, j)))]
    if cfg.segments:
        inputs += [("qseg", aux.qseg, pl.BlockSpec((None, t), lambda j, b_, k_: (b_, 0))),
                   ("kseg", aux.kseg, pl.BlockSpec((None, bk), lambda j, b_, k_: (b_, j)))]
    if cfg.alibi:
        inputs += [("slope", aux.slopes, pl.BlockSpec((g,), lambda j, b_, k_: (k_,)))]
    inputs += _plan_inputs(cfg, aux, bq, bk, transpose=True, index=lambda j, b_, k_: (b_, j))
    outputs = [("dk", jax.ShapeDtypeStruct(k.shape, k.dtype), pl.BlockSpec((None, bk, None, d), tile)),
               ("dv", jax.ShapeDtypeStruct(v.shape, v.dtype), pl.BlockSpec((None, bk, None, dv), tile))]
    dk, dv_ = run(functools.partial(_dkv_kernel, cfg), cfg, grid=(s // bk, b, kh),
                  inputs=inputs, outputs=outputs, name="flash_bwd_dkv")
    return dq, dk, dv_


# ------------------------------------------------------------- padding and custom_vjp

def _pad(x, axis, size, mode="constant"):
    if x is None or x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, mode=mode)


def _padded_lengths(cfg: Config, t: int, s: int):
    bl = cfg.blocks
    tq = max(bl.block_q, bl.block_q_dq, bl.block_q_dkv)  # powers of two: max is a multiple
    tk = max(bl.block_k, bl.block_k_dq, bl.block_k_dkv)
    return -(-t // tq) * tq, -(-s // tk) * tk


def _pad_inputs(cfg, q, k, v, aux):
    """Pad t and s up to whole tiles. Padded keys sit past kv_len (never seen); padded
    queries repeat the last query's position/segment, so tile ranges do not widen."""
    tp, sp = _padded_lengths(cfg, q.shape[1], k.shape[1])
    aux = aux._replace(qpos=_pad(aux.qpos, 1, tp, "edge"), kpos=_pad(aux.kpos, 1, sp, "edge"),
                       qseg=_pad(aux.qseg, 1, tp, "edge"), kseg=_pad(aux.kseg, 1, sp, "edge"))
    return _pad(q, 1, tp), _pad(k, 1, sp), _pad(v, 1, sp), aux


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: Config, q, k, v, aux: Aux):
    return _flash_fwd(cfg, q, k, v, aux)[0]


def _flash_fwd(cfg, q, k, v, aux):
    t = q.shape[1]
    o, lse = _forward(cfg, *_pad_inputs(cfg, q, k, v, aux))
    o, lse = o[:, :t], lse[:, :, :t]
    return o, (q, k, v, aux, o, lse)


def backward(cfg: Config, res, do):
    """Gradients (dq, dk, dv, None) from residuals (q, k, v, aux, out, lse [b,h,t]).

    Shared by the decode kernel, whose forward produces the same residuals."""
    q, k, v, aux, out, lse = res
    t, s = q.shape[1], k.shape[1]
    qp, kp, vp, auxp = _pad_inputs(cfg, q, k, v, aux)
    tp = qp.shape[1]
    dq, dk, dv = _backward_padded(cfg, qp, kp, vp, auxp, _pad(out, 1, tp), _pad(lse, 2, tp),
                                  _pad(do.astype(out.dtype), 1, tp))
    return dq[:, :t], dk[:, :s], dv[:, :s], None


_flash.defvjp(_flash_fwd, backward)


def make_config(q, k, v, *, causal, sliding_window, scale, softcap, alibi_slopes, segments,
                block_sizes, backend) -> Config:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; choose one of {BACKENDS}")
    d, t, s = q.shape[-1], q.shape[1], k.shape[1]
    blocks = _fit_blocks(block_sizes or default_block_sizes(d), t, s)
    return Config(causal=bool(causal), window=sliding_window,
                  scale=float(d ** -0.5 if scale is None else scale),
                  softcap=None if softcap is None else float(softcap),
                  groups=q.shape[2] // k.shape[2], segments=segments,
                  alibi=alibi_slopes is not None, blocks=blocks, backend=backend)


def make_aux(q, k, *, q_positions, kv_positions, q_segment_ids, kv_segment_ids, kv_lengths,
             alibi_slopes) -> Aux:
    b, t, s = q.shape[0], q.shape[1], k.shape[1]
    i32 = lambda x: None if x is None else jnp.asarray(x, jnp.int32)
    if q_positions is None:
        q_positions = jnp.arange(s - t, s, dtype=jnp.int32)
    if kv_positions is None:
        kv_positions = jnp.arange(s, dtype=jnp.int32)
    kv_len = jnp.full((b,), s, jnp.int32) if kv_lengths is None else jnp.minimum(
        jnp.broadcast_to(i32(kv_lengths), (b,)), s)
    seg = lambda x, n: None if x is None else jnp.broadcast_to(i32(x), (b, n))
    return Aux(qpos=jnp.broadcast_to(i32(q_positions), (b, t)),
               kpos=jnp.broadcast_to(i32(kv_positions), (b, s)),
               qseg=seg(q_segment_ids, t), kseg=seg(kv_segment_ids, s), kv_len=kv_len,
               slopes=None if alibi_slopes is None else jnp.asarray(alibi_slopes, jnp.float32))


def pad_head_dims(backend, q, k, v):
    """Triton tiles must be powers of two ≥ 16 (dot minimum): zero-pad d (logits are
    unchanged) and dv (the extra output columns are sliced off)."""
    if backend != "triton":
        return q, k, v
    d, dv = max(16, _next_pow2(q.shape[-1])), max(16, _next_pow2(v.shape[-1]))
    return _pad(q, 3, d), _pad(k, 3, d), _pad(v, 3, dv)


def flash_attention(q, k, v, *, causal=False, sliding_window=None, q_positions=None,
                    kv_positions=None, q_segment_ids=None, kv_segment_ids=None,
                    kv_lengths=None, scale=None, softcap=None, alibi_slopes=None,
                    block_sizes: BlockSizes | None = None, backend: str = "interpret"):
    """Tiled attention with ops.attention's semantics; q [b,t,h,d], k [b,s,k,d],
    v [b,s,k,dv] → [b,t,h,dv]. Differentiable in q, k, v (ALiBi slopes, positions and
    segment ids are constants)."""
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    cfg = make_config(q, k, v, causal=causal, sliding_window=sliding_window, scale=scale,
                      softcap=softcap, alibi_slopes=alibi_slopes,
                      segments=q_segment_ids is not None, block_sizes=block_sizes,
                      backend=backend)
    aux = make_aux(q, k, q_positions=q_positions, kv_positions=kv_positions,
                   q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                   kv_lengths=kv_lengths, alibi_slopes=alibi_slopes)
    dv = v.shape[-1]
    q, k, v = pad_head_dims(backend, q, k, v)
    return _flash(cfg, q, k, v, aux)[..., :dv]
