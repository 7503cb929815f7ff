"""Paged attention against the dense op over per-row dense caches.

Each case scatters ragged per-row K/V into a pool with a shuffled page assignment; pages no
row owns (and the table entries past a row's pages, which point at them) hold large random
values, so reading an unmasked wrong slot shows. Rows of lengths 1, 7, 16 and 33 plus a
padding row (length 0) query their last t positions: t = 1 (decode) and t = 5 (a prefill
chunk; the length-1 row then repeats position 0, as a padded chunk does).
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import triton as plgpu

from jaxlm import ops
from jaxlm.ops.pallas import paged as pallas_paged

LENGTHS = (1, 7, 16, 33, 0)   # the last row is padding

CASES = {
    # name: (h, kv heads, d, dv (None: MLA, values = first dv key columns), kwargs)
    "gqa": (4, 2, 16, 16, {}),
    "mqa": (4, 1, 16, 8, {}),
    "window": (4, 2, 16, 16, dict(sliding_window=5)),
    "softcap_scale": (4, 2, 16, 16, dict(softcap=1.5, scale=0.5)),
    "mla": (4, 1, 24, None, {}),
}


def _case(h, kh, d, dv, z=8, seed=0, dtype=jnp.float32, garbage_value=None, t=5):
    """Pool inputs for paged_attention, and the dense per-row (K, V) [b,s,k,·]."""
    rng = np.random.default_rng(seed)
    mla, vd = dv is None, 16 if dv is None else dv
    need = [-(-n // z) for n in LENGTHS]
    pmax = max(need) + 1                      # every row has unused table entries
    num_pages = sum(need) + 3                 # some pages owned by no row
    perm = rng.permutation(num_pages)
    garbage = perm[sum(need):]
    s = pmax * z
    kd = rng.normal(size=(len(LENGTHS), s, kh, d))
    vd_ = kd[..., :vd] if mla else rng.normal(size=(len(LENGTHS), s, kh, vd))
    k_pages = 1e3 * rng.normal(size=(num_pages, z, kh, d))
    v_pages = 1e3 * rng.normal(size=(num_pages, z, kh, vd))
    if garbage_value is not None:
        k_pages[:], v_pages[:] = garbage_value, garbage_value
    tables = np.zeros((len(LENGTHS), pmax), np.int32)
    used = 0
    for r, n in enumerate(LENGTHS):
        tables[r] = rng.choice(garbage, pmax)
        tables[r, :need[r]] = perm[used:used + need[r]]
        used += need[r]
        for j in range(n):  # only filled slots are written; the rest stay garbage
            k_pages[tables[r, j // z], j % z] = kd[r, j]
            v_pages[tables[r, j // z], j % z] = vd_[r, j]
    pos = np.maximum(np.array(LENGTHS)[:, None] - t + np.arange(t), 0)
    q = rng.normal(size=(len(LENGTHS), t, h, d))
    arr = lambda x, t=dtype: jnp.asarray(x, t)
    return dict(q=arr(q), k_pages=arr(k_pages), v_pages=None if mla else arr(v_pages),
                block_tables=arr(tables, jnp.int32), q_positions=arr(pos, jnp.int32),
                kv_lengths=arr(LENGTHS, jnp.int32)), (arr(kd), arr(vd_))


def _dense_reference(inputs, dense, **kw):
    """ops.attention row by row over its dense cache (a padding row sees nothing: zeros)."""
    kd, vd = dense
    out = [ops.attention(inputs["q"][r][None], kd[r][None], vd[r][None], causal=True,
                         q_positions=inputs["q_positions"][r][None],
                         kv_positions=jnp.arange(kd.shape[1])[None],
                         kv_lengths=inputs["kv_lengths"][r][None], **kw)[0]
           for r in range(kd.shape[0])]
    return jnp.stack(out)


def _paged(inputs, dv, **kw):
    v_dim = 16 if dv is None else None
    return ops.paged_attention(**inputs, v_dim=v_dim, **kw)


@pytest.mark.parametrize("t", [1, 5], ids=["decode", "chunk"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_xla_matches_dense(name, t):
    h, kh, d, dv, kw = CASES[name]
    inputs, dense = _case(h, kh, d, dv, t=t)
    out = jax.jit(lambda x: _paged(x, dv, **kw))(inputs)
    chex.assert_shape(out, (len(LENGTHS), t, h, 16 if dv is None else dv))
    chex.assert_trees_all_close(out, _dense_reference(inputs, dense, **kw), atol=1e-5,
                                rtol=1e-5)
    assert float(jnp.abs(out).max()) < 10.0  # no garbage page leaked in
    np.testing.assert_array_equal(out[-1], 0.0)   # the padding row


def test_xla_alibi_matches_dense():
    inputs, dense = _case(4, 2, 16, 16)
    slopes = ops.alibi_slopes(4)
    chex.assert_trees_all_close(_paged(inputs, 16, alibi_slopes=slopes),
                                _dense_reference(inputs, dense, alibi_slopes=slopes),
                                atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_pallas_matches_xla(name):
    h, kh, d, dv, kw = CASES[name]
    inputs, _ = _case(h, kh, d, dv, seed=1)
    want = _paged(inputs, dv, **kw)
    got = _paged(inputs, dv, implementation="pallas", **kw)
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_kv_lengths_mask_filled_slots_before_the_position(implementation):
    # Normally a token's own slot is filled (position < length), so causality already hides
    # the rest; a shorter length must still win (row 3's token at 32 sees only 30 slots).
    inputs, dense = _case(4, 2, 16, 16, seed=6)
    inputs["kv_lengths"] = jnp.array([1, 7, 16, 30, 0], jnp.int32)
    chex.assert_trees_all_close(_paged(inputs, 16, implementation=implementation),
                                _dense_reference(inputs, dense), atol=1e-5, rtol=1e-5)


def test_pallas_ignores_nan_in_unfilled_slots():
    # Freed pages may hold anything; the kernel must not let 0 · NaN through (the xla
    # reference, like the dense op, needs finite garbage, so compare with the dense op).
    inputs, dense = _case(4, 2, 16, 16, seed=5, garbage_value=np.nan)
    got = _paged(inputs, 16, implementation="pallas", sliding_window=6)
    chex.assert_trees_all_close(got, _dense_reference(inputs, dense, sliding_window=6),
                                atol=1e-5, rtol=1e-5)


def test_pallas_bfloat16_close_to_xla():
    inputs, _ = _case(4, 2, 16, 16, seed=2, dtype=jnp.bfloat16)
    got = _paged(inputs, 16, implementation="pallas")
    assert got.dtype == jnp.bfloat16
    chex.assert_trees_all_close(got.astype(jnp.float32),
                                _paged(inputs, 16).astype(jnp.float32), atol=2e-2, rtol=2e-2)


def test_grad_q_matches_dense():
    inputs, dense = _case(4, 2, 16, 16, seed=3)
    ct = jax.random.normal(jax.random.key(0), inputs["q"].shape)
    paged = jax.grad(lambda q: (ops.paged_attention(**{**inputs, "q": q}) * ct).sum())
    ref = jax.grad(lambda q: (_dense_reference({**inputs, "q": q}, dense) * ct).sum())
    chex.assert_trees_all_close(paged(inputs["q"]), ref(inputs["q"]), atol=1e-5, rtol=1e-5)


def test_paged_write_matches_loop():
    rng = np.random.default_rng(4)
    pages = rng.normal(size=(5, 4, 2, 3)).astype(np.float32)
    new = rng.normal(size=(6, 2, 3)).astype(np.float32)
    slots = np.array([7, -1, 0, 19, -1, 12], np.int32)
    want = pages.copy()
    for x, sl in zip(new, slots):
        if sl >= 0:
            want[sl // 4, sl % 4] = x
    got = jax.jit(ops.paged_write)(jnp.asarray(pages), jnp.asarray(new), jnp.asarray(slots))
    np.testing.assert_array_equal(np.asarray(got), want)


def test_gather_pages_matches_loop():
    pages = np.arange(5 * 3 * 2).reshape(5, 3, 2)
    tables = np.array([[4, 0], [2, 2]], np.int32)
    want = np.stack([np.concatenate([pages[p] for p in row]) for row in tables])
    got = ops.gather_pages(jnp.asarray(pages), jnp.asarray(tables))
    np.testing.assert_array_equal(np.asarray(got), want)


def test_errors_name_the_fix():
    inputs, _ = _case(4, 2, 16, 16)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        ops.paged_attention(**{**inputs, "q": jnp.zeros((5, 5, 3, 16))})
    with pytest.raises(ValueError, match="v_dim"):
        ops.paged_attention(**{**inputs, "v_pages": None})
    with pytest.raises(ValueError, match=r"q \[b,t,h,d\]"):
        ops.paged_attention(**{**inputs, "q": inputs["q"][0]})
    with pytest.raises(ValueError, match="implementation='xla'"):
        ops.paged_attention(**inputs, alibi_slopes=ops.alibi_slopes(4), implementation="pallas")
    with pytest.raises(ValueError, match="power of two >= 16"):
        flat = dict(q=inputs["q"].reshape(-1, 4, 16), k_pages=inputs["k_pages"],
                    v_pages=inputs["v_pages"], block_tables=inputs["block_tables"],
                    q_rows=jnp.repeat(jnp.arange(5), 5), kv_lengths=inputs["kv_lengths"],
                    q_positions=inputs["q_positions"].reshape(-1))
        pallas_paged.paged_attention(**flat, scale=1.0, backend="triton")


# ---------------------------------------------------------------------- GPU (Triton)

TRITON_CALL = getattr(plgpu, "CUSTOM_CALL_TARGET_NAME", "__gpu$xla.gpu.triton")


@pytest.mark.parametrize("h,kh,d,dv,kw", [(8, 2, 128, 128, dict(sliding_window=64)),
                                          (16, 1, 576, None, dict(softcap=30.0))],
                         ids=["gqa4_window", "mla_576"])
def test_paged_lowers_to_triton(h, kh, d, dv, kw):
    t, n, pmax, z, num_pages = 6, 3, 8, 16, 20
    sd = jax.ShapeDtypeStruct
    args = (sd((t, h, d), jnp.bfloat16), sd((num_pages, z, kh, d), jnp.bfloat16),
            None if dv is None else sd((num_pages, z, kh, dv), jnp.bfloat16),
            sd((n, pmax), jnp.int32), sd((t,), jnp.int32), sd((t,), jnp.int32),
            sd((n,), jnp.int32))
    fn = lambda *a: pallas_paged.paged_attention(*a, scale=0.1, v_dim=512 if dv is None
                                                 else None, backend="triton", **kw)
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=1,
                                         platform="gpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (),
                                                                  abstract_device=device)):
        exported = jax.export.export(
            jax.jit(fn), platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*args)
    calls = [line for line in exported.mlir_module().splitlines()
             if f"custom_call @{TRITON_CALL}(" in line]
    assert len(calls) == 1 and 'name = "paged_attention"' in calls[0]
    assert "grid_x = 6 : i32" in calls[0] and f"grid_y = {kh} : i32" in calls[0]
