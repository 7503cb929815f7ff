"""jaxlm.ops.peft against plain numpy: LoRA deltas (one adapter, per-row stacks), merging,
PEFT's initialisation, bottleneck adapters, and the shared-prefix attention mask."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.test_util import check_grads

from jaxlm import ops
from jaxlm.ops import peft as P

RNG = np.random.default_rng(0)


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def np_delta(x, a, b, s):
    """s·(x·A)·B with A, B flattened to matrices: the textbook formula."""
    n_in = a.ndim - 1
    xa = x.reshape(*x.shape[:x.ndim - n_in], -1) @ a.reshape(-1, a.shape[-1])
    return s * (xa @ b.reshape(b.shape[0], -1)).reshape(*xa.shape[:-1], *b.shape[1:])


def test_lora_scale_follows_peft():
    assert P.lora_scale(8, 16) == 2.0
    assert P.lora_scale(16, 8, rslora=True) == 8 / 4
    with pytest.raises(ValueError, match="rank must be >= 1"):
        P.lora_scale(0, 8)


@pytest.mark.parametrize("in_shape,out_shape", [((12,), (3, 5)), ((3, 4), (7,))])
def test_lora_delta_equals_plain_matmuls(in_shape, out_shape):
    x, a, b = rand(2, 5, *in_shape), rand(*in_shape, 4), rand(4, *out_shape)
    got = P.lora_delta(jnp.asarray(x), a, b, 0.7)
    np.testing.assert_allclose(got, np_delta(x, a, b, 0.7), rtol=1e-5, atol=1e-5)
    # as a weight: x·(s·A·B) is the same delta, and merge/unmerge moves W by it
    w = rand(*in_shape, *out_shape)
    n = len(in_shape)
    contract = lambda x, w: np.tensordot(x, w, axes=(tuple(range(x.ndim - n, x.ndim)),  # noqa
                                                      tuple(range(n))))
    merged = np.asarray(P.merge_lora(w, a, b, 0.7))
    np.testing.assert_allclose(contract(x, merged), contract(x, w) + np_delta(x, a, b, 0.7),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(P.merge_lora(merged, a, b, -0.7), w, atol=1e-5)


def test_weight_delta_with_leading_expert_dims():
    a, b = rand(3, 6, 2), rand(3, 2, 5)                  # experts e=3: A [e,in,r], B [e,r,out]
    got = np.asarray(P.lora_weight_delta(a, b, 1.5, lead=1))
    for j in range(3):
        np.testing.assert_allclose(got[j], 1.5 * a[j] @ b[j], rtol=1e-5, atol=1e-6)


def test_per_row_adapters_equal_each_adapter_alone():
    """Rows pick adapters from a stack zero-padded to the largest rank; −1 means none."""
    x = rand(4, 3, 8)
    small = (rand(8, 2), rand(2, 6))                     # rank 2
    big = (rand(8, 5), rand(5, 6))                       # rank 5
    a = np.zeros((2, 8, 5), np.float32)
    b = np.zeros((2, 5, 6), np.float32)
    a[0, :, :2], b[0, :2] = small
    a[1], b[1] = big
    scales = (2.0, 0.5)
    ids = jnp.array([1, -1, 0, 1])
    got = np.asarray(P.lora_delta_rows(jnp.asarray(x), a, b, scales, ids))
    want = [np_delta(x[0], *big, 0.5), np.zeros((3, 6)), np_delta(x[2], *small, 2.0),
            np_delta(x[3], *big, 0.5)]
    np.testing.assert_allclose(got, np.stack(want), rtol=1e-5, atol=1e-5)


def test_lora_gradients_are_the_chain_rule():
    """d/dA and d/dB of Σ g·delta equal the hand-derived s·xᵀ(g Bᵀ) and s·(xA)ᵀ g, and
    jax's gradients pass a numerical check."""
    x, a, b, g = rand(6, 8), rand(8, 3), rand(3, 5), rand(6, 5)
    s = 0.25
    ga, gb = jax.grad(lambda a, b: jnp.sum(P.lora_delta(jnp.asarray(x), a, b, s) * g),
                      argnums=(0, 1))(a, b)
    np.testing.assert_allclose(ga, s * x.T @ (g @ b.T), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gb, s * (x @ a).T @ g, rtol=1e-4, atol=1e-4)
    check_grads(lambda a, b: P.lora_delta(jnp.asarray(x), a, b, s),
                (jnp.asarray(a), jnp.asarray(b)), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


def test_kaiming_uniform_matches_torch_bound_and_spread():
    """PEFT initialises A with torch's kaiming_uniform_(a=sqrt(5)): U(±1/sqrt(fan_in))."""
    fan_in = 64
    ours = np.asarray(P.kaiming_uniform(jax.random.key(0), (256, fan_in), fan_in))
    ref = torch.empty(256, fan_in)
    torch.nn.init.kaiming_uniform_(ref, a=math.sqrt(5))
    ref = ref.numpy()
    bound = 1 / math.sqrt(fan_in)
    assert np.abs(ours).max() <= bound and np.abs(ref).max() <= bound
    assert np.abs(ours).max() > 0.99 * bound
    # both are U(-bound, bound): std bound/sqrt(3) (16k samples: within 2%)
    for sample in (ours, ref):
        assert abs(sample.std() / (bound / math.sqrt(3)) - 1) < 0.02
        assert abs(sample.mean()) < 0.02 * bound


def test_bottleneck_equals_numpy_and_rows_pick_their_own():
    x = rand(3, 4, 8)
    down, bd, up, bu = rand(8, 3), rand(3), rand(3, 8), rand(8)
    relu = lambda h: np.maximum(h, 0)  # noqa: E731
    want = x + relu(x @ down + bd) @ up + bu
    got = P.bottleneck(jnp.asarray(x), down, up, "relu", bd, bu)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # stacked: adapter 1 is narrower (dim 2, zero-padded), row 1 has none
    d2, bd2, u2, bu2 = rand(8, 2), rand(2), rand(2, 8), rand(8)
    stack = lambda p, q: np.stack([p, np.pad(q, [(0, p.shape[i] - q.shape[i])  # noqa: E731
                                                 for i in range(q.ndim)])])
    got = P.bottleneck_rows(jnp.asarray(x), stack(down, d2), stack(up, u2), "relu",
                            stack(bd, bd2), np.stack([bu, bu2]), jnp.array([0, -1, 1]))
    want2 = x[2] + relu(x[2] @ d2 + bd2) @ u2 + bu2
    np.testing.assert_allclose(got, np.stack([want[0], x[1], want2]), rtol=1e-5, atol=1e-5)


def test_negative_kv_segment_is_seen_by_every_segment():
    """Prefix tuning's virtual tokens carry segment −1: every packed document sees them,
    documents still do not see each other."""
    q_seg = jnp.array([[0, 0, 1, 1]])
    kv_seg = jnp.array([[-1, -1, 0, 0, 1, 1]])
    q_pos = jnp.array([[2, 3, 2, 3]])
    kv_pos = jnp.array([[0, 1, 2, 3, 2, 3]])
    mask = np.asarray(ops.attention_mask(q_pos, kv_pos, causal=True, q_segment_ids=q_seg,
                                         kv_segment_ids=kv_seg))[0]
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0],
                                         [1, 1, 0, 0, 1, 0], [1, 1, 0, 0, 1, 1]])
