"""Adapters on a CausalLM (jaxlm.model.peft): LoRA equals the base with independently merged
weights (dense, fused GPT-2 c_attn, MoE experts, MLA), gradients are the chain rule of the
merged weight, dropout is unbiased, bottleneck adapters equal torch hooks on transformers,
prefix tuning's training path equals its cache path per packed document, specs and
targets fail clearly."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxlm.model import Config, build, preset
from jaxlm.model import peft as P
from jaxlm.model.io import to_hf

LLAMA = Config(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
               init_std=0.2)
GPT2 = preset("gpt2", vocab_size=64, d_model=32, n_layers=2, n_heads=4, ffn_dim=64,
              max_position=64, init_std=0.2)
QWEN_MOE = Config(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=48,
                  moe_ffn_dim=24, n_experts=4, n_experts_per_tok=2, moe_every=2,
                  shared_ffn_dim=40, shared_expert_gate=True, norm_topk_prob=False,
                  init_std=0.2, moe_dispatch="dense")
DEEPSEEK = preset("deepseek-v3-small", vocab_size=64, d_model=64, n_layers=2, n_experts=4,
                  n_experts_per_tok=2, moe_ffn_dim=32, ffn_dim=64, q_lora_rank=24,
                  kv_lora_rank=16, init_std=0.2, moe_dispatch="dense", n_group=1,
                  topk_group=1)
TOKENS = jax.random.randint(jax.random.key(0), (2, 9), 0, 64)
_logits = nnx.jit(lambda lm, tokens: lm(tokens).logits)


def randomise(lm, seed=1):
    """Every adapter weight random (B ≠ 0), so a test of the delta can fail."""
    keys = iter(jax.random.split(jax.random.key(seed), 4096))
    for _, module in nnx.iter_modules(lm):
        for name in ("a", "b", "down", "down_bias", "up", "up_bias", "embedding"):
            var = getattr(module, name, None)
            if isinstance(var, P.Adapter):
                var.set_value(0.3 * jax.random.normal(next(keys), var[...].shape))
    return lm


def reference_merge(base, adapted):
    """A copy of `base` whose weights are W + s·A·B, computed in numpy from the adapted
    model's factors with flattened matrices (no jaxlm code on the path)."""
    ref = nnx.merge(*nnx.split(base))
    ref = nnx.clone(ref)
    for path, lora in P.loras(adapted):
        owner = P._module(ref, path[:-1])
        var = owner.kernel if path[-1] == "lora" else getattr(owner, path[-1][:-len("_lora")])
        w = np.asarray(var[...], np.float64)
        a, b = np.asarray(lora.a[...], np.float64), np.asarray(lora.b[...], np.float64)
        lead = a.ndim + b.ndim - w.ndim - 2
        r = a.shape[-1]
        a2 = a.reshape(*a.shape[:lead], -1, r)
        b2 = b.reshape(*b.shape[:lead], r, -1)
        w = w + lora.scale * np.matmul(a2, b2).reshape(w.shape)
        var.set_value(jnp.asarray(w, jnp.float32))
    return ref


@pytest.mark.parametrize("cfg,targets", [
    (LLAMA, ("q_proj", "v_proj")),
    (LLAMA, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
             "lm_head")),
    (LLAMA, r"model\.layers\.\d+\.mlp\.(gate|down)_proj"),
    (GPT2, ("c_attn", "c_proj", "c_fc")),
    (QWEN_MOE, ("q_proj", "gate_proj", "up_proj", "down_proj")),  # dense, experts, shared
    (DEEPSEEK, ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                "down_proj")),
], ids=["llama-qv", "llama-all", "llama-regex", "gpt2-fused", "moe-experts", "mla"])
def test_lora_equals_base_with_merged_weights(cfg, targets):
    base = build.create(cfg, 0)
    want_base = _logits(base, TOKENS)
    lm = P.attach(nnx.clone(base), P.LoraSpec(r=4, alpha=6.0, targets=targets), seed=3)
    np.testing.assert_allclose(_logits(lm, TOKENS), want_base, atol=1e-6)  # B = 0: the base
    randomise(lm)
    got = _logits(lm, TOKENS)
    want = _logits(reference_merge(base, lm), TOKENS)
    assert float(jnp.max(jnp.abs(got - want_base))) > 1e-2  # the adapter changes the output
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # merge folds the same delta into the weights; unmerge restores them
    kernels = nnx.state(lm, nnx.Param)
    P.merge(lm)
    np.testing.assert_allclose(_logits(lm, TOKENS), want, rtol=1e-4, atol=1e-4)
    P.unmerge(lm)
    np.testing.assert_allclose(_logits(lm, TOKENS), got, rtol=1e-4, atol=1e-4)
    for x, y in zip(jax.tree.leaves(kernels), jax.tree.leaves(nnx.state(lm, nnx.Param))):
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_gpt2_c_attn_shares_one_a_across_q_k_v():
    lm = P.attach(build.create(GPT2, 0), P.LoraSpec(r=2, targets=("c_attn",)))
    attn = lm.blocks[0].attn
    assert attn.q_proj.lora.a is attn.k_proj.lora.a is attn.v_proj.lora.a
    trainable = build.SplitModel(lm, trainable=P.Adapter).params
    assert set(trainable["blocks"][0]["attn"]) == {"q_proj", "k_proj", "v_proj"}
    held = [n for n, m in trainable["blocks"][0]["attn"].items() if "a" in m["lora"]]
    assert len(held) == 1                                       # one A, stored once
    assert all("b" in m["lora"] for m in trainable["blocks"][0]["attn"].values())


def test_lora_gradients_are_the_chain_rule_of_the_merged_weight():
    """dL/dB = s·Aᵀ·dL/dW and dL/dA = s·dL/dW·Bᵀ, dL/dW from the merged model; the base
    gets no gradient (it is not a trainable input at all)."""
    lm = randomise(P.attach(build.create(LLAMA, 0), P.LoraSpec(r=3, alpha=5.0,
                                                               targets=("v_proj",))))
    split = build.SplitModel(lm, trainable=P.Adapter)
    loss = lambda lm: jnp.mean(jax.nn.log_softmax(lm(TOKENS).logits)[..., 7])  # noqa: E731
    grads = jax.grad(lambda p: loss(split.merge(p)))(split.params)
    merged = P.merge(nnx.clone(lm))
    full = build.SplitModel(merged)
    gw = jax.grad(lambda p: loss(full.merge(p)))(full.params)
    dw = np.asarray(gw["blocks"][0]["attn"]["v_proj"]["kernel"]).reshape(2, 32, -1)
    lora = lm.blocks[0].attn.v_proj.lora
    a, b = np.asarray(lora.a[...]), np.asarray(lora.b[...]).reshape(2, 3, -1)
    g = grads["blocks"][0]["attn"]["v_proj"]["lora"]
    np.testing.assert_allclose(np.asarray(g["b"]).reshape(b.shape),
                               lora.scale * np.swapaxes(a, 1, 2) @ dw, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g["a"], lora.scale * dw @ np.swapaxes(b, 1, 2),
                               rtol=1e-4, atol=1e-6)
    assert jax.tree.structure(grads) == jax.tree.structure(split.params)


def test_lora_dropout_is_unbiased_and_random():
    """Dropout on the LoRA input: masks differ per key, and since the delta is linear in
    its input, the mean output over keys is the no-dropout output (5 standard errors)."""
    lm = randomise(P.attach(build.create(LLAMA, 0), P.LoraSpec(r=4, targets=("q_proj",),
                                                               dropout=0.5)))
    graph, state = nnx.split(lm.blocks[0].attn.q_proj)
    layer0 = jax.tree.map(lambda v: v[0], state)
    x = jax.random.normal(jax.random.key(2), (3, 32))
    plain = nnx.merge(graph, layer0)(x)                    # no key: no dropout
    n = 2000
    outs = jax.jit(jax.vmap(lambda k: nnx.merge(graph, layer0)(x, P.PeftInputs(key=k))))(
        jax.random.split(jax.random.key(0), n))
    spread = jnp.std(outs, axis=0)
    assert float(spread.mean()) > 1e-2
    assert float(jnp.max(jnp.abs(outs.mean(0) - plain) / (spread / np.sqrt(n) + 1e-6))) < 5.0


def test_bottleneck_adapters_equal_torch_hooks_on_transformers(tmp_path):
    """Houlsby adapters (after attention and after the MLP) against the same adapters as
    forward hooks on transformers' LlamaForCausalLM."""
    from transformers import AutoModelForCausalLM
    lm = randomise(P.attach(build.create(LLAMA, 0), P.BottleneckSpec(dim=5, activation="gelu")))
    to_hf(lm, str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()

    def hook(adapter, j):
        w = {n: torch.tensor(np.asarray(getattr(adapter, n)[...][j]))
             for n in ("down", "down_bias", "up", "up_bias")}

        def add(module, args, out):
            h = out[0] if isinstance(out, tuple) else out
            h = h + torch.nn.functional.gelu(h @ w["down"] + w["down_bias"]) @ w["up"] + w["up_bias"]
            return (h, *out[1:]) if isinstance(out, tuple) else h
        return add
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.register_forward_hook(hook(lm.blocks[0].attn_adapter, i))
        layer.mlp.register_forward_hook(hook(lm.blocks[0].mlp_adapter, i))
    with torch.no_grad():
        want = model(torch.tensor(np.asarray(TOKENS))).logits.numpy()
    np.testing.assert_allclose(_logits(lm, TOKENS), want, rtol=1e-4, atol=1e-4)


def test_bottleneck_starts_as_the_base_and_pfeiffer_adapts_the_mlp_only():
    base = build.create(LLAMA, 0)
    lm = P.attach(nnx.clone(base), P.parse_spec("adapter:dim=8,style=pfeiffer"))
    np.testing.assert_allclose(_logits(lm, TOKENS), _logits(base, TOKENS), atol=1e-6)
    assert lm.blocks[0].attn_adapter is None and lm.blocks[0].mlp_adapter is not None


@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("projection", [False, True])
def test_prefix_training_path_equals_the_cache_path_per_document(cfg, projection):
    """Two documents packed in one row (segment ids, positions from 0 each) see the same
    prefix as each document prefilled alone into a cache that holds the prefix."""
    lm = P.attach(build.create(cfg, 0), P.PrefixSpec(tokens=3, projection=projection,
                                                     hidden=16))
    docs = [TOKENS[0, :5], TOKENS[1, :4]]
    tokens = jnp.concatenate(docs)[None]
    positions = jnp.array([[0, 1, 2, 3, 4, 0, 1, 2, 3]])
    segments = jnp.array([[0] * 5 + [1] * 4])
    packed = nnx.jit(lambda m: m(tokens, positions, segment_ids=segments).logits)(lm)
    cached = nnx.jit(lambda m, t: m(t, cache=m.init_cache(1, 16)).logits)
    alone = jnp.concatenate([cached(lm, d[None]) for d in docs], axis=1)
    np.testing.assert_allclose(packed, alone, rtol=1e-4, atol=1e-4)
    cache = lm.init_cache(2, 16)
    assert np.asarray(cache.lengths).tolist() == [3, 3]


def test_prefix_gradients_reach_the_prefix_only():
    lm = P.attach(build.create(LLAMA, 0), P.PrefixSpec(tokens=2))
    split = build.SplitModel(lm, trainable=P.Adapter)
    grads = jax.grad(lambda p: jnp.sum(split.merge(p)(TOKENS).logits[..., 3]))(split.params)
    assert list(grads) == ["prefix"]
    assert float(jnp.abs(grads["prefix"]["embedding"]).min(axis=1).max()) > 0


def test_prefix_refuses_mla_and_fused_kernels_in_training():
    with pytest.raises(ValueError, match="MLA"):
        P.attach(build.create(DEEPSEEK, 0), P.PrefixSpec(tokens=2))
    lm = P.attach(build.create(LLAMA.replace(attention_impl="cudnn"), 0), P.PrefixSpec(tokens=2))
    with pytest.raises(ValueError, match="attention_impl='xla'"):
        lm(TOKENS)


@pytest.mark.parametrize("text,want", [
    ("lora:r=8,alpha=16,targets=q_proj,v_proj",
     P.LoraSpec(r=8, alpha=16.0, targets=("q_proj", "v_proj"))),
    ("lora:targets=re:.*\\.(q|v)_proj,rslora=true,dropout=0.1",
     P.LoraSpec(targets=r".*\.(q|v)_proj", rslora=True, dropout=0.1)),
    ("prefix:tokens=16", P.PrefixSpec(tokens=16)),
    ("prefix:tokens=4,projection=true,hidden=32", P.PrefixSpec(4, True, 32)),
    ("adapter:dim=32", P.BottleneckSpec(dim=32)),
    ("adapter:dim=8,style=pfeiffer,activation=gelu", P.BottleneckSpec(8, ("mlp",), "gelu")),
])
def test_parse_spec(text, want):
    assert P.parse_spec(text) == want
    assert P.spec_from_dict(P.spec_to_dict(want)) == want


@pytest.mark.parametrize("text,match", [
    ("ia3:r=4", "unknown method 'ia3'"),
    ("lora:rank=x", "r='x' is not a int"),
    ("lora:r=0", "r must be >= 1"),
    ("lora:bogus=1", "has no setting 'bogus'"),
    ("prefix:tokens=0", "tokens must be >= 1"),
    ("adapter:dim=8,style=other", "houlsby or pfeiffer"),
    ("lora:q_proj", "not key=value"),
])
def test_bad_specs_fail_in_one_line(text, match):
    with pytest.raises(ValueError, match=match) as e:
        P.parse_spec(text)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("cfg,targets,match", [
    (LLAMA, ("query",), "match no module of this model; its linear modules are .*q_proj"),
    (LLAMA, r"model\.layers\.0\.self_attn\.q_proj", "in some layers only \\(1 of 2\\)"),
    (LLAMA, ("embed_tokens",), "an embedding table"),
    (QWEN_MOE, ("gate",), "an MoE router"),
    (QWEN_MOE, (r"experts.0.gate_proj",), "1 of 4 experts"),
])
def test_targets_that_cannot_be_adapted_fail_clearly(cfg, targets, match):
    with pytest.raises(ValueError, match=match):
        P.attach(build.create(cfg, 0), P.LoraSpec(targets=targets))


def test_one_adapter_per_model():
    lm = P.attach(build.create(LLAMA, 0), P.LoraSpec())
    with pytest.raises(ValueError, match="already has an adapter"):
        P.attach(lm, P.PrefixSpec())
