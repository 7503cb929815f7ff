"""Pallas attention kernels vs the reference attention (ops.attention, implementation="xla").

Everything runs on CPU in Pallas interpret mode, which is slow (~2 s of XLA compile per
forward+backward configuration), so shapes are small, blocks are 16, and the grid is a
covering design (every value of every axis appears) rather than a full product.

Tolerances (atol = rtol), always against the float32 reference evaluated on the very same
(rounded) inputs: float32 5e-5; bfloat16 3e-2 and float16 5e-3, about twice the reference's
own error when it runs in that dtype (measured: bf16 ≤ 0.02, fp16 ≤ 0.003 at |x| ≲ 10).

Unwritten tiles: interpret mode fills every pallas_call output with NaN before the kernel
runs (test_interpret_mode_poisons_outputs proves it), so a tile the kernel forgets to write
fails the comparison. Skipped tiles: K/V inside tiles the mask hides entirely are set to
NaN, which would poison the output if the kernel read them.
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from jaxlm import ops
from jaxlm.ops.pallas import decode, dispatch, flash, tiles

BLOCKS = tiles.BlockSizes(16, 16, 16, 16, 16, 16)
TOL = {jnp.float32: 5e-5, jnp.bfloat16: 3e-2, jnp.float16: 5e-3}
HAS_GPU = any(d.platform == "gpu" for d in jax.devices())
# Interpret-mode kernels are big HLO loops; XLA's CPU backend optimisations triple the
# compile time of every test for nothing at these sizes.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _inputs(seed, b, t, s, h, kh, d, dtype=jnp.float32, dv=None):
    """Fresh normal q, k, v and output cotangent (numpy RNG: eager jax.random compiles)."""
    rng = np.random.default_rng(seed)
    dv = dv or d
    shapes = ((b, t, h, d), (b, s, kh, d), (b, s, kh, dv), (b, t, h, dv))
    return [jnp.asarray(rng.standard_normal(sh, np.float32).astype(dtype)) for sh in shapes]


def _segments(seed, b, n, num=3):
    """Packed-sequence ids: sorted random ids per row, first 0 and last num-1."""
    ids = np.sort(np.random.default_rng(seed).integers(0, num, (b, n)), axis=1)
    ids[:, 0], ids[:, -1] = 0, num - 1
    return jnp.asarray(ids, jnp.int32)


def _value_and_grads(fn, q, k, v, do):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(do))


def _reference(q, k, v, do, **kw):
    f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
    fn = lambda q, k, v: ops.attention(q, k, v, **kw)
    return _jit(functools.partial(_value_and_grads, fn))(*f32)


def _assert_close(got, want, dtype, names=("out", "dq", "dk", "dv")):
    tol = TOL[dtype]
    for name, g, w in zip(names, got, want):
        g = np.asarray(g, np.float32)
        assert np.isfinite(g).all(), f"{name} has non-finite entries (unwritten tile?)"
        chex.assert_trees_all_close(g, np.asarray(w), atol=tol, rtol=tol, custom_message=name)


# --------------------------------------------------------------------------- the harness

def test_interpret_mode_poisons_outputs():
    def half_writer(x_ref, o_ref):
        o_ref[:4] = x_ref[:4]
    out = pl.pallas_call(half_writer, out_shape=jax.ShapeDtypeStruct((8,), jnp.float32),
                         interpret=True)(jnp.ones(8))
    assert bool(jnp.isnan(out[4:]).all()) and bool((out[:4] == 1).all())


# ------------------------------------------------------------------- flash, fwd + grads

FLASH_GRID = [
    # b, t,  s,  h, kh, d,  causal, window, segments, dtype
    (2, 37, 37, 4, 4, 16, True, None, False, jnp.float32),     # MHA, odd length
    (2, 37, 37, 4, 1, 16, False, None, False, jnp.float32),    # GQA 4 (MQA), bidirectional
    (1, 45, 45, 8, 1, 16, True, 11, False, jnp.float32),       # ratio 8, sliding window
    (2, 33, 33, 8, 2, 32, False, 7, False, jnp.float32),       # symmetric window
    (2, 50, 50, 4, 1, 16, True, None, True, jnp.float32),      # packed segments
    (1, 40, 56, 4, 2, 16, False, None, True, jnp.float32),     # t < s (queries last)
    (1, 64, 64, 2, 1, 64, True, None, False, jnp.float32),     # head dim 64, aligned
    (2, 37, 37, 4, 4, 16, True, None, False, jnp.bfloat16),
    (1, 45, 45, 8, 1, 32, True, 11, True, jnp.bfloat16),
    (1, 37, 37, 4, 1, 16, False, 9, True, jnp.bfloat16),
]


@pytest.mark.parametrize("b,t,s,h,kh,d,causal,window,segments,dtype", FLASH_GRID)
def test_flash_matches_reference(b, t, s, h, kh, d, causal, window, segments, dtype):
    q, k, v, do = _inputs(t * 7 + h, b, t, s, h, kh, d, dtype)
    kw = dict(causal=causal, sliding_window=window)
    if segments:
        kv_seg = _segments(s, b, s)
        kw.update(q_segment_ids=kv_seg[:, s - t:], kv_segment_ids=kv_seg)
    fn = lambda q, k, v: flash.flash_attention(q, k, v, block_sizes=BLOCKS, **kw)
    got = _jit(functools.partial(_value_and_grads, fn))(q, k, v, do)
    chex.assert_shape(got[0], (b, t, h, d))
    assert got[0].dtype == dtype and got[2].dtype == dtype
    _assert_close(got, _reference(q, k, v, do, **kw), dtype)


def test_flash_softcap_alibi_lengths_value_dim():
    """Soft-capping, ALiBi and per-row kv lengths together; dv != d."""
    b, t, h, kh = 2, 35, 4, 2
    q, k, v, do = _inputs(5, b, t, t, h, kh, 16, dv=32)
    kw = dict(causal=True, softcap=2.5, alibi_slopes=ops.alibi_slopes(h),
              kv_lengths=jnp.array([19, 35]), q_positions=None)
    fn = lambda q, k, v: flash.flash_attention(q, k, v, block_sizes=BLOCKS, **kw)
    got = _jit(functools.partial(_value_and_grads, fn))(q, k, v, do)
    _assert_close(got, _reference(q, k, v, do, **kw), jnp.float32)


def test_flash_arbitrary_positions_and_empty_rows():
    """Ring-buffer (non-monotone) kv positions; some queries precede every key (rows fully
    masked → zero output, zero gradient)."""
    b, t, s, h, kh = 2, 24, 48, 4, 2
    q, k, v, do = _inputs(6, b, t, s, h, kh, 16)
    kv_pos = (jnp.arange(s) + 17) % s + 10
    q_pos = jnp.stack([jnp.arange(t) * 2, jnp.arange(t) + 40])
    kw = dict(causal=True, sliding_window=20, q_positions=q_pos,
              kv_positions=jnp.broadcast_to(kv_pos, (b, s)))
    fn = lambda q, k, v: flash.flash_attention(q, k, v, block_sizes=BLOCKS, **kw)
    got = _jit(functools.partial(_value_and_grads, fn))(q, k, v, do)
    assert bool((got[0][0, :5] == 0).all())  # positions 0..8 see no key (first is 10)
    _assert_close(got, _reference(q, k, v, do, **kw), jnp.float32)


def test_flash_float16_forward():
    q, k, v, _ = _inputs(7, 1, 33, 33, 4, 2, 16, jnp.float16)
    got = _jit(lambda q, k, v: flash.flash_attention(q, k, v, causal=True,
                                                        block_sizes=BLOCKS))(q, k, v)
    want = ops.attention(*(x.astype(jnp.float32) for x in (q, k, v)), causal=True)
    _assert_close([got], [want], jnp.float16, names=("out",))


# ------------------------------------------------------------------------- tile skipping

def test_tile_plan_skips_hidden_tiles():
    pos = jnp.arange(64)[None]
    plan = functools.partial(tiles.tile_plan, pos, pos, jnp.array([64]), block_q=16, block_k=16)
    kinds = np.asarray(plan(causal=True, window=None))[0]
    assert (kinds == np.where(np.tri(4, k=-1), tiles.FULL, np.eye(4, dtype=int))).all()
    bounds = np.asarray(tiles.tile_bounds(kinds))
    assert bounds[:, 0].tolist() == [0] * 4 and bounds[:, 1].tolist() == [1, 2, 3, 4]
    visited = int((bounds[:, 1] - bounds[:, 0]).sum())
    assert visited == 10  # of 16: the upper triangle is never iterated

    kinds = np.asarray(plan(causal=True, window=16))[0]  # band: diagonal + one below
    bounds = np.asarray(tiles.tile_bounds(kinds))
    assert bounds.tolist() == [[0, 1], [0, 2], [1, 3], [2, 4]]
    assert (kinds[np.tril_indices(4, -2)] == tiles.SKIP).all()

    short = tiles.tile_plan(pos, pos, jnp.array([20]), causal=False, window=None,
                            block_q=16, block_k=16)
    assert np.asarray(tiles.tile_bounds(short))[0].tolist() == [[0, 2]] * 4  # past length


SKIP_CASES = {
    # name: (q positions, kv positions, kwargs, poisoned kv slots)
    "causal": (jnp.arange(16), jnp.arange(64), dict(causal=True), slice(16, 64)),
    "window": (jnp.arange(48, 64), jnp.arange(64), dict(causal=True, sliding_window=8),
               slice(0, 32)),
    "segment_hole": (jnp.arange(16), jnp.arange(64), dict(
        causal=False, q_segment_ids=jnp.ones((1, 16), jnp.int32),
        kv_segment_ids=jnp.concatenate([jnp.ones(16), 2 * jnp.ones(16),
                                        jnp.ones(32)]).astype(jnp.int32)[None]),
        slice(16, 32)),
}


@pytest.mark.parametrize("name", sorted(SKIP_CASES))
def test_hidden_tiles_are_never_read(name):
    q_pos, kv_pos, kw, hidden = SKIP_CASES[name]
    kw = dict(kw, q_positions=q_pos[None], kv_positions=kv_pos[None])
    q, k, v, do = _inputs(8, 1, 16, 64, 2, 1, 16)
    nan_k, nan_v = k.at[:, hidden].set(jnp.nan), v.at[:, hidden].set(jnp.nan)
    fn = lambda q, k, v: flash.flash_attention(q, k, v, block_sizes=BLOCKS, **kw)
    got = _jit(functools.partial(_value_and_grads, fn))(q, nan_k, nan_v, do)
    _assert_close(got, _reference(q, k, v, do, **kw), jnp.float32)


# ------------------------------------------------------------------------------- decode

DECODE_GRID = [
    # b, t, s,  h, kh, d,  kwargs, splits
    (2, 1, 100, 8, 1, 32, dict(causal=True), 3),                          # MQA, ratio 8
    (2, 3, 80, 4, 2, 16, dict(causal=True, sliding_window=10), 4),
    (2, 2, 96, 4, 4, 16, dict(causal=False, softcap=3.0, alibi=True, segments=True), 2),
]


@pytest.mark.parametrize("b,t,s,h,kh,d,kw,splits", DECODE_GRID)
def test_decode_matches_reference_with_garbage_past_lengths(b, t, s, h, kh, d, kw, splits):
    q, k, v, _ = _inputs(9 + t, b, t, s, h, kh, d)
    kw = dict(kw)
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = ops.alibi_slopes(h)
    if kw.pop("segments", False):
        kw["q_segment_ids"] = jnp.ones((b, t), jnp.int32)
        kw["kv_segment_ids"] = jnp.broadcast_to((jnp.arange(s) % 5 > 0).astype(jnp.int32), (b, s))
    lengths = jnp.array([0, s - 23]) if t > 1 else jnp.array([37, s])
    kw.update(kv_lengths=lengths, q_positions=lengths[:, None] - t + jnp.arange(t))
    beyond = (np.arange(s)[None] >= np.asarray(lengths)[:, None])[:, :, None, None]
    junk_k, junk_v = np.where(beyond, 1e30, k), np.where(beyond, np.nan, v)
    got = _jit(lambda q, k, v: decode.decode_attention(q, k, v, block_k=16,
                                                          num_splits=splits, **kw))(q, junk_k, junk_v)
    want = _jit(lambda q, k, v: ops.attention(q, k, v, **kw))(q, k, v)
    _assert_close([got], [want], jnp.float32, names=("out",))
    if t > 1:
        assert bool((got[0] == 0).all())  # kv_lengths 0: nothing to attend


def test_decode_gradients_and_bfloat16():
    q, k, v, do = _inputs(11, 2, 2, 64, 8, 2, 16, jnp.bfloat16)
    kw = dict(causal=True, kv_lengths=jnp.array([40, 64]),
              q_positions=jnp.array([[38, 39], [62, 63]]))
    fn = lambda q, k, v: decode.decode_attention(q, k, v, block_k=16, num_splits=2, **kw)
    got = _jit(functools.partial(_value_and_grads, fn))(q, k, v, do)
    _assert_close(got, _reference(q, k, v, do, **kw), jnp.bfloat16)


# ---------------------------------------------------------------- dispatch, end to end

def test_ops_attention_pallas_end_to_end():
    q, k, v, do = _inputs(12, 1, 40, 40, 4, 2, 16)
    kw = dict(causal=True, sliding_window=12)
    fn = _jit(functools.partial(_value_and_grads, lambda q, k, v: ops.attention(
        q, k, v, implementation="pallas", **kw)))
    _assert_close(fn(q, k, v, do), _reference(q, k, v, do, **kw), jnp.float32)

    # Cached decode step through the same entry point (dispatches to the decode kernel).
    assert dispatch.use_decode(1, 64) and not dispatch.use_decode(40, 40)
    lengths = jnp.array([29])
    step = lambda impl: _jit(lambda q, k, v: ops.attention(
        q, k, v, causal=True, kv_lengths=lengths, q_positions=lengths[:, None] - 1,
        implementation=impl))
    q1 = q[:, :1]
    _assert_close([step("pallas")(q1, k, v)], [step("xla")(q1, k, v)], jnp.float32,
                  names=("out",))


def test_dispatch_rejects_bad_arguments():
    q, k, v, _ = _inputs(13, 1, 8, 8, 4, 2, 16)
    with pytest.raises(ValueError, match="alibi_slopes"):
        dispatch.attention(q, k, v, alibi_slopes=jnp.ones(3))
    with pytest.raises(ValueError, match="segment"):
        dispatch.attention(q, k, v, q_segment_ids=jnp.zeros((1, 8), jnp.int32))
    with pytest.raises(ValueError, match="backend"):
        flash.flash_attention(q, k, v, backend="cuda")


def test_tpu_splash_path_in_interpret_mode():
    """The TPU branch (JAX's splash attention), run through TPU interpret mode on CPU."""
    q, k, v, _ = _inputs(14, 1, 128, 256, 4, 2, 128)
    # Every row keeps a visible key: splash leaves rows with none undefined.
    kw = dict(causal=True, sliding_window=40, kv_lengths=jnp.array([230]), softcap=4.0)
    none = dict(q_positions=None, kv_positions=None, q_segment_ids=None, kv_segment_ids=None,
                scale=None, alibi_slopes=None)
    got = dispatch.splash_attention(q, k, v, **kw, **none, _interpret=True)
    _assert_close([got], [ops.attention(q, k, v, **kw)], jnp.float32, names=("out",))

    with pytest.raises(ValueError, match="alibi_slopes"):
        dispatch.splash_attention(q, k, v, **kw, **dict(none, alibi_slopes=jnp.ones(4)))
    with pytest.raises(ValueError, match="positions"):
        _jit(lambda p: dispatch.splash_attention(q, k, v, **kw, **dict(none, q_positions=p)))(
            jnp.arange(128)[None])
    with pytest.raises(ValueError, match="multiples of 128"):
        dispatch.splash_attention(q[:, :100], k, v, **kw, **none)


# -------------------------------------------------------------------------------- GPU

@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU (Triton backend)")
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_triton_matches_reference(d, causal):
    q, k, v, do = _inputs(15, 2, 1000, 1000, 8, 2, d, jnp.bfloat16)
    fn = lambda q, k, v: flash.flash_attention(q, k, v, causal=causal, backend="triton")
    got = _jit(functools.partial(_value_and_grads, fn))(q, k, v, do)
    _assert_close(got, _reference(q, k, v, do, causal=causal), jnp.bfloat16)


@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU (Triton backend)")
def test_triton_decode_matches_reference():
    q, k, v, _ = _inputs(16, 4, 1, 4096, 32, 8, 128, jnp.bfloat16)
    lengths = jnp.array([1, 1000, 4000, 4096])
    kw = dict(causal=True, kv_lengths=lengths, q_positions=lengths[:, None] - 1)
    got = decode.decode_attention(q, k, v, backend="triton", **kw)
    want = ops.attention(*(x.astype(jnp.float32) for x in (q, k, v)), **kw)
    _assert_close([got], [want], jnp.bfloat16, names=("out",))
