"""Next-token sampling: pure functions of logits and an explicit PRNG key.

The filters run in the usual order (as transformers' and vLLM's samplers do):

    logits / temperature → top-k → top-p (nucleus) → min-p → sample

Each filter keeps the tokens it allows and sets the rest to -inf, so any combination is
the composition of the ones switched on. Temperature 0 (or no Sampling at all) is greedy.

Two ways to the same distribution:
  * `filter_logits` works on the whole vocabulary [b,v] (plain, the reference);
  * `sample` works on a sorted candidate list (the top k, or the whole vocabulary sorted
    when only top-p/min-p are on), which is what the decode loop runs every step.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to pick the next token. Hashable, so jitted loops take it as a static argument.

    temperature: 0 → greedy (argmax); otherwise logits are divided by it.
    top_k: keep the k most likely tokens (None or 0 → off).
    top_p: keep the smallest set of most likely tokens whose mass reaches p (1 → off).
    min_p: keep tokens with probability >= min_p × the top token's (0 → off).
    """
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"Sampling.temperature must be >= 0 (0 = greedy), "
                             f"got {self.temperature}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise ValueError(f"Sampling.top_k must be a positive int (or None/0 for off), "
                             f"got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"Sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"Sampling.min_p must be in [0, 1], got {self.min_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_top_p(self) -> bool:
        return self.top_p is not None and self.top_p < 1

    @property
    def uses_min_p(self) -> bool:
        return self.min_p is not None and self.min_p > 0


def greedy(logits):
    """argmax over the last axis (first index among ties): [..., v] → [...] int32.

    Written as a max and a min over indices where the max is reached: two plain
    reductions that XLA vectorises, where argmax's paired (value, index) reduction runs
    several times slower on CPU (0.6 ms of a 9 ms decode step at batch 8, vocab 32000).
    A row holding NaN has no index equal to its max and gets index 0."""
    v = logits.shape[-1]
    top = jnp.max(logits, axis=-1, keepdims=True)
    idx = jnp.min(jnp.where(logits == top, jnp.arange(v, dtype=jnp.int32), v), axis=-1)
    return jnp.where(idx == v, 0, idx).astype(jnp.int32)


def apply_temperature(logits, temperature: float):
    return logits.astype(jnp.float32) / temperature


def top_k_logits(logits, k: int):
    """Keep exactly the k largest logits of each row [b,v] (ties: lower index first)."""
    k = min(k, logits.shape[-1])
    _, idx = jax.lax.top_k(logits, k)
    keep = jnp.zeros(logits.shape, bool)
    keep = jax.vmap(lambda row, i: row.at[i].set(True))(keep.reshape(-1, logits.shape[-1]),
                                                        idx.reshape(-1, k)).reshape(logits.shape)
    return jnp.where(keep, logits, NEG_INF)


def _nucleus_keep_sorted(sorted_logits, p: float):
    """keep [..., n] for logits sorted descending: a token stays while the mass of the
    tokens before it is still below p, so the first token always stays."""
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    return before < p


def top_p_logits(logits, p: float):
    """Keep the smallest most-likely set whose probability mass reaches p (per row)."""
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    keep_sorted = _nucleus_keep_sorted(sorted_logits, p)
    # Undo the sort: scatter each sorted position's verdict back to its token.
    keep = jnp.zeros(logits.shape, bool)
    keep = jax.vmap(lambda row, i, kp: row.at[i].set(kp))(
        keep.reshape(-1, logits.shape[-1]), order.reshape(-1, logits.shape[-1]),
        keep_sorted.reshape(-1, logits.shape[-1])).reshape(logits.shape)
    return jnp.where(keep, logits, NEG_INF)


def min_p_logits(logits, min_p: float):
    """Keep tokens whose probability is at least min_p times the most likely token's."""
    probs = jax.nn.softmax(logits, axis=-1)
    keep = probs >= min_p * jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(keep, logits, NEG_INF)


def filter_logits(logits, sampling: Sampling):
    """The whole-vocabulary reference: temperature, then top-k, top-p, min-p ([b,v])."""
    logits = apply_temperature(logits, sampling.temperature)
    if sampling.top_k:
        logits = top_k_logits(logits, sampling.top_k)
    if sampling.uses_top_p:
        logits = top_p_logits(logits, sampling.top_p)
    if sampling.uses_min_p:
        logits = min_p_logits(logits, sampling.min_p)
    return logits


def probabilities(logits, sampling: Sampling | None):
    """The distribution `sample` draws from, [b,v] (one-hot at the argmax when greedy)."""
    if sampling is None or sampling.greedy:
        return jax.nn.one_hot(greedy(logits), logits.shape[-1], dtype=jnp.float32)
    return jax.nn.softmax(filter_logits(logits, sampling), axis=-1)


def sample(key, logits, sampling: Sampling | None = None):
    """Draw one token per row from logits [b,v] → [b] int32. sampling=None is greedy.

    Works on a sorted candidate list: lax.top_k when top_k is set (cheap), a full sort only
    when top-p or min-p need one without it, and no sort at all for plain temperature."""
    if sampling is None or sampling.greedy:
        return greedy(logits)
    logits = apply_temperature(logits, sampling.temperature)
    v = logits.shape[-1]
    if sampling.top_k and sampling.top_k < v:
        cand, idx = jax.lax.top_k(logits, sampling.top_k)
    elif sampling.uses_top_p or sampling.uses_min_p:
        cand, idx = jax.lax.top_k(logits, v)  # a full descending sort
    else:
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
    if sampling.uses_top_p:
        cand = jnp.where(_nucleus_keep_sorted(cand, sampling.top_p), cand, NEG_INF)
    if sampling.uses_min_p:
        cand = min_p_logits(cand, sampling.min_p)
    choice = jax.random.categorical(key, cand, axis=-1)
    return jnp.take_along_axis(idx, choice[..., None], axis=-1)[..., 0].astype(jnp.int32)


def sample_rows(keys, logits, temperature, top_k, top_p, min_p):
    """Each row with its own settings, as a server batches requests: keys [b] (one PRNG
    key per row), logits [b,v], temperature/top_p/min_p float [b], top_k int [b] (0: off).
    Temperature 0 is greedy for that row. The same filters in the same order as `sample`
    (temperature → top-k → top-p → min-p), written over one full descending sort because
    the settings are data here, not static, so each row's k is a mask on the sorted list.
    When every row is greedy the sort is skipped at run time (lax.cond)."""
    def draw(_):
        cand, idx = _filtered_rows(logits, temperature, top_k, top_p, min_p)
        choice = jax.vmap(jax.random.categorical)(keys, cand)
        drawn = jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy(logits))
    return jax.lax.cond(jnp.any(temperature > 0), draw, lambda _: greedy(logits), None)


def _filtered_rows(logits, temperature, top_k, top_p, min_p):
    """Each row's logits after its own temperature → top-k → top-p → min-p, in descending
    order: (filtered logits [b,v] (NEG_INF where dropped), their token ids [b,v])."""
    t = jnp.where(temperature > 0, temperature, 1.0)[:, None]
    cand, idx = jax.lax.top_k(logits.astype(jnp.float32) / t, logits.shape[-1])
    rank = jnp.arange(cand.shape[-1])[None]
    keep = (top_k[:, None] <= 0) | (rank < top_k[:, None])
    probs = jax.nn.softmax(jnp.where(keep, cand, NEG_INF), axis=-1)
    # top_p >= 1 is off: the mass before a tail token may round up to 1.0.
    keep &= ((jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]) | (top_p[:, None] >= 1)
    # p_i / p_max = exp(l_i - l_max) whatever the normalisation, as min_p_logits keeps.
    keep &= jnp.exp(cand - cand[:, :1]) >= min_p[:, None]
    return jnp.where(keep, cand, NEG_INF), idx


def probabilities_rows(logits, temperature, top_k, top_p, min_p):
    """The distributions sample_rows draws from, [b,v] in token order (rows with
    temperature 0 get their temperature-1 filtered distribution: callers treat greedy
    rows apart). What speculative verification needs per row."""
    cand, idx = _filtered_rows(logits, temperature, top_k, top_p, min_p)
    rows = jnp.arange(logits.shape[0])[:, None]
    return jnp.zeros(cand.shape, jnp.float32).at[rows, idx].set(jax.nn.softmax(cand, -1))
