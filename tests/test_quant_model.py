"""Quantized models: int8 / int4 weights equal the float model over the dequantized weights
(dense GQA, MLA, MoE with shared experts; LoRA on top, its gradients too); the int8 KV cache
(dense, paged, MLA's latent) gives the same tokens in the static engine and the paged
scheduler and stays close to the float cache; several LoRA adapters and speculative
decoding run over quantized weights; a quantized model saves and loads without being
quantized again; the memory planner counts the scales; bad settings fail in one line."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.infer import Engine
from jaxlm.infer.cli import main as infer_main
from jaxlm.infer.scheduler import Request, Scheduler
from jaxlm.infer.speculative import Speculative
from jaxlm.model import Config, abstract_model
from jaxlm.model import peft as P
from jaxlm.model import quant as Q
from jaxlm.model.cache import KVCache, MLACache, paged_buffers
from jaxlm.model.io.runs import load_run, save_model
from jaxlm.model.io.tokenizer import ByteTokenizer
from jaxlm.model.memory import kv_bytes_per_token, main as memory_main

from test_peft_engine import adapted_lm, tiny_lm
from test_scheduler import drive

V = 64
BASE = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
            init_std=0.2, max_position=128)
DENSE = Config(**BASE, qkv_bias=True)
MLA = Config(**{**BASE, "n_kv_heads": None}, attention="mla", q_lora_rank=16,
             kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
             mla_absorb=True)
MOE = Config(**BASE, n_experts=4, n_experts_per_tok=2, moe_ffn_dim=32, n_shared_experts=1,
             first_k_dense=1, tie_embeddings=True)
GROUP = 16  # int4 group: divides every contraction size above
MODELS = {"dense": DENSE, "mla": MLA, "moe": MOE}
LMS = {name: tiny_lm(cfg, i) for i, (name, cfg) in enumerate(MODELS.items())}
RNG = np.random.default_rng(0)
TOKENS = jnp.asarray(RNG.integers(0, V, (2, 12)), jnp.int32)
PROMPTS = [RNG.integers(0, V, n).tolist() for n in (9, 3, 14)]


def over_dequantized(qlm, float_lm):
    """float_lm (new Variables) with every weight qlm quantized replaced by its dequantized
    value: the float model the quantized one should compute."""
    graph, state = nnx.split(float_lm)
    out = nnx.merge(graph, jax.tree.map(lambda x: x, state))
    for path, m in nnx.iter_modules(qlm):
        if isinstance(m, Q.QuantizedParam):
            getattr(P._module(out, path[:-1]), path[-1]).set_value(m.dequantize())
    return out


def quantized_paths(lm):
    return sorted("/".join(map(str, p)) for p, m in nnx.iter_modules(lm)
                  if isinstance(m, Q.QuantizedParam))


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_forward_equals_float_over_dequantized_weights(name, mode):
    lm = LMS[name]
    q = Q.quantize(lm, mode, GROUP)
    assert q.cfg.weight_quant == mode and lm.cfg.weight_quant is None  # lm untouched
    ref = over_dequantized(q, lm)
    chex_close(q(TOKENS).logits, ref(TOKENS).logits, 1e-4)
    # every linear weight is quantized (rounding error ≤ half a step), nothing else
    for path, m in nnx.iter_modules(q):
        if isinstance(m, Q.QuantizedParam):
            w = np.asarray(getattr(P._module(lm, path[:-1]), path[-1])[...])
            step = np.abs(w).max() / (127 if mode == "int8" else 7)
            assert np.abs(w - np.asarray(m.dequantize())).max() <= step / 2 + 1e-6
    paths = quantized_paths(q)
    want = {"dense": ["q_proj", "k_proj", "v_proj", "o_proj", "gate", "up", "down"],
            "mla": ["q_a", "q_b", "kv_a", "kv_b", "o_proj", "gate", "up", "down"],
            "moe": ["q_proj", "k_proj", "v_proj", "o_proj", "gate", "up", "down",
                    "shared_gate_proj", "shared_up", "shared_down"]}[name]
    for w in want:
        assert any(p.split("/")[-2 if p.endswith("kernel") else -1] == w for p in paths), w
    assert not any("embed" in p or "router" in p or "norm" in p for p in paths)
    assert any("lm_head" in p for p in paths) == (not lm.cfg.tie_embeddings)


def chex_close(a, b, atol):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=0)


def test_quantized_model_built_from_its_config_has_the_stored_layout():
    """abstract_model(cfg with weight_quant) is what a saved quantized model loads into."""
    q = Q.quantize(LMS["dense"], "int4", GROUP)
    shapes = abstract_model(q.cfg)
    want = jax.tree.map(lambda x: (x.shape, x.dtype), nnx.state(q))
    got = jax.tree.map(lambda x: (x.shape, x.dtype), nnx.state(shapes))
    assert got == want
    k = q.blocks[0].attn.q_proj.kernel
    assert k.values[...].dtype == jnp.uint8 and k.values[...].shape == (2, 16, 4, 8)
    assert k.scale[...].shape == (2, 32 // GROUP, 4, 8)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_lora_over_quantized_weights_forward_and_gradients(mode):
    """QLoRA's layout: a float LoRA over quantized base weights computes what the float
    model over the dequantized weights with the same LoRA computes, gradients included."""
    spec = P.LoraSpec(r=4, alpha=8.0, targets=("q_proj", "k_proj", "v_proj", "o_proj",
                                               "gate_proj", "up_proj", "down_proj"))
    q = Q.quantize(LMS["dense"], mode, GROUP)
    adapted = adapted_lm(q, spec, seed=3)
    ref = adapted_lm(over_dequantized(q, LMS["dense"]), spec, seed=3)
    chex_close(adapted(TOKENS).logits, ref(TOKENS).logits, 1e-4)

    def grads(lm):
        graph, ad, rest = nnx.split(lm, P.Adapter, ...)

        def loss(a):
            logits = nnx.merge(graph, a, rest)(TOKENS).logits
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0])
        return jax.grad(loss)(ad)
    g, g_ref = grads(adapted), grads(ref)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        assert np.abs(np.asarray(a)).max() > 0
        chex_close(a, b, 1e-5)


def test_several_adapters_over_quantized_base_equal_each_alone():
    q = Q.quantize(LMS["dense"], "int8")
    spec = P.LoraSpec(r=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
    a, b = adapted_lm(q, spec, seed=1), adapted_lm(q, spec, seed=2)
    got = Engine(q, adapters=[a, b], cache_dtype="int8").generate(
        PROMPTS, max_new_tokens=8, adapter_ids=[0, 1, -1])
    want = [Engine(m, cache_dtype="int8").generate([p], max_new_tokens=8)[0]
            for m, p in zip((a, b, q), PROMPTS)]
    assert got == want
    assert got[0] != Engine(q, cache_dtype="int8").generate([PROMPTS[0]], max_new_tokens=8)[0]


def test_speculative_decoding_over_quantized_weights_keeps_greedy_tokens():
    q8 = Q.quantize(LMS["dense"], "int8")
    want = Engine(q8, cache_dtype="int8").generate(PROMPTS, max_new_tokens=10)
    for spec in (Speculative("lookup", n_draft=3, ngram=2),
                 Speculative("draft", n_draft=3, draft=Q.quantize(LMS["dense"], "int4", GROUP))):
        e = Engine(q8, cache_dtype="int8", speculative=spec)
        assert e.generate(PROMPTS, max_new_tokens=10) == want, spec.source


@pytest.mark.parametrize("name,absorb", [("dense", None), ("mla", True), ("mla", False)])
def test_int8_cache_same_tokens_in_engine_and_paged_scheduler(name, absorb):
    """The static engine's int8 cache and the paged scheduler's int8 pools hold the same
    quantized keys and values (MLA: the latent and RoPE key with one scale per token), so
    greedy tokens agree exactly; and the int8 cache's logits stay close to the float
    cache's."""
    lm = LMS[name] if absorb is None else tiny_lm(MLA.replace(mla_absorb=absorb), 1)
    want, lg8 = Engine(lm, max_len=64, cache_dtype="int8").generate(
        PROMPTS, max_new_tokens=12, record_logits=True)
    sched = Scheduler(lm, page_size=4, n_pages=40, max_seqs=2, max_batched_tokens=16,
                      cache_dtype="int8", decode_steps=2)
    reqs = [Request(p, max_tokens=12) for p in PROMPTS]
    got = drive(sched, list(enumerate(reqs)))
    assert [got[r.id] for r in reqs] == want
    assert all(b.dtype == jnp.int8 for b in sched.pools[0][:len(sched.pools[0]) // 2])
    # teacher-forced against the float cache: same next-token logits up to int8 error
    _, lg = Engine(lm, max_len=64).generate(PROMPTS, max_new_tokens=1, record_logits=True)
    scale = np.abs(lg).max()
    assert np.abs(lg8[:, 0] - lg[:, 0]).max() <= 0.05 * scale


def test_int8_cache_with_prefix_tuning_and_prefix_caching():
    spec = P.PrefixSpec(tokens=4)
    lm = adapted_lm(LMS["dense"], spec, seed=5)
    shared = RNG.integers(0, V, 20).tolist()
    prompts = [shared + [1, 2], shared + [3]]
    e = Engine(lm, max_len=64, cache_dtype="int8")
    plain = e.generate(prompts, max_new_tokens=6)
    assert e.generate(prompts, max_new_tokens=6, prefix_cache=True) == plain
    _, lg8 = e.generate(prompts, max_new_tokens=1, record_logits=True)
    _, lg = Engine(lm, max_len=64).generate(prompts, max_new_tokens=1, record_logits=True)
    assert np.abs(lg8 - lg).max() <= 0.05 * np.abs(lg).max()
    # the model's own cache (init_cache) holds the prefix quantized too
    cache = lm.init_cache(2, 40, dtype="int8")
    out = lm(jnp.asarray([p[:21] for p in prompts]), cache=cache).logits
    ref = lm(jnp.asarray([p[:21] for p in prompts]), cache=lm.init_cache(2, 40)).logits
    assert np.abs(out - ref).max() <= 0.05 * np.abs(ref).max()


@pytest.mark.parametrize("name", ["dense", "mla"])
def test_planner_counts_int8_values_and_scales(name):
    cfg = MODELS[name]
    make = MLACache.create if name == "mla" else KVCache.create
    for dtype in ("float32", "bfloat16", "int8"):
        cache = make(cfg, 3, 10, dtype)
        assert cache.nbytes == 30 * kv_bytes_per_token(cfg, dtype=dtype), dtype
        pools = paged_buffers(cfg, 5, 4, dtype)
        assert sum(p.nbytes for p in pools) * cfg.n_layers == 20 * kv_bytes_per_token(
            cfg, dtype=dtype)
    assert Engine(LMS[name], cache_dtype="int8").kv_bytes_per_token == kv_bytes_per_token(
        cfg, dtype="int8")
    # 8-bit values + one 4-byte scale per head_dim values: 68 / 256 bytes at head_dim 64
    tiny = Config(n_kv_heads=2)
    assert kv_bytes_per_token(tiny, dtype="int8") / kv_bytes_per_token(tiny) <= 0.27


def test_planner_cli_reports_each_cache_dtype(capsys):
    assert memory_main(["--preset", "tiny", "--dtype", "int8", "--context", "1024"]) == 0
    out = capsys.readouterr().out
    assert "float32 4096, bfloat16 2048, float16 2048, int8 1088" in out


def test_saved_quantized_model_loads_without_quantizing_again(tmp_path, monkeypatch):
    q = Q.quantize(LMS["moe"], "int4", GROUP)
    save_model(q, str(tmp_path / "q"))
    calls = []
    inner = Q._quantize

    def counting(w, *args):  # tracing (shapes only) is fine; computing is re-quantizing
        if not isinstance(w, jax.core.Tracer):
            calls.append(args)
        return inner(w, *args)
    monkeypatch.setattr(Q, "_quantize", counting)
    loaded, _, step = load_run(str(tmp_path / "q"))
    assert calls == [] and step == 0 and loaded.cfg == q.cfg
    for a, b in zip(jax.tree.leaves(nnx.state(loaded)), jax.tree.leaves(nnx.state(q))):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    chex_close(loaded(TOKENS).logits, q(TOKENS).logits, 0)
    # the float weights are not stored beside them: only norms, biases, embeddings, router
    stored = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(q, nnx.Param))}
    assert not any(p.startswith(w) for w in quantized_paths(q) for p in stored)


def test_cli_quantizes_saves_and_serves_the_saved_model(tmp_path, capsys):
    run = str(tmp_path / "run")
    save_model(LMS["dense"], run)
    out_dir = str(tmp_path / "q4")
    args = ["--prompt-ids", "1,2,3,4", "--max-new-tokens", "6", "--cache-dtype", "int8"]
    assert infer_main(["--checkpoint", run, "--quantize", "int4", "--quant-group", "16",
                       "--save-quantized", out_dir, *args]) == 0
    first = capsys.readouterr()
    assert "0.1" in first.err and "int8, " in first.err  # weight ratio and cache bytes
    assert infer_main(["--checkpoint", out_dir, *args]) == 0
    second = capsys.readouterr()
    assert second.out == first.out
    want = Engine(Q.quantize(LMS["dense"], "int4", 16), cache_dtype="int8").generate(
        [[1, 2, 3, 4]], max_new_tokens=6)[0]
    assert ByteTokenizer().decode(want) in second.out


@pytest.mark.parametrize("argv,message", [
    (["--quantize", "int4", "--quant-group", "3"], "--quant-group must be an even number"),
    (["--quantize", "int8", "--quant-group", "32"], "--quant-group applies to --quantize int4"),
    (["--save-quantized", "x"], "--save-quantized needs --quantize"),
    (["--quantize", "int4", "--quant-group", "64"], "does not divide"),
])
def test_cli_bad_quantization_settings_fail_in_one_line(tmp_path, capsys, argv, message):
    run = str(tmp_path / "run")
    save_model(LMS["dense"], run)
    assert infer_main(["--checkpoint", run, "--prompt-ids", "1,2", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("error:")


def test_bad_settings_name_the_fix():
    with pytest.raises(ValueError, match="weight_quant"):
        Config(weight_quant="int3")
    with pytest.raises(ValueError, match="quant_group"):
        Config(quant_group=5)
    with pytest.raises(ValueError, match="cache dtype 'int4'"):
        KVCache.create(DENSE, 1, 8, "int4")
    with pytest.raises(ValueError, match="already quantized"):
        Q.quantize(Q.quantize(LMS["dense"], "int8"), "int8")
    with pytest.raises(ValueError, match="read-only"):
        P.merge(adapted_lm(Q.quantize(LMS["dense"], "int8"), P.LoraSpec(r=2, targets=("q_proj",)), 0))
    from jaxlm.train.config import TrainConfig, model_config
    with pytest.raises(ValueError, match="train in float, then quantize"):
        model_config(TrainConfig(), {"weight_quant": "int8"})


def test_server_serves_quantized_weights_and_int8_pages(tmp_path):
    """python -m jaxlm.serve --quantize int8 --cache-dtype int8: a completion's tokens are
    the static engine's over the same quantized model and int8 cache."""
    from jaxlm.serve.__main__ import build_app, check_args, parse_args
    from test_serve import post, running
    run = str(tmp_path / "run")
    save_model(LMS["dense"], run)
    args = parse_args(["--checkpoint", run, "--quantize", "int8", "--cache-dtype", "int8",
                       "--no-warmup", "--max-seqs", "2", "--max-batched-tokens", "16",
                       "--max-len", "64"])
    check_args(args)
    app, _ = build_app(args)
    want = Engine(Q.quantize(LMS["dense"], "int8"), cache_dtype="int8").generate(
        [[3, 4, 5]], max_new_tokens=5)[0]
    with running(app) as url:
        r = post(url + "/v1/completions", {"model": "run", "prompt": [3, 4, 5],
                                           "max_tokens": 5, "return_token_ids": True,
                                           "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == want


def test_keep_quantized_dequantizes_inside_every_decode_step():
    """keep_quantized=True (the default off the CPU): the int8 weights themselves enter
    the compiled decode loop (XLA cannot hoist a float copy of them out of it), and the
    tokens are those of the default engine."""
    import re
    from jaxlm.infer import engine as E
    q = Q.quantize(LMS["dense"], "int8")
    out = {}
    for keep in (False, True):
        e = Engine(q, max_len=32, keep_quantized=keep)
        out[keep] = e.generate(PROMPTS[:2], max_new_tokens=6)
        first, logits, cache = e.prefill_prompts(PROMPTS[:2], 6, jax.random.key(0))
        state = e.start(first, logits, jax.random.key(1), max_new_tokens=6)
        text = E._decode.lower(e.graphs, e.weights, state, cache, np.int32(6),
                               E._check_stop_tokens((), V), None).compile().as_text()
        body = re.search(r"while\(.*?body=%?([\w.\-]+)", text).group(1)
        head = text[text.index(f"%{body} ("):].split("\n")[0]   # the loop state's types
        if keep:
            assert "s8[" in head
    assert out[True] == out[False]
    assert Engine(LMS["dense"], keep_quantized=True).graphs.keep_quantized is False  # float


def test_qlora_cli_trains_an_adapter_over_a_quantized_base(tmp_path, capsys, monkeypatch):
    """--init QUANTIZED_RUN --peft lora: the adapter learns while the int4 base stays as
    stored (read back with the run); a full fine-tune of a quantized base is refused."""
    from jaxlm.train.cli import main as train_main
    # in-process: leave jax's config alone (a persistent compilation cache written from
    # the server tests' engine threads later in this process can crash)
    monkeypatch.setenv("JAXLM_COMPILATION_CACHE", "0")
    cfg = Config(**{**BASE, "vocab_size": 256})
    base = str(tmp_path / "q4")
    save_model(Q.quantize(tiny_lm(cfg, 7), "int4", GROUP), base)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abcdefghij" * 400)
    common = ["--init", base, "--corpus", str(corpus), "--seq_len", "16", "--batch_size",
              "4", "--sample_tokens", "0", "--progress", "false", "--plot", "false"]
    run = str(tmp_path / "qlora")
    assert train_main(common + ["--peft", "lora:r=4,targets=q_proj,v_proj,down_proj",
                                "--steps", "6", "--lr", "3e-2", "--eval_every", "6", "--log_every", "1",
                                "--run_dir", run]) == 0
    lines = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
    losses = [x["loss"] for x in lines if "loss" in x]
    assert losses[-1] < losses[0] and not any("router_bias_max" in x for x in lines)
    adapted, _, _ = load_run(run)
    stored, _, _ = load_run(base)
    assert adapted.cfg.weight_quant == "int4" and P.loras(adapted)
    for a, b in zip(jax.tree.leaves(nnx.state(adapted, Q.QWeight)),
                    jax.tree.leaves(nnx.state(stored, Q.QWeight))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    capsys.readouterr()
    assert train_main(common + ["--steps", "2", "--run_dir", str(tmp_path / "full")]) == 2
    assert "only an adapter can train" in capsys.readouterr().err
