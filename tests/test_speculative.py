"""Speculative decoding: the verification maths against plain loops and statistics, greedy
identity with plain decoding for every draft source (ragged rows, stop tokens, a cache
filled to its last slot), the sampled output's distribution against the target's
(chi-square, a deliberately bad draft, temperature and top-p on), acceptance 1 and γ+1
tokens per forward for a draft equal to the target, and the CLI."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest
from scipy import stats

from jaxlm.infer import Engine, Sampling, Speculative
from jaxlm.infer.cli import main as infer_main
from jaxlm.model import Config, create
from jaxlm.model.build import with_heads
from jaxlm.ops.sampling import probabilities
from jaxlm.ops.speculative import greedy_accept, ngram_propose, rejection_accept

CFG = Config(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
             init_std=0.3)
TARGET = with_heads(create(CFG, 0), 2, 3, seed=1)   # MTP D=2 and Medusa K=3 (random)
DRAFT = create(CFG.replace(n_layers=1), 7)          # a different, worse model
PROMPTS = [[1, 2, 3, 4, 1, 2, 3, 4, 1, 2], [5, 6], [7, 8, 9, 10, 11, 7, 8, 9, 10, 11, 7, 8, 9,
                                                   10, 11, 7, 8, 9]]


def test_greedy_accept_counts_the_matching_prefix():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 5, (64, 5))
    drafts = np.where(rng.random((64, 4)) < 0.7, target[:, :4], rng.integers(0, 5, (64, 4)))
    n, nxt = greedy_accept(jnp.asarray(drafts), jnp.asarray(target))
    for r in range(64):
        k = 0
        while k < 4 and drafts[r, k] == target[r, k]:
            k += 1
        assert (int(n[r]), int(nxt[r])) == (k, target[r, k])


def test_ngram_propose_matches_a_plain_search():
    rng = np.random.default_rng(1)
    hist = rng.integers(0, 4, (50, 30))
    lengths = rng.integers(1, 30, 50)
    drafts, found = ngram_propose(jnp.asarray(hist), jnp.asarray(lengths), 3, 4)
    for r in range(50):
        h, last = list(hist[r, :lengths[r]]), lengths[r] - 1
        best = -1
        for n in (3, 2, 1):
            if last < n - 1:
                continue
            hits = [p for p in range(n - 1, last) if h[p - n + 1:p + 1] == h[last - n + 1:]]
            if hits:
                best = max(hits)
                break
        assert bool(found[r]) == (best >= 0)
        start = best + 1 if best >= 0 else last
        want = [h[min(start + j, last)] for j in range(4)]
        assert list(np.asarray(drafts[r])) == want


@pytest.mark.parametrize("one_hot", [False, True])
def test_rejection_rule_emits_the_target_distribution(one_hot):
    """200k draws of (accepted count, next token): the first emitted token is distributed
    as p_0 and, given the first draft accepted, the second as p_1 (chi-square)."""
    rng = np.random.default_rng(2)
    v, g, n = 6, 2, 200_000
    p = rng.dirichlet(np.ones(v), g + 1).astype(np.float32)
    q = rng.dirichlet(np.ones(v) * 0.3, g).astype(np.float32)
    keys = jax.random.split(jax.random.key(0), 2 * n)
    if one_hot:   # drafts without probabilities: fixed guesses
        drafts = jnp.asarray(rng.integers(0, v, (n, g)), jnp.int32)
        qq = None
    else:
        drafts = jax.vmap(lambda k: jax.random.categorical(k, jnp.log(q), axis=-1))(keys[:n])
        qq = jnp.broadcast_to(q, (n, g, v))
    acc, nxt = jax.jit(rejection_accept)(keys[n], drafts, jnp.broadcast_to(p, (n, g + 1, v)), qq)
    acc, nxt, drafts = np.asarray(acc), np.asarray(nxt), np.asarray(drafts)
    first = np.where(acc > 0, drafts[:, 0], nxt)
    assert _chi2_p(np.bincount(first, minlength=v), p[0]) > 1e-3
    second = np.where(acc > 1, drafts[:, 1], nxt)[acc >= 1]
    assert _chi2_p(np.bincount(second, minlength=v), p[1]) > 1e-3


def _chi2_p(counts, probs):
    """Chi-square p-value of counts against probabilities (expected scaled to the total)."""
    probs = np.asarray(probs, np.float64)
    return stats.chisquare(counts, probs / probs.sum() * counts.sum()).pvalue


SOURCES = [Speculative("lookup", n_draft=3, ngram=2), Speculative("draft", n_draft=3, draft=DRAFT),
           Speculative("medusa", n_draft=3), Speculative("mtp", n_draft=2)]


@pytest.mark.parametrize("spec", SOURCES, ids=lambda s: s.source)
def test_greedy_output_is_plain_greedy(spec):
    """Ragged prompts, a stop token, max_new_tokens, and one row that fills its cache:
    max_len = longest prompt + max_new_tokens − 1."""
    plain = Engine(TARGET, max_len=18 + 24 - 1)
    engine = Engine(TARGET, max_len=18 + 24 - 1, speculative=spec)
    for stops in ((), (3, 17)):
        want = plain.generate(PROMPTS, max_new_tokens=24, stop_tokens=stops)
        got = engine.generate(PROMPTS, max_new_tokens=24, stop_tokens=stops)
        assert got == want, (spec.source, stops)
    assert any(len(row) == 24 for row in want)
    streamed = [[] for _ in PROMPTS]
    for chunk in engine.stream(PROMPTS, max_new_tokens=24, stop_tokens=(3, 17), chunk=5):
        for row, part in zip(streamed, chunk):
            row += part
    assert streamed == want
    assert engine.speculative_stats["rounds"] > 0


def _target_joint(prompt, sampling):
    """P(t1, t2) of the target model: [v, v]."""
    v = CFG.vocab_size
    p1 = probabilities(TARGET(jnp.asarray([prompt])).logits[:, -1], sampling)[0]
    seqs = jnp.asarray([prompt + [t] for t in range(v)])
    p2 = probabilities(TARGET(seqs).logits[:, -1], sampling)
    return np.asarray(p1[:, None] * p2, np.float64)


@pytest.mark.parametrize("spec", [Speculative("draft", n_draft=2, draft=DRAFT),
                                  Speculative("lookup", n_draft=2, ngram=1)],
                         ids=lambda s: s.source)
def test_sampled_tokens_follow_the_target_distribution(spec):
    sampling = Sampling(temperature=1.3, top_p=0.9)
    prompt = [3, 9, 3, 9, 3]
    rows, seeds = 25_000, 4
    engine = Engine(TARGET, speculative=spec)
    draws = []
    for seed in range(seeds):
        out = engine.generate([prompt] * rows, max_new_tokens=2, sampling=sampling, seed=seed)
        draws += [tuple(o) for o in out]
    v = CFG.vocab_size
    counts = np.zeros((v, v))
    for a, b in draws:
        counts[a, b] += 1
    want = _target_joint(prompt, sampling) * len(draws)
    keep = want > 5    # cells the filters allow and that are expected often enough
    assert counts[~keep].sum() <= 0.01 * len(draws)
    assert _chi2_p(counts[keep], want[keep]) > 1e-3
    assert engine.speculative_stats["acceptance_rate"] < 0.9   # the draft is a bad one


def test_a_draft_equal_to_the_target_is_always_accepted():
    g = 3
    engine = Engine(TARGET, speculative=Speculative("draft", n_draft=g, draft=TARGET))
    out = engine.generate(PROMPTS, max_new_tokens=1 + 5 * (g + 1))
    st = engine.speculative_stats
    assert st["acceptance_rate"] == 1.0 and st["tokens_per_forward"] == g + 1
    assert out == Engine(TARGET).generate(PROMPTS, max_new_tokens=1 + 5 * (g + 1))
    engine.generate(PROMPTS, max_new_tokens=21, sampling=Sampling(temperature=1.0), seed=3)
    assert engine.speculative_stats["acceptance_rate"] > 0.97   # p = q up to rounding


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="medusa_heads=0"):
        Engine(create(CFG, 0), speculative=Speculative("medusa", n_draft=2))
    with pytest.raises(ValueError, match="at most mtp_depth=2"):
        Engine(TARGET, speculative=Speculative("mtp", n_draft=3))
    with pytest.raises(ValueError, match="vocabulary"):
        Engine(TARGET, speculative=Speculative("draft", draft=create(CFG.replace(vocab_size=41), 0)))
    with pytest.raises(ValueError, match="not one of"):
        Speculative("eagle").check(CFG)
    engine = Engine(TARGET, speculative=Speculative("lookup"))
    with pytest.raises(ValueError, match="prefix_cache"):
        engine.generate(PROMPTS, max_new_tokens=4, prefix_cache=True)


def test_cli_speculative_flags(tmp_path, capsys):
    from jaxlm.model import to_hf
    to_hf(create(CFG, 0), str(tmp_path / "t"))
    to_hf(DRAFT, str(tmp_path / "d"))
    base = ["--hf", str(tmp_path / "t"), "--prompt-ids", "1,2,3,1,2,3", "--max-new-tokens", "12"]
    assert infer_main(base) == 0
    plain = capsys.readouterr().out
    assert infer_main(base + ["--prompt-lookup", "2", "--spec-tokens", "3"]) == 0
    assert capsys.readouterr().out == plain
    assert infer_main(base + ["--draft", str(tmp_path / "d"), "--bench"]) == 0
    out = capsys.readouterr().out
    assert "acceptance rate" in out and "tokens per forward" in out
    assert infer_main(base + ["--mtp"]) == 2
    assert "mtp_depth=0" in capsys.readouterr().err
    assert infer_main(base + ["--spec-tokens", "2"]) == 2


def test_mtp_self_speculation_on_an_mla_moe_model():
    """DeepSeek-V3's shape: MLA attention (latent caches for the MTP modules too) and an
    MoE MTP layer; greedy output is plain greedy's."""
    cfg = Config(vocab_size=40, d_model=32, n_layers=2, n_heads=4, ffn_dim=64, attention="mla",
                 kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                 n_experts=4, n_experts_per_tok=2, moe_ffn_dim=16, n_shared_experts=1,
                 router="sigmoid", first_k_dense=1, mtp_depth=2, init_std=0.3)
    lm = create(cfg, 0)
    want = Engine(lm).generate(PROMPTS, max_new_tokens=16, stop_tokens=(3,))
    engine = Engine(lm, speculative=Speculative("mtp", n_draft=2))
    assert engine.generate(PROMPTS, max_new_tokens=16, stop_tokens=(3,)) == want
