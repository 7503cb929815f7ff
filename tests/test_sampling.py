"""Sampling: the filters against plain numpy references, and the sampler's draws against
the distribution they define (counts over many keys, not just shapes)."""
from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import ops
from jaxlm.ops.sampling import Sampling, greedy, probabilities, sample

V = 12
LOGITS = np.array([[2.0, 1.5, 1.4, 0.3, 0.2, 0.1, -0.5, -1.0, -1.2, -2.0, -3.0, 0.9],
                   [0.0, 0.1, 3.0, -1.0, 2.5, 0.4, 0.3, -0.2, 1.0, 1.1, -4.0, 0.05]],
                  np.float32)
DRAWS = 20000


def softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x[np.isfinite(x)].max())
    e[~np.isfinite(x)] = 0.0
    return e / e.sum()


def reference_probs(row, temperature=1.0, top_k=None, top_p=None, min_p=None):
    """Plain per-row pipeline: temperature → top-k → top-p → min-p → renormalise."""
    x = np.asarray(row, np.float64) / temperature
    order = sorted(range(len(x)), key=lambda i: (-x[i], i))
    keep = np.ones(len(x), bool)
    if top_k:
        keep[:] = False
        keep[order[:top_k]] = True
    if top_p is not None:
        p = softmax(np.where(keep, x, -np.inf))
        mass, nucleus = 0.0, np.zeros(len(x), bool)
        for i in order:
            if keep[i] and mass < top_p:
                nucleus[i] = True
                mass += p[i]
        keep &= nucleus
    if min_p is not None:
        p = softmax(np.where(keep, x, -np.inf))
        keep &= p >= min_p * p.max()
    return softmax(np.where(keep, x, -np.inf))


@partial(jax.jit, static_argnums=(2, 3))
def _draw(logits, seed, sampling, n):
    keys = jax.random.split(jax.random.key(seed), n)
    return jax.vmap(lambda k: sample(k, logits, sampling))(keys)


jsample = jax.jit(sample, static_argnums=2)


def draw(sampling, logits=LOGITS, n=DRAWS, seed=0):
    """n draws for every row of logits: [n, b]."""
    return np.asarray(_draw(jnp.asarray(logits), seed, sampling, n))


def frequencies(tokens, v=V):
    """[n, b] draws → [b, v] empirical distribution."""
    return np.stack([np.bincount(tokens[:, r], minlength=v) / len(tokens)
                     for r in range(tokens.shape[1])])


# `sample` draws from sorted candidates, `probabilities` filters the whole vocabulary:
# both are held to the same plain reference, so they agree with each other too.
CASES = [Sampling(0.7), Sampling(1.3, top_k=3), Sampling(1.0, top_p=0.8),
         Sampling(0.8, min_p=0.2), Sampling(1.2, top_k=5, top_p=0.7, min_p=0.3)]


@pytest.mark.parametrize("sampling", CASES, ids=str)
def test_filters_and_draws_match_plain_reference(sampling):
    want = np.stack([reference_probs(r, sampling.temperature, sampling.top_k, sampling.top_p,
                                     sampling.min_p) for r in LOGITS])
    got = np.asarray(jax.jit(probabilities, static_argnums=1)(jnp.asarray(LOGITS), sampling))
    np.testing.assert_allclose(got, want, atol=1e-6)
    counts = frequencies(draw(sampling))
    assert np.all(counts[want == 0] == 0), "a filtered-out token was drawn"
    # 20k draws: a frequency's standard error is at most 0.0035; allow ~5 sigma.
    np.testing.assert_allclose(counts, want, atol=0.018)


def test_top_k_never_emits_outside_the_k_largest():
    logits = jax.random.normal(jax.random.key(1), (4, 200)) * 3
    tokens = draw(Sampling(2.0, top_k=7), logits, n=4000)
    top = np.argsort(-np.asarray(logits), axis=-1)[:, :7]
    for r in range(4):
        assert set(tokens[:, r]) <= set(top[r])
    assert all(len(set(tokens[:, r])) == 7 for r in range(4))  # and does use all k


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = jax.random.normal(jax.random.key(2), (3, 50)) * 2
    top_p = jax.jit(ops.top_p_logits)
    for p in (0.1, 0.5, 0.9, 1.0):
        kept = np.isfinite(np.asarray(top_p(logits, p)))
        probs = np.asarray(jax.nn.softmax(logits, -1))
        for r in range(3):
            order = np.argsort(-probs[r])
            n = kept[r].sum()
            assert set(np.flatnonzero(kept[r])) == set(order[:n])  # the most likely n
            assert probs[r][order[:n]].sum() >= p - 1e-6           # reaching p
            assert n == 1 or probs[r][order[:n - 1]].sum() < p     # and no more than needed
        if p == 0.5:
            tokens = draw(Sampling(1.0, top_p=p), logits, n=2000)
            for r in range(3):
                assert set(tokens[:, r]) <= set(np.flatnonzero(kept[r]))


def test_min_p_keeps_tokens_near_the_top():
    logits = jnp.asarray(LOGITS)
    kept = np.isfinite(np.asarray(ops.min_p_logits(logits, 0.25)))
    probs = np.asarray(jax.nn.softmax(logits, -1))
    np.testing.assert_array_equal(kept, probs >= 0.25 * probs.max(-1, keepdims=True))


def test_temperature_to_zero_is_greedy():
    logits = jax.random.normal(jax.random.key(3), (6, 300))
    want = np.asarray(jax.jit(greedy)(logits))
    for t in (1e-4,):
        np.testing.assert_array_equal(draw(Sampling(t), logits, n=100), np.tile(want, (100, 1)))
    np.testing.assert_array_equal(jsample(jax.random.key(0), logits, Sampling(0.0)), want)
    np.testing.assert_array_equal(jsample(jax.random.key(0), logits, None), want)
    np.testing.assert_array_equal(want, np.argmax(np.asarray(logits), -1))


def test_same_key_same_tokens_and_keys_matter():
    logits = jax.random.normal(jax.random.key(4), (8, 500))
    s = Sampling(1.0, top_p=0.95)
    a = jsample(jax.random.key(7), logits, s)
    chex.assert_trees_all_equal(a, jsample(jax.random.key(7), logits, s))
    assert not np.array_equal(a, jsample(jax.random.key(8), logits, s))
    chex.assert_shape(a, (8,))
    assert a.dtype == jnp.int32


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"), (dict(min_p=2.0), "min_p")])
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"Sampling.{field}"):
        Sampling(**kwargs)
