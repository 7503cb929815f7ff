"""The scheduler's device programs and the few shapes they are compiled for.

Two programs, each one jitted call over the paged pools (donated, updated in place):
  * `mixed_step`: one forward over a decode segment (every scheduler row, one token each;
    idle rows are padding) and a prefill segment of m rows × c tokens, then one sampled
    token per row. Copy-on-write page copies run first.
  * `decode_steps`: K decode steps in one `fori_loop` when every running sequence is
    decoding: K tokens per row per host round trip, so the Python scheduling, dispatch and
    the HTTP layer's per-token work are paid once per K tokens. A row that stops early
    (stop token, max_tokens) has its extra tokens dropped by the host; its writes stop at
    the pages it reserved (`limits`), so they never touch another sequence's pages.

Shapes come from a small fixed menu (`Shapes`) so a server compiles them all once at start
(`Scheduler.warmup`) and never while serving: prefill segments whose m·c is 64 or the token
budget, with c a power of two ≥ 16 (or the budget itself), and block tables covering ¼, ½
or all of max_len. With the defaults (16 rows, 256 tokens, 3 table widths) that is
(8 prefill shapes + decode only + K decode steps) × 3 = 30 programs. Finer chunk sizes pad
less (a 72-token prompt is a 128-token row, not 256) at the price of more programs.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.model.cache import PageIndex, PagedRows
from jaxlm.model.peft import PeftInputs
from jaxlm.model.sharding import activation_sharding
from jaxlm.ops.sampling import greedy, probabilities_rows, sample_rows
from jaxlm.ops.speculative import greedy_accept, ngram_propose, rejection_accept

from .forward import loop_weights, outer_model, paged_hidden


@functools.partial(jax.tree_util.register_dataclass, data_fields=[
    "temperature", "top_k", "top_p", "min_p", "seeds", "counters"], meta_fields=[])
@dataclasses.dataclass
class RowSampling:
    """Each row's sampling settings and key material, [n] each (0 temperature: greedy)."""
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    seeds: jax.Array
    counters: jax.Array      # tokens the row has generated: the key is fold_in(seed, it)

    @classmethod
    def empty(cls, n: int) -> "RowSampling":
        return cls(np.zeros(n, np.float32), np.zeros(n, np.int32), np.ones(n, np.float32),
                   np.zeros(n, np.float32), np.zeros(n, np.int32), np.zeros(n, np.int32))

    def set(self, r: int, request, generated: int) -> None:
        s = request.sampling
        if s is not None and not s.greedy:
            self.temperature[r], self.top_k[r] = s.temperature, s.top_k or 0
            self.top_p[r], self.min_p[r] = s.top_p or 1.0, s.min_p or 0.0
        self.seeds[r], self.counters[r] = request.seed % (1 << 31), generated

    def keys(self, offset=0):
        return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.PRNGKey(s), c))(
            self.seeds, self.counters + offset)

    def sample(self, logits, offset=0):
        return sample_rows(self.keys(offset), logits, self.temperature, self.top_k,
                           self.top_p, self.min_p)

    def verify(self, drafts, n_draft, logits, offset=0):
        """Speculative verification, each row with its own settings: drafts [n,γ] (the
        first n_draft [n] real; drafts come without probabilities, so q is one-hot),
        logits [n,γ+1,v] at the verified positions. Greedy rows accept the drafts that
        equal the target's argmax; sampled rows follow the rejection rule on their own
        filtered distribution (ops.speculative), so outputs keep the target's
        distribution. offset: as sample's (each round its own keys). (accepted n [n], the
        token after them [n])."""
        g = drafts.shape[1]
        cols = jnp.arange(g)[None]
        real = cols < n_draft[:, None]
        # a padded draft column can never be accepted: -1 is no token
        drafts = jnp.where(real, drafts, -1)
        n_greedy, next_greedy = greedy_accept(drafts, greedy(logits))

        def sampled(_):
            rep = lambda a: jnp.repeat(a, g + 1)  # noqa: E731  (settings per position)
            p = probabilities_rows(logits.reshape(-1, logits.shape[-1]),
                                   rep(self.temperature), rep(self.top_k), rep(self.top_p),
                                   rep(self.min_p)).reshape(logits.shape)
            one = jax.vmap(lambda k, d, q: rejection_accept(k, d[None], q[None]))
            keys = self.keys(offset)
            n, nxt = one(keys, jnp.maximum(drafts, 0), p)
            n = jnp.minimum(n[:, 0], n_draft)   # columns past n_draft were rejected
            # a row cut short draws its next token from p at n (the rule's bonus draw)
            at_n = jnp.take_along_axis(p, n[:, None, None], axis=1)[:, 0]
            bonus = jax.vmap(lambda k, q: jax.random.categorical(
                jax.random.fold_in(k, 1), jnp.log(q)))(keys, at_n)
            return n, jnp.where(n < n_draft, nxt[:, 0], bonus.astype(jnp.int32))
        hot = self.temperature > 0
        n_s, next_s = jax.lax.cond(jnp.any(hot), sampled,
                                   lambda _: (n_greedy, next_greedy), None)
        return jnp.where(hot, n_s, n_greedy), jnp.where(hot, next_s, next_greedy)


def _adapter_ids(n: int, stacked: bool):
    """Per-token (or per-row) stacked-adapter ids, -1: none; None without stacked
    adapters, so the plain model's programs get no added op."""
    return np.full(n, -1, np.int32) if stacked else None


def _peft(ids):
    return None if ids is None else PeftInputs(ids=ids[None])


@functools.partial(jax.tree_util.register_dataclass, data_fields=[
    "tokens", "positions", "pages", "last", "sampling", "copy_src", "copy_dst", "adapters"],
    meta_fields=[])
@dataclasses.dataclass
class MixedInputs:
    tokens: jax.Array        # [T] decode segment (n), then prefill segment (m·c)
    positions: jax.Array     # [T]
    pages: PageIndex
    last: jax.Array          # [n] each row's last token's index in T
    sampling: RowSampling
    copy_src: jax.Array      # [n] pages copied before the step (copy-on-write) ...
    copy_dst: jax.Array      # [n] ... into these (P, out of range: no copy)
    adapters: jax.Array | None = None   # [T] each token's stacked adapter (−1: none)

    @classmethod
    def empty(cls, n: int, m: int, c: int, width: int, n_pages: int,
              stacked: bool = False) -> "MixedInputs":
        """All padding (writes nothing, copies nothing): n decode rows, m × c prefill."""
        t = n + m * c
        segments = (_rows(n, 1, width),) + ((_rows(m, c, width),) if m else ())
        return cls(np.zeros(t, np.int32), np.zeros(t, np.int32),
                   PageIndex(np.full(t, -1, np.int32), segments), np.zeros(n, np.int32),
                   RowSampling.empty(n), np.zeros(n, np.int32), np.full(n, n_pages, np.int32),
                   _adapter_ids(t, stacked))


def _rows(b: int, queries: int, width: int) -> PagedRows:
    return PagedRows(np.zeros((b, width), np.int32), np.zeros(b, np.int32), queries)


@functools.partial(jax.tree_util.register_dataclass, data_fields=[
    "tokens", "positions", "tables", "lengths", "limits", "sampling", "adapters"],
    meta_fields=[])
@dataclasses.dataclass
class DecodeInputs:
    tokens: jax.Array        # [n] each row's last known token (fed first)
    positions: jax.Array     # [n] its position; lengths = positions + 1 (0: idle row)
    tables: jax.Array        # [n, p]
    lengths: jax.Array       # [n]
    limits: jax.Array        # [n] slots the row's pages hold: writes stop there
    sampling: RowSampling
    adapters: jax.Array | None = None   # [n] each row's stacked adapter (−1: none)

    @classmethod
    def empty(cls, n: int, width: int, stacked: bool = False) -> "DecodeInputs":
        """All rows idle (length 0: they write nothing)."""
        zeros = lambda: np.zeros(n, np.int32)  # noqa: E731
        return cls(zeros(), zeros(), np.zeros((n, width), np.int32), zeros(), zeros(),
                   RowSampling.empty(n), _adapter_ids(n, stacked))


@functools.partial(jax.tree_util.register_dataclass, data_fields=[
    "history", "lengths", "tables", "limits", "sampling", "adapters"], meta_fields=[])
@dataclasses.dataclass
class SpecInputs:
    """Speculative rounds for every decoding row (infer/scheduler.py): each row's tokens
    by position (prompt and output; its newest token at lengths-1 is not in the cache
    yet), its pages, and how many slots they hold (writes and drafts stop there)."""
    history: jax.Array       # [n, H] (-1 past the row's tokens)
    lengths: jax.Array       # [n] tokens known (0: idle row)
    tables: jax.Array        # [n, p]
    limits: jax.Array        # [n]
    sampling: RowSampling
    adapters: jax.Array | None = None   # [n]

    @classmethod
    def empty(cls, n: int, width: int, history: int, stacked: bool = False) -> "SpecInputs":
        zeros = lambda: np.zeros(n, np.int32)  # noqa: E731
        return cls(np.full((n, history), -1, np.int32), zeros(),
                   np.zeros((n, width), np.int32), zeros(), RowSampling.empty(n),
                   _adapter_ids(n, stacked))


def pool_sharding(mesh, buf):
    """A page pool [P,z,k,d] (or its int8 scales [P,z,k,1]) over a mesh: kv heads over
    'tensor' where they split, everything else whole on every device."""
    return activation_sharding(mesh, [None, None, "kv_heads", None], buf.shape,
                               what="KV page pool")


def _pinned(graphs, pools):
    """The pools where they were placed (and donated): under a mesh, XLA could otherwise
    hand them back with another layout, which the next call would compile again for."""
    if graphs.mesh is None:
        return pools
    return jax.tree.map(lambda b: jax.lax.with_sharding_constraint(
        b, pool_sharding(graphs.mesh, b)), pools)


def _mixed(graphs, weights, pools, x: MixedInputs):
    pools = tuple(tuple(buf.at[x.copy_dst].set(buf[x.copy_src], mode="drop") for buf in layer)
                  for layer in pools)
    h, pools = paged_hidden(graphs, weights, x.tokens[None], x.positions[None], pools,
                            x.pages, _peft(x.adapters))
    last = None if x.adapters is None else x.adapters[x.last]
    logits = outer_model(graphs, weights).project(h[:, x.last], _peft(last))[0]   # [n,v]
    return x.sampling.sample(logits), _pinned(graphs, pools)


def _decode(graphs, steps: int, weights, pools, x: DecodeInputs):
    z = pools[0][0].shape[1]
    live = x.lengths > 0

    def body(i, carry):
        tokens, pools, out = carry
        pos = x.positions + i
        page = jnp.take_along_axis(x.tables, jnp.minimum(pos // z, x.tables.shape[1] - 1)[:, None],
                                   axis=1)[:, 0]
        slots = jnp.where(live & (pos < x.limits), page * z + pos % z, -1)
        lengths = jnp.where(live, jnp.minimum(pos + 1, x.limits), 0)
        index = PageIndex(slots, (PagedRows(x.tables, lengths, 1),))
        w = loop_weights(graphs, weights, i)
        h, pools = paged_hidden(graphs, w, tokens[None], pos[None], pools, index,
                                _peft(x.adapters))
        logits = outer_model(graphs, w).project(h, _peft(x.adapters))[0]
        new = x.sampling.sample(logits, i)
        return new, _pinned(graphs, pools), out.at[i].set(new)

    out = jnp.zeros((steps, x.tokens.shape[0]), jnp.int32)
    _, pools, out = jax.lax.fori_loop(0, steps, body, (x.tokens, pools, out))
    return out, pools


def _speculate(graphs, rounds: int, g: int, ngram: int, weights, pools, x: SpecInputs):
    """`rounds` speculative rounds in one fori_loop, drafting on the device: each round a
    row looks up γ drafts in its history (prompt lookup, ops.speculative.ngram_propose),
    feeds its newest token and them (γ+1 tokens; fewer where its pages end), and accepts
    per RowSampling.verify; the emitted tokens join its history and the next round starts
    from them. So a host round trip carries up to rounds·(γ+1) tokens per row, as the
    plain decode loop carries `steps`. Returns ((tokens [n, rounds·(γ+1)], counts [n],
    drafted [n], accepted [n], rounds taken [n]), pools); the host keeps each row's tokens
    up to its first finish."""
    z = pools[0][0].shape[1]
    n = x.lengths.shape[0]
    cols = jnp.arange(g + 1, dtype=jnp.int32)[None]
    peft = _peft(None if x.adapters is None else jnp.repeat(x.adapters, g + 1))

    def body(i, carry):
        hist, lengths, pools, out, counts, stats = carry
        c = lengths - 1                                   # the newest token's position
        live = (lengths > 0) & (c < x.limits)
        n_draft = jnp.where(live, jnp.clip(x.limits - c - 1, 0, g), 0)
        drafts, _ = ngram_propose(hist, jnp.maximum(lengths, 1), ngram, g)
        last = jnp.take_along_axis(hist, jnp.maximum(c, 0)[:, None], axis=1)
        pos = c[:, None] + cols                                                 # [n, γ+1]
        page = jnp.take_along_axis(x.tables, jnp.clip(pos // z, 0, x.tables.shape[1] - 1),
                                   axis=1)
        slots = jnp.where(live[:, None] & (cols <= n_draft[:, None]), page * z + pos % z, -1)
        index = PageIndex(slots.reshape(-1), (PagedRows(
            x.tables, jnp.where(live, c + n_draft + 1, 0), g + 1),))
        w = loop_weights(graphs, weights, i)
        tokens = jnp.concatenate([last, drafts], axis=1)
        h, pools = paged_hidden(graphs, w, tokens.reshape(1, -1), pos.reshape(1, -1), pools,
                                index, peft)
        logits = outer_model(graphs, w).project(h, peft)[0].reshape(n, g + 1, -1)
        accepted, nxt = x.sampling.verify(drafts, n_draft, logits, offset=i * (g + 1))
        e = jnp.where(live, accepted + 1, 0)
        emitted = jnp.where(cols < accepted[:, None], jnp.pad(drafts, ((0, 0), (0, 1))),
                            nxt[:, None])
        keep = cols < e[:, None]
        hist = _put(hist, emitted, keep, lengths)
        out = _put(out, emitted, keep, counts)
        stats = stats + jnp.stack([n_draft, jnp.where(live, accepted, 0),
                                   live.astype(jnp.int32)])
        return hist, lengths + e, _pinned(graphs, pools), out, counts + e, stats

    out = jnp.full((n, rounds * (g + 1)), -1, jnp.int32)
    carry = (x.history, x.lengths, pools, out, jnp.zeros(n, jnp.int32),
             jnp.zeros((3, n), jnp.int32))
    _, _, pools, out, counts, stats = jax.lax.fori_loop(0, rounds, body, carry)
    return (out, counts, stats[0], stats[1], stats[2]), pools


def _put(buf, vals, keep, starts):
    """buf [n, W] with vals [n, w] written at columns starts.. where keep [n, w]."""
    def one(row, v, k, s):
        old = jax.lax.dynamic_slice(row, (s,), v.shape)
        return jax.lax.dynamic_update_slice(row, jnp.where(k, v, old), (s,))
    return jax.vmap(one)(buf, vals, keep, starts)


@functools.lru_cache(maxsize=8)
def compiled(graphs, steps: int = 0, spec: tuple | None = None):
    """The jitted program with the model's graphs bound (as a static jit argument they
    would be hashed every step, ~1 ms); cached, so schedulers of one model share them.
    steps 0: mixed_step; K: decode_steps over K tokens; spec (γ, ngram): K speculative
    rounds."""
    if spec is not None:
        fn = functools.partial(_speculate, graphs, max(steps, 1), *spec)
    elif steps:
        fn = functools.partial(_decode, graphs, steps)
    else:
        fn = functools.partial(_mixed, graphs)
    return jax.jit(fn, donate_argnums=(1,))


class Shapes:
    """The menu of program shapes (see the module docstring)."""

    def __init__(self, max_seqs: int, budget: int, pages_per_seq: int):
        shapes = set()
        for total in sorted({min(64, budget), budget}):
            sizes = [16 << i for i in range(12) if 16 << i < total] + [total]
            shapes |= {(min(max_seqs, total // c), c) for c in sizes}
        self.prefill = sorted(shapes, key=lambda mc: (mc[0] * mc[1], mc[1]))
        self.pages = sorted({-(-pages_per_seq // 4), -(-pages_per_seq // 2), pages_per_seq})

    def table_width(self, pages: int) -> int:
        return next(p for p in self.pages if p >= pages)

    def segment(self, chunks: list[int]) -> tuple[int, int]:
        """The smallest (m, c) holding these chunk lengths."""
        return next((m, c) for m, c in self.prefill if m >= len(chunks) and c >= max(chunks))

    def chunk_cap(self, chunks: list[int]) -> int:
        """The longest chunk one more prefill row may bring (0: no more rows fit)."""
        top = max(chunks, default=0)
        return max((c for m, c in self.prefill if m > len(chunks) and c >= top), default=0)

    def count(self, decode_steps: int, speculative: bool = False) -> int:
        """Programs in the menu: per table width, each prefill shape, decode only as a
        mixed step (m = 0), and a speculative round, else decode_steps when K > 1."""
        return len(self.pages) * (len(self.prefill) + 1 + (speculative or decode_steps > 1))
