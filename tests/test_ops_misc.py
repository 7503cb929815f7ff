"""ops.norms, ops.activations and ops.positional against formulas written out here
(and torch.nn.functional where it has the same function)."""
import functools
import math

import chex
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from absl.testing import parameterized

from jaxlm import ops

F32_TOL = dict(rtol=1e-5, atol=1e-6)
BF16_TOL = dict(rtol=2e-2, atol=2e-2)


def rand(seed, shape, scale=1.0, shift=0.0):
    return np.asarray(np.random.default_rng(seed).standard_normal(shape) * scale + shift,
                      np.float32)


def torch_ref(fn, *xs):
    return fn(*(torch.from_numpy(np.asarray(x)) for x in xs)).numpy()


class NormsTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("plain", False, 0.0, 1e-6), ("weight", True, 0.0, 1e-6),
        ("gemma_offset", True, 1.0, 1e-6), ("large_eps", True, 0.0, 0.5))
    def test_rms_norm(self, use_weight, offset, eps):
        x = rand(0, (2, 3, 16), scale=3.0, shift=0.5)
        w = rand(1, (16,)) if use_weight else None
        fn = self.variant(functools.partial(ops.rms_norm, eps=eps, weight_offset=offset))
        out = fn(x, w)
        chex.assert_shape(out, x.shape)
        chex.assert_type(out, jnp.float32)
        want = np.empty(x.shape)
        for idx in np.ndindex(*x.shape[:-1]):
            row = x[idx].astype(np.float64)
            want[idx] = row / math.sqrt(sum(v * v for v in row) / len(row) + eps)
            if use_weight:
                want[idx] *= w.astype(np.float64) + offset
        chex.assert_trees_all_close(out, want, **F32_TOL)
        if offset == 0.0:
            tw = None if w is None else torch.from_numpy(w)
            chex.assert_trees_all_close(
                out, F.rms_norm(torch.from_numpy(x), (16,), tw, eps=eps).numpy(), **F32_TOL)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("plain", False, False, 1e-5), ("affine", True, True, 1e-5),
        ("weight_only", True, False, 1e-5), ("large_eps", True, True, 0.3))
    def test_layer_norm(self, use_weight, use_bias, eps):
        x = rand(2, (2, 3, 16), scale=2.0, shift=-1.5)
        w = rand(3, (16,)) if use_weight else None
        bias = rand(4, (16,)) if use_bias else None
        out = self.variant(functools.partial(ops.layer_norm, eps=eps))(x, w, bias)
        chex.assert_shape(out, x.shape)
        want = np.empty(x.shape)
        for idx in np.ndindex(*x.shape[:-1]):
            row = x[idx].astype(np.float64)
            mean = sum(row) / len(row)
            var = sum((v - mean) ** 2 for v in row) / len(row)
            want[idx] = (row - mean) / math.sqrt(var + eps)
            if use_weight:
                want[idx] *= w
            if use_bias:
                want[idx] += bias
        chex.assert_trees_all_close(out, want, **F32_TOL)
        tw, tb = (None if a is None else torch.from_numpy(a) for a in (w, bias))
        chex.assert_trees_all_close(
            out, F.layer_norm(torch.from_numpy(x), (16,), tw, tb, eps=eps).numpy(), **F32_TOL)

    @chex.variants(with_jit=True, without_jit=True)
    def test_bfloat16_in_bfloat16_out(self):
        x = rand(5, (2, 16), scale=3.0)
        w, bias = rand(6, (16,)), rand(7, (16,))
        xb = x.astype(jnp.bfloat16)
        x_rounded = xb.astype(np.float32)
        rms = self.variant(functools.partial(ops.rms_norm, weight_offset=1.0))(xb, w)
        ln = self.variant(ops.layer_norm)(xb, w, bias)
        chex.assert_type([rms, ln], [jnp.bfloat16, jnp.bfloat16])
        rms_want = (x_rounded / np.sqrt((x_rounded ** 2).mean(-1, keepdims=True) + 1e-6)
                    * (w + 1.0))
        mean = x_rounded.mean(-1, keepdims=True)
        ln_want = ((x_rounded - mean) / np.sqrt(((x_rounded - mean) ** 2).mean(-1, keepdims=True)
                                                + 1e-5) * w + bias)
        chex.assert_trees_all_close((np.asarray(rms).astype(np.float32),
                                     np.asarray(ln).astype(np.float32)),
                                    (rms_want, ln_want), **BF16_TOL)


def gelu_exact(x):
    return np.array([v * 0.5 * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x.ravel()]
                    ).reshape(x.shape)


def gelu_tanh(x):
    x = x.astype(np.float64)
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def silu(x):
    x = x.astype(np.float64)
    return x / (1.0 + np.exp(-x))


class ActivationsTest(chex.TestCase):

    X = np.concatenate([rand(8, (61,), scale=3.0), np.array([0.0, -8.0, 8.0], np.float32)])

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("relu", "relu", lambda x: np.maximum(x, 0.0), F.relu),
        ("gelu", "gelu", gelu_exact, F.gelu),
        ("gelu_tanh", "gelu_tanh", gelu_tanh, functools.partial(F.gelu, approximate="tanh")),
        ("silu", "silu", silu, F.silu))
    def test_activation(self, name, formula, torch_fn):
        x = self.X
        out = self.variant(getattr(ops, name))(x)
        chex.assert_shape(out, x.shape)
        chex.assert_trees_all_close(out, formula(x), **F32_TOL)
        chex.assert_trees_all_close(out, torch_ref(torch_fn, x), **F32_TOL)
        self.assertIs(ops.get_activation(name), getattr(ops, name))

    @chex.variants(with_jit=True, without_jit=True)
    def test_gated(self):
        gate, up = rand(9, (4, 12), scale=2.0), rand(10, (4, 12))
        swiglu = self.variant(ops.swiglu)(gate, up)
        chex.assert_trees_all_close(swiglu, silu(gate) * up, **F32_TOL)
        chex.assert_trees_all_close(swiglu, torch_ref(lambda g, u: F.silu(g) * u, gate, up),
                                    **F32_TOL)
        geglu = self.variant(ops.geglu)(gate, up)  # tanh approximation by default
        chex.assert_trees_all_close(geglu, gelu_tanh(gate) * up, **F32_TOL)
        geglu_exact = self.variant(functools.partial(ops.geglu, approximate=False))(gate, up)
        chex.assert_trees_all_close(geglu_exact, gelu_exact(gate) * up, **F32_TOL)
        for name, formula in (("relu", lambda x: np.maximum(x, 0.0)), ("gelu", gelu_exact)):
            out = self.variant(functools.partial(ops.glu, activation=name))(gate, up)
            chex.assert_shape(out, gate.shape)
            chex.assert_trees_all_close(out, formula(gate) * up, **F32_TOL)

    def test_unknown_activation(self):
        with self.assertRaisesRegex(ValueError, "activation"):
            ops.get_activation("swish2")


class PositionalTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("default", 16, 10000.0), ("short_timescale", 10, 100.0))
    def test_sinusoidal(self, dim, timescale):
        positions = np.array([[0, 1, 2, 17], [5, 63, 64, 200]], np.int32)
        out = self.variant(functools.partial(ops.sinusoidal_positions, dim=dim,
                                             max_timescale=timescale))(positions)
        chex.assert_shape(out, (2, 4, dim))
        want = np.zeros((2, 4, dim))
        half = dim // 2
        for b in range(2):
            for t in range(4):
                p = float(positions[b, t])
                for i in range(half):
                    want[b, t, i] = math.sin(p / timescale ** (i / half))
                    want[b, t, half + i] = math.cos(p / timescale ** (i / half))
        chex.assert_trees_all_close(out, want, rtol=1e-5, atol=2e-5)  # angles up to 200 rad

    def test_sinusoidal_odd_dim(self):
        with self.assertRaisesRegex(ValueError, "even"):
            ops.sinusoidal_positions(np.arange(3), 7)

    @parameterized.parameters(1, 2, 6, 8, 12, 16, 24)
    def test_alibi_slopes_match_paper(self, n):
        # Reference code from the ALiBi paper's repository (ofirpress/attention_with_linear_biases).
        def get_slopes(n):
            def get_slopes_power_of_2(n):
                start = 2 ** (-2 ** -(math.log2(n) - 3))
                ratio = start
                return [start * ratio ** i for i in range(n)]

            if math.log2(n).is_integer():
                return get_slopes_power_of_2(n)
            closest_power_of_2 = 2 ** math.floor(math.log2(n))
            return (get_slopes_power_of_2(closest_power_of_2)
                    + get_slopes(2 * closest_power_of_2)[0::2][:n - closest_power_of_2])

        slopes = ops.alibi_slopes(n)
        chex.assert_shape(slopes, (n,))
        chex.assert_type(slopes, jnp.float32)
        chex.assert_trees_all_close(slopes, np.array(get_slopes(n)), rtol=1e-6, atol=0)

    def test_alibi_slopes_closed_forms(self):
        # Powers of two: 2^(-8i/n), i = 1..n.
        chex.assert_trees_all_close(ops.alibi_slopes(8), 2.0 ** -np.arange(1.0, 9.0),
                                    rtol=1e-6, atol=0)
        # n = 6: the 4 slopes of n=4, then the first 2 of every other slope of n=8.
        chex.assert_trees_all_close(
            ops.alibi_slopes(6), 2.0 ** -np.array([2.0, 4.0, 6.0, 8.0, 1.0, 3.0]),
            rtol=1e-6, atol=0)
        with self.assertRaisesRegex(ValueError, "num_heads"):
            ops.alibi_slopes(0)
