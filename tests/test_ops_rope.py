"""ops.rope: rotations against explicit rotation matrices, the relative-position property,
the two layouts, partial rotary, and the scaled frequencies against Hugging Face's
`ROPE_INIT_FUNCTIONS` (an independent implementation of the same published recipes)."""
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import transformers
from absl.testing import parameterized
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from jaxlm import ops

F32_TOL = dict(rtol=1e-5, atol=1e-5)
FREQ_TOL = dict(rtol=2e-6, atol=0)  # inverse frequencies span 1 .. 1e-6: relative only

# Frequencies outside the variant tests go through one jit (a compile per setting) rather
# than eager dispatch (a compile per primitive): it keeps the file fast.
jit_rope_frequencies = jax.jit(ops.rope_frequencies, static_argnums=(0, 1, 2))


def rand(seed, shape, scale=1.0):
    return np.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, np.float32)


def ref_inv_freq(rotary_dim, theta):
    return np.array([theta ** (-(2 * i) / rotary_dim) for i in range(rotary_dim // 2)])


def pairs(rotary_dim, layout):
    half = rotary_dim // 2
    if layout == "half":
        return [(i, i + half) for i in range(half)]
    return [(2 * i, 2 * i + 1) for i in range(half)]


def ref_rope(x, positions, inv_freq, layout, attention_factor=1.0):
    """Multiply every head vector by the block rotation matrix of its position."""
    x = np.asarray(x, np.float64)
    b, t, h, d = x.shape
    out = np.empty_like(x)
    for bi in range(b):
        for ti in range(t):
            rot = np.eye(d)
            for i, (a, c) in enumerate(pairs(2 * len(inv_freq), layout)):
                angle = float(positions[bi, ti]) * float(inv_freq[i])
                cos, sin = math.cos(angle) * attention_factor, math.sin(angle) * attention_factor
                rot[a, a], rot[a, c], rot[c, a], rot[c, c] = cos, -sin, sin, cos
            for hi in range(h):
                out[bi, ti, hi] = rot @ x[bi, ti, hi]
    return out.astype(np.float32)


def rotate(x, positions, rotary_dim, layout, theta=10000.0):
    inv_freq, _ = ops.rope_frequencies(rotary_dim, theta)
    cos, sin = ops.rope_cos_sin(positions, inv_freq)
    return ops.apply_rope(x, cos, sin, layout=layout)


class RopeTest(chex.TestCase):
    """x is [b,t,h,d] = [2,4,2,16] throughout, so eager dispatch compiles few shapes."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_default_frequencies_and_cos_sin(self):
        r, theta = 16, 10000.0
        inv_freq, factor = self.variant(ops.rope_frequencies, static_argnums=(0, 1))(r, theta)
        chex.assert_shape(inv_freq, (r // 2,))
        chex.assert_trees_all_close(inv_freq, ref_inv_freq(r, theta), **FREQ_TOL)
        self.assertEqual(factor, 1.0)
        positions = np.random.default_rng(0).integers(0, 300, (2, 4)).astype(np.int32)
        cos, sin = self.variant(ops.rope_cos_sin, static_argnums=2)(positions, inv_freq, 0.7)
        chex.assert_shape([cos, sin], [(2, 4, r // 2)] * 2)
        angles = positions[..., None].astype(np.float64) * ref_inv_freq(r, theta)
        chex.assert_trees_all_close((cos, sin), (0.7 * np.cos(angles), 0.7 * np.sin(angles)),
                                    rtol=1e-5, atol=5e-5)  # angles up to ~300 rad in float32

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(layout=("half", "interleaved"), partial=(False, True))
    def test_apply_rope_matches_rotation_matrix(self, layout, partial):
        b, t, h, d = 2, 4, 2, 16
        r = 8 if partial else d
        x = rand(1, (b, t, h, d))
        positions = np.random.default_rng(2).integers(0, 40, (b, t))
        inv_freq = ref_inv_freq(r, 10000.0)
        angles = positions[..., None] * inv_freq
        cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
        out = self.variant(functools.partial(ops.apply_rope, layout=layout))(x, cos, sin)
        chex.assert_shape(out, x.shape)
        chex.assert_type(out, jnp.float32)
        chex.assert_trees_all_close(out, ref_rope(x, positions, inv_freq, layout), **F32_TOL)
        # Partial rotary: the tail passes through untouched, bit for bit.
        np.testing.assert_array_equal(np.asarray(out)[..., r:], x[..., r:])

    @chex.variants(with_jit=True, without_jit=True)
    def test_end_to_end_with_attention_factor(self):
        # rope_frequencies -> rope_cos_sin(attention_factor) -> apply_rope, as a model uses it.
        b, t, h, d, r = 2, 4, 2, 16, 8
        x = rand(3, (b, t, h, d))
        positions = np.array([[0, 7, 100, 4095], [1, 2, 3, 2048]], np.int32)
        sc = ops.RopeScaling(kind="yarn", factor=4.0, original_max_position=1024)
        inv_freq, attn = jit_rope_frequencies(r, 10000.0, sc)
        attn = float(attn)

        def fn(x, positions, inv_freq):
            cos, sin = ops.rope_cos_sin(positions, inv_freq, attn)
            return ops.apply_rope(x, cos, sin)

        out = self.variant(fn)(x, positions, inv_freq)
        want = ref_rope(x, positions, np.asarray(inv_freq, np.float64), "half", attn)
        chex.assert_trees_all_close(out, want, rtol=1e-5, atol=5e-5)
        np.testing.assert_array_equal(np.asarray(out)[..., r:], x[..., r:])

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("half", "half"), ("interleaved", "interleaved"))
    def test_dot_product_depends_only_on_relative_position(self, layout):
        d = 16
        q, k = rand(4, (2, d)), rand(5, (2, d))  # one vector per head
        # Four (p, p') pairs; row 0 holds them as they are, row 1 shifted by delta.
        base_q, base_k = np.array([3, 10, 0, 7]), np.array([1, 10, 5, 2])
        rot = self.variant(functools.partial(rotate, rotary_dim=d, layout=layout))
        xq, xk = np.broadcast_to(q, (2, 4, 2, d)), np.broadcast_to(k, (2, 4, 2, d))
        for delta in (1, 13, 250):
            qpos = np.stack([base_q, base_q + delta]).astype(np.int32)
            kpos = np.stack([base_k, base_k + delta]).astype(np.int32)
            rq, rk = np.asarray(rot(xq, qpos)), np.asarray(rot(xk, kpos))
            dots = (rq * rk).sum(-1)  # [2 rows, 4 pairs, 2 heads]
            chex.assert_trees_all_close(dots[1], dots[0], rtol=1e-4, atol=1e-4)
        # ... and does depend on it: the four relative offsets give four different scores.
        self.assertGreater(np.ptp(dots[0], axis=0).min(), 1e-2)
        # Rotation preserves norms.
        chex.assert_trees_all_close(np.linalg.norm(rq, axis=-1),
                                    np.broadcast_to(np.linalg.norm(q, axis=-1), (2, 4, 2)),
                                    rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("full", 16), ("partial", 8))
    def test_interleaved_is_half_up_to_a_permutation(self, r):
        b, t, h, d = 2, 4, 2, 16
        x = rand(6, (b, t, h, d))
        positions = np.random.default_rng(7).integers(0, 100, (b, t)).astype(np.int32)
        # De-interleave the rotated features: (x0, x1, x2, x3, ..) -> (x0, x2, .., x1, x3, ..).
        perm = np.concatenate([np.arange(0, r, 2), np.arange(1, r, 2), np.arange(r, d)])
        inverse = np.argsort(perm)
        half = self.variant(functools.partial(rotate, rotary_dim=r, layout="half"))
        inter = self.variant(functools.partial(rotate, rotary_dim=r, layout="interleaved"))
        got_inter = inter(x, positions)
        got_half = np.asarray(half(x[..., perm], positions))[..., inverse]
        chex.assert_trees_all_close(got_inter, got_half, rtol=1e-6, atol=1e-6)
        # The two layouts really differ on the same input.
        self.assertGreater(np.abs(np.asarray(half(x, positions)) - np.asarray(got_inter)).max(),
                           1e-2)

    @chex.variants(with_jit=True, without_jit=True)
    def test_bfloat16_keeps_dtype(self):
        x = rand(8, (2, 4, 2, 16))
        positions = np.array([[0, 5, 9, 30], [2, 3, 4, 5]], np.int32)
        rot = self.variant(functools.partial(rotate, rotary_dim=8, layout="half"))
        out = rot(x.astype(jnp.bfloat16), positions)
        chex.assert_type(out, jnp.bfloat16)
        # bf16 keeps 8 mantissa bits: compare with the float32 rotation loosely.
        want = ref_rope(x, positions, ref_inv_freq(8, 10000.0), "half")
        chex.assert_trees_all_close(np.asarray(out).astype(np.float32), want,
                                    rtol=2e-2, atol=2e-2)
        np.testing.assert_array_equal(np.asarray(out[..., 8:]),
                                      np.asarray(x.astype(jnp.bfloat16)[..., 8:]))

    def test_errors(self):
        x = rand(9, (1, 2, 1, 8))
        cos = sin = np.ones((1, 2, 4), np.float32)
        with self.assertRaisesRegex(ValueError, "layout"):
            ops.apply_rope(x, cos, sin, layout="neox")
        with self.assertRaisesRegex(ValueError, "rotary_dim"):
            ops.apply_rope(x, np.ones((1, 2, 5), np.float32), np.ones((1, 2, 5), np.float32))
        with self.assertRaisesRegex(ValueError, "even"):
            ops.rope_frequencies(7, 10000.0)
        with self.assertRaisesRegex(ValueError, "kind"):
            ops.RopeScaling(kind="ntk")
        with self.assertRaisesRegex(ValueError, "original_max_position"):
            ops.RopeScaling(kind="yarn", factor=4.0)
        with self.assertRaisesRegex(ValueError, "factor"):
            ops.RopeScaling(kind="linear", factor=0.0)


def hf_reference(head_dim, max_position, rope_parameters, seq_len=None):
    config = transformers.LlamaConfig(
        hidden_size=2 * head_dim, num_attention_heads=2, num_key_value_heads=2,
        head_dim=head_dim, max_position_embeddings=max_position,
        rope_parameters=rope_parameters)
    inv_freq, factor = ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](
        config, "cpu", seq_len=seq_len)
    return inv_freq.numpy(), float(factor)


# (name, head_dim, rotary_dim, max_position_embeddings, HF rope_parameters, RopeScaling)
HF_CASES = (
    ("linear", 64, 64, 8192,
     dict(rope_type="linear", rope_theta=10000.0, factor=4.0),
     ops.RopeScaling(kind="linear", factor=4.0)),
    ("linear_partial", 64, 32, 8192,
     dict(rope_type="linear", rope_theta=10000.0, factor=2.5, partial_rotary_factor=0.5),
     ops.RopeScaling(kind="linear", factor=2.5)),
    ("llama3", 128, 128, 131072,
     dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
          high_freq_factor=4.0, original_max_position_embeddings=8192),
     ops.RopeScaling(kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position=8192)),
    ("llama3_2", 64, 64, 131072,
     dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
          high_freq_factor=4.0, original_max_position_embeddings=8192),
     ops.RopeScaling(kind="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position=8192)),
    ("llama3_other_bands", 64, 64, 16384,
     dict(rope_type="llama3", rope_theta=10000.0, factor=4.0, low_freq_factor=2.0,
          high_freq_factor=8.0, original_max_position_embeddings=4096),
     ops.RopeScaling(kind="llama3", factor=4.0, low_freq_factor=2.0, high_freq_factor=8.0,
                     original_max_position=4096)),
    ("yarn", 64, 64, 16384,
     dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
          original_max_position_embeddings=4096),
     ops.RopeScaling(kind="yarn", factor=4.0, original_max_position=4096)),
    ("yarn_deepseek_v3", 64, 64, 163840,
     dict(rope_type="yarn", rope_theta=10000.0, factor=40.0, beta_fast=32.0, beta_slow=1.0,
          mscale=1.0, mscale_all_dim=1.0, original_max_position_embeddings=4096),
     ops.RopeScaling(kind="yarn", factor=40.0, beta_fast=32.0, beta_slow=1.0, mscale=1.0,
                     mscale_all_dim=1.0, original_max_position=4096)),
    ("yarn_mscale_ratio", 64, 64, 163840,
     dict(rope_type="yarn", rope_theta=10000.0, factor=40.0, mscale=1.0, mscale_all_dim=0.5,
          original_max_position_embeddings=4096),
     ops.RopeScaling(kind="yarn", factor=40.0, mscale=1.0, mscale_all_dim=0.5,
                     original_max_position=4096)),
    ("yarn_attention_factor", 64, 64, 32768,
     dict(rope_type="yarn", rope_theta=1000000.0, factor=8.0, attention_factor=0.9,
          original_max_position_embeddings=4096),
     ops.RopeScaling(kind="yarn", factor=8.0, attention_factor=0.9,
                     original_max_position=4096)),
    ("yarn_no_truncate_partial", 64, 32, 131072,
     dict(rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=16.0, beta_slow=2.0,
          truncate=False, partial_rotary_factor=0.5, original_max_position_embeddings=4096),
     ops.RopeScaling(kind="yarn", factor=32.0, beta_fast=16.0, beta_slow=2.0, truncate=False,
                     original_max_position=4096)),
)


class RopeScalingTest(chex.TestCase):

    @parameterized.named_parameters(*HF_CASES)
    def test_matches_transformers(self, head_dim, rotary_dim, max_position, hf_params, sc):
        want_freq, want_factor = hf_reference(head_dim, max_position, hf_params)
        inv_freq, factor = jit_rope_frequencies(rotary_dim, hf_params["rope_theta"], sc)
        chex.assert_shape(inv_freq, want_freq.shape)
        chex.assert_trees_all_close(inv_freq, want_freq, **FREQ_TOL)
        np.testing.assert_allclose(float(factor), want_factor, rtol=1e-7)
        if sc.kind != "linear":
            # The case reaches every branch of the recipe: transformers leaves some
            # frequencies alone, divides some by the factor and blends the rest (a case
            # that missed a branch would pass without testing it).
            ratio = ref_inv_freq(rotary_dim, hf_params["rope_theta"]) / want_freq
            kept, divided = np.isclose(ratio, 1, rtol=1e-5), np.isclose(ratio, sc.factor,
                                                                        rtol=1e-5)
            self.assertTrue(kept.any() and divided.any() and not (kept | divided).all(),
                            msg=str(ratio))

    @chex.variants(with_jit=True, without_jit=True)
    def test_dynamic_matches_transformers(self):
        l0, r, theta = 2048, 64, 10000.0
        sc = ops.RopeScaling(kind="dynamic", factor=2.0, original_max_position=l0)
        params = dict(rope_type="dynamic", rope_theta=theta, factor=2.0)
        # seq_len is traced under jit, as in a decode loop.
        freq = self.variant(lambda n: ops.rope_frequencies(r, theta, sc, seq_len=n)[0])
        for seq_len in (100, l0, 3000, 16384):
            want, want_factor = hf_reference(r, l0, params, seq_len=seq_len)
            self.assertEqual(want_factor, 1.0)
            chex.assert_trees_all_close(freq(jnp.int32(seq_len)), want, **FREQ_TOL)
        # No seq_len: the pretraining length, i.e. unscaled.
        want, _ = hf_reference(r, l0, params, seq_len=None)
        chex.assert_trees_all_close(jit_rope_frequencies(r, theta, sc)[0], want, **FREQ_TOL)

    def test_yarn_mscale_matches_deepseek(self):
        # DeepSeek-V2/V3 attention multiplies its softmax scale by the square of this;
        # the reference is transformers' own modeling code.
        try:   # transformers ≥ 5.25 moved it into its shared RoPE utilities
            from transformers.modeling_rope_utils import yarn_get_mscale
        except ImportError:
            from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_get_mscale
        for scale, m in ((1.0, 1.0), (0.5, 1.0), (4.0, 1.0), (40.0, 0.707), (8.0, 2.0)):
            self.assertAlmostEqual(ops.yarn_mscale(scale, m), yarn_get_mscale(scale, m),
                                   places=12)
