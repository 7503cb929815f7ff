"""The inference engine: batched prefill, a one-jit decode loop, and `generate`.

    new_tokens = generate(lm, [[1, 2, 3], [4, 5]], max_new_tokens=32)            # greedy
    new_tokens = generate(lm, prompts, max_new_tokens=64, seed=0,
                          sampling=Sampling(temperature=0.8, top_p=0.95), stop_tokens=(2,))

Built from these pieces (each usable on its own):
  * Engine(lm): the model split into per-layer weights (infer/forward.py) plus
    `new_cache`, `prefill`, `start` and `decode`.
  * prefill: right-padded prompts of any lengths in one jitted call. Causal masking hides
    every row's padding from its real tokens, and afterwards each row's length is set to
    its real length, so decode overwrites the padding; the head runs only on each row's
    last real token.
  * decode: one jitted lax.while_loop that runs while steps are left, some row is not done
    and the cache has room. It can stop at an intermediate step (`until`) and resume, which
    is how the CLI streams; the batch API calls it once.
  * prefix caching (infer/prefix.py): rows that start with a stored prefix get its K/V
    copied in and prefill only their suffix.
  * adapters (infer/adapters.py): the adapter `lm` carries (optionally merged), or
    `adapters=[...]` that each row picks from with `adapter_ids` (LoRA, bottleneck and
    prefix adapters and the base in one batch, one compiled program for any mix).

Stop tokens: a row stops after emitting one; the stop token is included in its output.
"""
from __future__ import annotations

import contextlib
import dataclasses
from functools import partial
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxlm.model.cache import cache_dtype as cache_dtype_of, slot_axis
from jaxlm.model.memory import kv_bytes_per_token
from jaxlm.model.quant import quantize as quantize_weights
from jaxlm.model.sharding import replicated as replicated_on
from jaxlm.model.transformer import CausalLM
from jaxlm.ops.sampling import Sampling, sample

from .adapters import prepare, row_adapters, with_adapters
from .cache import DecodeCache, round_up
from .forward import (LayerGraphs, LayerWeights, forward, loop_weights, replicated,
                      split_model)
from .prefix import PrefixCache, fill_rows
from .speculative import SpecDecoder, Speculative

PAD = -1        # written after a row is done; never returned


@partial(jax.tree_util.register_dataclass,
         data_fields=["tokens", "counts", "last", "done", "step", "key", "logits"],
         meta_fields=[])
@dataclasses.dataclass
class DecodeState:
    """What the decode loop carries besides the cache.

    tokens [b,N] the new tokens so far (PAD after a row is done); counts [b] how many each
    row emitted; last [b] the token to feed next; done [b]; step: columns filled; key: the
    PRNG key of the next step; logits [b,N,v] per-step logits when recorded, else None."""
    tokens: jax.Array
    counts: jax.Array
    last: jax.Array
    done: jax.Array
    step: jax.Array
    key: jax.Array
    logits: jax.Array | None = None


@partial(jax.jit, static_argnames=("graphs", "sampling"), donate_argnames=("cache",))
def _prefill(graphs: LayerGraphs, weights: LayerWeights, tokens, lengths, cache: DecodeCache,
             key, sampling: Sampling | None):
    start = cache.lengths
    logits, cache = forward(graphs, weights, tokens, cache, last=lengths - 1)
    logits = logits[:, 0]
    first, logits = replicated(graphs, (sample(key, logits, sampling), logits))
    return first, logits, dataclasses.replace(cache, lengths=start + lengths)


@partial(jax.jit, static_argnames=("max_new_tokens", "record_logits"))
def _start(first, logits, key, stop_tokens, max_new_tokens: int, record_logits: bool):
    b = first.shape[0]
    tokens = jnp.full((b, max_new_tokens), PAD, jnp.int32).at[:, 0].set(first)
    recorded = None
    if record_logits:
        recorded = jnp.zeros((b, max_new_tokens, logits.shape[-1]), jnp.float32)
        recorded = recorded.at[:, 0].set(logits)
    return DecodeState(tokens=tokens, counts=jnp.ones((b,), jnp.int32), last=first,
                       done=jnp.isin(first, stop_tokens), step=jnp.array(1, jnp.int32),
                       key=key, logits=recorded)


@partial(jax.jit, static_argnames=("graphs", "sampling"), donate_argnames=("state", "cache"))
def _decode(graphs: LayerGraphs, weights: LayerWeights, state: DecodeState, cache: DecodeCache,
            until, stop_tokens, sampling: Sampling | None):
    n = state.tokens.shape[1]
    until = jnp.minimum(until, n)

    def keep_going(carry):
        state, cache = carry
        room = jnp.max(cache.lengths) < cache.max_len
        return (state.step < until) & ~jnp.all(state.done) & room

    def step(carry):
        state, cache = carry
        logits, cache = forward(graphs, loop_weights(graphs, weights, state.step),
                                state.last[:, None], cache)
        logits = logits[:, 0]
        if sampling is None or sampling.greedy:  # no key to split (nor threefry to compile)
            key, new = state.key, sample(None, logits)
        else:
            key, sub = jax.random.split(state.key)
            new = sample(sub, logits, sampling)
        live = ~state.done
        recorded = state.logits
        if recorded is not None:
            recorded = recorded.at[:, state.step].set(logits)
        state = DecodeState(
            tokens=state.tokens.at[:, state.step].set(jnp.where(live, new, PAD)),
            counts=state.counts + live.astype(jnp.int32),
            last=jnp.where(live, new, state.last),  # done rows keep feeding a real token
            done=state.done | (live & jnp.isin(new, stop_tokens)),
            step=state.step + 1, key=key, logits=recorded)
        return state, cache

    state, cache = jax.lax.while_loop(keep_going, step, (state, cache))
    return replicated(graphs, state), cache


def _check_prompts(prompts, vocab_size: int) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    out = []
    for i, p in enumerate(prompts):
        p = [int(t) for t in np.asarray(p).reshape(-1)]
        if not p:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids {bad[:5]} outside the vocabulary "
                             f"[0, {vocab_size})")
        out.append(p)
    return out


def _check_stop_tokens(stop_tokens, vocab_size: int) -> jax.Array:
    stops = [int(t) for t in stop_tokens]
    bad = [t for t in stops if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"stop_tokens {bad} are outside the vocabulary [0, {vocab_size})")
    stops = sorted(set(stops))
    # Padded with -1 (never a token) to a multiple of 8, so the count is not a new shape.
    width = max(8, round_up(len(stops), 8))
    return np.asarray(stops + [-1] * (width - len(stops)), np.int32)


class Engine:
    """A model ready for inference: its per-layer weights and the jitted steps over them.

    The block weights are copied once into per-layer arrays (see infer/forward.py); later
    changes to `lm` are not seen, so build a new Engine after training further.
    max_len: the largest cache (prompt + new tokens) this engine accepts; default the
    model's max_position for learned position tables, else unlimited.
    mesh: shard weights by the logical-axis rules and the cache over rows and kv heads
    (jaxlm.model.sharding.make_mesh); the jitted steps then run as one SPMD program.
    adapters: adapted models (one adapter each, over lm's base) or PEFT directories
    (loaded onto a view of lm); requests then take `adapter_ids`, one per prompt, indexing
    this list (-1 or None: the base). Without it, an adapter lm carries serves every row;
    merge=True folds its LoRA into (the engine's copy of) the weights. See infer/adapters.py.
    speculative: a Speculative setting; generate and stream then draft and verify
    (infer/speculative.py) and leave `speculative_stats` (acceptance rate, tokens per
    target forward) of the last request.
    quantize: "int8" or "int4" serves a weight-quantized copy of lm
    (jaxlm.model.quant.quantize; quant_group for int4); a model loaded already quantized
    needs none. cache_dtype: the KV cache's dtype, default the compute dtype; "int8"
    stores keys and values quantized per (token, kv head) (`kv_bytes_per_token` says
    what a token costs). keep_quantized: read quantized weights quantized in every decode
    step (default: on GPU/TPU, not on CPU; infer.forward.loop_weights says why).
    """

    def __init__(self, lm: CausalLM, *, max_len: int | None = None, cache_dtype=None,
                 mesh: Mesh | None = None, adapters=None, merge: bool = False,
                 speculative: Speculative | None = None, quantize: str | None = None,
                 quant_group: int = 64, keep_quantized: bool | None = None):
        if quantize is not None:
            if merge:  # fold the LoRA into (a copy of) the float weights, then quantize
                lm, _ = prepare(lm, adapters, True, jnp.float32, slot_axis(lm.cfg))
                merge = False
            lm = quantize_weights(lm, quantize, quant_group)
        cache_dtype = None if cache_dtype is None else cache_dtype_of(lm.cfg, cache_dtype).name
        self.cfg = lm.cfg
        served, self.served = prepare(lm, adapters, merge,
                                      jnp.dtype(cache_dtype or lm.cfg.dtype), slot_axis(lm.cfg),
                                      None if mesh is None else replicated_on(mesh))
        self.graphs, self.weights = split_model(served, mesh, keep_quantized)
        if max_len is None and self.cfg.position == "learned":
            max_len = self.cfg.max_position
        if max_len is not None and max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {max_len}")
        self.max_len = max_len
        self.cache_dtype = cache_dtype
        self.prefixes = PrefixCache(self)      # rows of the engine's own model (id -1)
        self._prefix_caches = {-1: self.prefixes}
        self.spec = None if speculative is None else SpecDecoder(self, speculative)

    @property
    def kv_bytes_per_token(self) -> int:
        """Cache bytes one token takes over all layers, in this engine's cache dtype."""
        return kv_bytes_per_token(self.cfg, dtype=self.cache_dtype)

    @property
    def speculative_stats(self) -> dict | None:
        """The last speculative request's rounds, acceptance rate and tokens per target
        forward (None before one, or without speculative decoding)."""
        return None if self.spec is None else self.spec.stats

    def _spec_request(self, prompts, max_new_tokens, stop_tokens, adapter_ids, prefix_cache,
                      record_logits=False):
        if prefix_cache or record_logits:
            raise ValueError("speculative decoding takes no prefix_cache or record_logits; "
                             "use an Engine without speculative= for those")
        prompts = self.check(prompts, max_new_tokens, stop_tokens, adapter_ids)
        return prompts, row_adapters(self.served, adapter_ids, len(prompts))

    # Pieces --------------------------------------------------------------------------
    @property
    def mesh(self) -> Mesh | None:
        return self.graphs.mesh

    @property
    def n_adapters(self) -> int:
        """How many adapters rows may choose among (0: only the engine's own model)."""
        return self.served.n

    def virtual_tokens(self, adapter_id: int = -1) -> int:
        """Cache slots a row of this adapter starts with: its prefix's P, else 0."""
        return self.served.virtual_tokens(adapter_id)

    def prefixes_for(self, adapter_id: int = -1) -> PrefixCache:
        """The stored prefixes of rows that use this adapter (each adapter has its own)."""
        row_adapters(self.served, [adapter_id], 1)
        if adapter_id not in self._prefix_caches:
            self._prefix_caches[adapter_id] = PrefixCache(
                self, adapter=adapter_id, max_tokens=self.prefixes.max_tokens,
                min_shared=self.prefixes.min_shared)
        return self._prefix_caches[adapter_id]

    def new_cache(self, batch: int, max_len: int, adapter_ids=None) -> DecodeCache:
        """An empty cache, except that rows of a prefix adapter hold its virtual tokens
        (and rows of stacked adapters carry their ids)."""
        rows = row_adapters(self.served, adapter_ids, batch)
        cache = DecodeCache.create(self.cfg, batch, max_len, self.cache_dtype, self.mesh)
        return with_adapters(cache, self.served, rows,
                             None if self.mesh is None else replicated_on(self.mesh))

    def _on_mesh(self):
        """The mesh in context while tracing, so MoE layers run expert-parallel."""
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    def prefill(self, tokens, lengths, cache: DecodeCache, key, sampling=None):
        """tokens [b,T] right-padded suffixes written after cache.lengths; lengths [b] real
        lengths (>= 1). Returns (first new token [b], its logits [b,v], cache)."""
        with self._on_mesh():
            return _prefill(self.graphs, self.weights, np.asarray(tokens, np.int32),
                            np.asarray(lengths, np.int32), cache, key, sampling)

    def start(self, first, logits, key, *, max_new_tokens: int, stop_tokens=(),
              record_logits: bool = False) -> DecodeState:
        stops = _check_stop_tokens(stop_tokens, self.cfg.vocab_size)
        return _start(first, logits, key, stops, max_new_tokens, record_logits)

    def decode(self, state: DecodeState, cache: DecodeCache, *, stop_tokens=(),
               sampling=None, until: int | None = None):
        """Run the loop until step `until` (default: max_new_tokens), every row is done, or
        the cache is full. state and cache are donated; returns the new (state, cache)."""
        stops = _check_stop_tokens(stop_tokens, self.cfg.vocab_size)
        until = state.tokens.shape[1] if until is None else until
        with self._on_mesh():
            return _decode(self.graphs, self.weights, state, cache, np.int32(until), stops,
                           sampling)

    # Whole requests ------------------------------------------------------------------
    def check(self, prompts, max_new_tokens: int, stop_tokens=(),
              adapter_ids=None) -> list[list[int]]:
        """Validate a request (ValueError naming what is wrong); the prompts as int lists."""
        if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        prompts = _check_prompts(prompts, self.cfg.vocab_size)
        _check_stop_tokens(stop_tokens, self.cfg.vocab_size)
        rows = row_adapters(self.served, adapter_ids, len(prompts))
        longest, virtual = max((len(p) + self.virtual_tokens(a), self.virtual_tokens(a))
                               for p, a in zip(prompts, rows))
        if self.max_len is not None and longest + max_new_tokens - 1 > self.max_len:
            what = f" (with the adapter's {virtual} prefix tokens)" if virtual else ""
            raise ValueError(
                f"prompt of {longest} tokens{what} + max_new_tokens={max_new_tokens} needs "
                f"{longest + max_new_tokens - 1} cache slots but the cache holds "
                f"max_len={self.max_len}; shorten the prompt or ask for fewer tokens")
        return prompts

    def prefill_prompts(self, prompts: list[list[int]], max_new_tokens: int, key,
                        sampling=None, prefix_cache: bool = False, adapter_ids=None):
        """Allocate the cache (adapters' prefixes in their rows), copy in cached prefixes,
        prefill the rest of every prompt. Returns (first tokens [b], their logits [b,v],
        cache)."""
        rows = row_adapters(self.served, adapter_ids, len(prompts))
        virtual = [self.virtual_tokens(a) for a in rows]
        matches = self._plan(prompts, rows) if prefix_cache else [None] * len(prompts)
        skip = [0 if m is None else m.length for m in matches]
        suffixes = [p[s:] for p, s in zip(prompts, skip)]
        t = round_up(max(len(s) for s in suffixes))
        # Real tokens need len + max_new - 1 slots; padded writes (suffix prefill, prefix
        # copies) need room too, since dynamic_update_slice would clamp, not drop, them.
        slots = max(max(v + len(p) for v, p in zip(virtual, prompts)) + max_new_tokens - 1,
                    max(v + s for v, s in zip(virtual, skip)) + t,
                    max((m.slots for m in matches if m is not None), default=0))
        cache = self.new_cache(len(prompts), round_up(slots), rows)
        if prefix_cache:
            cache = fill_rows(cache, matches)
        tokens = np.zeros((len(prompts), t), np.int32)
        for i, s in enumerate(suffixes):
            tokens[i, :len(s)] = s
        return self.prefill(tokens, [len(s) for s in suffixes], cache, key, sampling)

    def _plan(self, prompts, rows):
        """Each prompt's stored prefix, looked up among its own adapter's prefixes."""
        matches = [None] * len(prompts)
        for adapter in sorted(set(rows)):
            idx = [i for i, a in enumerate(rows) if a == adapter]
            found = self.prefixes_for(adapter).plan([prompts[i] for i in idx])
            for i, m in zip(idx, found):
                matches[i] = m
        return matches

    def generate(self, prompts, *, max_new_tokens: int, sampling: Sampling | None = None,
                 seed: int = 0, stop_tokens=(), prefix_cache: bool = False,
                 record_logits: bool = False, adapter_ids=None):
        """New tokens of each prompt (a stop token, when hit, is the last one returned).

        prefix_cache: reuse the K/V of prefixes stored in `self.prefixes` (and store the
        longest prefix shared by several prompts of this batch) instead of recomputing
        it. record_logits: also return the per-step logits [b, max_new_tokens, v].
        adapter_ids: each prompt's adapter (an index into `adapters`; -1 or None: base)."""
        if self.spec is not None:
            prompts, rows = self._spec_request(prompts, max_new_tokens, stop_tokens,
                                               adapter_ids, prefix_cache, record_logits)
            return self.spec.generate(prompts, max_new_tokens, sampling, jax.random.key(seed),
                                      _check_stop_tokens(stop_tokens, self.cfg.vocab_size),
                                      rows)
        prompts = self.check(prompts, max_new_tokens, stop_tokens, adapter_ids)
        prefill_key, decode_key = jax.random.split(jax.random.key(seed))
        first, logits, cache = self.prefill_prompts(prompts, max_new_tokens, prefill_key,
                                                    sampling, prefix_cache, adapter_ids)
        state = self.start(first, logits, decode_key, max_new_tokens=max_new_tokens,
                           stop_tokens=stop_tokens, record_logits=record_logits)
        state, cache = self.decode(state, cache, stop_tokens=stop_tokens, sampling=sampling)
        tokens, counts = jax.device_get((state.tokens, state.counts))
        out = [row[:n].tolist() for row, n in zip(tokens, counts)]
        return (out, np.asarray(state.logits)) if record_logits else out

    def stream(self, prompts, *, max_new_tokens: int, sampling: Sampling | None = None,
               seed: int = 0, stop_tokens=(), chunk: int = 8, prefix_cache: bool = False,
               adapter_ids=None) -> Iterator[list[list[int]]]:
        """Like generate, but yields each row's newly produced tokens every `chunk` steps
        (the same jitted loop, stopped and resumed)."""
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        if self.spec is not None:
            prompts, rows = self._spec_request(prompts, max_new_tokens, stop_tokens,
                                               adapter_ids, prefix_cache)
            yield from self.spec.stream(prompts, max_new_tokens, sampling, jax.random.key(seed),
                                        _check_stop_tokens(stop_tokens, self.cfg.vocab_size),
                                        chunk, rows)
            return
        prompts = self.check(prompts, max_new_tokens, stop_tokens, adapter_ids)
        prefill_key, decode_key = jax.random.split(jax.random.key(seed))
        first, logits, cache = self.prefill_prompts(prompts, max_new_tokens, prefill_key,
                                                    sampling, prefix_cache, adapter_ids)
        state = self.start(first, logits, decode_key, max_new_tokens=max_new_tokens,
                           stop_tokens=stop_tokens)
        sent, previous = np.zeros(len(prompts), np.int64), -1
        while True:
            tokens, counts, done, step = jax.device_get(
                (state.tokens, state.counts, state.done, state.step))
            yield [row[s:n].tolist() for row, s, n in zip(tokens, sent, counts)]
            sent = counts.astype(np.int64)
            if done.all() or step >= max_new_tokens or step == previous:
                return  # finished, or no progress (the cache is full)
            previous = step
            state, cache = self.decode(state, cache, stop_tokens=stop_tokens,
                                       sampling=sampling, until=int(step) + chunk)


def generate(lm: CausalLM | Engine, prompts: list[list[int]], *, max_new_tokens: int,
             sampling: Sampling | None = None, seed: int = 0, stop_tokens=(),
             prefix_cache: bool = False, adapter_ids=None) -> list[list[int]]:
    """The new tokens (not the prompt) of each prompt, generated as one batch.

    sampling=None is greedy; the same seed gives the same tokens. A row stops after its
    first stop token (which is returned) or after max_new_tokens. Pass an Engine instead
    of a CausalLM to keep its compiled steps' inputs and its prefix cache across calls
    (and for `adapter_ids`, an Engine built with adapters=[...]). A CausalLM carrying an
    adapter generates with it."""
    engine = lm if isinstance(lm, Engine) else Engine(lm)
    return engine.generate(prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                           seed=seed, stop_tokens=stop_tokens, prefix_cache=prefix_cache,
                           adapter_ids=adapter_ids)
