"""ops/quant.py against plain numpy: the rounding convention (symmetric, scale = absmax/127
for int8 and absmax/7 for int4, round half to even, an all-zero slice gets scale 1), the
half-step error bound on random and adversarial inputs, exact int4 packing, the quantized
matmuls (values and gradients) and attention over an int8 cache (dense and paged, the
scales applied to logits and probabilities) against attention over dequantized K/V."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import ops
from jaxlm.ops import quant as Q

RNG = np.random.default_rng(0)


def adversarial(shape, axis_groups):
    """Random normal data with an all-zero slice, a constant slice and one huge outlier
    per slice (slices along the last axis)."""
    w = RNG.normal(size=shape).astype(np.float32)
    w[..., 0] = 0.0
    w[..., 1] = 0.3
    flat = w.reshape(-1, shape[-1])
    rows = RNG.integers(0, flat.shape[0], shape[-1])
    flat[rows, np.arange(shape[-1])] *= 1000.0
    return flat.reshape(shape)


def np_int8(w, n):
    """Reference: per output column over the first n axes."""
    axes = tuple(range(n))
    scale = np.abs(w).max(axis=axes) / 127.0
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    q = np.clip(np.round(w / scale), -127, 127)   # numpy rounds half to even too
    return q, scale


@pytest.mark.parametrize("shape,n", [((48, 20), 1), ((6, 8, 4, 5), 2)])
@pytest.mark.parametrize("kind", ["random", "adversarial"])
def test_int8_round_trip(shape, n, kind):
    w = RNG.normal(size=shape).astype(np.float32) if kind == "random" else adversarial(shape, n)
    q, scale = Q.quantize_int8(jnp.asarray(w), n)
    q, scale = np.asarray(q), np.asarray(scale)
    q_ref, s_ref = np_int8(w, n)
    assert q.dtype == np.int8 and scale.shape == shape[n:]
    np.testing.assert_allclose(scale, s_ref, rtol=1e-6)
    assert np.abs(q.astype(np.int32) - q_ref).max() <= 1  # only float-rounding ties differ
    assert np.abs(q).max() <= 127
    deq = np.asarray(Q.dequantize_int8(q, scale))
    assert np.all(np.abs(w - deq) <= scale / 2 * (1 + 1e-5) + 1e-7)
    # the absmax of each column maps to exactly ±127; a zero column is exactly zero
    flat_w, flat_q = w.reshape(-1, *shape[n:]), q.reshape(-1, *shape[n:])
    idx = np.abs(flat_w).argmax(axis=0)
    peak = np.take_along_axis(flat_q, idx[None], 0)[0]
    live = np.abs(flat_w).max(axis=0) > 0
    assert np.all(np.abs(peak[live]) == 127)
    if kind == "adversarial":
        assert np.all(deq[..., 0] == 0) and np.all(scale[..., 0] == 1)


def test_int8_convention_by_hand():
    w = np.array([[1.27, 0.0], [-0.5, 0.0], [0.005, 0.0]], np.float32)
    q, scale = Q.quantize_int8(jnp.asarray(w), 1)
    np.testing.assert_allclose(np.asarray(scale), [0.01, 1.0], rtol=1e-6)
    # 0.005 / 0.01 = 0.5 → 0 (half to even); -0.5 / 0.01 = -50
    assert np.asarray(q)[:, 0].tolist() == [127, -50, 0]


def test_int4_packing_is_exact_and_laid_out_low_nibble_first():
    a, b = np.meshgrid(np.arange(-8, 8), np.arange(-8, 8), indexing="ij")
    q = np.stack([a.reshape(-1), b.reshape(-1)], 0)               # [2, 256] every pair
    q = np.concatenate([q, q[::-1]], 0)[..., None].repeat(3, -1)  # [4, 256, 3]
    packed = Q.pack_int4(jnp.asarray(q, jnp.int8))
    assert packed.dtype == jnp.uint8 and packed.shape == (2, 256, 3)
    np.testing.assert_array_equal(np.asarray(Q.unpack_int4(packed)), q)
    one = np.asarray(Q.pack_int4(jnp.asarray([[-1], [3]], jnp.int8)))
    assert one[0, 0] == 0x3F     # row 0 (-1 = 0xF) low, row 1 (3) high
    with pytest.raises(ValueError, match="even leading size"):
        Q.pack_int4(jnp.zeros((3, 2), jnp.int8))


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("kind", ["random", "adversarial"])
def test_int4_round_trip(group, kind):
    k, n = 256, 12
    w = RNG.normal(size=(k, n)).astype(np.float32)
    if kind == "adversarial":
        w[:group, 0] = 0.0                                  # a zero group
        w[np.arange(0, k, group), 1] *= 500.0               # one outlier per group
    packed, scale = Q.quantize_int4(jnp.asarray(w), 1, group)
    scale = np.asarray(scale)
    s_ref = np.abs(w.reshape(k // group, group, n)).max(1) / 7.0
    s_ref = np.where(s_ref == 0, 1.0, s_ref)
    np.testing.assert_allclose(scale, s_ref, rtol=1e-6)
    q = np.asarray(Q.unpack_int4(packed))
    assert q.min() >= -7 and q.max() <= 7
    deq = np.asarray(Q.dequantize_int4(packed, scale, group))
    step = np.repeat(scale, group, axis=0)
    assert np.all(np.abs(w - deq) <= step / 2 * (1 + 1e-5) + 1e-7)
    if kind == "adversarial":
        assert np.all(deq[:group, 0] == 0)


def test_int4_needs_an_even_group_dividing_k():
    with pytest.raises(ValueError, match="group size 48 does not divide"):
        Q.quantize_int4(jnp.ones((64, 4)), 1, 48)
    with pytest.raises(ValueError, match="even number"):
        Q.check_int4(63, 7)


@pytest.mark.parametrize("kind", ["random", "adversarial"])
def test_kv_round_trip(kind):
    x = RNG.normal(size=(2, 5, 3, 16)).astype(np.float32)
    if kind == "adversarial":
        x[0, 0, 0] = 0.0
        x[1, 2, 1, 3] = 1e4
    q, scale = Q.quantize_kv(jnp.asarray(x))
    q, scale = np.asarray(q), np.asarray(scale)
    assert q.dtype == np.int8 and scale.shape == (2, 5, 3, 1)
    ref = np.abs(x).max(-1, keepdims=True) / 127.0
    np.testing.assert_allclose(scale, np.where(ref == 0, 1.0, ref), rtol=1e-6)
    deq = np.asarray(Q.dequantize_kv(q, scale))
    assert np.all(np.abs(x - deq) <= scale / 2 * (1 + 1e-5) + 1e-7)
    assert np.all(deq[0, 0, 0] == 0) if kind == "adversarial" else True


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("in_shape", [(64,), (4, 16)])
def test_quantized_matmul_equals_float_matmul_of_dequantized_weight(mode, in_shape):
    out_shape = (3, 5)
    w = RNG.normal(size=(*in_shape, *out_shape)).astype(np.float32)
    x = RNG.normal(size=(2, 3, *in_shape)).astype(np.float32)
    n = len(in_shape)
    k = int(np.prod(in_shape))
    if mode == "int8":
        q, scale = Q.quantize_int8(jnp.asarray(w), n)
        deq = np.asarray(q, np.float64) * np.asarray(scale, np.float64)
        f = lambda x: Q.int8_matmul(x, q, scale, n)  # noqa: E731
    else:
        packed, scale = Q.quantize_int4(jnp.asarray(w), n, 16)
        vals = np.asarray(Q.unpack_int4(packed), np.float64).reshape(k // 16, 16, *out_shape)
        deq = (vals * np.asarray(scale, np.float64)[:, None]).reshape(*in_shape, *out_shape)
        f = lambda x: Q.int4_matmul(x, packed, scale, 16, n)  # noqa: E731
    want = np.tensordot(x.astype(np.float64), deq, axes=n)
    np.testing.assert_allclose(np.asarray(f(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)
    # gradients with respect to the input (what a LoRA over a quantized base trains through)
    ct = RNG.normal(size=want.shape).astype(np.float32)
    g = jax.grad(lambda x: jnp.sum(f(x) * ct))(jnp.asarray(x))
    g_ref = np.tensordot(ct.astype(np.float64), deq,
                         axes=(tuple(range(2, 2 + len(out_shape))),
                               tuple(range(n, n + len(out_shape)))))
    np.testing.assert_allclose(np.asarray(g), g_ref, rtol=1e-5, atol=1e-5)


def np_attention(q, k, v, mask, scale):
    """Plain softmax attention, GQA by group index, numpy float64."""
    b, t, h, d = q.shape
    kh = k.shape[2]
    out = np.zeros((b, t, h, v.shape[-1]))
    for bi in range(b):
        for hi in range(h):
            kv = hi // (h // kh)
            logits = q[bi, :, hi] @ k[bi, :, kv].T * scale
            logits = np.where(mask[bi], logits, -np.inf)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p = np.where(mask[bi], p, 0)
            out[bi, :, hi] = (p / p.sum(-1, keepdims=True)) @ v[bi, :, kv]
    return out


def test_attention_over_an_int8_cache():
    b, t, s, h, kh, d = 2, 3, 9, 4, 2, 16
    q = RNG.normal(size=(b, t, h, d)).astype(np.float32)
    kf = RNG.normal(size=(b, s, kh, d)).astype(np.float32)
    vf = RNG.normal(size=(b, s, kh, d)).astype(np.float32)
    (k8, ks), (v8, vs) = Q.quantize_kv(jnp.asarray(kf)), Q.quantize_kv(jnp.asarray(vf))
    lengths = np.array([9, 6], np.int32)
    q_pos = np.stack([np.arange(6, 9), np.arange(3, 6)]).astype(np.int32)
    kv_pos = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s))
    got = ops.attention(jnp.asarray(q), k8, v8, k_scale=ks[..., 0], v_scale=vs[..., 0],
                        causal=True, q_positions=q_pos, kv_positions=kv_pos,
                        kv_lengths=lengths)
    kd = np.asarray(k8, np.float64) * np.asarray(ks, np.float64)   # dequantized here
    vd = np.asarray(v8, np.float64) * np.asarray(vs, np.float64)
    mask = (kv_pos[:, None, :] <= q_pos[:, :, None]) & (np.arange(s)[None, None] <
                                                         lengths[:, None, None])
    np.testing.assert_allclose(np.asarray(got), np_attention(q, kd, vd, mask, d ** -0.5),
                               atol=1e-5)
    same = ops.attention(jnp.asarray(q), jnp.asarray(kd, jnp.float32),
                         jnp.asarray(vd, jnp.float32), causal=True, q_positions=q_pos,
                         kv_positions=kv_pos, kv_lengths=lengths)
    np.testing.assert_allclose(np.asarray(got), np.asarray(same), atol=1e-5)
    with pytest.raises(ValueError, match=r"k_scale .* must be \[b,s,k\]"):
        ops.attention(jnp.asarray(q), k8, v8, k_scale=ks, v_scale=vs[..., 0])
    with pytest.raises(ValueError, match="v_scale: int8 keys/values need their scale"):
        ops.attention(jnp.asarray(q), k8, v8, k_scale=ks[..., 0])


@pytest.mark.parametrize("mla", [False, True])
def test_paged_attention_over_int8_pools(mla):
    p, z, kh, d, r = 6, 4, 1 if mla else 2, 24 if mla else 16, 16
    h = 4
    kf = RNG.normal(size=(p, z, kh, d)).astype(np.float32)
    vf = None if mla else RNG.normal(size=(p, z, kh, d)).astype(np.float32)
    k8, ks = Q.quantize_kv(jnp.asarray(kf))
    tables = jnp.asarray([[3, 0, 5], [1, 4, 2]], jnp.int32)
    lengths = jnp.asarray([10, 7], jnp.int32)
    q = jnp.asarray(RNG.normal(size=(2, 2, h, d)), jnp.float32)
    pos = jnp.asarray([[8, 9], [5, 6]], jnp.int32)
    kd = Q.dequantize_kv(k8, ks)
    kw = dict(v_dim=r) if mla else {}
    if mla:
        got = ops.paged_attention(q, k8, None, tables, pos, lengths, k_scales=ks[..., 0], **kw)
        want = ops.paged_attention(q, kd, None, tables, pos, lengths, **kw)
    else:
        v8, vs = Q.quantize_kv(jnp.asarray(vf))
        got = ops.paged_attention(q, k8, v8, tables, pos, lengths, k_scales=ks[..., 0],
                                  v_scales=vs[..., 0])
        want = ops.paged_attention(q, kd, Q.dequantize_kv(v8, vs), tables, pos, lengths)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    with pytest.raises(ValueError, match="int8 pools need their scales"):
        ops.paged_attention(q, k8, None if mla else k8, tables, pos, lengths, **kw)
    with pytest.raises(ValueError, match="int8 pools need their scales|must be"):
        ops.paged_attention(q, k8, None if mla else kd, tables, pos, lengths,
                            k_scales=ks[..., 0], v_scales=ks[..., 0], **kw)
