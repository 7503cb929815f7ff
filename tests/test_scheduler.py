"""Continuous batching over the paged cache: every request's greedy tokens equal the static
engine's (`generate`, rows independent) under random arrivals, lengths, page sizes,
preemptions and prefix sharing (copy-on-write included); the pool is whole afterwards;
cancellation frees pages at once; per-row sampling draws from the right distribution
(chi-square against ops.sampling.probabilities) and a request's seed fixes its tokens
however it is batched; bad requests are refused in one line; the memory planner."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest
from scipy import stats

from helpers import drive

from jaxlm.infer import generate
from jaxlm.infer.pages import PagePool, page_keys
from jaxlm.infer.scheduler import Request, Scheduler
from jaxlm.model import Config, create
from jaxlm.model.io.tokenizer import ByteTokenizer
from jaxlm.model.memory import main as memory_main, pages_for, parse_bytes
from jaxlm.ops.sampling import Sampling, probabilities, sample_rows

CFG = Config(vocab_size=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
             max_position=96, init_std=0.3)
LM = create(CFG, 0)


def reference(lm, reqs):
    """The static engine, all prompts as one batch (its rows are independent: test_infer),
    cut at each request's max_tokens and first stop token."""
    longest = max(r.max_tokens for r in reqs)
    outs = generate(lm, [list(r.prompt) for r in reqs], max_new_tokens=longest)
    want = {}
    for r, o in zip(reqs, outs):
        o = o[:r.max_tokens]
        for i, t in enumerate(o):
            if t in r.stop_tokens:
                o = o[:i + 1]
                break
        want[r.id] = o
    return want


def random_requests(rng, n, shared=None):
    reqs = []
    for i in range(n):
        plen = int(rng.integers(1, 40))
        prompt = rng.integers(0, CFG.vocab_size, plen).tolist()
        if shared is not None and i % 2:
            prompt = shared + prompt[:8]
        reqs.append((int(rng.integers(0, 12)),
                     Request(prompt, max_tokens=int(rng.integers(1, 24)),
                             stop_tokens=(int(rng.integers(0, CFG.vocab_size)),) if i % 3 == 0
                             else ())))
    return reqs


@pytest.mark.parametrize("page_size,n_pages,budget,steps", [(4, 40, 32, 4), (8, 14, 16, 1)])
def test_greedy_equals_generate_under_random_arrivals_and_preemption(page_size, n_pages,
                                                                     budget, steps):
    rng = np.random.default_rng(page_size)
    shared = rng.integers(0, CFG.vocab_size, 20).tolist()
    arrivals = random_requests(rng, 10, shared)
    sched = Scheduler(LM, page_size=page_size, n_pages=n_pages, max_seqs=6,
                      max_batched_tokens=budget, decode_steps=steps)
    if page_size == 4:   # a warmed-up scheduler never compiles while serving
        assert sched.warmup() == sched.menu.count(sched.decode_steps)
    menu = set(sched.shapes)
    got = drive(sched, arrivals)
    want = reference(LM, [r for _, r in arrivals])
    assert got == want
    sched.pool.check_whole()
    assert sched.pool.in_use == 0 and not sched.running and sched.free_rows
    stats_ = sched.stats()
    if n_pages == 14:   # 6 rows of up to 64 tokens cannot fit 14 pages of 8
        assert stats_["preemptions"] > 0
    assert stats_["prefix_hit_tokens"] > 0
    assert sched.compiled_programs <= sched.menu.count(sched.decode_steps)
    if menu:
        assert sched.shapes == menu


def test_prefix_pages_are_shared_and_copied_on_write():
    z = 4
    sched = Scheduler(LM, page_size=z, n_pages=40, max_seqs=6, max_batched_tokens=32)
    system = list(range(1, 13))                       # 3 full pages
    a = Request(system + [20, 21], max_tokens=5)
    drive(sched, [(0, a)])
    assert sched.pool.in_use == 0 and len(sched.pool.cached) >= 3
    b = Request(system + [30], max_tokens=5)          # reuses 3 pages, prefills 1 token
    c = Request(list(system), max_tokens=5)           # all matched: the last token is
    got = drive(sched, [(0, b), (0, c)])              # recomputed into a copied page
    assert sched.counts["prefix_hit_tokens"] == 12 + 11
    assert sched.counts["copies_on_write"] == 1
    assert got == reference(LM, [b, c])
    sched.pool.check_whole()
    # the shared pages were not written: a fresh request still matches them exactly
    d = Request(list(system) + [40], max_tokens=3)
    assert drive(sched, [(0, d)]) == reference(LM, [d])


@pytest.mark.parametrize("cfg", [
    CFG.replace(sliding_window=6),
    CFG.replace(attention="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                v_head_dim=8, n_kv_heads=4),
    CFG.replace(attention_impl="pallas", sliding_window=6),   # the kernel, interpreted
], ids=["window", "mla", "pallas"])
def test_windows_mla_and_the_kernel_through_the_scheduler(cfg):
    lm = create(cfg, 1)
    rng = np.random.default_rng(3)
    arrivals = random_requests(rng, 5)
    sched = Scheduler(lm, page_size=4, n_pages=64, max_seqs=4, max_batched_tokens=16)
    want = reference(create(cfg.replace(attention_impl="xla"), 1), [r for _, r in arrivals])
    assert drive(sched, arrivals) == want
    sched.pool.check_whole()


def test_cancel_frees_pages_at_once():
    sched = Scheduler(LM, page_size=4, n_pages=40, max_seqs=6, max_batched_tokens=32,
                      prefix_sharing=False)
    a, b = Request(list(range(30)), max_tokens=40), Request([1, 2, 3], max_tokens=40)
    sched.submit(a), sched.submit(b)
    sched.step()
    used = sched.pool.in_use
    assert sched.cancel(a.id) and sched.pool.in_use == used - 8   # 30 prompt tokens: 8 pages
    assert not sched.cancel(a.id)
    c = Request([5], max_tokens=3)
    sched.submit(c)
    assert sched.cancel(c.id) and c.id not in [s.req.id for s in sched.waiting]
    while sched.has_work:
        sched.step()
    assert sched.pool.in_use == 0
    sched.pool.check_whole()


def test_stop_strings_end_a_request_where_a_plain_scan_finds_them():
    """Greedy output cut where its decoded text first contains the stop string (a plain
    scan over prefixes of generate's tokens), with K = 4 tokens a call."""
    tok = ByteTokenizer()
    prompt = [33, 40, 35, 47, 34]
    full = generate(LM, [prompt], max_new_tokens=40)[0]
    stop = tok.decode(full[20:22])       # two bytes from the middle of the output
    cut = next(i for i in range(1, 41) if stop in tok.decode(full[:i]))
    sched = Scheduler(LM, tokenizer=tok, page_size=4, n_pages=40, max_seqs=6,
                      max_batched_tokens=32)
    r = Request(prompt, max_tokens=40, stop_strings=(stop,))
    assert drive(sched, [(0, r)])[r.id] == full[:cut]
    sched.pool.check_whole()


def test_a_seed_fixes_the_tokens_however_batched():
    s = Sampling(temperature=1.2, top_k=20, top_p=0.9)
    alone = Scheduler(LM, page_size=4, n_pages=13, max_seqs=4, max_batched_tokens=16)
    r = Request([3, 4, 5], max_tokens=12, sampling=s, seed=11)
    got_alone = drive(alone, [(0, r)])[r.id]
    mixed = Scheduler(LM, page_size=4, n_pages=13, max_seqs=4, max_batched_tokens=16)
    others = [(0, Request(list(range(1, 26)), max_tokens=20)),
              (0, Request([7, 8], max_tokens=20, sampling=Sampling(temperature=0.7), seed=2))]
    r2 = Request([3, 4, 5], max_tokens=12, sampling=s, seed=11)
    got_mixed = drive(mixed, others + [(2, r2)])[r2.id]
    assert got_alone == got_mixed
    assert mixed.stats()["preemptions"] > 0
    r3 = Request([3, 4, 5], max_tokens=12, sampling=s, seed=12)
    assert drive(alone, [(0, r3)])[r3.id] != got_alone


def test_sample_rows_matches_each_rows_distribution():
    """Four rows with different settings in one call, 40k draws each, chi-square against
    ops.sampling.probabilities (the whole-vocabulary reference) of that row's setting."""
    v, n = 12, 40_000
    logits = jax.random.normal(jax.random.PRNGKey(0), (4, v)) * 1.5
    settings = [Sampling(temperature=0.0), Sampling(temperature=1.3, top_p=0.8),
                Sampling(temperature=0.7, top_k=4), Sampling(temperature=1.0, min_p=0.1)]
    temp = jnp.array([s.temperature for s in settings])
    top_k = jnp.array([s.top_k or 0 for s in settings])
    top_p = jnp.array([s.top_p or 1.0 for s in settings])
    min_p = jnp.array([s.min_p or 0.0 for s in settings])
    keys = jax.random.split(jax.random.PRNGKey(1), n * 4).reshape(n, 4, 2)
    draws = np.asarray(jax.jit(jax.vmap(
        lambda k: sample_rows(k, logits, temp, top_k, top_p, min_p)))(keys))
    for row, s in enumerate(settings):
        p = np.asarray(probabilities(logits[row:row + 1], s), np.float64)[0]
        counts = np.bincount(draws[:, row], minlength=v)
        assert counts[p == 0].sum() == 0, (row, counts, p)
        if s.greedy:
            continue
        keep = p > 0
        chi = stats.chisquare(counts[keep], p[keep] / p[keep].sum() * counts.sum())
        assert chi.pvalue > 1e-3, (row, chi)


def test_bad_requests_and_settings_are_refused_in_one_line():
    sched = Scheduler(LM, page_size=8, n_pages=6, max_seqs=2, max_batched_tokens=16)
    for req, msg in [(Request([], 4), "non-empty"), (Request([1, 99], 4), r"\[0, 48\)"),
                     (Request([1], 0), "max_tokens"), (Request([1] * 90, 10), "context"),
                     (Request([1] * 40, 20), "pages"), (Request([1], 2, stop_strings=("x",)),
                                                        "tokenizer")]:
        with pytest.raises(ValueError, match=msg):
            sched.submit(req)
    assert not sched.has_work
    with pytest.raises(ValueError, match="max_seqs"):
        Scheduler(LM, max_seqs=8, max_batched_tokens=4)
    with pytest.raises(ValueError, match="not both"):
        Scheduler(LM, kv_memory=1 << 20, n_pages=4)


def test_page_pool_bookkeeping_and_keys():
    pool = PagePool(4, 2)
    keys = page_keys([1, 2, 3, 4, 5], 2)
    assert len(keys) == 2 and keys != page_keys([1, 2, 3, 5, 5], 2)
    assert page_keys([9, 9, 3, 4], 2)[1] != keys[1]      # chained: the parent matters
    a, b = pool.allocate(), pool.allocate()
    pool.register(a, keys[0]), pool.register(b, keys[1])
    pool.release([a, b])
    assert pool.available == 4 and len(pool.cached) == 2
    assert pool.match(keys) == [a, b] and pool.in_use == 2
    pool.release([a, b])
    for _ in range(4):                                   # evicts the cached pages last
        pool.allocate()
    assert pool.match(keys) == [] and pool.available == 0
    pool.check_whole()


def test_memory_planner_reports_pages_and_tokens(capsys):
    assert parse_bytes("64MiB") == 64 << 20 and parse_bytes("1.5GB") == 1_500_000_000
    with pytest.raises(ValueError, match="as a size"):
        parse_bytes("lots")
    per_token = 2 * CFG.n_layers * CFG.num_kv_heads * CFG.dim_per_head * 4
    assert pages_for(CFG, 1 << 20, 16) == (1 << 20) // (per_token * 16)
    sched = Scheduler(LM, kv_memory=1 << 20, page_size=16, max_seqs=2, max_batched_tokens=16)
    assert sched.capacity_tokens == pages_for(CFG, 1 << 20, 16) * 16
    assert memory_main(["--preset", "tiny", "--kv-memory", "64MiB", "--context", "1024"]) == 0
    assert "1024 pages of 16 tokens = 16384 tokens" in capsys.readouterr().out
