"""The scheduler's device programs and the few shapes they are compiled for.

Three programs, each one jitted call over the paged pools (donated, updated in place):
  * `mixed_step`: one forward over a decode segment (every scheduler row, one token each;
    idle rows are padding) and a prefill segment of m rows × c tokens, then one sampled
    token per row. Copy-on-write page copies run first.
  * `decode_steps`: K decode steps in one `fori_loop` when every running sequence is
    decoding: K tokens per row per host round trip, so the Python scheduling, dispatch and
    the HTTP layer's per-token work are paid once per K tokens. A row that stops early
    (stop token, max_tokens) has its extra tokens dropped by the host; its writes stop at
    the pages it reserved (`limits`), so they never touch another sequence's pages.
  * speculative rounds (infer/spec_rows.py) instead of decode_steps when the scheduler
    speculates; its mixed step then also runs the draft source's part (a draft model's
    or MTP modules' pools, the rows' next Medusa/MTP drafts).

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

from .forward import loop_weights, outer_model, paged_hidden
from .rows import RowSampling, peft_inputs, pinned, pool_sharding  # noqa: F401 (re-exported)
from .spec_rows import SpecInputs, SpecProgram, mixed_extras, speculate  # noqa: F401


def _adapter_ids(n: int, stacked: bool):
    """Per-token (or per-row) stacked-adapter ids, -1: none; None without stacked
    adapters, so the plain model's programs get no added op."""
    return np.full(n, -1, np.int32) if stacked else None


@functools.partial(jax.tree_util.register_dataclass, data_fields=[
    "tokens", "positions", "pages", "last", "sampling", "copy_src", "copy_dst", "adapters",
    "ahead", "row_of"], meta_fields=[])
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
    ahead: jax.Array | None = None      # [γ, T] MTP: the tokens k+1 ahead (spec_rows)
    row_of: jax.Array | None = None     # [T] MTP: each token's row (n: padding)

    @classmethod
    def empty(cls, n: int, m: int, c: int, width: int, n_pages: int,
              stacked: bool = False, mtp: int = 0) -> "MixedInputs":
        """All padding (writes nothing, copies nothing): n decode rows, m × c prefill;
        mtp: γ of an MTP chain (its `ahead` tokens)."""
        t = n + m * c
        segments = (_rows(n, 1, width),) + ((_rows(m, c, width),) if m else ())
        return cls(np.zeros(t, np.int32), np.zeros(t, np.int32),
                   PageIndex(np.full(t, -1, np.int32), segments), np.zeros(n, np.int32),
                   RowSampling.empty(n), np.zeros(n, np.int32), np.full(n, n_pages, np.int32),
                   _adapter_ids(t, stacked),
                   np.zeros((mtp, t), np.int32) if mtp else None,
                   np.full(t, n, np.int32) if mtp else None)


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


def _copy(pools, x: MixedInputs):
    return tuple(tuple(buf.at[x.copy_dst].set(buf[x.copy_src], mode="drop") for buf in layer)
                 for layer in pools)


def _mixed(graphs, spec, weights, pools, x: MixedInputs, aux_weights=None, aux_pools=()):
    """One mixed step: (sampled [n], and with spec the rows' next drafts [n,γ]), pools
    (and with spec the draft source's pools)."""
    h, pools = paged_hidden(graphs, weights, x.tokens[None], x.positions[None],
                            _copy(pools, x), x.pages, peft_inputs(x.adapters))
    last = None if x.adapters is None else x.adapters[x.last]
    logits = outer_model(graphs, weights).project(h[:, x.last], peft_inputs(last))[0]  # [n,v]
    sampled = x.sampling.sample(logits)
    if spec is None:
        return sampled, pinned(graphs, pools)
    drafts, aux_pools = mixed_extras(graphs, spec, weights, h, x, sampled, aux_weights,
                                     _copy(aux_pools, x))
    return (sampled, drafts), pinned(graphs, pools), pinned(graphs, aux_pools)


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
                                peft_inputs(x.adapters))
        logits = outer_model(graphs, w).project(h, peft_inputs(x.adapters))[0]
        new = x.sampling.sample(logits, i)
        return new, pinned(graphs, pools), out.at[i].set(new)

    out = jnp.zeros((steps, x.tokens.shape[0]), jnp.int32)
    _, pools, out = jax.lax.fori_loop(0, steps, body, (x.tokens, pools, out))
    return out, pools


@functools.lru_cache(maxsize=8)
def compiled(graphs, steps: int = 0, spec: SpecProgram | None = None):
    """The jitted program with the model's graphs bound (as a static jit argument they
    would be hashed every step, ~1 ms); cached, so schedulers of one model share them.
    steps 0: mixed_step; K: decode_steps over K tokens, or with spec K speculative
    rounds. With spec, programs take and return the draft source's weights and pools
    too: fn(weights, pools, x, aux_weights, aux_pools), both pool sets donated."""
    if spec is None:
        fn = (functools.partial(_decode, graphs, steps) if steps
              else functools.partial(_mixed, graphs, None))
        return jax.jit(fn, donate_argnums=(1,))
    fn = (functools.partial(speculate, graphs, spec, max(steps, 1)) if steps
          else functools.partial(_mixed, graphs, spec))
    return jax.jit(fn, donate_argnums=(1, 4))


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
