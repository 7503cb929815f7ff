"""Adapters in the inference engine: one batch whose rows use different LoRA, prefix and
bottleneck adapters (or none) equals each adapter served alone and the training forward of
each adapted model; merged LoRA equals unmerged; GPT-2 (fused c_attn, learned positions)
with a prefix and LoRA; the prefix cache keeps adapters apart; the no-adapter program is
unchanged; weight-space targets are refused; the CLI serves PEFT directories and rejects
bad input in one line."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import adapted_lm, tiny_lm

from jaxlm.infer import Engine
from jaxlm.infer import engine as engine_mod
from jaxlm.infer.cli import main
from jaxlm.model import Config, preset
from jaxlm.model import peft as P

V = 64
LLAMA = Config(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
               init_std=0.2, max_position=128)
GPT2 = preset("gpt2", vocab_size=V, d_model=32, n_layers=2, n_heads=4, ffn_dim=64,
              max_position=64, init_std=0.2)
N = 8  # new tokens
RNG = np.random.default_rng(0)


def full_logits(lm, rows):
    """The model's own training forward (no cache; a prefix is prepended in every layer)
    over each row, right-padded into one batch."""
    width = max(len(r) for r in rows)
    tokens = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
    graph, state = nnx.split(lm)
    out = jax.jit(lambda s, t: nnx.merge(graph, s)(t).logits)(state, tokens)
    return [np.asarray(out[i, :len(r)]) for i, r in enumerate(rows)]


def check_rows(models, prompts, ids, out, logits, single=True):
    """Each row (adapter a = ids[i], -1: models[-1] the base) equals the training forward
    of its adapted model, and (single) that model served alone by its own Engine."""
    for a in sorted(set(ids)):
        lm = models[a]
        rows = [i for i, x in enumerate(ids) if x == a]
        full = full_logits(lm, [prompts[i] + out[i][:-1] for i in rows])
        for i, f in zip(rows, full):
            want = f[len(prompts[i]) - 1:]
            np.testing.assert_allclose(logits[i], want, atol=1e-5, rtol=0)
            np.testing.assert_array_equal(out[i], np.argmax(want, -1))
        if single:
            alone, alone_logits = Engine(lm).generate([prompts[i] for i in rows],
                                                      max_new_tokens=N, record_logits=True)
            assert alone == [out[i] for i in rows], a
            np.testing.assert_allclose(alone_logits, logits[rows], atol=1e-5, rtol=0)


# One batch over LoRA, prefix, bottleneck and base rows (Llama) ----------------------------
SPECS = [P.LoraSpec(r=2, alpha=4.0, targets=("q_proj", "v_proj")),
         P.LoraSpec(r=5, alpha=3.0,
                    targets=("k_proj", "o_proj", "gate_proj", "down_proj", "lm_head")),
         P.PrefixSpec(tokens=3),
         P.BottleneckSpec(dim=6, activation="gelu")]
IDS = [0, 1, 2, 3, -1, 1, 2, None]
PROMPTS = [RNG.integers(0, V, n).tolist() for n in (5, 9, 3, 7, 6, 4, 11, 8)]


@pytest.fixture(scope="module")
def mixed():
    base = tiny_lm(LLAMA)
    adapted = [adapted_lm(base, s, seed=i + 1) for i, s in enumerate(SPECS)]
    engine = Engine(base, adapters=adapted)
    out, logits = engine.generate(PROMPTS, max_new_tokens=N, record_logits=True,
                                  adapter_ids=IDS)
    return base, adapted, engine, out, logits


def test_mixed_batch_rows_equal_each_adapter_alone_and_the_training_forward(mixed):
    """Rows over two LoRAs (ranks 2 and 5, different targets), a prefix, a bottleneck
    and none, in one batch of one compiled program: each row's greedy tokens and every
    step's logits equal its adapter served alone and its adapted model's own forward over
    the whole sequence (for the prefix: lm(tokens), the prefix prepended in every layer)."""
    base, adapted, engine, out, logits = mixed
    ids = [-1 if a is None else a for a in IDS]
    check_rows([*adapted, base], PROMPTS, ids, out, logits)
    # every adapter changes its rows (so the test can fail)
    plain = full_logits(base, [p + o[:-1] for p, o in zip(PROMPTS, out)])
    for i, a in enumerate(ids):
        diff = np.abs(plain[i][len(PROMPTS[i]) - 1:] - logits[i]).max()
        assert (diff > 1e-2) == (a != -1), (i, a, diff)
    # another mix of the same adapters runs the same compiled steps, rows unchanged
    sizes = (engine_mod._prefill._cache_size(), engine_mod._decode._cache_size())
    mix = [0, 3, 2, 1, -1, 1, 0, 2]
    again, _ = engine.generate(PROMPTS, max_new_tokens=N, adapter_ids=mix, record_logits=True)
    assert (engine_mod._prefill._cache_size(), engine_mod._decode._cache_size()) == sizes
    assert [again[i] for i in (0, 2, 4, 5)] == [out[i] for i in (0, 2, 4, 5)]


def test_stacked_model_forward_equals_each_adapted_model(mixed):
    """attach_stacked on the model itself: lm(tokens, peft=PeftInputs(ids)) row by row
    equals each adapted model (zero-padded ranks and untargeted modules are exact)."""
    base, adapted, _, _, _ = mixed
    weighted = [adapted[i] for i in (0, 1, 3)]
    stacked = P.attach_stacked(nnx.merge(*nnx.split(base)), weighted)
    q = stacked.blocks[0].attn.q_proj.lora
    # each adapter's scale (alpha/r: 2 for the first, which alone targets q_proj) is
    # folded into its B, so the stack's own scales are all 1 and the program holds none
    assert q.stacked and q.a[...].shape == (2, 3, 32, 2) and q.scale == (1.0, 1.0, 1.0)
    own = adapted[0].blocks[0].attn.q_proj.lora
    np.testing.assert_allclose(q.b[...][:, 0], own.scale * own.b[...], rtol=1e-6)
    assert own.scale == 2.0 and not np.any(q.b[...][:, 1:])
    assert stacked.blocks[0].mlp.gate.lora.a[...].shape == (2, 3, 32, 5)
    assert stacked.blocks[0].mlp_adapter.down[...].shape == (2, 3, 32, 6)
    assert P.adapters_of(base) == []              # the base itself stays bare
    tokens = jnp.asarray(RNG.integers(0, V, (4, 7)), jnp.int32)
    got = nnx.jit(lambda m, t, i: m(t, peft=P.PeftInputs(ids=i)).logits)(
        stacked, tokens, jnp.array([0, 1, 2, -1]))
    for i, m in enumerate([*weighted, base]):
        np.testing.assert_allclose(got[i], full_logits(m, [tokens[i].tolist()])[0], atol=1e-5)


def test_merged_single_adapter_engine_equals_unmerged(mixed):
    """Engine(adapted, merge=True) folds LoRA into its own copy of the weights: the same
    tokens and logits as the unmerged engine, and the adapted model is left as it was."""
    _, adapted, _, out, logits = mixed
    lm = adapted[1]
    kernel = lm.blocks[0].attn.o_proj.kernel[...]
    rows = [i for i, a in enumerate(IDS) if a == 1]
    merged = Engine(lm, merge=True)
    got, got_logits = merged.generate([PROMPTS[i] for i in rows], max_new_tokens=N,
                                      record_logits=True)
    assert got == [out[i] for i in rows]
    np.testing.assert_allclose(got_logits, logits[rows], atol=1e-4, rtol=0)
    assert lm.blocks[0].attn.o_proj.kernel[...] is kernel
    assert not lm.blocks[0].attn.o_proj.lora.merged


def test_prefix_cache_keeps_adapters_apart(mixed):
    """Stored prefixes are per adapter: a row reuses only K/V computed under its own
    adapter (a prefix adapter's entries start with its virtual tokens); the output is the
    same with and without the cache."""
    _, _, engine, _, _ = mixed
    shared = RNG.integers(0, V, 13).tolist()
    prompts = [shared + RNG.integers(0, V, n).tolist() for n in (1, 2, 3, 1, 2, 3, 1, 2)]
    ids = [2, 2, 0, -1, 0, 1, 3, -1]
    for a in range(-1, 4):
        engine.prefixes_for(a).min_shared = 4
    want = engine.generate(prompts, max_new_tokens=N, adapter_ids=ids, record_logits=True)
    got = engine.generate(prompts, max_new_tokens=N, adapter_ids=ids, record_logits=True,
                          prefix_cache=True)
    assert got[0] == want[0]
    np.testing.assert_allclose(got[1], want[1], atol=1e-5)
    stored = {a: [len(k) for k in engine.prefixes_for(a).entries] for a in range(-1, 4)}
    assert stored == {-1: [13], 0: [13], 1: [], 2: [13], 3: []}  # batch-shared, per adapter
    assert engine.prefixes_for(2).entries[tuple(shared)].filled == 3 + 13
    for a in (1, 3):
        engine.prefixes_for(a).add(shared)
    again = engine.generate(prompts, max_new_tokens=N, adapter_ids=ids, record_logits=True,
                            prefix_cache=True)
    assert again[0] == want[0]
    for a in range(-1, 4):
        engine.prefixes_for(a).clear()


def _decode_jaxpr(engine) -> str:
    first, logits, cache = engine.prefill_prompts([[1, 2, 3]], 4, jax.random.key(0))
    state = engine.start(first, logits, jax.random.key(0), max_new_tokens=4)
    return str(jax.make_jaxpr(engine_mod._decode, static_argnums=(0, 6))(
        engine.graphs, engine.weights, state, cache, 4, jnp.zeros((8,), jnp.int32), None))


def test_no_adapter_path_compiles_the_plain_program(mixed):
    """Without stacked adapters the cache carries no ids and the decode step is the
    plain model's, op for op (an engine of prefix adapters only included); stacked
    adapters add their per-row ops."""
    base, adapted, engine, _, _ = mixed
    plain = _decode_jaxpr(Engine(base))
    assert Engine(base).new_cache(2, 16).peft_ids is None
    assert _decode_jaxpr(Engine(base, adapters=[adapted[2]])) == plain
    assert _decode_jaxpr(engine) != plain


# GPT-2: fused c_attn, learned positions -------------------------------------------------
def test_gpt2_prefix_and_lora_rows(tmp_path):
    """GPT-2 with a prefix (learned positions P..) and two LoRAs on the fused c_attn (one
    shared A per adapter, different ranks) beside base rows; the prefix adapter served
    alone (its K/V in every row's cache) equals the model's own init_cache path."""
    base = tiny_lm(GPT2)
    specs = [P.PrefixSpec(tokens=4), P.LoraSpec(r=3, targets=("c_attn", "c_proj")),
             P.LoraSpec(r=2, alpha=8.0, targets=("c_attn",))]
    adapted = [adapted_lm(base, s, seed=10 + i) for i, s in enumerate(specs)]
    prompts = [RNG.integers(0, V, n).tolist() for n in (6, 9, 4, 7, 3)]
    ids = [0, 1, -1, 2, 0]
    engine = Engine(base, adapters=adapted)
    out, logits = engine.generate(prompts, max_new_tokens=N, record_logits=True,
                                  adapter_ids=ids)
    check_rows([*adapted, base], prompts, ids, out, logits, single=False)
    # the prefix adapter alone; its first logits equal lm(prompt, cache=lm.init_cache(..))
    lm = adapted[0]
    alone, alone_logits = Engine(lm).generate([prompts[0], prompts[4]], max_new_tokens=N,
                                              record_logits=True)
    assert alone == [out[0], out[4]]
    np.testing.assert_allclose(alone_logits, logits[[0, 4]], atol=1e-5, rtol=0)
    own = nnx.jit(lambda m, t: m(t, cache=m.init_cache(1, 32)).logits[:, -1])(
        lm, jnp.asarray([prompts[0]]))
    np.testing.assert_allclose(own[0], logits[0, 0], atol=1e-5)
    # the learned table (64 positions) must hold the prefix too
    Engine(base).check([[1] * 58], 4)
    with pytest.raises(ValueError, match="4 prefix tokens.*cache holds max_len=64"):
        engine.check([[1] * 58], 4, adapter_ids=[0])


# Refusals and bad requests ------------------------------------------------------------
QWEN_MOE = Config(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                  moe_ffn_dim=24, n_experts=4, n_experts_per_tok=2, shared_ffn_dim=40,
                  shared_expert_gate=True, norm_topk_prob=False, moe_dispatch="dense")
DEEPSEEK = preset("deepseek-v3-small", vocab_size=V, d_model=64, n_layers=2, n_experts=4,
                  n_experts_per_tok=2, moe_ffn_dim=32, ffn_dim=64, q_lora_rank=24,
                  kv_lora_rank=16, moe_dispatch="dense", n_group=1, topk_group=1)


@pytest.mark.parametrize("cfg,targets,match", [
    (QWEN_MOE, ("q_proj", "gate_proj"), "MoE expert weights"),
    (DEEPSEEK, ("kv_b_proj",), "MLA's kv_b"),
], ids=["moe-experts", "mla-kv_b"])
def test_stacked_weight_space_targets_are_refused(cfg, targets, match):
    base = tiny_lm(cfg)
    lora = adapted_lm(base, P.LoraSpec(r=2, targets=targets), seed=1)
    other = adapted_lm(base, P.LoraSpec(r=2, targets=("q_a_proj",) if cfg is DEEPSEEK
                                        else ("q_proj",)), seed=2)
    with pytest.raises(ValueError, match=f"adapted\\[1\\] puts LoRA on {match}") as e:
        Engine(base, adapters=[other, lora])
    assert "cannot share a batch" in str(e.value) and "serve it alone" in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_adapter_requests_raise_clear_errors(mixed, tmp_path):
    base, adapted, engine, _, _ = mixed
    cases = [
        (lambda: engine.generate(PROMPTS[:2], max_new_tokens=2, adapter_ids=[0]),
         "adapter_ids has 1 entries for 2 prompts"),
        (lambda: engine.generate(PROMPTS[:2], max_new_tokens=2, adapter_ids=[0, 4]),
         r"adapter_ids \[4\] are out of range: the engine serves 4 adapters"),
        (lambda: engine.generate(PROMPTS[:1], max_new_tokens=2, adapter_ids=["a"]),
         "must be ints"),
        (lambda: Engine(base).generate(PROMPTS[:1], max_new_tokens=2, adapter_ids=[0]),
         "no adapter list"),
        (lambda: Engine(adapted[0], adapters=[adapted[1]]), "needs the base model"),
        (lambda: Engine(base, adapters=adapted[:2], merge=True), "merge=True serves one"),
        (lambda: Engine(base, merge=True), "no LoRA attached"),
        (lambda: Engine(base, adapters=[str(tmp_path / "nope")]), "not a directory"),
        (lambda: Engine(base, adapters=[]), "non-empty list"),
        (lambda: Engine(base, adapters=[base]), "adapter 0 has no adapter attached"),
        (lambda: Engine(base, adapters=[adapted[3], adapted_lm(base, P.BottleneckSpec(4), 5)]),
         "different activations"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


# CLI ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, mixed):
    from jaxlm.model.io import to_hf
    path = tmp_path_factory.mktemp("hf")
    to_hf(mixed[0], str(path))
    return str(path)


def assert_one_error_line(err: str, match: str):
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error:"), err
    assert match in lines[0], err


def test_cli_bad_adapter_input_is_one_line(hf_dir, tmp_path, capsys):
    fake = tmp_path / "fake_adapter"
    os.makedirs(fake)
    (fake / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    cases = [
        (["--adapter", str(tmp_path / "missing")], "is not a directory"),
        (["--adapter", str(tmp_path)], "has no adapter_config.json"),
        (["--adapter", str(fake), "--adapter-ids", "0,1"], "has 2 ids for 1 prompts"),
        (["--adapter", str(fake), "--prompt-ids", "3", "--prompt-ids", "4",
          "--adapter-ids", "0,1"],
         "--adapter-ids [1] out of range: 1 --adapter given"),
        (["--adapter", str(fake), "--adapter-ids", "x"], "comma-separated integers"),
        (["--adapter-ids", "0"], "--adapter-ids needs --adapter"),
    ]
    for args, match in cases:
        if "--prompt-ids" not in args:
            args = [*args, "--prompt-ids", "1,2"]
        assert main(["--hf", hf_dir, *args]) == 2, args
        assert_one_error_line(capsys.readouterr().err, match)


def test_cli_serves_peft_directories(hf_dir, mixed, tmp_path, capsys):
    """HF base (to_hf) + PEFT directories (save_peft): a LoRA, a prefix and the base in
    one batch (--adapter-ids), one adapter for every row (streamed), and --merge; each
    equal to the engine over the in-memory adapted models."""
    from jaxlm.model.io.peft import save_peft
    base, adapted, engine, _, _ = mixed
    dirs = []
    for i in (0, 2, 1):   # LoRA q/v, prefix, LoRA k/o/gate/down
        dirs.append(str(tmp_path / f"adapter{i}"))
        save_peft(adapted[i], dirs[-1])
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[4]]
    flags = [x for p in prompts for x in ("--prompt-ids", ",".join(map(str, p)))]
    capsys.readouterr()
    assert main(["--hf", hf_dir, "--adapter", dirs[0], "--adapter", dirs[1], *flags,
                 "--adapter-ids", "0,1,-1", "--max-new-tokens", str(N)]) == 0
    want = engine.generate(prompts, max_new_tokens=N, adapter_ids=[0, 2, -1])
    printed = capsys.readouterr().out
    assert printed == "".join(f"--- [{i}]\n{' '.join(map(str, p))} {' '.join(map(str, o))} \n"
                              for i, (p, o) in enumerate(zip(prompts, want)))
    for adapter, extra in ((2, []), (1, ["--merge"])):
        path = dirs[[0, 2, 1].index(adapter)]
        assert main(["--hf", hf_dir, "--adapter", path, *flags[:2], "--max-new-tokens",
                     str(N), *extra]) == 0
        want = engine.generate([prompts[0]], max_new_tokens=N, adapter_ids=[adapter])[0]
        assert capsys.readouterr().out.split() == list(map(str, want))
