"""Speculative decoding: draft γ tokens, verify them with one target forward over γ+1
positions, keep the longest accepted run plus one token of the target's own, all inside
one jitted lax.while_loop.

    engine = Engine(lm, speculative=Speculative("lookup", n_draft=4, ngram=3))
    engine = Engine(lm, speculative=Speculative("draft", n_draft=4, draft=small_lm))
    engine = Engine(lm, speculative=Speculative("medusa", n_draft=3))   # lm.cfg.medusa_heads >= 3
    engine = Engine(lm, speculative=Speculative("mtp", n_draft=1))      # lm.cfg.mtp_depth >= 1
    engine.generate(prompts, max_new_tokens=128)     # same API; engine.speculative_stats after

Draft sources:
  * "draft": a smaller CausalLM with the same vocabulary and its own cache. Each round it
    runs γ+1 single-token steps (feeding the newest token and its γ drafts, so its cache
    holds every token the target may accept), drawing each draft from its filtered
    distribution q, which the rejection rule then uses.
  * "lookup": prompt lookup, no model: the tokens that followed the latest earlier
    occurrence of the row's last n tokens (n <= ngram) in its prompt + output so far.
  * "medusa": the model's Medusa heads on the hidden state that produced the newest
    token, top-1 each (head k guesses the token k after it).
  * "mtp": the model's MTP modules as a top-1 chain: module k reads module k−1's hidden
    state and the previous draft. Each module has its own cache, rewritten over the
    verified window every round (with the accepted tokens, and the new drafts where the
    module looks past them); γ <= mtp_depth.
Drafts without probabilities (lookup, medusa, mtp) verify with q = one-hot (exact too).

Exactness: greedy gives the tokens plain greedy decoding gives; sampling follows the
rejection rule of jaxlm.ops.speculative, so outputs are distributed as the target's.
Rows accept different counts: each row's cache length moves on by what it emitted and
the slots of rejected drafts are simply overwritten next round (the cache has γ+1 spare
slots, nothing is copied). A stop token inside an accepted run ends the row there; a row
never emits more than max_new_tokens.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.model.peft import PeftInputs
from jaxlm.ops.sampling import Sampling, greedy, probabilities, sample
from jaxlm.ops.speculative import accept, ngram_propose

from .cache import DecodeCache, round_up
from .forward import (LayerGraphs, LayerWeights, forward, hidden, loop_weights, outer_model,
                      replicated, split_model)

PAD = -1
SOURCES = ("draft", "lookup", "medusa", "mtp")


@dataclasses.dataclass(frozen=True)
class Speculative:
    """The engine's speculative setting. source: one of SOURCES; n_draft: γ, drafts per
    verification; ngram: prompt lookup's longest n-gram; draft: the draft CausalLM (or
    an HF directory / run loaded by the caller) for source "draft"."""
    source: str
    n_draft: int = 4
    ngram: int = 3
    draft: Any = dataclasses.field(default=None, compare=False, repr=False)

    def check(self, cfg) -> None:
        """ValueError naming what does not fit the target model's Config."""
        if self.source not in SOURCES:
            raise ValueError(f"speculative source {self.source!r} is not one of {SOURCES}")
        if not isinstance(self.n_draft, int) or self.n_draft < 1:
            raise ValueError(f"n_draft (γ, --spec-tokens) must be an int >= 1, got "
                             f"{self.n_draft!r}")
        if self.source == "lookup" and (not isinstance(self.ngram, int) or self.ngram < 1):
            raise ValueError(f"ngram (--prompt-lookup N) must be an int >= 1, got {self.ngram!r}")
        if (self.draft is None) != (self.source != "draft"):
            raise ValueError("a draft model goes with source 'draft' (and only with it)")
        if self.source == "draft" and self.draft.cfg.vocab_size != cfg.vocab_size:
            raise ValueError(f"the draft model's vocabulary ({self.draft.cfg.vocab_size}) "
                             f"differs from the target's ({cfg.vocab_size}); a draft must "
                             f"share the tokenizer")
        have = {"medusa": ("medusa_heads", cfg.medusa_heads),
                "mtp": ("mtp_depth", cfg.mtp_depth)}.get(self.source)
        if have is not None and self.n_draft > have[1]:
            raise ValueError(f"source {self.source!r} drafts at most {have[0]}={have[1]} "
                             f"tokens per step, got n_draft={self.n_draft}"
                             + ("" if have[1] else f"; the model has no {self.source} heads"
                                " (train some: python -m jaxlm.train --init RUN "
                                f"--{have[0]} K --heads_only)"))


@partial(jax.tree_util.register_dataclass,
         data_fields=["tokens", "counts", "last", "done", "key", "history", "drafts", "aux",
                      "rounds", "accepted"], meta_fields=[])
@dataclasses.dataclass
class SpecState:
    """What the speculative loop carries besides the target cache.

    tokens [b, N+γ+1] new tokens (PAD after a row's end; γ+1 spare columns take a
    round's writes whole); counts [b]; last [b] the newest token (not yet in the cache);
    done [b]; key; history [b,S] every token by position (lookup); drafts [b,γ] the
    next round's drafts (medusa, mtp); aux the draft model's or the MTP modules' cache;
    rounds [b] verifications each row took part in; accepted [b] drafts accepted."""
    tokens: jax.Array
    counts: jax.Array
    last: jax.Array
    done: jax.Array
    key: jax.Array
    history: jax.Array | None
    drafts: jax.Array | None
    aux: DecodeCache | None
    rounds: jax.Array
    accepted: jax.Array


def _peft(cache: DecodeCache):
    """The rows' stacked adapters for the LM head (a LoRA may target lm_head)."""
    return None if cache.peft_ids is None else PeftInputs(ids=cache.peft_ids)


def _at(x, idx):
    """x [b,t,...] at per-row index idx [b] → [b,...]."""
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 1)).astype(jnp.int32)
    return jnp.take_along_axis(x, idx, axis=1)[:, 0]


def _write(buf, vals, starts):
    """buf [b,W] with vals [b,w] written at per-row column starts [b]."""
    return jax.vmap(lambda r, v, s: jax.lax.dynamic_update_slice(r, v, (s,)))(buf, vals, starts)


def _mtp_drafts(lm, h0, ahead, e, starts, aux: DecodeCache, n_draft: int, peft=None):
    """Run MTP modules 1..γ over a window of w positions starting at slots `starts`:
    h0 [b,w,d] the target's final hidden states there, ahead [b,w] the token after each
    position (valid for the first e [b]). Each module's cache gets the window written
    and its length set to starts + e; module k at window index e−1 (the newest token's
    predecessor) gives draft k. peft: the rows' stacked adapters (a module or the LM head
    may carry one). Returns (drafts [b,γ], aux)."""
    w = h0.shape[1]
    positions = starts[:, None] + jnp.arange(w, dtype=jnp.int32)
    rope, alibi = lm.position_signals(positions)
    drafts, layers, h = [], [], h0
    j = jnp.arange(w, dtype=jnp.int32)[None]
    for k in range(n_draft):
        if k == 0:
            tokens = ahead
        else:  # module k looks k tokens further on: accepted ones, then this round's drafts
            ext = jnp.concatenate([ahead, jnp.stack(drafts, axis=1)], axis=1)
            src = jnp.where(j + k < e[:, None], j + k, w + j + k - e[:, None])
            tokens = jnp.take_along_axis(ext, jnp.clip(src, 0, w + k - 1), axis=1)
        h, kv, _ = lm.mtp[k](h, lm.embed(tokens), positions, rope=rope, alibi=alibi,
                             kv=aux.layers[k], starts=starts, peft=peft)
        layers.append(kv)
        # the head only where the draft is read (the window's other positions feed the cache)
        drafts.append(greedy(lm.mtp_logits(k, _at(h, jnp.maximum(e - 1, 0))[:, None],
                                           peft)[:, 0]))
    aux = dataclasses.replace(aux, layers=tuple(layers) + aux.layers[n_draft:],
                              lengths=starts + e)
    return jnp.stack(drafts, axis=1), aux


def _medusa_drafts(lm, h_last, n_draft: int):
    """Top-1 of Medusa heads 1..γ on h_last [b,d] → [b,γ]."""
    return greedy(lm.medusa_logits(h_last[:, None])[:n_draft, :, 0]).T


@partial(jax.jit, static_argnames=("graphs", "dgraphs", "sampling", "source", "n_draft",
                                   "max_new_tokens"), donate_argnames=("cache", "aux"))
def _prefill(graphs: LayerGraphs, weights: LayerWeights, dgraphs, dweights, tokens, lengths,
             cache: DecodeCache, aux, key, stop_tokens, sampling: Sampling | None, source: str,
             n_draft: int, max_new_tokens: int):
    """The prompt through the target (and the draft model, or the MTP modules), the first
    token sampled, the draft source primed: (SpecState, cache)."""
    lm = outer_model(graphs, weights)
    # Rows of a prefix-tuning adapter start with its P virtual tokens in the cache: the
    # prompt sits at slots start.., and every slot index below is the cache's.
    start = cache.lengths
    h, cache = hidden(graphs, weights, tokens, cache)
    h_last = _at(h, lengths - 1)
    first_key, key = jax.random.split(key)
    first = sample(first_key, lm.project(h_last[:, None], _peft(cache))[:, 0], sampling)
    cache = dataclasses.replace(cache, lengths=start + lengths)
    b, t = tokens.shape
    history = drafts = None
    if source == "draft":   # the draft model has no virtual tokens: its slots start at 0
        _, aux = hidden(dgraphs, dweights, tokens, aux)
        aux = dataclasses.replace(aux, lengths=lengths)
    elif source == "lookup":   # by cache slot; virtual slots hold -1, which matches nothing
        history = jnp.full((b, cache.max_len + n_draft + 2), -1, jnp.int32)
        history = _write(_write(history, tokens, start), first[:, None], start + lengths)
    elif source == "medusa":
        drafts = _medusa_drafts(lm, h_last, n_draft)
    else:
        nxt = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
        ahead = jnp.where(jnp.arange(t)[None] == (lengths - 1)[:, None], first[:, None], nxt)
        drafts, aux = _mtp_drafts(lm, h, ahead, lengths, start, aux, n_draft, _peft(cache))
    out = jnp.full((b, max_new_tokens + n_draft + 1), PAD, jnp.int32).at[:, 0].set(first)
    zeros = jnp.zeros((b,), jnp.int32)
    state = SpecState(tokens=out, counts=zeros + 1, last=first,
                      done=jnp.isin(first, stop_tokens) | (max_new_tokens <= 1), key=key,
                      history=history, drafts=drafts, aux=aux, rounds=zeros, accepted=zeros)
    return replicated(graphs, state), cache


def _draft_propose(dgraphs, dweights, aux: DecodeCache, last, key, sampling, n_draft: int):
    """γ draft tokens from the draft model (and their distributions q [b,γ,v] when
    sampling), feeding γ+1 tokens so its cache holds the last draft too."""
    sampled = sampling is not None and not sampling.greedy

    def step(carry, k):
        aux, token = carry
        logits, aux = forward(dgraphs, dweights, token[:, None], aux)
        logits = logits[:, 0]
        if not sampled:
            return (aux, greedy(logits)), (greedy(logits), None)
        q = probabilities(logits, sampling)
        nxt = jax.random.categorical(k, jnp.log(q), axis=-1).astype(jnp.int32)  # d ~ q exactly
        return (aux, nxt), (nxt, q)

    keys = jax.random.split(key, n_draft + 1) if sampled else jnp.arange(n_draft + 1)
    (aux, _), (drafts, q) = jax.lax.scan(step, (aux, last), keys)
    drafts = drafts[:n_draft].T
    q = None if q is None else jnp.moveaxis(q[:n_draft], 0, 1)
    return drafts, q, aux


@partial(jax.jit, static_argnames=("graphs", "dgraphs", "sampling", "source", "n_draft",
                                   "ngram"), donate_argnames=("state", "cache"))
def _decode(graphs: LayerGraphs, weights: LayerWeights, dgraphs, dweights, state: SpecState,
            cache: DecodeCache, until, stop_tokens, sampling: Sampling | None, source: str,
            n_draft: int, ngram: int):
    g = n_draft
    n_max = state.tokens.shape[1] - g - 1
    sampled = sampling is not None and not sampling.greedy
    cols = jnp.arange(g + 1, dtype=jnp.int32)[None]

    def keep_going(carry):
        st, cache = carry
        live = ~st.done
        room = jnp.max(jnp.where(live, cache.lengths, 0)) + g + 1 <= cache.max_len
        return jnp.any(live & (st.counts < until)) & room

    def one_round(carry):
        st, cache = carry
        if sampled:
            key, k_draft, k_accept = jax.random.split(st.key, 3)
        else:  # greedy: no key to split (threefry is many ops per round on CPU)
            key, k_draft, k_accept = st.key, None, None
        start, live = cache.lengths, ~st.done
        weights_ = loop_weights(graphs, weights, st.rounds)
        lm = outer_model(graphs, weights_)
        aux, q, history = st.aux, None, st.history
        if source == "draft":
            drafts, q, aux = _draft_propose(dgraphs, loop_weights(dgraphs, dweights,
                                                                  st.rounds),
                                            aux, st.last, k_draft, sampling, g)
        elif source == "lookup":
            drafts, _ = ngram_propose(history, start + 1, ngram, g)
        else:
            drafts = st.drafts
        h, cache = hidden(graphs, weights_, jnp.concatenate([st.last[:, None], drafts], 1),
                          cache)
        n, nxt = accept(k_accept, drafts, lm.project(h, _peft(cache)), sampling, q)
        emitted = jnp.where(cols < n[:, None], jnp.pad(drafts, ((0, 0), (0, 1))),
                            nxt[:, None])                                        # [b,γ+1]
        # A row emits the accepted drafts and the target's token, cut after a stop token
        # and at max_new_tokens; done rows emit nothing.
        is_stop = jnp.isin(emitted, stop_tokens) & (cols <= n[:, None])
        stop_at = jnp.argmax(is_stop, axis=1)
        e = jnp.where(jnp.any(is_stop, axis=1), stop_at + 1, n + 1)
        e = jnp.where(live, jnp.minimum(e, n_max - st.counts), 0)
        stopped = jnp.any(is_stop & (cols < e[:, None]), axis=1)
        counts = st.counts + e
        tokens = _write(st.tokens, jnp.where(cols < e[:, None], emitted, PAD), st.counts)
        cache = dataclasses.replace(cache, lengths=start + e)
        drafts_next = st.drafts
        if source == "draft":
            aux = dataclasses.replace(aux, lengths=st.aux.lengths + e)  # its own slots
        elif source == "lookup":
            history = _write(history, emitted, start + 1)
        elif source == "medusa":
            drafts_next = _medusa_drafts(lm, _at(h, jnp.maximum(e - 1, 0)), g)
        else:
            drafts_next, aux = _mtp_drafts(lm, h, emitted, e, start, aux, g, _peft(cache))
        new = SpecState(
            tokens=tokens, counts=counts,
            last=jnp.where(e > 0, _at(emitted, jnp.maximum(e - 1, 0)), st.last),
            done=st.done | stopped | (counts >= n_max), key=key, history=history,
            drafts=drafts_next, aux=aux, rounds=st.rounds + live.astype(jnp.int32),
            accepted=st.accepted + jnp.where(live, n, 0))
        return new, cache

    state, cache = jax.lax.while_loop(keep_going, one_round, (state, cache))
    return replicated(graphs, state), cache


class SpecDecoder:
    """An Engine's speculative generate/stream (the Engine delegates to it)."""

    def __init__(self, engine, spec: Speculative):
        spec.check(engine.cfg)
        self.engine, self.spec = engine, spec
        self.dgraphs = self.dweights = None
        if spec.source == "draft":   # laid out over the target's mesh, as its weights are
            self.dgraphs, self.dweights = split_model(spec.draft, engine.mesh,
                                                      engine.graphs.keep_quantized or None)
        self.stats = None

    def _aux_cache(self, batch: int, slots: int):
        e, spec = self.engine, self.spec
        if spec.source == "draft":
            return DecodeCache.create(self.dgraphs.cfg, batch, slots, e.cache_dtype, e.mesh)
        if spec.source == "mtp":  # one layer's buffers per MTP module
            cfg = dataclasses.replace(e.cfg, n_layers=e.cfg.mtp_depth, sliding_layers=None,
                                      mlp_only_layers=())
            return DecodeCache.create(cfg, batch, slots, e.cache_dtype, e.mesh)
        return None

    def start(self, prompts, max_new_tokens: int, key, sampling, stops, adapter_ids=None):
        """Prefill checked prompts; stops: the engine's checked stop-token array;
        adapter_ids: each row's adapter (rows of a prefix adapter start P slots in)."""
        e, g = self.engine, self.spec.n_draft
        b = len(prompts)
        rows = adapter_ids if adapter_ids is not None else [-1] * b
        virtual = max(e.virtual_tokens(a) for a in rows)
        t = round_up(max(len(p) for p in prompts))
        slots = round_up(virtual + max(t, max(len(p) for p in prompts) + max_new_tokens - 1
                                       + g + 1))
        tokens = np.zeros((b, t), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = p
        with e._on_mesh():
            return _prefill(e.graphs, e.weights, self.dgraphs, self.dweights, tokens,
                            np.asarray([len(p) for p in prompts], np.int32),
                            e.new_cache(b, slots, adapter_ids), self._aux_cache(b, slots),
                            key, stops, sampling, self.spec.source, g, max_new_tokens)

    def decode(self, state, cache, until: int, sampling, stops):
        """Run the loop until every live row has `until` tokens, all are done, or the
        cache is full; records `stats`."""
        e = self.engine
        with e._on_mesh():
            state, cache = _decode(e.graphs, e.weights, self.dgraphs, self.dweights, state,
                                   cache, np.int32(until), stops, sampling, self.spec.source,
                                   self.spec.n_draft, self.spec.ngram)
        self._record(state)
        return state, cache

    def _record(self, state):
        counts, rounds, accepted = (np.asarray(x, np.int64) for x in jax.device_get(
            (state.counts, state.rounds, state.accepted)))
        total = int(rounds.sum())
        self.stats = {"rounds": total,
                      "acceptance_rate": float(accepted.sum() / max(total * self.spec.n_draft, 1)),
                      "tokens_per_forward": float((counts.sum() - len(counts)) / max(total, 1))}

    def generate(self, prompts, max_new_tokens, sampling, key, stops, adapter_ids=None):
        state, cache = self.start(prompts, max_new_tokens, key, sampling, stops, adapter_ids)
        state, cache = self.decode(state, cache, max_new_tokens, sampling, stops)
        tokens, counts = jax.device_get((state.tokens, state.counts))
        return [row[:n].tolist() for row, n in zip(tokens, counts)]

    def stream(self, prompts, max_new_tokens, sampling, key, stops, chunk, adapter_ids=None):
        state, cache = self.start(prompts, max_new_tokens, key, sampling, stops, adapter_ids)
        sent = np.zeros(len(prompts), np.int64)
        previous = None
        while True:
            tokens, counts, done = jax.device_get((state.tokens, state.counts, state.done))
            yield [row[s:n].tolist() for row, s, n in zip(tokens, sent, counts)]
            sent = counts.astype(np.int64)
            if done.all() or (previous is not None and (counts == previous).all()):
                return  # finished, or no progress (the cache is full)
            previous = counts.copy()
            state, cache = self.decode(state, cache, int(counts[~done].min()) + chunk,
                                       sampling, stops)
