"""The one inference core behind the server: the paged scheduler serves stacked adapters per
request, prompt-lookup speculative decoding inside the continuous batch and a mesh, each
equal to the independent reference (transformers + PEFT greedy, the static engine per
adapted model, the same scheduler on one device); per-row speculative sampling keeps the
target's distribution (chi-square); the server's --lora-modules / --prompt-lookup / --mesh
answer concurrent requests for the base and two PEFT LoRAs with each model's own greedy
tokens; speculative decoding of a prefix-tuned model equals plain greedy; bad
combinations are refused in one line; one loader reads every kind of model directory."""
import concurrent.futures
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from helpers import adapted_lm, drive, tiny_lm
from jaxlm.infer import Engine, Speculative
from jaxlm.infer.scheduler import Request, Scheduler
from jaxlm.infer.steps import RowSampling, compiled
from jaxlm.model import Config
from jaxlm.model import peft as P
from jaxlm.model.build import with_heads
from jaxlm.ops.sampling import Sampling, probabilities

CFG = Config(vocab_size=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
             max_position=96, init_std=0.3)
SPECS = [P.LoraSpec(r=2, alpha=4.0, targets=("q_proj", "v_proj")),
         P.LoraSpec(r=5, alpha=3.0, targets=("k_proj", "o_proj", "gate_proj", "down_proj",
                                              "lm_head")),
         P.BottleneckSpec(dim=6, activation="gelu"),
         P.PrefixSpec(tokens=5)]     # virtual tokens: one full page of 4 and a partial one
RNG = np.random.default_rng(0)
# repetitive prompts (prompt lookup finds drafts), ragged lengths, one past a page boundary
PROMPTS = [(RNG.integers(0, 6, 4).tolist() * 9)[:n] for n in (5, 9, 3, 17, 6, 4, 11, 30)]
IDS = [0, 1, 2, -1, 3, 0, 3, -1]
N = 12


@pytest.fixture(scope="module")
def models():
    base = tiny_lm(CFG)
    return base, [adapted_lm(base, s, seed=i + 1) for i, s in enumerate(SPECS)]


def _greedy(base, adapted, ids):
    """Each prompt's greedy tokens from the static engine over its own adapted model (ids:
    each prompt's index into adapted, -1 the base)."""
    out = [None] * len(PROMPTS)
    for a in sorted(set(ids)):   # one batch per model (the engine's rows are independent)
        rows = [i for i, x in enumerate(ids) if x == a]
        got = Engine(base if a == -1 else adapted[a]).generate([PROMPTS[i] for i in rows],
                                                                max_new_tokens=N)
        for i, g in zip(rows, got):
            out[i] = g
    return out


@pytest.fixture(scope="module")
def wanted(models):
    return _greedy(*models, IDS)


def _serve(sched, stops=()):
    reqs = [Request(prompt=p, max_tokens=N, adapter=a, id=str(i), stop_tokens=stops)
            for i, (p, a) in enumerate(zip(PROMPTS, IDS))]
    # staggered arrivals: requests join a batch already decoding (and speculating)
    out = drive(sched, [(2 * i, r) for i, r in enumerate(reqs)])
    sched.pool.check_whole()
    return [out[str(i)] for i in range(len(reqs))]


def test_scheduler_rows_of_different_adapters_equal_each_model_alone(models, wanted):
    """LoRAs of ranks 2 and 5 on different targets (lm_head too), a bottleneck, a prefix
    (its virtual tokens in pinned pages) and the base, one batch of one compiled step;
    small pages so rows cross page boundaries and a pool tight enough to preempt
    (speculation over adapters: test_scheduler_speculates_with_every_source)."""
    base, adapted = models
    sched = Scheduler(base, adapters=adapted, max_seqs=4, page_size=4, max_batched_tokens=32,
                      n_pages=40)
    assert _serve(sched) == wanted


@pytest.fixture(scope="module")
def heads_models():
    """A model with 2 MTP modules and 3 Medusa heads, a LoRA (lm_head too) and a prefix
    adapter of it, each adapted model's greedy tokens (the static engine, no
    speculation), and a one-layer draft model."""
    base = with_heads(tiny_lm(CFG), 2, 3, seed=1)
    adapted = [adapted_lm(base, SPECS[1], seed=2), adapted_lm(base, SPECS[3], seed=3)]
    return base, adapted, _greedy(base, adapted, HEAD_IDS), tiny_lm(CFG.replace(n_layers=1),
                                                                      seed=7)


HEAD_IDS = [-1, 0, 1, -1, 0, -1, 1, -1]


def _argmax_where_clear(logits):
    """argmax of logits [..., v], and whether its lead over the runner-up is clear of
    float noise (ties are skipped, not guessed)."""
    top = np.sort(logits, axis=-1)
    return logits.argmax(-1), top[..., -1] - top[..., -2] > 1e-3 * (1 + np.abs(top[..., -1]))


@pytest.mark.parametrize("source", ["lookup", "draft", "self_draft", "medusa", "mtp"])
def test_scheduler_speculates_with_every_source(heads_models, source):
    """Each draft source inside the continuous batch, over stacked LoRA + prefix adapters,
    with staggered arrivals and a pool small enough to preempt: every request's greedy
    tokens equal its adapted model's plain greedy. Each source's drafts are what they should be: the target as its own draft
    model accepts every draft (its pages hold the right K/V); the Medusa drafts a base row
    carries are the heads' argmax at its newest token's predecessor, and the first MTP
    draft module 0's, both as the training forward (CausalLM.with_heads) computes them
    over the finished sequence."""
    base, adapted, want, small = heads_models
    ids = HEAD_IDS
    if source == "self_draft":   # a draft equal to the target: for base rows only
        ids, adapted = [-1] * len(PROMPTS), None
        want = _greedy(base, [], ids)
    spec = {"lookup": Speculative("lookup", 3, ngram=2),
            "draft": Speculative("draft", 3, draft=small),
            "self_draft": Speculative("draft", 3, draft=base),
            "medusa": Speculative("medusa", 3), "mtp": Speculative("mtp", 2)}[source]
    sched = Scheduler(base, adapters=adapted, max_seqs=4, page_size=4, max_batched_tokens=16,
                      n_pages=14 if adapted else 11, max_len=48, speculative=spec)
    reqs = [Request(prompt=p, max_tokens=N, adapter=a, id=str(i))
            for i, (p, a) in enumerate(zip(PROMPTS, ids))]
    # staggered arrivals (all at once for the self draft: its rows finish in one call)
    gap = 0 if source == "self_draft" else 2
    pending, seen, out = [(gap * i, r) for i, r in enumerate(reqs)], [], {r.id: [] for r in reqs}
    step = 0
    while pending or sched.has_work:
        while pending and pending[0][0] <= step:
            sched.submit(pending.pop(0)[1])
        for e in sched.step():
            out[e.id] += e.tokens
        seen += [(s.req.id, list(s.tokens), s.drafts) for s in sched.running.values()
                 if s.req.adapter == -1 and s.drafts is not None]
        step += 1
    sched.pool.check_whole()
    assert [out[str(i)] for i in range(len(reqs))] == want
    st = sched.stats()
    assert st["spec_rounds"] > 0 and st["spec_drafted"] > 0
    assert st["preemptions"] > 0      # a tight pool: rows recomputed, their drafts too
    if source == "self_draft":
        assert st["spec_accepted"] == st["spec_drafted"]
    if source == "lookup":   # repetitive prompts: lookup finds drafts the target accepts
        assert st["spec_emitted"] > 1.2 * st["spec_rounds"]
    if source not in ("medusa", "mtp"):
        assert not seen
        return
    full = {str(i): PROMPTS[i] + want[i] for i in range(len(reqs))}
    rows = [i for i in full if ids[int(i)] == -1]
    width = max(len(full[i]) for i in rows)   # right padding: causal, earlier positions agree
    batch = jnp.asarray([full[i] + [0] * (width - len(full[i])) for i in rows])
    out = base.with_heads(batch)[3 if source == "medusa" else 2]        # [K, b, t, v]
    heads = {i: out[:, j:j + 1] for j, i in enumerate(rows)}
    checked = 0
    for rid, tokens, drafts in seen:
        c = len(tokens) - 1
        assert full[rid][:len(tokens)] == tokens
        k = 3 if source == "medusa" else 1     # only MTP module 0 reads an exact cache
        best, clear = _argmax_where_clear(np.asarray(heads[rid][:k, 0, c - 1]))
        assert all(b == d for b, d, ok in zip(best, drafts, clear) if ok), (rid, c)
        checked += int(clear.sum())
    assert checked >= 10


def test_prefix_keys_keep_adapters_apart(models, wanted):
    """The same prompt under three adapters (a prefix one too) must not share pages (other
    K/V): a second pass finds its own adapter's pages (prefix hits) and still equals the
    first."""
    base, adapted = models
    sched = Scheduler(base, adapters=adapted, max_seqs=4, page_size=4, max_batched_tokens=32)
    same = [Request(prompt=PROMPTS[7], max_tokens=N, adapter=a, id=str(a)) for a in (-1, 0, 1, 3)]
    first = drive(sched, [(0, r) for r in same])
    hits = sched.stats()["prefix_hit_tokens"]
    again = drive(sched, [(0, Request(prompt=PROMPTS[7], max_tokens=N, adapter=a, id=str(a)))
                          for a in (-1, 0, 1, 3)])
    assert first == again
    assert sched.stats()["prefix_hit_tokens"] > hits
    assert first["-1"] == wanted[7]
    assert first["0"] != first["-1"] or first["1"] != first["-1"]


def test_adapters_load_and_unload_while_serving_without_compiling():
    """Free slots take new adapters (a LoRA on a subset of the stack's modules with a
    smaller rank, a prefix adapter) into the same compiled programs; their rows equal each
    adapted model alone, the others' rows are unchanged; an unloaded id is refused, and an
    adapter that does not fit the stack is refused in one line."""
    base = tiny_lm(CFG, seed=1)
    lora = lambda r, t, seed: adapted_lm(base, P.LoraSpec(r=r, alpha=2.0 * r,  # noqa: E731
                                                          targets=t), seed=seed)
    a, b = lora(4, ("q_proj", "v_proj"), 1), lora(2, ("v_proj", "o_proj"), 2)
    sched = Scheduler(base, adapters=[a, b], max_adapters=4, max_seqs=4, page_size=4,
                      max_batched_tokens=16, decode_steps=1)
    prompts = [PROMPTS[0], PROMPTS[2]]

    def served(adapter, lm):
        out = drive(sched, [(0, Request(prompt=p, max_tokens=N, adapter=adapter, id=str(i)))
                            for i, p in enumerate(prompts)])
        return [out["0"], out["1"]] == Engine(lm).generate(prompts, max_new_tokens=N)
    sched.warmup()      # every program of the menu, as the server compiles before serving
    step = compiled(sched.graphs)
    programs = step._cache_size()
    assert served(0, a)
    c = lora(3, ("q_proj", "o_proj"), 3)
    prefix = adapted_lm(base, P.PrefixSpec(tokens=3), seed=4)
    c_id, prefix_id = sched.load_adapter(c), sched.load_adapter(prefix)
    assert (c_id, prefix_id) == (2, 3) and compiled(sched.graphs) is step
    assert served(c_id, c) and served(prefix_id, prefix) and served(1, b)
    assert step._cache_size() == programs        # the same programs ran the new adapters
    sched.unload_adapter(0)
    with pytest.raises(ValueError, match="adapter 0 does not exist"):
        sched.submit(Request(prompt=[1], max_tokens=2, adapter=0))
    for bad, match in ((lora(8, ("q_proj",), 5), "rank 8 exceeds"),
                       (lora(2, ("k_proj",), 6), "does not fit")):
        with pytest.raises(ValueError, match=match):
            sched.load_adapter(bad)
    assert served(c_id, c) and served(1, b)
    sched.pool.check_whole()


def test_row_verification_keeps_each_rows_distribution():
    """RowSampling.verify, as the scheduler's speculative round runs it: rows with their
    own temperature / top-p / top-k, a row with fewer real drafts than γ, a greedy row;
    fixed drafts (no q: lookup, Medusa, MTP) and drafts drawn from a draft model's q.
    The first emitted token of each row must follow that row's filtered target
    distribution whatever the drafts (chi-square), and the greedy row is the argmax."""
    v, g, rows = 12, 3, 4
    logits = jax.random.normal(jax.random.key(0), (rows, g + 1, v)) * 1.5
    settings = [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.0, 0, 1.0)]
    drafts = np.array([[2, 5, 1], [0, 3, 3], [7, 7, 2], [1, 1, 1]], np.int32)
    n_draft = np.array([3, 1, 2, 3], np.int32)
    reps = 40_000

    def _row_settings(seed_block):
        s = RowSampling.empty(rows * reps)
        s.temperature[:] = np.repeat([t for t, _, _ in settings], reps)
        s.top_k[:] = np.repeat([k for _, k, _ in settings], reps)
        s.top_p[:] = np.repeat([p for _, _, p in settings], reps)
        s.seeds[:] = np.arange(rows * reps) + seed_block
        return s

    def draw(seed_block):
        return jax.jit(lambda s: s.verify(jnp.repeat(drafts, reps, 0),
                                          jnp.repeat(n_draft, reps),
                                          jnp.repeat(logits, reps, 0)))(_row_settings(seed_block))
    # a draft model's drafts: drawn from its distributions q, which the rule then uses
    q = jax.nn.softmax(2.0 * jax.random.normal(jax.random.key(1), (rows, g, v)), -1)

    def draw_q(seed_block):
        s = _row_settings(seed_block)
        qs = jnp.repeat(q, reps, 0)
        d = jax.random.categorical(jax.random.key(seed_block), jnp.log(qs)).astype(jnp.int32)
        return d, *jax.jit(lambda s, d: s.verify(d, jnp.repeat(n_draft, reps),
                                                jnp.repeat(logits, reps, 0), q=qs))(s, d)
    greedy = np.asarray(jnp.argmax(logits[3], -1))
    for d, n, nxt in ((np.repeat(drafts, reps, 0), *draw(0)), draw_q(7)):
        d, n, nxt = (np.asarray(a).reshape(rows, reps, -1) for a in (d, n, nxt))
        n, nxt = n[..., 0], nxt[..., 0]
        first = np.where(n > 0, d[..., 0], nxt)
        assert (n <= n_draft[:, None]).all()
        for r, (t, k, p) in enumerate(settings[:3]):
            want = np.asarray(probabilities(logits[r, 0][None], Sampling(t, k or None, p)),
                              np.float64)[0]
            counts = np.bincount(first[r], minlength=v)
            keep = want * reps > 5
            assert counts[~keep].sum() <= 0.01 * reps
            assert stats.chisquare(counts[keep], want[keep] / want[keep].sum()
                                   * counts[keep].sum()).pvalue > 1e-3, r
        # the greedy row: the drafts that equal the argmax, then the argmax (q unused)
        accepted = np.sum(np.cumprod(d[3] == greedy[:g], axis=-1), axis=-1)
        assert (n[3] == accepted).all() and (nxt[3] == greedy[accepted]).all()


def test_prefix_adapter_with_every_speculative_source_equals_plain_greedy():
    """A prefix-tuned model (P virtual tokens before the prompt in the cache) decoded
    speculatively gives plain greedy's tokens with each draft source (it did not: the
    prefill reset the cache lengths to the prompt's, dropping the virtual tokens)."""
    lm = adapted_lm(with_heads(tiny_lm(CFG), 2, 3, seed=1), P.PrefixSpec(tokens=4), seed=3,
                    std=0.5)
    draft = tiny_lm(CFG.replace(n_layers=1), seed=7)
    prompts = [PROMPTS[1], PROMPTS[0]]
    want = Engine(lm).generate(prompts, max_new_tokens=N)
    for spec in (Speculative("lookup", 3, ngram=2), Speculative("draft", 3, draft=draft),
                 Speculative("medusa", 3), Speculative("mtp", 2)):
        assert Engine(lm, speculative=spec).generate(prompts, max_new_tokens=N) == want, spec


def test_engine_speculates_over_stacked_adapters(models, wanted):
    base, adapted = models
    engine = Engine(base, adapters=adapted, speculative=Speculative("lookup", 3, ngram=2))
    got = engine.generate(PROMPTS, max_new_tokens=N, adapter_ids=IDS)
    assert got == wanted
    assert engine.speculative_stats["tokens_per_forward"] > 1


def test_engine_mtp_and_medusa_over_stacked_adapters(heads_models):
    """The engine's MTP chain runs each row's adapter in its module and LM head (it raised
    "needs PeftInputs" over stacked adapters); Medusa too. Tokens equal each model's."""
    base, adapted, want, _ = heads_models
    for spec in (Speculative("mtp", 2), Speculative("medusa", 3)):
        got = Engine(base, adapters=adapted, speculative=spec).generate(
            PROMPTS, max_new_tokens=N, adapter_ids=HEAD_IDS)
        assert got == want, spec.source


def test_bad_combinations_are_refused_in_one_line(models):
    base, adapted = models
    mla = tiny_lm(Config(vocab_size=48, d_model=32, n_layers=1, n_heads=4, ffn_dim=64,
                         attention="mla", q_lora_rank=8, kv_lora_rank=8, qk_nope_head_dim=4,
                         qk_rope_head_dim=4, v_head_dim=4, max_position=64))
    cases = [
        (lambda: Scheduler(mla, adapters=[adapted_lm(mla, P.PrefixSpec(tokens=2), seed=5)]),
         "MLA"),
        (lambda: Scheduler(base, adapters=adapted).submit(Request([1] * 90, max_tokens=4,
                                                                  adapter=3)),
         "after the adapter's 5 virtual tokens"),
        (lambda: Scheduler(base, speculative=Speculative("medusa", 1)),
         "the model has no medusa heads"),
        (lambda: Scheduler(base, adapters=adapted).submit(Request([1, 2], adapter=4)),
         "adapter 4 does not exist"),
        (lambda: Scheduler(base).submit(Request([1, 2], adapter=0)), "no adapters"),
    ]
    for make, match in cases:
        with pytest.raises(ValueError, match=match) as e:
            make()
        assert "\n" not in str(e.value)


def test_scheduler_on_a_mesh_equals_one_device():
    """tests/scripts/sharded_scheduler.py on 4 emulated devices: adapters + prompt lookup on
    tensor=2; QLoRA (int8 base) + int8 KV cache + lookup on data=2,tensor=2; MoE + lookup
    on expert=2; a vocabulary of 63 on tensor=2 (padded to 64; the scheduler, and the
    engine speculating over stacked adapters) — the same tokens as one device (each
    adapted model alone), pools split by kv heads."""
    script = os.path.join(os.path.dirname(__file__), "scripts", "sharded_scheduler.py")
    r = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(report) == {"tensor_lookup", "data_tensor_qlora_int8", "expert_lookup",
                           "odd_vocab_tensor"}
    for name, case in report.items():
        assert case["equal"] and case["tokens"] > 0, name
        assert case["stats"]["spec_accepted"] > 0, name
    assert report["tensor_lookup"]["pool_spec"].endswith("(None, None, 'tensor')")
    odd = report["odd_vocab_tensor"]        # 63 ids padded to 64 rows, split over tensor
    assert odd["engine_equal"] and odd["embed_rows"][0] == 64
    assert "tensor" in odd["embed_rows"][1]


def _walk_matrix(strength: int):
    """tests/scripts/combination_matrix.py (4 emulated devices): every configuration
    either gives each request its own model's plain greedy tokens or is refused in one
    line; every value of every feature ran in some configuration that was served."""
    script = os.path.join(os.path.dirname(__file__), "scripts", "combination_matrix.py")
    r = subprocess.run([sys.executable, script, "--strength", str(strength)],
                       capture_output=True, text=True, timeout=3000)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    wrong = [c for c in report if c["status"] not in ("equal", "refused")
             or (c["status"] == "refused" and "\n" in c["detail"])]
    assert not wrong, wrong
    served = [c for c in report if c["status"] == "equal"]
    for name in report[0]["config"]:
        assert {c["config"][name] for c in served} == {c["config"][name] for c in report}, name
    assert all(c["detail"]["spec_drafted"] > 0 for c in served if c["config"]["spec"] != "none")
    return report


def test_feature_matrix_every_value():
    """Five configurations, each feature's every value at least once (weights, KV dtype,
    prefix sharing, adapter kind, draft source, mesh)."""
    assert len(_walk_matrix(1)) == 5


@pytest.mark.slow
def test_feature_matrix_every_pair():
    """All pairs of feature values (about 30 configurations, ~10 minutes on 2 cores)."""
    assert len(_walk_matrix(2)) >= 25


# The server: two PEFT LoRAs, prompt lookup and tensor=2, against transformers + PEFT -----
def test_server_lora_modules_lookup_on_a_mesh_answer_each_model(tmp_path):
    import requests
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, initializer_range=0.2,
                         eos_token_id=95)   # the server stops on the config's EOS, as HF
    hf = LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "base")
    dirs = {}
    for name, targets, seed in (("a", ["q_proj", "v_proj"], 1),
                                ("b", ["k_proj", "o_proj", "up_proj"], 2),
                                ("c", ["q_proj", "up_proj"], 3)):   # loaded while serving
        torch.manual_seed(seed)
        model = get_peft_model(LlamaForCausalLM(config).eval(),
                               LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        model.base_model.model.load_state_dict(hf.state_dict(), strict=False)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.3)
        model.save_pretrained(tmp_path / name)
        dirs[name] = str(tmp_path / name)
    prompts = [(np.random.default_rng(i).integers(3, 12, 4).tolist() * 4)[:10 + i]
               for i in range(3)]

    def greedy(model, prompt):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                             pad_token_id=0, eos_token_id=95)
        return out[0, len(prompt):].tolist()
    want = {"llama": [greedy(hf, p) for p in prompts]}
    for name, path in dirs.items():
        model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                                          path).eval()
        want[name] = [greedy(model, p) for p in prompts]
    assert want["a"] != want["llama"] and want["b"] != want["llama"]
    assert sum(len(o) for outs in want.values() for o in outs) > 40
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxlm.serve", "--hf", str(tmp_path / "base"), "--port", "0",
         "--model-name", "llama", "--lora-modules", f"a={dirs['a']}", f"b={dirs['b']}",
         "--prompt-lookup", "3", "--spec-tokens", "3", "--mesh", "tensor=2",
         "--max-loras", "3",
         "--max-seqs", "4", "--max-batched-tokens", "32", "--max-len", "64",
         "--page-size", "16", "--no-warmup"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving llama on http://"), (line, proc.stderr.read())
        url = line.split()[-1]
        models = requests.get(url + "/v1/models").json()["data"]
        assert [(m["id"], m["parent"]) for m in models] == [
            ("llama", None), ("a", "llama"), ("b", "llama")]

        def ask(job):
            name, i = job
            r = requests.post(url + "/v1/completions", json={
                "model": name, "prompt": prompts[i], "max_tokens": 8, "temperature": 0,
                "return_token_ids": True}, timeout=300)
            assert r.status_code == 200, r.text
            return name, i, r.json()["choices"][0]["token_ids"]
        jobs = [(name, i) for i in range(len(prompts)) for name in ("llama", "a", "b")]
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            for name, i, got in pool.map(ask, jobs):
                assert got == want[name][i], (name, i)
        # vLLM's run-time adapter endpoints: c into the free slot, then a out
        r = requests.post(url + "/v1/load_lora_adapter",
                          json={"lora_name": "c", "lora_path": dirs["c"]})
        assert r.status_code == 200, r.text
        assert [ask(("c", i))[2] for i in range(len(prompts))] == want["c"]
        r = requests.post(url + "/v1/load_lora_adapter",
                          json={"lora_name": "d", "lora_path": str(tmp_path / "nowhere")})
        assert r.status_code == 400 and "\n" not in r.json()["error"]["message"]
        r = requests.post(url + "/v1/unload_lora_adapter", json={"lora_name": "a"})
        assert r.status_code == 200, r.text
        assert [m["id"] for m in requests.get(url + "/v1/models").json()["data"]] == [
            "llama", "b", "c"]
        r = requests.post(url + "/v1/completions", json={"model": "a", "prompt": [1]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"
        r = requests.post(url + "/v1/completions", json={"model": "zzz", "prompt": [1]})
        assert r.status_code == 400 and "'zzz' does not exist" in r.json()["error"]["message"]
        metrics = requests.get(url + "/metrics").text
        rate = float(next(line.split()[-1] for line in metrics.splitlines()
                          if line.startswith("jaxlm_spec_acceptance_rate ")))
        assert 0 < rate <= 1
    finally:
        proc.kill()
        proc.wait()


def test_server_speculates_with_a_draft_model_and_mtp(tmp_path, heads_models):
    """python -m jaxlm.serve --draft DIR / --mtp (as the CLI builds it): concurrent
    requests get plain greedy's tokens, /metrics reports the speculation; --medusa on a
    model without Medusa heads is one line."""
    from fastapi.testclient import TestClient

    from jaxlm.model.io.runs import save_model
    from jaxlm.serve.__main__ import build_app, check_args, main, parse_args
    base, _, _, small = heads_models
    save_model(base, str(tmp_path / "target"))
    save_model(small, str(tmp_path / "draft"))
    prompts = PROMPTS[:4]
    want = Engine(base).generate(prompts, max_new_tokens=N)
    for flags in (["--draft", str(tmp_path / "draft"), "--spec-tokens", "3"],
                  ["--mtp", "--spec-tokens", "2"]):
        args = parse_args(["--checkpoint", str(tmp_path / "target"), "--no-warmup",
                           "--page-size", "4", "--max-seqs", "4", "--max-batched-tokens",
                           "16", "--max-len", "48", *flags])
        check_args(args)
        app, name = build_app(args)
        with TestClient(app) as c, concurrent.futures.ThreadPoolExecutor(4) as pool:
            def ask(p):
                r = c.post("/v1/completions", json={
                    "model": name, "prompt": p, "max_tokens": N, "temperature": 0,
                    "return_token_ids": True})
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["token_ids"]
            assert list(pool.map(ask, prompts)) == want, flags
            metrics = c.get("/metrics").text
        per_forward = [float(x.split()[-1]) for x in metrics.splitlines()
                       if x.startswith("jaxlm_spec_tokens_per_forward")]
        assert per_forward and per_forward[0] >= 1, flags
    assert main(["--checkpoint", str(tmp_path / "draft"), "--medusa"]) == 2


@pytest.mark.parametrize("flags,match", [
    (["--lora-modules", "noequals"], "NAME=DIR pairs"),
    (["--lora-modules", "a=X", "a=Y"], "twice"),
    (["--prompt-lookup", "3", "--spec-tokens", "0"], "--spec-tokens must be positive"),
    (["--draft", "/no/such/dir"], "is not a directory"),
    (["--mesh", "tensor=x"], "--mesh"),
])
def test_server_bad_flags_are_one_line(tmp_path, capsys, flags, match):
    """Checked before any model loads (in process: nothing starts)."""
    from jaxlm.serve.__main__ import main
    (tmp_path / "config.json").write_text("{}")
    assert main(["--hf", str(tmp_path), *flags]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], lines


def test_one_loader_reads_every_kind_of_directory(models, tmp_path):
    """jaxlm.model.io.load: an HF directory, a PEFT directory over a local base (the
    same logits as loading the base and attaching the adapter), a run; bad paths are one
    line each."""
    from jaxlm.model import from_hf, load_peft, to_hf
    from jaxlm.model.io.load import load
    from jaxlm.model.io.peft import save_peft
    base, adapted = models
    hf_dir, peft_dir = str(tmp_path / "hf"), str(tmp_path / "peft")
    to_hf(base, hf_dir)
    save_peft(adapted[1], peft_dir, base_model_name_or_path=hf_dir)
    tokens = np.asarray([PROMPTS[3]], np.int32)
    got = load(peft_dir)
    assert got.kind == "peft" and got.tokenizer is None and got.stop_ids == []
    want = load_peft(from_hf(hf_dir), peft_dir)(tokens).logits
    np.testing.assert_allclose(got.lm(tokens).logits, want, atol=1e-5 * float(
        np.abs(want).max()))
    assert load(hf_dir).kind == "hf"
    orphan = str(tmp_path / "orphan")
    save_peft(adapted[1], orphan, base_model_name_or_path="someone/remote-model")
    for path, match in ((orphan, "not a local model directory"),
                        (str(tmp_path), "holds no run.json"),
                        (str(tmp_path / "nope"), "is not a directory")):
        with pytest.raises(ValueError, match=match) as e:
            load(path)
        assert "\n" not in str(e.value)
