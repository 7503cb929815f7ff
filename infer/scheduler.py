"""Continuous batching over a paged KV cache: requests join and leave between steps.

    sched = Scheduler(lm, kv_memory=512 << 20, max_seqs=16, max_batched_tokens=256)
    sched.submit(Request(prompt=ids, max_tokens=64, sampling=Sampling(temperature=0.7)))
    while sched.has_work:
        for event in sched.step():      # Event(id, tokens, finished, reason)
            ...

Each `step` is one jitted forward over a PACKED batch of T tokens (model.cache.PageIndex):
one token for every running sequence that is decoding, and chunks of the prompts of
sequences still prefilling, under a token budget (`max_batched_tokens`) and a row limit
(`max_seqs`) — vLLM's chunked prefill, so a long prompt never stalls the decoders. Every
row whose tokens reach the end of what it knows samples its next token with its own
settings and key (fold_in(seed, tokens generated so far), so a request draws the same
tokens however it was batched or preempted).

Memory: the pool's pages (infer/pages.py) are taken as sequences grow and returned when
they end. When a running sequence needs a page and none is left, the newest running
sequence is preempted: its pages are released (full ones stay findable by their prefix
key) and it waits at the head of the queue to be recomputed from its prompt and the
tokens it already generated, as vLLM's recompute preemption does.

Shapes: the decode segment is always `max_seqs` rows; the prefill segment is m rows × c
tokens, m and c powers of two (c ≥ 16) with m·c ≤ 2·max_batched_tokens; the block tables'
width is a power of two of pages (≥ 4) covering the step's longest row, up to max_len. So
a program is one (m, c, pages): a few dozen at most, and steady decode of similar lengths
reuses one or two (`compiled_programs`; benchmarks/serve.py reports the count).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import uuid

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.model.cache import PageIndex, PagedRows, paged_buffers
from jaxlm.model.memory import kv_bytes_per_token, pages_for
from jaxlm.model.transformer import CausalLM
from jaxlm.ops.sampling import Sampling, sample_rows

from .forward import outer_model, paged_hidden, split_model
from .pages import PagePool, page_keys


@dataclasses.dataclass
class Request:
    """One generation request. sampling None (or temperature 0) is greedy; a stop token
    ends the request and is its last token; a stop string ends it once the decoded output
    contains it (the server trims the text)."""
    prompt: list
    max_tokens: int = 16
    sampling: Sampling | None = None
    seed: int = 0
    stop_tokens: tuple = ()
    stop_strings: tuple = ()
    id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)


@dataclasses.dataclass
class Event:
    """What one step did for one request: its new tokens, and whether it finished
    (reason "stop": a stop token or string; "length": max_tokens reached)."""
    id: str
    tokens: list
    finished: bool = False
    reason: str | None = None


@dataclasses.dataclass
class _Seq:
    req: Request
    order: int                 # admission order; the largest is preempted first
    tokens: list               # prompt, then generated tokens
    n_prompt: int
    computed: int = 0          # tokens whose K/V are in the pages
    pages: list = dataclasses.field(default_factory=list)
    keys: list = dataclasses.field(default_factory=list)   # keys of full pages, in order
    registered: int = 0        # full pages already made findable
    row: int = -1

    @property
    def generated(self) -> list:
        return self.tokens[self.n_prompt:]


@functools.partial(jax.tree_util.register_dataclass, data_fields=[
    "tokens", "positions", "pages", "last", "temperature", "top_k", "top_p", "min_p",
    "seeds", "counters", "copy_src", "copy_dst"], meta_fields=[])
@dataclasses.dataclass
class _StepInputs:
    tokens: jax.Array        # [T]
    positions: jax.Array     # [T]
    pages: PageIndex
    last: jax.Array          # [n] each row's last token's index in T
    temperature: jax.Array   # [n] float; 0 = greedy
    top_k: jax.Array         # [n] int; 0 = off
    top_p: jax.Array         # [n] float; 1 = off
    min_p: jax.Array         # [n] float; 0 = off
    seeds: jax.Array         # [n] int
    counters: jax.Array      # [n] tokens the row has generated (the key's fold-in)
    copy_src: jax.Array      # [n] pages copied before the step (copy-on-write) ...
    copy_dst: jax.Array      # [n] ... into these (P: no copy)


def _step(graphs, weights, pools, x: _StepInputs):
    """Copy-on-write copies, one packed forward, then one token per row ([n])."""
    pools = tuple(tuple(buf.at[x.copy_dst].set(buf[jnp.minimum(x.copy_src, buf.shape[0] - 1)],
                                               mode="drop") for buf in layer)
                  for layer in pools)
    h, pools = paged_hidden(graphs, weights, x.tokens[None], x.positions[None], pools,
                            x.pages)
    logits = outer_model(graphs, weights).project(h[:, x.last])[0]          # [n,v]
    keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.PRNGKey(s), c))(
        x.seeds, x.counters)
    return sample_rows(keys, logits, x.temperature, x.top_k, x.top_p, x.min_p), pools


@functools.lru_cache(maxsize=8)
def _compiled_step(graphs):
    """_step with the model's graphs bound: as a static jit argument they would be hashed
    on every step (~1 ms); cached, so schedulers of one model share compiled programs."""
    return jax.jit(functools.partial(_step, graphs), donate_argnums=(1,))


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class Scheduler:
    """Continuous batching of Requests over a paged cache (see the module docstring).

    page_size: slots per page (z). kv_memory: bytes for the page pools of all layers
    (n_pages derived from it); or n_pages directly; default: room for max_seqs sequences
    of max_len. max_len: prompt + generated tokens per request (default the model's
    max_position). tokenizer: needed only for stop strings. prefix_sharing: reuse full
    pages of earlier prompts. cache_dtype: the pools' dtype (default the model's)."""

    def __init__(self, lm: CausalLM, *, tokenizer=None, page_size: int = 16,
                 kv_memory: int | None = None, n_pages: int | None = None, max_seqs: int = 16,
                 max_batched_tokens: int = 256, max_len: int | None = None,
                 prefix_sharing: bool = True, cache_dtype=None):
        cfg = self.cfg = lm.cfg
        if getattr(lm, "prefix", None) is not None:
            raise ValueError("the paged scheduler serves LoRA and bottleneck adapters, not "
                             "prefix tuning (its virtual tokens would need their own pages); "
                             "use jaxlm.infer.Engine for prefix-tuned models")
        for name, v in (("page_size", page_size), ("max_seqs", max_seqs),
                        ("max_batched_tokens", max_batched_tokens)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if max_batched_tokens < max_seqs:
            raise ValueError(f"max_batched_tokens ({max_batched_tokens}) must be >= max_seqs "
                             f"({max_seqs}): every running sequence decodes one token a step")
        self.max_len = int(max_len or cfg.max_position)
        self.vocab_size = cfg.vocab_size
        self.page_size, self.max_seqs = page_size, max_seqs
        self.max_batched_tokens = max_batched_tokens
        self.pages_per_seq = -(-self.max_len // page_size)
        dtype = jnp.dtype(cache_dtype or cfg.dtype)
        self.bytes_per_token = kv_bytes_per_token(cfg, dtype=dtype.name)
        if kv_memory is not None and n_pages is not None:
            raise ValueError("give kv_memory or n_pages, not both")
        if kv_memory is not None:
            n_pages = pages_for(cfg, kv_memory, page_size, dtype.name)
        self.pool = PagePool(n_pages or max_seqs * self.pages_per_seq, page_size)
        self.graphs, self.weights = split_model(lm)
        self._step = _compiled_step(self.graphs)
        self.pools = tuple(paged_buffers(cfg, self.pool.n_pages, page_size, dtype)
                           for _ in range(cfg.n_layers))
        self.tokenizer, self.prefix_sharing = tokenizer, prefix_sharing
        self.waiting: collections.deque[_Seq] = collections.deque()
        self.running: dict[str, _Seq] = {}
        self.free_rows = list(range(max_seqs))
        self._order = itertools.count()
        self.shapes: set[int] = set()
        self.counts = collections.Counter()   # prefix_hit_tokens, preemptions, tokens

    # ---- requests ---------------------------------------------------------------------

    @property
    def capacity_tokens(self) -> int:
        """Tokens the pool holds (what the --kv-memory planner reports)."""
        return self.pool.n_pages * self.page_size

    def check(self, req: Request) -> None:
        """One-line ValueError for a request that can never run."""
        p = req.prompt
        if not isinstance(p, (list, tuple)) or not p:
            raise ValueError("the prompt must be a non-empty list of token ids")
        if not all(isinstance(t, (int, np.integer)) and 0 <= t < self.vocab_size for t in p):
            raise ValueError(f"prompt token ids must be ints in [0, {self.vocab_size})")
        if not isinstance(req.max_tokens, int) or req.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {req.max_tokens!r}")
        if len(p) + req.max_tokens > self.max_len:
            raise ValueError(f"the prompt ({len(p)} tokens) plus max_tokens "
                             f"({req.max_tokens}) exceeds the context of {self.max_len} "
                             f"tokens; shorten the prompt or lower max_tokens")
        need = -(-(len(p) + req.max_tokens) // self.page_size)
        if need > self.pool.n_pages:
            raise ValueError(f"the request needs {need} pages and the pool has "
                             f"{self.pool.n_pages}; raise kv_memory")
        if not all(isinstance(t, (int, np.integer)) and 0 <= t < self.vocab_size
                   for t in req.stop_tokens):
            raise ValueError(f"stop tokens must be ids in [0, {self.vocab_size})")
        if req.stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model serves token ids only")

    def submit(self, req: Request) -> None:
        self.check(req)
        self.waiting.append(_Seq(req, -1, [int(t) for t in req.prompt], len(req.prompt)))

    def cancel(self, request_id: str) -> bool:
        """Drop a request, freeing its pages now. False if it is not queued or running."""
        seq = self.running.get(request_id)
        if seq is not None:
            self._retire(seq)
            return True
        for seq in self.waiting:
            if seq.req.id == request_id:
                self.waiting.remove(seq)
                return True
        return False

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def compiled_programs(self) -> int:
        return len(self.shapes)

    def stats(self) -> dict:
        return {"waiting": len(self.waiting), "running": len(self.running),
                "pages_used": self.pool.in_use, "pages_total": self.pool.n_pages,
                "pages_cached": len(self.pool.cached),
                "tokens_total": self.counts["tokens"],
                "prefix_hit_tokens": self.counts["prefix_hit_tokens"],
                "preemptions": self.counts["preemptions"],
                "copies_on_write": self.counts["copies_on_write"],
                "compiled_programs": self.compiled_programs}

    # ---- one step ---------------------------------------------------------------------

    def step(self) -> list[Event]:
        """Schedule, run one packed forward, and report each request's new tokens."""
        work, copies = self._schedule()
        if not work:
            return []
        sampled = self._run(work, copies)
        events = []
        for seq, n in work:
            seq.computed += n
            self._register_full_pages(seq)
            if seq.row in sampled:
                events.append(self._emit(seq, sampled[seq.row]))
        return events

    def _schedule(self):
        """[(seq, tokens this step)] and the copy-on-write pairs, running ones first."""
        budget, work, copies = self.max_batched_tokens, [], []
        preempted = self.counts["preemptions"]
        for seq in sorted(self.running.values(), key=lambda s: s.order):
            if seq.req.id not in self.running:   # preempted by an older one just now
                continue
            n = min(len(seq.tokens) - seq.computed, budget, self._chunk_cap(work))
            if n < 1:
                break
            while not self._reserve(seq, seq.computed + n):
                victim = max(self.running.values(), key=lambda s: s.order)
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                work.append((seq, n))
                budget -= n
        # No admissions in a step that had to preempt: pages are short.
        while (self.waiting and self.free_rows and budget > 0
               and self.counts["preemptions"] == preempted):
            admitted = self._admit(self.waiting[0], min(budget, self._chunk_cap(work)), copies)
            if admitted is None:
                break
            self.waiting.popleft()
            work.append(admitted)
            budget -= admitted[1]
        return work, copies

    def _chunk_cap(self, work) -> int:
        """The longest chunk one more sequence may bring so that the prefill segment,
        padded to m rows × c tokens (powers of two), stays within twice the token budget
        (1: only a decode-sized token fits)."""
        chunks = [k for _, k in work if k > 1]
        m = _next_pow2(len(chunks) + 1)
        cap = 1 << (2 * self.max_batched_tokens // m).bit_length() - 1   # a power of two
        return cap if not chunks or max(16, _next_pow2(max(chunks))) <= cap else 1

    def _admit(self, seq: _Seq, budget: int, copies: list):
        """Take rows and pages for seq's first chunk (matched prefix pages first), or None
        if the pool cannot hold that chunk now."""
        z = self.page_size
        self._extend_keys(seq)
        matched = self.pool.match(seq.keys) if self.prefix_sharing else []
        computed = len(matched) * z
        cow = computed == len(seq.tokens)   # all known: recompute the last token
        computed -= cow
        n = min(len(seq.tokens) - computed, budget)
        need = -(-(computed + n) // z) - len(matched) + cow
        if need > self.pool.available:
            self.pool.release(matched)
            return None
        if cow:   # the last token's slot is in a shared page: write into a private copy
            fresh = self.pool.allocate()
            copies.append((matched[-1], fresh))
            self.counts["copies_on_write"] += 1
            self.pool.release(matched[-1:])
            matched[-1] = fresh
        seq.pages, seq.computed, seq.registered = matched, computed, len(matched) - cow
        seq.order, seq.row = next(self._order), self.free_rows.pop(0)
        self._reserve(seq, computed + n)
        self.running[seq.req.id] = seq
        self.counts["prefix_hit_tokens"] += computed
        return seq, n

    def _reserve(self, seq: _Seq, slots: int) -> bool:
        """Pages for the first `slots` slots of seq; False if the pool ran out."""
        while len(seq.pages) * self.page_size < slots:
            if not self.pool.available:
                return False
            seq.pages.append(self.pool.allocate())
        return True

    def _preempt(self, seq: _Seq) -> None:
        self._retire(seq)
        seq.computed, seq.registered = 0, 0
        self.waiting.appendleft(seq)
        self.counts["preemptions"] += 1

    def _retire(self, seq: _Seq) -> None:
        self.pool.release(seq.pages)
        seq.pages = []
        del self.running[seq.req.id]
        self.free_rows.append(seq.row)
        seq.row = -1

    def _extend_keys(self, seq: _Seq) -> None:
        z, have = self.page_size, len(seq.keys)
        full = seq.tokens[have * z:len(seq.tokens) // z * z]
        seq.keys += page_keys(full, z, seq.keys[-1] if seq.keys else b"")

    def _register_full_pages(self, seq: _Seq) -> None:
        """Full computed pages become findable by their prefix key."""
        if not self.prefix_sharing:
            return
        full = seq.computed // self.page_size
        if full > seq.registered:
            self._extend_keys(seq)
            for i in range(seq.registered, full):
                self.pool.register(seq.pages[i], seq.keys[i])
            seq.registered = full

    def _emit(self, seq: _Seq, token: int) -> Event:
        seq.tokens.append(token)
        self.counts["tokens"] += 1
        req, out = seq.req, seq.generated
        reason = None
        if token in req.stop_tokens:
            reason = "stop"
        elif req.stop_strings and any(s in self.tokenizer.decode(out)
                                      for s in req.stop_strings):
            reason = "stop"
        elif len(out) >= req.max_tokens:
            reason = "length"
        if reason is not None:
            self._retire(seq)
        return Event(req.id, [token], reason is not None, reason)

    # ---- the device step --------------------------------------------------------------

    def _run(self, work, copies) -> dict[int, int]:
        """Pack the work into arrays, run _step, return {row: sampled token} for the rows
        whose chunk reached the end of their known tokens.

        Layout (model.cache.PageIndex): a decode segment of max_seqs rows × 1 token (row r
        of the scheduler at index r; idle rows are padding), then a prefill segment of
        m rows × c tokens for the chunks longer than one token (m, c powers of two)."""
        n, z = self.max_seqs, self.page_size
        chunks = [(seq, k) for seq, k in work if k > 1]
        m, c = (_next_pow2(len(chunks)), max(16, _next_pow2(max(k for _, k in chunks)))) \
            if chunks else (0, 0)
        t = n + m * c
        pages = min(max(4, _next_pow2(max(len(seq.pages) for seq, _ in work))),
                    self.pages_per_seq)
        self.shapes.add((m, c, pages))
        tokens, positions, slots = (np.zeros(t, np.int32), np.zeros(t, np.int32),
                                    np.full(t, -1, np.int32))
        tables = [np.zeros((n, pages), np.int32), np.zeros((m, pages), np.int32)]
        lengths = [np.zeros(n, np.int32), np.zeros(m, np.int32)]
        last = np.zeros(n, np.int32)
        temp, top_p = np.zeros(n, np.float32), np.ones(n, np.float32)
        top_k, min_p = np.zeros(n, np.int32), np.zeros(n, np.float32)
        seeds, counters = np.zeros(n, np.int32), np.zeros(n, np.int32)
        src, dst = np.zeros(n, np.int32), np.full(n, self.pool.n_pages, np.int32)
        for i, (a, b) in enumerate(copies):
            src[i], dst[i] = a, b
        sampling_rows, j = [], 0
        for seq, k in work:
            r = seq.row
            seg, row, i = (0, r, r) if k == 1 else (1, j, n + j * c)
            j += k > 1
            pos = np.arange(seq.computed, seq.computed + k)
            page_ids = np.asarray(seq.pages, np.int32)
            tokens[i:i + k] = seq.tokens[seq.computed:seq.computed + k]
            positions[i:i + k] = pos
            slots[i:i + k] = page_ids[pos // z] * z + pos % z
            tables[seg][row, :len(page_ids)] = page_ids
            lengths[seg][row], last[r] = seq.computed + k, i + k - 1
            if seq.computed + k == len(seq.tokens):
                sampling_rows.append(r)
                s = seq.req.sampling
                if s is not None and not s.greedy:
                    temp[r], top_k[r] = s.temperature, s.top_k or 0
                    top_p[r], min_p[r] = s.top_p or 1.0, s.min_p or 0.0
                seeds[r], counters[r] = seq.req.seed % (1 << 31), len(seq.generated)
        segments = (PagedRows(tables[0], lengths[0], 1),) + (
            (PagedRows(tables[1], lengths[1], c),) if m else ())
        x = _StepInputs(tokens, positions, PageIndex(slots, segments), last, temp, top_k,
                        top_p, min_p, seeds, counters, src, dst)
        out, self.pools = self._step(self.weights, self.pools, x)
        out = np.asarray(out)
        return {r: int(out[r]) for r in sampling_rows}
