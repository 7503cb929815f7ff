"""Speculative decoding's maths: verifying draft tokens against the target model, and
proposing drafts by n-gram lookup. Pure functions of arrays and explicit keys.

Verification (Leviathan et al. 2023; Chen et al. 2023): draft token d_j, drawn from the
draft's distribution q_j, is accepted with probability min(1, p_j(d_j) / q_j(d_j)) where
p_j is the target's distribution at that position; at the first rejection the next token
is drawn from norm(max(0, p_j − q_j)), and when all γ drafts are accepted a bonus token is
drawn from p_γ. Every emitted token is then distributed exactly as the target's. Drafts
that come without probabilities (n-gram lookup, a top-1 chain of heads) use q = one-hot,
which the same rule covers: accept with probability p_j(d_j), else draw from p_j with d_j
removed. p and q must come from the same sampling filters (temperature, top-k/p, min-p).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .sampling import greedy, probabilities


def greedy_accept(drafts, target_tokens):
    """Greedy verification: drafts [b,γ] against the target's argmax at each of the γ+1
    verified positions [b,γ+1]. (accepted count n [b], the token after them [b]): the
    target's own choice at the first mismatch, or its bonus token when all match."""
    match = drafts == target_tokens[:, :drafts.shape[1]]
    n = jnp.sum(jnp.cumprod(match.astype(jnp.int32), axis=1), axis=1)
    return n, jnp.take_along_axis(target_tokens, n[:, None], axis=1)[:, 0]


def rejection_accept(key, drafts, p, q=None):
    """The rejection rule. drafts [b,γ]; p [b,γ+1,v] the target's (filtered) distributions
    at the verified positions; q [b,γ,v] the draft's, or None for one-hot drafts.
    (accepted count n [b], the token after them [b])."""
    b, g = drafts.shape
    u_key, r_key = jax.random.split(key)
    p_d = jnp.take_along_axis(p[:, :g], drafts[..., None], axis=-1)[..., 0]        # [b,γ]
    q_d = (jnp.ones_like(p_d) if q is None else
           jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0])
    u = jax.random.uniform(u_key, (b, g))
    ok = u * q_d < p_d                              # u < p/q, with q(d) > 0 for a drawn d
    n = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
    p_n = jnp.take_along_axis(p, n[:, None, None], axis=1)[:, 0]                  # [b,v]
    at = jnp.minimum(n, g - 1)[:, None]
    if q is None:
        q_n = jax.nn.one_hot(jnp.take_along_axis(drafts, at, axis=1)[:, 0], p.shape[-1],
                             dtype=p.dtype)
    else:
        q_n = jnp.take_along_axis(q, at[..., None], axis=1)[:, 0]
    q_n = jnp.where((n < g)[:, None], q_n, 0.0)     # all accepted: the bonus draws from p_γ
    residual = jnp.maximum(p_n - q_n, 0.0)
    # A rejection has probability 0 when p = q; rounding can still produce one: draw from p.
    residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, p_n)
    return n, jax.random.categorical(r_key, jnp.log(residual), axis=-1).astype(jnp.int32)


def accept(key, drafts, target_logits, sampling=None, q=None):
    """Verify drafts [b,γ] against target logits [b,γ+1,v] under `sampling` (None or
    temperature 0: greedy). Returns (n [b], next token [b])."""
    if sampling is None or sampling.greedy:
        return greedy_accept(drafts, greedy(target_logits))
    return rejection_accept(key, drafts, probabilities(target_logits, sampling), q)


def ngram_propose(history, lengths, max_ngram: int, n_draft: int):
    """Prompt lookup (Saxena 2023): the tokens that followed the most recent earlier
    occurrence of the row's last n tokens, for the largest n <= max_ngram that occurs.

    history [b,S] token ids at positions 0..; lengths [b] how many are real (the last one
    is the newest token). Returns (drafts [b,γ], found [b]); rows with no match get their
    last token repeated (any draft is exact; a bad one is only rejected)."""
    b, s = history.shape
    pos = jnp.arange(s, dtype=jnp.int32)
    last = lengths - 1
    best = jnp.full((b,), -1, jnp.int32)
    for n in range(max_ngram, 0, -1):
        match = (pos[None] < last[:, None]) & (pos[None] >= n - 1) & (last >= n - 1)[:, None]
        for i in range(n):   # history[p - i] == history[last - i]
            tail = jnp.take_along_axis(history, jnp.maximum(last - i, 0)[:, None], axis=1)
            match &= jnp.roll(history, i, axis=1) == tail
        latest = jnp.max(jnp.where(match, pos[None], -1), axis=1)
        best = jnp.where(best < 0, latest, best)
    found = best >= 0
    idx = jnp.where(found, best + 1, last)[:, None] + jnp.arange(n_draft, dtype=jnp.int32)
    idx = jnp.minimum(idx, last[:, None])   # past the newest token nothing is known yet
    return jnp.take_along_axis(history, idx, axis=1), found
