"""Multi-head latent attention: absorbed == naive, cache holds only latent + RoPE key."""
import chex
import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.model import CausalLM, Config
from jaxlm.model.cache import MLACache
from jaxlm.ops.rope import RopeScaling

MLA = Config(vocab_size=61, d_model=48, n_layers=2, n_heads=4, ffn_dim=64, init_std=0.2,
             attention="mla", q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
             qk_rope_head_dim=6, v_head_dim=10, rope_layout="interleaved",
             rope_scaling=RopeScaling("yarn", 4.0, original_max_position=8, mscale=0.7,
                                      mscale_all_dim=0.7))


def _run(cfg, tokens, split):
    """Full logits, and logits from a prefill of `split` tokens then 1-token decode steps."""
    lm = CausalLM(cfg, nnx.Rngs(5))
    full = lm(tokens).logits
    step = nnx.jit(lambda m, tok, c: m(tok, cache=c))
    out = step(lm, tokens[:, :split], lm.init_cache(tokens.shape[0], 16))
    pieces, cache = [out.logits], out.cache
    for i in range(split, tokens.shape[1]):
        out = step(lm, tokens[:, i:i + 1], cache)
        pieces.append(out.logits)
        cache = out.cache
    return full, jnp.concatenate(pieces, axis=1), cache


def test_absorbed_equals_naive_in_prefill_and_cached_decode():
    tokens = jax.random.randint(jax.random.key(0), (2, 11), 0, MLA.vocab_size)
    naive_full, naive_dec, _ = _run(MLA, tokens, 6)
    abs_full, abs_dec, cache = _run(MLA.replace(mla_absorb=True), tokens, 6)
    assert float(jnp.abs(naive_full).max()) > 0.5  # logits are not trivially small
    chex.assert_trees_all_close(abs_full, naive_full, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(abs_dec, naive_dec, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(naive_dec, naive_full, atol=1e-5, rtol=1e-5)
    assert isinstance(cache, MLACache)
    chex.assert_shape(cache.latent, (2, 2, 16, 16))   # [l, b, S, kv_lora_rank]
    chex.assert_shape(cache.k_rope, (2, 2, 16, 6))    # [l, b, S, qk_rope_head_dim]


def test_without_q_lora_and_with_dense_query():
    cfg = MLA.replace(q_lora_rank=None, rope_scaling=None, rope_layout="half")
    tokens = jax.random.randint(jax.random.key(1), (1, 7), 0, cfg.vocab_size)
    naive, _, _ = _run(cfg, tokens, 7)
    absorbed, _, _ = _run(cfg.replace(mla_absorb=True), tokens, 7)
    chex.assert_trees_all_close(absorbed, naive, atol=1e-5, rtol=1e-5)
