"""Speculative decoding inside the paged scheduler's continuous batch: every draft source
of jaxlm.infer.speculative, per row, over page pools (infer/scheduler.py runs these).

While every sequence decodes, one device call is `rounds` verification rounds in a
fori_loop (`speculate`). Each round a row drafts γ tokens, feeds its newest token and them
(γ+1 tokens; fewer where its pages end) through the target, and RowSampling.verify decides
with the row's own settings how many it accepts (greedy: plain greedy's tokens; sampled:
the target's distribution, by the rejection rule). The sources:

  * lookup: the tokens that followed the latest earlier occurrence of the row's last n
    tokens in its prompt and output (ops.speculative.ngram_propose), on the device.
  * draft: a smaller model with page pools of its own, indexed by the same block tables
    (a row's page j holds the draft's K/V of the same positions), so prefix sharing,
    copy-on-write and preemption need nothing more. The mixed step runs it over every
    token the target takes in; each round it feeds the γ+1 tokens one at a time, drawing
    each draft from its own filtered distribution q (greedy rows: its argmax), which
    verification then uses.
  * medusa: the model's Medusa heads on the hidden state that produced the row's newest
    token, top-1 each. Every call (the mixed step's or a round's) returns the drafts for
    the row's next round with its tokens, and the scheduler keeps them with the row.
  * mtp: the model's MTP modules as a top-1 chain, each with a one-layer page pool of its
    own: module k reads module k−1's hidden state and the embedding of the token k+1
    ahead (known tokens, then this call's new token and drafts). The mixed step runs the
    chain over every token it takes in; each round reruns it over the verified window,
    rewriting the window's slots (the target's rule for rejected drafts), as
    infer/speculative.py's _mtp_drafts does for the dense cache.

A draft model's (or MTP module's) slots under a prefix adapter's virtual tokens are
empty (the target's virtual K/V mean nothing to it): drafts are worse there, never wrong.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.model.cache import PageIndex, PagedRows
from jaxlm.model.peft import PeftInputs
from jaxlm.ops.sampling import greedy, probabilities_rows
from jaxlm.ops.speculative import ngram_propose

from .forward import LayerGraphs, loop_weights, outer_model, paged_hidden
from .rows import RowSampling, peft_inputs, pinned, put


@dataclasses.dataclass(frozen=True)
class SpecProgram:
    """The static half of a scheduler's speculation (hashable: part of the compiled
    program's key). dgraphs: the draft model's graphs (source "draft")."""
    source: str
    n_draft: int
    ngram: int = 3
    dgraphs: LayerGraphs | None = None

    @property
    def carries_drafts(self) -> bool:
        """Whether a row's next drafts come out of the call that made its newest token."""
        return self.source in ("medusa", "mtp")


@functools.partial(jax.tree_util.register_dataclass, data_fields=[
    "history", "lengths", "tables", "limits", "sampling", "adapters", "drafts"],
    meta_fields=[])
@dataclasses.dataclass
class SpecInputs:
    """Speculative rounds for every decoding row: each row's tokens by position (prompt
    and output; its newest token at lengths-1 is not in the cache yet), its pages, how
    many slots they hold (writes and drafts stop there), and (medusa, mtp) the drafts
    made with its newest token."""
    history: jax.Array       # [n, H] (-1 past the row's tokens)
    lengths: jax.Array       # [n] tokens known (0: idle row)
    tables: jax.Array        # [n, p]
    limits: jax.Array        # [n]
    sampling: RowSampling
    adapters: jax.Array | None = None   # [n]
    drafts: jax.Array | None = None     # [n, γ]

    @classmethod
    def empty(cls, n: int, width: int, history: int, n_draft: int,
              stacked: bool = False) -> "SpecInputs":
        zeros = lambda: np.zeros(n, np.int32)  # noqa: E731
        return cls(np.full((n, history), -1, np.int32), zeros(),
                   np.zeros((n, width), np.int32), zeros(), RowSampling.empty(n),
                   np.full(n, -1, np.int32) if stacked else None,
                   np.zeros((n, n_draft), np.int32))


def _at(x, idx):
    """x [n,w,...] at per-row index idx [n] → [n,...]."""
    return jnp.take_along_axis(x, idx.reshape(-1, *(1,) * (x.ndim - 1)), axis=1)[:, 0]


def _medusa(lm, h, g: int):
    """Top-1 of Medusa heads 1..γ on h [n,d] → [n,γ]."""
    return greedy(lm.medusa_logits(h[:, None])[:g, :, 0]).T


def _mtp_module(lm, k: int, h, tokens, positions, pool, pages, peft):
    """MTP module k over one packed step: h [1,T,d], tokens [T] (the ones k+1 ahead),
    positions [1,T], peft: each token's stacked adapter (a module may carry one). (h^k
    [1,T,d], the module's pool)."""
    rope, alibi = lm.position_signals(positions)
    h, pool, _ = lm.mtp[k](h, lm.embed(tokens[None]), positions, rope=rope, alibi=alibi,
                           kv=pool, pages=pages, peft=peft)
    return h, pool


def mixed_extras(graphs, spec: SpecProgram, weights, h, x, sampled, aux_weights, aux_pools):
    """The mixed step's part of speculation, after its target forward (h [1,T,d]) and its
    sampled tokens [n]: the draft model over the same tokens (its pools), or the rows'
    next drafts [n,γ] (medusa, mtp; zeros otherwise). (drafts, aux_pools)."""
    n, g = sampled.shape[0], spec.n_draft
    drafts = jnp.zeros((n, g), jnp.int32)
    if spec.source == "draft":
        _, aux_pools = paged_hidden(spec.dgraphs, aux_weights, x.tokens[None],
                                    x.positions[None], aux_pools, x.pages)
    elif spec.source == "medusa":
        drafts = _medusa(outer_model(graphs, weights), h[0, x.last], g)
    elif spec.source == "mtp":
        # ahead[k][i]: the token k+1 after token i where the host knows it, else -(1+j):
        # the row's j-th new token (0 the one just sampled, j >= 1 the chain's draft j)
        lm, new, layers = outer_model(graphs, weights), sampled[:, None], []
        row = jnp.minimum(x.row_of, n - 1)
        peft = peft_inputs(x.adapters)
        head = peft_inputs(None if x.adapters is None else x.adapters[x.last])
        for k in range(g):
            a = x.ahead[k]
            tokens = jnp.where(a >= 0, a, new[row, jnp.clip(-a - 1, 0, k)])
            h, pool = _mtp_module(lm, k, h, tokens, x.positions[None], aux_pools[k], x.pages,
                                  peft)
            layers.append(pool)
            d = greedy(lm.mtp_logits(k, h[:, x.last], head)[0])
            new = jnp.concatenate([new, d[:, None]], axis=1)
        drafts, aux_pools = new[:, 1:], tuple(layers)
    return drafts, aux_pools


def _draft_propose(spec: SpecProgram, dweights, pools, last, pos, slots, x, live, offset):
    """γ drafts from the draft model, feeding γ+1 tokens one at a time at positions
    pos [n,γ+1] (writing slots [n,γ+1]; -1 none), so its pages hold every token the
    target may accept. Sampled rows draw each draft from the draft's distribution under
    the row's own settings, greedy rows take its argmax. (drafts [n,γ], q [n,γ,v],
    pools)."""
    g, s = spec.n_draft, x.sampling
    hot = s.temperature > 0
    keys = s.keys(offset)
    lm = outer_model(spec.dgraphs, dweights)

    def step(carry, j):
        pools, token = carry
        p = pos[:, j]
        index = PageIndex(slots[:, j], (PagedRows(
            x.tables, jnp.where(live, jnp.minimum(p + 1, x.limits), 0), 1),))
        h, pools = paged_hidden(spec.dgraphs, dweights, token[None], p[None], pools, index)
        logits = lm.project(h)[0]

        def sampled(_):
            q = probabilities_rows(logits, s.temperature, s.top_k, s.top_p, s.min_p)
            d = jax.vmap(lambda k, qi: jax.random.categorical(
                jax.random.fold_in(k, 2 + j), jnp.log(qi)))(keys, q).astype(jnp.int32)
            return jnp.where(hot, d, greedy(logits)), q
        d, q = jax.lax.cond(jnp.any(hot), sampled,
                            lambda _: (greedy(logits), jnp.zeros(logits.shape, jnp.float32)),
                            None)
        return (pinned(spec.dgraphs, pools), d), (d, q)

    (pools, _), (d, q) = jax.lax.scan(step, (pools, last), jnp.arange(g + 1))
    return d[:g].T, jnp.moveaxis(q[:g], 0, 1), pools


def _mtp_round(lm, spec: SpecProgram, h, emitted, e, pos, index, pools, adapters):
    """The MTP chain over a round's window (n rows × w = γ+1 positions, packed as the
    target's step; h [1,n·w,d] the target's hidden states): module k takes the token k+1
    ahead of each window position: the row's emitted tokens (its first e [n]), then this
    chain's drafts. Draft k is module k at window index e−1. adapters: each row's stacked
    adapter [n] or None. (drafts [n,γ], pools)."""
    n, w = emitted.shape
    j = jnp.arange(w, dtype=jnp.int32)[None]
    at = jnp.maximum(e - 1, 0)
    drafts, layers = [], []
    peft = peft_inputs(None if adapters is None else jnp.repeat(adapters, w))
    head = None if adapters is None else PeftInputs(ids=adapters[:, None])
    for k in range(spec.n_draft):
        if k == 0:
            tokens = emitted
        else:
            ext = jnp.concatenate([emitted, jnp.stack(drafts, axis=1)], axis=1)
            src = jnp.where(j + k < e[:, None], j + k, w + j + k - e[:, None])
            tokens = jnp.take_along_axis(ext, jnp.clip(src, 0, w + k - 1), axis=1)
        h, pool = _mtp_module(lm, k, h, tokens.reshape(-1), pos.reshape(1, -1), pools[k],
                              index, peft)
        layers.append(pool)
        drafts.append(greedy(lm.mtp_logits(k, _at(h[0].reshape(n, w, -1), at)[:, None],
                                           head)[:, 0]))
    return jnp.stack(drafts, axis=1), tuple(layers) + tuple(pools[spec.n_draft:])


def speculate(graphs, spec: SpecProgram, rounds: int, weights, pools, x: SpecInputs,
              aux_weights, aux_pools):
    """`rounds` speculative rounds in one fori_loop (see the module docstring); the
    emitted tokens join each row's history and the next round starts from them, so a
    host round trip carries up to rounds·(γ+1) tokens per row. Returns ((tokens
    [n, rounds·(γ+1)], counts [n], drafted [n], accepted [n], rounds taken [n], the
    rows' next drafts [n,γ]), pools, aux_pools); the host keeps each row's tokens up to
    its first finish."""
    z = pools[0][0].shape[1]
    n, g = x.lengths.shape[0], spec.n_draft
    cols = jnp.arange(g + 1, dtype=jnp.int32)[None]
    peft = peft_inputs(None if x.adapters is None else jnp.repeat(x.adapters, g + 1))

    def body(i, carry):
        hist, lengths, drafts, pools, aux_pools, out, counts, stats = carry
        c = lengths - 1                                   # the newest token's position
        live = (lengths > 0) & (c < x.limits)
        n_draft = jnp.where(live, jnp.clip(x.limits - c - 1, 0, g), 0)
        last = jnp.take_along_axis(hist, jnp.maximum(c, 0)[:, None], axis=1)
        pos = c[:, None] + cols                                                 # [n, γ+1]
        page = jnp.take_along_axis(x.tables, jnp.clip(pos // z, 0, x.tables.shape[1] - 1),
                                   axis=1)
        slots = jnp.where(live[:, None] & (cols <= n_draft[:, None]), page * z + pos % z, -1)
        index = PageIndex(slots.reshape(-1), (PagedRows(
            x.tables, jnp.where(live, c + n_draft + 1, 0), g + 1),))
        w = loop_weights(graphs, weights, i)
        q = None
        if spec.source == "lookup":
            drafts, _ = ngram_propose(hist, jnp.maximum(lengths, 1), spec.ngram, g)
        elif spec.source == "draft":
            drafts, q, aux_pools = _draft_propose(
                spec, loop_weights(spec.dgraphs, aux_weights, i), aux_pools, last[:, 0], pos,
                slots, x, live, i * (g + 1))
        tokens = jnp.concatenate([last, drafts], axis=1)
        h, pools = paged_hidden(graphs, w, tokens.reshape(1, -1), pos.reshape(1, -1), pools,
                                index, peft)
        lm = outer_model(graphs, w)
        logits = lm.project(h, peft)[0].reshape(n, g + 1, -1)
        accepted, nxt = x.sampling.verify(drafts, n_draft, logits, offset=i * (g + 1), q=q)
        e = jnp.where(live, accepted + 1, 0)
        emitted = jnp.where(cols < accepted[:, None], jnp.pad(drafts, ((0, 0), (0, 1))),
                            nxt[:, None])
        if spec.source == "medusa":
            new = _medusa(lm, _at(h[0].reshape(n, g + 1, -1), jnp.maximum(e - 1, 0)), g)
            drafts = jnp.where(live[:, None], new, drafts)
        elif spec.source == "mtp":
            new, aux_pools = _mtp_round(lm, spec, h, emitted, e, pos, index, aux_pools,
                                        x.adapters)
            drafts = jnp.where(live[:, None], new, drafts)
        keep = cols < e[:, None]
        hist = put(hist, emitted, keep, lengths)
        out = put(out, emitted, keep, counts)
        stats = stats + jnp.stack([n_draft, jnp.where(live, accepted, 0),
                                   live.astype(jnp.int32)])
        return (hist, lengths + e, drafts, pinned(graphs, pools),
                pinned(graphs, aux_pools), out, counts + e, stats)

    out = jnp.full((n, rounds * (g + 1)), -1, jnp.int32)
    carry = (x.history, x.lengths, x.drafts, pools, aux_pools, out, jnp.zeros(n, jnp.int32),
             jnp.zeros((3, n), jnp.int32))
    _, _, drafts, pools, aux_pools, out, counts, stats = jax.lax.fori_loop(0, rounds, body,
                                                                          carry)
    return (out, counts, stats[0], stats[1], stats[2], drafts), pools, aux_pools
