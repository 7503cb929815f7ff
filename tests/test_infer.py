"""Inference engine: the unrolled forward equals CausalLM, cached decode equals full
recompute at every step, batched rows equal rows run alone, prefix caching changes nothing,
the cache is donated, greedy tokens equal transformers' generate for every HF family, and
the CLI streams, benchmarks and rejects bad input with one line."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.infer import DecodeCache, Engine, Sampling, forward, generate
from jaxlm.infer import engine as engine_mod
from jaxlm.infer.cli import main
from jaxlm.model import CausalLM, Config, abstract_model

V = 256  # byte-tokenizer sized, so the CLI's run directory shares compiled steps
BASE = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
            init_std=0.3, max_position=64)
CONFIGS = {
    "llama": Config(**BASE),
    "gpt2": Config(**BASE, activation="gelu_tanh", gated_mlp=False, norm="layer",
                   position="learned", qkv_bias=True, out_bias=True, mlp_bias=True,
                   tie_embeddings=True),
    "sinusoidal-postnorm": Config(**BASE, position="sinusoidal", post_norm=True),
    "alibi-softcaps": Config(**BASE, position="alibi", attn_softcap=5.0, final_softcap=3.0),
    "qknorm-window": Config(**BASE, qk_norm=True, sliding_window=3, head_dim=12),
    # full, sliding, full: three scan groups in training, three layers in the engine
    "window-per-layer": Config(**{**BASE, "n_layers": 3}, sliding_window=3,
                               sliding_layers=(1,)),
    # dense, MoE, dense (first_k_dense and mlp_only_layers together)
    "moe": Config(**{**BASE, "n_layers": 3}, n_experts=4, n_experts_per_tok=2,
                  first_k_dense=1, mlp_only_layers=(2,)),
    "mla": Config(**{**BASE, "n_kv_heads": None}, attention="mla", kv_lora_rank=16,
                  qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8),
    "mla-absorbed": Config(**{**BASE, "n_kv_heads": None}, attention="mla", kv_lora_rank=16,
                           qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                           q_lora_rank=12, mla_absorb=True),
}
RNG = np.random.default_rng(0)
# Different lengths, each (alone or batched) in one 16-token prefill and a 32-slot cache.
PROMPTS = [RNG.integers(0, V, n).tolist() for n in (9, 6, 13)]
N = 12  # new tokens


def tiny_lm(cfg: Config, seed: int = 0) -> CausalLM:
    """CausalLM with numpy-drawn weights: tracing the constructor costs nothing, while its
    jax.random init compiles threefry once per parameter shape (seconds on a busy CPU)."""
    graph, state = nnx.split(abstract_model(cfg))
    rng = np.random.default_rng(seed)
    cpu = jax.devices()[0]  # committed, like restored checkpoints: one jit cache entry
    state = jax.tree.map(lambda x: jax.device_put(rng.normal(0, cfg.init_std, x.shape)
                                                  .astype(x.dtype), cpu), state)
    return nnx.merge(graph, state)


def full_logits(lm, rows):
    """The model's own full pass over each row (right-padded into one batch; causal
    masking keeps every real position's logits independent of the padding)."""
    width = max(len(r) for r in rows)
    tokens = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
    graph, state = nnx.split(lm)
    out = jax.jit(lambda s, t: nnx.merge(graph, s)(t).logits)(state, tokens)
    return [np.asarray(out[i, :len(r)]) for i, r in enumerate(rows)]


@pytest.fixture(scope="module")
def llama():
    lm = tiny_lm(CONFIGS["llama"])
    return lm, Engine(lm)


@pytest.fixture(scope="module")
def greedy_run(llama):
    """(tokens, per-step logits) of the batch PROMPTS, greedy."""
    return llama[1].generate(PROMPTS, max_new_tokens=N, record_logits=True)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_engine_equals_training_forward(name, llama, greedy_run):
    """Every model kind through the engine (batched prefill, then the one-jit decode loop
    over per-layer weights) and through the training forward (CausalLM over the whole
    sequence, scanned layer groups, no cache): every step's logits equal to 1e-5, for
    prompts of different lengths batched together."""
    lm, engine = llama if name == "llama" else (lm := tiny_lm(CONFIGS[name], 2),
                                                Engine(lm))
    out, logits = (greedy_run if name == "llama" else
                   engine.generate(PROMPTS, max_new_tokens=N, record_logits=True))
    assert [len(o) for o in out] == [N] * len(PROMPTS)
    full = full_logits(lm, [p + o[:-1] for p, o in zip(PROMPTS, out)])
    for i, p in enumerate(PROMPTS):
        np.testing.assert_allclose(logits[i], full[i][len(p) - 1:], atol=1e-5, rtol=0)
        np.testing.assert_array_equal(out[i], np.argmax(full[i][len(p) - 1:], -1))


def test_engine_forward_returns_every_position(llama):
    """forward() without `last` gives logits for every position, as the model does."""
    lm, engine = llama
    tokens = jnp.asarray(RNG.integers(0, V, (2, 11)), jnp.int32)
    got, cache = jax.jit(forward, static_argnums=0)(engine.graphs, engine.weights, tokens,
                                                    engine.new_cache(2, 16))
    want = full_logits(lm, np.asarray(tokens).tolist())
    np.testing.assert_allclose(np.asarray(got), np.stack(want), atol=1e-5)
    np.testing.assert_array_equal(cache.lengths, [11, 11])


def test_rows_equal_rows_run_alone(llama, greedy_run):
    _, engine = llama
    out, logits = greedy_run
    for i, p in enumerate(PROMPTS):
        assert engine.generate([p], max_new_tokens=N) == [out[i]]


def test_generate_api_is_greedy_by_default(llama, greedy_run):
    lm, _ = llama
    assert generate(lm, PROMPTS, max_new_tokens=N) == greedy_run[0]


def test_same_seed_same_tokens_and_streaming_matches(llama):
    _, engine = llama
    s = Sampling(temperature=1.5, top_k=20, top_p=0.95)
    a = engine.generate(PROMPTS, max_new_tokens=N, sampling=s, seed=3)
    assert a == engine.generate(PROMPTS, max_new_tokens=N, sampling=s, seed=3)
    assert a != engine.generate(PROMPTS, max_new_tokens=N, sampling=s, seed=4)
    chunks = list(engine.stream(PROMPTS, max_new_tokens=N, sampling=s, seed=3, chunk=5))
    assert len(chunks) == 1 + -(-(N - 1) // 5)  # first token, then chunks of 5 steps
    assert [sum((c[i] for c in chunks), []) for i in range(len(PROMPTS))] == a


def test_stop_tokens_end_rows(llama, greedy_run):
    _, engine = llama
    out = greedy_run[0]
    stop = out[0][2]
    got = engine.generate(PROMPTS, max_new_tokens=N, stop_tokens=(stop,))
    for row, full in zip(got, out):
        want = full[:full.index(stop) + 1] if stop in full else full
        assert row == want  # the stop token is returned, nothing after it
    # When every row stops, the loop ends early instead of running out max_new_tokens.
    firsts = {o[0] for o in out}
    first, logits, cache = engine.prefill_prompts(PROMPTS, N, jax.random.key(0))
    state = engine.start(first, logits, jax.random.key(0), max_new_tokens=N,
                         stop_tokens=firsts)
    state, _ = engine.decode(state, cache, stop_tokens=firsts)
    assert int(state.step) == 1 and np.asarray(state.counts).tolist() == [1, 1, 1]


def test_prefix_cache_gives_identical_output(llama):
    _, engine = llama
    shared = RNG.integers(0, V, 20).tolist()
    prompts = [shared + [3, 4], shared + [5], shared + RNG.integers(0, V, 6).tolist()]
    key = jax.random.key(0)
    engine.prefixes.clear()
    _, plain_logits, _ = engine.prefill_prompts(prompts, N, key)
    _, cached_logits, _ = engine.prefill_prompts(prompts, N, key, prefix_cache=True)
    np.testing.assert_allclose(cached_logits, plain_logits, atol=1e-5)
    assert [len(e) for e in engine.prefixes.entries] == [20]  # the batch's shared prefix
    plain = engine.generate(prompts, max_new_tokens=N)
    assert engine.generate(prompts, max_new_tokens=N, prefix_cache=True) == plain
    # Reused by a later batch, including a prompt that is the prefix plus one token and
    # one that does not start with it; an explicit shorter prefix loses to the longer.
    engine.prefixes.add(shared[:8])
    later = [shared + [9], RNG.integers(0, V, 7).tolist(), shared + [3, 4]]
    assert [m and m.length for m in engine.prefixes.plan(later)] == [20, None, 20]
    want = engine.generate(later, max_new_tokens=N)
    assert want[2] == plain[0]
    assert engine.generate(later, max_new_tokens=N, prefix_cache=True) == want
    assert len(engine.prefixes) == 2
    engine.prefixes.clear()


def test_cache_is_preallocated_and_donated(llama):
    _, engine = llama
    cache = engine.new_cache(2, 32)
    assert isinstance(cache, DecodeCache) and cache.max_len == 32 and cache.batch == 2
    cfg = engine.cfg
    assert cache.nbytes == 2 * cfg.n_layers * 2 * 32 * cfg.num_kv_heads * cfg.dim_per_head * 4
    before = cache.layers[0][0]
    first, logits, cache = engine.prefill([[1, 2, 3], [4, 0, 0]], [3, 1], cache,
                                          jax.random.key(0))
    assert before.is_deleted()  # donated: updated in place, not copied
    np.testing.assert_array_equal(cache.lengths, [3, 1])
    state = engine.start(first, logits, jax.random.key(1), max_new_tokens=4)
    before = cache.layers[-1][1]
    state, cache = engine.decode(state, cache)
    assert before.is_deleted() and cache.max_len == 32
    np.testing.assert_array_equal(cache.lengths, [6, 4])


def test_decode_is_one_jitted_while_loop(llama, monkeypatch):
    _, engine = llama
    calls = []
    original = engine_mod._decode
    monkeypatch.setattr(engine_mod, "_decode", lambda *a, **k: calls.append(1) or original(*a, **k))
    engine.generate(PROMPTS, max_new_tokens=N)
    assert len(calls) == 1
    first, logits, cache = engine.prefill_prompts(PROMPTS, N, jax.random.key(0))
    state = engine.start(first, logits, jax.random.key(0), max_new_tokens=N)
    jaxpr = jax.make_jaxpr(original, static_argnums=(0, 6))(
        engine.graphs, engine.weights, state, cache, 5, jnp.zeros((0,), jnp.int32), None)
    assert str(jaxpr).count("while[") == 1


@pytest.mark.parametrize("prompts, kwargs, match", [
    ([], {}, "non-empty list"),
    ([[1, 2], []], {}, "prompt 1 is empty"),
    ([[1, V]], {}, "outside the vocabulary"),
    ([[-1, 2]], {}, "outside the vocabulary"),
    ([[1, 2]], {"max_new_tokens": 0}, "max_new_tokens must be a positive"),
    ([[1] * 60], {"max_new_tokens": 10}, "cache holds max_len=64"),
    ([[1, 2]], {"stop_tokens": (V + 1,)}, "stop_tokens"),
])
def test_bad_requests_raise_clear_errors(prompts, kwargs, match):
    lm = tiny_lm(CONFIGS["gpt2"])  # learned positions: max_len = 64
    with pytest.raises(ValueError, match=match):
        generate(lm, prompts, **{"max_new_tokens": 4, **kwargs})


# Greedy parity with transformers -------------------------------------------------------
HF_SIZES = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, initializer_range=0.25,
                max_position_embeddings=128)
HF_FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(HF_SIZES, attention_bias=True, mlp_bias=True, rms_norm_eps=1e-5)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(HF_SIZES, sliding_window=8)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(HF_SIZES, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(HF_SIZES, head_dim=24)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(vocab_size=101, n_embd=64, n_layer=2, n_head=4, n_inner=96, n_positions=64,
                  initializer_range=0.25, bos_token_id=0, eos_token_id=0)),
}


def hf_model(family):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config_cls, model_cls, kwargs = HF_FAMILIES[family]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(
        getattr(transformers, config_cls)(**kwargs, attn_implementation="eager")).eval()
    with torch.no_grad():  # norms ≠ 1 and biases ≠ 0, so a swapped one shows
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("family", list(HF_FAMILIES))
def test_greedy_tokens_equal_transformers_generate(family, tmp_path):
    import torch
    from jaxlm.model import from_hf
    model = hf_model(family)
    model.save_pretrained(tmp_path)
    prompts = [np.random.default_rng(1).integers(0, 101, n).tolist() for n in (7, 3, 12)]
    want = []
    for p in prompts:  # one by one, unpadded: no HF padding conventions involved
        with torch.no_grad():
            out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=int),
                                 max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
        want.append(out[0, len(p):].tolist())
    assert generate(from_hf(str(tmp_path)), prompts, max_new_tokens=32) == want


# CLI ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A trainer-style run directory: run.json (byte tokenizer) + an orbax params step."""
    import orbax.checkpoint as ocp
    from jaxlm.model.io.runs import (PARAMS_ITEM, checkpoint_manager, params_of,
                                        write_run_file)
    path = str(tmp_path_factory.mktemp("run"))
    cfg = CONFIGS["llama"]
    lm = tiny_lm(cfg)
    write_run_file(path, cfg, "byte")
    mngr = checkpoint_manager(path)
    mngr.save(7, args=ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardSave(params_of(lm))}))
    mngr.wait_until_finished()
    mngr.close()
    return path, lm


def test_cli_streams_from_a_checkpoint(run_dir, capsys):
    path, lm = run_dir
    assert main(["--checkpoint", path, "--prompt", "hi there", "--max-new-tokens", str(N),
                 "--chunk", "5"]) == 0
    new = generate(lm, [list(b"hi there")], max_new_tokens=N)[0]
    want = "hi there" + bytes(new).decode("utf-8", errors="replace")
    assert capsys.readouterr().out == want + "\n"


def test_cli_bench_from_hf_dir(tmp_path, capsys):
    """--hf with a tokenizer.json; shapes as in the llama parity test (compiled once)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    hf_model("llama").save_pretrained(tmp_path)
    vocab = {w: i for i, w in enumerate(["[UNK]", "the", "cat", "sat", "on", "mat"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    capsys.readouterr()
    assert main(["--hf", str(tmp_path), "--prompt", "the cat sat on the mat",
                 "--prompt-ids", ",".join(map(str, range(10, 22))), "--prompt-ids", "7,8,9",
                 "--max-new-tokens", "32", "--bench"]) == 0
    out = capsys.readouterr().out
    assert "batch 3, prompt tokens 21" in out
    for what in ("time to first token", "prefill", "decode", "tokens/s", "cache memory"):
        assert what in out


def assert_one_error_line(err: str, match: str):
    """One `error:` line naming the problem, no traceback (a `loaded ...` note may precede)."""
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines[-1].startswith("error:") and match in lines[-1], err
    assert sum(line.startswith("error:") for line in lines) == 1 and len(lines) <= 2, err


@pytest.mark.parametrize("args, match", [
    (["--prompt-ids", "1," + "2," * 60], "cache holds max_len=64"),
    (["--prompt-ids", "1,256"], "outside the vocabulary"),
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt-ids", ","], "--prompt-ids is empty"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be positive"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--temperature", "-0.5"], "--temperature must be >= 0"),
])
def test_cli_bad_input_is_one_line(run_dir, capsys, args, match):
    assert main(["--checkpoint", run_dir[0], *args]) == 2
    assert_one_error_line(capsys.readouterr().err, match)


def test_cli_missing_files_are_one_line(run_dir, tmp_path, capsys):
    import shutil
    hf = tmp_path / "hf"
    hf_model("qwen2").save_pretrained(hf)  # no tokenizer.json beside it
    capsys.readouterr()
    empty_run = tmp_path / "empty_run"
    os.makedirs(empty_run / "checkpoints")
    shutil.copy(os.path.join(run_dir[0], "run.json"), empty_run)
    no_tok = tmp_path / "no_tok"
    shutil.copytree(run_dir[0], no_tok)
    with open(no_tok / "run.json") as f:
        meta = json.load(f)
    with open(no_tok / "run.json", "w") as f:
        json.dump({**meta, "tokenizer": "tokenizer.json"}, f)
    cases = [(["--checkpoint", str(tmp_path / "nope")], "not a directory"),
             (["--checkpoint", str(tmp_path)], "not a jaxlm run directory"),
             (["--checkpoint", str(empty_run)], "no checkpoints"),
             (["--checkpoint", str(no_tok)], "tokenizer"),
             (["--hf", str(tmp_path)], "no config.json"),
             (["--hf", str(hf), "--prompt", "hi"], "no tokenizer.json")]
    for args, match in cases:
        assert main(args) == 2, args
        assert_one_error_line(capsys.readouterr().err, match)


def test_pallas_kernels_get_a_slot_major_cache_and_the_same_tokens(llama, greedy_run):
    """implementation="pallas" keeps the cache [b,S,k,d] (what its kernels read, no
    per-step transpose); XLA's is [b,k,S,d]. Same greedy tokens and logits either way
    (Pallas interpret mode on CPU)."""
    lm, engine = llama
    graph, state = nnx.split(lm)
    pallas_lm = nnx.merge(nnx.graphdef(abstract_model(lm.cfg.replace(attention_impl="pallas"))),
                          state)
    pallas = Engine(pallas_lm)
    cfg = lm.cfg
    assert pallas.new_cache(2, 32).layers[0][0].shape == (2, 32, cfg.num_kv_heads,
                                                          cfg.dim_per_head)
    assert engine.new_cache(2, 32).layers[0][0].shape == (2, cfg.num_kv_heads, 32,
                                                          cfg.dim_per_head)
    with pytest.raises(ValueError, match="another attention_impl"):
        lm(jnp.ones((1, 3), jnp.int32), cache=pallas_lm.init_cache(1, 16))
    out, logits = pallas.generate(PROMPTS, max_new_tokens=N, record_logits=True)
    assert out == greedy_run[0]
    np.testing.assert_allclose(logits, greedy_run[1], atol=1e-5)
