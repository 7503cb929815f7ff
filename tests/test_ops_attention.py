"""ops.attention against plainly written references.

The numpy reference loops over batch and query heads (query head i reads kv head i // g)
and writes the softmax out; masks are built by loops over (query, key) pairs from the
rules in the brief: causal kpos <= p, causal window p - w < kpos <= p, same segment,
key index < kv_length. Gradients use a separate jnp reference that repeats K/V per group
with jnp.repeat. Nothing here calls the code under test to build an expectation.
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from jaxlm import ops

F32_TOL = dict(rtol=1e-5, atol=1e-5)      # float32 op vs float64 numpy reference
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)     # float32 grads vs float32 jnp reference
BF16_TOL = dict(rtol=3e-2, atol=3e-2)     # bfloat16 inputs vs float32 (8-bit mantissa)


def rand(seed, shape, scale=1.0):
    return np.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, np.float32)


def qkv(seed, b=2, t=6, s=6, h=4, kh=2, d=8, dv=6, scale=1.0):
    return (rand(seed, (b, t, h, d), scale), rand(seed + 1, (b, s, kh, d), scale),
            rand(seed + 2, (b, s, kh, dv)))


# One compiled attention shared by the checks that are not the op under test (repeated-KV
# MHA, per-segment runs, ...): eager dispatch compiles every primitive per new shape, so
# the un-jitted variant is kept to the op under test and shapes are kept few.
jit_attention = jax.jit(ops.attention, static_argnames=(
    "causal", "sliding_window", "scale", "softcap", "implementation"))


@functools.partial(jax.jit, static_argnums=3)
def repeated_kv_attention(q, k, v, g):
    """Plain multi-head attention on K/V repeated g times per kv head."""
    return ops.attention(q, jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2), causal=True)


def arange_positions(b, t, s):
    """Queries are the last t of s positions (the op's documented default)."""
    return (np.tile(np.arange(s - t, s), (b, 1)), np.tile(np.arange(s), (b, 1)))


def ref_mask(q_pos, kv_pos, *, causal=False, window=None, q_seg=None, kv_seg=None,
             lengths=None):
    b, t = q_pos.shape
    s = kv_pos.shape[1]
    mask = np.zeros((b, t, s), bool)
    for bi in range(b):
        for i in range(t):
            for j in range(s):
                p, kp = int(q_pos[bi, i]), int(kv_pos[bi, j])
                ok = True
                if causal:
                    ok = ok and kp <= p
                if window is not None:
                    ok = ok and (p - window < kp if causal else abs(p - kp) < window)
                if q_seg is not None:
                    ok = ok and q_seg[bi, i] == kv_seg[bi, j]
                if lengths is not None:
                    ok = ok and j < lengths[bi]
                mask[bi, i, j] = ok
    return mask


def ref_alibi(slopes, q_pos, kv_pos):
    b, t = q_pos.shape
    s = kv_pos.shape[1]
    bias = np.zeros((b, len(slopes), t, s), np.float64)
    for bi in range(b):
        for hi, m in enumerate(slopes):
            for i in range(t):
                for j in range(s):
                    bias[bi, hi, i, j] = -m * abs(int(q_pos[bi, i]) - int(kv_pos[bi, j]))
    return bias


def ref_attention(q, k, v, mask, *, scale=None, softcap=None, bias=None):
    """softmax(q kᵀ·scale) v per batch and query head, in float64 numpy."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, h, d = q.shape
    kh, dv = k.shape[2], v.shape[3]
    g = h // kh
    scale = d ** -0.5 if scale is None else scale
    out = np.zeros((b, t, h, dv))
    for bi in range(b):
        for hi in range(h):
            kvh = hi // g
            logits = q[bi, :, hi] @ k[bi, :, kvh].T * scale  # [t, s]
            if softcap is not None:
                logits = softcap * np.tanh(logits / softcap)
            if bias is not None:
                logits = logits + bias[bi, hi]
            for i in range(t):
                seen = mask[bi, i]
                if not seen.any():
                    continue  # a query that sees nothing outputs zeros
                w = np.exp(logits[i, seen] - logits[i, seen].max())
                out[bi, i, hi] = (w / w.sum()) @ v[bi, seen, kvh]
    return out.astype(np.float32)


def ref_attention_jnp(q, k, v, mask, *, scale, softcap=None, bias=None):
    """Differentiable reference: MHA on K/V repeated per group, explicit softmax."""
    g = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    logits = jnp.einsum("bthd,bshd->bhts", q, k) * scale
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    if bias is not None:
        logits = logits + bias
    m = jnp.asarray(mask)[:, None]
    logits = jnp.where(m, logits, -1e30)
    e = jnp.where(m, jnp.exp(logits - logits.max(-1, keepdims=True)), 0.0)
    den = e.sum(-1, keepdims=True)
    p = e / jnp.where(den > 0, den, 1.0)
    return jnp.einsum("bhts,bshd->bthd", p, v)


@functools.lru_cache(maxsize=None)
def gradient_case():
    """Inputs, op kwargs and reference grads of sum(out * proj), shared by both variants:
    GQA with every logit and mask feature at once (causal, window, softcap, scale, ALiBi,
    segments, kv_lengths)."""
    b, t, h = 2, 6, 4
    q, k, v = qkv(26, kh=2)
    seg = np.array([[0, 0, 0, 0, 1, 1], [3, 3, 4, 4, 4, 4]], np.int32)
    lengths = np.array([6, 5], np.int32)
    slopes = 2.0 ** (-np.arange(1, h + 1, dtype=np.float32))
    kw = dict(causal=True, sliding_window=3, softcap=2.0, scale=0.5, alibi_slopes=slopes,
              q_segment_ids=seg, kv_segment_ids=seg, kv_lengths=lengths)
    qp, kp = arange_positions(b, t, t)
    mask = ref_mask(qp, kp, causal=True, window=3, q_seg=seg, kv_seg=seg, lengths=lengths)
    bias = ref_alibi(slopes, qp, kp)
    proj = rand(27, (b, t, h, 6))
    ref = jax.jit(functools.partial(ref_attention_jnp, scale=0.5, softcap=2.0))
    # The jnp reference itself agrees with the numpy loops.
    chex.assert_trees_all_close(ref(q, k, v, mask, bias=bias),
                                ref_attention(q, k, v, mask, scale=0.5, softcap=2.0, bias=bias),
                                **F32_TOL)
    want = jax.jit(jax.grad(lambda q, k, v: jnp.sum(ref(q, k, v, mask, bias=bias) * proj),
                            argnums=(0, 1, 2)))(q, k, v)
    return q, k, v, kw, proj, want


class AttentionTest(chex.TestCase):
    """Shapes are b=2, t=s=6, h=4, kh=2, d=8, dv=6 unless a test needs otherwise."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("mha", 4, 4, False), ("gqa", 4, 2, False), ("gqa_causal", 4, 2, True),
        ("mqa_causal", 4, 1, True))
    def test_matches_reference(self, h, kh, causal):
        b, t, dv = 2, 6, 6
        q, k, v = qkv(0, h=h, kh=kh)
        out = self.variant(functools.partial(ops.attention, causal=causal))(q, k, v)
        chex.assert_shape(out, (b, t, h, dv))
        chex.assert_type(out, jnp.float32)
        qp, kp = arange_positions(b, t, t)
        want = ref_attention(q, k, v, ref_mask(qp, kp, causal=causal))
        chex.assert_trees_all_close(out, want, **F32_TOL)

    @chex.variants(with_jit=True, without_jit=True)
    def test_cross_lengths_default_positions(self):
        # t < s with no positions: queries are the last t of s positions (chunked prefill).
        b, t, s = 2, 3, 6
        q, k, v = qkv(1, t=t, s=s)
        out = self.variant(functools.partial(ops.attention, causal=True))(q, k, v)
        chex.assert_shape(out, (b, t, 4, 6))
        qp, kp = arange_positions(b, t, s)
        want = ref_attention(q, k, v, ref_mask(qp, kp, causal=True))
        chex.assert_trees_all_close(out, want, **F32_TOL)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("gqa", 2), ("mqa", 1))
    def test_grouped_equals_mha_with_repeated_kv(self, kh):
        h = 4
        q, k, v = qkv(2, h=h, kh=kh)
        g = h // kh
        grouped = self.variant(functools.partial(ops.attention, causal=True))(q, k, v)
        repeated = repeated_kv_attention(q, k, v, g)
        chex.assert_shape(grouped, repeated.shape)
        chex.assert_trees_all_close(grouped, repeated, **F32_TOL)

    @chex.variants(with_jit=True, without_jit=True)
    def test_causal_gradient_sees_only_the_past(self):
        b, t, h = 2, 6, 4
        q, k, v = qkv(3)

        def vjp_of_row(q, k, v, cotangent):
            _, pullback = jax.vjp(functools.partial(ops.attention, causal=True), q, k, v)
            return pullback(cotangent)

        vjp_of_row = self.variant(vjp_of_row)
        for row in (0, 2, 5):
            cot = np.zeros((b, t, h, 6), np.float32)
            cot[:, row] = rand(10 + row, (b, h, 6))  # one-hot in the query position
            gq, gk, gv = (np.asarray(g_) for g_ in vjp_of_row(q, k, v, cot))
            chex.assert_shape([gq, gk, gv], [q.shape, k.shape, v.shape])
            # Exactly zero for every input after the query (and other query rows).
            np.testing.assert_array_equal(gk[:, row + 1:], 0.0)
            np.testing.assert_array_equal(gv[:, row + 1:], 0.0)
            np.testing.assert_array_equal(np.delete(gq, row, axis=1), 0.0)
            # Nonzero for every key/value at or before it. (With a single visible key the
            # softmax is constant, so k and q only get a gradient once there are two.)
            for j in range(row + 1):
                self.assertGreater(np.abs(gv[:, j]).min(axis=(-1, -2)).min(), 0.0)
                if row > 0:
                    self.assertGreater(np.abs(gk[:, j]).sum(axis=(-1, -2)).min(), 0.0)
            if row > 0:
                self.assertGreater(np.abs(gq[:, row]).sum(axis=(-1, -2)).min(), 0.0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_sliding_window_causal(self):
        b, t, w = 2, 6, 3
        q, k, v = qkv(4)
        attn = self.variant(functools.partial(ops.attention, causal=True, sliding_window=w))
        out = np.asarray(attn(q, k, v))
        qp, kp = arange_positions(b, t, t)
        want = ref_attention(q, k, v, ref_mask(qp, kp, causal=True, window=w))
        chex.assert_trees_all_close(out, want, **F32_TOL)
        # Replace key/value 1 by something far away: query p sees it iff p - w < 1 <= p.
        j0 = 1
        k2, v2 = k.copy(), v.copy()
        k2[:, j0] = rand(5, k2[:, j0].shape, 1e3)
        v2[:, j0] = rand(6, v2[:, j0].shape, 1e3)
        out2 = np.asarray(attn(q, k2, v2))
        for p in range(t):
            sees = p - w < j0 <= p
            same = np.array_equal(out2[:, p], out[:, p])
            self.assertEqual(same, not sees, msg=f"query {p}, window {w}, key {j0}")
        # A window as long as the sequence is plain causal attention.
        chex.assert_trees_all_close(
            jit_attention(q, k, v, causal=True, sliding_window=t),
            ref_attention(q, k, v, ref_mask(qp, kp, causal=True)), **F32_TOL)

    @chex.variants(with_jit=True, without_jit=True)
    def test_sliding_window_bidirectional(self):
        # Without causal the window is symmetric: |p - kpos| < w (the op's docstring).
        b, t, w = 2, 6, 2
        q, k, v = qkv(7)
        out = self.variant(functools.partial(ops.attention, sliding_window=w))(q, k, v)
        qp, kp = arange_positions(b, t, t)
        want = ref_attention(q, k, v, ref_mask(qp, kp, window=w))
        chex.assert_trees_all_close(out, want, **F32_TOL)

    @chex.variants(with_jit=True, without_jit=True)
    def test_segment_ids(self):
        b, t = 2, 6
        q, k, v = qkv(8)
        seg = np.array([[0, 0, 1, 1, 2, 2], [5, 5, 5, 5, 7, 7]], np.int32)

        def attn(q, k, v, seg):
            return ops.attention(q, k, v, causal=True, q_segment_ids=seg, kv_segment_ids=seg)

        attn = self.variant(attn)
        out = np.asarray(attn(q, k, v, seg))
        qp, kp = arange_positions(b, t, t)
        want = ref_attention(q, k, v, ref_mask(qp, kp, causal=True, q_seg=seg, kv_seg=seg))
        chex.assert_trees_all_close(out, want, **F32_TOL)
        # Rewriting every token of segment 1 (row 0) changes nothing outside it.
        other = seg[0] == 1
        q2, k2, v2 = q.copy(), k.copy(), v.copy()
        q2[0, other] = rand(9, q2[0, other].shape, 10.0)
        k2[0, other] = rand(10, k2[0, other].shape, 10.0)
        v2[0, other] = rand(11, v2[0, other].shape, 10.0)
        out2 = np.asarray(attn(q2, k2, v2, seg))
        np.testing.assert_array_equal(out2[0, ~other], out[0, ~other])
        np.testing.assert_array_equal(out2[1], out[1])
        self.assertFalse(np.allclose(out2[0, other], out[0, other]))
        # Each packed segment equals causal attention run on that segment alone.
        for bi in range(b):
            for sid in np.unique(seg[bi]):
                sl = seg[bi] == sid
                alone = jit_attention(q[bi:bi + 1, sl], k[bi:bi + 1, sl], v[bi:bi + 1, sl],
                                      causal=True)
                chex.assert_trees_all_close(out[bi:bi + 1, sl], alone, **F32_TOL)

    @chex.variants(with_jit=True, without_jit=True)
    def test_kv_lengths(self):
        b, t, s = 2, 3, 6
        q, k, v = qkv(12, t=t, s=s)
        lengths = np.array([4, 2], np.int32)
        attn = self.variant(lambda q, k, v, n: ops.attention(q, k, v, kv_lengths=n))
        out = np.asarray(attn(q, k, v, lengths))
        qp, kp = arange_positions(b, t, s)
        want = ref_attention(q, k, v, ref_mask(qp, kp, lengths=lengths))
        chex.assert_trees_all_close(out, want, **F32_TOL)
        # Poison the unfilled slots with large finite numbers: nothing changes.
        kp_, vp_ = k.copy(), v.copy()
        for bi, n in enumerate(lengths):
            kp_[bi, n:] = rand(13 + bi, kp_[bi, n:].shape, 1e4)
            vp_[bi, n:] = rand(15 + bi, vp_[bi, n:].shape, 1e4)
        np.testing.assert_array_equal(np.asarray(attn(q, kp_, vp_, lengths)), out)
        # And equals attention over the truncated keys.
        n = lengths[0]
        chex.assert_trees_all_close(out[:1], jit_attention(q[:1], k[:1, :n], v[:1, :n]),
                                    **F32_TOL)

    @chex.variants(with_jit=True, without_jit=True)
    def test_decode_with_explicit_positions(self):
        b, s, h = 2, 6, 4
        q, k, v = qkv(17)
        full = np.asarray(jit_attention(q, k, v, causal=True))
        chex.assert_trees_all_close(  # the full computation itself is right
            full, ref_attention(q, k, v, ref_mask(*arange_positions(b, s, s), causal=True)),
            **F32_TOL)

        def decode(q1, k, v, qpos, kpos, n):
            return ops.attention(q1, k, v, causal=True, q_positions=qpos, kv_positions=kpos,
                                 kv_lengths=n)

        decode = self.variant(decode)
        kpos = np.tile(np.arange(s, dtype=np.int32), (b, 1))
        for p in (0, 3, s - 1):
            qpos = np.full((b, 1), p, np.int32)
            # Cache slots after p hold junk: causal masking by position hides them ...
            kj, vj = k.copy(), v.copy()
            kj[:, p + 1:] = rand(18, kj[:, p + 1:].shape, 1e3)
            vj[:, p + 1:] = rand(19, vj[:, p + 1:].shape, 1e3)
            out = decode(q[:, p:p + 1], kj, vj, qpos, kpos, np.full((b,), s, np.int32))
            chex.assert_shape(out, (b, 1, h, 6))
            chex.assert_trees_all_close(out, full[:, p:p + 1], **F32_TOL)
            # ... and so does kv_lengths = p + 1, at positions shifted by 100.
            n = np.full((b,), p + 1, np.int32)
            out = decode(q[:, p:p + 1], kj, vj, qpos + 100, kpos + 100, n)
            want = ref_attention(q[:, p:p + 1], kj, vj,
                                 ref_mask(qpos + 100, kpos + 100, causal=True, lengths=n))
            chex.assert_trees_all_close(out, want, **F32_TOL)
            chex.assert_trees_all_close(out, full[:, p:p + 1], **F32_TOL)
        # Aligned default (no positions): a single query is the last position.
        last = self.variant(functools.partial(ops.attention, causal=True))(q[:, -1:], k, v)
        chex.assert_trees_all_close(last, full[:, -1:], **F32_TOL)

    @chex.variants(with_jit=True, without_jit=True)
    def test_softcap(self):
        cap = 1.5
        q, k, v = qkv(20, scale=2.0)  # logits well beyond the cap
        out = self.variant(functools.partial(ops.attention, causal=True, softcap=cap))(q, k, v)
        mask = ref_mask(*arange_positions(2, 6, 6), causal=True)
        chex.assert_trees_all_close(out, ref_attention(q, k, v, mask, softcap=cap), **F32_TOL)
        uncapped = ref_attention(q, k, v, mask)
        self.assertGreater(np.abs(np.asarray(out) - uncapped).max(), 1e-2)
        x = np.array([-30.0, -0.5, 0.5, 30.0], np.float32)
        chex.assert_trees_all_close(self.variant(ops.soft_cap, static_argnums=1)(x, 5.0),
                                    5.0 * np.tanh(x / 5.0), rtol=1e-6, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_alibi_bias(self):
        b, t, s, h = 2, 4, 6, 4
        slopes = np.array([1.0, 0.5, 0.25, 0.125], np.float32)
        rng = np.random.default_rng(21)
        qpos = rng.integers(0, 50, (b, t)).astype(np.int32)
        kpos = rng.integers(0, 50, (b, s)).astype(np.int32)
        bias = self.variant(ops.alibi_bias)(slopes, qpos, kpos)
        chex.assert_shape(bias, (b, h, t, s))
        chex.assert_trees_all_close(bias, ref_alibi(slopes, qpos, kpos), rtol=1e-6, atol=0)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("bidirectional", False), ("causal", True))
    def test_alibi_attention(self, causal):
        b, t = 2, 6
        q, k, v = qkv(22)
        slopes = np.array([1.0, 0.5, 0.25, 0.125], np.float32)
        attn = self.variant(lambda q, k, v, m: ops.attention(q, k, v, causal=causal,
                                                              alibi_slopes=m))
        out = attn(q, k, v, slopes)
        qp, kp = arange_positions(b, t, t)
        mask = ref_mask(qp, kp, causal=causal)
        want = ref_attention(q, k, v, mask, bias=ref_alibi(slopes, qp, kp))
        chex.assert_trees_all_close(out, want, **F32_TOL)
        self.assertGreater(np.abs(np.asarray(out) - ref_attention(q, k, v, mask)).max(), 1e-2)

    @chex.variants(with_jit=True, without_jit=True)
    def test_scale(self):
        q, k, v = qkv(23)
        mask = ref_mask(*arange_positions(2, 6, 6), causal=True)
        out = self.variant(functools.partial(ops.attention, causal=True, scale=0.9))(q, k, v)
        chex.assert_trees_all_close(out, ref_attention(q, k, v, mask, scale=0.9), **F32_TOL)
        default = self.variant(functools.partial(ops.attention, causal=True))(q, k, v)
        chex.assert_trees_all_close(default, ref_attention(q, k, v, mask, scale=8 ** -0.5),
                                    **F32_TOL)
        self.assertGreater(np.abs(np.asarray(out) - np.asarray(default)).max(), 1e-2)

    @chex.variants(with_jit=True, without_jit=True)
    def test_fully_masked_rows_are_zero(self):
        b, t, s = 2, 3, 6
        q, k, v = qkv(24, t=t, s=s)
        # Batch 0 has no filled slots; query 1 of batch 1 is a segment found in no key.
        lengths = np.array([0, 6], np.int32)
        qseg = np.array([[0, 0, 0], [0, 9, 1]], np.int32)
        kseg = np.array([[0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1]], np.int32)

        def attn(q, k, v):
            return ops.attention(q, k, v, kv_lengths=lengths, q_segment_ids=qseg,
                                 kv_segment_ids=kseg)

        out = np.asarray(self.variant(attn)(q, k, v))
        self.assertTrue(np.isfinite(out).all())
        np.testing.assert_array_equal(out[0], 0.0)
        np.testing.assert_array_equal(out[1, 1], 0.0)
        qp, kp = arange_positions(b, t, s)
        want = ref_attention(q, k, v, ref_mask(qp, kp, q_seg=qseg, kv_seg=kseg,
                                                lengths=lengths))
        chex.assert_trees_all_close(out, want, **F32_TOL)

    def test_fully_masked_rows_have_finite_gradients(self):
        q, k, v = qkv(24, t=3)
        lengths = np.array([0, 6], np.int32)
        grads = jax.jit(jax.grad(
            lambda q, k, v: ops.attention(q, k, v, causal=True, kv_lengths=lengths).sum(),
            argnums=(0, 1, 2)))(q, k, v)
        chex.assert_tree_all_finite(grads)
        for g_ in grads:  # batch 0 sees nothing, so nothing flows back into it
            np.testing.assert_array_equal(np.asarray(g_)[0], 0.0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_bfloat16(self):
        q, k, v = qkv(25)
        attn = self.variant(functools.partial(ops.attention, causal=True))
        out = attn(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
        chex.assert_type(out, jnp.bfloat16)
        chex.assert_shape(out, (2, 6, 4, 6))
        want = ref_attention(q, k, v, ref_mask(*arange_positions(2, 6, 6), causal=True))
        chex.assert_trees_all_close(np.asarray(out).astype(np.float32), want, **BF16_TOL)

    @chex.variants(with_jit=True, without_jit=True)
    def test_gradients_match_reference(self):
        q, k, v, kw, proj, want = gradient_case()

        def loss_op(q, k, v):
            return jnp.sum(ops.attention(q, k, v, **kw) * proj)

        got = self.variant(jax.grad(loss_op, argnums=(0, 1, 2)))(q, k, v)
        chex.assert_trees_all_equal_shapes(got, (q, k, v))
        chex.assert_trees_all_close(got, want, **GRAD_TOL)

    @chex.variants(with_jit=True, without_jit=True)
    def test_attention_mask(self):
        b, t, s, w = 2, 5, 7, 3
        rng = np.random.default_rng(28)
        qpos = rng.integers(0, 12, (b, t)).astype(np.int32)
        kpos = rng.integers(0, 12, (b, s)).astype(np.int32)
        qseg = rng.integers(0, 2, (b, t)).astype(np.int32)
        kseg = rng.integers(0, 2, (b, s)).astype(np.int32)
        lengths = np.array([7, 4], np.int32)
        for causal in (False, True):
            fn = self.variant(lambda qp, kp, qs, ks, n: ops.attention_mask(
                qp, kp, causal=causal, sliding_window=w, q_segment_ids=qs, kv_segment_ids=ks,
                kv_lengths=n))
            got = fn(qpos, kpos, qseg, kseg, lengths)
            chex.assert_shape(got, (b, t, s))
            np.testing.assert_array_equal(
                got, ref_mask(qpos, kpos, causal=causal, window=w, q_seg=qseg, kv_seg=kseg,
                              lengths=lengths))


class AttentionErrorsTest(parameterized.TestCase):

    def test_heads_not_divisible(self):
        q, k, v = qkv(30, h=6, kh=4)
        with self.assertRaisesRegex(ValueError, "multiple of kv heads"):
            ops.attention(q, k, v)

    @parameterized.named_parameters(
        ("k_v_length_differ", (2, 6, 4, 8), (2, 6, 2, 8), (2, 5, 2, 8)),
        ("k_v_heads_differ", (2, 6, 4, 8), (2, 6, 2, 8), (2, 6, 1, 8)),
        ("batch_differs", (2, 6, 4, 8), (3, 6, 2, 8), (3, 6, 2, 8)),
        ("head_dim_differs", (2, 6, 4, 8), (2, 6, 2, 6), (2, 6, 2, 8)),
        ("rank", (2, 6, 32), (2, 6, 2, 8), (2, 6, 2, 8)))
    def test_mismatched_shapes(self, qs, ks, vs):
        with self.assertRaises(ValueError):
            ops.attention(rand(31, qs), rand(32, ks), rand(33, vs))

    def test_unknown_implementation(self):
        with self.assertRaisesRegex(ValueError, "implementation"):
            ops.attention(*qkv(34), implementation="flash")

    def test_bad_arguments(self):
        q, k, v = qkv(35)
        with self.assertRaisesRegex(ValueError, "sliding_window"):
            ops.attention(q, k, v, sliding_window=0)
        with self.assertRaisesRegex(ValueError, "alibi_slopes"):
            ops.attention(q, k, v, alibi_slopes=jnp.ones((3,)))
        with self.assertRaisesRegex(ValueError, "segment"):
            ops.attention(q, k, v, q_segment_ids=jnp.zeros((2, 6), jnp.int32))
        with self.assertRaisesRegex(ValueError, "cudnn"):  # rejected before any GPU call
            ops.attention(q, k, v, softcap=5.0, implementation="cudnn")
