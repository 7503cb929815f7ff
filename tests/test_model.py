"""CausalLM properties: cached decode, configs of every position kind, metadata, errors."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import ops
from jaxlm.model import CausalLM, Config, KVCache, preset
from jaxlm.ops.rope import RopeScaling

SMALL = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
             init_std=0.2)

VARIANTS = {
    "llama": Config(**SMALL),
    "mqa_window_softcap": Config(**{**SMALL, "n_kv_heads": 1}, sliding_window=3,
                                 attn_softcap=5.0, final_softcap=8.0),
    "gpt2_like": Config(**SMALL, position="learned", norm="layer", gated_mlp=False,
                        activation="gelu_tanh", qkv_bias=True, out_bias=True, mlp_bias=True,
                        tie_embeddings=True, max_position=64),
    "alibi_postnorm": Config(**SMALL, position="alibi", post_norm=True),
    "sinusoidal": Config(**SMALL, position="sinusoidal", activation="relu", gated_mlp=False),
    "qwen3_partial_yarn": Config(**SMALL, qk_norm=True, head_dim=16, rotary_fraction=0.5,
                                 rope_layout="interleaved",
                                 rope_scaling=RopeScaling("yarn", 4.0, original_max_position=8)),
}


def _tokens(b, t, vocab, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, vocab)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_cached_decode_equals_full_forward(name):
    """Prefill + one-token decode steps through the cache reproduce the full pass."""
    cfg = VARIANTS[name]
    lm = CausalLM(cfg, nnx.Rngs(1))
    tokens = _tokens(2, 9, cfg.vocab_size)
    full = lm(tokens).logits
    chex.assert_shape(full, (2, 9, cfg.vocab_size))
    step = nnx.jit(lambda m, tok, c: m(tok, cache=c))
    out = step(lm, tokens[:, :5], lm.init_cache(2, 16))
    got = [out.logits]
    cache = out.cache
    for i in range(5, 9):
        out = step(lm, tokens[:, i:i + 1], cache)
        cache = out.cache
        got.append(out.logits)
    chex.assert_trees_all_close(jnp.concatenate(got, axis=1), full, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(cache.lengths, [9, 9])


def test_prefix_does_not_see_future_tokens():
    """Causality through the whole model: changing token j changes no logits before j."""
    cfg = VARIANTS["llama"]
    lm = CausalLM(cfg, nnx.Rngs(0))
    tokens = _tokens(1, 10, cfg.vocab_size)
    changed = tokens.at[0, 6].set((tokens[0, 6] + 1) % cfg.vocab_size)
    a, b = lm(tokens).logits, lm(changed).logits
    chex.assert_trees_all_close(a[:, :6], b[:, :6], atol=0, rtol=0)
    assert float(jnp.abs(a[:, 6:] - b[:, 6:]).max()) > 1e-4


def test_segment_ids_keep_packed_documents_apart():
    """Two documents packed in one row give the same logits as each run alone."""
    cfg = VARIANTS["llama"]
    lm = CausalLM(cfg, nnx.Rngs(0))
    doc_a, doc_b = _tokens(1, 5, cfg.vocab_size, 1), _tokens(1, 4, cfg.vocab_size, 2)
    packed = jnp.concatenate([doc_a, doc_b], axis=1)
    seg = jnp.array([[0] * 5 + [1] * 4])
    pos = jnp.array([list(range(5)) + list(range(4))])
    out = lm(packed, pos, segment_ids=seg).logits
    chex.assert_trees_all_close(out[:, :5], lm(doc_a).logits, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(out[:, 5:], lm(doc_b).logits, atol=1e-5, rtol=1e-5)


def test_remat_changes_nothing_but_memory():
    cfg = VARIANTS["llama"]
    tokens = _tokens(2, 7, cfg.vocab_size)

    def loss_and_grads(c):
        lm = CausalLM(c, nnx.Rngs(3))
        graphdef, params = nnx.split(lm, nnx.Param)

        def loss(p):
            logits = nnx.merge(graphdef, p)(tokens).logits
            return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])
        return jax.jit(jax.value_and_grad(loss))(params)

    base = loss_and_grads(cfg)
    for policy in ("full", "dots"):
        chex.assert_trees_all_close(loss_and_grads(cfg.replace(remat=policy)), base,
                                    atol=1e-6, rtol=1e-5)


def test_gradients_match_finite_differences():
    """Directional derivative of a loss through every parameter vs a central difference."""
    cfg = VARIANTS["llama"]
    lm = CausalLM(cfg, nnx.Rngs(4))
    tokens = _tokens(1, 6, cfg.vocab_size)
    graphdef, params = nnx.split(lm, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(9), len(leaves))
    direction = treedef.unflatten(
        [0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])

    def loss_along(eps):
        p = jax.tree.map(lambda x, d: x + eps * d, params, direction)
        return jnp.mean(nnx.merge(graphdef, p)(tokens).logits ** 2)

    loss_along = jax.jit(loss_along)
    analytic = jax.jit(jax.grad(loss_along))(0.0)
    h = 1e-2  # a small step along a small direction: truncation error well under 1 %
    numeric = (loss_along(h) - loss_along(-h)) / (2 * h)
    np.testing.assert_allclose(analytic, numeric, rtol=2e-2)


def test_parameters_carry_logical_axis_names():
    lm = CausalLM(VARIANTS["gpt2_like"], nnx.Rngs(0))
    state = nnx.state(lm, nnx.Param)
    allowed = {"embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "layers", None}
    for path, var in jax.tree_util.tree_leaves_with_path(
            state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        names = var.get_metadata()["out_sharding"]
        assert len(names) == var[...].ndim, path
        assert set(names) <= allowed, (path, names)
        if "blocks" in jax.tree_util.keystr(path):
            assert names[0] == "layers", path
    assert state["blocks"][0]["attn"]["q_proj"]["kernel"].get_metadata()["out_sharding"] == (
        "layers", "embed", "heads", "head_dim")


def test_bfloat16_compute_runs_close_to_float32():
    cfg = VARIANTS["llama"]
    tokens = _tokens(2, 8, cfg.vocab_size)
    f32 = CausalLM(cfg, nnx.Rngs(0))(tokens).logits
    bf16 = CausalLM(cfg.replace(dtype="bfloat16"), nnx.Rngs(0))(tokens).logits
    assert bf16.dtype == jnp.float32  # logits are always returned in float32
    chex.assert_trees_all_close(bf16, f32, atol=0.15, rtol=0.05)


@pytest.mark.parametrize("changes,field", [
    (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
    (dict(d_model=30, n_heads=4), "head_dim"),
    (dict(activation="swish2"), "activation"),
    (dict(norm="batch"), "norm"),
    (dict(rotary_fraction=1.5), "rotary_fraction"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(dtype="float8"), "dtype"),
])
def test_config_errors_name_the_field(changes, field):
    with pytest.raises(ValueError, match=f"Config.{field}"):
        Config(**changes)


def test_config_json_round_trip_and_presets():
    cfg = VARIANTS["qwen3_partial_yarn"]
    assert Config.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        Config.from_dict({**cfg.to_dict(), "n_expert": 3})
    assert preset("llama3-8b").num_kv_heads == 8
    with pytest.raises(ValueError, match="unknown preset"):
        preset("llama9")


def test_bad_calls_raise_clear_errors():
    lm = CausalLM(VARIANTS["llama"], nnx.Rngs(0))
    with pytest.raises(ValueError, match="tokens must be"):
        lm(jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="cache has 2 rows"):
        lm(jnp.zeros((1, 3), jnp.int32), cache=lm.init_cache(2, 8))
    with pytest.raises(ValueError, match="max_len"):
        KVCache.create(VARIANTS["llama"], 1, 0)


def test_alibi_model_uses_paper_slopes():
    """With ALiBi the model passes the paper's slopes; check against attention directly."""
    slopes = ops.alibi_slopes(4)
    np.testing.assert_allclose(slopes, [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8], rtol=1e-6)


def test_profile_regions_are_named_like_the_model():
    """jax.named_scope labels the embedding, attention, MLP/MoE, norms and head, so the
    op names of a profile (the lowered module's locations) read like the model."""
    cfg = Config(**{**SMALL, "n_layers": 3}, n_experts=4, first_k_dense=1)
    graph, state = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, nnx.Rngs(0))))
    text = jax.jit(lambda s, t: nnx.merge(graph, s)(t).logits).lower(
        state, jnp.ones((1, 4), jnp.int32)).as_text(debug_info=True)
    for scope in ("embed", "attn_norm", "attention", "mlp_norm", "mlp", "moe", "final_norm",
                  "lm_head"):
        assert f"{scope}/" in text, scope
