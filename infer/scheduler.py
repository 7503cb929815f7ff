"""Continuous batching over a paged KV cache: requests join and leave between steps.

    sched = Scheduler(lm, kv_memory=512 << 20, max_seqs=16, max_batched_tokens=256)
    sched.submit(Request(prompt=ids, max_tokens=64, sampling=Sampling(temperature=0.7)))
    while sched.has_work:
        for event in sched.step():      # Event(id, tokens, finished, reason)
            ...

Deciding and running are apart, as vLLM's scheduler and model runner: this scheduler only
decides (which rows run, which pages they get, what each feeds) and writes a plan
(infer/steps.py's inputs); the Runner (infer/runner.py) owns the weights, the page pools
and the compiled programs on the mesh, and executes it.

Each `step` is one device call (infer/steps.py). While sequences are prefilling it is one
forward over a decode segment (one token for every decoding sequence) and a prefill
segment (chunks of prompts), under a token budget (`max_batched_tokens`) and a row limit
(`max_seqs`) — vLLM's chunked prefill, so a long prompt never stalls the decoders. While
every sequence decodes, it is `decode_steps` tokens per sequence in one call. Every row
whose tokens reach the end of what it knows samples its next token with its own settings
and key (fold_in(seed, tokens generated so far), so a request draws the same tokens
however it was batched or preempted).

Memory: the pool's pages (infer/pages.py) are taken as sequences grow and returned when
they end. When a running sequence needs a page and none is left, the newest running
sequence is preempted: its pages are released (full ones stay findable by their prefix
key) and it waits at the head of the queue to be recomputed from its prompt and the
tokens it already generated, as vLLM's recompute preemption does.

Shapes come from a fixed menu (steps.Shapes): `warmup()` compiles all of it, after which
serving never compiles (`compiled_programs`; tested).

Adapters (`adapters=[...]`, as Engine's): each Request names its own (`adapter`, an index
into the list; -1 the base). LoRA and bottleneck adapters are stacked on the model
(jaxlm.model.peft.attach_stacked) and every token of a step carries its row's index into
the stack, so requests of different adapters share one compiled step. A page's prefix key
starts from its adapter's id, since the same tokens give other K/V under another adapter.
A prefix-tuning adapter's P virtual tokens are written once into pages held for good and
registered under that adapter's keys: a request of the adapter starts with P placeholder
tokens that match those pages as a shared prefix (a partly filled last page is copied into
the request's own page, the copy-on-write path), so its prompt sits at positions P.. as
in CausalLM.init_cache.

Speculative decoding (`speculative=Speculative("lookup", n_draft=γ, ngram=N)`): while every
sequence decodes, a step is `decode_steps` verification rounds in one call instead: each
round a row looks up γ drafts in its own prompt and output on the device (prompt lookup),
feeds its newest token and them, and the target's logits at those γ+1 positions decide,
per row and with the row's own sampling settings, how many drafts it accepts (exact:
greedy equals plain greedy, sampled output keeps the target's distribution;
jaxlm.ops.speculative); it emits them plus one token of the target's own. Pages are
reserved for what the rounds may write; slots of rejected drafts lie past the row's
computed length and are overwritten later.

Mesh (`mesh=`): weights are laid out by the logical-axis rules (tensor-parallel heads and
MLP, experts over 'expert'), every page pool splits its kv heads over 'tensor', and each
step runs as one SPMD program; tokens equal one device's.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import uuid

import numpy as np

from jaxlm.model.cache import cache_dtype as cache_dtype_of, heads_to_layout, slot_axis
from jaxlm.model.memory import kv_bytes_per_token, pages_for
from jaxlm.model.sharding import replicated
from jaxlm.model.transformer import CausalLM
from jaxlm.ops.sampling import Sampling

from .adapter_slots import AdapterSlots
from .adapters import prepare
from .pages import PagePool, page_keys
from .runner import Runner, aux_bytes
from .speculative import Speculative
from .steps import DecodeInputs, MixedInputs, Shapes, SpecInputs


VIRTUAL = -1   # a prefix adapter's virtual token in a sequence's token list (not an id)


def _ahead(tokens: list, pos, depth: int):
    """MTP inputs for the tokens at positions pos of a sequence: [depth, len(pos)], the
    token k+1 after each where known, else -(1+j) for the j-th token this step makes (0:
    the sampled one, j >= 1: the MTP chain's draft j; spec_rows.mixed_extras)."""
    at = pos[None] + np.arange(1, depth + 1)[:, None]
    known = np.asarray(tokens, np.int32)[np.minimum(at, len(tokens) - 1)]
    return np.where(at < len(tokens), known, len(tokens) - 1 - at).astype(np.int32)


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
    adapter: int = -1        # index into the Scheduler's adapters (-1: the base model)


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
    drafts: list | None = None  # medusa/mtp: the drafts made with the newest token

    @property
    def generated(self) -> list:
        return self.tokens[self.n_prompt:]


class Scheduler:
    """Continuous batching of Requests over a paged cache (see the module docstring).

    page_size: slots per page (z). kv_memory: bytes for the page pools of all layers
    (n_pages derived from it); or n_pages directly; default: room for max_seqs sequences
    of max_len. max_len: prompt + generated tokens per request (default the model's
    max_position). tokenizer: needed only for stop strings. prefix_sharing: reuse full
    pages of earlier prompts. cache_dtype: the pools' dtype (default the model's; "int8"
    stores keys and values quantized, with a scale per token and kv head).
    decode_steps: tokens per row per device call while every sequence decodes (K; 1: one
    step per call). keep_quantized: as Engine's (quantized weights read quantized in every
    step; default on GPU/TPU). mesh, adapters, speculative: see the module docstring."""

    def __init__(self, lm: CausalLM, *, tokenizer=None, page_size: int = 16,
                 kv_memory: int | None = None, n_pages: int | None = None, max_seqs: int = 16,
                 max_batched_tokens: int = 256, max_len: int | None = None,
                 prefix_sharing: bool = True, cache_dtype=None, decode_steps: int = 4,
                 keep_quantized: bool | None = None, mesh=None, adapters=None,
                 speculative: Speculative | None = None, max_adapters: int | None = None,
                 max_lora_rank: int | None = None, lora_targets=None):
        cfg = self.cfg = lm.cfg
        dtype = cache_dtype_of(cfg, cache_dtype)
        where = None if mesh is None else replicated(mesh)
        self.slots = None
        if adapters is not None or max_adapters:
            self.slots = AdapterSlots(lm, adapters, max_adapters, dtype, slot_axis(cfg),
                                      where, max_lora_rank, lora_targets)
            lm, self.served = self.slots.build()
        else:
            lm, self.served = prepare(lm, None, False, dtype, slot_axis(cfg), where)
        if self.served.prefixes and cfg.attention == "mla":
            raise ValueError("prefix tuning on an MLA model is not served by the paged "
                             "scheduler (its latent pages hold no per-head K/V); use "
                             "jaxlm.infer.Engine")
        self.stacked = self.served.model_ids is not None
        self.spec = speculative
        if speculative is not None:
            speculative.check(cfg)
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
        if kv_memory is not None and n_pages is not None:
            raise ValueError("give kv_memory or n_pages, not both")
        if kv_memory is not None:   # the draft source's pools take their share
            target = kv_bytes_per_token(cfg, dtype=dtype.name)
            share = target + aux_bytes(speculative, cfg, dtype)
            n_pages = pages_for(cfg, kv_memory * target // share, page_size, dtype.name)
        self.pool = PagePool(n_pages or max_seqs * self.pages_per_seq, page_size)
        if not isinstance(decode_steps, int) or decode_steps < 1:
            raise ValueError(f"decode_steps must be an int >= 1, got {decode_steps!r}")
        self.decode_steps = decode_steps
        self.menu = Shapes(max_seqs, max_batched_tokens, self.pages_per_seq)
        self.runner = Runner(lm, self.pool.n_pages, page_size, dtype, mesh, keep_quantized,
                             speculative)
        self.virtual, self._pinned = {}, {}
        self._place_virtual_tokens([-1, *self.adapter_ids])
        self.tokenizer, self.prefix_sharing = tokenizer, prefix_sharing
        self.waiting: collections.deque[_Seq] = collections.deque()
        self.running: dict[str, _Seq] = {}
        self.free_rows = list(range(max_seqs))
        self._order = itertools.count()
        self.shapes: set[tuple] = set()    # (m, c, table width) or ("decode", K, width)
        self.counts = collections.Counter()   # prefix_hit_tokens, preemptions, tokens

    def _place_virtual_tokens(self, adapters) -> None:
        """Prefix adapters' virtual K/V, written once into pages held for good: their
        full pages are registered under the adapter's keys, so every request of the
        adapter finds them as a shared prefix; a last, partly filled page is copied into
        each request's own page when it starts (the copy-on-write path). Sets
        virtual[adapter] = (P, that partial page or None)."""
        z = self.page_size
        for adapter in adapters:
            if self._slot(adapter) not in self.served.prefixes:
                continue
            layers, p = self.served.prefixes[self._slot(adapter)]
            if -(-p // z) > self.pool.available:
                raise ValueError(f"the page pool has no room for the adapter's {p} virtual "
                                 f"tokens; raise kv_memory")
            pages = [self.pool.allocate() for _ in range(-(-p // z))]
            slots = np.asarray([pages[j // z] * z + j % z for j in range(p)], np.int32)
            values = tuple(tuple(heads_to_layout(buf, slot_axis(self.cfg))[0] for buf in layer)
                           for layer in layers)                        # [P, k, d] each
            self.runner.write(values, slots)
            root = b"" if adapter == -1 else f"adapter {adapter}".encode()
            for page, key in zip(pages, page_keys([VIRTUAL] * p, z, root)):
                self.pool.register(page, key)
            self.virtual[adapter] = (p, pages[-1] if p % z else None)
            self._pinned[adapter] = pages

    # ---- adapters ---------------------------------------------------------------------

    @property
    def adapter_ids(self) -> list[int]:
        """The ids requests may name (Request.adapter); -1, the base, always."""
        return [] if self.slots is None else sorted(self.slots.ids)

    def _slot(self, adapter: int) -> int:
        return -1 if adapter == -1 else self.slots.slot(adapter)

    def load_adapter(self, adapter) -> int:
        """Serve another adapter (an adapted model of this base, or a PEFT directory) in a
        free slot, without compiling: the new stacked weights replace the old, the
        program stays. Returns its id (Request.adapter). Refused in one line when no slot
        is free or the adapter does not fit the stack (rank, target modules)."""
        if self.slots is None:
            raise ValueError("this scheduler has no adapter slots; build it with adapters= "
                             "or max_adapters=")
        new = self.slots.add(adapter)
        try:
            self._rebuild(same_program=True)
            self._place_virtual_tokens([new])
        except ValueError:
            self.slots.remove(new)
            self._rebuild(same_program=False)
            raise
        return new

    def unload_adapter(self, adapter: int) -> None:
        """Stop serving an adapter (its slot becomes free). Refused while requests of it
        are queued or running."""
        if adapter not in self.adapter_ids:
            raise ValueError(f"adapter {adapter!r} is not loaded")
        busy = sum(s.req.adapter == adapter for s in (*self.waiting, *self.running.values()))
        if busy:
            raise ValueError(f"adapter {adapter} has {busy} requests in flight; unload it "
                             f"once they finish")
        self.slots.remove(adapter)
        self._rebuild(same_program=False)
        self.virtual.pop(adapter, None)
        self.pool.release(self._pinned.pop(adapter, []))

    def _rebuild(self, same_program: bool) -> None:
        """The stacked weights of the slots as they are now (a new program only when
        same_program is False: removing the last adapter of its kind may shrink it)."""
        lm, served = self.slots.build()
        self.runner.swap_weights(lm, same_program)
        self.served, self.stacked = served, served.model_ids is not None

    @property
    def history_width(self) -> int:
        """Columns of a speculative call's token history: every slot, and room for one
        round's writes past the last."""
        return self.pages_per_seq * self.page_size + self.spec.n_draft + 1

    @property
    def program(self):
        return self.runner.program

    @property
    def graphs(self):
        return self.runner.graphs

    @property
    def pools(self):
        return self.runner.pools

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
        if not isinstance(req.adapter, (int, np.integer)) or (
                req.adapter != -1 and req.adapter not in self.adapter_ids):
            have = (f"adapters {self.adapter_ids}" if self.adapter_ids
                    else "no adapters (Scheduler(lm, adapters=[...]))")
            raise ValueError(f"adapter {req.adapter!r} does not exist: this scheduler has "
                             f"{have}; -1 is the base model")
        virtual = self.virtual.get(int(req.adapter), (0, None))[0]
        if len(p) + virtual + req.max_tokens > self.max_len:
            what = f" after the adapter's {virtual} virtual tokens" if virtual else ""
            raise ValueError(f"the prompt ({len(p)} tokens{what}) plus max_tokens "
                             f"({req.max_tokens}) exceeds the context of {self.max_len} "
                             f"tokens; shorten the prompt or lower max_tokens")
        need = -(-(len(p) + virtual + req.max_tokens) // self.page_size)
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
        # a prefix adapter's virtual tokens stand first, as placeholders (never fed)
        tokens = [VIRTUAL] * self.virtual.get(int(req.adapter), (0, None))[0]
        tokens += [int(t) for t in req.prompt]
        self.waiting.append(_Seq(req, -1, tokens, len(tokens)))

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
        spec = {}
        if self.spec is not None:
            rounds, c = self.counts["spec_rounds"], self.counts
            spec = {"spec_rounds": rounds, "spec_drafted": c["spec_drafted"],
                    "spec_accepted": c["spec_accepted"], "spec_emitted": c["spec_emitted"]}
        return {**spec, "waiting": len(self.waiting), "running": len(self.running),
                "pages_used": self.pool.in_use, "pages_total": self.pool.n_pages,
                "pages_cached": len(self.pool.cached),
                "tokens_total": self.counts["tokens"],
                "prefix_hit_tokens": self.counts["prefix_hit_tokens"],
                "preemptions": self.counts["preemptions"],
                "copies_on_write": self.counts["copies_on_write"],
                "compiled_programs": self.compiled_programs}

    # ---- one step ---------------------------------------------------------------------

    def step(self) -> list[Event]:
        """Schedule, run one device call, and report each request's new tokens."""
        work, copies = self._schedule()
        if not work:
            return []
        decoding = not copies and all(k == 1 and seq.computed + 1 == len(seq.tokens)
                                      for seq, k in work)
        if decoding and self.spec is not None:
            return self._spec_run([seq for seq, _ in work])
        if decoding and self.decode_steps > 1:
            return self._decode_run([seq for seq, _ in work])
        sampled = self._run(work, copies)
        events = []
        for seq, n in work:
            seq.computed += n
            self._register_full_pages(seq)
            if seq.row in sampled:
                events.append(self._emit(seq, [sampled[seq.row]]))
                if events[-1].finished:
                    self._retire(seq)
        return events

    def _schedule(self):
        """[(seq, tokens this step)] and the copy-on-write pairs, running ones first."""
        budget, work, copies = self.max_batched_tokens, [], []
        preempted = self.counts["preemptions"]
        for seq in sorted(self.running.values(), key=lambda s: s.order):
            if seq.req.id not in self.running:   # preempted by an older one just now
                continue
            n = self._chunk(len(seq.tokens) - seq.computed, budget, work)
            if n < 1:
                continue
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
            admitted = self._admit(self.waiting[0], budget, work, copies)
            if admitted is None:
                break
            self.waiting.popleft()
            work.append(admitted)
            budget -= admitted[1]
        return work, copies

    def _chunk(self, need: int, budget: int, work) -> int:
        """Tokens a sequence that needs `need` more brings this step: one goes in the
        decode segment; a longer chunk must fit the menu's prefill shapes (0: not now)."""
        n = min(need, budget)
        if n <= 1:
            return n
        return min(n, self.menu.chunk_cap([k for _, k in work if k > 1]))

    def _admit(self, seq: _Seq, budget: int, work: list, copies: list):
        """Take rows and pages for seq's first chunk (matched prefix pages first), or None
        if the pool cannot hold that chunk now."""
        z = self.page_size
        self._extend_keys(seq)
        p, partial = self.virtual.get(seq.req.adapter, (0, None))
        # the virtual tokens' full pages are always found (pinned); the rest if sharing
        matched = self.pool.match(seq.keys if self.prefix_sharing else seq.keys[:p // z])
        computed = len(matched) * z
        cow = computed == len(seq.tokens)   # all known: recompute the last token
        computed -= cow
        split = computed < p      # the last virtual page is partly real tokens: copy it
        computed = max(computed, p)
        n = self._chunk(len(seq.tokens) - computed, budget, work)
        need = -(-(computed + n) // z) - len(matched) + cow
        if n < 1 or need > self.pool.available:
            self.pool.release(matched)
            return None
        if split:
            fresh = self.pool.allocate()
            copies.append((partial, fresh))
            matched.append(fresh)
        if cow:   # the last token's slot is in a shared page: write into a private copy
            fresh = self.pool.allocate()
            copies.append((matched[-1], fresh))
            self.counts["copies_on_write"] += 1
            self.pool.release(matched[-1:])
            matched[-1] = fresh
        seq.pages, seq.computed = matched, computed
        seq.registered = len(matched) - cow - split
        seq.order, seq.row = next(self._order), self.free_rows.pop(0)
        self._reserve(seq, computed + n)
        self.running[seq.req.id] = seq
        self.counts["prefix_hit_tokens"] += computed - p
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
        seq.computed, seq.registered, seq.drafts = 0, 0, None
        self.waiting.appendleft(seq)
        self.counts["preemptions"] += 1

    def _retire(self, seq: _Seq) -> None:
        self.pool.release(seq.pages)
        seq.pages = []
        del self.running[seq.req.id]
        self.free_rows.append(seq.row)
        seq.row = -1

    def _extend_keys(self, seq: _Seq) -> None:
        """Keys of seq's full pages; the chain starts from its adapter (other K/V)."""
        z, have = self.page_size, len(seq.keys)
        full = seq.tokens[have * z:len(seq.tokens) // z * z]
        root = b"" if seq.req.adapter == -1 else f"adapter {seq.req.adapter}".encode()
        seq.keys += page_keys(full, z, seq.keys[-1] if seq.keys else root)

    def _model_id(self, seq: _Seq) -> int:
        """seq's index in the model's stacked adapters (-1: none)."""
        a = seq.req.adapter
        return -1 if a == -1 or not self.stacked else int(self.served.model_ids[self._slot(a)])

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

    def _emit(self, seq: _Seq, tokens: list) -> Event:
        """Append sampled tokens until one finishes the request (the rest are dropped);
        the caller retires a finished one once its full pages are registered."""
        req, reason, taken = seq.req, None, []
        for token in tokens:
            seq.tokens.append(token)
            taken.append(token)
            out = seq.generated
            if token in req.stop_tokens:
                reason = "stop"
            elif req.stop_strings and self._stop_string(req, out):
                reason = "stop"
            elif len(out) >= req.max_tokens:
                reason = "length"
            if reason is not None:
                break
        self.counts["tokens"] += len(taken)
        return Event(req.id, taken, reason is not None, reason)

    def _stop_string(self, req: Request, out: list) -> bool:
        """Whether the output now contains a stop string. Only its tail is decoded: a
        string of L characters spans at most 4·L tokens (a token is a byte or more), so
        the check costs the same at token 1 and token 10,000."""
        tail = 4 * max(len(s) for s in req.stop_strings) + 4
        text = self.tokenizer.decode(out[-tail:])
        return any(s in text for s in req.stop_strings)

    # ---- the device calls -------------------------------------------------------------

    def _run(self, work, copies) -> dict[int, int]:
        """One mixed step (infer/steps.py): {row: sampled token} for the rows whose chunk
        reached the end of their known tokens."""
        n, z = self.max_seqs, self.page_size
        chunks = [(seq, k) for seq, k in work if k > 1]
        m, c = self.menu.segment([k for _, k in chunks]) if chunks else (0, 0)
        width = self.menu.table_width(max(len(seq.pages) for seq, _ in work))
        self.shapes.add((m, c, width))
        mtp = self.spec.n_draft if self.spec is not None and self.spec.source == "mtp" else 0
        x = MixedInputs.empty(n, m, c, width, self.pool.n_pages, self.stacked, mtp)
        segments = x.pages.segments
        for i, (a, b) in enumerate(copies):
            x.copy_src[i], x.copy_dst[i] = a, b
        sampling_rows, j = [], 0
        for seq, k in work:
            r = seq.row
            seg, row, i = (segments[0], r, r) if k == 1 else (segments[1], j, n + j * c)
            j += k > 1
            pos = np.arange(seq.computed, seq.computed + k)
            page_ids = np.asarray(seq.pages, np.int32)
            x.tokens[i:i + k] = seq.tokens[seq.computed:seq.computed + k]
            x.positions[i:i + k] = pos
            if self.stacked:
                x.adapters[i:i + k] = self._model_id(seq)
            x.pages.slots[i:i + k] = page_ids[pos // z] * z + pos % z
            seg.block_tables[row, :len(page_ids)] = page_ids
            seg.kv_lengths[row], x.last[r] = seq.computed + k, i + k - 1
            if seq.computed + k == len(seq.tokens):
                sampling_rows.append(r)
                x.sampling.set(r, seq.req, len(seq.generated))
            if mtp:
                x.row_of[i:i + k] = r
                x.ahead[:, i:i + k] = _ahead(seq.tokens, pos, mtp)
        out, drafts = self.runner.run(x)
        if self.program is not None and self.program.carries_drafts:
            for seq, _ in work:   # medusa/mtp: the row's next drafts, made with its token
                if seq.row in sampling_rows:
                    seq.drafts = drafts[seq.row].tolist()
        return {r: int(out[r]) for r in sampling_rows}

    def _decode_run(self, seqs) -> list[Event]:
        """K decode steps in one call while every running sequence decodes. Each row takes
        pages for up to K more slots if the pool has them (never preempting for it) and
        keeps the tokens up to its first finish and within those pages."""
        n, z, steps = self.max_seqs, self.page_size, self.decode_steps
        for seq in seqs:
            room = min(steps, seq.req.max_tokens - len(seq.generated))
            self._reserve(seq, min(seq.computed + room, self.pages_per_seq * z))
        width = self.menu.table_width(max(len(seq.pages) for seq in seqs))
        self.shapes.add(("decode", steps, width))
        x = DecodeInputs.empty(n, width, self.stacked)
        for seq in seqs:
            r = seq.row
            x.tokens[r], x.positions[r] = seq.tokens[-1], seq.computed
            if self.stacked:
                x.adapters[r] = self._model_id(seq)
            x.tables[r, :len(seq.pages)] = seq.pages
            x.lengths[r], x.limits[r] = seq.computed + 1, len(seq.pages) * z
            x.sampling.set(r, seq.req, len(seq.generated))
        out = self.runner.run(x, steps)
        events = []
        for seq in seqs:
            room = len(seq.pages) * z - seq.computed       # slots its writes could use
            event = self._emit(seq, out[:min(steps, room), seq.row].tolist())
            # K/V were written for the token fed first and for each kept token fed after it
            seq.computed += 1 + min(len(event.tokens), steps - 1, room - 1)
            self._register_full_pages(seq)
            if event.finished:
                self._retire(seq)
            events.append(event)
        return events

    def _spec_run(self, seqs) -> list[Event]:
        """decode_steps speculative rounds in one call while every running sequence
        decodes (steps._speculate: drafts by prompt lookup on the device). Each row takes
        pages for what those rounds may write, never past max_tokens or the context
        (never preempting for it), and keeps the tokens up to its first finish."""
        n, z, g = self.max_seqs, self.page_size, self.spec.n_draft
        rounds = self.decode_steps
        for seq in seqs:
            room = min(rounds * (g + 1), seq.req.max_tokens - len(seq.generated) + g)
            self._reserve(seq, min(seq.computed + room, self.pages_per_seq * z))
        width = self.menu.table_width(max(len(seq.pages) for seq in seqs))
        self.shapes.add(("spec", rounds, width))
        x = SpecInputs.empty(n, width, self.history_width, g, self.stacked)
        for seq in seqs:
            r = seq.row
            x.history[r, :len(seq.tokens)] = seq.tokens
            x.lengths[r], x.limits[r] = len(seq.tokens), len(seq.pages) * z
            x.tables[r, :len(seq.pages)] = seq.pages
            x.sampling.set(r, seq.req, len(seq.generated))
            if self.stacked:
                x.adapters[r] = self._model_id(seq)
            if seq.drafts is not None:
                x.drafts[r] = seq.drafts
        out, counts, drafted, accepted, taken, drafts = self.runner.run(x, rounds)
        events = []
        for seq in seqs:
            r = seq.row
            seq.drafts = drafts[r].tolist() if self.program.carries_drafts else None
            event = self._emit(seq, out[r, :counts[r]].tolist())
            # K/V are right for the token fed first and every emitted one but the last
            seq.computed += len(event.tokens)
            self.counts.update(spec_rounds=int(taken[r]), spec_drafted=int(drafted[r]),
                               spec_accepted=int(accepted[r]), spec_emitted=int(counts[r]))
            self._register_full_pages(seq)
            if event.finished:
                self._retire(seq)
            events.append(event)
        return events

    def warmup(self) -> int:
        """Compile every program of the menu now (running each on padding rows, which
        write nothing), so serving never stops to compile. Returns how many."""
        n, stacked = self.max_seqs, self.stacked
        before = set(self.shapes)
        mtp = self.spec.n_draft if self.spec is not None and self.spec.source == "mtp" else 0
        for width in self.menu.pages:
            for m, c in [(0, 0)] + self.menu.prefill:
                self.runner.run(MixedInputs.empty(n, m, c, width, self.pool.n_pages, stacked, mtp))
                self.shapes.add((m, c, width))
            if self.spec is not None:
                self.runner.run(SpecInputs.empty(n, width, self.history_width, self.spec.n_draft,
                                            stacked), self.decode_steps)
                self.shapes.add(("spec", self.decode_steps, width))
            elif self.decode_steps > 1:
                self.runner.run(DecodeInputs.empty(n, width, stacked), self.decode_steps)
                self.shapes.add(("decode", self.decode_steps, width))
        self.runner.ready()
        return len(self.shapes - before)
