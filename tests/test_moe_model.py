"""MoE inside the model: layer patterns, dispatch agreement, aux losses, router gradients."""
import chex
import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.model import CausalLM, Config, abstract_model, preset

TOKENS = jax.random.randint(jax.random.key(0), (2, 9), 0, 64)
QWEN_LIKE = Config(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=48,
                   moe_ffn_dim=24, n_experts=4, n_experts_per_tok=2, moe_every=2,
                   shared_ffn_dim=40, shared_expert_gate=True, norm_topk_prob=False,
                   init_std=0.2)
DEEPSEEK_LIKE = preset("deepseek-v3-small", vocab_size=64, init_std=0.2)


def test_layer_patterns_follow_deepseek_and_qwen_rules():
    moe = lambda groups: [(kind.moe, n) for kind, n in groups]  # noqa: E731
    assert moe(DEEPSEEK_LIKE.layer_groups()) == [(False, 1), (True, 3)]       # first_k_dense=1
    assert moe(QWEN_LIKE.layer_groups()) == [(False, 1), (True, 1), (False, 1)]  # (i+1) % 2
    # Qwen's mlp_only_layers on top of decoder_sparse_step: any list of dense layers.
    qwen = QWEN_LIKE.replace(n_layers=6, moe_every=1, mlp_only_layers=[1, 4, 5])
    assert moe(qwen.layer_groups()) == [(True, 1), (False, 1), (True, 2), (False, 2)]
    assert qwen == Config.from_json(qwen.to_json())  # lists come back as (hashable) tuples
    lm = abstract_model(DEEPSEEK_LIKE)
    assert lm.blocks[0].mlp.up.kernel.shape == (1, 256, 512)          # dense: ffn_dim
    assert lm.blocks[1].mlp.up.shape == (3, 8, 256, 128)              # [l, e, d, moe_ffn]
    assert lm.blocks[1].mlp.shared_up.shape == (3, 256, 128)          # 1 shared × moe_ffn


_forward = nnx.jit(lambda lm, tokens: lm(tokens))
_with_cache = nnx.jit(lambda lm, tokens, cache: lm(tokens, cache=cache))


def test_dispatches_agree_and_cached_decode_matches():
    for cfg in (QWEN_LIKE, DEEPSEEK_LIKE):
        base = CausalLM(cfg, nnx.Rngs(1))
        want = _forward(base, TOKENS)
        for dispatch in ("dense", "capacity"):
            other = _forward(CausalLM(cfg.replace(moe_dispatch=dispatch, capacity_factor=16.0),
                                      nnx.Rngs(1)), TOKENS)
            chex.assert_trees_all_close(other.logits, want.logits, atol=1e-4, rtol=1e-5)
            assert abs(float(other.aux["dropped_fraction"])) < 1e-6
        first = _with_cache(base, TOKENS[:, :5], base.init_cache(2, 12))
        second = _with_cache(base, TOKENS[:, 5:], first.cache)
        chex.assert_trees_all_close(jnp.concatenate([first.logits, second.logits], 1),
                                    want.logits, atol=1e-4, rtol=1e-5)


def test_aux_losses_are_returned_and_gradients_reach_the_router():
    lm = CausalLM(QWEN_LIKE, nnx.Rngs(2))
    out = lm(TOKENS)
    assert set(out.aux) == {"load_balance_loss", "router_z_loss", "dropped_fraction",
                            "expert_load", "expert_load_per_layer"}
    # One row per MoE layer (QWEN_LIKE: only layer 1), their mean is "expert_load".
    chex.assert_shape(out.aux["expert_load_per_layer"], (1, QWEN_LIKE.n_experts))
    chex.assert_trees_all_close(out.aux["expert_load_per_layer"].mean(0), out.aux["expert_load"])
    assert 1.0 <= float(out.aux["load_balance_loss"]) <= QWEN_LIKE.n_experts
    chex.assert_trees_all_close(out.aux["expert_load"].sum(), jnp.float32(1.0), atol=1e-6)
    graphdef, params = nnx.split(lm, nnx.Param)

    def loss(p):
        o = nnx.merge(graphdef, p)(TOKENS)
        return jnp.mean(o.logits ** 2) + 0.01 * o.aux["load_balance_loss"]

    grads = jax.grad(loss)(params)
    router_grad = grads["blocks"][1]["mlp"]["router"][...]
    assert float(jnp.abs(router_grad).max()) > 0


def test_tight_capacity_drops_tokens_and_reports_it():
    cfg = QWEN_LIKE.replace(moe_dispatch="capacity", capacity_factor=0.25)
    out = CausalLM(cfg, nnx.Rngs(1))(TOKENS)
    assert 0.0 < float(out.aux["dropped_fraction"]) < 1.0
